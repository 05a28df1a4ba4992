"""LLaVA-Bench in-the-Wild (06): relative scores against hand computation, the judge's score-pair
parser, prompt layout and faults against a local OpenAI-compatible stub, the offline judge, and the
script on the toy world. Expected numbers are worked out by hand in the comments."""
import json

import pytest

import dist_io
from conftest import run_here
from openai_stub import OpenAIStub
from test_hardening import by_marker, fast_backoff

KEY = {"OPENAI_API_KEY": "sk-test-llavabench"}
SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."

QUESTIONS = [{"question_id": 0, "image": "a.png", "text": "What colour is the cup?", "category": "conv"},
             {"question_id": 1, "image": "a.png", "text": "How many cups are there?", "category": "conv"},
             {"question_id": 2, "image": "b.png", "text": "Describe the image in detail.", "category": "detail"},
             {"question_id": 3, "image": "b.png", "text": "Which fruit is in the image?", "category": "complex"}]
CONTEXT = [{"image": "a.png", "caption": ["there is a cup at the top left , it is red .", "a second line ."]},
           {"image": "b.png", "caption": "there are two apples at the bottom right , they are green ."}]
REFERENCES = [{"question_id": 0, "text": "red ."}, {"question_id": 1, "text": "one ."},
              {"question_id": 2, "text": "there are two apples at the bottom right , they are green ."},
              {"question_id": 3, "text": "apple ."}]
RULE = {"llava_bench_conv": {"role": "Assistant", "prompt": "Rate conv."},
        "llava_bench_detail": {"role": "Assistant", "prompt": "Rate detail."},
        "llava_bench_complex": {"role": "AI", "prompt": "Rate complex."}}
ANSWERS = [{"question_id": 0, "text": "it is red and blue ."}, {"question_id": 1, "text": "two ."},
           {"question_id": 2, "text": "there are two apples ."}, {"question_id": 3, "text": "apple ."}]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def bench(tmp_path, questions=QUESTIONS, answers=ANSWERS, context=CONTEXT, references=REFERENCES, rule=RULE):
    """06's arguments for a benchmark in tmp_path, scoring existing answers into tmp_path/out."""
    (tmp_path / "rule.json").write_text(json.dumps(rule))
    return ["--questions", write_jsonl(tmp_path / "questions.jsonl", questions),
            "--context", write_jsonl(tmp_path / "context.jsonl", context),
            "--references", write_jsonl(tmp_path / "answers_gpt4.jsonl", references), "--rule", tmp_path / "rule.json",
            "--answers", write_jsonl(tmp_path / "answers.jsonl", answers), "--out_dir", tmp_path / "out"]


def scores(tmp_path):
    return json.loads((tmp_path / "out" / "scores.json").read_text())


def approx_scores(expected):
    """scores.json as expected, numbers compared approximately (pytest.approx does not nest)."""
    return {k: v if k in ("judge", "judge_models") else {c: pytest.approx(p) for c, p in v.items()}
            if k in ("abs", "llava_rounded") else pytest.approx(v) for k, v in expected.items()}


def reviews(tmp_path):
    return {(r["question_id"], r["run"]): r for r in dist_io.read_jsonl(tmp_path / "out" / "reviews.jsonl")}


def question_of(prompt):
    return prompt.split("[Question]\n")[1].split("\n")[0]


# ----------------------------------------------------------------------------- scores and the judge's replies


def test_relative_scores_per_category_and_all_by_hand(tmp_path):
    pairs = {"What colour is the cup?": "8 6\nAssistant 1 names the colour.", "How many cups are there?": "6 6",
             "Describe the image in detail.": "10 5", "Which fruit is in the image?": "5 10"}
    args = bench(tmp_path) + ["--judge", "gpt-stub"]
    with OpenAIStub(default=lambda body: pairs[question_of(body["messages"][-1]["content"])]) as stub:
        proc = run_here("06_eval_llavabench.py", *args, "--base_url", stub.url, env=KEY)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert len(stub.requests) == 4
    # conv: reference (8 + 6) / 2 = 7, model (6 + 6) / 2 = 6 -> 600 / 7; detail 5 / 10; complex 10 / 5;
    # all: the ratio of the means over all four, (6 + 6 + 5 + 10) / (8 + 6 + 10 + 5) = 27 / 29 (not a mean of ratios)
    # LLaVA's rounding of the same means: 600 / 7 = 85.71 -> 85.7, 2700 / 29 = 93.10 -> 93.1
    assert scores(tmp_path) == approx_scores({
        "conv": 600 / 7, "detail": 50.0, "complex": 200.0, "all": 2700 / 29, "judge": "gpt-stub",
        "judge_models": ["gpt-stub"],
        "abs": {"conv": [7.0, 6.0], "detail": [10.0, 5.0], "complex": [5.0, 10.0], "all": [7.25, 6.75]},
        "llava_rounded": {"conv": 85.7, "detail": 50.0, "complex": 200.0, "all": 93.1}})
    assert "judge gpt-stub" in proc.stdout and "| Conv | Detail | Complex | All |" in proc.stdout
    assert "(exact) | 85.7 | 50.0 | 200.0 | 93.1 |" in proc.stdout
    assert "(LLaVA's rounding) | 85.7 | 50.0 | 200.0 | 93.1 |" in proc.stdout

    # a second run asks only for its own reviews; mean and population std over the runs
    with OpenAIStub(default="5 5") as stub:
        run_here("06_eval_llavabench.py", *args, "--num_runs", 2, "--base_url", stub.url, env=KEY)
        assert len(stub.requests) == 4
    runs = json.loads((tmp_path / "out" / "scores_runs.json").read_text())
    assert [r["all"] for r in runs["runs"]] == pytest.approx([2700 / 29, 100.0])
    assert scores(tmp_path)["conv"] == pytest.approx((600 / 7 + 100) / 2)
    assert runs["std"]["conv"] == pytest.approx((100 - 600 / 7) / 2)  # |a - b| / 2 for two runs
    assert runs["std"]["abs"]["complex"] == pytest.approx([0.0, 5 / 2])
    assert scores(tmp_path)["llava_rounded"]["conv"] == pytest.approx(round((85.7 + 100.0) / 2, 1))


PARSER_CASES = [  # the judge's replies to one question, in order, and what must be recorded
    (["8 7\nAssistant 1 is more precise."], [8.0, 7.0], 1),
    (["8,7"], [8.0, 7.0], 1),
    (["8, 7"], [8.0, 7.0], 1),   # LLaVA's split(' ') would see three parts
    (["9.5\t3\n"], [9.5, 3.0], 1),
    (["Scores: 8 and 7", "6 4"], [6.0, 4.0], 2),  # garbage, asked again
    (["12 7", "nan 5", "8"], None, 3),              # out of range, not finite, one number: failed after 3 tries
]


def test_score_pair_parser_retries_garbage_and_records_failures(tmp_path):
    questions = [{"question_id": i, "image": "a.png", "text": f"Question {i}?", "category": "conv"}
                 for i in range(len(PARSER_CASES))]
    script = {f"Question {i}?": list(replies) for i, (replies, _, _) in enumerate(PARSER_CASES)}
    args = bench(tmp_path, questions, [{"question_id": i, "text": "red ."} for i in range(len(questions))],
                 references=[{"question_id": i, "text": "red ."} for i in range(len(questions))])
    with OpenAIStub(default=lambda body: script[question_of(body["messages"][-1]["content"])].pop(0)) as stub:
        proc = run_here("06_eval_llavabench.py", *args, "--judge", "gpt-stub", "--review_tries", 3,
                        "--base_url", stub.url, env=KEY)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert len(stub.requests) == 1 + 1 + 1 + 1 + 2 + 3
        assert {r["temperature"] for r in stub.requests} == {0.2} and {r["max_tokens"] for r in stub.requests} == {1024}
    got = reviews(tmp_path)
    for i, (_, want, tries) in enumerate(PARSER_CASES):
        assert (got[i, 0]["scores"], got[i, 0]["failed"], got[i, 0]["tries"]) == (want, want is None, tries)
    assert "1 reviews without two scores after 3 tries" in proc.stderr
    # the failed review is left out: reference (8 + 8 + 8 + 9.5 + 6) / 5 = 7.9, model (7 + 7 + 7 + 3 + 4) / 5 = 5.6
    assert scores(tmp_path)["conv"] == pytest.approx(100 * 5.6 / 7.9)
    assert scores(tmp_path)["abs"]["conv"] == pytest.approx([7.9, 5.6])
    assert json.loads((tmp_path / "out" / "scores_runs.json").read_text())["failed_reviews"] == 1


def test_judge_prompt_is_laid_out_as_llava_lays_it_out(tmp_path):
    with OpenAIStub(default="7 7") as stub:
        run_here("06_eval_llavabench.py", *bench(tmp_path), "--judge", "gpt-stub", "--workers", 1,
                 "--base_url", stub.url, env=KEY)
        sent = {question_of(r["messages"][-1]["content"]): r for r in stub.requests}
    first = sent["What colour is the cup?"]
    assert first["model"] == "gpt-stub" and first["temperature"] == 0.2
    assert first["messages"][0] == {"role": "system", "content": SYSTEM}
    assert first["messages"][1] == {"role": "user", "content": (  # a list caption: its lines joined by newlines
        "[Context]\nthere is a cup at the top left , it is red .\na second line .\n\n"
        "[Question]\nWhat colour is the cup?\n\n"
        "[Assistant 1]\nred .\n\n[End of Assistant 1]\n\n"
        "[Assistant 2]\nit is red and blue .\n\n[End of Assistant 2]\n\n"
        "[System]\nRate conv.\n\n")}
    assert sent["Which fruit is in the image?"]["messages"][1]["content"] == (  # a string caption, the rule's own role
        "[Context]\nthere are two apples at the bottom right , they are green .\n\n"
        "[Question]\nWhich fruit is in the image?\n\n"
        "[AI 1]\napple .\n\n[End of AI 1]\n\n"
        "[AI 2]\napple .\n\n[End of AI 2]\n\n"
        "[System]\nRate complex.\n\n")


def test_judge_faults_are_retried_and_a_failure_exits_without_scores(tmp_path, monkeypatch):
    fast_backoff(monkeypatch)
    healthy = lambda prompt: "8 6"
    reply = by_marker({"What colour is the cup?": [500, 429], "How many cups are there?": [{"choices": []}, b"<html>"],
                       "Describe the image in detail.": ["no scores here"], "Which fruit is in the image?": [500] * 99},
                      healthy)
    args = bench(tmp_path) + ["--judge", "gpt-stub", "--retries", 3, "--workers", 2]
    with OpenAIStub(default=reply) as stub:
        proc = run_here("06_eval_llavabench.py", *args, "--base_url", stub.url, env=KEY)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "error: 1 reviews got no reply from gpt-stub" in proc.stderr and "rerun to resume" in proc.stderr
    assert not (tmp_path / "out" / "scores.json").exists()  # no score over three quarters of the benchmark
    got = reviews(tmp_path)
    assert sorted(got) == [(0, 0), (1, 0), (2, 0)] and all(r["scores"] == [8.0, 6.0] for r in got.values())
    assert got[2, 0]["tries"] == 2  # the reply without scores was asked again
    with OpenAIStub(default=lambda body: healthy(None)) as stub:
        again = run_here("06_eval_llavabench.py", *args, "--base_url", stub.url, env=KEY)
        assert again.returncode == 0 and len(stub.requests) == 1  # only the missing review
        assert question_of(stub.requests[0]["messages"][-1]["content"]) == "Which fruit is in the image?"
    assert scores(tmp_path)["all"] == pytest.approx(75.0)
    assert "sk-test" not in proc.stdout + proc.stderr + again.stdout + again.stderr


# ----------------------------------------------------------------------------- offline judge, --answers, bad input


def test_overlap_judge_by_hand_and_answers_from_elsewhere(tmp_path):
    proc = run_here("06_eval_llavabench.py", *bench(tmp_path), "--judge", "overlap", "--model", "never-loaded")
    assert proc.returncode == 0, proc.stderr[-2000:]
    # 1 + 9 x F1 of content words (precision against reference + context, recall of the reference):
    # q0 {red, blue}: precision 1/2, recall 1 -> F1 2/3 -> 7; q1 {two} is nowhere -> 1;
    # q2 {two, apples}: precision 1, recall 2/5 of {two, apples, bottom, right, green} -> F1 4/7 -> 1 + 36/7;
    # q3 equals its reference -> 10; every reference scores 10
    got = reviews(tmp_path)
    assert [got[i, 0]["scores"] for i in range(4)] == [pytest.approx(x) for x in [[10, 7], [10, 1], [10, 1 + 36 / 7], [10, 10]]]
    assert scores(tmp_path) == approx_scores({
        "conv": 40.0, "detail": 10 + 360 / 7, "complex": 100.0, "all": 100 * (19 + 36 / 7) / 40, "judge": "overlap",
        "judge_models": [],
        "abs": {"conv": [10, 4], "detail": [10, 1 + 36 / 7], "complex": [10, 10], "all": [10, (19 + 36 / 7) / 4]},
        # LLaVA's rounding: detail's model mean 6.142857 -> 6.143 -> 61.43 -> 61.4; all's 6.0357 -> 6.036 -> 60.4
        "llava_rounded": {"conv": 40.0, "detail": 61.4, "complex": 100.0, "all": 60.4}})
    assert "judge overlap (offline word-overlap smoke test, not GPT-4" in proc.stdout
    # the scored answers are copied to out_dir as {question_id, text}, in question order
    assert dist_io.read_jsonl(tmp_path / "out" / "answers.jsonl") == ANSWERS


@pytest.mark.parametrize("case", ["unknown answer", "missing answer", "bad category", "no context", "no reference",
                                  "rule without category", "duplicate question"])
def test_bad_benchmark_or_answers_stop_with_one_line(tmp_path, case):
    q, a, c, r, rule = list(QUESTIONS), list(ANSWERS), list(CONTEXT), list(REFERENCES), dict(RULE)
    where = {"unknown answer": "answers.jsonl:5", "missing answer": "answers.jsonl", "bad category": "questions.jsonl:2",
             "no context": "context.jsonl", "no reference": "answers_gpt4.jsonl", "rule without category": "rule.json",
             "duplicate question": "questions.jsonl:5"}[case]
    if case == "unknown answer":
        a.append({"question_id": 9, "text": "x"})
    elif case == "missing answer":
        a.pop()
    elif case == "bad category":
        q[1] = {**q[1], "category": "reasoning"}
    elif case == "no context":
        c.pop()
    elif case == "no reference":
        r.pop(0)
    elif case == "rule without category":
        rule.pop("llava_bench_detail")
    else:
        q.append({**q[0], "text": "Again?"})
    proc = run_here("06_eval_llavabench.py", *bench(tmp_path, q, a, c, r, rule), "--judge", "overlap")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: ") and where in proc.stderr
    assert not (tmp_path / "out" / "scores.json").exists()


# ----------------------------------------------------------------------------- the toy world


def test_toy_llavabench_files_are_in_the_published_formats(toy):
    d = toy / "llavabench"
    questions = dist_io.read_jsonl(d / "questions.jsonl")
    assert [q["question_id"] for q in questions] == list(range(len(questions)))
    assert {c: sum(q["category"] == c for q in questions) for c in ("conv", "detail", "complex")} == \
        {"conv": 24, "detail": 24, "complex": 24}
    context = {c["image"]: c["caption"] for c in dist_io.read_jsonl(d / "context.jsonl")}
    assert set(context) == {q["image"] for q in questions} and all((d / "images" / i).is_file() for i in context)
    assert all(isinstance(c, list) and len(c) == 1 and c[0].endswith(" .") for c in context.values())
    references = dist_io.read_jsonl(d / "answers_gpt4.jsonl")
    assert [r["question_id"] for r in references] == [q["question_id"] for q in questions]
    # the detail question's reference is the image's caption, the context the judge reads
    assert all(r["text"] == context[q["image"]][0] for q, r in zip(questions, references) if q["category"] == "detail")
    rule = json.loads((d / "rule.json").read_text())
    assert sorted(rule) == ["llava_bench_complex", "llava_bench_conv", "llava_bench_detail"]
    assert all(set(v) == {"role", "prompt"} and "two scores" in v["prompt"] for v in rule.values())


def test_llavabench_on_toy_world(toy, tmp_path):
    d, out = toy / "llavabench", tmp_path / "wild"
    args = ["--model", toy / "model", "--questions", d / "questions.jsonl", "--context", d / "context.jsonl",
            "--references", d / "answers_gpt4.jsonl", "--rule", d / "rule.json", "--image_dir", d / "images",
            "--out_dir", out, "--judge", "overlap", "--max_new_tokens", 24, "--batch_size", 24]
    proc = run_here("06_eval_llavabench.py", *args, check=True)
    n = len(dist_io.read_jsonl(d / "questions.jsonl"))
    answers = dist_io.read_jsonl(out / "answers.jsonl")
    assert sorted(a["question_id"] for a in answers) == list(range(n)) and all(isinstance(a["text"], str) for a in answers)
    assert {a["model"] for a in answers} == {str(toy / "model")}
    got = dist_io.read_jsonl(out / "reviews.jsonl")
    assert len(got) == n and all(r["judge"] == "overlap" and r["scores"][0] == 10 and 1 <= r["scores"][1] <= 10
                                 for r in got)
    s = json.loads((out / "scores.json").read_text())
    assert set(s) == {"conv", "detail", "complex", "all", "abs", "judge", "judge_models", "llava_rounded"}
    assert s["judge"] == "overlap" and set(s["llava_rounded"]) == {"conv", "detail", "complex", "all"}
    assert all(0 < s[c] <= 100 and s["abs"][c][0] == 10 for c in ("conv", "detail", "complex", "all"))
    assert s["all"] == pytest.approx(10 * s["abs"]["all"][1])  # the reference's mean is 10
    assert "judge overlap (offline" in proc.stdout
    again = run_here("06_eval_llavabench.py", *args, check=True)  # a rerun resumes: nothing to answer or review
    assert f"{n} already answered" in again.stdout and len(dist_io.read_jsonl(out / "reviews.jsonl")) == n
    assert json.loads((out / "scores.json").read_text()) == s


def test_published_review_files_scored_as_llava_summarises_them(tmp_path):
    """--reviews: LLaVA's review files (one per run, as eval_gpt_review_bench.py writes them) with no judge and no
    model. The exact scores leave a review LLaVA could not read ([-1, -1]) out; LLaVA's rounding
    (summarize_gpt_review.py: per file the mean tuple, each mean to 3 decimals, the score to 0.1; then the mean of
    runs) averages it in, as LLaVA does. Worked by hand:
      run 1: conv (8 + 7) / 2 = 7.5 vs (6 + 5) / 2 = 5.5 -> 73.3; detail [-1, -1] -> 100.0 in LLaVA's, n/a exact;
             all: exact 5.5 / 7.5 = 73.33, LLaVA's 3.333 / 4.667 -> 71.4
      run 2: conv 6.5 / 7.5 -> 86.7; detail 6 / 10 -> 60.0; all 19 / 25 -> 76.0"""
    def review_file(path, tuples):
        return write_jsonl(path, [{"id": i + 1, "question_id": i, "answer1_id": i, "answer2_id": f"a{i}",
                                   "category": f"llava_bench_{c}", "content": f"{t[0]} {t[1]}\nbecause", "tuple": t}
                                  for i, (c, t) in enumerate(zip(["conv", "conv", "detail"], tuples))])
    runs = [review_file(tmp_path / "review_1.jsonl", [[8, 6], [7, 5], [-1, -1]]),
            review_file(tmp_path / "review_2.jsonl", [[8, 7], [7, 6], [10, 6]])]
    proc = run_here("06_eval_llavabench.py", "--reviews", *runs, "--out_dir", tmp_path / "out", check=True)
    s = scores(tmp_path)
    assert s["llava_rounded"] == {"conv": 80.0, "detail": 80.0, "all": 73.7}  # no complex question: no column
    assert s["conv"] == pytest.approx((5.5 / 7.5 * 100 + 6.5 / 7.5 * 100) / 2)
    assert s["detail"] is None  # run 1 has no readable detail review: no exact mean over both runs
    assert s["all"] == pytest.approx((5.5 / 7.5 * 100 + 19 / 25 * 100) / 2)
    assert "(exact)" in proc.stdout and "(LLaVA's rounding) | 80.0 | 80.0 | 73.7 |" in proc.stdout
    # with the benchmark's questions: every question reviewed once a file, in its own category
    qs = write_jsonl(tmp_path / "q.jsonl", [{"question_id": i, "image": "a.png", "text": f"Q{i}?", "category": c}
                                            for i, c in enumerate(["conv", "conv", "detail"])])
    run_here("06_eval_llavabench.py", "--questions", qs, "--reviews", *runs, "--out_dir", tmp_path / "o", check=True)
    assert json.loads((tmp_path / "o" / "scores.json").read_text())["llava_rounded"] == s["llava_rounded"]
    short = review_file(tmp_path / "review_3.jsonl", [[8, 6], [7, 5]])
    proc = run_here("06_eval_llavabench.py", "--questions", qs, "--reviews", short, "--out_dir", tmp_path / "p")
    assert proc.returncode != 0 and f"{short}: no review of 1 questions" in proc.stderr
    wrong = write_jsonl(tmp_path / "q2.jsonl", [{"question_id": i, "image": "a.png", "text": f"Q{i}?", "category": c}
                                                for i, c in enumerate(["conv", "complex", "detail"])])
    proc = run_here("06_eval_llavabench.py", "--questions", wrong, "--reviews", runs[0], "--out_dir", tmp_path / "p")
    assert proc.returncode != 0 and f"{runs[0]}:2: question 1 is a complex question" in proc.stderr
