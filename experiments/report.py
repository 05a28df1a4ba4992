"""Writes results/STUDY.md and its plots from the outputs of experiments/study.py: every number a
mean ± std over the seeds, hallucination always beside recall and objects per caption; each of the
paper's claims is given a verdict by the explicit rule printed beside it."""
import argparse
import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from toyworld import World  # noqa: E402

import matplotlib  # noqa: E402
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--toy", default="toy")
p.add_argument("--runs", default="runs/study")
p.add_argument("--results", default="results")
p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
p.add_argument("--pairs", type=int, default=400)
p.add_argument("--noise_step", type=int, default=700)
p.add_argument("--train", default="")
p.add_argument("--nll_weight", type=float, default=1.0)
p.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5])
args = p.parse_args()
os.makedirs(args.results, exist_ok=True)
world = World(os.path.join(args.toy, "world.json"))
R = args.runs


def load(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f) if path.endswith(".json") else [json.loads(x) for x in f if x.strip()]


def ms(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def fmt(pair, nd=1):
    m, s = pair
    return "–" if m is None else f"{m:.{nd}f} ± {s:.{nd}f}"


def model_metrics(eval_dir):
    """Resp/Obj/recall (05, percent), MM-Vet total (04), and from the answers: objects per caption,
    partner vs other absent rate (percent), well-formed share."""
    hal, mm = load(os.path.join(eval_dir, "halbench", "scores.json")), load(os.path.join(eval_dir, "mmvet", "scores.json"))
    answers = load(os.path.join(eval_dir, "halbench", "answers.jsonl"))
    if hal is None or mm is None or answers is None:
        return None
    truths = [{o["name"] for o in world.images[a["image"]]["objects"]} for a in answers]
    st = world.stats([a["answer"] for a in answers], truths)
    return {"mmvet": mm["total"], "resp": hal["chair_s"], "obj": hal["chair_i"], "recall": hal["recall"],
            "objs": st["objects_per_caption"], "partner": 100 * st["partner_rate"],
            "other": 100 * st["other_absent_rate"], **{f"mm_{k}": v for k, v in mm.items() if k != "total"}}


def run_metrics(name):
    """name -> {metric: (mean, std)} over seeds; base is evaluated once (greedy: no seed)."""
    if name == "base":
        per = [model_metrics(os.path.join(R, "eval", "base"))]
    else:
        per = [model_metrics(os.path.join(R, "eval", f"s{s}", name)) for s in args.seeds]
    per = [x for x in per if x]
    if not per:
        return None
    out = {k: ms([x[k] for x in per]) for k in per[0]}
    out["n"] = len(per)
    return out


LABELS = {"base": "base (LLaVA analogue)", "bpo_weak": "BPO (weakened image)", "bpo_inj": "BPO (error injection)",
          "bpo_both": "BPO (both)", "bpo_clean": "BPO (clean-image samples)", "sft_both": "SFT (same positives)",
          "bpo_both_nll": f"BPO (both) + {args.nll_weight:g} x NLL on chosen"}
COLS = [("mmvet", "MM-Vet ↑"), ("resp", "Resp ↓"), ("obj", "Obj ↓"), ("recall", "Recall"),
        ("objs", "objects / caption"), ("partner", "partner ↓"), ("other", "other absent ↓")]
M = {}


def table(names, extra_cols=()):
    cols = COLS + list(extra_cols)
    lines = ["| model | " + " | ".join(c for _, c in cols) + " | seeds |", "|---" * (len(cols) + 2) + "|"]
    for n in names:
        m = M.get(n) or run_metrics(n)
        M[n] = m
        if m is None:
            lines.append(f"| {LABELS.get(n, n)} | " + " | ".join("–" for _ in cols) + " | 0 |")
            continue
        lines.append(f"| {LABELS.get(n, n)} | " + " | ".join(fmt(m[k], 2 if k == "objs" else 1) for k, _ in cols)
                     + f" | {m['n']} |")
    return "\n".join(lines)


def lower(a, b, key):
    """a's mean below b's by more than the seeds' spread (sqrt(sa^2 + sb^2)); None if missing."""
    if not M.get(a) or not M.get(b):
        return None
    (ma, sa), (mb, sb) = M[a][key], M[b][key]
    return mb - ma > max(math.hypot(sa, sb), 1e-9)


def diff(a, b, key):
    return M[a][key][0] - M[b][key][0] if M.get(a) and M.get(b) else float("nan")


md = []
W = md.append
timing = load(os.path.join(R, "timings.jsonl"))
W("# The paper's claims in miniature: the toy-world BPO study\n")
W(f"Written by `make study` (`experiments/study.py`, report by `experiments/report.py`) on "
  f"{time.strftime('%Y-%m-%d %H:%M')}. Toy world `{args.toy}/` (seed {load(os.path.join(args.toy, 'world.json')) and json.load(open(os.path.join(args.toy, 'world.json')))['seed']}); "
  f"seeds of negatives and training: {args.seeds}; {args.pairs} chosen answers per seed (detailed "
  f"descriptions of training images), the same ones for every condition of a seed; 03 flags `{args.train}`; "
  f"image-weakened negatives sampled (temperature 1) at noise step {args.noise_step}. Every number is "
  "mean ± std over the seeds (the base model is evaluated once: greedy decoding has no seed). Resp = CHAIR_s, "
  "Obj = CHAIR_i, recall, *partner* = how often a caption names the absent partner of a present trigger "
  "(the prior's error), *other absent* = the same rate for any other absent object, all in percent over the "
  "300 toy HalBench images; MM-Vet = the toy MM-Vet (60 questions, exact judge). Read hallucination only beside "
  "recall and objects per caption: a model that names fewer objects hallucinates fewer.\n")
if timing:
    ran = [t for t in timing if t["steps"]]  # invocations that ran at least one step (a rerun only reports)
    built = any("world" in t["steps"] for t in ran)
    W(f"Study run time: {sum(t['elapsed_s'] for t in ran) / 60:.1f} min over {len(ran)} invocation(s) that ran steps, "
      f"two at a time on this machine's CPU cores; "
      + (f"the toy world build took {sum(t['steps'].get('world', 0) for t in ran) / 60:.1f} min of it. " if built else
         f"the toy world `{args.toy}/` already existed and was reused (building it takes about 4-10 min). ")
      + f"Failed steps in the last invocation: {timing[-1]['failed'] or 'none'}.\n")

# ---------------------------------------------------------------- the world and the negatives
pc = load(os.path.join(args.toy, "prior_check.json"))
W("## 0. The toy world and the negatives\n")
if pc:
    W("Prior check written by `00_make_toy.py` (greedy captions of the HalBench images, one noise draw):\n")
    W("| noise step | CHAIR_s | partner | other absent | recall | objects / caption |\n|---|---|---|---|---|---|")
    for r in pc["rows"]:
        W(f"| {r['noise_step']} | {r['chair_s']:.2f} | {r['partner_rate']:.2f} | {r['other_absent_rate']:.2f} | "
          f"{r['recall']:.2f} | {r['objects_per_caption']:.2f} |")
    W("")
sel = [load(os.path.join(R, f"s{s}", "pairs", "select.json")) for s in args.seeds]
sel = [x for x in sel if x]
if sel:
    W("The negatives, before selection (each kind sampled for the same items; shares in percent; *errors only "
      "prior-driven* = the negative names an absent object and every absent object it names is a trigger's partner):\n")
    W("| negatives | well-formed captions | naming an absent object | partner | other absent | errors only prior-driven | objects / caption |")
    W("|---|---|---|---|---|---|---|")
    for k, label in (("weak", f"image-weakened (t={args.noise_step})"), ("clean", "clean image (t=0)"),
                     ("inj", "rule-injected (02 --backend rules)")):
        g = lambda key, f=100: ms([f * x["stats"][k][key] for x in sel])
        W(f"| {label} | {fmt(g('well_formed'))} | {fmt(g('chair_s'))} | {fmt(g('partner_rate'))} | "
          f"{fmt(g('other_absent_rate'))} | {fmt(g('prior_only_errors'))} | {fmt(g('objects_per_caption', 1), 2)} |")
    W(f"\nItems whose weakened and clean negatives are both well-formed: {fmt(ms([100 * x['usable_share'] for x in sel]))} % "
      f"of those sampled; {args.pairs} of them are used per seed.\n")

# ---------------------------------------------------------------- Fig. 5
probe = load(os.path.join(R, "noise_probe.json"))
verdicts = []
W("## 1. Fig. 5 analogue: the prior takes over as the image is weakened\n")
if probe:
    steps = sorted({r["noise_step"] for r in probe["rows"]})
    by = lambda t, k, f=1: ms([f * r[k] for r in probe["rows"] if r["noise_step"] == t])
    W(f"Base model, forward diffusion on the projector input, {len(set(r['seed'] for r in probe['rows']))} noise draws. "
      f"Left columns: at the {probe['n_probe_slots']} caption slots right after a present trigger whose partner is "
      "absent (teacher-forced on the true caption up to the slot, same count word), the log-prob of the true next "
      "object vs the partner, and how often the partner is the likelier. Right: greedy captions of the "
      f"{probe['n_images']} HalBench images.\n")
    W("| noise step | log p(true object) | log p(partner) | partner likelier (%) | CHAIR_s | CHAIR_i | partner | other absent | recall | objects / caption | well-formed |")
    W("|---" * 11 + "|")
    for t in steps:
        W(f"| {t} | {fmt(by(t, 'logp_true'), 2)} | {fmt(by(t, 'logp_partner'), 2)} | {fmt(by(t, 'partner_wins', 100))} | "
          f"{fmt(by(t, 'chair_s', 100))} | {fmt(by(t, 'chair_i', 100))} | {fmt(by(t, 'partner_rate', 100))} | "
          f"{fmt(by(t, 'other_absent_rate', 100))} | {fmt(by(t, 'recall', 100))} | {fmt(by(t, 'objects_per_caption'), 2)} | "
          f"{fmt(by(t, 'well_formed', 100))} |")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for key, lab in (("logp_true", "true next object"), ("logp_partner", "prior's favourite (partner)")):
        m = [by(t, key)[0] for t in steps]
        s = [by(t, key)[1] for t in steps]
        a1.errorbar(steps, m, yerr=s, marker="o", capsize=3, label=lab)
    a1.set_xlabel("noise step t")
    a1.set_ylabel("log-prob at the slot after a trigger")
    a1.legend()
    a1.set_title("Fig. 5 analogue: likelihood")
    for key, lab in (("chair_s", "CHAIR_s"), ("partner_rate", "partner named (absent)"),
                     ("other_absent_rate", "other absent named"), ("recall", "recall")):
        a2.errorbar(steps, [by(t, key, 100)[0] for t in steps], yerr=[by(t, key, 100)[1] for t in steps],
                    marker="o", capsize=3, label=lab)
    a2.set_xlabel("noise step t")
    a2.set_ylabel("%")
    a2.legend()
    a2.set_title("greedy captions")
    fig.tight_layout()
    fig.savefig(os.path.join(args.results, "fig5_noise.png"), dpi=100)
    plt.close(fig)
    W("\n![Fig. 5 analogue](fig5_noise.png)\n")
    t0, t1 = steps[0], steps[-1]
    gap0 = by(t0, "logp_true")[0] - by(t0, "logp_partner")[0]
    gap1 = by(t1, "logp_true")[0] - by(t1, "logp_partner")[0]
    p0, o0 = by(t0, "partner_rate")[0], by(t0, "other_absent_rate")[0]
    pw = by(args.noise_step, "partner_rate")[0] if args.noise_step in steps else None
    ok = gap1 < gap0 and by(t1, "partner_wins")[0] > by(t0, "partner_wins")[0] and p0 > 2 * o0
    verdicts.append(("Fig. 5: the prior takes over as the image is weakened", "reproduced" if ok else "not reproduced",
                     f"log p(true) − log p(partner) {gap0:.2f} (t={t0}) → {gap1:.2f} (t={t1}); partner likelier at "
                     f"{100 * by(t0, 'partner_wins')[0]:.0f}% → {100 * by(t1, 'partner_wins')[0]:.0f}% of slots; clean partner "
                     f"rate {100 * p0:.0f}% vs other absent {100 * o0:.0f}%"
                     + (f"; at t={args.noise_step} partner {100 * pw:.0f}%" if pw is not None else ""),
                     "the gap shrinks with t, the partner wins more slots, and on clean images the partner is named > 2x as often as other absent objects"))

# ---------------------------------------------------------------- Tables 2-4
W("## 2. Table 2 analogue: BPO's negatives, one kind and both\n")
W(table(["base", "bpo_weak", "bpo_inj", "bpo_both"]))
W("")
W("## 3. Table 3 analogue: preference learning vs SFT on the same positives\n")
t3 = ["base", "sft_both", "bpo_both"] + (["bpo_both_nll"] if args.nll_weight else [])
W(table(t3))
W("\nSFT trains on exactly the chosen answers of BPO (both), for the same number of steps.\n")
W("## 4. Table 4 analogue: negatives from the weakened image vs the clean image\n")
W(table(["base", "bpo_clean", "bpo_weak"]))
W("")


def verdict_t2():
    if not M.get("bpo_both"):
        return None
    resp = lower("bpo_both", "base", "resp")
    rec_drop = -diff("bpo_both", "base", "recall")
    mm = diff("bpo_both", "base", "mmvet")
    ev = (f"Resp {fmt(M['base']['resp'])} → {fmt(M['bpo_both']['resp'])}, Obj {fmt(M['base']['obj'])} → "
          f"{fmt(M['bpo_both']['obj'])}, recall {fmt(M['base']['recall'])} → {fmt(M['bpo_both']['recall'])}, "
          f"objects/caption {fmt(M['base']['objs'], 2)} → {fmt(M['bpo_both']['objs'], 2)}, MM-Vet "
          f"{fmt(M['base']['mmvet'])} → {fmt(M['bpo_both']['mmvet'])}")
    if resp and rec_drop <= 3 and mm >= 0:
        v = "reproduced"
    elif resp:
        v = "mixed"
    else:
        v = "not reproduced"
    return ("Table 2: BPO cuts object hallucination while helpfulness rises", v, ev,
            "reproduced if Resp falls by more than the seeds' spread with recall down ≤ 3 points and MM-Vet not down; "
            "mixed if Resp falls but recall or MM-Vet pays")


def verdict_pair(claim, a, b, rule_text):
    if not M.get(a) or not M.get(b):
        return None
    r, rec = lower(a, b, "resp"), diff(a, b, "recall")
    mm = diff(a, b, "mmvet")
    ev = (f"{LABELS[a]}: Resp {fmt(M[a]['resp'])}, Obj {fmt(M[a]['obj'])}, recall {fmt(M[a]['recall'])}, MM-Vet "
          f"{fmt(M[a]['mmvet'])}; {LABELS[b]}: Resp {fmt(M[b]['resp'])}, Obj {fmt(M[b]['obj'])}, recall "
          f"{fmt(M[b]['recall'])}, MM-Vet {fmt(M[b]['mmvet'])}")
    if r and rec >= -3 and mm >= -2:
        v = "reproduced"
    elif r or (lower(a, b, "obj") and rec >= -3):
        v = "mixed"
    else:
        v = "not reproduced"
    return (claim, v, ev, rule_text)


for v in (verdict_t2(),
          verdict_pair("Table 3: preference learning beats SFT on the same positives", "bpo_both", "sft_both",
                       "reproduced if BPO's Resp is below SFT's by more than the seeds' spread, recall no more than 3 "
                       "points below and MM-Vet no more than 2 below; mixed if only part holds"),
          verdict_pair("Table 4: weakened-image negatives beat clean-image samples", "bpo_weak", "bpo_clean",
                       "the same rule, weakened vs clean")):
    if v:
        verdicts.append(v)

# ---------------------------------------------------------------- Fig. 7
W("## 5. Fig. 7 analogue: log-probs during training\n")
curves = {}
for name, keys in (("bpo_both", ("logps/chosen", "logps/rejected")), ("sft_both", ("logps/chosen",))):
    for k in keys:
        per = [load(os.path.join(R, f"s{s}", name, "metrics.jsonl")) for s in args.seeds]
        per = [x for x in per if x]
        if not per:
            continue
        n = min(len(x) for x in per)
        curves[f"{name} {k}"] = [ms([x[i][k] for x in per]) for i in range(n)]
if curves:
    def smooth(xs, w=5):
        return [sum(xs[max(0, i - w + 1):i + 1]) / len(xs[max(0, i - w + 1):i + 1]) for i in range(len(xs))]

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for lab, c in curves.items():
        m = smooth([x[0] for x in c])
        s = smooth([x[1] for x in c])
        steps = list(range(1, len(m) + 1))
        ax.plot(steps, m, label=lab)
        ax.fill_between(steps, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], alpha=0.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("summed log-prob of the response (policy)")
    ax.set_title("Fig. 7 analogue (mean ± std over seeds, 5-step moving average)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.results, "fig7_logps.png"), dpi=100)
    plt.close(fig)
    W("| curve | first 5 steps | last 5 steps | change |\n|---|---|---|---|")
    ends = {}
    for lab, c in curves.items():
        a = sum(x[0] for x in c[:5]) / len(c[:5])
        b = sum(x[0] for x in c[-5:]) / len(c[-5:])
        ends[lab] = (a, b)
        W(f"| {lab} | {a:.1f} | {b:.1f} | {b - a:+.1f} |")
    W("\n![Fig. 7 analogue](fig7_logps.png)\n")
    bc, br, sc = ends.get("bpo_both logps/chosen"), ends.get("bpo_both logps/rejected"), ends.get("sft_both logps/chosen")
    if bc and br and sc:
        held = bc[1] - bc[0] >= -0.1 * abs(bc[0])
        pushed = br[1] - br[0] < -0.1 * abs(br[0])
        sft_up = sc[1] > sc[0]
        v = "reproduced" if held and pushed and sft_up else ("mixed" if pushed and sft_up else "not reproduced")
        verdicts.append(("Fig. 7: BPO holds the chosen log-probs and pushes the rejected down; SFT raises the chosen", v,
                         f"BPO chosen {bc[0]:.1f} → {bc[1]:.1f}, rejected {br[0]:.1f} → {br[1]:.1f}; SFT chosen "
                         f"{sc[0]:.1f} → {sc[1]:.1f} (means of the first and last 5 steps)",
                         "held = chosen falls by less than 10%; pushed = rejected falls by more than 10%; mixed if the "
                         "rejected is pushed and SFT rises but BPO's chosen falls too"))

# ---------------------------------------------------------------- Fig. 8
W("## 6. Fig. 8 analogue: preference data size, BPO vs SFT\n")
sizes = [int(round(f * args.pairs)) for f in args.fractions] + [args.pairs]
name_of = lambda kind, n: f"{kind}_both" if n == args.pairs else f"{kind}_both_n{n}"
for kind in ("bpo", "sft"):
    for n in sizes:
        LABELS[name_of(kind, n)] = f"{kind.upper()}, {n} items ({2 * n} pairs)"
W(table([name_of(k, n) for k in ("bpo", "sft") for n in sizes]))
W("\nEach size trains the same number of epochs (more data = more steps), as in the paper.\n")
have = [n for n in sizes if M.get(name_of("bpo", n)) and M.get(name_of("sft", n))]
if have:
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (key, lab) in zip(axes, (("resp", "Resp (CHAIR_s) ↓"), ("recall", "Recall"), ("mmvet", "MM-Vet"))):
        for kind in ("bpo", "sft"):
            ax.errorbar(have, [M[name_of(kind, n)][key][0] for n in have], yerr=[M[name_of(kind, n)][key][1] for n in have],
                        marker="o", capsize=3, label=kind.upper())
        if M.get("base"):
            ax.axhline(M["base"][key][0], color="grey", ls="--", label="base")
        ax.set_xlabel("items (chosen answers) per seed")
        ax.set_title(lab)
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.results, "fig8_datasize.png"), dpi=100)
    plt.close(fig)
    W("![Fig. 8 analogue](fig8_datasize.png)\n")
    bpo_r = [M[name_of("bpo", n)]["resp"][0] for n in have]
    sft_r = [M[name_of("sft", n)]["resp"][0] for n in have]
    helps = bpo_r[-1] < bpo_r[0]
    beats = all(b < s for b, s in zip(bpo_r, sft_r))
    beats_sig = all(lower(name_of("bpo", n), name_of("sft", n), "resp")
                    and diff(name_of("bpo", n), name_of("sft", n), "recall") >= -3 for n in have)
    v = "reproduced" if helps and beats_sig else ("mixed" if helps or beats else "not reproduced")
    verdicts.append(("Fig. 8: more preference data helps, and always more than SFT", v,
                     "Resp by size " + ", ".join(f"{n}: BPO {b:.1f} / SFT {s:.1f}" for n, b, s in zip(have, bpo_r, sft_r))
                     + "; recall BPO " + ", ".join(f"{M[name_of('bpo', n)]['recall'][0]:.1f}" for n in have)
                     + " / SFT " + ", ".join(f"{M[name_of('sft', n)]['recall'][0]:.1f}" for n in have),
                     "reproduced if BPO's Resp falls from the smallest to the largest size and is below SFT's by more "
                     "than the seeds' spread at every size with recall no more than 3 points below; mixed if only part holds"))

# ---------------------------------------------------------------- verdicts
W("## Verdicts\n")
W("| claim | verdict | evidence | rule |\n|---|---|---|---|")
for claim, v, ev, rule in verdicts:
    W(f"| {claim} | **{v}** | {ev} | {rule} |")
W("")
if M.get("bpo_both_nll") and M.get("sft_both"):
    W(f"Objective variant: DPO + {args.nll_weight:g} x per-token NLL of the chosen (03 `--sft_weight`): Resp "
      f"{fmt(M['bpo_both_nll']['resp'])}, recall {fmt(M['bpo_both_nll']['recall'])}, MM-Vet {fmt(M['bpo_both_nll']['mmvet'])} "
      f"against SFT's {fmt(M['sft_both']['resp'])}, {fmt(M['sft_both']['recall'])}, {fmt(M['sft_both']['mmvet'])} and "
      f"pure BPO's {fmt(M['bpo_both']['resp'])}, {fmt(M['bpo_both']['recall'])}, {fmt(M['bpo_both']['mmvet'])}.\n")
with open(os.path.join(args.results, "STUDY.md"), "w") as f:
    f.write("\n".join(md) + "\n")
with open(os.path.join(args.results, "study_metrics.json"), "w") as f:
    json.dump({"models": M, "verdicts": verdicts}, f, indent=1)
print("\n".join(md))
print(f"\nwrote {args.results}/STUDY.md")
