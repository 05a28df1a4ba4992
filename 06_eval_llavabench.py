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
    p.add_argument("--questions", required=True, help="questions.jsonl {question_id, image, text, category: "
                                                      "conv|detail|complex}")
    p.add_argument("--context", required=True, help="context.jsonl {image, caption: [...] or str}: what the judge "
                                                    "reads about the image")
    p.add_argument("--references", required=True, help="answers_gpt4.jsonl {question_id, text}: the reference "
                                                       "answers (assistant 1)")
    p.add_argument("--rule", required=True, help="LLaVA's llava/eval/table/rule.json {llava_bench_<category>: {role, "
                                                 "prompt}}")
    p.add_argument("--image_dir", default=None, help="question images are relative to this (needed to generate)")
    p.add_argument("--out_dir", required=True, help="writes answers.jsonl, reviews.jsonl, scores.json, "
                                                    "scores_runs.json (reruns resume)")
    p.add_argument("--answers", default=None, help="score existing answers, JSONL {question_id, text} (LLaVA's "
                                                   "answer files); "
                   "no model loaded")
    p.add_argument("--judge", default="gpt-4-0613", help=f"judge model on the OpenAI API (or --base_url); LLaVA's "
                                                         f"gpt-4-0314 is "
                   f"retired. '{OFFLINE}': an offline smoke-test judge, not GPT-4 (1 + 9 x F1 of content words: "
                   f"precision "
                   "against the reference and context, recall of the reference), whose numbers are no LLaVA-Bench "
                   "scores")
    p.add_argument("--base_url", default=None, help="OpenAI-compatible server of the judge (none: OpenAI)")
    p.add_argument("--review_tries", type=int, default=3,
                   help="judge calls per review until the first line holds two scores in [0, 10]; after the last the "
                        "review is recorded as failed and left out of the means")
    p.add_argument("--num_runs", type=int, default=1, help="independent reviews of every answer (the judge samples at "
                   f"temperature {TEMPERATURE}); mean and std reported")
    p.add_argument("--workers", type=int, default=8, help="judge calls in flight")
    remote.add_remote_args(p)
    benchmarks.add_model_args(p, max_new_tokens=1024, why="LLaVA's model_vqa default")
    args = p.parse_args(argv)
    if args.review_tries < 1 or args.num_runs < 1:
        p.error("--review_tries and --num_runs must be at least 1")
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


def read_benchmark(args):
    """(questions {qid: (line, record)}, context {image: text}, references {qid: text}, rule): the benchmark's
    four files, each question with its context, reference and its category's rule; DataError or a JSON error."""
    numbered = read_records(args.questions, "question_id", {"question_id": ID, "image": TEXT, "text": TEXT, "category": (
        lambda v: v in scoring.LLAVA_CATEGORIES, " or ".join(scoring.LLAVA_CATEGORIES))})
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
    if not numbered:
        raise dist_io.DataError(f"{args.questions}: no questions")
    return numbered, context, references, rule


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
        numbered, context, references, rule = read_benchmark(args)
        questions = {qid: rec for qid, (_, rec) in numbered.items()}
        answers = read_answers(args.answers, questions, args.questions) if args.answers else None
    except json.JSONDecodeError as e:
        sys.exit(f"error: {args.rule}:{e.lineno}: not valid JSON ({e.msg})")
    except (dist_io.DataError, OSError) as e:
        sys.exit(f"error: {e}")
    os.makedirs(args.out_dir, exist_ok=True)
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
            return {"scores": [scoring.overlap_score(ref, ref, caption), scoring.overlap_score(answers[qid], ref, caption)],
                    "failed": False}
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompts[qid]}]
        for attempt in range(args.review_tries):  # an unreadable reply is asked again
            reply = remote.chat(client, args.judge, messages, temperature=TEMPERATURE, max_tokens=MAX_TOKENS,
                                tries=args.retries)
            scores = scoring.score_pair(reply)
            if scores is not None:
                return {"scores": scores, "failed": False, "tries": attempt + 1, "reply": reply}
        return {"scores": None, "failed": True, "tries": args.review_tries, "reply": reply}

    reviewed = remote.judge_runs(os.path.join(args.out_dir, "reviews.jsonl"), "question_id", prompts, answers,
                                 args.judge, args.num_runs, review, args.workers, "review")
    failed = sum(r["failed"] for run in reviewed for r in run.values())
    if failed:
        print(f"warning: {failed} reviews without two scores after {args.review_tries} tries, left out of the means "
              "(failed: true in reviews.jsonl)", file=sys.stderr)

    # ---- scores: per run, then mean and std over runs
    category_of = {qid: q["category"] for qid, q in questions.items()}
    runs = [scoring.relative_scores(run, category_of) for run in reviewed]
    mean, std = scoring.mean_std(runs)
    dist_io.write_atomic(os.path.join(args.out_dir, "scores.json"), json.dumps({**mean, "judge": args.judge}, indent=1))
    dist_io.write_atomic(os.path.join(args.out_dir, "scores_runs.json"),
                         json.dumps({"judge": args.judge, "runs": runs, "std": std, "failed_reviews": failed}, indent=1))
    name = args.answers or (f"{args.model} + {args.adapter}" if args.adapter else args.model)
    about = " (offline word-overlap smoke test, not GPT-4: not comparable with the paper)" if args.judge == OFFLINE else ""
    benchmarks.print_scores(f"LLaVA-Bench in-the-Wild, judge {args.judge}{about}, {len(questions)} questions, "
                            f"{args.num_runs} run(s); relative score = mean(model) / mean(reference) x 100",
                            {k: k.capitalize() for k in scoring.LLAVA_CATEGORIES + ["all"] if k in mean}, name, mean,
                            std, args.num_runs)
    print("absolute means (reference, model; judge scale 1-10): " + ", ".join(
        f"{k} " + ("n/a" if v is None else f"{v[0]:.2f}, {v[1]:.2f}") for k, v in mean["abs"].items()))


if __name__ == "__main__":
    main()
