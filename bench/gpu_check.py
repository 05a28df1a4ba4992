"""What only a GPU can show, in one run: 01 and 03 on CUDA (bf16), QLoRA (--load_in_4bit),
gradient checkpointing, and the peak CUDA memory of each; prints one table.
    python bench/gpu_check.py [--work /tmp/gpu_check]"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--work", default="/tmp/gpu_check")
p.add_argument("--steps", type=int, default=30)
args = p.parse_args()

import torch  # noqa: E402

assert torch.cuda.is_available(), "this check needs a CUDA GPU"
print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
toy, rows = os.path.join(args.work, "toy"), []


def run(name, script, *flags):
    t0 = time.time()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, flags)], capture_output=True,
                          text=True, cwd=ROOT)
    ok = proc.returncode == 0
    print(f"--- {name}: rc={proc.returncode} {time.time() - t0:.0f}s\n{proc.stdout[-1500:]}", flush=True)
    if not ok:
        print(proc.stderr[-4000:], flush=True)
    return ok, time.time() - t0


ok, t = run("toy world", "00_make_toy.py", "--out", toy, "--quick")
rows.append(("00 --quick (CPU build)", ok, f"{t:.0f}s", ""))
pairs = os.path.join(args.work, "pairs.jsonl")
ok, t = run("01 bf16", "01_build_pairs.py", "--model", f"{toy}/model", "--data", f"toy={toy}/train.json",
            "--image_root", f"{toy}/images", "--out", pairs, "--samples_per_source", 128, "--batch_size", 64,
            "--max_new_tokens", 32)
n = sum(1 for _ in open(pairs)) if ok else 0
rows.append(("01 pairs on CUDA bf16", ok, f"{t:.0f}s", f"{n} pairs"))
for name, extra in [("03 dpo bf16 autocast", []), ("03 dpo + gradient checkpointing", ["--gradient_checkpointing"]),
                    ("03 dpo QLoRA 4-bit", ["--load_in_4bit"]), ("03 sft bf16", ["--loss", "sft"])]:
    out = os.path.join(args.work, name.replace(" ", "_"))
    ok, t = run(name, "03_train_bpo.py", "--model", f"{toy}/model", "--data", pairs, "--image_root", f"{toy}/images",
                "--output_dir", out, "--max_steps", args.steps, "--batch_size", 8, "--lr", 1e-3, "--lora_r", 8,
                "--lora_alpha", 16, "--save_every", 0, "--seed", 0, *extra)
    last = {}
    if ok:
        last = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))][-1]
    keys = ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "samples_per_s", "peak_mem_gb")
    rows.append((name, ok, f"{t:.0f}s", " ".join(f"{k.split('/')[-1]}={last[k]:.3g}" for k in keys if k in last)))

print("\n| check | ok | wall | final metrics |\n|---|---|---|---|")
for r in rows:
    print(f"| {r[0]} | {'yes' if r[1] else 'FAIL'} | {r[2]} | {r[3]} |")
