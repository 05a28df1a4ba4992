"""Prints one markdown table of named evaluation runs: MM-Vet total and per capability, Object
HalBench Resp (CHAIR_s) and Obj (CHAIR_i), lower is better, beside recall (a model that names fewer
objects also hallucinates fewer: the two must be read together).

    python experiments/demo_table.py base=runs/demo/eval/base sft=runs/demo/eval/sft bpo=runs/demo/eval/bpo

Each DIR holds mmvet/scores.json (04) and halbench/scores.json (05); a missing one shows as '-'."""
import argparse
import json
import os
import sys

CAPABILITIES = ["rec", "ocr", "know", "gen", "spat", "math"]

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("runs", nargs="+", metavar="NAME=DIR", help="a run's name and its evaluation folder")
args = p.parse_args()


def load(path):
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


rows = []
for spec in args.runs:
    if "=" not in spec:
        sys.exit(f"error: {spec!r}: expected NAME=DIR")
    name, d = spec.split("=", 1)
    rows.append((name, load(os.path.join(d, "mmvet", "scores.json")), load(os.path.join(d, "halbench", "scores.json"))))
caps = [c for c in CAPABILITIES if any(c in mm for _, mm, _ in rows)]  # the capabilities the benchmark has
fmt = lambda scores, k: f"{scores[k]:.1f}" if k in scores else "-"
print("| Model | MM-Vet | " + " | ".join(c.upper() if c == "ocr" else c.capitalize() for c in caps)
      + " | Resp ↓ | Obj ↓ | Recall |")
print("|---" * (len(caps) + 5) + "|")
for name, mm, hal in rows:
    print(f"| {name} | {fmt(mm, 'total')} | " + " | ".join(fmt(mm, c) for c in caps)
          + f" | {fmt(hal, 'chair_s')} | {fmt(hal, 'chair_i')} | {fmt(hal, 'recall')} |")
