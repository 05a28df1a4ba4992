"""What only a GPU can show, in one run, printed as tables:
1. the pipeline on CUDA: 01 (bf16 generation) and 03 SFT on the quick toy world;
2. bench/train_vs_trl.py on a larger random-init LLaVA (576 image tokens): ours vs TRL's DPOTrainer in
   bf16, samples/s and peak CUDA memory;
3. 03 on that same model and pairs with gradient checkpointing and with QLoRA (4-bit), beside its
   default run from 2: the speed/memory trade-off of each.
    python bench/gpu_check.py [--work /tmp/gpu_check] [--lm_hidden 2048 --lm_layers 8]"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--work", default="/tmp/gpu_check")
p.add_argument("--steps", type=int, default=20, help="optimizer steps of each training run")
p.add_argument("--lm_hidden", type=int, default=2048, help="the larger model's language model width")
p.add_argument("--lm_layers", type=int, default=8)
args = p.parse_args()

import torch  # noqa: E402

assert torch.cuda.is_available(), "this check needs a CUDA GPU"
print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
toy, rows = os.path.join(args.work, "toy"), []


def run(name, script, *flags):
    """Runs a script of the repo; prints the end of its output; returns (ok, seconds)."""
    t0 = time.time()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, flags)], capture_output=True,
                          text=True, cwd=ROOT)
    print(f"--- {name}: rc={proc.returncode} {time.time() - t0:.0f}s\n{proc.stdout[-2500:]}", flush=True)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], flush=True)
    return proc.returncode == 0, time.time() - t0


def last_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f][-1]


# ---- 1. the pipeline on the toy world
ok, t = run("toy world", "00_make_toy.py", "--out", toy, "--quick")
rows.append(("00 --quick (CPU build)", ok, f"{t:.0f}s", ""))
pairs = os.path.join(args.work, "pairs.jsonl")
ok, t = run("01 bf16", "01_build_pairs.py", "--model", f"{toy}/model", "--data", f"toy={toy}/train.json",
            "--image_root", f"{toy}/images", "--out", pairs, "--samples_per_source", 128, "--batch_size", 64,
            "--max_new_tokens", 32)
rows.append(("01 pairs on CUDA bf16", ok, f"{t:.0f}s", f"{sum(1 for _ in open(pairs)) if ok else 0} pairs"))
out = os.path.join(args.work, "sft")
ok, t = run("03 sft", "03_train_bpo.py", "--model", f"{toy}/model", "--data", pairs, "--image_root",
            f"{toy}/images", "--output_dir", out, "--loss", "sft", "--max_steps", args.steps, "--batch_size", 8,
            "--lr", 1e-3, "--lora_r", 8, "--lora_alpha", 16, "--save_every", 0, "--seed", 0)
m = last_metrics(out) if ok else {}
rows.append(("03 sft bf16 (toy)", ok, f"{t:.0f}s", " ".join(f"{k}={m[k]:.3g}" for k in ("loss", "peak_mem_gb") if k in m)))

# ---- 2. ours vs TRL on a larger model
bench = os.path.join(args.work, "vs_trl")
ok, t = run("ours vs TRL", "bench/train_vs_trl.py", "--toy", toy, "--work", bench, "--device", "cuda",
            "--steps", args.steps, "--warmup", 3, "--lm_hidden", args.lm_hidden, "--lm_layers", args.lm_layers,
            "--vocab_size", 32064)
rows.append(("bench/train_vs_trl.py on CUDA", ok, f"{t:.0f}s", "table above"))

# ---- 3. 03's memory/speed options on the same model and pairs
speed = []
if os.path.exists(os.path.join(bench, "model")):
    for name, extra in [("default (bf16 autocast, SDPA)", []), ("gradient checkpointing", ["--gradient_checkpointing"]),
                        ("QLoRA 4-bit", ["--load_in_4bit"]), ("4-bit + checkpointing", ["--load_in_4bit", "--gradient_checkpointing"])]:
        out = os.path.join(args.work, "opt_" + str(len(speed)))
        ok, t = run(name, "03_train_bpo.py", "--model", f"{bench}/model", "--data", f"{bench}/pairs.jsonl",
                    "--image_root", f"{toy}/images", "--output_dir", out, "--max_steps", args.steps,
                    "--batch_size", 4, "--lr", 1e-4, "--save_every", 0, "--seed", 0, *extra)
        if ok:
            ms = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))][3:]
            speed.append((name, sum(r["samples_per_s"] for r in ms) / len(ms), ms[-1]["peak_mem_gb"],
                          ms[-1]["grad_norm"], ms[-1]["loss"]))
        else:
            speed.append((name, float("nan"), float("nan"), float("nan"), float("nan")))

print("\n| check | ok | wall | notes |\n|---|---|---|---|")
for r in rows:
    print(f"| {r[0]} | {'yes' if r[1] else 'FAIL'} | {r[2]} | {r[3]} |")
print(f"\n03 on the larger model (LM {args.lm_hidden} x {args.lm_layers}, 576 image tokens, batch 4, LoRA r 64):")
print("| 03 option | samples/s | peak CUDA GB | last grad norm | last loss |\n|---|---|---|---|---|")
for name, sps, mem, gn, loss in speed:
    print(f"| {name} | {sps:.3g} | {mem:.3g} | {gn:.3g} | {loss:.4g} |")
