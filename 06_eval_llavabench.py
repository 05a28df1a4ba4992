"""Step 6: LLaVA-Bench in-the-Wild, as LLaVA evaluates it (llava/eval/eval_gpt_review_bench.py and
summarize_gpt_review.py). The model answers every question (greedy); a judge reads the image's
context, the question, the reference answer (assistant 1) and the model's (assistant 2) with the
category's rule from rule.json, and writes two scores on its first line; the relative score is
mean(model) / mean(reference) x 100, per category and over all questions. Resumable and never pays
twice: answers and reviews are appended as they come.
Beside LLaVA's: answers are matched to questions by question_id (LLaVA zips the files line by line),
"8, 7" is read as two scores (LLaVA's split(' ') sees three parts and records -1 -1), a reply without
two scores in [0, 10] is asked again and, after the last try, left out of the means and counted
(LLaVA averages the -1 in), and a call that gets no reply fails the run instead of waiting forever."""
import argparse
import json
import os
import statistics
import sys

import benchmarks
import common
import dist_io
import remote
import scoring

SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
TEMPERATURE, MAX_TOKENS = 0.2, 1024  # LLaVA's review settings
OFFLINE = "overlap"
ID = (lambda v: isinstance(v, (int, str)) and not isinstance(v, bool) and str(v).strip() != "", "an integer or a string")
TEXT = (lambda v: isinstance(v, str) and v.strip() != "", "a non-empty string")
CAPTION = (lambda v: TEXT[0](v) or isinstance(v, list) and bool(v) and all(map(TEXT[0], v)), "a string or a list of strings")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=dist_io.HelpFormatter)
    p.add_argument("--questions", help="questions.jsonl {question_id, image, text, category: conv|detail|complex} "
                                       "(needed unless --reviews)")
    p.add_argument("--context", help="context.jsonl {image, caption: [...] or str}: what the judge reads about the "
                                     "image (needed unless --reviews)")
    p.add_argument("--references", help="answers_gpt4.jsonl {question_id, text}: the reference answers (assistant 1; "
                                        "needed unless --reviews)")
    p.add_argument("--rule", help="LLaVA's llava/eval/table/rule.json {llava_bench_<category>: {role, prompt}} "
                                  "(needed unless --reviews)")
    p.add_argument("--image_dir", default=None, help="question images are relative to this (needed to generate)")
    p.add_argument("--out_dir", required=True,
                   help="writes answers.jsonl, reviews.jsonl, scores.json, scores_runs.json (reruns resume)")
    p.add_argument("--answers", default=None,
                   help="score existing answers, JSONL {question_id, text} (LLaVA's answer files); no model loaded")
    p.add_argument("--reviews", nargs="+", default=None, metavar="REVIEW_FILE",
                   help="score LLaVA's published review files as they are (one JSONL per run, as its "
                        "eval_gpt_review_bench.py writes them): no judge, no model, no answers")
    p.add_argument("--judge", default=None,
                   help="judge model at --base_url (OpenAI, or any OpenAI-compatible server of an open model); no "
                        f"default: LLaVA's gpt-4-0314 is retired (docs/evaluation.md#judges). '{OFFLINE}': "
                        "an offline smoke-test judge, not GPT-4 (1 + 9 x F1 of content words: precision against the "
                        "reference and context, recall of the reference), whose numbers are no LLaVA-Bench scores")
    p.add_argument("--base_url", default=None, help="OpenAI-compatible server of the judge (none: OpenAI)")
    p.add_argument("--review_tries", type=int, default=3,
                   help="judge calls per review until the first line holds two scores in [0, 10]; after the last the "
                        "review is recorded as failed and left out of the means")
    p.add_argument("--num_runs", type=int, default=1,
                   help=f"independent reviews of every answer (the judge samples at temperature {TEMPERATURE}); "
                        "mean and std reported")
    p.add_argument("--workers", type=int, default=8, help="judge calls in flight")
    remote.add_remote_args(p)
    benchmarks.add_model_args(p, max_new_tokens=1024, why="LLaVA's model_vqa default")
    args = p.parse_args(argv)
    if args.review_tries < 1 or args.num_runs < 1:
        p.error("--review_tries and --num_runs must be at least 1")
    if args.judge is None and not args.reviews:
        p.error(f"give --judge: a model your endpoint serves, or {OFFLINE} (offline); LLaVA's gpt-4-0314 is retired")
    missing = [f"--{k}" for k in ("questions", "context", "references", "rule") if not getattr(args, k)]
    if missing and not args.reviews:
        p.error(f"the following arguments are required: {', '.join(missing)} (or score published --reviews)")
    return args


def read_records(path, key, checks):
    """{record[key]: (line, record)} of a JSONL file; DataError naming path:line for a line that
    is not a JSON object, a field failing its check {field: (test, what it must be)}, a key twice."""
    out = {}
    for line, rec in dist_io.numbered_jsonl(path):
        for field, (ok, want) in checks.items():
            if not ok(rec.get(field)):
                raise dist_io.DataError(f"{path}:{line}: {field!r} must be {want}")
        if rec[key] in out:
            raise dist_io.DataError(f"{path}:{line}: {key} {rec[key]!r} appears twice (first at line "
                                    f"{out[rec[key]][0]})")
        out[rec[key]] = (line, rec)
    return out


def read_questions(path):
    """{qid: (line, record)} of questions.jsonl; DataError naming file:line."""
    numbered = read_records(path, "question_id", {"question_id": ID, "image": TEXT, "text": TEXT, "category": (
        lambda v: v in scoring.LLAVA_CATEGORIES, " or ".join(scoring.LLAVA_CATEGORIES))})
    if not numbered:
        raise dist_io.DataError(f"{path}: no questions")
    return numbered


def read_benchmark(args, numbered):
    """(context {image: text}, references {qid: text}, rule) for the questions: each question with its
    context, reference and its category's rule; DataError or a JSON error."""
    context = {image: rec["caption"] if isinstance(rec["caption"], str) else "\n".join(rec["caption"])  # as LLaVA joins it
               for image, (_, rec) in read_records(args.context, "image", {"image": TEXT, "caption": CAPTION}).items()}
    references = {k: rec["text"] for k, (_, rec) in
                  read_records(args.references, "question_id", {"question_id": ID, "text": TEXT}).items()}
    rule = json.loads(dist_io.read_utf8(args.rule))
    for qid, (_, q) in numbered.items():
        if q["image"] not in context:
            raise dist_io.DataError(f"{args.context}: no context for image {q['image']!r} (question {qid!r})")
        if qid not in references:
            raise dist_io.DataError(f"{args.references}: no reference answer for question {qid!r}")
        r = rule.get(f"llava_bench_{q['category']}") if isinstance(rule, dict) else None
        if not (isinstance(r, dict) and TEXT[0](r.get("role")) and TEXT[0](r.get("prompt"))):
            raise dist_io.DataError(f"{args.rule}: no 'llava_bench_{q['category']}' entry with 'role' and 'prompt' "
                                    "strings")
    return context, references, rule


def read_review_files(paths, category_of):
    """Per file (one run of LLaVA's eval_gpt_review_bench.py: JSONL {question_id, category: llava_bench_<c>,
    content, tuple: [reference, model]}), {qid: {"scores", "failed", "tuple", "category"}}: a tuple outside
    [0, 10] (LLaVA's [-1, -1] for a review it could not read) is failed, left out of the exact means and
    averaged in by LLaVA's rounding, as LLaVA does. category_of ({qid: category}, from --questions; empty:
    the files' own) must hold every reviewed question, each reviewed once a file; DataError naming file:line."""
    runs = []
    for path in paths:
        run = {}
        for line, r in dist_io.numbered_jsonl(path):
            at, qid = f"{path}:{line}", r.get("question_id")
            category = str(r.get("category", "")).removeprefix("llava_bench_") or category_of.get(qid)
            t = r.get("tuple")
            if not ID[0](qid) or category not in scoring.LLAVA_CATEGORIES or not (isinstance(t, list) and len(t) == 2
                                                                               and all(isinstance(x, (int, float))
                                                                                       and not isinstance(x, bool)
                                                                                       for x in t)):
                raise dist_io.DataError(f"{at}: expected LLaVA's review record {{question_id, category: "
                                        f"llava_bench_<conv|detail|complex>, tuple: [reference, model]}}")
            if category_of and category_of.get(qid) != category:
                raise dist_io.DataError(f"{at}: question {qid!r} is " + (
                    f"a {category_of[qid]} question in --questions" if qid in category_of else "not in --questions"))
            if qid in run:
                raise dist_io.DataError(f"{at}: question {qid!r} is reviewed twice in one run")
            failed = not all(0 <= x <= 10 for x in t)
            run[qid] = {"scores": None if failed else t, "failed": failed, "tuple": t, "category": category}
        missing = [qid for qid in category_of if qid not in run]
        if missing or not run:
            raise dist_io.DataError(f"{path}: no review of {len(missing)} questions (e.g. {missing[0]!r})" if missing
                                    else f"{path}: no reviews")
        runs.append(run)
    return runs


def llava_tuple(review):
    """A review's [reference, model] as LLaVA's scripts hold it: a published file's tuple; for a judge's reply
    LLaVA's reading of it; the offline judge's scores."""
    if "tuple" in review:
        return review["tuple"]
    return scoring.llava_parse_score(review["reply"]) if "reply" in review else review["scores"]


def report(args, reviewed, category_of, judge, judge_models, name):
    """scores.json (per category and all: the exact relative score, mean over runs; the absolute means; the
    judge; llava_rounded: LLaVA's summarize_gpt_review.py numbers, mean of runs), scores_runs.json, the table."""
    runs = [scoring.relative_scores(run, category_of) for run in reviewed]
    mean, std = scoring.mean_std(runs)
    rounded_runs = [scoring.llava_summary({qid: llava_tuple(r) for qid, r in run.items()}, category_of)
                    for run in reviewed]
    rounded = {k: None if any(r[k] is None for r in rounded_runs) else round(statistics.fmean(r[k] for r in
                                                                                            rounded_runs), 1)
               for k in rounded_runs[0]}
    failed = sum(r["failed"] for run in reviewed for r in run.values())
    judged = {"judge": judge, "judge_models": judge_models}
    dist_io.write_atomic(os.path.join(args.out_dir, "scores.json"),
                         json.dumps({**mean, **judged, "llava_rounded": rounded}, indent=1))
    dist_io.write_atomic(os.path.join(args.out_dir, "scores_runs.json"), json.dumps(
        {**judged, "runs": runs, "std": std, "llava_rounded_runs": rounded_runs, "failed_reviews": failed}, indent=1))
    about = " (offline word-overlap smoke test, not GPT-4: not comparable with the paper)" if judge == OFFLINE else ""
    benchmarks.print_scores(
        f"LLaVA-Bench in-the-Wild, judge {judge}{about}, {len(category_of)} questions, {len(runs)} run(s); relative "
        "score = mean(model) / mean(reference) x 100. exact: the means, failed reviews left out (± population std "
        "over runs); LLaVA's rounding: summarize_gpt_review.py's numbers (each run's means to 3 decimals, failed "
        "reviews as -1, the score to 0.1), their mean over runs",
        {k: k.capitalize() for k in scoring.LLAVA_CATEGORIES + ["all"] if k in mean},
        [(f"{name} (exact)", mean, std if len(runs) > 1 else None), (f"{name} (LLaVA's rounding)", rounded, None)])
    print("absolute means (reference, model; judge scale 1-10): " + ", ".join(
        f"{k} " + ("n/a" if v is None else f"{v[0]:.2f}, {v[1]:.2f}") for k, v in mean["abs"].items()))


def read_answers(path, questions, questions_path):
    """{qid: text} of existing answers (JSONL {question_id, text}), one for every question; DataError naming file:line."""
    given = read_records(path, "question_id", {"question_id": ID, "text": (lambda v: isinstance(v, str), "a string")})
    for qid, (line, rec) in given.items():
        if qid not in questions:
            raise dist_io.DataError(f"{path}:{line}: {qid!r} is not a question of {questions_path}")
    missing = [qid for qid in questions if qid not in given]
    if missing:
        raise dist_io.DataError(f"{path}: no answer for {len(missing)} questions (e.g. {missing[0]!r})")
    return {qid: rec["text"] for qid, (_, rec) in given.items()}


def judge_prompt(q, context, reference, answer, rule):
    """The judge's user message, laid out as LLaVA's eval_gpt_review_bench.py lays it out."""
    role = rule["role"]
    return (f"[Context]\n{context}\n\n"
            f"[Question]\n{q['text']}\n\n"
            f"[{role} 1]\n{reference}\n\n[End of {role} 1]\n\n"
            f"[{role} 2]\n{answer}\n\n[End of {role} 2]\n\n"
            f"[System]\n{rule['prompt']}\n\n")


def main(argv=None):
    args = parse_args(argv)
    # ---- benchmark: questions, their context and reference answers, the rule of each category; answers
    try:
        numbered = read_questions(args.questions) if args.questions else {}
        questions = {qid: rec for qid, (_, rec) in numbered.items()}
        category_of = {qid: q["category"] for qid, q in questions.items()}
        if args.reviews:  # published reviews: scored as they are
            reviewed = read_review_files(args.reviews, category_of)
        else:
            context, references, rule = read_benchmark(args, numbered)
            answers = read_answers(args.answers, questions, args.questions) if args.answers else None
    except json.JSONDecodeError as e:
        sys.exit(f"error: {args.rule}:{e.lineno}: not valid JSON ({e.msg})")
    except (dist_io.DataError, OSError) as e:
        sys.exit(f"error: {e}")
    os.makedirs(args.out_dir, exist_ok=True)
    if args.reviews:
        category_of = category_of or {qid: r["category"] for run in reviewed for qid, r in run.items()}
        return report(args, reviewed, category_of, "review files", [], " ".join(args.reviews))
    answers_path = os.path.join(args.out_dir, "answers.jsonl")
    if answers is not None:  # read as they are
        if os.path.abspath(args.answers) != os.path.abspath(answers_path):
            dist_io.write_atomic(answers_path, "".join(json.dumps({"question_id": qid, "text": answers[qid]},
                                                                  ensure_ascii=False) + "\n" for qid in questions))
    else:  # generated greedily into answers.jsonl, resumable
        items = [{"question_id": qid, "image": q["image"], "question": common.question_text(q["text"])}
                 for qid, q in questions.items()]
        where = {qid: f"{args.questions}:{line}" for qid, (line, _) in numbered.items()}
        answers = benchmarks.benchmark_answers(args, items, answers_path, "question_id", where, field="text")

    # ---- reviews: one cached record per (question, run, judge, answer, filled prompt)
    prompts = {qid: judge_prompt(q, context[q["image"]], references[qid], answers[qid],
                                 rule[f"llava_bench_{q['category']}"]) for qid, q in questions.items()}
    client = None if args.judge == OFFLINE else remote.openai_client(args.base_url, args.timeout, args.retries)

    def review(job):
        qid = job["question_id"]
        if args.judge == OFFLINE:
            ref, caption = references[qid], context[questions[qid]["image"]]
            scores = [scoring.overlap_score(ref, ref, caption), scoring.overlap_score(answers[qid], ref, caption)]
            return {"scores": scores, "failed": False}
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompts[qid]}]
        for attempt in range(args.review_tries):  # an unreadable reply is asked again
            reply = remote.chat(client, args.judge, messages, temperature=TEMPERATURE, max_tokens=MAX_TOKENS,
                                tries=args.retries)
            scores = scoring.score_pair(reply.text)
            if scores is not None:
                break
        return {"scores": scores, "failed": scores is None, "tries": attempt + 1, "reply": reply.text,
                "model": reply.model}

    reviewed = remote.judge_runs(os.path.join(args.out_dir, "reviews.jsonl"), "question_id", prompts, answers,
                                 args.judge, args.num_runs, review, args.workers, "review")
    failed = sum(r["failed"] for run in reviewed for r in run.values())
    if failed:
        print(f"warning: {failed} reviews without two scores after {args.review_tries} tries, left out of the means "
              "(failed: true in reviews.jsonl)", file=sys.stderr)
    judge_models = sorted({r["model"] for run in reviewed for r in run.values() if r.get("model")})
    report(args, reviewed, category_of, args.judge, judge_models,
           args.answers or (f"{args.model} + {args.adapter}" if args.adapter else args.model))


if __name__ == "__main__":
    main()
