"""Step 1: image-weakened negatives. For each ground-truth item the model answers from an image
whose CLIP features are noised with forward diffusion, so its language prior takes over; the pair
is (chosen = ground truth, rejected = that answer). --contrast_alpha samples as the authors'
released script does instead (generation.generate_contrastive). A negative cut off by --max_new_tokens
is never written (it would end mid-sentence, a cue DPO could learn without looking at the image): it
is sampled again, up to --max_tries, then counted. Resumable by id, sharded under torchrun."""
import argparse
import sys

import torch
from tqdm import tqdm

import common
import data
import dist_io
import generation
import loading


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=dist_io.HelpFormatter)
    p.add_argument("--model", default=common.DEFAULT_MODEL, help="base model (dir or hub id)")
    data.add_ground_truth_args(p, out="pairs_weakened.jsonl")
    p.add_argument("--image_root", action="append", required=True, metavar="DIR|NAME=DIR",
                   help="image paths in the data are relative to this: one DIR for every source, or NAME=DIR per "
                        "source")
    p.add_argument("--noise_step", type=int, default=500, help="forward diffusion step t of the weakening (0..1000)")
    p.add_argument("--noise_on", choices=["features", "pixels"], default="features",
                   help="noise the projector input (paper) or the normalised pixels (authors' script)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the negatives")
    p.add_argument("--contrast_alpha", type=float, default=0.0,
                   help="0: sample from the weakened image (the paper's); A > 0: the authors' released sampler, "
                        "logits (1 + A) clean - A weakened (they used A 1, beta 0.2, temperature 0.2, --noise_on "
                        "pixels --noise_step 900)")
    p.add_argument("--contrast_beta", type=float, default=0.2,
                   help="released sampler: only tokens with clean probability >= beta x the clean maximum")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling of the negatives")
    p.add_argument("--max_new_tokens", type=int, default=512, help="length limit of a negative; one that reaches it "
                                                                   "is resampled")
    p.add_argument("--max_tries", type=int, default=3, help="samples per item until a negative ends by itself")
    p.add_argument("--batch_size", type=int, default=8, help="generations per forward, per process")
    p.add_argument("--seed", type=int, default=0, help="seed of the item sampling, the noise and the sampling")
    p.add_argument("--dry_run", action="store_true",
                   help="check every record, root and image header and tokenise every prompt and answer; print counts "
                        "and lengths; generate and write nothing")
    common.add_format_args(p)
    dist_io.add_on_error_arg(p, "skip", "ground-truth record")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = dist_io.dist_setup()
    torch.manual_seed(args.seed + rank)
    fmt = common.input_format(args)
    roots = data.parse_image_roots(args.image_root)

    # ---- items: every source read and sampled uniformly with the seed; the ones already written dropped
    bad_records = dist_io.OnError(args.on_error, quiet=rank != 0)
    items, skipped_no_image = data.load_sources(args.data, args.samples_per_source, args.seed, args.turns, bad_records)
    for name in {it["source"] for it in items}:
        try:
            data.image_root(roots, name)
        except dist_io.DataError as e:
            sys.exit(f"error: {e}")
    if args.dry_run:
        data.dry_run_items(items, roots, args, fmt, bad_records)
        return
    todo, part, n_done = dist_io.pending_items(items, args.out, rank, world)  # each rank appends to its part file
    if rank == 0:
        print(f"{len(items)} items, {n_done} already done, {skipped_no_image} records without image skipped; "
              f"{bad_records.summary('bad ground-truth records')}")

    # ---- model and the loop: batched sampling from the weakened image
    model, processor = loading.load_model(args.model, device=device)
    generator = torch.Generator().manual_seed(args.seed * 1000 + rank)  # the noise draws
    meta = {"noise_step": args.noise_step, "noise_on": args.noise_on, "model": args.model,
            "temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens,
            "seed": args.seed, **fmt._asdict(),
            **({"contrast_alpha": args.contrast_alpha, "contrast_beta": args.contrast_beta} if args.contrast_alpha
               else {})}
    writer = dist_io.JsonlAppender(part)
    no_pair = dist_io.JsonlAppender(f"{args.out}.no_pair.part{rank}")  # dropped and cut off: done, not drawn again
    written = dropped = missing = cut_off = 0
    for i in tqdm(range(0, len(todo), args.batch_size), desc=f"pairs[{rank}]", disable=rank != 0 and world > 1):
        batch, images = [], []
        for it in todo[i:i + args.batch_size]:
            try:
                images.append(data.load_image(data.image_root(roots, it["source"]), it["image"]))
                batch.append(it)
            except dist_io.DataError as e:  # skipped and counted; with --on_error fail, the end of the run
                if args.on_error == "fail":
                    sys.exit(f"error: {it['where']}: {e}")
                print(f"skip {it['where']}: {e}", file=sys.stderr)
                missing += 1
        negatives = [None] * len(batch)
        for _ in range(args.max_tries):  # sample again only the items whose negative was cut off
            again = [k for k, neg in enumerate(negatives) if neg is None]
            if not again:
                break
            with common.weaken_images(model, args.noise_step, args.noise_on, generator):
                answers = generation.generate(model, processor, [images[k] for k in again],
                                              [batch[k]["prompt"] for k in again], fmt, max_new_tokens=args.max_new_tokens,
                                              do_sample=True, temperature=args.temperature, top_p=args.top_p,
                                              keep_unfinished=False)
            for k, answer in zip(again, answers):
                negatives[k] = answer
        for it, rejected in zip(batch, negatives):
            if rejected is None:
                cut_off += 1
                no_pair.write({"id": it["id"], "why": "cut off"})
            elif not rejected or rejected.split() == it["answer"].split():
                dropped += 1  # an empty negative, or the ground truth itself, teaches nothing
                no_pair.write({"id": it["id"], "why": "empty or identical"})
            else:
                writer.write({"id": it["id"], "image": it["image"], "prompt": it["prompt"], "chosen": it["answer"],
                              "rejected": rejected, "source": it["source"], "method": "image_weakened", "meta": meta})
                written += 1
    writer.close()
    no_pair.close()

    # ---- merge the part files into --out (rank 0, after everyone is done)
    dist_io.barrier()
    counts = dist_io.mean_over_ranks({"written": written, "dropped": dropped, "missing": missing, "cut_off": cut_off})
    if rank == 0:
        n_out, n_no_pair = dist_io.merge_parts(args.out), dist_io.merge_parts(f"{args.out}.no_pair")
        n = {k: round(v * world) for k, v in counts.items()}
        print(f"wrote {n['written']} pairs this run ({n_out} in {args.out}); dropped {n['dropped']} empty or "
              f"identical negatives and {n['cut_off']} cut off by --max_new_tokens {args.max_tries} times; "
              f"skipped {n['missing']} unreadable images; {n_no_pair} items without a pair listed in {args.out}.no_pair")
        print(bad_records.summary("bad ground-truth records"))
    dist_io.dist_cleanup()


if __name__ == "__main__":
    main()
