"""POPE: LLaVA's yes/no rule and the metrics against hand-worked cases, bad input named by file:line,
several splits from one answers file, 07 on the toy world, and the toy's POPE files themselves."""
import json
import re

import pytest

from conftest import run_here, script

SPLITS = ["random", "popular", "adversarial"]
METRICS = {"accuracy", "precision", "recall", "f1", "yes_ratio", "n"}


def write_jsonl(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def pope_file(path, labels, image="a.jpg"):
    """A question file in POPE's published format (JSON lines in a .json file), ids from 1."""
    return write_jsonl(path, [{"question_id": i, "image": image, "text": "Is there a cup in the image?",
                               "label": lab} for i, lab in enumerate(labels, 1)])


def score(tmp_path, question_files, answers, *extra):
    out = tmp_path / "out"
    proc = run_here("07_eval_pope.py", "--questions", *question_files, "--answers",
                    write_jsonl(tmp_path / "given.jsonl", answers), "--out_dir", out, *extra)
    return proc, out


# answer, how LLaVA's rule reads it (worked out by hand from its eval_pope.py: the text before the first ".",
# commas removed, split on single spaces (text.split(' ')), the words No/no/not)
RULE_CASES = [
    ("No, there is not.", "no"),
    ("Yes.", "yes"),
    ("There is no cup. Yes", "no"),      # only the first sentence counts
    ("Yes. There is no cup.", "yes"),
    ("not sure", "no"),
    ("Nope", "yes"),                     # a word, not a prefix
    ("No,", "no"),                       # the comma goes, "No" stays
    ("No,there is a cup", "yes"),        # the comma goes and leaves the word "Nothere"
    ("NO", "yes"),                       # case-sensitive
    ("Not at all", "yes"),               # "Not" is not in the list
    ("I cannot see one", "yes"),
    ("yes, but not a red one", "no"),
    ("no\nthere is none", "yes"),        # split on single spaces only: "no\nthere" is one word
    ("no\tthere is none", "yes"),        # a tab joins words too
    ("there  is no cup", "no"),          # two spaces leave an empty word between, "no" stays a word
    ("No\n", "yes"),                     # "No\n" is not "No"
    ("no ,there is none", "no"),         # "no" and ",there" -> "there": "no" stays
    ("no .", "no"),                      # the toy model's form
    ("", "yes"),
]


def test_yes_no_rule(tmp_path):
    """One split per case, each a single question labelled yes: yes_ratio is 100 exactly when the
    answer is read as yes. Also: several splits from one answers file, split names without coco_pope_."""
    files = [pope_file(tmp_path / f"coco_pope_case{i}.json", ["yes"]) for i in range(len(RULE_CASES))]
    answers = [{"question_id": 1, "split": f"case{i}", "text": text} for i, (text, _) in enumerate(RULE_CASES)]
    proc, out = score(tmp_path, files, answers)
    assert proc.returncode == 0, proc.stderr
    scores = json.loads((out / "scores.json").read_text())
    assert sorted(scores) == sorted(f"case{i}" for i in range(len(RULE_CASES)))
    got = {text: "yes" if scores[f"case{i}"]["yes_ratio"] == 100 else "no" for i, (text, _) in enumerate(RULE_CASES)}
    assert got == dict(RULE_CASES)
    for i, (_, read) in enumerate(RULE_CASES):
        assert scores[f"case{i}"]["accuracy"] == (100 if read == "yes" else 0)


def test_metrics_hand_computed(tmp_path):
    """Two splits with the same question ids (keyed by split + id), answers in LLaVA's format."""
    a = pope_file(tmp_path / "coco_pope_a.json", ["yes"] * 4 + ["no"] * 6)
    b = pope_file(tmp_path / "b.json", ["yes", "no", "no"])
    said_a = ["Yes", "Yes.", "Yes, there is.", "No", "Yes", "Yes", "No", "No", "There is not.", "no"]
    answers = [{"question_id": i, "split": "a", "text": t} for i, t in enumerate(said_a, 1)]
    answers += [{"question_id": i, "split": "b", "text": "No."} for i in (3, 1, 2)]  # any order
    proc, out = score(tmp_path, [a, b], answers)
    assert proc.returncode == 0, proc.stderr
    scores = json.loads((out / "scores.json").read_text())
    # a: labels yes x4 -> read yes, yes, yes, no (TP 3, FN 1); labels no x6 -> yes, yes, no x4 (FP 2, TN 4)
    # accuracy 7/10, precision 3/5, recall 3/4, f1 2*.6*.75/1.35 = 2/3, yes 5 of 10
    assert scores["a"] == pytest.approx({"accuracy": 70.0, "precision": 60.0, "recall": 75.0, "f1": 200 / 3,
                                         "yes_ratio": 50.0, "n": 10})
    # b: everything read as no: TP 0, FN 1, TN 2; no yes at all, so precision, recall and f1 are 0
    assert scores["b"] == pytest.approx({"accuracy": 200 / 3, "precision": 0.0, "recall": 0.0, "f1": 0.0,
                                         "yes_ratio": 0.0, "n": 3})
    copied = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(copied) == 13 and {(r["split"], r["question_id"]) for r in copied} == \
        {("a", i) for i in range(1, 11)} | {("b", i) for i in (1, 2, 3)}
    assert "mean" in proc.stdout and "adversarial" not in scores


def test_single_split_needs_no_split_field(tmp_path):
    q = pope_file(tmp_path / "coco_pope_random.json", ["yes", "no"])
    proc, out = score(tmp_path, [q], [{"question_id": 1, "text": "Yes"}, {"question_id": 2, "answer": "Yes"}])
    assert proc.returncode == 0, proc.stderr
    s = json.loads((out / "scores.json").read_text())
    assert list(s) == ["random"] and s["random"]["accuracy"] == 50.0 and s["random"]["yes_ratio"] == 100.0


GOOD = {"question_id": 1, "image": "a.jpg", "text": "Is there a cup in the image?", "label": "yes"}


@pytest.mark.parametrize("lines, bad_line, words", [
    ([GOOD, "{not json"], 2, "JSON"),
    ([GOOD, {**GOOD, "question_id": 2}, {k: v for k, v in GOOD.items() if k != "image"}], 3, "image"),
    ([{**GOOD, "label": "Yes"}], 1, "label"),
    ([GOOD, {**GOOD, "label": None, "question_id": 2}], 2, "label"),
    ([GOOD, {**GOOD, "text": "  "}], 2, "text"),
    ([GOOD, {**GOOD, "question_id": True}], 2, "question_id"),
    ([GOOD, {**GOOD, "label": "no"}], 2, "twice"),
])
def test_bad_questions_name_file_and_line(tmp_path, lines, bad_line, words):
    q = tmp_path / "coco_pope_random.json"
    q.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    proc, _ = score(tmp_path, [q], [{"question_id": 1, "text": "yes"}])
    assert proc.returncode != 0
    assert f"{q}:{bad_line}:" in proc.stderr and words in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.parametrize("answers, bad_line, words", [
    ([{"question_id": 1, "split": "a", "text": "yes"}, {"question_id": 1, "text": "no"}], 2, "split"),
    ([{"question_id": 1, "split": "a", "text": "yes"}, {"question_id": 1, "split": "a", "text": "no"}], 2, "twice"),
    ([{"question_id": 1, "split": "a", "text": "yes"}, {"question_id": 9, "split": "b", "text": "no"}], 2, "no question"),
    ([{"question_id": 1, "split": "a", "text": "yes"}, {"question_id": 1, "split": "c", "text": "no"}], 2, "no question"),
    ([{"question_id": 1, "split": "a", "text": 3}], 1, "text"),
])
def test_bad_answers_name_file_and_line(tmp_path, answers, bad_line, words):
    files = [pope_file(tmp_path / "coco_pope_a.json", ["yes"]), pope_file(tmp_path / "coco_pope_b.json", ["no"])]
    proc, _ = score(tmp_path, files, answers)
    assert proc.returncode != 0
    assert f"given.jsonl:{bad_line}:" in proc.stderr and words in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_missing_answers_and_repeated_split(tmp_path):
    files = [pope_file(tmp_path / "coco_pope_a.json", ["yes", "no"])]
    proc, _ = score(tmp_path, files, [{"question_id": 1, "text": "yes"}])
    assert proc.returncode != 0 and "1 of 2 questions have no answer" in proc.stderr and "coco_pope_a.json:2" in proc.stderr
    (tmp_path / "x").mkdir()
    again = pope_file(tmp_path / "x" / "a.json", ["yes"])
    proc, _ = score(tmp_path, files + [again], [{"question_id": 1, "split": "a", "text": "yes"}])
    assert proc.returncode != 0 and "given twice" in proc.stderr


# ----------------------------------------------------------------------------- the toy world


def toy_questions(toy, split):
    lines = (toy / "pope" / f"coco_pope_{split}.json").read_text().splitlines()
    return [json.loads(line) for line in lines]


def asked_object(q):
    m = re.fullmatch(r"Is there an? (\w+) in the image\?", q["text"])
    assert m, q["text"]
    return m.group(1)


def test_toy_pope_files(toy):
    world = json.loads((toy / "world.json").read_text())
    partners, vocab = world["partners"], set(world["vocabulary"])
    train = [{o["name"] for o in im["objects"]} for im in world["images"].values() if im["split"] == "train"]
    freq = {x: sum(x in s for s in train) for x in world["objects"]}
    files, with_lures, without_lures = {}, 0, 0
    for split in SPLITS:
        qs = toy_questions(toy, split)
        assert [q["question_id"] for q in qs] == list(range(1, len(qs) + 1))
        assert sum(q["label"] == "yes" for q in qs) == sum(q["label"] == "no" for q in qs) > 0
        by_image = {}
        for q in qs:
            present = {o["name"] for o in world["images"][q["image"]]["objects"]}
            assert world["images"][q["image"]]["split"] == "halbench"
            assert (toy / "images" / q["image"]).is_file()
            assert (asked_object(q) in present) == (q["label"] == "yes")
            assert all(w in vocab for w in re.findall(r"\w+|[^\w\s]", q["text"].lower()))
            by_image.setdefault(q["image"], {"yes": [], "no": []})[q["label"]].append(asked_object(q))
        files[split] = by_image
        for image, asked in by_image.items():
            present = {o["name"] for o in world["images"][image]["objects"]}
            absent = set(world["objects"]) - present
            assert len(asked["yes"]) == len(asked["no"]) == min(3, len(present))
            assert len(set(asked["no"])) == len(asked["no"])
            if split == "popular":  # the most frequent absent objects in the training images
                rest = absent - set(asked["no"])
                assert min(freq[x] for x in asked["no"]) >= max(freq[x] for x in rest)
            if split == "adversarial":  # every absent partner of a present trigger, as far as there is room
                lures = {partners[t] for t in present if t in partners} - present
                assert lures <= set(asked["no"]) or set(asked["no"]) <= lures
                with_lures, without_lures = with_lures + bool(lures), without_lures + (not lures)
    assert with_lures and without_lures  # both branches of adversarial are exercised
    assert files["random"].keys() == files["popular"].keys() == files["adversarial"].keys() == \
        {name for name, im in world["images"].items() if im["split"] == "halbench"}
    for image in files["random"]:  # the same present objects in every split
        assert files["random"][image]["yes"] == files["popular"][image]["yes"] == files["adversarial"][image]["yes"]
    assert any(files["random"][i]["no"] != files["popular"][i]["no"] for i in files["random"])


def test_pope_on_toy(toy, tmp_path):
    questions = [toy / "pope" / f"coco_pope_{s}.json" for s in SPLITS]
    common = ["--model", toy / "model", "--questions", *questions, "--image_dir", toy / "images",
              "--out_dir", tmp_path / "pope", "--max_new_tokens", 8, "--prompt_suffix", ""]
    proc = run_here("07_eval_pope.py", *common)
    assert proc.returncode == 0, proc.stderr
    scores = json.loads((tmp_path / "pope" / "scores.json").read_text())
    assert list(scores) == SPLITS
    for split in SPLITS:
        assert set(scores[split]) == METRICS
        assert scores[split]["n"] == len(toy_questions(toy, split))
        assert all(0 <= scores[split][m] <= 100 for m in METRICS - {"n"})
    answers = [json.loads(line) for line in (tmp_path / "pope" / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == sum(s["n"] for s in scores.values())
    assert all(a["question"].endswith("in the image?") for a in answers)
    # a rerun answers nothing again, and the answers scored as given reproduce the scores
    again = run_here("07_eval_pope.py", *common)
    assert again.returncode == 0 and "already answered" in again.stdout
    given = write_jsonl(tmp_path / "given.jsonl", [{"question_id": a["question_id"], "split": a["split"],
                                                    "text": a["answer"]} for a in answers])
    proc = run_here("07_eval_pope.py", "--questions", *questions, "--answers", given, "--out_dir", tmp_path / "given")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "given" / "scores.json").read_text()) == scores
    # a settings change is refused rather than mixed into the cache
    other = run_here("07_eval_pope.py", *common[:-1], "\nAnswer the question using a single word or phrase.")
    assert other.returncode != 0 and "other settings" in other.stderr


def test_llava_layout_question_file_annotation_dir_and_one_answer_file(tmp_path):
    """LLaVA's POPE layout, as its eval_pope.py reads it: one question file with a category per question (ids
    unique over it, no labels), POPE's coco_pope_<category>.json label files in an annotation folder (a
    category's labels in file order), and one answer file for every category."""
    ann = tmp_path / "coco"
    ann.mkdir()
    labels = {"random": ["yes", "no", "no"], "adversarial": ["yes", "no"]}
    for split, labs in labels.items():
        write_jsonl(ann / f"coco_pope_{split}.json", [{"question_id": i, "image": f"{split}{i}.jpg", "label": lab,
                                                       "text": "Is there a cup in the image?"}
                                                      for i, lab in enumerate(labs, 1)])
    questions = [{"question_id": n, "image": f"{split}{i}.jpg", "category": split,
                  "text": "Is there a cup in the image?\nAnswer the question using a single word or phrase."}
                 for n, (split, i) in enumerate([("random", 1), ("random", 2), ("adversarial", 1), ("random", 3),
                                                 ("adversarial", 2)], 101)]
    qfile = write_jsonl(tmp_path / "llava_pope_test.jsonl", questions)
    said = {101: "Yes", 102: "No", 103: "Yes", 104: "Yes", 105: "Yes"}  # as model_vqa_loader writes them
    answers = write_jsonl(tmp_path / "answers.jsonl", [{"question_id": q, "prompt": "p", "text": t, "answer_id": "x",
                                                        "model_id": "m", "metadata": {}} for q, t in said.items()])
    out = tmp_path / "out"
    proc = run_here("07_eval_pope.py", "--questions", qfile, "--annotation_dir", ann, "--answers", answers,
                    "--out_dir", out)
    assert proc.returncode == 0, proc.stderr
    scores = json.loads((out / "scores.json").read_text())
    # random: labels yes, no, no -> read yes, no, yes: TP 1, TN 1, FP 1; adversarial: yes, no -> yes, yes: TP 1, FP 1
    assert scores["random"] == pytest.approx({"accuracy": 200 / 3, "precision": 50.0, "recall": 100.0,
                                              "f1": 200 / 3, "yes_ratio": 200 / 3, "n": 3})
    assert scores["adversarial"] == pytest.approx({"accuracy": 50.0, "precision": 50.0, "recall": 100.0,
                                                   "f1": 200 / 3, "yes_ratio": 100.0, "n": 2})
    # the suffix LLaVA's file carries already is not appended again
    read, _ = script("07_eval_pope.py").read_questions([qfile], "\nAnswer the question using a single word or phrase.",
                                                       ann)
    assert all(q["question"].count("single word or phrase") == 1 for q in read)
    # a label file out of step with the questions is named; so is a missing --annotation_dir
    write_jsonl(ann / "coco_pope_adversarial.json", [{"question_id": 1, "image": "adversarial2.jpg", "label": "no"},
                                                     {"question_id": 2, "image": "adversarial1.jpg", "label": "yes"}])
    proc = run_here("07_eval_pope.py", "--questions", qfile, "--annotation_dir", ann, "--answers", answers,
                    "--out_dir", out)
    assert proc.returncode != 0 and f"{ann / 'coco_pope_adversarial.json'}:1:" in proc.stderr
    proc = run_here("07_eval_pope.py", "--questions", qfile, "--answers", answers, "--out_dir", out)
    assert proc.returncode != 0 and "--annotation_dir" in proc.stderr and "Traceback" not in proc.stderr
