"""The study's verdict rules, in one place, written before the final run that they judge (STUDY.md names
the commit): the claims, the metric each is judged on first (the paper's own), how hyperparameters are
chosen on the dev split, and the one significance test every comparison uses.

Significance: a difference A - B of a metric is computed per seed and averaged over the seeds; its 95%
interval is a bootstrap that resamples the seeds (paired: A and B keep the same seeds) and the evaluation
items (paired: the same images or questions for A and B and for every seed), B_REPLICATES times, and takes
the 2.5th and 97.5th percentiles. A model without seeds (the base model: greedy decoding) enters every seed
the same.

A cell (one metric of one claim) reads:
- "yes"      the difference is in the paper's direction and its interval excludes 0;
- "n.s."     in the paper's direction, interval includes 0;
- "reversed" zero or against the paper's direction (significant or not).
A claim is "reproduced" when every primary cell is "yes", "not reproduced" when any primary cell is
"reversed", and "inconclusive" otherwise. Secondary cells are reported beside it and decide nothing.
"""
import numpy as np

B_REPLICATES = 2000
CONFIDENCE = 0.95

# metric -> (label, +1 higher is better / -1 lower is better)
METRICS = {
    "mmvet": ("toy MM-Vet", +1),
    "llavabench": ("toy LLaVA-Bench (relative score)", +1),
    "resp": ("Resp (CHAIR_s)", -1),
    "obj": ("Obj (CHAIR_i)", -1),
    "recall": ("object recall", +1),
    "partner": ("partner rate (the prior's error)", -1),
    "pope_adv_f1": ("POPE adversarial F1", +1),
    "resp@recall": ("Resp at matched recall", -1),
    "obj@recall": ("Obj at matched recall", -1),
    "partner@recall": ("partner rate at matched recall", -1),
    "excess_partner": ("partner rate over the control world's", -1),
}

# The paper's claims (Pi et al. 2024). a and b name arms of the study; "say_less" is the base model's
# captions cut to fewer object sentences (a curve), "base" the untrained model.
CLAIMS = [
    dict(id="table2", title="Table 2: BPO improves on the base model",
         paper="LLaVA-1.5 -> BPO raises MM-Vet and LLaVA-Bench in-the-Wild (7B: 63.8 -> 71.6) and lowers "
               "Object HalBench Resp and Obj",
         a="bpo", b="base", primary=["mmvet", "llavabench", "resp", "obj"],
         secondary=["recall", "partner", "pope_adv_f1"]),
    dict(id="table3", title="Table 3: preference learning beats SFT on the same positives",
         paper="BPO > SFT on MM-Vet", a="bpo", b="sft", primary=["mmvet"],
         secondary=["llavabench", "resp", "obj", "recall", "resp@recall", "obj@recall", "pope_adv_f1"]),
    dict(id="table4", title="Table 4: negatives from the weakened image beat samples from the clean image",
         paper="image-weakened > clean-image negatives on MM-Vet", a="bpo_weak", b="bpo_clean", primary=["mmvet"],
         secondary=["resp", "obj", "recall", "partner"]),
    dict(id="matched_sft", title="Less hallucination than SFT at matched recall",
         paper="(the paper's reading of Tables 2-3: BPO grounds answers in the image, not only shorter ones)",
         a="bpo", b="sft", primary=["resp@recall", "obj@recall"], secondary=["partner@recall"]),
    dict(id="matched_say_less", title="Less hallucination than saying less at matched recall",
         paper="(as above)", a="bpo", b="say_less", primary=["resp@recall", "obj@recall"],
         secondary=["partner@recall"]),
    dict(id="mechanism", title="BPO removes the prior-driven error",
         paper="(the paper's mechanism: weakened-image negatives carry the pretraining bias, BPO suppresses it)",
         a="bpo", b="base", primary=["pope_adv_f1", "excess_partner"], secondary=["partner", "partner@recall"]),
]

# Beyond the paper (issue 14): each objective against plain DPO (bpo), same data, same dev budget.
VARIANTS = {"bpo_cond": "DPO + conditional term (weight 1)", "bpo_anchor": "DPO + anchor (weight 1)",
            "ipo": "IPO", "bpo_lnorm": "DPO, length-normalised log-ratios"}
VARIANT_RULE = dict(primary=["pope_adv_f1", "partner@recall"], guard="mmvet",
                    secondary=["resp@recall", "obj@recall", "excess_partner"])
VARIANT_TEXT = ("a variant 'helps' when both primary cells are 'yes' against plain DPO (it lowers the prior-driven "
                "error: POPE adversarial F1 up, partner rate at matched recall down) and its MM-Vet is not "
                "significantly lower; 'hurts' when a primary cell is 'reversed' with an interval excluding 0 or MM-Vet "
                "is significantly lower; otherwise 'no evidence'")

# Matched recall: each arm's curve is its checkpoints along training (step 0 = the base model), extended below
# by its selected checkpoint's captions cut to CUT_SENTENCES object sentences (changed before the second study:
# in the first, every arm ended within a few points of recall of the others and the cells were n/a whenever
# a's recall fell below b's lowest checkpoint; the cut extends every curve down, as the say-less baseline's);
# the say-less baseline's is the base model's captions cut to 1..4 object sentences. The comparison point is
# arm a's recall at its selected checkpoint; arm b's metric there is interpolated linearly between its two
# points that bracket it (never extrapolated). Changed before the third study: when a's recall is outside b's
# curve (in the second study it was above b's highest point in some cells, which read n/a), the point moves to
# the nearest recall that both curves reach, and both metrics are interpolated there; only curves that share no
# recall give "n/a" (counts as not "yes").
CUT_SENTENCES = (1, 2, 3)
MATCHED_TEXT = ("arm b's curve (metric against recall: its checkpoints, step 0 = base, and its selected checkpoint's "
                f"captions cut to {list(CUT_SENTENCES)} object sentences) is interpolated at arm a's recall at its "
                "selected checkpoint, inside each bootstrap replicate; where b's curve does not reach that recall, "
                "both curves are interpolated at the nearest recall they both reach; n/a only if they share none")


def matched_point(recall, a_range, b_range):
    """The recall a matched-recall cell compares at (rule above): a's own when b's curve reaches it, else the nearest
    recall inside both curves' ranges ((low, high) each); None when the ranges do not overlap."""
    low, high = max(a_range[0], b_range[0]), min(a_range[1], b_range[1])
    if low > high:
        return None
    return recall if b_range[0] <= recall <= b_range[1] else min(max(recall, low), high)

# The control world isolates the prior only if its base model is as good as the prior world's otherwise: base
# models within CONTROL_MATCH_POINTS percentage points on each of CONTROL_MATCH (prior_check.json of each world,
# clean greedy captions of the HalBench images and POPE random). If not, the mechanism claim's verdict is
# "inconclusive: control not matched", whatever its cells say (the excess over a mismatched control is not read).
CONTROL_MATCH_POINTS = 3.0
CONTROL_MATCH = ["recall", "other_absent_rate", "pope_random_accuracy"]


def control_match(prior_check, control_check):
    """{metric: (prior, control, within)} in percent from two prior_check.json dicts, and whether all match."""
    def get(c, m):
        return 100 * (c["pope"]["random"]["accuracy"] if m == "pope_random_accuracy" else c["rows"][0][m])
    table = {m: (get(prior_check, m), get(control_check, m)) for m in CONTROL_MATCH}
    table = {m: (a, b, abs(a - b) <= CONTROL_MATCH_POINTS) for m, (a, b) in table.items()}
    return table, all(ok for _, _, ok in table.values())


# Added before the fourth study (issue 35): in the third, the prior world's base named the absent partner barely more
# often than the control's (10.6 vs 9.4%), so there was no prior-driven error for BPO to remove, and "not reproduced"
# read as a finding about BPO. The mechanism claim is judged only on a base with the prior's error: the prior world's
# base names the absent partner of a present trigger at least PRIOR_EXCESS_POINTS percentage points more often than
# the control world's, and at least PRIOR_EXCESS_RATIO times as often. If not, the mechanism verdict is "inconclusive:
# no prior-driven error in the base", whatever its cells say.
# Changed before the fifth study: the rates are read on the partner probe (prior_check.json's partner_probe: clean
# greedy captions of 3,000 new images of HalBench's distribution, ~900 chances), no longer on the 300 HalBench images
# (66-92 chances: a rate's standard error ~4.5 points, near the 5-point threshold). Seed 0 of the fourth study's
# recipe read +2.4 points on HalBench and +4.5 on 3,000 images; with a 500-step alignment -1.2 and +12.9.
PRIOR_EXCESS_POINTS = 5.0
PRIOR_EXCESS_RATIO = 1.5


def prior_excess(prior_check, control_check):
    """(prior, control, prior - control): the bases' clean partner rates on the partner probe in percent from two
    prior_check.json dicts, and whether the prior world's exceeds the control's by the rule above (rounded to 1e-9:
    100 x 0.12 - 100 x 0.07 is 4.999999999999999 in floats, and must read 5)."""
    prior, control = (100 * c["partner_probe"]["partner_rate"] for c in (prior_check, control_check))
    ok = round(prior - control, 9) >= PRIOR_EXCESS_POINTS and round(prior - PRIOR_EXCESS_RATIO * control, 9) >= 0
    return (prior, control, prior - control), ok


def mechanism_verdict(verdict, control_matched, prior_excess_holds):
    """The mechanism claim's verdict: its cells' (claim_verdict) when the control world is matched (control_match)
    and the prior world's base has the prior's error (prior_excess); else inconclusive, the control's failure named
    first (an excess over an unmatched control means nothing)."""
    if not control_matched:
        return "inconclusive: control not matched"
    if not prior_excess_holds:
        return "inconclusive: no prior-driven error in the base"
    return verdict


# Fig. 7 (the paper: along BPO training the chosen answer's log-prob stays while the rejected one's falls; along
# SFT the target's rises). From 03's metrics.jsonl of the selected runs (every seed): the change of a log-prob
# is its mean over the last FIG7_WINDOW logged steps minus the first FIG7_WINDOW's. Reproduced when, in every
# seed, BPO's rejected log-prob falls (change < 0) by more than its chosen one changes (change_rejected <
# change_chosen) and SFT's target rises (change > 0); not reproduced when the mean over seeds of any of the
# three is in the other direction; otherwise inconclusive.
FIG7_WINDOW = 5


def fig7_verdict(bpo_chosen, bpo_rejected, sft_target):
    """Per-seed changes (lists, same seeds) -> verdict (rule above)."""
    c, r, t = map(np.asarray, (bpo_chosen, bpo_rejected, sft_target))
    if len(c) == 0 or len(t) == 0:
        return "n/a"
    if np.mean(r) >= 0 or np.mean(r) >= np.mean(c) or np.mean(t) <= 0:
        return "not reproduced"
    if np.all(r < 0) and np.all(r < c) and np.all(t > 0):
        return "reproduced"
    return "inconclusive"


# Fig. 8 (the paper: BPO above SFT at every data size). BPO and SFT at FIG8_SIZES items per seed (the first items of
# the main study's) and at the main study's --pairs (its own arms), each at its dev-selected learning rate and step
# (the same optimizer steps at every size: step-matched), every seed. One cell per size on toy MM-Vet (the paper's
# metric of Fig. 8), rule as a claim's cell; reproduced when every size is "yes", not reproduced when any is
# "reversed", otherwise inconclusive. Resp is reported beside it.
FIG8_SIZES = [125, 250]

# The authors' released sampler (contrastive: (1 + alpha) clean - alpha weakened logits, plausibility cut beta,
# temperature 0.2, pixels noised at step 900) against the paper's (features noised at the study's step, plain
# sampling): BPO on each kind alone (bpo_released vs bpo_weak). No claim of the paper is at stake: the cells are
# reported as differences (how hallucinated the negatives are, from 01's outputs, and what each trains);
# "differ" when a primary cell's interval excludes 0, otherwise "no difference shown".
RELEASED_FLAGS = ["--noise_on", "pixels", "--noise_step", 900, "--contrast_alpha", 1, "--contrast_beta", 0.2,
                  "--temperature", 0.2]
RELEASED_RULE = dict(primary=["mmvet", "resp"], secondary=["obj", "recall", "partner", "pope_adv_f1"])

# Dev split selection, the same budget for every trained method: learning rates DEV_LRS x checkpoints
# DEV_STEPS (of one run of --max_steps TRAIN_STEPS), seed 0, the prior world, scored on the dev split only
# (150 HalBench-style images, 120 MM-Vet-style questions; no test item). Pick the highest dev object F1
# (2PR/(P+R), P = 100 - Obj, R = recall) among candidates whose dev MM-Vet is at least the base model's
# minus DEV_MMVET_SLACK; if none qualifies, the highest dev MM-Vet.
DEV_LRS = [1e-4, 3e-4, 1e-3]
TRAIN_STEPS = 80
DEV_STEPS = [40, 80]
DEV_MMVET_SLACK = 5.0
CURVE_STEPS = [20, 40, 80]


def smoke():
    """A few steps per run: the study's plumbing on a --quick world, nothing to read in the numbers."""
    global TRAIN_STEPS, DEV_STEPS, CURVE_STEPS, DEV_LRS, B_REPLICATES
    global FIG8_SIZES, FIG7_WINDOW
    TRAIN_STEPS, DEV_STEPS, CURVE_STEPS, DEV_LRS, B_REPLICATES = 4, [2, 4], [1, 2, 4], [1e-4, 1e-3], 50
    FIG8_SIZES, FIG7_WINDOW = [16], 1


def object_f1(obj, recall):
    p = 100.0 - obj
    return 0.0 if p + recall == 0 else 2 * p * recall / (p + recall)


def select(candidates, base_mmvet):
    """candidates: [{"lr", "step", "obj", "recall", "mmvet"}] on dev -> the chosen one (rule above)."""
    ok = [c for c in candidates if c["mmvet"] >= base_mmvet - DEV_MMVET_SLACK]
    if ok:
        return max(ok, key=lambda c: (object_f1(c["obj"], c["recall"]), -c["step"], -c["lr"]))
    return max(candidates, key=lambda c: (c["mmvet"], -c["step"], -c["lr"]))


def bootstrap(diff_fn, n_seeds, n_items, seed=0):
    """(point, low, high) of diff_fn(seed_idx, item_idx) -> difference averaged over the seeds given:
    the point on all seeds and items, the interval over B_REPLICATES paired resamples of both."""
    rng = np.random.default_rng(seed)
    point = diff_fn(np.arange(n_seeds), np.arange(n_items))
    reps = [diff_fn(rng.integers(0, n_seeds, n_seeds), rng.integers(0, n_items, n_items))
            for _ in range(B_REPLICATES)]
    reps = np.asarray([r for r in reps if r is not None and np.isfinite(r)])
    if point is None or not np.isfinite(point) or len(reps) < B_REPLICATES // 2:
        return None
    a = (1 - CONFIDENCE) / 2
    return float(point), float(np.quantile(reps, a)), float(np.quantile(reps, 1 - a))


def cell(metric, interval):
    """'yes' / 'n.s.' / 'reversed' / 'n/a' for a difference a - b of `metric` (rule above)."""
    if interval is None:
        return "n/a"
    point, low, high = interval
    d = METRICS[metric][1] * point
    if d <= 0:
        return "reversed"
    return "yes" if (low > 0 or high < 0) else "n.s."


def claim_verdict(cells):
    """cells: primary metric -> cell."""
    if any(c == "reversed" for c in cells.values()):
        return "not reproduced"
    if all(c == "yes" for c in cells.values()):
        return "reproduced"
    return "inconclusive"


def variant_verdict(primary_cells, primary_intervals, guard_interval):
    guard_lower = guard_interval is not None and guard_interval[2] < 0  # MM-Vet significantly lower
    sig_reversed = any(c == "reversed" and iv is not None and (iv[1] > 0 or iv[2] < 0)
                       for c, iv in zip(primary_cells.values(), primary_intervals.values()))
    if guard_lower or sig_reversed:
        return "hurts"
    if all(c == "yes" for c in primary_cells.values()):
        return "helps"
    return "no evidence"
