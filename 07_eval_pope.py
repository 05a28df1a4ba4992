"""Step 7: POPE (Li et al., 2023), yes/no probing of objects, beyond the paper's Table 2: no judge and
no length confound. Each question file is one split (POPE's random, popular, adversarial: absent
objects drawn at random, among the most frequent, or among those co-occurring most with the present
ones); the split's name is the file name without extension and without a leading `coco_pope_`.
As LLaVA-1.5 evaluates POPE, each question gets "\\nAnswer the question using a single word or
phrase." appended and is answered greedily with up to 128 new tokens. Scoring is LLaVA's eval_pope
rule (scoring.pope_says_no): an answer means "no" when the text before its first "." (commas removed,
split on single spaces) holds the word `No`, `no` or `not` (case-sensitive), else "yes". Per split,
with "yes" as the positive class: accuracy, precision, recall, f1 and yes_ratio (share of answers read
as yes), in percent, and n. Resumable: answers are appended."""
import argparse
import json
import os
import sys

import benchmarks
import common
import data
import dist_io
import scoring


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=dist_io.HelpFormatter)
    p.add_argument("--questions", action="extend", nargs="+", required=True,
                   help='POPE question files, one split each (repeat the flag or list several): JSON lines '
                        '{"question_id", "image", "text", "label": "yes"|"no"}, e.g. coco_pope_random.json; or '
                        "LLaVA's one question file for every split (a category per question, no labels: give "
                        "--annotation_dir)")
    p.add_argument("--annotation_dir", default=None,
                   help="with LLaVA's question file: the folder of POPE's coco_pope_<split>.json label files, read as "
                        "LLaVA's eval_pope.py reads them (the labels of a split in file order)")
    p.add_argument("--image_dir", default=None,
                   help="question images are relative to this (COCO val2014; needed to generate)")
    p.add_argument("--out_dir", required=True, help="writes answers.jsonl, scores.json (reruns resume)")
    p.add_argument("--answers", default=None,
                   help='score existing answers, no model loaded: JSONL {"question_id", "text"} ("answer" is read as '
                        '"text"), with "split" as well where a question id is in several splits (LLaVA\'s one '
                        "answer file for all splits needs none)")
    p.add_argument("--prompt_suffix", default="\nAnswer the question using a single word or phrase.",
                   help="appended to every question (not twice: a question that ends with it already keeps it); the "
                        "default is LLaVA-1.5's short-answer prompt; '' asks the question alone")
    benchmarks.add_model_args(p, max_new_tokens=128, why="LLaVA's POPE setting")
    return p.parse_args(argv)


def key(split, question_id):  # question ids restart in every split
    return json.dumps([split, question_id])


def llava_labels(questions_path, records, annotation_dir):
    """The label of each record of LLaVA's question file (its `category` is the split), as LLaVA's eval_pope.py
    pairs them: a split's questions in file order with the lines of ANNOTATION_DIR/coco_pope_<split>.json, checked
    here to show the same image; DataError naming the files and lines otherwise."""
    if not annotation_dir:
        raise dist_io.DataError(f"{questions_path}: LLaVA's question file (a category per question, no labels) needs "
                                "--annotation_dir, the folder of POPE's coco_pope_<split>.json label files")
    labels = {}
    for split in dict.fromkeys(q.get("category") for _, q in records):
        path = os.path.join(annotation_dir, f"coco_pope_{split}.json")
        mine = [(line, q) for line, q in records if q.get("category") == split]
        given = dist_io.read_json_or_jsonl(path)
        if len(given) != len(mine):
            raise dist_io.DataError(f"{path}: {len(given)} labels for the {len(mine)} {split!r} questions of "
                                    f"{questions_path}")
        for (line, q), (label_line, lab) in zip(mine, given):
            if lab.get("image") not in (None, q.get("image")):
                raise dist_io.DataError(f"{path}:{label_line}: image {lab.get('image')!r}, but the question it labels "
                                        f"({questions_path}:{line}) shows {q.get('image')!r}")
            labels[line] = lab.get("label")
    return labels


def read_questions(paths, prompt_suffix, annotation_dir=None):
    """(questions {key, split, question_id, image, question (+ suffix), label}, where {key: file:line}): one split
    a file, or LLaVA's question file with the labels of annotation_dir; DataError naming file:line."""
    questions, where = [], {}
    for path in paths:
        records = dist_io.read_json_or_jsonl(path)
        llava = bool(records) and "category" in records[0][1] and "label" not in records[0][1]
        labels = llava_labels(path, records, annotation_dir) if llava else {}
        file_split = os.path.splitext(os.path.basename(path))[0].removeprefix("coco_pope_")
        if not llava and any(q["split"] == file_split for q in questions):
            raise dist_io.DataError(f"{path}: split {file_split!r} is given twice")
        n_before = len(questions)
        for line, q in records:
            at, split = f"{path}:{line}", q.get("category") if llava else file_split
            if not dist_io.valid_id(q.get("question_id")) or not isinstance(q.get("image"), str) or not q["image"].strip() \
                    or not isinstance(q.get("text"), str) or not common.question_text(q["text"]) \
                    or not isinstance(split, str) or not split:
                raise dist_io.DataError(f"{at}: a question needs question_id (a string or an integer), image and text "
                                        f"(non-empty strings)" + (" and category" if llava else ""))
            label = labels.get(line, q.get("label"))
            if label not in ("yes", "no"):
                raise dist_io.DataError(f"{at}: label must be \"yes\" or \"no\", not {label!r}")
            k = key(split, q["question_id"])
            if k in where:
                raise dist_io.DataError(f"{at}: question_id {q['question_id']!r} appears twice (first at {where[k]})")
            where[k] = at
            text = common.question_text(q["text"])
            if prompt_suffix.strip() and not text.endswith(prompt_suffix.strip()):
                text += prompt_suffix
            questions.append({"key": k, "split": split, "question_id": q["question_id"], "image": q["image"],
                              "question": text, "label": label})
        if len(questions) == n_before:
            raise dist_io.DataError(f"{path}: no questions")
    return questions, where


def read_answers(path, questions, where):
    """{key: text} of existing answers (JSONL {question_id, text}, with split where an id is in several splits:
    LLaVA's one answer file needs none, its ids are unique); DataError naming file:line. Warns where a split's
    answers are not in its questions' order: LLaVA's eval_pope.py pairs them with the labels by position."""
    splits_of = {}
    for q in questions:
        splits_of.setdefault(q["question_id"], []).append(q["split"])
    answer_of = {}
    for line, r in dist_io.read_json_or_jsonl(path):
        at = f"{path}:{line}"
        text, qid = r.get("text", r.get("answer")), r.get("question_id")
        split = r.get("split") or (splits_of[qid][0] if dist_io.valid_id(qid) and len(splits_of.get(qid, [])) == 1 else None)
        if not isinstance(text, str) or not dist_io.valid_id(qid) or not isinstance(split, str):
            raise dist_io.DataError(f"{at}: expected {{\"question_id\", \"text\"}}, and \"split\" where the id is in "
                                    "several splits (text a string)")
        k = key(split, qid)
        if k not in where:
            raise dist_io.DataError(f"{at}: no question {qid!r} in split {split!r}")
        if k in answer_of:  # it would be scored twice
            raise dist_io.DataError(f"{at}: question {qid!r} of split {split!r} is answered twice")
        answer_of[k] = text
    order = {q["key"]: i for i, q in enumerate(questions)}
    for split in dict.fromkeys(q["split"] for q in questions):
        given = [order[k] for k in answer_of if json.loads(k)[0] == split]
        if given != sorted(given):
            print(f"warning: {path}: the {split!r} answers are not in the questions' order; scored by question_id "
                  "(LLaVA's eval_pope.py would pair them with the labels by position)", file=sys.stderr)
    return answer_of


def main(argv=None):
    args = parse_args(argv)
    # ---- questions (one split a file) and answers: read as they are, or generated (resumable: answers.jsonl)
    try:
        questions, where = read_questions(args.questions, args.prompt_suffix, args.annotation_dir)
        splits = list(dict.fromkeys(q["split"] for q in questions))
        answer_of = read_answers(args.answers, questions, where) if args.answers else None
    except (dist_io.DataError, OSError) as e:
        sys.exit(f"error: {e}")
    os.makedirs(args.out_dir, exist_ok=True)
    answers_path = os.path.join(args.out_dir, "answers.jsonl")
    if answer_of is not None:
        unanswered = [q for q in questions if q["key"] not in answer_of]
        if unanswered:
            sys.exit(f"error: {len(unanswered)} of {len(questions)} questions have no answer in {args.answers}, "
                     f"e.g. {where[unanswered[0]['key']]}")
        if os.path.abspath(args.answers) != os.path.abspath(answers_path):
            dist_io.write_atomic(answers_path, "".join(json.dumps({"split": q["split"], "question_id": q["question_id"],
                                                                   "answer": answer_of[q["key"]]}, ensure_ascii=False)
                                                       + "\n" for q in questions))
    else:
        if not args.image_dir:
            sys.exit("error: to generate answers give --image_dir (or score existing ones with --answers)")
        config = {"model": args.model, "adapter": args.adapter, "max_new_tokens": args.max_new_tokens,
                  "prompt_suffix": args.prompt_suffix, **common.input_format(args)._asdict()}
        benchmarks.answer_all(questions, answers_path, "key", config, lambda q: data.load_image(args.image_dir, q["image"]),
                              args.batch_size, where, "pope")
        answer_of = {r["key"]: r["answer"] for r in dist_io.read_jsonl(answers_path, tolerate_partial_last=True)}

    # ---- scores per split
    scores = {}
    for split in splits:
        qs = [q for q in questions if q["split"] == split]
        scores[split] = scoring.pope_metrics([q["label"] for q in qs], [answer_of[q["key"]] for q in qs])
    dist_io.write_atomic(os.path.join(args.out_dir, "scores.json"), json.dumps(scores, indent=1))
    columns = ["accuracy", "precision", "recall", "f1", "yes_ratio"]
    print(f"POPE ({args.answers or args.model + (f' + {args.adapter}' if args.adapter else '')})")
    print(f"{'split':<14}{'n':>6}" + "".join(f"{c:>11}" for c in columns))
    for split, s in scores.items():
        print(f"{split:<14}{s['n']:>6}" + "".join(f"{s[c]:>11.1f}" for c in columns))
    if len(scores) > 1:
        print(f"{'mean':<14}{sum(s['n'] for s in scores.values()):>6}" +
              "".join(f"{sum(s[c] for s in scores.values()) / len(scores):>11.1f}" for c in columns))


if __name__ == "__main__":
    main()
