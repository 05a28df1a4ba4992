"""Runs several evaluation commands of 04-07 in one Python process (the imports of torch and transformers
cost ~8 s a process; the study's many small evaluations and make demo's twelve pay them once): each command
is the script's own argv, run as `python SCRIPT ARGS...` would run it (its main(argv)), in the order given;
the first that fails stops the run with its exit status.

    python experiments/evaluate.py --command "04_eval_mmvet.py --model toy/model ..." [--command ...]
    python experiments/evaluate.py --commands cmds.json --marker DONE     (the study's resumable batches)

With --marker, a command whose --out_dir already holds scores.json is skipped (a rerun of the batch resumes:
the study retrains nothing under a finished marker), and the marker is written when every command has finished.
Without it every command runs; the scripts themselves reuse cached answers and refuse stale ones.
"""
import argparse
import importlib.util
import json
import os
import shlex
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def script_main(path, loaded={}):
    """The main(argv) of a script file (every numbered script imports without side effects), loaded once."""
    path = os.path.abspath(path)
    if path not in loaded:
        spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
        loaded[path] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loaded[path])
    return loaded[path].main


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--commands", help="JSON file: a list of argv lists [script path, args...]")
    p.add_argument("--command", action="append", default=[], help="one command as a shell line: SCRIPT ARGS... "
                                                                  "(repeatable)")
    p.add_argument("--marker", help="skip commands whose --out_dir holds scores.json; write this file when all have "
                                    "finished")
    args = p.parse_args(argv)
    commands = [shlex.split(c) for c in args.command]
    if args.commands:
        with open(args.commands) as f:
            commands += json.load(f)
    if not commands:
        p.error("give --command or --commands")
    for argv in commands:
        out_dir = argv[argv.index("--out_dir") + 1] if "--out_dir" in argv else None
        if args.marker and out_dir and os.path.exists(os.path.join(out_dir, "scores.json")):
            continue
        t0 = time.time()
        print(f"$ {' '.join(argv)}", flush=True)
        try:
            script_main(argv[0])(argv[1:])
        except SystemExit as e:
            if e.code not in (None, 0):
                sys.exit(e.code if isinstance(e.code, str) else
                         f"error: {os.path.basename(argv[0])} exited with {e.code} ({out_dir})")
        print(f"  done in {time.time() - t0:.0f} s", flush=True)
    if args.marker:
        with open(args.marker, "w") as f:
            f.write(json.dumps({"commands": len(commands)}) + "\n")


if __name__ == "__main__":
    main()
