"""The paper's claims in miniature: one resumable run of the toy-world study (`make study`).

Builds the toy world (00), probes the prior under weakening (noise_probe.py, Fig. 5), then for each
seed bootstraps negatives (01 on weakened and on clean images, 02 with rules), trains BPO variants
and the SFT baseline (03), evaluates every model (04, 05) and writes results/STUDY.md with plots
(report.py). Every step is skipped when its output exists, so a rerun resumes; up to --jobs
steps run at once, one CPU thread each.

    python experiments/study.py [--toy toy] [--runs runs/study] [--results results] [--seeds 0 1 2] [--jobs 2]

Per seed s, all conditions share the same chosen answers: --pairs items of the training data whose
weakened and clean-image negatives both parse as well-formed captions; their rule-injected
negatives are drawn for the same items."""
import argparse
import json
import os
import random
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from toyworld import World  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--toy", default="toy", help="toy world folder (built by 00 if missing)")
p.add_argument("--world_seed", type=int, default=0)
p.add_argument("--runs", default="runs/study", help="every intermediate output")
p.add_argument("--results", default="results", help="STUDY.md and the plots")
p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of negatives and training")
p.add_argument("--jobs", type=int, default=2, help="steps run at once (one thread each)")
p.add_argument("--pairs", type=int, default=400, help="items (chosen answers) per seed")
p.add_argument("--noise_step", type=int, default=700, help="weakening of the image-weakened negatives")
p.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5], help="data sizes of Fig. 8 (besides 1)")
p.add_argument("--train", default="--epochs 2 --batch_size 16 --lora_r 16 --lora_alpha 32 --save_every 0",
               help="03 flags shared by every run")
p.add_argument("--bpo_lr", type=float, default=1e-4, help="03 --lr of the DPO runs (chosen in a pilot: see README)")
p.add_argument("--sft_lr", type=float, default=1e-3, help="03 --lr of the SFT runs (the demo's)")
p.add_argument("--nll_weight", type=float, default=0.0,
               help="also train DPO + this weight x NLL of the chosen (03 --sft_weight); 0: skip (pilot: ~SFT, see README)")
p.add_argument("--probe_steps", type=int, nargs="+", default=[0, 400, 600, 700, 800, 999])
p.add_argument("--skip_report", action="store_true")
args = p.parse_args()

PY = sys.executable
TOY, RUNS = args.toy, args.runs
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
os.makedirs(os.path.join(RUNS, "logs"), exist_ok=True)


# ----------------------------------------------------------------------------- the jobs: a small DAG


class Job:
    def __init__(self, name, out, cmd=None, fn=None, deps=(), threads=1):
        self.name, self.out, self.cmd, self.fn, self.deps, self.threads = name, out, cmd, fn, list(deps), threads

    def done(self):
        return os.path.exists(self.out)


jobs = {}


def job(name, out, cmd=None, fn=None, deps=(), threads=1):
    jobs[name] = Job(name, out, cmd, fn, deps, threads)
    return name


def script(name, *a):
    return [PY, os.path.join(ROOT, name), *map(str, a)]


# ---- the world and the Fig. 5 probe
world_job = job("world", os.path.join(TOY, "prior_check.json"),
                script("00_make_toy.py", "--out", TOY, "--seed", args.world_seed),
                threads=args.jobs)  # nothing else can run before the world exists
probe_job = job("noise_probe", os.path.join(RUNS, "noise_probe.json"),
                script("experiments/noise_probe.py", "--toy", TOY, "--out", os.path.join(RUNS, "noise_probe.json"),
                       "--steps", *args.probe_steps), deps=[world_job])
MODEL, IMAGES, TRAIN = os.path.join(TOY, "model"), os.path.join(TOY, "images"), os.path.join(TOY, "train.json")


def eval_jobs(name, adapter, deps):
    """04 and 05 of one model into RUNS/eval/NAME/{mmvet,halbench}."""
    d = os.path.join(RUNS, "eval", name)
    ad = ["--adapter", adapter] if adapter else []
    a = job(f"mmvet:{name}", os.path.join(d, "mmvet", "scores.json"),
            script("04_eval_mmvet.py", "--model", MODEL, *ad, "--mmvet_json", os.path.join(TOY, "mmvet.json"),
                   "--image_dir", IMAGES, "--out_dir", os.path.join(d, "mmvet"), "--judge", "exact",
                   "--max_new_tokens", 32, "--batch_size", 32), deps=deps)
    b = job(f"halbench:{name}", os.path.join(d, "halbench", "scores.json"),
            script("05_eval_halbench.py", "--model", MODEL, *ad, "--questions", os.path.join(TOY, "halbench.jsonl"),
                   "--image_dir", IMAGES, "--objects", os.path.join(TOY, "halbench_objects.json"),
                   "--synonyms", os.path.join(TOY, "synonyms.txt"), "--out_dir", os.path.join(d, "halbench"),
                   "--max_new_tokens", 72, "--batch_size", 32), deps=deps)
    return [a, b]


eval_jobs("base", None, [world_job])


def select_pairs(seed):
    """The shared items of a seed: well-formed weakened and clean negatives, rule-injected ones too;
    writes one pairs file per negative kind, restricted to the same --pairs ids, and the data-size
    subsets; stats of every raw negative set go to select.json."""
    d = os.path.join(RUNS, f"s{seed}", "pairs")
    world = World(os.path.join(TOY, "world.json"))
    raw = {k: [json.loads(line) for line in open(os.path.join(d, f"raw_{k}.jsonl"))] for k in ("weak", "clean", "inj")}
    by_id = {k: {r["id"]: r for r in v} for k, v in raw.items()}
    stats = {}
    for k, rows in raw.items():
        truths = [world.mentioned(r["chosen"]) for r in rows]
        s = world.stats([r["rejected"] for r in rows], truths)
        # share of negatives whose only object errors are prior-driven (an absent partner named)
        prior_only = sum(bool(world.mentioned(r["rejected"]) - t) and
                         world.mentioned(r["rejected"]) - t <= world.lures(t) for r, t in zip(rows, truths))
        s["prior_only_errors"] = prior_only / max(1, len(rows))
        stats[k] = s
    ok = [i for i in by_id["weak"] if i in by_id["clean"] and i in by_id["inj"]
          and world.well_formed(by_id["weak"][i]["rejected"]) and world.well_formed(by_id["clean"][i]["rejected"])]
    random.Random(seed).shuffle(ok)
    if len(ok) < args.pairs:
        print(f"warning: seed {seed}: only {len(ok)} items with well-formed negatives of both kinds", file=sys.stderr)
    ids = ok[:args.pairs]
    for k in ("weak", "clean", "inj"):
        with open(os.path.join(d, f"{k}.jsonl"), "w") as f:
            f.writelines(json.dumps(by_id[k][i]) + "\n" for i in ids)
    for frac in args.fractions:
        n = int(round(frac * len(ids)))
        for k in ("weak", "inj"):
            with open(os.path.join(d, f"{k}_n{n}.jsonl"), "w") as f:
                f.writelines(json.dumps(by_id[k][i]) + "\n" for i in ids[:n])
    with open(os.path.join(d, "select.json"), "w") as f:
        json.dump({"n_items": len(ids), "n_raw": {k: len(v) for k, v in raw.items()}, "stats": stats,
                   "usable_share": len(ok) / max(1, len(by_id["weak"]))}, f, indent=1)


# ---- per seed: negatives, training runs, evaluations
n_raw = int(args.pairs * 1.5)  # items sampled; those with a malformed negative are dropped
for seed in args.seeds:
    d = os.path.join(RUNS, f"s{seed}")
    pd = os.path.join(d, "pairs")
    common_01 = ["--model", MODEL, "--data", f"toy={TRAIN}", "--image_root", IMAGES, "--samples_per_source", n_raw,
                 "--max_new_tokens", 72, "--batch_size", 32, "--seed", seed]
    weak = job(f"pairs_weak:{seed}", os.path.join(pd, "raw_weak.jsonl.done"),
               ["bash", "-c", " ".join(map(str, script("01_build_pairs.py", *common_01, "--out", os.path.join(pd, "raw_weak.jsonl"),
                                                       "--noise_step", args.noise_step)))
                + f" && touch {pd}/raw_weak.jsonl.done"], deps=[world_job])
    clean = job(f"pairs_clean:{seed}", os.path.join(pd, "raw_clean.jsonl.done"),
                ["bash", "-c", " ".join(map(str, script("01_build_pairs.py", *common_01, "--out", os.path.join(pd, "raw_clean.jsonl"),
                                                        "--noise_step", 0)))
                 + f" && touch {pd}/raw_clean.jsonl.done"], deps=[world_job])
    inj = job(f"pairs_inj:{seed}", os.path.join(pd, "raw_inj.jsonl.done"),
              ["bash", "-c", " ".join(map(str, script("02_inject_errors.py", "--backend", "rules", "--vocab",
                                                      os.path.join(TOY, "world.json"), "--data", f"toy={TRAIN}",
                                                      "--out", os.path.join(pd, "raw_inj.jsonl"),
                                                      "--samples_per_source", n_raw, "--seed", seed)))
               + f" && touch {pd}/raw_inj.jsonl.done"], deps=[world_job])
    sel = job(f"select:{seed}", os.path.join(pd, "select.json"), fn=lambda s=seed: select_pairs(s), deps=[weak, clean, inj])

    sizes = [int(round(f * args.pairs)) for f in args.fractions]
    P = lambda k: os.path.join(pd, f"{k}.jsonl")
    runs = {  # name: (pairs files, extra 03 flags)
        "bpo_weak": ([P("weak")], []),
        "bpo_inj": ([P("inj")], []),
        "bpo_both": ([P("weak"), P("inj")], []),
        "bpo_clean": ([P("clean")], []),
        "sft_both": ([P("weak"), P("inj")], ["--loss", "sft"]),
    }
    if args.nll_weight:
        runs["bpo_both_nll"] = ([P("weak"), P("inj")], ["--sft_weight", args.nll_weight])
    for n in sizes:
        runs[f"bpo_both_n{n}"] = ([P(f"weak_n{n}"), P(f"inj_n{n}")], [])
        runs[f"sft_both_n{n}"] = ([P(f"weak_n{n}"), P(f"inj_n{n}")], ["--loss", "sft"])
    for name, (files, extra) in runs.items():
        out = os.path.join(d, name)
        data = [x for f in files for x in ("--data", f)]
        t = job(f"train:{name}:{seed}", os.path.join(out, "adapter", "adapter_config.json"),
                script("03_train_bpo.py", "--model", MODEL, *data, "--image_root", IMAGES, "--output_dir", out, "--overwrite",
                       *args.train.split(), "--lr", args.sft_lr if "sft" in extra else args.bpo_lr, "--seed", seed,
                       *extra), deps=[sel])
        eval_jobs(f"s{seed}/{name}", os.path.join(out, "adapter"), [t])


# ----------------------------------------------------------------------------- the scheduler


def run_all():
    t_start = time.time()
    pending = [j for j in jobs.values() if not j.done()]
    print(f"{len(jobs)} steps, {len(jobs) - len(pending)} already done, {len(pending)} to run, {args.jobs} at once")
    running, failed, timings = {}, [], {}
    while pending or running:
        for name, (proc, t0, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                del running[name]
                timings[name] = time.time() - t0
                status = "ok" if proc.returncode == 0 and jobs[name].done() else f"FAILED (rc {proc.returncode})"
                print(f"[{time.time() - t_start:6.0f} s] {status:>8} {name} ({timings[name]:.0f} s)", flush=True)
                if status != "ok":
                    failed.append(name)
        ready = [j for j in pending if all(jobs[d].done() for d in j.deps)]
        blocked = [j for j in pending if any(d in failed for d in j.deps)]
        for j in blocked:
            pending.remove(j)
            failed.append(j.name)
            print(f"skipped {j.name}: a step it needs failed")
        for j in ready:
            if j.fn is not None:  # cheap in-process steps
                pending.remove(j)
                j.fn()
                print(f"[{time.time() - t_start:6.0f} s]       ok {j.name}", flush=True)
            elif len(running) < args.jobs:
                pending.remove(j)
                log = open(os.path.join(RUNS, "logs", j.name.replace(":", "_").replace("/", "_") + ".log"), "w")
                running[j.name] = (subprocess.Popen(j.cmd, cwd=ROOT, env=dict(ENV, OMP_NUM_THREADS=str(j.threads)), stdout=log, stderr=subprocess.STDOUT),
                                   time.time(), log)
        if not ready or len(running) >= args.jobs:
            time.sleep(0.5)
    elapsed = time.time() - t_start
    with open(os.path.join(RUNS, "timings.jsonl"), "a") as f:
        f.write(json.dumps({"elapsed_s": elapsed, "steps": timings, "failed": failed}) + "\n")
    print(f"study steps done in {elapsed / 60:.1f} min; failed: {failed or 'none'} (logs in {RUNS}/logs)")
    return failed


failed = run_all()
if not args.skip_report:
    r = subprocess.run([PY, os.path.join(HERE, "report.py"), "--toy", TOY, "--runs", RUNS, "--results", args.results,
                        "--seeds", *map(str, args.seeds), "--pairs", str(args.pairs), "--noise_step", str(args.noise_step),
                        "--train", f"{args.train} (DPO --lr {args.bpo_lr:g}, SFT --lr {args.sft_lr:g})", "--nll_weight", str(args.nll_weight),
                        "--fractions", *map(str, args.fractions)], cwd=ROOT, env=ENV)
    if r.returncode:
        sys.exit("error: report failed")
sys.exit(1 if failed else 0)
