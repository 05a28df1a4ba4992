"""Step 3: BPO training. DPO (paper Eq. 4) on (ground truth, bootstrapped negative) pairs with LoRA
on the language model; the reference is the same model with the adapter disabled. `--loss sft`
trains on the chosen answers only (the paper's Table 3 baseline). One file for one process or many:
    python 03_train_bpo.py ...            torchrun --nproc_per_node 8 03_train_bpo.py ..."""
import argparse
import contextlib
import functools
import glob
import hashlib
import json
import math
import os
import pickle
import shutil
import sys
import time

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import common
import jobs

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the tokenizer also runs in the data workers
p = argparse.ArgumentParser(description=__doc__, formatter_class=jobs.HelpFormatter)
p.add_argument("--model", default="llava-hf/llava-1.5-7b-hf", help="base model (dir or hub id)")
p.add_argument("--data", action="append", required=True, help="pairs JSONL (repeat to train on several)")
p.add_argument("--image_root", action="append", required=True, metavar="DIR|NAME=DIR",
               help="image paths in the pairs are relative to this: one DIR for every source, or NAME=DIR per "
                    "pair `source` (as 01's --data NAME=PATH)")
p.add_argument("--output_dir", required=True, help="adapter/, metrics.jsonl, curves.png and checkpoint-N/ go here")
p.add_argument("--loss", choices=["dpo", "ipo", "sft"], default="dpo",
               help="dpo: the paper's objective, -log sigmoid(beta h) with h = log-ratio(chosen) - log-ratio(rejected); "
                    "ipo: (h - 1/(2 beta))^2; sft: NLL of the chosen answers only (Table 3's baseline), the mean over "
                    "the micro-batch's answer tokens, as LLaVA's fine-tuning")
p.add_argument("--length_normalize", action="store_true",
               help="dpo/ipo: each response's log-ratio log pi/pi_ref divided by its token count (+EOS), in every term")
p.add_argument("--conditional_weight", type=float, default=0.0,
               help="dpo/ipo: add W x mDPO's conditional term, -log sigmoid(beta [log-ratio(chosen | image) - "
                    "log-ratio(chosen | weakened image)]); one more forward of the chosen answer per pair")
p.add_argument("--anchor_weight", type=float, default=0.0,
               help="dpo/ipo: add W x the anchor -log sigmoid(beta log-ratio(chosen)), keeping the chosen reward above 0")
p.add_argument("--noise_step", type=int, default=-1,
               help="conditional term: forward-diffusion step of the weakened image (-1: each pair's meta.noise_step, "
                    "as 01 wrote it, else 500)")
p.add_argument("--noise_on", choices=["features", "pixels"], default=None,
               help="conditional term: where the noise goes (default: each pair's meta.noise_on, else features)")
p.add_argument("--beta", type=float, default=0.1, help="DPO temperature (the paper's eta)")
p.add_argument("--sft_weight", type=float, default=0.0,
               help="DPO only: add this times the chosen answers' per-token NLL to the loss (0: pure DPO, the paper's)")
p.add_argument("--lr", type=float, default=2e-6, help="peak learning rate (AdamW, cosine decay after warmup)")
p.add_argument("--epochs", type=int, default=2, help="passes over the pairs")
p.add_argument("--batch_size", type=int, default=4, help="pairs per process per micro-step")
p.add_argument("--grad_accum", type=int, default=1, help="micro-steps per optimizer step")
p.add_argument("--lora_r", type=int, default=64, help="LoRA rank")
p.add_argument("--lora_alpha", type=int, default=128, help="LoRA scaling numerator (scale = alpha / r)")
p.add_argument("--lora_dropout", type=float, default=0.05, help="dropout on the LoRA input")
p.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
p.add_argument("--warmup_ratio", type=float, default=0.03, help="share of the steps with linear warmup")
p.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm")
p.add_argument("--max_length", type=int, default=2048, help="tokens per sequence incl. image; responses are cut at the end")
p.add_argument("--max_steps", type=int, default=-1, help="stop after this many optimizer steps (-1: --epochs)")
p.add_argument("--save_every", type=int, default=500, help="checkpoint every N steps (0: only at the end)")
p.add_argument("--keep_checkpoints", type=int, default=2, help="how many recent checkpoints to keep")
p.add_argument("--log_every", type=int, default=1, help="write a metrics row every N steps (averaged over them)")
run_dir = p.add_mutually_exclusive_group()
run_dir.add_argument("--resume", action="store_true",
                     help="continue the run in --output_dir from its latest checkpoint (refused if a setting that "
                          "changes what a step sees differs; a longer --max_steps or more --epochs continue it)")
run_dir.add_argument("--overwrite", action="store_true", help="delete an earlier run in --output_dir and start clean")
p.add_argument("--dry_run", action="store_true",
               help="check every pair, root and image header and tokenise every prompt and answer; print counts, "
                    "lengths, cuts, steps and the estimated peak memory per GPU; train nothing, write nothing")
p.add_argument("--load_in_4bit", action="store_true", help="QLoRA: NF4 language model")
p.add_argument("--gradient_checkpointing", action="store_true",
               help="recompute activations in the backward: far less memory (the 7B on 48 GB needs it), ~30%% slower")
p.add_argument("--precompute_ref", action=argparse.BooleanOptionalAction, default=True,
               help="DPO: score every pair under the reference once before training and cache it in "
                    "OUTPUT_DIR/ref_logps.jsonl (the reference never changes), instead of a reference forward every step")
p.add_argument("--num_workers", type=int, default=4 if torch.cuda.is_available() else 0,
               help="processes that read, process and pack the next micro-batches while the GPU computes (0: in the "
                    "training process; the default on CPU)")
p.add_argument("--group_by_length", action="store_true",
               help="batch pairs of similar length together (less padding, faster; batches are then less random)")
jobs.add_on_error_arg(p, "fail", "pair")
p.add_argument("--seed", type=int, default=42, help="seed of the LoRA init, the shuffle and dropout")
common.add_format_args(p)
args = p.parse_args()


def cosine_lr(step, warmup, total):
    """LR multiplier: linear warmup to 1, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def keep_metrics_upto(path, step):
    """On resume, drop log lines written after the checkpoint, so no step is logged twice."""
    if os.path.exists(path):
        rows = [r for r in jobs.read_jsonl(path, tolerate_partial_last=True) if r["step"] <= step]
        jobs.write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def checkpoints(output_dir):
    """Complete checkpoints (renamed into place), oldest first."""
    found = glob.glob(os.path.join(output_dir, "checkpoint-*[0-9]"))
    return sorted(found, key=lambda d: int(d.rsplit("-", 1)[1]))


def plot_curves(metrics_path, png):
    """The paper's Fig. 7: summed log-probs of chosen (and rejected) answers over steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = jobs.read_jsonl(metrics_path, tolerate_partial_last=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("logps/chosen", "logps/rejected"):
        if rows and key in rows[0]:
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("summed log-prob")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def explain_oom(kind, value, tb):
    """Out of memory anywhere (loading, reference pass, training step): say what to lower."""
    if issubclass(kind, torch.OutOfMemoryError):
        sys.stderr.write(f"error: out of memory ({str(value).splitlines()[0]}). Lower --batch_size (keep the effective "
                         f"batch with --grad_accum) or --max_length, or add --gradient_checkpointing / --load_in_4bit\n")
    else:
        sys.__excepthook__(kind, value, tb)


sys.excepthook = explain_oom
rank, world, device = jobs.dist_setup()
main = rank == 0
# every linear layer of the language model; nothing in the vision tower or the projector
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"

fmt = common.input_format(args)
roots = jobs.parse_image_roots(args.image_root)
B = args.batch_size  # pairs per micro-batch; log-probs come as [B chosen..., B rejected...]
per_step = B * world * args.grad_accum  # pairs per optimizer step, all ranks
responses = ("chosen",) if args.loss == "sft" else ("chosen", "rejected")

# ---- the run directory: a fresh run never mixes with an earlier one; a resume sees the same steps
for d in args.data:
    if not os.path.isfile(d):
        sys.exit(f"error: --data {d}: no such file")
# what a step sees: if any of these differs, a resumed run would not continue the same run
settings = {"model": args.model, "data": [[os.path.abspath(d), os.path.getsize(d)] for d in args.data],
            "pairs per step (batch_size x processes x grad_accum)": per_step, "max_length": args.max_length,
            "loss": args.loss, "seed": args.seed, "group_by_length": args.group_by_length,
            "lora_r": args.lora_r, "lora_alpha": args.lora_alpha, **fmt._asdict()}
run_path = os.path.join(args.output_dir, "run.json")
earlier = sorted(n for n in os.listdir(args.output_dir) if n in ("run.json", "metrics.jsonl", "adapter", "ref_logps.jsonl")
                 or n.startswith("checkpoint-")) if os.path.isdir(args.output_dir) else []
if args.resume and os.path.exists(run_path):
    with open(run_path) as f:
        run = json.load(f)
    changed = [f"{k} {run['settings'].get(k)!r} -> {v!r}" for k, v in settings.items() if run["settings"].get(k) != v]
    if changed:
        sys.exit(f"error: --resume of {args.output_dir} with settings that change what a step sees: {'; '.join(changed)}. "
                 "Resume with the run's settings, or start another run (--overwrite, or another --output_dir)")
elif args.resume and earlier:
    sys.exit(f"error: {args.output_dir} holds no run.json ({', '.join(earlier)}): not a run 03 can resume")
elif earlier and not args.dry_run and not args.overwrite:
    sys.exit(f"error: {args.output_dir} holds an earlier run ({', '.join(earlier)}); --resume continues it, "
             "--overwrite deletes it and starts clean")
run = {"settings": settings, "finished_step": None} if not args.resume or not os.path.exists(run_path) else run

# ---- data: every pair validated up front, so a bad line fails (or is skipped) before hours of training
bad = jobs.OnError(args.on_error, quiet=not main)
try:
    pairs, where, keys = jobs.load_pairs(args.data, roots, bad)
except (jobs.DataError, OSError) as e:
    sys.exit(f"error: {e}")
processor = common.load_processor(args.model)
image_extra = common.image_token_count(processor) - 1  # the image placeholder becomes this many more tokens


def measure(i):
    """(prompt tokens with the image, [tokens of each response + EOS], error) of pair i; the real run
    decodes the image too, so a file corrupt past its header fails here and not hours in."""
    pair = pairs[i]
    try:
        if not args.dry_run:
            jobs.load_image(jobs.image_root(roots, pair.get("source")), pair["image"])
        prompt_text = common.chat_prompt(processor, pair["prompt"], fmt)
        n_prompt = len(processor.tokenizer(prompt_text).input_ids) + image_extra
        if n_prompt >= args.max_length:
            raise jobs.DataError(f"prompt with image takes {n_prompt} tokens, --max_length is {args.max_length}")
        return n_prompt, [len(common.response_ids(processor.tokenizer, prompt_text, pair[r])) for r in responses], None
    except jobs.DataError as e:
        return 0, [], str(e)


# each rank measures its share, all ranks see every result (and so drop the same pairs)
measured = {i: measure(i) for i in tqdm(range(rank, len(pairs), world), desc="check pairs", disable=not main)}
if world > 1:
    shares = [None] * world
    dist.all_gather_object(shares, measured)
    measured = {i: m for share in shares for i, m in share.items()}
try:
    for i in sorted(i for i, m in measured.items() if m[2]):
        bad(where[i], "unusable pair", measured[i][2])
except jobs.DataError as e:
    sys.exit(f"error: {e}")
good = [i for i in range(len(pairs)) if not measured[i][2]]
pairs, where, keys = [pairs[i] for i in good], [where[i] for i in good], [keys[i] for i in good]
lengths = [measured[i][:2] for i in good]  # (prompt tokens, response tokens), as pairs now
n_cut = sum(n_prompt + n > args.max_length for n_prompt, ns in lengths for n in ns)
if main and args.on_error == "skip":
    print(bad.summary("pairs"))
steps_per_epoch = len(pairs) // per_step
if steps_per_epoch == 0:
    sys.exit(f"error: {len(pairs)} pairs is less than one step ({per_step} = batch_size x processes x grad_accum)")
total_steps = args.max_steps if args.max_steps > 0 else args.epochs * steps_per_epoch
if args.dry_run:
    if main:
        print(f"dry run: {len(pairs)} pairs in {len(args.data)} files ({bad.summary('pairs')}); every image root and "
              f"header found; {steps_per_epoch} steps per epoch of {per_step} pairs, {total_steps} steps in all")
        jobs.print_lengths("prompt tokens (image included)", [n for n, _ in lengths], args.max_length, "over --max_length")
        for k, r in enumerate(responses):
            jobs.print_lengths(f"{r} tokens (+EOS)", [ns[k] for _, ns in lengths])
        jobs.print_lengths("packed sequence tokens", jobs.packed_lengths(lengths, args.max_length))
        print(f"  responses cut at --max_length {args.max_length}: {n_cut}")
        print(jobs.train_memory_estimate(args, lengths, responses))
        print("nothing trained or written (--dry_run)")
    sys.exit(0)
if args.resume and run["finished_step"] is not None and run["finished_step"] >= total_steps:
    if main:
        print(f"nothing to do: the run in {args.output_dir} finished at step {run['finished_step']} of {total_steps} "
              f"(a larger --max_steps or --epochs continues it); its adapter is in {args.output_dir}/adapter")
    sys.exit(0)

jobs.barrier()  # every rank has looked at the folder before rank 0 clears it and marks the run as begun
if main:
    if args.overwrite:
        for name in earlier + ["curves.png"]:
            path = os.path.join(args.output_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.path.exists(path) and os.remove(path)
    os.makedirs(args.output_dir, exist_ok=True)
    jobs.write_atomic(run_path, json.dumps(run, indent=1))

# ---- model: LoRA on the language model's linear layers; vision tower and projector stay frozen
model, processor = common.load_model(args.model, device=device, load_in_4bit=args.load_in_4bit)
model.requires_grad_(False)  # QLoRA too: peft's prepare_model_for_kbit_training would upcast the rest to fp32
if args.gradient_checkpointing:  # non-reentrant: the frozen inputs need no grad
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
torch.manual_seed(args.seed)  # LoRA's A init: the same on every rank and in every run
model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                         target_modules=LORA_TARGETS))
model.train()
# the dtype activations run in (bf16 autocast on CUDA), for the additive attention mask
dtype = torch.bfloat16 if device.type == "cuda" else model.get_input_embeddings().weight.dtype
ddp = DDP(model) if world > 1 else model
params = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
warmup = math.ceil(args.warmup_ratio * total_steps)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, warmup, total_steps))

# ---- resume: adapter weights + one plain dict of optimizer/scheduler/step
step = 0
metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
ckpts = checkpoints(args.output_dir)
if args.resume and ckpts:
    try:  # safetensors and weights_only: a checkpoint file never runs code
        set_peft_model_state_dict(model, load_file(os.path.join(ckpts[-1], "adapter", "adapter_model.safetensors")))
        state = torch.load(os.path.join(ckpts[-1], "state.pt"), weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError) as e:
        sys.exit(f"error: {ckpts[-1]}: not a checkpoint 03 wrote ({str(e).splitlines()[0]}); move it away to resume "
                 "from the one before")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    step = state["step"]
    if main:
        print(f"resumed from {ckpts[-1]} at step {step}")
if main:
    keep_metrics_upto(metrics_path, step)  # drop log lines past the checkpoint we resumed


def save_checkpoint(step):
    """checkpoint-N written in a temp dir and renamed, so a kill never leaves a half checkpoint."""
    final = os.path.join(args.output_dir, f"checkpoint-{step}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(os.path.join(tmp, "adapter"))
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "args": vars(args)}, os.path.join(tmp, "state.pt"))
    shutil.rmtree(final, ignore_errors=True)  # the same step saved before (a continued run)
    os.replace(tmp, final)
    done = checkpoints(args.output_dir)
    for old in done[:max(0, len(done) - args.keep_checkpoints)]:
        shutil.rmtree(old)


def pack(indices, fields):
    """These pairs as one packed micro-batch of CPU tensors (common.pack_responses): per pair one
    sequence [image + prompt, chosen, rejected], so the shared prefix runs once; logits only where a
    response token is scored. Runs in the DataLoader's workers (decoding, processor, packing)."""
    pixels, packs = [], []
    for i in indices:
        pair = pairs[i]
        image = jobs.load_image(jobs.image_root(roots, pair.get("source")), pair["image"])  # checked up front
        pv, seqs, _ = common.build_sequences(processor, image, pair["prompt"], [pair[r] for r in fields],
                                             args.max_length, fmt)
        pixels.append(pv)
        packs.append(common.pack_responses(seqs))
    input_ids, position_ids, mask, keep, scored = common.packed_batch(packs, processor.tokenizer.pad_token_id, dtype)
    return dict(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, logits_to_keep=keep,
                pixel_values=torch.cat(pixels), scored=scored, indices=indices,
                n_tokens=torch.bincount(scored[2], minlength=len(fields) * len(indices)))


class MicroBatches(torch.utils.data.Dataset):
    """Item k: the packed micro-batch of the k-th list of pair indices (and, for the conditional term,
    the same pairs' chosen answers alone, to be given the weakened image)."""

    def __init__(self, chunks, fields, weak):
        self.chunks, self.fields, self.weak = chunks, fields, weak

    def __len__(self):
        return len(self.chunks)

    def __getitem__(self, k):
        return {"main": pack(self.chunks[k], self.fields),
                "weak": pack(self.chunks[k], ("chosen",)) if self.weak else None}


def micro_batches(chunks, fields):
    """The packed micro-batches of these lists of pair indices, in order, prepared by --num_workers
    processes ahead of the step that needs them (pinned memory, non-blocking copies on CUDA)."""
    loader = torch.utils.data.DataLoader(
        MicroBatches(chunks, fields, bool(args.conditional_weight)), batch_size=None, num_workers=args.num_workers,
        pin_memory=device.type == "cuda", prefetch_factor=4 if args.num_workers else None,
        generator=torch.Generator())  # its own: drawing its seed from the global RNG would shift LoRA dropout
    for item in loader:
        yield {k: to_device(v) if v else None for k, v in item.items()}


def to_device(cpu):
    """(model inputs on the device, scored positions, response tokens per output slot, pair indices)."""
    batch = {k: cpu[k].to(device, non_blocking=True) for k in
             ("input_ids", "position_ids", "attention_mask", "logits_to_keep", "pixel_values")}
    return batch, cpu["scored"], cpu["n_tokens"].to(device, non_blocking=True), cpu["indices"]


def batch_logps(net, batch, scored, n_out, embeds=None):
    """Summed response log-probs [first responses..., second responses...]; `embeds` (the images'
    features in place) are computed once and shared by the policy and the reference forward."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        if embeds is None:
            embeds = common.image_embeds(model, batch["input_ids"], batch["pixel_values"])
        logits = net(inputs_embeds=embeds, attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
                     logits_to_keep=batch["logits_to_keep"], use_cache=False).logits  # no KV cache: 2-3 GB at 7B
    return common.packed_logps(logits, scored, n_out), embeds


def weakening(i):
    """(noise step, where, seed) of pair i's weakened image for the conditional term: 01's settings
    from the pair's meta unless given; the seed from the pair and the step, so that policy,
    reference and a resumed run see the same weakened image."""
    meta = pairs[i].get("meta") if isinstance(pairs[i].get("meta"), dict) else {}
    step = args.noise_step if args.noise_step >= 0 else int(meta.get("noise_step", 500))
    where = args.noise_on or meta.get("noise_on", "features")
    return step, where, int(hashlib.sha256(f"{keys[i]}\t{step}\t{where}".encode()).hexdigest()[:15], 16)


def chosen_given_weakened(net, weak):
    """The conditional term's second input: summed log-probs of the chosen answers given the weakened
    image (a forward of its own: the prefix differs, so it cannot share the packed sequence), and
    that forward's inputs, for the reference."""
    batch, scored, n_tokens, indices = weak
    embeds = common.image_embeds(model, batch["input_ids"], batch["pixel_values"], [weakening(i) for i in indices])
    return batch_logps(net, batch, scored, len(indices), embeds)[0], (batch, scored, embeds), n_tokens


# ---- reference log-probs, once: the adapter-disabled model is the reference and never changes
REF_FIELDS = responses + (("chosen_weak",) if args.conditional_weight else ())


def score_reference(path):
    """{pair key: {field: log-prob}} under the reference (chosen, rejected and, for the conditional
    term, chosen_weak): each rank scores its share, every rank gets all of them (all_gather_object),
    rank 0 writes them to `path` once. --resume reads them back; each record carries the hash of what
    the scores depend on, so a stale file is never read."""
    depends = [settings[k] for k in ("model", "data", "max_length", "chat_format", "pad_square")]
    if args.conditional_weight:
        depends.append([args.noise_step, args.noise_on])
    key = hashlib.sha256(json.dumps(depends).encode()).hexdigest()[:16]
    if args.resume and os.path.exists(path):
        cached = {r["id"]: r for r in jobs.read_jsonl(path) if r.get("key") == key and set(REF_FIELDS) <= r.keys()}
        if cached.keys() >= set(keys):
            if main:
                print(f"reference log-probs: 0 pairs scored ({len(keys)} read from {path})")
            return cached
    t0, scored = time.time(), {}
    mine = list(range(rank, len(pairs), world))
    chunks = [mine[s:s + B] for s in range(0, len(mine), B)]
    with torch.no_grad(), model.disable_adapter():
        for item in tqdm(micro_batches(chunks, responses), total=len(chunks), desc="reference log-probs",
                         disable=not main):
            batch, positions, _, indices = item["main"]
            ref = batch_logps(model, batch, positions, len(responses) * len(indices))[0].view(len(responses), -1)
            if args.conditional_weight:
                ref = torch.cat([ref, chosen_given_weakened(model, item["weak"])[0][None]])
            for k, i in enumerate(indices):
                scored[keys[i]] = {"id": keys[i], **dict(zip(REF_FIELDS, ref[:, k].tolist())), "key": key}
    if world > 1:
        shares = [None] * world
        dist.all_gather_object(shares, scored)
        scored = {k: v for share in shares for k, v in share.items()}
    if main:
        jobs.write_atomic(path, "".join(json.dumps(r) + "\n" for r in scored.values()))
        print(f"reference log-probs: {len(scored)} pairs scored in {time.time() - t0:.1f}s (cached in {path})")
    return scored


ref_cache = None
if args.loss != "sft" and args.precompute_ref:
    ref_cache = score_reference(os.path.join(args.output_dir, "ref_logps.jsonl"))


def reference_logps(indices, fields, batch, scored, embeds):
    """Reference log-probs [fields[0] of each pair..., fields[1] of each pair...]: from the cache, or
    a forward with the adapter disabled on the same inputs (--no-precompute_ref, TRL's way)."""
    if ref_cache is not None:
        return torch.tensor([ref_cache[keys[i]][f] for f in fields for i in indices], device=device)
    with torch.no_grad(), model.disable_adapter():
        return batch_logps(model, batch, scored, len(fields) * len(indices), embeds)[0]


def batch_loss(item):
    """(loss, metrics) of one micro-batch, as the DPO reference implementation's get_batch_metrics:
    metrics are detached 0-d tensors, so nothing waits for the device until a log step. `loss` is the
    whole objective; each added term is also logged on its own (loss/sft, loss/anchor, loss/conditional)."""
    terms = {}
    batch, scored, n_tokens, indices = item["main"]
    if args.conditional_weight:  # first, through the plain model: DDP's forward comes last, once a micro-step
        weak, weak_inputs, weak_tokens = chosen_given_weakened(model, item["weak"])
        weak_ref = reference_logps(indices, ("chosen_weak",), *weak_inputs)
    logps, embeds = batch_logps(ddp, batch, scored, len(responses) * B)
    chosen = logps[:B]
    if args.loss == "sft":  # LLaVA's fine-tuning: the mean NLL over the micro-batch's answer tokens
        loss = -chosen.sum() / n_tokens[:B].sum()
        return loss, {"loss": loss.detach(), "logps/chosen": chosen.detach().mean()}
    ref = reference_logps(indices, responses, batch, scored, embeds)
    per = n_tokens.float() if args.length_normalize else torch.ones_like(logps)  # log-ratio per token or summed
    policy, reference = logps / per, ref / per
    objective = common.ipo_loss if args.loss == "ipo" else common.dpo_loss
    losses, r_chosen, r_rejected = objective(policy[:B], policy[B:], reference[:B], reference[B:], args.beta)
    if args.sft_weight:
        terms["sft"] = (args.sft_weight, -chosen / n_tokens[:B])  # per-token NLL of each chosen answer
    if args.anchor_weight:
        terms["anchor"] = (args.anchor_weight, common.anchor_loss(policy[:B], reference[:B], args.beta))
    if args.conditional_weight:
        per_weak = weak_tokens.float() if args.length_normalize else 1.0
        terms["conditional"] = (args.conditional_weight, common.conditional_loss(
            policy[:B], weak / per_weak, reference[:B], weak_ref / per_weak, args.beta))
    metrics = {}
    for name, (weight, term) in terms.items():
        losses = losses + weight * term
        metrics[f"loss/{name}"] = term.detach().mean()
    loss = losses.mean()
    return loss, {"loss": loss.detach(), **metrics, "rewards/chosen": r_chosen.mean(),
                  "rewards/rejected": r_rejected.mean(), "rewards/accuracies": (r_chosen > r_rejected).float().mean(),
                  "rewards/margins": (r_chosen - r_rejected).mean(),
                  "logps/chosen": chosen.detach().mean(), "logps/rejected": logps[B:].detach().mean()}


@functools.lru_cache(maxsize=1)
def epoch_steps(epoch):
    """The epoch's pairs, shuffled with a seed (the same on every rank and on resume), as a list of
    steps of per_step pair indices. --group_by_length sorts each window of 50 steps by length and then
    shuffles the steps, so a step's pairs have similar lengths and little of the batch is padding."""
    gen = torch.Generator().manual_seed(args.seed + epoch)
    order = torch.randperm(len(pairs), generator=gen).tolist()
    if args.group_by_length:
        window = 50 * per_step
        order = [i for s in range(0, len(order), window)
                 for i in sorted(order[s:s + window], key=lambda i: len(pairs[i]["chosen"]) + len(pairs[i]["rejected"]))]
    steps = [order[s:s + per_step] for s in range(0, steps_per_epoch * per_step, per_step)]
    if args.group_by_length:
        steps = [steps[k] for k in torch.randperm(len(steps), generator=gen).tolist()]
    return steps


def log_row(window, n_steps, seconds, lr, grad_norm):
    """The metrics row of a log step: the window's metrics averaged over its steps and over all ranks
    (one all-reduce, one copy to the host)."""
    names = sorted(window)
    values = torch.stack([window[k] for k in names]).double() / (n_steps * args.grad_accum)
    if world > 1:
        dist.all_reduce(values)
        values /= world
    row = {"step": step, "epoch": round(step / steps_per_epoch, 4), "lr": lr, "grad_norm": grad_norm.item(),
           **dict(zip(names, values.tolist())), "samples_per_s": per_step * n_steps / seconds}
    if device.type == "cuda":
        row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


# ---- the loop: lr, accumulate, clip, step, log, save
bar = tqdm(total=total_steps, initial=step, desc=f"{args.loss} steps", disable=not main)
# this rank's micro-batches from here to the end, in order: step s, micro-step m takes its slice of s's pairs
chunks = [epoch_steps(s // steps_per_epoch)[s % steps_per_epoch][(m * world + rank) * B:(m * world + rank + 1) * B]
          for s in range(step, total_steps) for m in range(args.grad_accum)]
batches = micro_batches(chunks, responses)
window, n_window, t_window = {}, 0, time.time()  # metrics summed on the device since the last log step
while step < total_steps:
    torch.manual_seed(args.seed * 1_000_003 + step * world + rank)  # LoRA dropout: same draws on resume
    for micro in range(args.grad_accum):
        last = micro == args.grad_accum - 1
        with ddp.no_sync() if world > 1 and not last else contextlib.nullcontext():  # all-reduce once per step
            loss, metrics = batch_loss(next(batches))
            (loss / args.grad_accum).backward()
        window = {k: window.get(k, 0) + v for k, v in metrics.items()}
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
    # gradients are all-reduced, so every rank sees the same norm and all stop together; one host sync a step
    if not torch.isfinite(grad_norm):
        done = checkpoints(args.output_dir)
        sys.exit(f"error: non-finite loss or gradient at step {step + 1} (loss {loss.item():.4g}, grad norm "
                 f"{grad_norm.item():.4g}); not applied, nothing saved. Last good checkpoint: "
                 f"{done[-1] if done else 'none'} (--resume continues from it). Lower --lr, or check this step's pairs")
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    step += 1
    n_window += 1
    bar.update(1)

    if step % args.log_every == 0 or step == total_steps:
        row = log_row(window, n_window, time.time() - t_window, lr, grad_norm)
        window, n_window, t_window = {}, 0, time.time()
        if main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in row.items() if k in ("loss", "rewards/accuracies")})
    if main and args.save_every > 0 and step % args.save_every == 0 and step < total_steps:
        save_checkpoint(step)
        plot_curves(metrics_path, os.path.join(args.output_dir, "curves.png"))
bar.close()

# ---- write: the adapter, the last checkpoint, the curves, the run marked finished, a summary
if main:
    save_checkpoint(step)
    model.save_pretrained(os.path.join(args.output_dir, "adapter"))
    plot_curves(metrics_path, os.path.join(args.output_dir, "curves.png"))
    jobs.write_atomic(run_path, json.dumps({**run, "finished_step": step}, indent=1))
    last = jobs.read_jsonl(metrics_path)[-1] if os.path.exists(metrics_path) else {}
    print(f"done: {step} steps; adapter in {args.output_dir}/adapter, log in {metrics_path}, "
          f"curves in {args.output_dir}/curves.png; {n_cut} responses cut at --max_length {args.max_length}")
    print("final " + "  ".join(f"{k}={v:.4g}" for k, v in last.items() if "/" in k or k == "loss"))
jobs.dist_cleanup()
