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

# Matched recall: each arm's curve is its checkpoints along training (step 0 = the base model); the say-less
# baseline's is the base model's captions cut to 1..4 object sentences. The comparison point is arm a's
# recall at its selected checkpoint; arm b's metric there is interpolated linearly between its two points
# that bracket it (never extrapolated: outside b's range the cell is "n/a", which counts as not "yes").
MATCHED_TEXT = ("arm b's curve (metric against recall) is interpolated at arm a's recall at its selected checkpoint, "
                "inside each bootstrap replicate; outside b's range of recall the cell is n/a")

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
    TRAIN_STEPS, DEV_STEPS, CURVE_STEPS, DEV_LRS, B_REPLICATES = 4, [2, 4], [1, 2, 4], [1e-4, 1e-3], 50


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
