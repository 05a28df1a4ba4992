"""03's run, around its loop: the run directory (what a fresh run, --resume and --overwrite may find
there), the pairs checked and measured before any training, the dry run's report and memory estimate,
the order of the pairs and their packed micro-batches, the reference log-prob cache, checkpoints, and
what the run writes as it goes (metrics.jsonl, curves.png)."""
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
from typing import NamedTuple

import torch
import torch.distributed as dist
from peft import set_peft_model_state_dict
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor, distribute_tensor
from tqdm import tqdm

import common
from data import pair_image, print_lengths
from dist_io import DataError, agree, read_jsonl, write_atomic
from families import family_of

RUN_FILES = ("run.json", "metrics.jsonl", "adapter", "ref_logps.jsonl")  # with checkpoint-N/: a run's outputs

# ----------------------------------------------------------------------------- the run directory


# the flags that change what a step computes (03's names): a resume with any of them changed would be another run.
# Not among them: the horizon (--epochs, --max_steps: plan_schedule keeps the LR continuous), and what changes only
# the rounding or the speed (--attention, --padding_free, --gradient_checkpointing, --batch_size x --grad_accum at
# the same pairs per step, --num_workers, --fsdp: its checkpoints are whole, in the same format)
STEP_FLAGS = ("loss", "beta", "lr", "warmup_ratio", "weight_decay", "max_grad_norm", "lora_r", "lora_alpha",
              "lora_dropout", "seed", "max_length", "group_by_length", "length_normalize", "sft_weight",
              "conditional_weight", "anchor_weight", "noise_step", "noise_on", "load_in_4bit", "data_format", "on_error")
PER_STEP = "pairs per step (--batch_size x processes x --grad_accum)"


def run_settings(args, per_step, fmt, roots, dtype):
    """What a step computes, by flag: if any of these differs, a resumed run would not continue the same run. The
    pairs by their content (a file edited in place at the same size is another run), the model by model_identity."""
    return {"--model": model_identity(args.model), "--data": [[os.path.abspath(d), file_digest(d)] for d in args.data],
            "--image_root": {k or "": os.path.abspath(v) for k, v in roots.items()}, PER_STEP: per_step,
            "dtype": str(dtype).removeprefix("torch."), "--chat_format": fmt.chat_format, "--pad_square": fmt.pad_square,
            **{f"--{k}": getattr(args, k) for k in STEP_FLAGS}}


def file_digest(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:16]


def model_identity(name):
    """A model by what its weights are: a local folder by its config's content and each weight file's size and
    modification time (hashing 14 GB would take minutes); a hub id by its name (and its revision once downloaded: the
    cache's snapshot folder)."""
    config = os.path.join(name, "config.json")
    if not os.path.isfile(config):
        return name
    files = sorted(n for n in os.listdir(name) if n.endswith((".safetensors", ".bin")))
    stats = [(n, os.stat(os.path.join(name, n)).st_size, os.stat(os.path.join(name, n)).st_mtime_ns) for n in files]
    return [os.path.abspath(name), file_digest(config), stats]


def open_run(output_dir, settings, resume, overwrite, dry_run):
    """(the run's record {"settings", "finished_step", "schedule"}, the earlier outputs in output_dir). A fresh run
    never mixes with an earlier one (--overwrite deletes it, else a one-line error); --resume continues only a run 03
    wrote with the same settings, else a one-line error naming each changed flag."""
    run_path = os.path.join(output_dir, "run.json")
    earlier = sorted(n for n in os.listdir(output_dir) if n in RUN_FILES or n.startswith("checkpoint-")) \
        if os.path.isdir(output_dir) else []
    if resume and os.path.exists(run_path):
        with open(run_path) as f:
            run = json.load(f)
        changed = [f"{k} ({json.dumps(run['settings'].get(k))} -> {json.dumps(v)})" for k, v in settings.items()
                   if run["settings"].get(k) != json.loads(json.dumps(v))]
        if changed:
            sys.exit(f"error: --resume of {output_dir} with {', '.join(changed)} changed: that would be another run. "
                     "Resume with the run's settings, or start another run (--overwrite, or another --output_dir)")
        return run, earlier
    if resume and earlier:
        sys.exit(f"error: {output_dir} holds no run.json ({', '.join(earlier)}): not a run 03 can resume")
    if earlier and not dry_run and not overwrite:
        sys.exit(f"error: {output_dir} holds an earlier run ({', '.join(earlier)}); --resume continues it, "
                 "--overwrite deletes it and starts clean")
    return {"settings": settings, "finished_step": None, "schedule": []}, earlier


# ----------------------------------------------------------------------------- the learning rate


def lr_multiplier(step, schedule):
    """The learning rate at optimizer step `step` (from 0) over the peak --lr, from the run's schedule (plan_schedule):
    the first segment linear warmup to 1 over its `warmup` steps, then a cosine to 0 at its `end`; a later segment
    (a resume to another horizon) a cosine from its `start` multiplier at its first step to 0 at its `end`."""
    seg = [s for s in schedule if s["first"] <= step][-1]
    if "warmup" in seg:
        if step < seg["warmup"]:
            return (step + 1) / seg["warmup"]
        return 0.5 * (1 + math.cos(math.pi * (step - seg["warmup"]) / max(1, seg["end"] - seg["warmup"])))
    return seg["start"] * 0.5 * (1 + math.cos(math.pi * (step - seg["first"]) / max(1, seg["end"] - seg["first"])))


def plan_schedule(schedule, step, total_steps, warmup_ratio):
    """The run's schedule (lr_multiplier's segments) for training from optimizer step `step` to `total_steps`: a new
    run's warmup (ceil(warmup_ratio x total_steps) steps) and cosine; a resume to the same horizon, the schedule as it
    was; a resume to another horizon (a changed --max_steps or --epochs), the rest re-planned as a cosine from the
    multiplier at `step` to 0 at the new end: the LR is continuous at the resume point and never rises. A finished run
    decayed to 0 is refused: continuing it would train at lr 0. From step 0 (nothing to resume), a new run's."""
    if step == 0:
        return [{"first": 0, "end": total_steps, "warmup": math.ceil(warmup_ratio * total_steps)}]
    schedule = [s for s in schedule if s["first"] <= step]
    if schedule[-1]["end"] == total_steps:
        return schedule
    start = lr_multiplier(step, schedule) if step < schedule[-1]["end"] else 0.0
    if start <= 0:
        sys.exit(f"error: the run ended its schedule at step {schedule[-1]['end']} with the learning rate decayed to 0; "
                 f"continuing it to step {total_steps} would train at lr 0. Start another run (another --output_dir)")
    return schedule + [{"first": step, "end": total_steps, "start": start}]


def begin_run(output_dir, run, earlier, overwrite):
    """Rank 0, once every rank has looked at the folder: the earlier run deleted (--overwrite), run.json written."""
    if overwrite:
        for name in earlier + ["curves.png"]:
            path = os.path.join(output_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.path.exists(path) and os.remove(path)
    os.makedirs(output_dir, exist_ok=True)
    write_run(output_dir, run)


def check_shared_output_dir(output_dir, rank, world):
    """Under torchrun, every rank must see rank 0's output_dir (it resumes from rank 0's checkpoints): rank 0
    writes a token there and every rank reads it back; a rank that cannot (another node, another disk) stops
    the run on every rank before anything else is written."""
    if world == 1:
        return
    path = os.path.join(output_dir, ".shared-check")
    token = [f"{os.getpid()}-{time.time()}" if rank == 0 else None]
    if rank == 0:
        os.makedirs(output_dir, exist_ok=True)
        write_atomic(path, token[0])
    dist.broadcast_object_list(token, src=0)
    dist.barrier()
    seen = open(path).read() if os.path.exists(path) else None
    agree(seen == token[0], f"--output_dir {output_dir} is not the folder rank 0 wrote: put it on a filesystem "
                            "that every node shares (03 resumes from rank 0's checkpoints)")
    dist.barrier()
    if rank == 0:
        os.remove(path)


def write_run(output_dir, run):
    write_atomic(os.path.join(output_dir, "run.json"), json.dumps(run, indent=1))


@contextlib.contextmanager
def explain_out_of_memory():
    """Out of memory anywhere (loading, reference pass, training step): a one-line error saying what to lower."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        sys.exit(f"error: out of memory ({str(e).splitlines()[0]}). Lower --batch_size (keep the effective batch "
                 f"with --grad_accum) or --max_length, or add --gradient_checkpointing / --load_in_4bit")


# ----------------------------------------------------------------------------- pairs, measured up front


class Pairs(NamedTuple):
    records: list  # the pairs (data.load_pairs)
    where: list  # "file:line" of each, for messages
    keys: list  # "abs file\tid": unique over files, the key of the reference cache
    lengths: list  # (prompt tokens with the image, [tokens of each response + EOS])


def measure_pairs(pairs, roots, bad, processor, fmt, responses, max_length, decode, rank, world, is_main):
    """The pairs whose image decodes (decode: the real run decodes every image, so a file corrupt past its
    header fails here and not hours in) and whose prompt fits max_length, with their token lengths. Each
    rank measures its share and every rank sees every result (all_gather_object), so all drop the same
    pairs; a bad one goes to `bad` (OnError) with its file:line."""
    records, where, keys = pairs
    fixed = family_of(processor).fixed_image_tokens  # every image the same number of tokens (LLaVA-1.5), or its size's

    def measure(pair):
        try:
            image = pair_image(pair, roots) if decode or not fixed else None
            prompt_text = common.chat_prompt(processor, pair["prompt"], fmt, history=pair.get("history", ()))
            n_prompt = common.prompt_length(processor, prompt_text, image, fmt)
            if n_prompt >= max_length:
                raise DataError(f"prompt with image takes {n_prompt} tokens, --max_length is {max_length}")
            eos = family_of(processor).eos_token_id(processor.tokenizer)
            return n_prompt, [len(common.response_ids(processor.tokenizer, prompt_text, pair[r], eos))
                              for r in responses], None
        except DataError as e:
            return 0, [], str(e)

    measured = {i: measure(records[i]) for i in tqdm(range(rank, len(records), world), desc="check pairs",
                                                     disable=not is_main)}
    if world > 1:
        shares = [None] * world
        dist.all_gather_object(shares, measured)
        measured = {i: m for share in shares for i, m in share.items()}
    try:
        for i in sorted(i for i, m in measured.items() if m[2]):
            bad(where[i], "unusable pair", measured[i][2])
    except DataError as e:
        sys.exit(f"error: {e}")
    good = [i for i in range(len(records)) if not measured[i][2]]
    return Pairs([records[i] for i in good], [where[i] for i in good], [keys[i] for i in good],
                 [measured[i][:2] for i in good])


def responses_cut(lengths, max_length):
    """How many responses max_length cuts (03 cuts a response at the end, never the image or prompt)."""
    return sum(n_prompt + n > max_length for n_prompt, ns in lengths for n in ns)


def print_dry_run(args, pairs, bad, responses, steps_per_epoch, total_steps, per_step, world):
    print(f"dry run: {len(pairs.records)} pairs in {len(args.data)} files ({bad.summary('pairs')}); every image root "
          f"and header found; {steps_per_epoch} steps per epoch of {per_step} pairs, {total_steps} steps in all")
    print_lengths("prompt tokens (image included)", [n for n, _ in pairs.lengths], args.max_length, "over --max_length")
    for k, r in enumerate(responses):
        print_lengths(f"{r} tokens (+EOS)", [ns[k] for _, ns in pairs.lengths])
    print_lengths("packed sequence tokens", packed_lengths(pairs.lengths, args.max_length))
    print(f"  responses cut at --max_length {args.max_length}: {responses_cut(pairs.lengths, args.max_length)}")
    print(train_memory_estimate(args, pairs.lengths, world))
    print("nothing trained or written (--dry_run)")


def packed_lengths(lengths, max_length):
    """Tokens of each pair's packed sequence [image + prompt, responses...] from (prompt tokens,
    [response tokens]), responses cut at max_length as 03 cuts them."""
    return [n + sum(min(r, max_length - n) for r in rs) for n, rs in lengths]


FSDP_WORLDS = (2, 4, 8, 16, 32)  # the dry run's per-GPU figures under --fsdp, whatever world it runs in


@functools.cache
def parameter_counts(model_name, lora_r):
    """What memory_estimate counts of a model, from its config (built on the meta device: nothing loaded): parameters
    in all, in the language model's Linear layers, in LoRA at rank lora_r on them, on the vision side, in its decoder
    layers and in the largest one; hidden size, layers, vocabulary."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from loading import vision_side
    config = AutoConfig.from_pretrained(model_name)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    text = config.get_text_config()
    linears = [m for n, m in model.named_modules() if "language_model" in n and isinstance(m, torch.nn.Linear)]
    per_layer = [sum(p.numel() for p in layer.parameters()) for layer in model.get_decoder().layers]
    return {"all": sum(p.numel() for p in model.parameters()), "lm_linear": sum(m.weight.numel() for m in linears),
            "lora": sum(lora_r * (m.in_features + m.out_features) for m in linears),
            "vision": sum(p.numel() for p in vision_side(model)), "layers": sum(per_layer),
            "largest_layer": max(per_layer), "hidden": text.hidden_size, "n_layers": text.num_hidden_layers,
            "vocab": text.vocab_size}


def memory_estimate(args, lengths, world=1):
    """(the parts of 03's peak GPU memory per process in bytes, the p99 packed length T), estimated from the model's
    config (parameter_counts) for a micro-batch of --batch_size pairs of length T:
    - weights: bf16 (NF4 language-model linears with --load_in_4bit). With --fsdp over `world` processes, 1/world of
      the language model, plus what FSDP holds gathered: the root's (embeddings, final norm, LM head) through the
      step and two decoder layers (one computing, the next prefetched); the vision side whole;
    - lora: LoRA in fp32 with its gradient and AdamW's two moments, 16 bytes a parameter (--fsdp: 1/world of them,
      plus the whole fp32 gradient that --grad_accum > 1 keeps unsharded between micro-steps);
    - activations: ~52 h per token and layer (Megatron's 34 h of a bf16 LLaMA layer + the LoRA inputs) or,
      checkpointed, 2 h per layer + one whole layer;
    - mask: the 4D mask (--no-padding_free); logits: fp32 at the scored positions.
    A rough figure (+-30%): measure with bench/gpu_check.py."""
    count = parameter_counts(args.model, args.lora_r)
    if args.fsdp:
        gathered = count["all"] - count["vision"] - count["layers"] + 2 * count["largest_layer"]
        weights = 2 * (count["vision"] + (count["all"] - count["vision"]) / world + gathered)
        lora = 16 * count["lora"] / world + (4 * count["lora"] if args.grad_accum > 1 else 0)
    else:
        weights = (count["all"] - count["lm_linear"]) * 2 + count["lm_linear"] * (0.5 if args.load_in_4bit else 2)
        lora = 16 * count["lora"]
    h, layers = count["hidden"], count["n_layers"]
    packed = sorted(packed_lengths(lengths, args.max_length))
    T = packed[int(0.99 * (len(packed) - 1))]
    tokens = args.batch_size * T
    acts = tokens * (layers * 2 * h + 52 * h) if args.gradient_checkpointing else tokens * layers * 52 * h
    mask = 0 if args.padding_free else args.batch_size * T * T * 2  # a BlockMask is a few kB
    scored = sorted(sum(min(r, args.max_length - n) for r in rs) for n, rs in lengths)
    logits = args.batch_size * scored[int(0.99 * (len(scored) - 1))] * count["vocab"] * 4 * 3
    return {"weights": weights, "lora": lora, "activations": acts, "mask": mask, "logits": logits}, T


def gib(x):
    return f"{x / 2**30:.1f} GiB"


def train_memory_estimate(args, lengths, world=1):
    """03 --dry_run's lines: memory_estimate's peak per GPU and its parts in this job's world; with --fsdp also the
    peak per GPU at FSDP_WORLDS processes (the dry run may run in another world than the training)."""
    parts, T = memory_estimate(args, lengths, world)
    text = (f"  estimated peak memory per GPU: {gib(sum(parts.values()))} (weights {gib(parts['weights'])}, "
            f"LoRA + AdamW {gib(parts['lora'])}, activations {gib(parts['activations'])}, mask {gib(parts['mask'])}, "
            f"logits {gib(parts['logits'])}) for {args.batch_size} pairs of the p99 packed length {T}"
            + ("" if args.gradient_checkpointing else "; --gradient_checkpointing lowers the activations ~20x"))
    if args.fsdp:
        text += (f"\n  --fsdp over {world} process{'es' if world > 1 else ''}: the language model and its LoRA state "
                 "sharded, its root and 2 layers gathered at a time, the vision side whole; at "
                 + " / ".join(map(str, FSDP_WORLDS)) + " processes: "
                 + " / ".join(gib(sum(memory_estimate(args, lengths, w)[0].values())) for w in FSDP_WORLDS)
                 + " per GPU")
    return text


# ----------------------------------------------------------------------------- the order of the pairs, micro-batches


def epoch_steps(n_pairs, epoch, seed, per_step, steps_per_epoch, sort_key=None):
    """The epoch's pairs, shuffled with a seed (the same on every rank and on resume), as a list of steps
    of per_step pair indices. With sort_key (--group_by_length: a length per pair) each window of 50 steps
    is sorted by it and then the steps are shuffled, so a step's pairs have similar lengths and little of
    the batch is padding."""
    gen = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(n_pairs, generator=gen).tolist()
    if sort_key is not None:
        window = 50 * per_step
        order = [i for s in range(0, len(order), window) for i in sorted(order[s:s + window], key=lambda i: sort_key[i])]
    steps = [order[s:s + per_step] for s in range(0, steps_per_epoch * per_step, per_step)]
    if sort_key is not None:
        steps = [steps[k] for k in torch.randperm(len(steps), generator=gen).tolist()]
    return steps


class MicroBatch(NamedTuple):
    inputs: dict  # the model's inputs (common.pack_pairs), on the device
    scored: tuple  # (index into the kept logits, token, output slot) per scored token
    n_tokens: torch.Tensor  # scored tokens (+EOS) per output slot, on the device
    indices: list  # the pairs, as indices into Pairs.records
    n_real: int  # the packs' own tokens; input_ids.numel() - n_real is padding


class PairBatches(torch.utils.data.Dataset):
    """Item k: the packed micro-batch of the k-th list of pair indices, its responses `fields`, and with
    `weak` also the same pairs' chosen answers alone (the conditional term gives them the weakened image).
    Runs in the DataLoader's workers: decoding, the processor, packing."""

    def __init__(self, records, roots, processor, max_length, fmt, chunks, fields, weak, row_block=None):
        self.records, self.roots, self.processor, self.max_length = records, roots, processor, max_length
        self.fmt, self.chunks, self.fields, self.weak = fmt, chunks, fields, weak
        self.row_block = row_block  # None: right-padded rows; else one padding-free row in blocks of this many

    def __len__(self):
        return len(self.chunks)

    def pack(self, indices, fields):
        examples = [(pair_image(p, self.roots), p["prompt"], [p[f] for f in fields], p.get("history", ()))
                    for p in (self.records[i] for i in indices)]  # images checked up front
        return {**common.pack_pairs(self.processor, examples, self.max_length, self.fmt, self.row_block is not None,
                                    self.row_block or 1),
                "indices": indices}

    def __getitem__(self, k):
        return {"main": self.pack(self.chunks[k], self.fields),
                "weak": self.pack(self.chunks[k], ("chosen",)) if self.weak else None}


def micro_batches(dataset, num_workers, device):
    """The dataset's micro-batches in order, as {"main": MicroBatch, "weak": MicroBatch or None}, prepared by
    num_workers processes ahead of the step that needs them (pinned memory, non-blocking copies on CUDA)."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=num_workers, pin_memory=device.type == "cuda",
        prefetch_factor=4 if num_workers else None,
        generator=torch.Generator())  # its own: drawing its seed from the global RNG would shift LoRA dropout

    def to_device(cpu):  # a padding-free row's doc and seg: its attention is built on the device (attention.Kernel)
        inputs = {k: cpu[k].to(device, non_blocking=True) for k in ("input_ids", "position_ids", "attention_mask",
                  "doc", "seg", "logits_to_keep", *family_of(dataset.processor).vision_keys) if k in cpu}
        return MicroBatch(inputs, cpu["scored"], cpu["n_tokens"].to(device, non_blocking=True), cpu["indices"],
                          cpu["n_real"])
    for item in loader:
        yield {k: to_device(v) if v else None for k, v in item.items()}


# ----------------------------------------------------------------------------- the reference, once


REFERENCE_SETTINGS = ("--model", "--data", "--image_root", "dtype", "--chat_format", "--pad_square", "--max_length",
                      "--load_in_4bit", "--data_format")


def reference_depends(settings, conditional):
    """What a reference log-prob depends on, from the run's settings: the model and how it is loaded (4-bit, dtype),
    the pairs' content and images, the input format and max length; with the conditional term, its noise."""
    return {k: settings[k] for k in REFERENCE_SETTINGS + (("--noise_step", "--noise_on") if conditional else ())}


def reference_cache(path, keys, depends, fields, scores, n_batches, resume, rank, world, is_main):
    """{pair key: {"id", field: log-prob, ..., "key"}} under the reference (it never changes, so once
    before training). scores(): this rank's (pair indices, log-probs [len(fields), len(indices)]) per
    micro-batch; every rank gets all of them (all_gather_object), rank 0 writes them to `path` once.
    --resume reads them back; each record carries the hash of what the scores depend on, so a stale
    file is never read."""
    key = hashlib.sha256(json.dumps(depends).encode()).hexdigest()[:16]
    if resume and os.path.exists(path):
        cached = {r["id"]: r for r in read_jsonl(path) if r.get("key") == key and set(fields) <= r.keys()}
        if cached.keys() >= set(keys):
            if is_main:
                print(f"reference log-probs: 0 pairs scored ({len(keys)} read from {path})")
            return cached
    t0, scored = time.time(), {}
    for indices, ref in tqdm(scores(), total=n_batches, desc="reference log-probs", disable=not is_main):
        for k, i in enumerate(indices):
            scored[keys[i]] = {"id": keys[i], **dict(zip(fields, ref[:, k].tolist())), "key": key}
    if world > 1:
        shares = [None] * world
        dist.all_gather_object(shares, scored)
        scored = {k: v for share in shares for k, v in share.items()}
    if is_main:
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in scored.values()))
        print(f"reference log-probs: {len(scored)} pairs scored in {time.time() - t0:.2f}s (cached in {path})")
    return scored


# ----------------------------------------------------------------------------- checkpoints


def checkpoints(output_dir):
    """Complete checkpoints (renamed into place), oldest first."""
    found = glob.glob(os.path.join(output_dir, "checkpoint-*[0-9]"))
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path):
    return int(path.rsplit("-", 1)[1])


def whole(t, keep=True):
    """t unsharded, on the CPU, where `keep` (else None): an FSDP shard (a DTensor) gathered from every rank, a
    collective that every rank must join, keep or not."""
    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.detach().cpu() if keep else None


def save_checkpoint(output_dir, step, model, optimizer, args, keep, is_main):
    """checkpoint-N: the adapter and one plain dict of optimizer state and step (the LR is the run's schedule's at
    the step: run.json), written in a temp dir and renamed, so a kill never leaves a half checkpoint; only the `keep`
    newest stay. Every rank calls it: under --fsdp the adapter and the optimizer state are gathered whole (so a
    checkpoint is the same however the run was sharded, and resumes with or without --fsdp, at any world size) and
    rank 0 writes. Returns the adapter's weights as written (rank 0; None elsewhere), for the final adapter/."""
    adapter = {n: whole(p, is_main) for n, p in model.named_parameters() if p.requires_grad}
    state = optimizer.state_dict()
    state["state"] = {i: {k: whole(v, is_main) if torch.is_tensor(v) else v for k, v in s.items()}
                      for i, s in state["state"].items()}
    if not is_main:
        return None
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(os.path.join(tmp, "adapter"), state_dict=adapter)
    torch.save({"step": step, "optimizer": state, "args": vars(args)}, os.path.join(tmp, "state.pt"))
    shutil.rmtree(final, ignore_errors=True)  # the same step saved before (a continued run)
    os.replace(tmp, final)
    done = checkpoints(output_dir)
    for old in done[:max(0, len(done) - keep)]:
        shutil.rmtree(old)
    return adapter


def load_checkpoint(path, model):
    """Checkpoint `path`'s state ({"step", "optimizer", "args"}), its adapter loaded into `model`, which must not be
    sharded yet (peft loads whole tensors). Safetensors and weights_only: a checkpoint file never runs code; a
    one-line error for a folder 03 did not write."""
    try:
        set_peft_model_state_dict(model, load_file(os.path.join(path, "adapter", "adapter_model.safetensors")))
        return torch.load(os.path.join(path, "state.pt"), weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError) as e:
        sys.exit(f"error: {path}: not a checkpoint 03 wrote ({str(e).splitlines()[0]}); move it away to resume "
                 "from the one before")


def load_optimizer_state(optimizer, state):
    """A checkpoint's optimizer state (whole tensors) into `optimizer`; where its parameters are FSDP shards, each
    state tensor shaped like its parameter is cut as the parameter is (every rank holds the whole: no communication)."""
    optimizer.load_state_dict(state)
    for param, values in optimizer.state.items():
        if isinstance(param, DTensor):
            for k, v in values.items():
                if torch.is_tensor(v) and v.shape == param.shape:
                    values[k] = distribute_tensor(v, param.device_mesh, param.placements, src_data_rank=None)


# ----------------------------------------------------------------------------- metrics.jsonl and curves.png


def keep_metrics_upto(path, step):
    """On resume, drop log lines written after the checkpoint, so no step is logged twice."""
    if os.path.exists(path):
        rows = [r for r in read_jsonl(path, tolerate_partial_last=True) if r["step"] <= step]
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def metrics_row(window, n_steps, grad_accum, world, **row):
    """A log step's row: the window's summed metrics averaged over its steps, micro-steps and all ranks
    (one all-reduce, one copy to the host), after the fields given in `row`."""
    names = sorted(window)
    values = torch.stack([window[k] for k in names]).double() / (n_steps * grad_accum)
    if world > 1:
        dist.all_reduce(values)
        values /= world
    return {**row, **dict(zip(names, values.tolist()))}


class Tracker:
    """--report_to: each metrics row also to TensorBoard (event files under OUTPUT_DIR/tensorboard/) or to Weights &
    Biases (project from WANDB_PROJECT, default "bpo"; WANDB_MODE=offline works without a network), from rank 0;
    "none" does nothing. Either package is imported only when asked for."""

    def __init__(self, kind, output_dir, config):
        self.kind, self.writer = kind, None
        try:
            if kind == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))
            elif kind == "wandb":
                import wandb
                self.writer = wandb.init(project=os.environ.get("WANDB_PROJECT", "bpo"), dir=output_dir,
                                         config=config, name=os.path.basename(os.path.abspath(output_dir)))
        except ImportError as e:
            sys.exit(f"error: --report_to {kind} needs its package ({e.name}): pip install {kind}")

    def log(self, row):
        scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        if self.kind == "tensorboard":
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, row["step"])
            self.writer.flush()
        elif self.kind == "wandb":
            self.writer.log(scalars, step=row["step"])

    def close(self):
        if self.kind == "tensorboard":
            self.writer.close()
        elif self.kind == "wandb":
            self.writer.finish()


def plot_curves(metrics_path, png):
    """The paper's Fig. 7: summed log-probs of chosen (and rejected) answers over steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_jsonl(metrics_path, tolerate_partial_last=True)
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
