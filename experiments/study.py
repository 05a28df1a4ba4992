"""The paper's claims in miniature, judged by rules fixed in advance (experiments/rules.py): one resumable run of
the toy-world study (`make study`).

Two worlds from the same images: `prior` (the demo's: the text corpus pairs a trigger with its partner 94% of
the time, the images 63%) and `control` (text 63% too: no excess language prior). Per world and seed: negatives
from the weakened image (t=--noise_step), the clean image (prior world) and rule injection, over every turn of
the training conversations (captions and short QA, as the paper's mix); the items whose weakened and
clean negatives are both usable are shared by every arm of the seed. Arms train --max_steps steps each
(equal optimizer steps), checkpoints every rules.CURVE_STEPS[0] steps (the matched-recall curves).

Hyperparameters come from the dev split (toy/dev/: images no test set uses): every method in METHODS trains
at each of rules.DEV_LRS on seed 0, is scored on dev at rules.DEV_STEPS, and rules.select picks its learning
rate and step; the ablation arms (one kind of negative) use BPO's, the control world the prior world's. Then
seeds 1.. of the selected settings, and every model on the test sets: toy HalBench, POPE, the 240-question
MM-Vet, LLaVA-Bench-style, and HalBench/POPE on clear-glyph images.

    python experiments/study.py [--toy toy] [--control_toy toy_control] [--runs runs/study] [--results results]

Every step is skipped when its output exists, so a rerun resumes; up to --jobs steps run at once, one CPU
thread each. report.py then writes results/STUDY.md and the files beside it."""
import argparse
import json
import os
import random
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, ROOT]
import cpu_pins  # noqa: E402
import rules  # noqa: E402
from toyworld import World  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--toy", default="toy", help="the prior world (built by 00 if missing; make demo's)")
p.add_argument("--control_toy", default="toy_control", help="the control world (00 --p_partner_text 0.63)")
p.add_argument("--world_seed", type=int, default=0)
p.add_argument("--runs", default="runs/study", help="every intermediate output")
p.add_argument("--results", default="results", help="STUDY.md, the plots, the per-seed rows")
p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of negatives and training")
p.add_argument("--jobs", type=int, default=2, help="steps run at once (one thread each)")
p.add_argument("--pairs", type=int, default=500, help="items (chosen answers) per seed, every turn")
p.add_argument("--noise_step", type=int, default=700,
               help="weakening of the image-weakened negatives (fixed before this study, see STUDY.md)")
p.add_argument("--train", default="--batch_size 16 --lora_r 16 --lora_alpha 32 --epochs 50",
               help="03 flags shared by every run (--max_steps rules.TRAIN_STEPS ends each run)")
p.add_argument("--probe_steps", type=int, nargs="+", default=[0, 400, 600, 700, 800, 999])
p.add_argument("--skip_report", action="store_true")
p.add_argument("--smoke", action="store_true", help="a few steps per run, for a test of the plumbing on a --quick world")
args = p.parse_args()
if args.smoke:
    rules.smoke()

PY = sys.executable
RUNS = args.runs
# every step on the same float code paths and threads, on any x86-64 CPU (cpu_pins.py; make study exports them too)
ENV = dict(os.environ, **cpu_pins.PINS, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
           TQDM_DISABLE="1")
os.makedirs(os.path.join(RUNS, "logs"), exist_ok=True)
WORLDS = {"prior": args.toy, "control": args.control_toy}
# trained methods searched on dev; each trains on the weakened + injected pairs
METHODS = {"sft": ["--loss", "sft"], "bpo": [],
           "bpo_cond": ["--conditional_weight", 1, "--noise_step", args.noise_step], "bpo_anchor": ["--anchor_weight", 1],
           "ipo": ["--loss", "ipo"], "bpo_lnorm": ["--length_normalize"]}
# BPO on one kind of negative; bpo_released: negatives from the authors' released sampler (rules.RELEASED_FLAGS)
ABLATIONS = {"bpo_weak": ["weak"], "bpo_inj": ["inj"], "bpo_clean": ["clean"], "bpo_released": ["released"]}
# Fig. 8: SFT and BPO on the first N shared items (the largest size is the main arms': not trained twice)
SIZE_ARMS = {f"{m}_n{n}": (m, n) for n in rules.FIG8_SIZES for m in ("sft", "bpo")}
CONTROL_ARMS = ["sft", "bpo"]
TEST_SETS = ["hal", "mmvet", "pope", "llava", "clear_hal", "clear_pope"]
FULL_POPE = ["sft", "bpo"]  # and the base model: POPE's three splits and the clear-glyph sets


# ----------------------------------------------------------------------------- the jobs: a small DAG


class Job:
    def __init__(self, name, out, cmd=None, fn=None, deps=(), threads=1):
        self.name, self.out, self.cmd, self.fn, self.deps, self.threads = name, out, cmd, fn, list(deps), threads

    def done(self):
        return os.path.exists(self.out)


jobs = {}


def job(name, out, cmd=None, fn=None, deps=(), threads=1):
    """cmd: a list, or a function returning one when the job starts (settings chosen by earlier jobs)."""
    jobs[name] = Job(name, out, cmd, fn, deps, threads)
    return name


def script(name, *a):
    return [PY, os.path.join(ROOT, name), *map(str, a)]


def sh(cmd, marker):
    """cmd, then touch marker: for appending scripts whose output exists before they finish."""
    return ["bash", "-c", " ".join(map(str, cmd)) + f" && touch {marker}"]


def selection_path(method):
    return os.path.join(RUNS, "selection", f"{method}.json")


def method_of(arm):
    """The dev-searched method whose selection an arm uses: its own, its size arm's method, else BPO's."""
    return arm if arm in METHODS else SIZE_ARMS[arm][0] if arm in SIZE_ARMS else "bpo"


def selected(method):
    with open(selection_path(method_of(method))) as f:
        return json.load(f)["chosen"]


def run_dir(world, arm, seed, lr=None):
    """Where a training run lives. Seed 0 of a searched method in the prior world is its dev run at the
    chosen learning rate (the same run, not a new one); lr given: that dev run."""
    if world == "prior" and arm in METHODS and seed == 0:
        lr = lr if lr is not None else selected(arm)["lr"]
        return os.path.join(RUNS, world, "s0", f"{arm}_lr{lr:g}")
    return os.path.join(RUNS, world, f"s{seed}", arm)


def adapter_at(out, step):
    return os.path.join(out, "adapter") if step == rules.TRAIN_STEPS else os.path.join(out, f"checkpoint-{step}", "adapter")


def eval_dir(world, name, step, key):
    return os.path.join(RUNS, world, "eval", name, f"step{step}" if isinstance(step, int) else step, key)


def eval_command(world, name, step, key, adapter):
    """The argv of one evaluation (04-07) of a model on one set into RUNS/WORLD/eval/NAME/stepN/SET."""
    toy = WORLDS[world]
    images = os.path.join(toy, "images")
    a = ["--model", os.path.join(toy, "model"), *(["--adapter", adapter] if adapter else []),
         "--out_dir", eval_dir(world, name, step, "pope" if key == "pope_adv" else key)]
    sub = {"hal": "", "clear_hal": "clear", "dev_hal": "dev"}
    if key in sub:
        f = os.path.join(toy, sub[key])
        return script("05_eval_halbench.py", *a, "--questions", os.path.join(f, "halbench.jsonl"),
                      "--image_dir", images, "--objects", os.path.join(f, "halbench_objects.json"),
                      "--synonyms", os.path.join(toy, "synonyms.txt"), "--max_new_tokens", 72,
                      "--num_beams", 1, "--batch_size", 32)[1:]
    if key in ("mmvet", "dev_mmvet"):
        q = os.path.join(toy, "mmvet_study.json" if key == "mmvet" else os.path.join("dev", "mmvet.json"))
        return script("04_eval_mmvet.py", *a, "--mmvet_json", q, "--image_dir", images, "--judge", "exact",
                      "--max_new_tokens", 16, "--batch_size", 32)[1:]
    if key in ("pope", "pope_adv", "clear_pope"):
        f = os.path.join(toy, "pope" if key != "clear_pope" else os.path.join("clear", "pope"))
        splits = ["random", "popular", "adversarial"] if key == "pope" else ["adversarial"]
        return script("07_eval_pope.py", *a, "--questions", *[os.path.join(f, f"coco_pope_{s}.json") for s in splits],
                      "--image_dir", images, "--prompt_suffix", "", "--max_new_tokens", 20, "--batch_size", 64)[1:]
    lb = os.path.join(toy, "llavabench")
    return script("06_eval_llavabench.py", *a, "--questions", os.path.join(lb, "questions.jsonl"),
                  "--context", os.path.join(lb, "context.jsonl"), "--references", os.path.join(lb, "answers_gpt4.jsonl"),
                  "--rule", os.path.join(lb, "rule.json"), "--image_dir", os.path.join(lb, "images"),
                  "--judge", "overlap", "--max_new_tokens", 72, "--batch_size", 32)[1:]


def eval_job(world, name, tag, plan, deps):
    """One process evaluating one trained run (experiments/evaluate.py): plan() -> [(step, set, adapter)] when the
    job starts (the chosen step is known by then); step "selected" names the folder of the chosen checkpoint."""
    d = os.path.join(RUNS, world, "eval", name)
    marker = os.path.join(d, f"{tag}.done")

    def cmd():
        os.makedirs(d, exist_ok=True)
        cmds = [eval_command(world, name, step, key, adapter) for step, key, adapter in plan()]
        with open(os.path.join(d, f"{tag}.json"), "w") as f:
            json.dump(cmds, f, indent=1)
        return script("experiments/evaluate.py", "--commands", os.path.join(d, f"{tag}.json"), "--marker", marker)
    return job(f"eval:{world}:{name}:{tag}", marker, cmd, deps=deps)


# ---- the worlds, the Fig. 5 probe (on dev images), the base models
world_jobs = {}
for world, toy in WORLDS.items():  # the control after the prior world: its prior_check.json records the prior's excess
    extra = ["--p_partner_text", 0.63, "--compare_with", args.toy] if world == "control" else []
    world_jobs[world] = job(f"world:{world}", os.path.join(toy, "prior_check.json"),
                            script("00_make_toy.py", "--out", toy, "--seed", args.world_seed, *extra),
                            deps=[world_jobs["prior"]] if world == "control" else [], threads=args.jobs)
    base_sets = TEST_SETS + (["dev_hal", "dev_mmvet"] if world == "prior" else [])
    eval_job(world, "base", "all", lambda sets=base_sets: [(0, k, None) for k in sets], [world_jobs[world]])
job("noise_probe", os.path.join(RUNS, "noise_probe.json"),
    script("experiments/noise_probe.py", "--toy", args.toy, "--questions", "dev/halbench.jsonl",
           "--out", os.path.join(RUNS, "noise_probe.json"), "--steps", *args.probe_steps), deps=[world_jobs["prior"]])


def select_pairs(world, seed, kinds):
    """The shared items of a seed: every kind's negative present; a caption's weakened and clean negatives
    must parse as captions of the world's grammar (a QA negative only has to differ from the answer, which 01
    and 02 ensure). Writes KIND.jsonl per kind, restricted to the same --pairs ids, KIND_nN.jsonl of the first
    N of them (Fig. 8), and select.json. The released sampler's negatives do not restrict the shared items
    (its arm trains on those of them it has: near-greedy samples often equal the answer, and 01 drops those)."""
    d = os.path.join(RUNS, world, f"s{seed}", "pairs")
    w = World(os.path.join(WORLDS[world], "world.json"))
    raw = {k: [json.loads(line) for line in open(os.path.join(d, f"raw_{k}.jsonl"))] for k in kinds}
    by_id = {k: {r["id"]: r for r in v} for k, v in raw.items()}
    caption_item = lambda r: r["prompt"].strip() in w.describe_prompts
    shared = [k for k in kinds if k != "released"]
    ok = [i for i in by_id["weak"] if all(i in by_id[k] for k in shared)
          and all(w.well_formed(by_id[k][i]["rejected"]) for k in shared if k != "inj" and caption_item(by_id[k][i]))]
    ok.sort()
    random.Random(seed).shuffle(ok)
    if len(ok) < args.pairs:
        print(f"warning: {world} seed {seed}: only {len(ok)} items with usable negatives of every kind", file=sys.stderr)
    ids = ok[:args.pairs]
    for k in kinds:
        for suffix, subset in [("", ids)] + [(f"_n{n}", ids[:n]) for n in rules.FIG8_SIZES]:
            with open(os.path.join(d, f"{k}{suffix}.jsonl"), "w") as f:
                f.writelines(json.dumps(by_id[k][i]) + "\n" for i in subset if i in by_id[k])
    stats = {}
    for k, rows in raw.items():
        caps = [r for r in rows if caption_item(r)]
        truths = [w.mentioned(r["chosen"]) for r in caps]
        stats[k] = {**w.stats([r["rejected"] for r in caps], truths), "n_items": len(rows), "captions": len(caps)}
    with open(os.path.join(d, "select.json"), "w") as f:
        json.dump({"n_items": len(ids), "n_captions": sum(caption_item(by_id["weak"][i]) for i in ids),
                   "n_items_of": {k: sum(i in by_id[k] for i in ids) for k in kinds},
                   "usable_share": len(ok) / max(1, len(by_id["weak"])), "stats": stats}, f, indent=1)


def negatives(world, seed):
    toy = WORLDS[world]
    d = os.path.join(RUNS, world, f"s{seed}", "pairs")
    data = ["--data", f"toy={os.path.join(toy, 'train.json')}", "--samples_per_source", int(args.pairs * 1.5),
            "--turns", "all", "--seed", seed]
    gen = ["--model", os.path.join(toy, "model"), "--image_root", os.path.join(toy, "images"), "--max_new_tokens", 72,
           "--batch_size", 32, *data]
    kinds = ["weak", "inj"] + (["clean", "released"] if world == "prior" else [])
    sampling = {"weak": ["--noise_step", args.noise_step], "clean": ["--noise_step", 0], "released": rules.RELEASED_FLAGS}
    deps = []
    for k in kinds:
        out = os.path.join(d, f"raw_{k}.jsonl")
        cmd = (script("02_inject_errors.py", "--backend", "rules", "--vocab", os.path.join(toy, "world.json"), *data,
                      "--out", out) if k == "inj" else script("01_build_pairs.py", *gen, "--out", out, *sampling[k]))
        deps.append(job(f"pairs:{world}:{k}:s{seed}", out + ".done", sh(cmd, out + ".done"), deps=[world_jobs[world]]))
    return job(f"select:{world}:s{seed}", os.path.join(d, "select.json"),
               fn=lambda: select_pairs(world, seed, kinds), deps=deps)


def train_job(world, arm, seed, flags, kinds, deps, lr=None):
    """One run of 03 (lr None: the selected one, read when the job starts)."""
    pd = os.path.join(RUNS, world, f"s{seed}", "pairs")
    data = [x for k in kinds for x in ("--data", os.path.join(pd, f"{k}.jsonl"))]
    toy = WORLDS[world]
    tag = f"{arm}_lr{lr:g}" if lr is not None else arm

    def cmd():
        chosen = lr if lr is not None else selected(arm)["lr"]
        out = run_dir(world, arm, seed, lr)
        return script("03_train_bpo.py", "--model", os.path.join(toy, "model"), *data, "--image_root",
                      os.path.join(toy, "images"), "--output_dir", out, "--overwrite", *args.train.split(),
                      "--max_steps", rules.TRAIN_STEPS, "--save_every", rules.CURVE_STEPS[0],
                      "--keep_checkpoints", rules.TRAIN_STEPS // rules.CURVE_STEPS[0], "--lr", chosen, "--seed", seed, *flags)
    # the finished run's marker, at a path known before the learning rate is
    marker = os.path.join(RUNS, world, f"s{seed}", "done", f"{tag}.done")
    os.makedirs(os.path.dirname(marker), exist_ok=True)
    return job(f"train:{world}:{tag}:s{seed}", marker, lambda: sh(cmd(), marker), deps=deps)


def select_method(method):
    """rules.select over the method's dev candidates -> RUNS/selection/METHOD.json."""
    def read(world, name, step, key):
        with open(os.path.join(eval_dir(world, name, step, key), "scores.json")) as f:
            return json.load(f)
    base_mm = read("prior", "base", 0, "dev_mmvet")["total"]
    cands = []
    for lr in rules.DEV_LRS:
        for step in rules.DEV_STEPS:
            hal = read("prior", f"{method}_lr{lr:g}/s0", step, "dev_hal")
            cands.append({"lr": lr, "step": step, "obj": hal["chair_i"], "recall": hal["recall"],
                          "resp": hal["chair_s_refine"],
                          "mmvet": read("prior", f"{method}_lr{lr:g}/s0", step, "dev_mmvet")["total"]})
    for c in cands:
        c["object_f1"] = rules.object_f1(c["obj"], c["recall"])
    chosen = rules.select(cands, base_mm)
    os.makedirs(os.path.dirname(selection_path(method)), exist_ok=True)
    with open(selection_path(method), "w") as f:
        json.dump({"method": method, "base_dev_mmvet": base_mm, "candidates": cands, "chosen": chosen}, f, indent=1)


# ---- per world and seed: negatives; dev search (prior world, seed 0); the selected runs; evaluations
base_dev = ["eval:prior:base:all"]
sel_jobs = {}
for world in WORLDS:
    for seed in args.seeds:
        sel = negatives(world, seed)
        arms = list(METHODS) + list(ABLATIONS) + list(SIZE_ARMS) if world == "prior" else CONTROL_ARMS
        for arm in arms:
            flags = METHODS.get(method_of(arm), []) if arm not in ABLATIONS else []
            kinds = ABLATIONS.get(arm, [f"weak_n{SIZE_ARMS[arm][1]}", f"inj_n{SIZE_ARMS[arm][1]}"] if arm in SIZE_ARMS
                                  else ["weak", "inj"])
            if world == "prior" and arm in METHODS and seed == 0:  # the dev search
                dev_evals = []
                for lr in rules.DEV_LRS:
                    t = train_job(world, arm, seed, flags, kinds, [sel], lr)
                    out = run_dir(world, arm, seed, lr)
                    dev_evals.append(eval_job(world, f"{arm}_lr{lr:g}/s0", "dev",
                                              lambda o=out: [(st, k, adapter_at(o, st)) for st in rules.DEV_STEPS
                                                             for k in ("dev_hal", "dev_mmvet")], [t]))
                sel_jobs[arm] = job(f"select:{arm}", selection_path(arm), fn=lambda a=arm: select_method(a),
                                    deps=dev_evals + base_dev)
                trained = sel_jobs[arm]
            else:
                need = sel_jobs.get(method_of(arm))
                trained = train_job(world, arm, seed, flags, kinds, [sel, need] if need else [sel])
            curve = world == "prior" and arm in METHODS
            # every arm: HalBench, MM-Vet, POPE adversarial; base, SFT and BPO all POPE splits and the clear-glyph
            # sets; the trained methods of the prior world LLaVA-Bench too
            sets = ["hal", "mmvet"] + ([] if arm in SIZE_ARMS else ["pope" if arm in FULL_POPE else "pope_adv"])
            sets += ["clear_hal", "clear_pope"] if arm in FULL_POPE else []
            sets += ["llava"] if world == "prior" and arm in METHODS else []

            def plan(a=arm, s=seed, w=world, curve=curve, sets=sets):
                out, chosen = run_dir(w, a, s), selected(a)["step"]
                # HalBench at every checkpoint: the matched-recall curve (the chosen step is one of them)
                todo = [(st, "hal", adapter_at(out, st)) for st in rules.CURVE_STEPS] if curve else []
                return todo + [("selected", k, adapter_at(out, chosen)) for k in sets if not (curve and k == "hal")]
            eval_job(world, f"{arm}/s{seed}", "test", plan, [trained])


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
        blocked = [j for j in pending if any(d in failed for d in j.deps)]
        for j in blocked:
            pending.remove(j)
            failed.append(j.name)
            print(f"skipped {j.name}: a step it needs failed")
        ready = [j for j in pending if all(jobs[d].done() for d in j.deps)]
        for j in ready:
            if j.fn is not None:  # cheap in-process steps
                pending.remove(j)
                j.fn()
                print(f"[{time.time() - t_start:6.0f} s]       ok {j.name}", flush=True)
            elif sum(jobs[n].threads for n in running) + j.threads > args.jobs:
                if j.threads > 1:
                    break  # a job of several threads (a world build) waits for free cores, not behind later jobs
            else:
                pending.remove(j)
                log = open(os.path.join(RUNS, "logs", j.name.replace(":", "_").replace("/", "_") + ".log"), "w")
                cmd = j.cmd() if callable(j.cmd) else j.cmd
                os.makedirs(os.path.dirname(os.path.abspath(j.out)), exist_ok=True)
                running[j.name] = (subprocess.Popen(cmd, cwd=ROOT, env=dict(ENV, OMP_NUM_THREADS=str(j.threads)),
                                                    stdout=log, stderr=subprocess.STDOUT), time.time(), log)
        time.sleep(0.5)
    elapsed = time.time() - t_start
    with open(os.path.join(RUNS, "timings.jsonl"), "a") as f:
        f.write(json.dumps({"elapsed_s": elapsed, "steps": timings, "failed": failed}) + "\n")
    print(f"study steps done in {elapsed / 60:.1f} min; failed: {failed or 'none'} (logs in {RUNS}/logs)")
    return failed


failed = run_all()
checks = {}
for world, toy in WORLDS.items():  # a world whose base model is too weak to judge the method on: said loudly
    check = os.path.join(toy, "prior_check.json")
    checks[world] = json.load(open(check)) if os.path.exists(check) else None
    floors = (checks[world] or {}).get("checks", {}).get("floors", {})
    if not all(floors.values()):
        print(f"WARNING: the {world} world ({toy}) fails {sum(not ok for ok in floors.values())} floor(s): "
              f"{'; '.join(n for n, ok in floors.items() if not ok)}; read every verdict with that in mind")
if all(checks.values()):
    (prior, control, _), holds = rules.prior_excess(checks["prior"], checks["control"])
    if not holds:
        print(f"WARNING: the prior world's base names the absent partner in {prior:.1f}% of its chances on the partner "
              f"probe, the control's in {control:.1f}%: no prior-driven error in the base (rules.prior_excess), the mechanism verdict is "
              "inconclusive")
if not args.skip_report:
    r = subprocess.run([PY, os.path.join(HERE, "report.py"), "--toy", args.toy, "--control_toy", args.control_toy,
                        "--runs", RUNS, "--results", args.results, "--seeds", *map(str, args.seeds),
                        "--pairs", str(args.pairs), "--noise_step", str(args.noise_step), "--train", args.train,
                        *(["--smoke"] if args.smoke else [])],
                       cwd=ROOT, env=ENV)
    if r.returncode:
        sys.exit("error: report failed")
sys.exit(1 if failed else 0)
