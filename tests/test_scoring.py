"""scoring.py's shared counts and rates against hand-worked cases: the toy world's prior check, the study's
reader and Object HalBench all read them (each rule exists once)."""
import pytest

import scoring


def test_hallucination_counts_and_rates_by_hand():
    objects = ["cup", "plate", "fork", "knife", "ball"]
    chair = scoring.Chair(scoring.synonym_table("cup, cups, mug\nplate, plates\nfork, forks\nknife, knives\nball, balls"))
    captions = ["a cup and two plates and a mug", "a fork", "nothing here"]
    truths = [{"cup"}, {"fork", "ball"}, {"knife"}]
    lures = [{"plate"}, {"knife"}, set()]  # absent partners the prior pulls towards
    rows = [scoring.hallucination_counts([c for _, c in chair.mentions(cap)], t, lure, objects)
            for cap, t, lure in zip(captions, truths, lures)]
    # caption 1: mentions cup, plate, cup (mug) -> 3 mentions, 1 hallucinated (plate, the lure); others absent:
    # fork, knife, ball (3), none named. Caption 2: fork; lure knife not named; other absent: cup, plate (2).
    # Caption 3: no mention; others absent: cup, plate, fork, ball (4).
    assert [r["mentions"] for r in rows] == [3, 1, 0] and [r["hallucinated_mentions"] for r in rows] == [1, 0, 0]
    assert [r["other_chances"] for r in rows] == [3, 2, 4] and sum(r["others_named"] for r in rows) == 0
    rates = scoring.hallucination_rates(scoring.sum_counts(rows), scale=1)
    assert rates["chair_s"] == pytest.approx(1 / 3) and rates["chair_s_refine"] == pytest.approx(1 / 2)
    assert rates["chair_i"] == pytest.approx(1 / 4) and rates["recall"] == pytest.approx(2 / 4)
    assert rates["partner_rate"] == pytest.approx(1 / 2) and rates["other_absent_rate"] == 0.0
    assert rates["objects_per_caption"] == pytest.approx(4 / 3)
    assert scoring.hallucination_rates(scoring.sum_counts(rows))["chair_i"] == pytest.approx(25.0)  # percent


def test_pope_scores_by_hand():
    # 3 yes-labelled (2 answered yes), 2 no-labelled (1 answered yes): tp 2, fn 1, fp 1, tn 1
    s = scoring.pope_metrics(["yes", "yes", "yes", "no", "no"], ["Yes.", "yes", "No.", "Yes, there is.", "no"])
    assert s["accuracy"] == pytest.approx(60.0) and s["precision"] == pytest.approx(100 * 2 / 3)
    assert s["recall"] == pytest.approx(100 * 2 / 3) and s["f1"] == pytest.approx(100 * 2 / 3)
    assert s["yes_ratio"] == pytest.approx(60.0) and s["n"] == 5
    assert scoring.pope_scores(tp=0, fp=0, tn=2, fn=2)["f1"] == 0.0  # nothing said yes: no division by zero


def test_chair_keeps_hyphenated_compounds_whole():
    """As CHAIR's nltk tokeniser: a hyphen inside a word keeps it one word, so compounds name no object."""
    chair = scoring.Chair(scoring.synonym_table("person, man, woman, boy\nbird, swan\nboat\ndog\nhot dog"))
    assert chair.mentions("A man-made lake with a swan-shaped boat.") == [("boat", "boat")]
    assert chair.mentions("A well-dressed woman walks her dog-walker's dog.") == [("woman", "person"), ("dog", "dog")]
    assert chair.mentions("A hot-dog stand; a hot dog.") == [("hot dog", "hot dog")]
    assert chair.mentions("A three-year-old boy.") == [("boy", "person")]
    assert chair.mentions("Swans near a man - and a boat.") == [("swan", "bird"), ("man", "person"), ("boat", "boat")]


def test_published_synonym_tables_load_as_they_are(tmp_path):
    """RLHF-V's synonyms_refine.txt and CHAIR's table repeat entries within a class and hold capitals (`iPhone`):
    they load; CHAIR lower-cases the text and not the table, so the capitalised entry never matches; an entry
    in two classes and an empty entry are refused with file:line."""
    table = scoring.synonym_table("person, guy, man, guy\ncell phone, phone, iPhone\nsheep, lamb, ram, lamb")
    chair = scoring.Chair(table)
    assert chair.mentions("A guy holds an iPhone near a lamb.") == [("guy", "person"), ("lamb", "sheep")]
    assert chair.mentions("A phone and two lambs.") == [("phone", "cell phone"), ("lamb", "sheep")]
    with pytest.raises(scoring.DataError, match="syn:2: 'man' is already a synonym of 'person'"):
        scoring.synonym_table("person, man\nstatue, man", "syn")
    with pytest.raises(scoring.DataError, match="syn:1: .*empty"):
        scoring.synonym_table("person, , man", "syn")
