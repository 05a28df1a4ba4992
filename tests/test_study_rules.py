"""The study's verdict rules (experiments/rules.py): the cells, the claim verdicts, the dev selection, and the
paired bootstrap against an independent normal-theory interval."""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
import rules  # noqa: E402


@pytest.mark.parametrize("metric,interval,expected", [
    ("resp", (-3.0, -5.0, -1.0), "yes"),        # lower is better, significantly lower
    ("resp", (-3.0, -6.0, 0.5), "n.s."),        # lower, interval includes 0
    ("resp", (2.0, -1.0, 5.0), "reversed"),     # higher: against the paper, significant or not
    ("resp", (0.0, -1.0, 1.0), "reversed"),     # no difference is not the paper's improvement
    ("mmvet", (4.0, 1.0, 7.0), "yes"),          # higher is better
    ("mmvet", (-4.0, -7.0, -1.0), "reversed"),
    ("mmvet", None, "n/a"),
])
def test_cell(metric, interval, expected):
    assert rules.cell(metric, interval) == expected


def test_claim_verdict():
    assert rules.claim_verdict({"mmvet": "yes", "resp": "yes"}) == "reproduced"
    assert rules.claim_verdict({"mmvet": "yes", "resp": "n.s."}) == "inconclusive"
    assert rules.claim_verdict({"mmvet": "yes", "resp": "n/a"}) == "inconclusive"
    assert rules.claim_verdict({"mmvet": "reversed", "resp": "yes"}) == "not reproduced"


def test_variant_verdict():
    yes = {"pope_adv_f1": "yes", "partner@recall": "yes"}
    ivs = {"pope_adv_f1": (2, 1, 3), "partner@recall": (-2, -3, -1)}
    assert rules.variant_verdict(yes, ivs, (0.5, -1, 2)) == "helps"
    assert rules.variant_verdict(yes, ivs, (-3, -5, -1)) == "hurts"  # MM-Vet significantly lower
    rev = {"pope_adv_f1": "reversed", "partner@recall": "yes"}
    assert rules.variant_verdict(rev, {**ivs, "pope_adv_f1": (-2, -3, -1)}, None) == "hurts"
    assert rules.variant_verdict(rev, {**ivs, "pope_adv_f1": (-2, -4, 1)}, None) == "no evidence"


def test_select_respects_the_mmvet_guard():
    cands = [{"lr": 1e-3, "step": 80, "obj": 5.0, "recall": 90.0, "mmvet": 30.0},   # best F1, MM-Vet too low
             {"lr": 1e-4, "step": 80, "obj": 20.0, "recall": 80.0, "mmvet": 48.0},
             {"lr": 3e-4, "step": 40, "obj": 15.0, "recall": 80.0, "mmvet": 46.0}]
    assert rules.select(cands, base_mmvet=50.0) is cands[2]
    assert rules.select(cands, base_mmvet=90.0) is cands[1]  # none passes: the highest MM-Vet
    assert rules.object_f1(20.0, 80.0) == pytest.approx(80.0)


def test_bootstrap_matches_a_normal_interval_and_pairs_items():
    rng = np.random.default_rng(1)
    n = 400
    a = rng.normal(1.0, 2.0, n)
    b = a - 0.5 + rng.normal(0, 0.5, n)  # paired: the difference has sd 0.5, far less than each arm's 2
    point, low, high = rules.bootstrap(lambda si, idx: float(np.mean(a[idx] - b[idx])), 1, n, seed=3)
    d = a - b
    half = 1.96 * d.std(ddof=1) / np.sqrt(n)
    assert point == pytest.approx(d.mean())
    assert low == pytest.approx(d.mean() - half, abs=0.25 * half)
    assert high == pytest.approx(d.mean() + half, abs=0.25 * half)
    # unpaired resampling would give an interval ~4x wider: the pairing is what the rule says
    assert high - low < 2.6 * half


def test_bootstrap_resamples_seeds():
    per_seed = np.array([0.0, 1.0, 2.0])  # the difference in each seed, no item noise
    point, low, high = rules.bootstrap(lambda si, idx: float(per_seed[si].mean()), 3, 10, seed=0)
    assert point == pytest.approx(1.0)
    assert low < 0.5 and high > 1.5  # seed spread enters the interval


def check(recall, other, pope):
    return {"rows": [{"recall": recall, "other_absent_rate": other}], "pope": {"random": {"accuracy": pope}}}


def test_control_match_is_within_three_points_on_each():
    table, ok = rules.control_match(check(0.90, 0.03, 0.80), check(0.88, 0.05, 0.78))
    assert ok and table["recall"][:2] == pytest.approx((90.0, 88.0))
    table, ok = rules.control_match(check(0.90, 0.03, 0.80), check(0.90, 0.03, 0.765))  # POPE 3.5 points off
    assert not ok and not table["pope_random_accuracy"][2] and table["recall"][2]


def test_fig7_verdict():
    # rejected falls more than chosen in every seed, SFT's target rises in every seed
    assert rules.fig7_verdict([-0.1, 0.0, 0.1], [-2.0, -1.0, -3.0], [1.0, 0.5, 2.0]) == "reproduced"
    assert rules.fig7_verdict([-0.1, 0.0, 0.1], [-2.0, 0.2, -3.0], [1.0, 0.5, 2.0]) == "inconclusive"  # one seed up
    assert rules.fig7_verdict([-3.0, -3.0, -3.0], [-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]) == "not reproduced"
    assert rules.fig7_verdict([0.0], [-1.0], [-0.5]) == "not reproduced"  # SFT's target falls
    assert rules.fig7_verdict([], [], []) == "n/a"


def test_matched_point_moves_inside_both_curves():
    # a's own recall where b's curve reaches it
    assert rules.matched_point(70.0, (40.0, 75.0), (50.0, 90.0)) == 70.0
    # above b's highest point: b's highest, which a's curve also reaches
    assert rules.matched_point(95.0, (40.0, 95.0), (50.0, 90.0)) == 90.0
    # below b's lowest: b's lowest
    assert rules.matched_point(45.0, (40.0, 80.0), (50.0, 90.0)) == 50.0
    # curves with no recall in common: no point
    assert rules.matched_point(45.0, (40.0, 48.0), (50.0, 90.0)) is None


def partner(rate):  # the HalBench rows' rate is not the rule's: the partner probe's is
    return {"rows": [{"partner_rate": 1 - rate}], "partner_probe": {"partner_rate": rate}}


@pytest.mark.parametrize("prior,control,holds", [
    (0.20, 0.10, True),    # +10 points, 2x
    (0.12, 0.07, True),    # +5 points exactly (4.999999999999999 in floats), 1.71x
    (0.15, 0.10, True),    # +5 points and 1.5x, both exactly at the rule's edge
    (0.14, 0.10, False),   # +4 points (and 1.4x)
    (0.30, 0.26, False),   # +4 points at 1.15x
    (0.35, 0.28, False),   # +7 points but only 1.25x: the ratio fails
    (0.08, 0.03, True),    # +5 points at 2.7x
    (0.106, 0.094, False),  # the third study's worlds (10.6 vs 9.4)
    (0.071, 0.106, False),  # the AVX2 machine's order, flipped
])
def test_prior_excess_needs_five_points_and_one_and_a_half_times(prior, control, holds):
    (p, c, d), ok = rules.prior_excess(partner(prior), partner(control))
    assert ok is holds
    assert (p, c, d) == pytest.approx((100 * prior, 100 * control, 100 * (prior - control)))


def test_mechanism_verdict_needs_a_matched_control_and_the_prior_error():
    assert rules.mechanism_verdict("not reproduced", True, True) == "not reproduced"
    assert rules.mechanism_verdict("reproduced", True, True) == "reproduced"
    assert rules.mechanism_verdict("reproduced", True, False) == "inconclusive: no prior-driven error in the base"
    assert rules.mechanism_verdict("not reproduced", True, False) == "inconclusive: no prior-driven error in the base"
    # an unmatched control is named first: the excess over it means nothing
    assert rules.mechanism_verdict("reproduced", False, False) == "inconclusive: control not matched"
    assert rules.mechanism_verdict("reproduced", False, True) == "inconclusive: control not matched"
