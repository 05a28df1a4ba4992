"""01's batched generation against one answer at a time, on the toy model.

    OMP_NUM_THREADS=2 .venv/bin/python bench/generate.py [--n 64 --batch_sizes 1 4 16 32 64]

Times what 01_build_pairs.py does for each batch: read the images, weaken them (common.weaken_images, noise
on the projector input) and sample the answers (generation.generate), for the same --n items at every batch
size, after one untimed warm-up batch. Prints samples/s per batch size and its ratio to batch size 1 (one
at a time; goal for 01's batched generation: >= 5x), with the mean answer length, since a batch runs until
its longest answer ends. (04 and 05 answer through benchmarks.answer_all, which calls the same generation.generate,
greedy.) Speed is measured here, never asserted in tests: machines are noisy, so compare ratios of one run.
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import generation  # noqa: E402
import loading  # noqa: E402


class HelpFormat(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows each flag's default and keeps the docstring's layout."""


p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormat)
p.add_argument("--model", default=os.path.join(ROOT, "toy", "model"), help="as 01's --model")
p.add_argument("--data", default=f"toy={os.path.join(ROOT, 'toy', 'train.json')}", metavar="NAME=PATH",
               help="ground truth in LLaVA format, as 01's --data")
p.add_argument("--image_root", default=os.path.join(ROOT, "toy", "images"), help="as 01's --image_root")
p.add_argument("--n", type=int, default=128, help="items answered at every batch size")
p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 4, 16, 32, 64], help="the first is the baseline")
p.add_argument("--noise_step", type=int, default=500, help="as 01's --noise_step")
p.add_argument("--noise_on", choices=["features", "pixels"], default="features", help="as 01's --noise_on")
p.add_argument("--max_new_tokens", type=int, default=48, help="the demo's setting for 01 on the toy")
p.add_argument("--temperature", type=float, default=1.0, help="as 01's --temperature")
p.add_argument("--top_p", type=float, default=1.0, help="as 01's --top_p")
p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="None: cuda if available")
p.add_argument("--seed", type=int, default=0, help="item sample, sampling and noise draws")
p.add_argument("--out", default=None, help="also write the table as JSON here")
common.add_format_args(p)  # as 01's --chat_format and --pad_square
args = p.parse_args()

import torch  # noqa: E402

import data  # noqa: E402

device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
fmt = common.input_format(args)
items = data.load_sources([args.data], args.n, args.seed, "first")[0]
model, processor = loading.load_model(args.model, device=device)


def answer(batch, generator):
    """01's loop body for one batch: images read, image-weakened sampling."""
    images = [data.load_image(args.image_root, it["image"]) for it in batch]
    with common.weaken_images(model, args.noise_step, args.noise_on, generator):
        return generation.generate(model, processor, images, [it["prompt"] for it in batch], fmt,
                                   max_new_tokens=args.max_new_tokens, do_sample=True, temperature=args.temperature,
                                   top_p=args.top_p)


answer(items[:2], torch.Generator().manual_seed(args.seed))  # warm-up: first-call allocations and lazy inits
rows = []
for bs in args.batch_sizes:
    torch.manual_seed(args.seed)  # the same sampling and noise draws at every batch size, as far as batching allows
    generator = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    answers = [a for i in range(0, len(items), bs) for a in answer(items[i:i + bs], generator)]
    seconds = time.perf_counter() - t0
    rows.append({"batch_size": bs, "samples_per_s": len(items) / seconds, "seconds": seconds,
                 "words_per_answer": sum(len(a.split()) for a in answers) / len(answers)})
    print(f"batch {bs}: {seconds:.1f}s", flush=True)

print(f"\n{device}, {torch.get_num_threads()} threads; {args.model}, {len(items)} items, noise step "
      f"{args.noise_step} on {args.noise_on}, {fmt.chat_format}{' padded to squares' if fmt.pad_square else ''}, "
      f"sampling (temperature {args.temperature}, top_p {args.top_p}), "
      f"max_new_tokens {args.max_new_tokens}\n")
print(f"| batch size | samples/s | x batch {rows[0]['batch_size']} | words per answer |\n|---|---|---|---|")
for r in rows:
    r["ratio"] = r["samples_per_s"] / rows[0]["samples_per_s"]
    print(f"| {r['batch_size']} | {r['samples_per_s']:.3g} | {r['ratio']:.2f} | {r['words_per_answer']:.1f} |")
best = max(rows, key=lambda r: r["samples_per_s"])
print(f"\nbatched/one-at-a-time: {best['ratio']:.2f}x at batch size {best['batch_size']} (goal >= 5x)")
if args.out:
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "device": device, "rows": rows}, f, indent=1)
