"""Runs several evaluation commands of 04-07 in one Python process (the study's many small evaluations pay
the imports once instead of once a set): each command is the script's own argv, run with runpy as
`python SCRIPT ARGS...` would run it. A command whose --out_dir already holds scores.json is skipped, so a
rerun resumes; the marker file is written when every command has finished.

    python experiments/evaluate.py --commands cmds.json --marker DONE
"""
import argparse
import json
import os
import runpy
import sys
import time
from unittest import mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--commands", required=True, help="JSON list of argv lists: [script path, args...]")
p.add_argument("--marker", required=True, help="written when every command has finished")
args = p.parse_args()

with open(args.commands) as f:
    commands = json.load(f)
for argv in commands:
    out_dir = argv[argv.index("--out_dir") + 1]
    if os.path.exists(os.path.join(out_dir, "scores.json")):
        continue
    t0 = time.time()
    print(f"$ {' '.join(argv)}", flush=True)
    with mock.patch.object(sys, "argv", argv):
        try:
            runpy.run_path(argv[0], run_name="__main__")
        except SystemExit as e:
            if e.code not in (None, 0):
                sys.exit(f"error: {os.path.basename(argv[0])} exited with {e.code} ({out_dir})")
    print(f"  done in {time.time() - t0:.0f} s", flush=True)
with open(args.marker, "w") as f:
    f.write(json.dumps({"commands": len(commands)}) + "\n")
