"""Object HalBench as RLHF-V/RLAIF-V run it: their published question file (base64 images, the line
index as question id), COCO 2014 ground truth with train and val merged, Resp over the responses
that name an object (chair_s_refine), their answer files matched by image_id, and their decoding
(beams) recorded with each answer. Expectations are worked out by hand."""
import base64
import io
import json

import pytest
from PIL import Image

from conftest import run_here

HALBENCH = "05_eval_halbench.py"


def write_json(path, obj):
    path.write_text(json.dumps(obj))
    return path


def write_jsonl(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def error_line(proc, expected):
    """The one-line reason of a failed run, which must hold `expected`."""
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert expected in proc.stderr, proc.stderr[-3000:]
    return proc.stderr


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def coco(tmp_path, splits):
    """A tiny COCO 2014 annotations folder. splits: {split: (instances {image id: [category]},
    captions {image id: [caption]})}."""
    ann = tmp_path / "coco" / "annotations"
    ann.mkdir(parents=True, exist_ok=True)
    names = sorted({c for inst, _ in splits.values() for cats in inst.values() for c in cats})
    category = {name: i + 1 for i, name in enumerate(names)}
    for split, (inst, caps) in splits.items():
        images = [{"id": i, "file_name": f"COCO_{split}2014_{i:012d}.jpg"} for i in sorted(set(inst) | set(caps))]
        write_json(ann / f"instances_{split}2014.json", {
            "images": images, "categories": [{"id": i, "name": n} for n, i in category.items()],
            "annotations": [{"image_id": i, "category_id": category[c]} for i, cats in inst.items() for c in cats]})
        write_json(ann / f"captions_{split}2014.json", {
            "images": images, "annotations": [{"image_id": i, "caption": c} for i, cs in caps.items() for c in cs]})
    return tmp_path / "coco"


def jpeg_base64(colour):
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buf, format="JPEG")
    return base64.b64encode(buf.getvalue()).decode()


# three COCO images: 11 and 12 in val2014, 13 only in train2014
COCO_SPLITS = {"val": ({11: ["dog", "person"], 12: ["cup"]}, {11: ["A man walks his dog."], 12: ["A cup on a table."]}),
               "train": ({13: ["cat"]}, {13: ["A cat sleeps on a couch."]})}


def published_questions(path, image_ids=(11, 12, 13)):
    """RLHF-V/RLAIF-V's obj_halbench_300_with_image.jsonl format: no question_id, a base64 JPEG."""
    prompts = ["Describe this image in detail.", "What is happening in this image?", "Provide a thorough description."]
    return write_jsonl(path, [{"image_id": i, "question": q, "image": jpeg_base64(c)}
                              for i, q, c in zip(image_ids, prompts, ["red", "green", "blue"])])


# ----------------------------------------------------------------------------- chair_s_refine


def test_chair_s_refine_leaves_out_responses_that_name_no_object(tmp_path):
    cases = [("A dog and a cat play.", ["dog"]),                      # names objects, hallucinates the cat
             ("A sunny sky over green hills.", ["bench"]),            # names no object
             ("A man sits on a bench.", ["person", "bench"]),         # names objects, all present
             ("The sky is blue and the grass is green.", ["dog"]),    # names no object
             ("A cat.", ["dog"])]                                     # names an object, hallucinated
    answers = write_jsonl(tmp_path / "a.jsonl", [{"question_id": i, "image": f"im{i}.jpg", "answer": a}
                                                 for i, (a, _) in enumerate(cases)])
    objects = write_json(tmp_path / "objects.json", {f"im{i}.jpg": t for i, (_, t) in enumerate(cases)})
    proc = ok(run_here(HALBENCH, "--answers", answers, "--objects", objects, "--out_dir", tmp_path / "o"))
    scores = json.loads((tmp_path / "o" / "scores.json").read_text())
    assert scores.pop("extractor") == "rules"
    # 2 hallucinated responses of 5; of the 3 that name an object; mentions 2+0+2+0+1 = 5, hallucinated 2;
    # ground truth 1+1+2+1+1 = 6, recalled 1+0+2+0+0 = 3; words 6+6+6+9+2 = 29
    assert scores == pytest.approx({"chair_s": 40.0, "chair_s_refine": 100 * 2 / 3, "n_with_objects": 3,
                                    "chair_i": 40.0, "recall": 50.0, "avg_len": 29 / 5, "n": 5})
    printed = " ".join(proc.stdout.split())
    assert "Resp chair_s 40.0" in printed and "Resp chair_s_refine 66.7" in printed
    assert "5 responses, 3 of them name a COCO object" in printed


def test_chair_s_refine_is_zero_when_no_response_names_an_object(tmp_path):
    answers = write_jsonl(tmp_path / "a.jsonl", [{"question_id": 0, "image": "a.jpg", "answer": "Blue sky."}])
    objects = write_json(tmp_path / "objects.json", {"a.jpg": ["dog"]})
    ok(run_here(HALBENCH, "--answers", answers, "--objects", objects, "--out_dir", tmp_path / "o"))
    scores = json.loads((tmp_path / "o" / "scores.json").read_text())
    assert scores["chair_s_refine"] == 0.0 and scores["n_with_objects"] == 0 and scores["n"] == 1


# ----------------------------------------------------------------------------- COCO 2014, train and val merged


def test_coco_ground_truth_merges_train_and_val(tmp_path):
    splits = {**COCO_SPLITS, "train": ({13: ["cat"], 11: ["frisbee"]}, {13: ["A cat sleeps on a couch."],
                                                                       11: ["Two people and a kite."]})}
    coco_dir = coco(tmp_path, splits)
    answers = write_jsonl(tmp_path / "a.jsonl", [
        {"question_id": 0, "image": "COCO_val2014_000000000011.jpg", "answer": "A dog, a kite and a bird."},
        {"question_id": 1, "image_id": 13, "text": "A cat on a sofa next to a dog."},  # RLAIF-V's form
        {"question_id": 2, "image": "COCO_val2014_000000000012.jpg", "answer": "A cup and a wine glass."}])
    ok(run_here(HALBENCH, "--answers", answers, "--coco_dir", coco_dir, "--out_dir", tmp_path / "o"))
    d = jsonl(tmp_path / "o" / "details.jsonl")
    # 11: val's instances and caption (dog, person; "man") + train's (frisbee; "people", "kite")
    assert d[0]["ground_truth"] == ["dog", "frisbee", "kite", "person"] and d[0]["hallucinated"] == ["bird"]
    # 13 is only in train2014: its instances (cat) and its caption's couch; "sofa" is a couch
    assert d[1]["ground_truth"] == ["cat", "couch"] and d[1]["hallucinated"] == ["dog"]
    assert d[1]["image_id"] == 13 and "image" not in d[1]
    assert d[2]["ground_truth"] == ["cup", "dining table"] and d[2]["hallucinated"] == ["wine glass"]


def test_coco_either_split_alone_works_and_a_missing_image_is_named(tmp_path):
    answers = write_jsonl(tmp_path / "a.jsonl", [{"question_id": 0, "image_id": 13, "text": "A cat."},
                                                 {"question_id": 0, "image_id": "11", "text": "A dog."}])
    for split, line, missing in (("train", 2, 11), ("val", 1, 13)):
        coco_dir = coco(tmp_path / split, {split: COCO_SPLITS[split]})
        error_line(run_here(HALBENCH, "--answers", answers, "--coco_dir", coco_dir, "--out_dir", tmp_path / "o"),
                   f"{answers}:{line}: no ground truth for image {missing} in {coco_dir} (1 of the 2 to score lack it)")
    one = write_jsonl(tmp_path / "one.jsonl", [{"question_id": 0, "image_id": "11", "text": "A dog."}])
    ok(run_here(HALBENCH, "--answers", one, "--coco_dir", tmp_path / "val" / "coco", "--out_dir", tmp_path / "v"))
    assert jsonl(tmp_path / "v" / "details.jsonl")[0]["ground_truth"] == ["dog", "person"]
    empty = tmp_path / "empty" / "annotations"
    empty.mkdir(parents=True)
    error_line(run_here(HALBENCH, "--answers", one, "--coco_dir", empty.parent, "--out_dir", tmp_path / "e"),
               "neither instances_train2014.json nor instances_val2014.json")
    noid = write_jsonl(tmp_path / "noid.jsonl", [{"question_id": 0, "image": "im.jpg", "answer": "A dog."}])
    error_line(run_here(HALBENCH, "--answers", noid, "--coco_dir", tmp_path / "val" / "coco", "--out_dir",
                        tmp_path / "n"), f"{noid}:1: no COCO id")


# ----------------------------------------------------------------------------- the published question file


def test_published_base64_questions_end_to_end(toy, tmp_path):
    questions = published_questions(tmp_path / "obj_halbench_300_with_image.jsonl")
    coco_dir = coco(tmp_path, COCO_SPLITS)
    out = tmp_path / "hal"
    args = ["--model", toy / "model", "--questions", questions, "--coco_dir", coco_dir, "--out_dir", out,
            "--max_new_tokens", 4, "--batch_size", 2]
    ok(run_here(HALBENCH, *args, "--num_beams", 2))  # no --image_dir: the images are in the file
    answers = jsonl(out / "answers.jsonl")
    assert [a["question_id"] for a in answers] == [0, 1, 2] and [a["image_id"] for a in answers] == [11, 12, 13]
    assert all(a["num_beams"] == 2 and a["max_new_tokens"] == 4 and "image" not in a for a in answers)
    assert not any(json.loads(q)["image"] in (out / "answers.jsonl").read_text()
                   for q in questions.read_text().splitlines())  # the base64 stays out
    scores = json.loads((out / "scores.json").read_text())
    assert scores["n"] == 3 and set(scores) == {"chair_s", "chair_s_refine", "chair_i", "recall", "avg_len", "n",
                                                "n_with_objects", "extractor"}
    details = jsonl(out / "details.jsonl")
    assert [d["ground_truth"] for d in details] == [["dog", "person"], ["cup", "dining table"], ["cat", "couch"]]
    assert "3 already answered" in ok(run_here(HALBENCH, *args, "--num_beams", 2)).stdout
    error_line(run_here(HALBENCH, *args), "other settings")  # 3 beams (the default) do not mix with 2
    # its answers (question_id + image_id, no image) score the same through --answers, with or without questions
    for extra in ([], ["--questions", questions]):
        ok(run_here(HALBENCH, "--answers", out / "answers.jsonl", "--coco_dir", coco_dir, "--out_dir",
                    tmp_path / "again", *extra))
        assert json.loads((tmp_path / "again" / "scores.json").read_text()) == scores


@pytest.mark.parametrize("case", ["not base64", "not an image", "no image_id"])
def test_bad_published_line_stops_naming_file_and_line(tmp_path, case):
    questions = published_questions(tmp_path / "q.jsonl")
    lines = questions.read_text().splitlines()
    bad = json.loads(lines[1])
    if case == "not base64":
        bad["image"] = "images/COCO_val2014_000000000012.jpg"
    elif case == "not an image":
        bad["image"] = base64.b64encode(b"these bytes are no JPEG").decode()
    else:
        del bad["image_id"]
    questions.write_text("\n".join([lines[0], json.dumps(bad), lines[2]]) + "\n")
    proc = run_here(HALBENCH, "--model", "never-loaded", "--questions", questions, "--coco_dir",
                    coco(tmp_path, COCO_SPLITS), "--out_dir", tmp_path / "o")
    error_line(proc, f"{questions}:2:")
    assert not (tmp_path / "o" / "answers.jsonl").exists()


def test_questions_with_image_paths_still_need_image_dir_and_their_files(tmp_path):
    questions = write_jsonl(tmp_path / "q.jsonl", [{"question_id": "a", "image": "a.jpg", "question": "Describe."}])
    objects = write_json(tmp_path / "objects.json", {"a.jpg": ["dog"]})
    args = ["--model", "never-loaded", "--questions", questions, "--objects", objects, "--out_dir", tmp_path / "o"]
    error_line(run_here(HALBENCH, *args), "--image_dir")
    error_line(run_here(HALBENCH, *args, "--image_dir", tmp_path), f"{questions}:1:")  # a.jpg is not there


# ----------------------------------------------------------------------------- RLAIF-V's answer files


def rlaifv_answers(path, image_ids, texts):
    """Two GPU chunks concatenated: question_id restarts at 0 in the second."""
    chunk = (len(image_ids) + 1) // 2
    return write_jsonl(path, [{"question_id": i % chunk, "image_id": im, "prompt": "Describe this image in detail.",
                               "text": t, "model_id": "llava-v1.5-7b"} for i, (im, t) in enumerate(zip(image_ids, texts))])


def test_rlaifv_answers_are_matched_to_questions_by_image_id(tmp_path):
    questions = published_questions(tmp_path / "q.jsonl")
    coco_dir = coco(tmp_path, COCO_SPLITS)
    answers = rlaifv_answers(tmp_path / "obj_halbench_answer.jsonl", [13, 11, 12],
                             ["A cat on a couch.", "A man and a dog with a frisbee.", "A cup."])
    ok(run_here(HALBENCH, "--answers", answers, "--questions", questions, "--coco_dir", coco_dir,
                "--out_dir", tmp_path / "o"))
    # the published file's line index is the question id: 13 is line 3 (id 2), 11 id 0, 12 id 1
    assert [(a["question_id"], a["image_id"]) for a in jsonl(tmp_path / "o" / "answers.jsonl")] == \
        [(2, 13), (0, 11), (1, 12)]
    d = jsonl(tmp_path / "o" / "details.jsonl")
    assert [x["hallucinated"] for x in d] == [[], ["frisbee"], []]
    scores = json.loads((tmp_path / "o" / "scores.json").read_text())
    assert scores["chair_s"] == pytest.approx(100 / 3) and scores["chair_s_refine"] == pytest.approx(100 / 3)
    # without --questions the image_id alone finds the ground truth; the repeated question_id is no duplicate
    ok(run_here(HALBENCH, "--answers", answers, "--coco_dir", coco_dir, "--out_dir", tmp_path / "alone"))
    assert json.loads((tmp_path / "alone" / "scores.json").read_text()) == scores


@pytest.mark.parametrize("case", ["unknown image_id", "image_id twice"])
def test_rlaifv_answer_that_matches_no_single_question_is_named(tmp_path, case):
    questions = published_questions(tmp_path / "q.jsonl")
    second = {"unknown image_id": 99, "image_id twice": 11}[case]
    answers = rlaifv_answers(tmp_path / "a.jsonl", [11, second], ["A dog.", "A cup."])
    proc = run_here(HALBENCH, "--answers", answers, "--questions", questions, "--coco_dir", coco(tmp_path, COCO_SPLITS),
                    "--out_dir", tmp_path / "o")
    error_line(proc, f"{answers}:2:")


def test_help_shows_rlhfv_protocol_defaults():
    proc = ok(run_here(HALBENCH, "--help"))
    text = " ".join(proc.stdout.split())
    for default in ("(default: 3)", "(default: 1024)", "(default: rules)"):
        assert default in text
