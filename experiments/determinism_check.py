"""Does a seed build one toy world whatever the CPU's float code paths? Builds the world of one seed under each
setting below, one build at a time, and compares the sha256 of the weights (model/model.safetensors), of the prior
check the weights give (prior_check.json) and of every other file the build writes (the data).

A setting is an environment for 00_make_toy.py: the kernel dispatch torch would use on another CPU
(ATEN_CPU_CAPABILITY default / avx2 / avx512), the threads a machine offers (OMP_NUM_THREADS 1 / 2: 00 runs torch
on 2 threads whatever it says), MKL's and oneDNN's code paths. pin:... runs 00 as a script, which sets
cpu_pins.PINS over whatever the environment says; free:... runs its main() from an import, which cannot pin (the
control: it shows which settings would change the world). The check passes when every pinned build, and free:pins
(the pins set by hand), have the same three hashes.

    python experiments/determinism_check.py [--out scratch/determinism] [--seed 0] [--full] [--settings NAME ...]

Prints a markdown table (setting, hashes, seconds) and writes it with the hashes to OUT/determinism.json; exits 1
when the pinned builds differ."""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import cpu_pins  # noqa: E402

# name -> (environment over the caller's, pinned); the caller's own OMP_NUM_THREADS and pins are dropped first.
# pin:DISPATCH:THREADS = 00 as a script under that kernel dispatch and thread count; free:WHAT = 00 unpinned
SETTINGS = {
    **{f"pin:{cap or 'unset'}:{t}t": ({"OMP_NUM_THREADS": str(t), **({"ATEN_CPU_CAPABILITY": cap} if cap else {})},
                                      True) for cap in (None, "default", "avx2", "avx512") for t in (2, 1)},
    "pin:mkl-auto:onednn-all": ({"MKL_CBWR": "AUTO", "ONEDNN_MAX_CPU_ISA": "ALL"}, True),
    "free:own": ({}, False),  # this CPU's own paths (here: torch AVX-512, MKL's AUTO branch, oneDNN AVX-512)
    "free:avx2": ({"ATEN_CPU_CAPABILITY": "avx2"}, False),
    "free:default": ({"ATEN_CPU_CAPABILITY": "default"}, False),
    "free:mkl-compatible": ({"MKL_CBWR": "COMPATIBLE"}, False),
    "free:onednn-avx2": ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, False),
    "free:pins": (dict(cpu_pins.PINS), False),  # the pins by hand: must give the pinned world
}
CLEARED = ["OMP_NUM_THREADS", "MKL_NUM_THREADS", *cpu_pins.PINS]
# 00's main() from an import: the module's top does not pin (it is not __main__)
UNPINNED = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('toy', '00_make_toy.py'); "
            "toy = importlib.util.module_from_spec(spec); spec.loader.exec_module(toy); toy.main(sys.argv[1:])")


def hashes(out):
    """(weights, prior check, data): the sha256 (12 hex digits) of model/model.safetensors, of prior_check.json (what
    the weights do), and of every other file with its path (what the seed's random streams drew)."""
    own = {"weights": os.path.join("model", "model.safetensors"), "prior check": "prior_check.json"}
    digest = {}
    for key, path in own.items():
        with open(os.path.join(out, path), "rb") as f:
            digest[key] = hashlib.sha256(f.read()).hexdigest()[:12]
    data = hashlib.sha256()
    for path in sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs):
        if path not in own.values():
            with open(os.path.join(out, path), "rb") as f:
                data.update(path.encode() + b"\0" + f.read())
    return {**digest, "data": data.hexdigest()[:12]}


def build(name, out, seed, full):
    env_over, pinned = SETTINGS[name]
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    env.update(env_over, TQDM_DISABLE="1")
    argv = ["--out", out, "--seed", str(seed), *([] if full else ["--quick"])]
    cmd = [sys.executable, "00_make_toy.py", *argv] if pinned else [sys.executable, "-c", UNPINNED, *argv]
    shutil.rmtree(out, ignore_errors=True)  # a world of another size there would add its files to the data hash
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"error: the build under {name!r} failed:\n{proc.stderr[-2000:]}")
    seconds = time.time() - t0
    kernels = next(line for line in proc.stdout.splitlines() if line.startswith("world hash")).split("(", 1)[1][:-1]
    return {"setting": name, "pinned": pinned, "env": env_over, "seconds": round(seconds, 1), "paths": kernels,
            **hashes(out)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="scratch/determinism", help="one world folder per setting, and determinism.json")
    p.add_argument("--seed", type=int, default=0, help="the world's seed")
    p.add_argument("--full", action="store_true", help="full builds (~3.5 min each on 2 cores) instead of --quick")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), metavar="NAME",
                   help="the settings to build, by name (default: all of them: " + "; ".join(SETTINGS) + ")")
    args = p.parse_args(argv)
    unknown = [s for s in args.settings if s not in SETTINGS]
    if unknown:
        sys.exit(f"error: unknown setting(s) {unknown}; known: {list(SETTINGS)}")
    out = os.path.abspath(args.out)
    rows = []
    for i, name in enumerate(args.settings):
        rows.append(build(name, os.path.join(out, f"world{i}"), args.seed, args.full))
        r = rows[-1]
        print(f"{name}: weights {r['weights']} prior check {r['prior check']} data {r['data']} ({r['seconds']} s; "
              f"{r['paths']})", flush=True)
    ref = [r for r in rows if r["pinned"] or r["env"] == cpu_pins.PINS]
    same = len({(r["weights"], r["prior check"], r["data"]) for r in ref}) <= 1
    table = ["| setting | weights | prior check | data | seconds |", "|---|---|---|---|---|"]
    table += [f"| {r['setting']} | {r['weights']} | {r['prior check']} | {r['data']} | {r['seconds']} |" for r in rows]
    print("\n".join(table))
    print(f"pinned builds: {'one world' if same else 'DIFFERENT worlds'} ({len(ref)} builds, seed {args.seed}, "
          f"{'full' if args.full else 'quick'})")
    with open(os.path.join(out, "determinism.json"), "w") as f:
        json.dump({"seed": args.seed, "full": args.full, "same": same, "rows": rows}, f, indent=1)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
