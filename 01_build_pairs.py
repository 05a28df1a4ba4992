"""Step 1: image-weakened negatives. For each ground-truth item the model answers from an image
whose CLIP features are noised with forward diffusion, so its language prior takes over; the pair
is (chosen = ground truth, rejected = that answer). Resumable by id, sharded under torchrun."""
import argparse
import sys

import torch
from tqdm import tqdm

import common
import jobs

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--model", default="llava-hf/llava-1.5-7b-hf", help="base model (dir or hub id)")
p.add_argument("--data", action="append", required=True, metavar="NAME=PATH",
               help="ground truth in LLaVA conversation format (JSON list or JSONL); repeat per source")
p.add_argument("--image_root", required=True, help="image paths in the data are relative to this")
p.add_argument("--out", default="pairs_weakened.jsonl", help="pairs JSONL (appended to: reruns resume)")
p.add_argument("--samples_per_source", type=int, default=-1, help="uniform sample per source; -1 = all")
p.add_argument("--turns", choices=["first", "all"], default="first", help="which human/gpt turns become items")
p.add_argument("--noise_step", type=int, default=500, help="forward diffusion step t of the weakening (0..1000)")
p.add_argument("--noise_on", choices=["features", "pixels"], default="features",
               help="noise the projector input (paper) or the normalised pixels (authors' script)")
p.add_argument("--temperature", type=float, default=1.0)
p.add_argument("--top_p", type=float, default=1.0)
p.add_argument("--max_new_tokens", type=int, default=512)
p.add_argument("--batch_size", type=int, default=8, help="generations per forward, per process")
p.add_argument("--seed", type=int, default=0)
jobs.add_on_error_arg(p, "skip", "ground-truth record")
args = p.parse_args()

rank, world, device = jobs.dist_setup()
torch.manual_seed(args.seed + rank)

# ---- items: every source read and sampled uniformly with the seed; the ones already written dropped
bad_records = jobs.OnError(args.on_error, quiet=rank != 0)
items, skipped_no_image = jobs.load_sources(args.data, args.samples_per_source, args.seed, args.turns,
                                             bad_records)
todo, part, n_done = jobs.pending_items(items, args.out, rank, world)  # each rank appends to its part file
if rank == 0:
    print(f"{len(items)} items, {n_done} already done, {skipped_no_image} records without image skipped; "
          f"{bad_records.summary('bad ground-truth records')}")

# ---- model and the loop: batched sampling from the weakened image
model, processor = common.load_model(args.model, device=device)
generator = torch.Generator().manual_seed(args.seed * 1000 + rank)  # the noise draws
meta = {"noise_step": args.noise_step, "noise_on": args.noise_on, "model": args.model,
        "temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens,
        "seed": args.seed}
writer = jobs.JsonlAppender(part)
written = dropped = missing = 0
for i in tqdm(range(0, len(todo), args.batch_size), desc=f"pairs[{rank}]", disable=rank != 0 and world > 1):
    batch, images = [], []
    for it in todo[i:i + args.batch_size]:
        try:
            images.append(jobs.load_image(args.image_root, it["image"]))
            batch.append(it)
        except jobs.DataError as e:  # skipped and counted; with --on_error fail, the end of the run
            if args.on_error == "fail":
                sys.exit(f"error: {it['where']}: {e}")
            print(f"skip {it['where']}: {e}", file=sys.stderr)
            missing += 1
    if not batch:
        continue
    with common.weaken_images(model, args.noise_step, args.noise_on, generator):
        answers = common.generate(model, processor, images, [it["prompt"] for it in batch],
                                  max_new_tokens=args.max_new_tokens, do_sample=True,
                                  temperature=args.temperature, top_p=args.top_p)
    for it, rejected in zip(batch, answers):
        if not rejected or rejected.split() == it["answer"].split():
            dropped += 1  # an empty negative, or the ground truth itself, teaches nothing
            continue
        writer.write({"id": it["id"], "image": it["image"], "prompt": it["prompt"], "chosen": it["answer"],
                      "rejected": rejected, "source": it["source"], "method": "image_weakened", "meta": meta})
        written += 1
writer.close()

# ---- merge the part files into --out (rank 0, after everyone is done)
jobs.barrier()
counts = jobs.mean_over_ranks({"written": written, "dropped": dropped, "missing": missing})
if rank == 0:
    n_out = jobs.merge_parts(args.out)
    n = {k: round(v * world) for k, v in counts.items()}
    print(f"wrote {n['written']} pairs this run ({n_out} in {args.out}); dropped {n['dropped']} empty or "
          f"identical negatives; skipped {n['missing']} unreadable images")
    print(bad_records.summary("bad ground-truth records"))
jobs.dist_cleanup()
