"""Step 3: BPO training. DPO (paper Eq. 4) on (ground truth, bootstrapped negative) pairs with LoRA
on the language model; the reference is the same model with the adapter disabled. `--loss sft`
trains on the chosen answers only (the paper's Table 3 baseline). One file for one process or many (DDP, or with
--fsdp the language model sharded over the processes):
    python 03_train_bpo.py ...            torchrun --nproc_per_node 8 03_train_bpo.py ... [--fsdp]
Flags and formulas: docs/training.md; resuming and failures: docs/failures.md."""
import argparse
import contextlib
import functools
import itertools
import math
import os
import sys
import time

import torch
from peft import LoraConfig
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import attention
import common
import data
import dist_io
import loading
import runs
from families import image_features


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=dist_io.HelpFormatter)
    # ---- the method
    p.add_argument("--model", default=common.DEFAULT_MODEL, help="base model (dir or hub id)")
    p.add_argument("--loss", choices=["dpo", "ipo", "sft"], default="dpo",
                   help="dpo: the paper's; ipo: (h - 1/(2 beta))^2; sft: NLL of the chosen answers (Table 3's baseline)")
    p.add_argument("--beta", type=float, default=0.1, help="DPO temperature (the paper's eta)")
    p.add_argument("--length_normalize", action="store_true", help="dpo/ipo: log-ratios per token instead of summed")
    p.add_argument("--sft_weight", type=float, default=0.0, help="dpo/ipo: + W x the chosen answers' per-token NLL")
    p.add_argument("--conditional_weight", type=float, default=0.0,
                   help="dpo/ipo: + W x mDPO's conditional term (chosen given the image vs the weakened image)")
    p.add_argument("--anchor_weight", type=float, default=0.0, help="dpo/ipo: + W x mDPO's anchor on the chosen reward")
    p.add_argument("--noise_step", type=int, default=-1,
                   help="conditional term: noise step of the weakened image (-1: each pair's meta, else 500)")
    p.add_argument("--noise_on", choices=["features", "pixels"], default=None,
                   help="conditional term: where the noise goes (default: each pair's meta, else features)")
    p.add_argument("--lr", type=float, default=2e-6, help="peak learning rate (AdamW, cosine decay after warmup)")
    p.add_argument("--epochs", type=int, default=2, help="passes over the pairs")
    p.add_argument("--batch_size", type=int, default=4, help="pairs per process per micro-step")
    p.add_argument("--grad_accum", type=int, default=1, help="micro-steps per optimizer step")
    p.add_argument("--max_steps", type=int, default=-1, help="stop after this many optimizer steps (-1: --epochs)")
    p.add_argument("--lora_r", type=int, default=64, help="LoRA rank")
    p.add_argument("--lora_alpha", type=int, default=128, help="LoRA scaling numerator (scale = alpha / r)")
    p.add_argument("--lora_dropout", type=float, default=0.05, help="dropout on the LoRA input")
    p.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--warmup_ratio", type=float, default=0.03, help="share of the steps with linear warmup")
    p.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm")
    p.add_argument("--seed", type=int, default=42, help="seed of the LoRA init, the shuffle and dropout")
    # ---- the data
    p.add_argument("--data", action="append", required=True, help="pairs JSONL (repeat to train on several)")
    p.add_argument("--image_root", action="append", default=[], metavar="DIR|NAME=DIR",
                   help="image paths are relative to this: one DIR, or NAME=DIR per pair `source`")
    p.add_argument("--data_format", choices=data.PAIR_FORMATS, default="auto",
                   help="bpo (01/02's), trl (conversational, image paths), rlaifv (parquet, image bytes), llava "
                        "(conversations + rejected_conversations); auto: from each file")
    p.add_argument("--max_length", type=int, default=2048, help="tokens per sequence incl. image; responses cut at the end")
    p.add_argument("--group_by_length", action="store_true", help="batch pairs of similar length (less padding)")
    dist_io.add_on_error_arg(p, "fail", "pair")
    common.add_format_args(p)
    # ---- the run directory
    p.add_argument("--output_dir", required=True, help="adapter/, metrics.jsonl, curves.png, checkpoint-N/ go here")
    run_dir = p.add_mutually_exclusive_group()
    run_dir.add_argument("--resume", action="store_true", help="continue the run in --output_dir from its last checkpoint")
    run_dir.add_argument("--overwrite", action="store_true", help="delete an earlier run in --output_dir first")
    p.add_argument("--save_every", type=int, default=500, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--keep_checkpoints", type=int, default=2, help="how many recent checkpoints to keep")
    p.add_argument("--log_every", type=int, default=1, help="a metrics row every N steps (averaged over them)")
    p.add_argument("--dry_run", action="store_true", help="check and measure everything, estimate memory, write nothing")
    p.add_argument("--report_to", choices=["none", "tensorboard", "wandb"], default="none",
                   help="also send metrics.jsonl's scalars to TensorBoard (OUTPUT_DIR/tensorboard/) or W&B, rank 0")
    # ---- the system
    p.add_argument("--precompute_ref", action=argparse.BooleanOptionalAction, default=True,
                   help="score the reference once before training (OUTPUT_DIR/ref_logps.jsonl), not every step")
    p.add_argument("--load_in_4bit", action="store_true", help="QLoRA: NF4 language model")
    p.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations: far less memory")
    p.add_argument("--fsdp", action="store_true",
                   help="the language model sharded over the torchrun job with PyTorch FSDP2 (a unit per decoder layer, "
                        "LoRA and its optimizer state with it; the vision side whole on every rank) instead of DDP's "
                        "whole copy per GPU: the same steps, a share of the weights per GPU. Not with --load_in_4bit")
    p.add_argument("--padding_free", action=argparse.BooleanOptionalAction, default=True,
                   help="the pairs of a micro-batch in one row, no padding, its attention by --attention "
                        "(--no-padding_free: right-padded rows, a dense mask)")
    p.add_argument("--attention", choices=attention.KERNELS, default="auto",
                   help="the padding-free row's attention: flex (FlexAttention with a block mask, compiled), per_pair "
                        "(one SDPA per pair, any device), auto (flex where the device can compile and run its backward "
                        "at the model's head size, else per_pair; said in one line and in run.json). A flex that fails "
                        "at its first call falls back to per_pair with a warning")
    p.add_argument("--num_workers", type=int, default=4 if torch.cuda.is_available() else 0,
                   help="processes preparing the next micro-batches (0: in the training process)")
    return p.parse_args(argv)


def chosen_given_weakened(net, model, weak, keys, pairs, args, kernel):
    """The conditional term's second input: summed log-probs of the chosen answers given the weakened
    image (a forward of its own: the prefix differs, so it cannot share the packed sequence), and the
    image features it ran on (the reference reuses them)."""
    weaken = [common.pair_weakening(keys[i], pairs[i].get("meta"), args.noise_step, args.noise_on) for i in weak.indices]
    features = image_features(model, weak.inputs, weaken)
    inputs = kernel.inputs(weak.inputs)
    return common.response_logps(net, model, inputs, weak.scored, len(weak.indices), features)[0], features


def reference_logps(model, batch, inputs, fields, ref_cache, keys, features):
    """Reference log-probs [fields[0] of each pair..., fields[1] of each pair...]: from the cache, or a
    forward with the adapter disabled on the same inputs (--no-precompute_ref, TRL's way)."""
    if ref_cache is not None:
        return torch.tensor([ref_cache[keys[i]][f] for f in fields for i in batch.indices],
                            device=batch.inputs["input_ids"].device)
    with torch.no_grad(), model.disable_adapter():
        return common.response_logps(model, model, inputs, batch.scored, len(fields) * len(batch.indices),
                                     features)[0]


def batch_loss(net, model, item, responses, ref_cache, keys, pairs, args, kernel):
    """(loss, metrics) of one micro-batch: the policy forward, the reference, common.preference_loss."""
    batch, weak = item["main"], None
    if args.conditional_weight:  # first, through the plain model: DDP's forward comes last, once a micro-step
        policy_weak, weak_features = chosen_given_weakened(model, model, item["weak"], keys, pairs, args, kernel)
        weak = (policy_weak, reference_logps(model, item["weak"], kernel.inputs(item["weak"].inputs), ("chosen_weak",),
                                             ref_cache, keys, weak_features), item["weak"].n_tokens)
    inputs = kernel.inputs(batch.inputs)  # the attention made once, for the policy's and the reference's forward
    policy, features = common.response_logps(net, model, inputs, batch.scored, len(responses) * len(batch.indices))
    reference = None if args.loss == "sft" else reference_logps(model, batch, inputs, responses, ref_cache, keys,
                                                                features)
    return common.preference_loss(policy, reference, batch.n_tokens, loss=args.loss, beta=args.beta,
                                  length_normalize=args.length_normalize, sft_weight=args.sft_weight,
                                  conditional_weight=args.conditional_weight, anchor_weight=args.anchor_weight,
                                  weak=weak)


def gradient_sync(net, model, last):
    """A micro-step's context: gradients reduced over the ranks on the step's last micro-step only (DDP's no_sync,
    FSDP's set_requires_gradient_sync on the earlier ones); nothing to do in one process."""
    if isinstance(net, DDP) and not last:
        return net.no_sync()
    if isinstance(model.get_base_model(), FSDPModule):
        model.get_base_model().set_requires_gradient_sync(last)
    return contextlib.nullcontext()


def clip_gradients(params, max_norm):
    """clip_grad_norm_, the norm made whole first under FSDP (its gradients are shards: DTensors), so every rank
    clips by, and reports, the norm of the whole gradient."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the tokenizer also runs in the data workers
    with runs.explain_out_of_memory():
        train(args)
    dist_io.dist_cleanup()  # on every normal return: a dry run's or --fsdp's group of one too


def train(args):
    # ---- config: who we are, what a step holds, the run directory
    if args.fsdp and args.load_in_4bit:
        sys.exit("error: --fsdp with --load_in_4bit: FSDP2 cannot shard bitsandbytes' packed NF4 weights; use one or "
                 "the other")
    rank, world, device = dist_io.dist_setup(group=args.fsdp)  # --fsdp in one process: a group of one
    is_main = rank == 0
    fmt = common.input_format(args)
    roots = data.parse_image_roots(args.image_root)
    B = args.batch_size  # pairs per micro-batch; log-probs come as [B chosen..., B rejected...]
    per_step = B * world * args.grad_accum  # pairs per optimizer step, all ranks
    responses = ("chosen",) if args.loss == "sft" else ("chosen", "rejected")
    missing = [d for d in args.data if not os.path.isfile(d)]  # every node needs the pairs (and the images)
    dist_io.agree(not missing, f"--data {missing[0]}: no such file" if missing else "")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # what load_model loads (bf16 autocast on CUDA)
    settings = runs.run_settings(args, per_step, fmt, roots, dtype)
    run, earlier = runs.open_run(args.output_dir, settings, args.resume, args.overwrite, args.dry_run)

    # ---- data: every pair validated and measured up front, so a bad one fails (or is skipped) before hours of training
    bad = dist_io.OnError(args.on_error, quiet=not is_main)
    try:
        loaded = data.load_pairs(args.data, roots, bad, args.data_format)
    except (dist_io.DataError, OSError) as e:
        sys.exit(f"error: {e}")
    processor = loading.load_processor(args.model)
    pairs = runs.measure_pairs(loaded, roots, bad, processor, fmt, responses, args.max_length, not args.dry_run,
                               rank, world, is_main)
    if is_main and args.on_error == "skip":
        print(bad.summary("pairs"))
    steps_per_epoch = len(pairs.records) // per_step
    if steps_per_epoch == 0:
        sys.exit(f"error: {len(pairs.records)} pairs is less than one step ({per_step} = batch_size x processes x "
                 "grad_accum)")
    total_steps = args.max_steps if args.max_steps > 0 else args.epochs * steps_per_epoch
    # the padding-free row's attention kernel, from what this device can run (said here, in run.json and the dry run)
    from transformers import AutoConfig
    kernel = attention.choose(args.attention, device, AutoConfig.from_pretrained(args.model), args.padding_free)
    if is_main:
        print(kernel.describe())
    if args.dry_run:
        if is_main:
            runs.print_dry_run(args, pairs, bad, responses, steps_per_epoch, total_steps, per_step, world)
        return
    if args.resume and run["finished_step"] is not None and run["finished_step"] >= total_steps:
        if is_main:
            print(f"nothing to do: the run in {args.output_dir} finished at step {run['finished_step']} of "
                  f"{total_steps}; its adapter is in {args.output_dir}/adapter")
        return
    ckpts = runs.checkpoints(args.output_dir) if args.resume else []
    step = runs.checkpoint_step(ckpts[-1]) if ckpts else 0  # where this run starts
    run["schedule"] = runs.plan_schedule(run["schedule"], step, total_steps, args.warmup_ratio)
    run["attention"] = kernel.describe()
    dist_io.barrier()  # every rank has looked at the folder before rank 0 clears it and marks the run as begun
    runs.check_shared_output_dir(args.output_dir, rank, world)  # before rank 0 writes any of the run
    if is_main:
        runs.begin_run(args.output_dir, run, earlier, args.overwrite)
        if run["schedule"][-1]["first"] == step > 0 and "start" in run["schedule"][-1]:
            print(f"a new horizon: the LR continues from {args.lr * run['schedule'][-1]['start']:.3g} at step {step}, "
                  f"a cosine to 0 at step {total_steps}")

    # ---- model: LoRA on the language model's linear layers; vision tower and projector stay frozen
    model, processor = loading.load_model(args.model, device=device, load_in_4bit=args.load_in_4bit, on_host=args.fsdp)
    model.requires_grad_(False)  # QLoRA too: peft's prepare_model_for_kbit_training would upcast the rest to fp32
    attention.use_packed_attention(model, on=args.padding_free)  # set either way: a model handed in may have had it
    if args.gradient_checkpointing:  # non-reentrant: the frozen inputs need no grad
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(args.seed)  # LoRA's A init: the same on every rank and in every run
    model = loading.with_lora(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha,
                                                lora_dropout=args.lora_dropout, target_modules=common.LORA_TARGETS))
    model.train()
    resumed = runs.load_checkpoint(ckpts[-1], model) if ckpts else None  # the adapter whole, before any sharding
    if args.fsdp:  # in place: the model's own forward gathers each unit's shards
        sharded = loading.fully_shard_language_model(model)
        if is_main:
            print(sharded)
    net = DDP(model) if world > 1 and not args.fsdp else model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    if resumed:
        runs.load_optimizer_state(optimizer, resumed["optimizer"])
        if is_main:
            print(f"resumed from {ckpts[-1]} at step {step}")
    metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
    if is_main:
        runs.keep_metrics_upto(metrics_path, step)  # drop log lines past the checkpoint we resumed
    tracker = runs.Tracker(args.report_to if is_main else "none", args.output_dir, vars(args))

    def batches(chunks, fields):  # this rank's packed micro-batches of these lists of pair indices, in order
        dataset = runs.PairBatches(pairs.records, roots, processor, args.max_length, fmt, chunks, fields,
                                   weak=bool(args.conditional_weight),
                                   row_block=kernel.row_block() if args.padding_free else None)
        return runs.micro_batches(dataset, args.num_workers, device)

    def fell_back():  # a flex failure at its first call: recorded in run.json
        if is_main and run["attention"] != kernel.describe():
            run["attention"] = kernel.describe()
            runs.write_run(args.output_dir, run)

    # ---- reference: log-probs under the adapter-disabled model, once (it never changes)
    ref_cache = None
    if args.loss != "sft" and args.precompute_ref:
        fields = responses + (("chosen_weak",) if args.conditional_weight else ())
        mine = list(range(rank, len(pairs.records), world))
        chunks = [mine[s:s + B] for s in range(0, len(mine), B)]
        # under --fsdp a forward is a collective: every rank runs as many as rank 0 (it has the most pairs), a rank
        # with fewer scoring its last batch again and dropping it
        extra = math.ceil(len(range(0, len(pairs.records), world)) / B) - len(chunks) if args.fsdp else 0

        def score(item):
            batch, n = item["main"], len(item["main"].indices)
            ref = common.response_logps(model, model, kernel.inputs(batch.inputs), batch.scored, len(responses) * n)[0]
            ref = ref.view(len(responses), -1)
            if args.conditional_weight:
                weak = chosen_given_weakened(model, model, item["weak"], pairs.keys, pairs.records, args, kernel)[0]
                ref = torch.cat([ref, weak[None]])
            return ref

        def scores():
            with torch.no_grad(), model.disable_adapter():
                for k, item in enumerate(batches(chunks + chunks[-1:] * extra, responses)):
                    ref = kernel.run("reference", lambda: score(item))
                    if k < len(chunks):
                        yield item["main"].indices, ref
        depends = runs.reference_depends(settings, bool(args.conditional_weight))
        ref_cache = runs.reference_cache(os.path.join(args.output_dir, "ref_logps.jsonl"), pairs.keys, depends, fields,
                                         scores, len(chunks), args.resume, rank, world, is_main)
        fell_back()

    # ---- the loop: lr, accumulate, clip, step, log, save
    sort_key = [len(p["chosen"]) + len(p["rejected"]) for p in pairs.records] if args.group_by_length else None
    steps_of = functools.lru_cache(maxsize=1)(lambda epoch: runs.epoch_steps(
        len(pairs.records), epoch, args.seed, per_step, steps_per_epoch, sort_key))
    # this rank's micro-batches from here to the end, in order: step s, micro-step m takes its slice of s's pairs
    chunks = [steps_of(s // steps_per_epoch)[s % steps_per_epoch][(m * world + rank) * B:(m * world + rank + 1) * B]
              for s in range(step, total_steps) for m in range(args.grad_accum)]
    loader = batches(chunks, responses)
    if kernel.name == "flex" and chunks:  # its training kernels compiled on the first micro-batch, outside DDP (a
        # failure inside DDP's backward would leave its reducer mid-step); the gradients thrown away, all ranks agree.
        # Under --fsdp the model is the sharded one, so this is a collective that every rank runs: a failure that
        # every rank meets alike (the same GPUs) leaves FSDP able to run it again (tested: CPU's flex has no backward)
        first = next(loader)
        kernel.run("train", lambda: batch_loss(model, model, first, responses, ref_cache, pairs.keys, pairs.records,
                                               args, kernel)[0].backward())
        optimizer.zero_grad(set_to_none=True)
        if dist_io.mean_over_ranks({"flex": kernel.name == "flex"})["flex"] < 1 and kernel.name == "flex":
            kernel.fall_back("it failed on another rank")
        fell_back()
        loader = itertools.chain([first], loader)
    bar = tqdm(total=total_steps, initial=step, desc=f"{args.loss} steps", disable=not is_main)
    window, n_window, t_window = {}, 0, time.time()  # metrics summed on the device since the last log step
    while step < total_steps:
        torch.manual_seed(args.seed * 1_000_003 + step * world + rank)  # LoRA dropout: same draws on resume
        lr = args.lr * runs.lr_multiplier(step, run["schedule"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        for micro in range(args.grad_accum):
            last = micro == args.grad_accum - 1
            with gradient_sync(net, model, last):  # all-reduce (or reduce-scatter) once per step
                item = next(loader)
                loss, metrics = batch_loss(net, model, item, responses, ref_cache, pairs.keys, pairs.records, args,
                                           kernel)
                (loss / args.grad_accum).backward()
            main = item["main"]  # the tokens a micro-batch runs through the model, and how many are padding
            padding = main.inputs["input_ids"].numel() - main.n_real
            metrics["tokens/real"] = torch.tensor(float(main.n_real), device=device)
            metrics["tokens/padding"] = torch.tensor(float(padding), device=device)
            window = {k: window.get(k, 0) + v for k, v in metrics.items()}
        grad_norm = clip_gradients(params, args.max_grad_norm)
        # gradients are reduced, so every rank sees the same norm and all stop together; one host sync a step
        if not torch.isfinite(grad_norm):
            done = runs.checkpoints(args.output_dir)
            sys.exit(f"error: non-finite loss or gradient at step {step + 1} (loss {loss.item():.4g}, grad norm "
                     f"{grad_norm.item():.4g}); not applied, nothing saved. Last good checkpoint: "
                     f"{done[-1] if done else 'none'} (--resume continues from it). Lower --lr, or check this step's "
                     "pairs")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        n_window += 1
        bar.update(1)
        if step % args.log_every == 0 or step == total_steps:
            row = runs.metrics_row(window, n_window, args.grad_accum, world, step=step,
                                   epoch=round(step / steps_per_epoch, 4), lr=lr, grad_norm=grad_norm.item())
            row["samples_per_s"] = per_step * n_window / (time.time() - t_window)
            if device.type == "cuda":
                row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            window, n_window, t_window = {}, 0, time.time()
            if is_main:
                dist_io.append_line(metrics_path, row)
                tracker.log(row)
                bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in row.items()
                                 if k in ("loss", "rewards/accuracies")})
        if args.save_every > 0 and step % args.save_every == 0 and step < total_steps:
            runs.save_checkpoint(args.output_dir, step, model, optimizer, args, args.keep_checkpoints, is_main)
            if is_main:
                runs.plot_curves(metrics_path, os.path.join(args.output_dir, "curves.png"))
    bar.close()
    tracker.close()

    # ---- save: the adapter, the last checkpoint, the curves, the run marked finished, a summary
    adapter = runs.save_checkpoint(args.output_dir, step, model, optimizer, args, args.keep_checkpoints, is_main)
    if is_main:
        model.save_pretrained(os.path.join(args.output_dir, "adapter"), state_dict=adapter)
        runs.plot_curves(metrics_path, os.path.join(args.output_dir, "curves.png"))
        runs.write_run(args.output_dir, {**run, "finished_step": step})
        last = dist_io.read_jsonl(metrics_path)[-1] if os.path.exists(metrics_path) else {}
        print(f"done: {step} steps; adapter in {args.output_dir}/adapter, log in {metrics_path}, curves in "
              f"{args.output_dir}/curves.png; {runs.responses_cut(pairs.lengths, args.max_length)} responses cut at "
              f"--max_length {args.max_length}")
        print("final " + "  ".join(f"{k}={v:.4g}" for k, v in last.items() if "/" in k or k == "loss"))


if __name__ == "__main__":
    main()
