"""Step 4: MM-Vet, as its official grader (mm-vet_evaluator.py) scores it. The model answers every
question (greedy, as the authors); a judge grades each answer 0.0-1.0 against the ground truth: the
official query (the grader's prompt, then `question | ground truth | prediction | `) and retry rule
(scoring.mmvet_grade), with the user's copy of the official prompt (--grader_prompt_file) or this
repo's own few-shot prompt, or `exact` offline for short answers. A capability's score is the mean
over the questions that have it, x100; over runs, the mean and the population std of the totals.
--grades scores an official grade file with no judge and no model. Resumable and never pays twice:
answers and grades are appended as they come."""
import argparse
import json
import os
import sys

import benchmarks
import common
import dist_io
import remote
import scoring

# Written for this repo in the MM-Vet manner: a table of graded examples; the query adds the row to complete
GRADER_PROMPT = """You grade the answers of an AI assistant to questions about images. Compare the prediction with the ground truth and give a correctness score of 0.0 (totally wrong), 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9 or 1.0 (totally right). In the ground truth, <AND> joins elements that must all appear in the prediction (each missing one lowers the score) and <OR> joins alternatives of which any one is enough. Judge the content, not the wording or the length; wrong claims added to a right answer lower the score. Reply with the score only.

Question | Ground truth | Prediction | Correctness
--- | --- | --- | ---
How many apples are on the plate? | 3 <OR> three | There are three apples on the plate. | 1.0
How many apples are on the plate? | 3 <OR> three | I count four apples. | 0.0
Which two animals are in the picture? | dog <AND> cat | A dog lying on a sofa. | 0.5
Which two animals are in the picture? | dog <AND> cat | A cat and a dog sleeping next to each other. | 1.0
What does the sign say? | Main Street | The sign reads "Main St." | 1.0
What is the total price on the receipt? | 12.40 | The total is $12.40, paid by card, and the tip was $5. | 0.9
What should be done after the onions turn golden? | add the garlic and stir for one minute | Add garlic. | 0.6
Describe the weather in the photo. | It is sunny with a few clouds and the road is dry. | A sunny day under a clear blue sky; the road is wet from rain. | 0.4"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=dist_io.HelpFormatter)
    p.add_argument("--mmvet_json", required=True, help="the official mm-vet.json {id: {imagename, capability, "
                                                       "question, answer}}")
    p.add_argument("--image_dir", default=None, help="imagename is relative to this (needed to generate)")
    p.add_argument("--out_dir", required=True, help="writes answers.json, grades.jsonl, scores.json (reruns resume)")
    p.add_argument("--answers", default=None, help="grade an existing official answers JSON {id: answer}; no model "
                                                   "loaded")
    p.add_argument("--judge", default=None,
                   help="grader model at --base_url (OpenAI, or any OpenAI-compatible server of an open model), or "
                        "'exact': offline normalised match of short answers, honouring <AND>/<OR>. No default: the "
                        "official grader, gpt-4-0613, is retired (docs/evaluation.md#judges)")
    p.add_argument("--base_url", default=None, help="OpenAI-compatible server of the judge (none: OpenAI)")
    p.add_argument("--grader_prompt_file", default=None,
                   help="your copy of the official grader's prompt (the `prompt` string of MM-Vet's "
                        "mm-vet_evaluator.py, as it is); none: this repo's few-shot prompt")
    p.add_argument("--grade_retries", type=int, default=5,
                   help="re-asks after an unreadable reply (the official rule: the first at temperature 0, each "
                        "later one 0.5 hotter; after the last the grade is 0.0, recorded as failed)")
    p.add_argument("--grades", default=None,
                   help="score an official grade file {id: {model, content, score: [one per run]}}: no judge, no "
                        "model, no answers")
    p.add_argument("--num_runs", type=int, default=1, help="independent gradings of every answer; mean and std "
                                                           "reported")
    p.add_argument("--workers", type=int, default=8, help="judge calls in flight")
    remote.add_remote_args(p)
    benchmarks.add_model_args(p, max_new_tokens=1024, why="the authors' setting")
    args = p.parse_args(argv)
    if args.grade_retries < 1 or args.num_runs < 1:
        p.error("--grade_retries and --num_runs must be at least 1")
    if args.judge is None and not args.grades:
        p.error("give --judge: a model your endpoint serves, or exact (offline); the official gpt-4-0613 is retired")
    return args


def read_questions(path):
    """The official mm-vet.json {id: {imagename, capability, question, answer}} and its text; DataError
    naming file:line for a question that lacks a field or names another capability."""
    questions, raw = dist_io.read_json_dict(path)
    for qid, q in questions.items():
        ok = isinstance(q, dict) and all(isinstance(q.get(k), str) and q[k].strip()
                                         for k in ("imagename", "question", "answer")) \
            and common.question_text(q["question"])
        if not ok or not isinstance(q.get("capability"), list) or not q["capability"] \
                or not set(q["capability"]) <= set(scoring.CAPABILITIES):
            raise dist_io.DataError(f"{path}:{dist_io.line_of(raw, qid)}: question {qid!r} needs imagename, question "
                                    f"and answer (non-empty strings) and capability (a non-empty list of "
                                    f"{', '.join(scoring.CAPABILITIES)})")
    if not questions:
        raise dist_io.DataError(f"{path}: no questions")
    return questions, raw


def read_answers(path, questions, questions_path):
    """An official answers JSON {id: answer} with an answer to every question; DataError naming file:line."""
    answers, raw = dist_io.read_json_dict(path)
    for qid, a in answers.items():
        if not isinstance(a, str):
            raise dist_io.DataError(f"{path}:{dist_io.line_of(raw, qid)}: the answer of {qid!r} is not a string")
        if qid not in questions:
            raise dist_io.DataError(f"{path}:{dist_io.line_of(raw, qid)}: {qid!r} is not a question of "
                                    f"{questions_path}")
    missing = [qid for qid in questions if qid not in answers]
    if missing:
        raise dist_io.DataError(f"{path}:1: no answer for {len(missing)} questions (e.g. {missing[0]!r})")
    return answers


def read_grade_file(path, questions, questions_path):
    """(per run {question id: grade}, the judge models it names) of an official grade file
    {id: {"model": [...], "content": [...], "score": [...]}}, a grade per run, every question of the
    benchmark graded the same number of times; DataError naming file:line."""
    grades, raw = dist_io.read_json_dict(path)
    n_runs = None
    for qid, g in grades.items():
        at = f"{path}:{dist_io.line_of(raw, qid)}"
        if qid not in questions:
            raise dist_io.DataError(f"{at}: {qid!r} is not a question of {questions_path}")
        scores = g.get("score") if isinstance(g, dict) else None
        if not isinstance(scores, list) or not scores or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x <= 1 for x in scores):
            raise dist_io.DataError(f'{at}: {qid!r} needs "score": a non-empty list of grades in [0, 1]')
        if n_runs is not None and len(scores) != n_runs:
            raise dist_io.DataError(f"{at}: {qid!r} has {len(scores)} grades, the questions before it {n_runs}")
        n_runs = len(scores)
    missing = [qid for qid in questions if qid not in grades]
    if missing:
        raise dist_io.DataError(f"{path}:1: no grades for {len(missing)} questions (e.g. {missing[0]!r})")
    models = sorted({m for g in grades.values() for m in g.get("model") or [] if isinstance(m, str)})
    return [{qid: grades[qid]["score"][r] for qid in questions} for r in range(n_runs)], models


def report(args, questions, run_grades, judge, judge_models, failed=0):
    """scores.json (capabilities and total: the mean over runs; std: the population std of the run totals,
    as the official grader; runs: the totals), scores_runs.json (every run's capabilities) and the table."""
    capabilities = {qid: q["capability"] for qid, q in questions.items()}
    runs = [scoring.capability_scores(capabilities, grades) for grades in run_grades]
    mean, std = scoring.mean_std(runs)
    judged = {"judge": judge, "judge_models": judge_models}
    dist_io.write_atomic(os.path.join(args.out_dir, "scores.json"), json.dumps(
        {**mean, "std": std["total"], "runs": [r["total"] for r in runs], **judged}, indent=1))
    dist_io.write_atomic(os.path.join(args.out_dir, "scores_runs.json"),
                         json.dumps({**judged, "runs": runs, "std": std, "failed_grades": failed}, indent=1))
    name = args.grades or args.answers or (f"{args.model} + {args.adapter}" if args.adapter else args.model)
    benchmarks.print_scores(f"MM-Vet, judge {judge}{' (' + ', '.join(judge_models) + ')' if judge_models else ''}, "
                            f"{len(questions)} questions, {len(runs)} run(s) (± population std over runs)",
                            {k: k.capitalize() if k != "ocr" else "OCR" for k in scoring.CAPABILITIES + ["total"]
                             if k in mean}, [(name, mean, std if len(runs) > 1 else None)])


def main(argv=None):
    args = parse_args(argv)
    try:
        questions, raw = read_questions(args.mmvet_json)
        if args.grades:  # published grades: scored as they are
            run_grades, judge_models = read_grade_file(args.grades, questions, args.mmvet_json)
        answers = read_answers(args.answers, questions, args.mmvet_json) if args.answers else None
        prompt = dist_io.read_utf8(args.grader_prompt_file) if args.grader_prompt_file else GRADER_PROMPT
    except (dist_io.DataError, OSError) as e:
        sys.exit(f"error: {e}")
    if "{question}" in prompt:
        sys.exit(f"error: {args.grader_prompt_file} holds a {{question}} placeholder: give the official prompt as "
                 "it is (the query appends `question | ground truth | prediction | ` on a new line)")
    os.makedirs(args.out_dir, exist_ok=True)
    if args.grades:
        return report(args, questions, run_grades, judge_models[0] if len(judge_models) == 1 else "from the file",
                      judge_models)

    # ---- answers: read (--answers), or generated into a JSONL cache so that a kill loses at most one batch
    answers_path = os.path.join(args.out_dir, "answers.json")
    if answers is None:
        items = [{"id": qid, "image": q["imagename"], "question": common.question_text(q["question"])}
                 for qid, q in questions.items()]
        where = {qid: f"{args.mmvet_json}:{dist_io.line_of(raw, qid)}" for qid in questions}
        answers = benchmarks.benchmark_answers(args, items, os.path.join(args.out_dir, "answers.jsonl"), "id", where)
    if os.path.abspath(args.answers or "") != os.path.abspath(answers_path):
        dist_io.write_atomic(answers_path, json.dumps({qid: answers[qid] for qid in questions}, indent=1,
                                                      ensure_ascii=False))

    # ---- grades: the official query and retry rule; one cached record per (question, run, judge, answer, query)
    queries = {qid: scoring.mmvet_query(prompt, q["question"], q["answer"], answers[qid])
               for qid, q in questions.items()}
    client = None if args.judge == "exact" else remote.openai_client(args.base_url, args.timeout, args.retries)

    def grade(job):
        qid = job["id"]
        if args.judge == "exact":
            return {"score": scoring.exact_score(questions[qid]["answer"], answers[qid]), "failed": False}
        served = []

        def ask(content, temperature):
            reply = remote.chat(client, args.judge, [{"role": "user", "content": content}], temperature=temperature,
                                max_tokens=3, tries=args.retries)
            served.append(reply.model)
            return reply.text
        score, replies, failed = scoring.mmvet_grade(ask, queries[qid], args.grade_retries)
        return {"score": score, "failed": failed, "tries": len(replies), "reply": replies[-1], "model": served[-1]}

    graded = remote.judge_runs(os.path.join(args.out_dir, "grades.jsonl"), "id", queries, answers, args.judge,
                               args.num_runs, grade, args.workers, "grade")
    failed = sum(r["failed"] for run in graded for r in run.values())
    if failed:
        print(f"warning: {failed} grades unreadable after {args.grade_retries} re-asks, scored 0.0 (failed: true in "
              "grades.jsonl)", file=sys.stderr)
    judge_models = sorted({r["model"] for run in graded for r in run.values() if r.get("model")})
    report(args, questions, [{qid: r["score"] for qid, r in run.items()} for run in graded], args.judge, judge_models,
           failed)


if __name__ == "__main__":
    main()
