"""Step 7: POPE (Li et al., 2023), yes/no probing of objects, beyond the paper's Table 2: no judge and
no length confound. Each question file is one split (POPE's random, popular, adversarial: absent
objects drawn at random, among the most frequent, or among those co-occurring most with the present
ones); the split's name is the file name without extension and without a leading `coco_pope_`.
As LLaVA-1.5 evaluates POPE, each question gets "\\nAnswer the question using a single word or
phrase." appended and is answered greedily with up to 128 new tokens. Scoring is LLaVA's eval_pope
rule: an answer means "no" when the text before its first "." (commas removed) holds the word `No`,
`no` or `not` (case-sensitive; words split on any white space, where LLaVA splits on single
spaces), else "yes". Per split, with "yes" as the positive class: accuracy, precision, recall, f1
and yes_ratio (share of answers read as yes), in percent, and n. Resumable: answers are appended."""
import argparse
import json
import os
import sys

import common
import jobs

p = argparse.ArgumentParser(description=__doc__, formatter_class=jobs.HelpFormatter)
p.add_argument("--model", default="llava-hf/llava-1.5-7b-hf", help="base model (dir or hub id)")
p.add_argument("--adapter", default=None, help="peft adapter dir (03's D/adapter) merged onto --model; none = base model")
p.add_argument("--questions", action="extend", nargs="+", required=True,
               help='POPE question files, one split each (repeat the flag or list several): JSON lines {"question_id", '
                    '"image", "text", "label": "yes"|"no"}, e.g. coco_pope_random.json')
p.add_argument("--image_dir", default=None, help="question images are relative to this (COCO val2014; needed to generate)")
p.add_argument("--out_dir", required=True, help="writes answers.jsonl, scores.json (reruns resume)")
p.add_argument("--answers", default=None,
               help='score existing answers, no model loaded: JSONL {"question_id", "text"} ("answer" is read as '
                    '"text"), with "split" as well when several splits are given')
p.add_argument("--prompt_suffix", default="\nAnswer the question using a single word or phrase.",
               help="appended to every question; the default is LLaVA-1.5's short-answer prompt, a newline and then 'Answer "
                    "the question using a single word or phrase.'; '' asks the question alone")
p.add_argument("--max_new_tokens", type=int, default=128, help="answer length cap (LLaVA's POPE setting)")
p.add_argument("--batch_size", type=int, default=8, help="generations per forward")
common.add_format_args(p)
args = p.parse_args()


def key(split, question_id):  # question ids restart in every split
    return json.dumps([split, question_id])


def says_no(text):
    """LLaVA's eval_pope rule: the first sentence, commas removed, holds the word No, no or not."""
    return bool({"No", "no", "not"} & set(text.split(".")[0].replace(",", "").split()))


def metrics(labels, answers):
    """Percent scores of yes/no predictions against labels, "yes" being the positive class."""
    pred = [not says_no(a) for a in answers]
    gold = [lab == "yes" for lab in labels]
    tp = sum(p and g for p, g in zip(pred, gold))
    fp = sum(p and not g for p, g in zip(pred, gold))
    fn = sum(g and not p for p, g in zip(pred, gold))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {"accuracy": 100 * sum(p == g for p, g in zip(pred, gold)) / len(gold), "precision": 100 * precision,
            "recall": 100 * recall, "f1": 100 * (2 * precision * recall / (precision + recall) if tp else 0.0),
            "yes_ratio": 100 * sum(pred) / len(pred), "n": len(pred)}


def valid_id(qid):
    return isinstance(qid, (str, int)) and not isinstance(qid, bool)


# ---- questions: one split a file
questions, where = [], {}  # where[key] = file:line, for messages
try:
    for path in args.questions:
        split = os.path.splitext(os.path.basename(path))[0].removeprefix("coco_pope_")
        if any(q["split"] == split for q in questions):
            raise jobs.DataError(f"{path}: split {split!r} is given twice")
        n_before = len(questions)
        for line, q in jobs.read_json_or_jsonl(path):
            at = f"{path}:{line}"
            if not valid_id(q.get("question_id")) or not isinstance(q.get("image"), str) or not q["image"].strip() \
                    or not isinstance(q.get("text"), str) or not common.question_text(q["text"]):
                raise jobs.DataError(f"{at}: a question needs question_id (a string or an integer), image and text "
                                     f"(non-empty strings)")
            if q.get("label") not in ("yes", "no"):
                raise jobs.DataError(f"{at}: label must be \"yes\" or \"no\", not {q.get('label')!r}")
            k = key(split, q["question_id"])
            if k in where:
                raise jobs.DataError(f"{at}: question_id {q['question_id']!r} appears twice (first at {where[k]})")
            where[k] = at
            questions.append({"key": k, "split": split, "question_id": q["question_id"], "image": q["image"],
                              "question": common.question_text(q["text"]) + args.prompt_suffix, "label": q["label"]})
        if len(questions) == n_before:
            raise jobs.DataError(f"{path}: no questions")
except (jobs.DataError, OSError) as e:
    sys.exit(f"error: {e}")
splits = list(dict.fromkeys(q["split"] for q in questions))

# ---- answers: read as they are, or generated (resumable: answers.jsonl is appended)
os.makedirs(args.out_dir, exist_ok=True)
answers_path = os.path.join(args.out_dir, "answers.jsonl")
if args.answers:
    answer_of = {}
    try:
        for line, r in jobs.read_json_or_jsonl(args.answers):
            at = f"{args.answers}:{line}"
            text, split = r.get("text", r.get("answer")), r.get("split", splits[0] if len(splits) == 1 else None)
            if not isinstance(text, str) or not valid_id(r.get("question_id")) or not isinstance(split, str):
                raise jobs.DataError(f"{at}: expected {{\"question_id\", \"text\"" +
                                     (", \"split\"}" if len(splits) > 1 else "}") + " (text a string)")
            k = key(split, r["question_id"])
            if k not in where:
                raise jobs.DataError(f"{at}: no question {r['question_id']!r} in split {split!r}")
            if k in answer_of:  # it would be scored twice
                raise jobs.DataError(f"{at}: question {r['question_id']!r} of split {split!r} is answered twice")
            answer_of[k] = text
    except (jobs.DataError, OSError) as e:
        sys.exit(f"error: {e}")
    unanswered = [q for q in questions if q["key"] not in answer_of]
    if unanswered:
        sys.exit(f"error: {len(unanswered)} of {len(questions)} questions have no answer in {args.answers}, "
                 f"e.g. {where[unanswered[0]['key']]}")
    if os.path.abspath(args.answers) != os.path.abspath(answers_path):
        jobs.write_atomic(answers_path, "".join(json.dumps({"split": q["split"], "question_id": q["question_id"],
                                                            "answer": answer_of[q["key"]]}, ensure_ascii=False) + "\n"
                                                for q in questions))
else:
    if not args.image_dir:
        sys.exit("error: to generate answers give --image_dir (or score existing ones with --answers)")
    config = {"model": args.model, "adapter": args.adapter, "max_new_tokens": args.max_new_tokens,
              "prompt_suffix": args.prompt_suffix, **common.input_format(args)._asdict()}
    jobs.answer_all(questions, answers_path, "key", config, lambda q: jobs.load_image(args.image_dir, q["image"]),
                    args.batch_size, where, "pope")
    answer_of = {r["key"]: r["answer"] for r in jobs.read_jsonl(answers_path, tolerate_partial_last=True)}

# ---- scores per split
scores = {}
for split in splits:
    qs = [q for q in questions if q["split"] == split]
    scores[split] = metrics([q["label"] for q in qs], [answer_of[q["key"]] for q in qs])
jobs.write_atomic(os.path.join(args.out_dir, "scores.json"), json.dumps(scores, indent=1))
columns = ["accuracy", "precision", "recall", "f1", "yes_ratio"]
print(f"POPE ({args.answers or args.model + (f' + {args.adapter}' if args.adapter else '')})")
print(f"{'split':<14}{'n':>6}" + "".join(f"{c:>11}" for c in columns))
for split, s in scores.items():
    print(f"{split:<14}{s['n']:>6}" + "".join(f"{s[c]:>11.1f}" for c in columns))
if len(scores) > 1:
    print(f"{'mean':<14}{sum(s['n'] for s in scores.values()):>6}" +
          "".join(f"{sum(s[c] for s in scores.values()) / len(scores):>11.1f}" for c in columns))
