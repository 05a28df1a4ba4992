"""results/STUDY.md from a finished study (experiments/study.py): every number recomputed from the per-item
outputs of 04-07 (05's details.jsonl, 04's grades, 07's answers, 06's reviews), so that each comparison can
be bootstrapped over seeds and items as experiments/rules.py says; each claim judged by its rule. Writes
beside STUDY.md: study_rows.jsonl (one row per world, arm, seed and checkpoint, with a `seed` field),
dev_selection.json, matched_recall.png, and the verdicts as verdicts.json."""
import argparse
import datetime
import functools
import json
import os
import re
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import rules  # noqa: E402
import scoring  # noqa: E402
from toyworld import World  # noqa: E402

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--toy", default="toy")
p.add_argument("--control_toy", default="toy_control")
p.add_argument("--runs", default="runs/study")
p.add_argument("--results", default="results")
p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
p.add_argument("--pairs", type=int, default=500)
p.add_argument("--noise_step", type=int, default=700)
p.add_argument("--train", default="")
p.add_argument("--smoke", action="store_true")
args = p.parse_args()
if args.smoke:
    rules.smoke()
RUNS, OUT = args.runs, args.results
os.makedirs(OUT, exist_ok=True)
SEEDS = args.seeds
WORLD = World(os.path.join(args.toy, "world.json"))
METHODS = ["sft", "bpo", "bpo_cond", "bpo_anchor", "ipo", "bpo_lnorm"]
ABLATIONS = ["bpo_weak", "bpo_inj", "bpo_clean", "bpo_released"]
SIZE_ARMS = {f"{m}_n{n}": (m, n) for n in rules.FIG8_SIZES for m in ("sft", "bpo")}
LABEL = {"base": "base (LLaVA analogue)", "sft": "SFT (same positives)", "bpo": "BPO (both negatives)",
         "bpo_weak": "BPO (weakened image only)", "bpo_inj": "BPO (injected only)",
         "bpo_clean": "BPO (clean-image samples)", "bpo_released": "BPO (the released sampler's negatives)",
         "say_less": "base, captions cut (say less)", **rules.VARIANTS,
         **{a: f"{'SFT' if m == 'sft' else 'BPO'}, {n} items" for a, (m, n) in SIZE_ARMS.items()}}


def jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@functools.cache
def selection_record(method):
    """The study's dev selection of a method (RUNS/selection/METHOD.json); None while it has not chosen."""
    path = os.path.join(RUNS, "selection", f"{method}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def selected(arm):
    """The dev-chosen {lr, step} of an arm (ablations: BPO's); None while the study has not chosen it."""
    record = selection_record(arm if arm in METHODS else SIZE_ARMS[arm][0] if arm in SIZE_ARMS else "bpo")
    return record and record["chosen"]


def edir(world, arm, seed, step, key):
    name = "base" if arm == "base" else f"{arm}/s{seed}"
    st = f"step{step}" if isinstance(step, int) else step
    return os.path.join(RUNS, world, "eval", name, st, key)


# ----------------------------------------------------------------------------- per-item arrays


def hal_items(d):
    """HalBench per image, sorted by question id: columns of counts (rules' metrics are ratios of sums)."""
    rows = sorted(jsonl(os.path.join(d, "details.jsonl")), key=lambda r: r["question_id"])
    return np.asarray([hal_columns([c for _, c in r["mentions"]], r["ground_truth"]) for r in rows], float)


def hal_columns(mentions, truth):
    """Per response, 05's counts (scoring.COUNTS: mentions, hallucinated mentions, hallucinated?, names an
    object?, objects recalled, objects present, absent partners of present triggers and those named, ...)."""
    return list(scoring.hallucination_counts(mentions, truth, WORLD.lures(truth), WORLD.objects).values())


def hal_rate(name):
    return lambda s: scoring.hallucination_rates(dict(zip(scoring.COUNTS, s)))[name]


HAL = {"resp": hal_rate("chair_s_refine"), "obj": hal_rate("chair_i"), "recall": hal_rate("recall"),
       "partner": hal_rate("partner_rate")}


def mmvet_items(d):
    rows = {r["id"]: r["score"] for r in jsonl(os.path.join(d, "grades.jsonl")) if r.get("run", 0) == 0}
    return np.asarray([[rows[k], 1] for k in sorted(rows)], float)  # score, question


def pope_items(d, split="adversarial"):
    rows = sorted((r for r in jsonl(os.path.join(d, "answers.jsonl")) if r["split"] == split),
                  key=lambda r: r["question_id"])
    # columns: true yes, predicted yes, both, question
    yes = [(r["label"] == "yes", not scoring.pope_says_no(r["answer"])) for r in rows]
    return np.asarray([[t, p, t and p, 1] for t, p in yes], float)


def f1(s):
    """POPE's F1 (07's) from summed pope_items columns."""
    return scoring.pope_scores(tp=s[2], fp=s[1] - s[2], tn=s[3] - s[0] - s[1] + s[2], fn=s[0] - s[2])["f1"]


def llava_items(d):
    rows = {r["question_id"]: r["scores"] for r in jsonl(os.path.join(d, "reviews.jsonl")) if r.get("run", 0) == 0}
    return np.asarray([rows[k] for k in sorted(rows)], float)


SETS = {  # metric -> (eval folder key, statistic of the summed item columns)
    "resp": ("hal", HAL["resp"]), "obj": ("hal", HAL["obj"]), "recall": ("hal", HAL["recall"]),
    "partner": ("hal", HAL["partner"]), "mmvet": ("mmvet", lambda s: 100 * s[0] / s[1]),
    "pope_adv_f1": ("pope", f1), "llavabench": ("llava", lambda s: 100 * s[1] / max(s[0], 1)),
    "clear_partner": ("clear_hal", HAL["partner"]), "clear_recall": ("clear_hal", HAL["recall"]),
    "clear_pope_adv_f1": ("clear_pope", f1),
}
READERS = {"hal": hal_items, "clear_hal": hal_items, "mmvet": mmvet_items, "pope": pope_items,
           "clear_pope": pope_items, "llava": llava_items}
CACHE = {}


def items(world, arm, seed, step, key):
    """Per-item columns of one evaluation; None if it is missing."""
    k = (world, arm, seed if arm != "base" else None, step if arm != "base" else 0, key)
    if k not in CACHE:
        if arm == "say_less":
            CACHE[k] = say_less_items(world, step)
        else:
            if arm != "base" and key == "hal" and arm in METHODS and world == "prior" and step == "selected":
                step = (selected(arm) or {}).get("step")  # HalBench of a curve arm lives at its checkpoints
            if step is None:  # no dev selection yet
                CACHE[k] = None
                return None
            d = edir(world, arm, seed, 0 if arm == "base" else step, key)
            CACHE[k] = READERS[key](d) if os.path.exists(os.path.join(d, "scores.json")) else None
    return CACHE[k]


def stat(metric, cols):
    """The metric from summed (resampled) item columns."""
    return SETS[metric][1](cols.sum(0))


def say_less_items(world, k, arm="base", seed=None):
    """A model's HalBench captions (the base model's, or an arm's at its selected checkpoint) cut to their first k
    object sentences (k = 0: uncut)."""
    d = edir(world, arm, seed, 0 if arm == "base" else selected(arm)["step"], "hal")
    rows = sorted(jsonl(os.path.join(d, "details.jsonl")), key=lambda r: r["question_id"])
    answers = {r["question_id"]: r["answer"] for r in jsonl(os.path.join(d, "answers.jsonl"))}
    cols = []
    for r in rows:  # one object clause a sentence: its mentions are the world reader's, sentence by sentence
        sentences = [x for x in re.split(r"(?<=\.)\s+", answers[r["question_id"]].strip()) if x]
        mentions = [m for x in (sentences[:k] if k else sentences) for m in sorted(WORLD.mentioned(x))]
        cols.append(hal_columns(mentions, r["ground_truth"]))
    return np.asarray(cols, float)


def curve(world, arm, seed):
    """(step, hal columns) along an arm's training, step 0 = the base model; the say-less baseline: k = 1..4, uncut."""
    if arm == "say_less":
        return [(k, items(world, "say_less", None, k, "hal")) for k in (1, 2, 3, 4, 0)]
    pts = [(0, items(world, "base", None, 0, "hal"))]
    pts += [(st, items(world, arm, seed, st, "hal")) for st in rules.CURVE_STEPS]
    pts = [(st, c) for st, c in pts if c is not None]
    if selected(arm) and os.path.exists(os.path.join(edir(world, arm, seed, selected(arm)["step"], "hal"),
                                                     "details.jsonl")):  # below: its own captions cut
        pts += [(f"cut{k}", cut_items(world, arm, seed, k)) for k in rules.CUT_SENTENCES]
    return pts


@functools.lru_cache(maxsize=None)
def cut_items(world, arm, seed, k):
    return say_less_items(world, k, arm, seed)


# ----------------------------------------------------------------------------- metrics and comparisons


def value(world, arm, seed, metric, idx=None):
    """A metric of one model (the selected checkpoint), on items idx (None: all); matched-recall metrics
    are not values of one model."""
    key = SETS[metric][0]
    cols = items(world, arm, seed, "selected", key)
    if cols is None:
        return None
    return stat(metric, cols if idx is None else cols[idx])


def interp_at(points, recall):
    """points: [(recall, y)]; y at `recall` by linear interpolation between the bracketing points (None outside)."""
    pts = sorted(points)
    for (r0, y0), (r1, y1) in zip(pts, pts[1:]):
        if r0 <= recall <= r1:
            return y0 if r1 == r0 else y0 + (y1 - y0) * (recall - r0) / (r1 - r0)
    return None


def curve_points(world, arm, seed, metric, idx):
    """[(recall, metric)] of an arm's curve, items idx."""
    return [(stat("recall", c[idx]), stat(metric, c[idx])) for _, c in curve(world, arm, seed)]


def at_matched_recall(world, a, sa, b, sb, metric, idx):
    """(a's metric, b's metric) at the recall rules.matched_point picks; (None, None) where there is none."""
    recall = value(world, a, sa, "recall", idx)
    pa, pb = curve_points(world, a, sa, metric, idx), curve_points(world, b, sb, metric, idx)
    if recall is None or not pa or not pb:
        return None, None
    span = lambda pts: (min(r for r, _ in pts), max(r for r, _ in pts))
    point = rules.matched_point(recall, span(pa), span(pb))
    if point is None:
        return None, None
    return (value(world, a, sa, metric, idx) if point == recall else interp_at(pa, point)), interp_at(pb, point)


def n_items(metric):
    key = SETS[metric.split("@")[0] if "@" in metric else ("partner" if metric == "excess_partner" else metric)][0]
    cols = items("prior", "base", None, 0, key)
    return len(cols)


def seed_of(arm, seeds, i):
    return None if arm in ("base", "say_less") else seeds[i]


def diff_fn(metric, a, b):
    """f(seed indices, item indices) -> mean over those seeds of metric(a) - metric(b)."""
    def f(si, idx):
        ds = []
        for i in si:
            sa, sb = seed_of(a, SEEDS, i), seed_of(b, SEEDS, i)
            if "@" in metric:
                va, vb = at_matched_recall("prior", a, sa, b, sb, metric.split("@")[0], idx)
            elif metric == "excess_partner":  # prior world minus control world, same images
                pa, ca = value("prior", a, sa, "partner", idx), value("control", a, sa, "partner", idx)
                pb, cb = value("prior", b, sb, "partner", idx), value("control", b, sb, "partner", idx)
                if None in (pa, ca, pb, cb):
                    return None
                va, vb = pa - ca, pb - cb
            else:
                va, vb = value("prior", a, sa, metric, idx), value("prior", b, sb, metric, idx)
            if va is None or vb is None:
                return None
            ds.append(va - vb)
        return float(np.mean(ds))
    return f


def compare(metric, a, b):
    return rules.bootstrap(diff_fn(metric, a, b), len(SEEDS), n_items(metric))


def fmt_iv(iv, nd=1):
    return "n/a" if iv is None else f"{iv[0]:+.{nd}f} [{iv[1]:+.{nd}f}, {iv[2]:+.{nd}f}]"


def mean_sd(xs, nd=1):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    return f"{np.mean(xs):.{nd}f}" + (f" ± {np.std(xs, ddof=1):.{nd}f}" if len(xs) > 1 else "")


# ----------------------------------------------------------------------------- rows (per seed)

rows = []
COLS = ["mmvet", "llavabench", "resp", "obj", "recall", "partner", "pope_adv_f1", "clear_partner", "clear_recall",
        "clear_pope_adv_f1"]
ARMS = {"prior": ["base"] + METHODS + ABLATIONS + list(SIZE_ARMS), "control": ["base", "sft", "bpo"]}
for world, arms in ARMS.items():
    for arm in arms:
        if arm != "base" and selected(arm) is None:
            print(f"note: {arm} has no dev selection yet: left out", file=sys.stderr)
            continue
        for seed in ([None] if arm == "base" else SEEDS):
            r = {"world": world, "arm": arm, "seed": seed,
                 "step": 0 if arm == "base" else selected(arm)["step"],
                 "lr": None if arm == "base" else selected(arm)["lr"]}
            for m in COLS:
                r[m] = value(world, arm, seed, m)
            cols = items(world, arm, seed, "selected", "hal")
            r["objects_per_caption"] = None if cols is None else float(cols[:, 0].mean())
            d = edir(world, arm, seed, 0 if arm == "base" else "selected", "pope")
            for m in ("pope_random_f1", "pope_popular_f1"):
                if os.path.exists(os.path.join(d, "answers.jsonl")):
                    split_items = pope_items(d, m.split("_")[1])
                    r[m] = f1(split_items.sum(0)) if len(split_items) else None
            if os.path.exists(os.path.join(d, "answers.jsonl")):
                r["pope_adv_yes_ratio"] = 100 * pope_items(d).mean(0)[1]
            rows.append(r)
        if world == "prior" and arm in METHODS:  # the curve points, per seed
            for seed in SEEDS:
                for st, c in curve(world, arm, seed)[1:]:
                    rows.append({"world": world, "arm": arm, "seed": seed, "step": st, "curve": True,
                                 **{m: stat(m, c) for m in ("resp", "obj", "recall", "partner")},
                                 "objects_per_caption": float(c[:, 0].mean())})
for k in (1, 2, 3, 4):
    c = items("prior", "say_less", None, k, "hal")
    rows.append({"world": "prior", "arm": "say_less", "seed": None, "step": k, "curve": True,
                 **{m: stat(m, c) for m in ("resp", "obj", "recall", "partner")},
                 "objects_per_caption": float(c[:, 0].mean())})
with open(os.path.join(OUT, "study_rows.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)

# 07's own scores against this file's reading of its answers (the same rule, read from per-item columns)
d = edir("prior", "base", None, 0, "pope")
with open(os.path.join(d, "scores.json")) as f:
    own = json.load(f)
assert abs(own["adversarial"]["f1"] - value("prior", "base", None, "pope_adv_f1")) < 1e-6, "POPE F1 differs from 07's"
# 05's scores against this file's columns, and the say-less reader (uncut) against 05's mentions
with open(os.path.join(edir("prior", "base", None, 0, "hal"), "scores.json")) as f:
    own = json.load(f)
base_hal, uncut = items("prior", "base", None, 0, "hal"), items("prior", "say_less", None, 0, "hal")
for m, k in (("resp", "chair_s_refine"), ("obj", "chair_i"), ("recall", "recall")):
    assert abs(stat(m, base_hal) - own[k]) < 1e-6, f"{m} differs from 05's {k}"
    if abs(stat(m, uncut) - own[k]) > 0.5:
        print(f"warning: the say-less reader's uncut {m} {stat(m, uncut):.2f} differs from 05's {own[k]:.2f}",
              file=sys.stderr)


def summary(world, arm, metric):
    return mean_sd([r.get(metric) for r in rows if r["world"] == world and r["arm"] == arm and not r.get("curve")])


# ----------------------------------------------------------------------------- verdicts

with open(os.path.join(args.toy, "prior_check.json")) as f, open(os.path.join(args.control_toy, "prior_check.json")) as g:
    prior_check, control_check = json.load(f), json.load(g)
match_table, control_matched = rules.control_match(prior_check, control_check)
excess_row, excess_holds = rules.prior_excess(prior_check, control_check)
verdicts = []
for c in rules.CLAIMS:
    cells, ivs = {}, {}
    for m in c["primary"] + c["secondary"]:
        ivs[m] = compare(m, c["a"], c["b"])
        cells[m] = rules.cell(m, ivs[m])
    v = rules.claim_verdict({m: cells[m] for m in c["primary"]})
    if c["id"] == "mechanism":
        v = rules.mechanism_verdict(v, control_matched, excess_holds)
    verdicts.append({**c, "cells": cells, "intervals": ivs, "verdict": v})


def log_change(arm, seed, key):
    """Fig. 7: a logged log-prob's mean over the last rules.FIG7_WINDOW rows minus the first's (None: no log)."""
    path = os.path.join(RUNS, "prior", f"s{seed}", f"{arm}_lr{selected(arm)['lr']:g}" if seed == 0 else arm,
                        "metrics.jsonl")
    if not os.path.exists(path):
        return None
    xs = [r[key] for r in jsonl(path) if key in r]
    w = rules.FIG7_WINDOW
    return float(np.mean(xs[-w:]) - np.mean(xs[:w])) if len(xs) >= 2 * w else None


fig7 = {name: [log_change(arm, s, key) for s in SEEDS] for name, arm, key in
        (("bpo_chosen", "bpo", "logps/chosen"), ("bpo_rejected", "bpo", "logps/rejected"),
         ("sft_target", "sft", "logps/chosen"))} if selected("bpo") and selected("sft") else {}
fig7_verdict = ("n/a" if not fig7 or any(x is None for v in fig7.values() for x in v) else
                rules.fig7_verdict(fig7["bpo_chosen"], fig7["bpo_rejected"], fig7["sft_target"]))
fig8 = []
for n in rules.FIG8_SIZES + [args.pairs]:
    a, b = ("bpo", "sft") if n == args.pairs else (f"bpo_n{n}", f"sft_n{n}")
    ivs = {m: compare(m, a, b) for m in ("mmvet", "resp")}
    fig8.append({"items": n, "a": a, "b": b, "intervals": ivs, "cells": {m: rules.cell(m, iv) for m, iv in ivs.items()}})
fig8_verdict = rules.claim_verdict({str(r["items"]): r["cells"]["mmvet"] for r in fig8})
rule = rules.RELEASED_RULE
released = {m: compare(m, "bpo_released", "bpo_weak") for m in rule["primary"] + rule["secondary"]}
released_verdict = ("differ" if any(iv is not None and (iv[1] > 0 or iv[2] < 0)
                                    for m, iv in released.items() if m in rule["primary"]) else "no difference shown")
variants = []
for arm, label in rules.VARIANTS.items():
    rule = rules.VARIANT_RULE
    ivs = {m: compare(m, arm, "bpo") for m in rule["primary"] + rule["secondary"] + [rule["guard"]]}
    cells = {m: rules.cell(m, ivs[m]) for m in ivs}
    v = rules.variant_verdict({m: cells[m] for m in rule["primary"]}, {m: ivs[m] for m in rule["primary"]},
                              ivs[rule["guard"]])
    variants.append({"arm": arm, "label": label, "cells": cells, "intervals": ivs, "verdict": v})
with open(os.path.join(OUT, "verdicts.json"), "w") as f:
    json.dump({"claims": verdicts, "variants": variants, "control_match": match_table,
               "control_matched": control_matched, "prior_excess": excess_row, "prior_excess_holds": excess_holds,
               "fig7": {"changes": fig7, "verdict": fig7_verdict},
               "fig8": {"sizes": fig8, "verdict": fig8_verdict},
               "released_sampler": {"intervals": released, "verdict": released_verdict}}, f, indent=1)

# matched recall: every curve arm's metrics at BPO's recall (its selected checkpoint), with intervals
bpo_recalls = [value("prior", "bpo", s, "recall") for s in SEEDS]
r_star = float(np.mean(bpo_recalls)) if None not in bpo_recalls else float("nan")
n_hal = n_items("resp")


def at_star(arm, metric):
    if not np.isfinite(r_star):
        return None

    def f(si, idx):
        vs = [interp_at(curve_points("prior", arm, seed_of(arm, SEEDS, i), metric, idx), r_star) for i in si]
        return None if any(v is None for v in vs) else float(np.mean(vs))
    return rules.bootstrap(f, len(SEEDS), n_hal)


matched_rows = {arm: {m: at_star(arm, m) for m in ("resp", "obj", "partner")} for arm in METHODS + ["say_less"]}

# ----------------------------------------------------------------------------- the plot
try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for arm in METHODS + ["say_less"]:
        seeds = [None] if arm == "say_less" else SEEDS
        pts = [[(stat("recall", c), [stat(m, c) for m in ("resp", "obj", "partner")]) for _, c in curve("prior", arm, s)]
               for s in seeds]
        n = min(len(x) for x in pts)
        rec = [np.mean([x[i][0] for x in pts]) for i in range(n)]
        for j, ax in enumerate(axes):
            ax.plot(rec, [np.mean([x[i][1][j] for x in pts]) for i in range(n)], "o-" if arm != "say_less" else "s--",
                    label=LABEL[arm])
    for ax, name in zip(axes, ("Resp (CHAIR_s)", "Obj (CHAIR_i)", "partner rate")):
        ax.axvline(r_star, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("object recall (%)"), ax.set_ylabel(name + " (%)")
    axes[0].legend(fontsize=7)
    fig.suptitle("Hallucination against recall along training (step 0 = base), mean of seeds; say less = base cut")
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, "matched_recall.png"), dpi=110)
    # Fig. 7: the log-probs along training, mean and spread (min-max) over seeds
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for arm, key, name in (("bpo", "logps/chosen", "BPO chosen"), ("bpo", "logps/rejected", "BPO rejected"),
                           ("sft", "logps/chosen", "SFT target")):
        runs_of = [os.path.join(RUNS, "prior", f"s{s}", f"{arm}_lr{selected(arm)['lr']:g}" if s == 0 else arm,
                                "metrics.jsonl") for s in SEEDS] if selected(arm) else []
        logs = [[(r["step"], r[key]) for r in jsonl(x) if key in r] for x in runs_of if os.path.exists(x)]
        n = min((len(x) for x in logs), default=0)
        if n:
            ys = np.asarray([[v for _, v in x[:n]] for x in logs])
            steps = [st for st, _ in logs[0][:n]]
            ax.plot(steps, ys.mean(0), label=name)
            ax.fill_between(steps, ys.min(0), ys.max(0), alpha=0.2)
    ax.set_xlabel("optimizer step"), ax.set_ylabel("summed log-prob of the response (nats)")
    ax.legend(fontsize=8)
    ax.set_title("Fig. 7 analogue (prior world, selected runs, every seed)")
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, "fig7_logps.png"), dpi=110)
except ImportError:
    print("matplotlib missing: no plot", file=sys.stderr)

# ----------------------------------------------------------------------------- dev selection
selection = {arm: selection_record(arm) for arm in METHODS if selection_record(arm) is not None}
with open(os.path.join(OUT, "dev_selection.json"), "w") as f:
    json.dump({"rule": {"lrs": rules.DEV_LRS, "steps": rules.DEV_STEPS, "mmvet_slack": rules.DEV_MMVET_SLACK,
                        "text": "highest dev object F1 among candidates with dev MM-Vet >= base - slack"},
               "methods": selection}, f, indent=1)

# ----------------------------------------------------------------------------- STUDY.md
L = []
W = L.append


def commit_of_rules():
    try:
        out = subprocess.run(["git", "log", "-1", "--format=%h %cs", "--", os.path.join(HERE, "rules.py")],
                             capture_output=True, text=True, cwd=HERE).stdout.strip()
        return out or "(not committed)"
    except OSError:
        return "(git not found)"


timings = jsonl(os.path.join(RUNS, "timings.jsonl")) if os.path.exists(os.path.join(RUNS, "timings.jsonl")) else []
W("# The paper's claims in miniature: the toy-world BPO study\n")
W(f"Written by `make study` (`experiments/study.py`, this report by `experiments/report.py`) on "
  f"{datetime.datetime.now():%Y-%m-%d %H:%M}. Rules: `experiments/rules.py`, last changed in commit "
  f"{commit_of_rules()}; every verdict below follows them as written. Study steps ran for "
  f"{sum(t['elapsed_s'] for t in timings) / 60:.1f} min over {len(timings)} invocation(s) on this machine."
  + (" **SMOKE RUN: a few steps per run, nothing to read in the numbers.**" if args.smoke else "") + "\n")
with open(os.path.join(args.toy, "world.json")) as f:
    p_text = json.load(f)["p_partner"]["text"]
with open(os.path.join(args.control_toy, "world.json")) as f:
    p_text_control = json.load(f)["p_partner"]["text"]
W(f"Setup: two toy worlds from the same images: *prior* (text corpus P(partner | trigger) = {p_text:.2f}, images "
  f"0.63) and *control* (text {p_text_control:.2f}: no excess prior). Seeds {SEEDS}; {args.pairs} items per seed (every turn: "
  f"captions and short QA), the same for every arm of a seed; negatives from the weakened image (t = "
  f"{args.noise_step}), the clean image and rule injection; every arm {rules.TRAIN_STEPS} optimizer steps "
  f"(`{args.train}`), LoRA, checkpoints at {rules.CURVE_STEPS}. Test sets: toy HalBench (300 images), its POPE "
  f"(3 splits), a 240-question toy MM-Vet (exact judge), the toy LLaVA-Bench (overlap judge, not GPT-4), "
  f"HalBench/POPE on 300 clear-glyph images. Dev split: 150 HalBench-style images and 120 MM-Vet-style questions "
  f"that no test set uses. Resp = RLHF-V's (over captions naming an object); partner = how often a caption names "
  f"the absent partner of a present trigger (the prior's error).\n")
W("## Verdicts\n")
W("| claim | paper | primary metric: difference [95% interval] (cell) | verdict |")
W("|---|---|---|---|")
for v in verdicts:
    cells = "; ".join(f"{rules.METRICS[m][0]} {fmt_iv(v['intervals'][m])} ({v['cells'][m]})" for m in v["primary"])
    W(f"| {v['title']} ({LABEL[v['a']]} vs {LABEL[v['b']]}) | {v['paper']} | {cells} | **{v['verdict']}** |")
W("\nSecondary cells (reported, decide nothing):\n")
for v in verdicts:
    W(f"- {v['title']}: " + "; ".join(f"{rules.METRICS[m][0]} {fmt_iv(v['intervals'][m])} ({v['cells'][m]})"
                                       for m in v["secondary"]))
W("\nThe rules (from `experiments/rules.py`):\n")
W("```\n" + rules.__doc__.strip() + "\n```\n")
W(f"Matched recall: {rules.MATCHED_TEXT}.\n")
W("## Table 2-4 analogues: every arm at its selected checkpoint (mean ± sd over seeds)\n")
W("| world | model | lr, step | MM-Vet ↑ | LLaVA-Bench ↑ | Resp ↓ | Obj ↓ | recall | objects / caption | partner ↓ | "
  "POPE adv. F1 ↑ | seeds |")
W("|---|---|---|---|---|---|---|---|---|---|---|---|")
for world, arms in ARMS.items():
    for arm in arms:
        if arm != "base" and selected(arm) is None:
            continue
        sel = "" if arm == "base" else f"{selected(arm)['lr']:g}, {selected(arm)['step']}"
        n = sum(1 for r in rows if r["world"] == world and r["arm"] == arm and not r.get("curve")
                and r.get("resp") is not None)
        W(f"| {world} | {LABEL[arm]} | {sel} | " + " | ".join(summary(world, arm, m) for m in
                                                              ("mmvet", "llavabench", "resp", "obj", "recall")) +
          f" | {summary(world, arm, 'objects_per_caption')} | {summary(world, arm, 'partner')} | "
          f"{summary(world, arm, 'pope_adv_f1')} | {n} |")
W("\nThe ablation arms (one kind of negative) use BPO's dev-selected learning rate and step; the control world "
  "uses the prior world's selections. Per-seed values: `results/study_rows.jsonl`.\n")
W(f"## Hallucination at matched recall (recall {r_star:.1f}, BPO's at its selected checkpoint)\n")
W("![matched recall](matched_recall.png)\n")
W("| model | Resp at recall [95%] | Obj at recall [95%] | partner at recall [95%] |")
W("|---|---|---|---|")
for arm, ms in matched_rows.items():
    W(f"| {LABEL[arm]} | " + " | ".join("n/a (outside its curve)" if ms[m] is None else
                                        f"{ms[m][0]:.1f} [{ms[m][1]:.1f}, {ms[m][2]:.1f}]" for m in ms) + " |")
W("\n## POPE (the length-free test of the prior's error)\n")
W("| world | model | random F1 | popular F1 | adversarial F1 | adversarial yes-ratio | clear-glyph adversarial F1 |")
W("|---|---|---|---|---|---|---|")
for world, arms in ARMS.items():
    for arm in arms:
        W(f"| {world} | {LABEL[arm]} | " + " | ".join(summary(world, arm, m) for m in
                                                    ("pope_random_f1", "pope_popular_f1", "pope_adv_f1",
                                                     "pope_adv_yes_ratio", "clear_pope_adv_f1")) + " |")
W("\n## The control world: how much of the error is the prior's\n")
W("| model | partner, prior world | partner, control world | excess (prior - control) | recall prior / control | "
  "clear-glyph partner (prior world) | clear-glyph recall |")
W("|---|---|---|---|---|---|---|")
for arm in ARMS["control"]:
    pr = [r for r in rows if r["arm"] == arm and not r.get("curve")]
    pp = {s: r["partner"] for r in pr if r["world"] == "prior" for s in [r["seed"]]}
    pc = {s: r["partner"] for r in pr if r["world"] == "control" for s in [r["seed"]]}
    ex = [pp[s] - pc[s] for s in pp if s in pc and pp[s] is not None and pc[s] is not None]
    W(f"| {LABEL[arm]} | {summary('prior', arm, 'partner')} | {summary('control', arm, 'partner')} | {mean_sd(ex)} | "
      f"{summary('prior', arm, 'recall')} / {summary('control', arm, 'recall')} | "
      f"{summary('prior', arm, 'clear_partner')} | {summary('prior', arm, 'clear_recall')} |")
W(f"\nIs the control matched? (rule: its base model within {rules.CONTROL_MATCH_POINTS:g} points of the prior world's on "
  f"each row, both from prior_check.json; if not, the mechanism verdict is 'inconclusive: control not matched')\n")
W("| base model | prior world | control world | within |")
W("|---|---|---|---|")
for m, (a, b, ok) in match_table.items():
    W(f"| {m.replace('_', ' ')} (%) | {a:.1f} | {b:.1f} | {'yes' if ok else '**no**'} |")
W(f"\nControl matched: **{'yes' if control_matched else 'no'}**.\n")
W(f"Does the prior world's base make the prior's error? (rule: its clean partner rate at least "
  f"{rules.PRIOR_EXCESS_POINTS:g} points above the control world's base and at least {rules.PRIOR_EXCESS_RATIO:g}x "
  "as high, both on prior_check.json's partner probe, clean captions of 3,000 new images of HalBench's distribution; "
  "if not, the mechanism verdict is 'inconclusive: no prior-driven error in the base'): "
  f"prior world {excess_row[0]:.1f}%, control world {excess_row[1]:.1f}%, difference {excess_row[2]:+.1f} "
  f"points: **{'yes' if excess_holds else 'no'}**.\n")
W("\n## Fig. 7 analogue: what BPO and SFT do to the log-probs\n")
W("![log-probs along training](fig7_logps.png)\n")
W(f"Rule (`rules.fig7_verdict`): the change of a log-prob is its mean over the last {rules.FIG7_WINDOW} logged steps "
  "minus its first; reproduced when in every seed BPO's rejected log-prob falls by more than its chosen one changes "
  "and SFT's target rises.\n")
W("| log-prob | change per seed | mean |")
W("|---|---|---|")
for name, xs in fig7.items():
    W(f"| {name.replace('_', ' ')} | " + ", ".join("–" if x is None else f"{x:+.2f}" for x in xs) +
      f" | {mean_sd(xs, 2)} |")
W(f"\nVerdict: **{fig7_verdict}**.\n")
W("\n## Fig. 8 analogue: BPO against SFT as the data grows (step-matched)\n")
W("Rule: one cell per size on toy MM-Vet (a claim's cell rule); reproduced when every size is 'yes'. Every size "
  f"trains {rules.TRAIN_STEPS} steps at each method's dev-selected learning rate and is read at its selected step.\n")
W("| items per seed | BPO MM-Vet | SFT MM-Vet | BPO - SFT MM-Vet (cell) | BPO Resp | SFT Resp | BPO - SFT Resp (cell) |")
W("|---|---|---|---|---|---|---|")
for r in fig8:
    iv, c = r["intervals"], r["cells"]
    W(f"| {r['items']} | {summary('prior', r['a'], 'mmvet')} | {summary('prior', r['b'], 'mmvet')} | "
      f"{fmt_iv(iv['mmvet'])} ({c['mmvet']}) | {summary('prior', r['a'], 'resp')} | {summary('prior', r['b'], 'resp')} | "
      f"{fmt_iv(iv['resp'])} ({c['resp']}) |")
W(f"\nVerdict: **{fig8_verdict}**.\n")
W("\n## The authors' released sampler against the paper's\n")
W(f"Released: `01_build_pairs.py {' '.join(map(str, rules.RELEASED_FLAGS))}` (contrastive, pushes the sample toward "
  f"the clean image); the paper's: features noised at t = {args.noise_step}, plain sampling. The negatives themselves "
  "(captions among them, the world's reader; 01's raw outputs before selection):\n")
W("| sampler | seed | caption negatives | well-formed | CHAIR_s | partner | other absent | recall | items the arm trains on |")
W("|---|---|---|---|---|---|---|---|---|")
for kind, name in (("weak", "paper's (weakened features)"), ("released", "released script's")):
    for seed in SEEDS:
        path = os.path.join(RUNS, "prior", f"s{seed}", "pairs", "select.json")
        if os.path.exists(path):
            sel = json.load(open(path))
            st = sel["stats"].get(kind)
            if st:
                W(f"| {name} | {seed} | {st['captions']} | {100 * st['well_formed']:.0f}% | {100 * st['chair_s']:.1f} | "
                  f"{100 * st['partner_rate']:.1f} | {100 * st['other_absent_rate']:.1f} | {100 * st['recall']:.1f} | "
                  f"{sel.get('n_items_of', {}).get(kind, '–')} |")
W(f"\nWhat each trains (BPO on one kind alone; rule: 'differ' when a primary cell's interval, "
  f"{' and '.join(rules.RELEASED_RULE['primary'])}, excludes 0):\n")
W("| metric | released | paper's | released - paper's [95%] |")
W("|---|---|---|---|")
for m, iv in released.items():
    W(f"| {rules.METRICS[m][0]} | {summary('prior', 'bpo_released', m)} | {summary('prior', 'bpo_weak', m)} | {fmt_iv(iv)} |")
W(f"\nVerdict: **{released_verdict}**.\n")
W("\n## Beyond the paper: objectives that make the model use the image (issue 14)\n")
W(f"Rule: {rules.VARIANT_TEXT}.\n")
W("| variant | POPE adv. F1 vs DPO | partner at matched recall vs DPO | MM-Vet vs DPO | Resp at matched recall | "
  "Obj at matched recall | excess partner | verdict |")
W("|---|---|---|---|---|---|---|---|")
for v in variants:
    iv = v["intervals"]
    W(f"| {v['label']} | {fmt_iv(iv['pope_adv_f1'])} | {fmt_iv(iv['partner@recall'])} | {fmt_iv(iv['mmvet'])} | "
      f"{fmt_iv(iv['resp@recall'])} | {fmt_iv(iv['obj@recall'])} | {fmt_iv(iv['excess_partner'])} | **{v['verdict']}** |")
W("\n## Dev selection (seed 0, prior world, dev split only)\n")
W("| method | lr | step | dev Obj | dev recall | dev object F1 | dev MM-Vet | chosen |")
W("|---|---|---|---|---|---|---|---|")
for arm, s in selection.items():
    for c in s["candidates"]:
        W(f"| {LABEL[arm]} | {c['lr']:g} | {c['step']} | {c['obj']:.1f} | {c['recall']:.1f} | {c['object_f1']:.1f} | "
          f"{c['mmvet']:.1f} | {'**yes**' if c == s['chosen'] else ''} |")
W(f"\nBase model on dev: MM-Vet {selection['bpo']['base_dev_mmvet']:.1f}.\n")
probe_path = os.path.join(RUNS, "noise_probe.json")
if os.path.exists(probe_path):
    probe = json.load(open(probe_path))
    W("## Fig. 5 analogue: the prior takes over as the image is weakened (dev images, mean of 3 noise draws)\n")
    W("| noise step | log p(true) | log p(partner) | partner likelier (%) | Resp | partner | other absent | recall |")
    W("|---|---|---|---|---|---|---|---|")
    for t in sorted({r["noise_step"] for r in probe["rows"]}):
        at = [r for r in probe["rows"] if r["noise_step"] == t]
        g = lambda k: float(np.mean([r.get(k, float("nan")) for r in at]))
        W(f"| {t} | {g('logp_true'):.2f} | {g('logp_partner'):.2f} | {100 * g('partner_wins'):.1f} | "
          f"{100 * g('chair_s'):.1f} | {100 * g('partner_rate'):.1f} | {100 * g('other_absent_rate'):.1f} | "
          f"{100 * g('recall'):.1f} |")
W("\n## Notes\n")
W(f"- The noise step of the weakened negatives (t = {args.noise_step}) was fixed before this study from an earlier "
  "probe on the then-test HalBench images (docs/toy_world.md); it was not searched on dev. The Fig. 5 probe above now runs on "
  "dev images.")
W("- Not a test: the pipeline's tests cover the code; this is one experiment on one pair of toy worlds.")
with open(os.path.join(OUT, "STUDY.md"), "w") as f:
    f.write("\n".join(L) + "\n")
print(f"wrote {OUT}/STUDY.md, study_rows.jsonl, verdicts.json, dev_selection.json, matched_recall.png")
for v in verdicts:
    print(f"{v['verdict']:>15}  {v['title']}")
for v in variants:
    print(f"{v['verdict']:>15}  {v['label']}")
