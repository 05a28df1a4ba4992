"""Step 5: Object HalBench. The model describes each image (greedy); a CHAIR engine finds the COCO
objects each description names and checks them against the image's ground truth (instance
annotations + objects in the reference captions, or a plain objects JSON). Reports the paper's
Resp (chair_s: share of responses with a hallucinated object) and Obj (chair_i: hallucinated
mentions over all object mentions), plus recall and length, since CHAIR moves with length.
Resumable: answers and LLM extractions are appended as they come."""
import argparse
import json
import os
import re
import sys
from collections import defaultdict
from functools import lru_cache

import inflect
from tqdm import tqdm

import common
import jobs

p = argparse.ArgumentParser(description=__doc__, formatter_class=jobs.HelpFormatter)
p.add_argument("--model", default="llava-hf/llava-1.5-7b-hf", help="base model (dir or hub id)")
p.add_argument("--adapter", default=None, help="peft adapter dir (03's D/adapter) merged onto --model; none = base model")
p.add_argument("--questions", default=None,
               help='questions JSONL {"question_id", "image", "question"}; needed unless --answers has every image')
p.add_argument("--image_dir", default=None, help="question images are relative to this (needed to generate)")
gt = p.add_mutually_exclusive_group(required=True)
gt.add_argument("--objects", default=None, help='ground truth as a plain JSON {"<image>": ["dog", "person", ...]}')
gt.add_argument("--coco_dir", default=None,
                help="ground truth from COCO: DIR/annotations/instances_val2014.json + captions_val2014.json")
p.add_argument("--out_dir", required=True, help="writes answers.jsonl, details.jsonl, scores.json (reruns resume)")
p.add_argument("--synonyms", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "coco_synonyms.txt"),
               help="synonym table, one class a line: class, synonym, ... (the repo ships a COCO-80 table)")
p.add_argument("--extractor", default="rules",
               help="'rules': every synonym in the text is a mention (classic CHAIR, negations count); "
                    "an OpenAI model name: that model lists the objects said to be present first (cached)")
p.add_argument("--base_url", default=None, help="OpenAI-compatible server of the extractor (none: OpenAI)")
p.add_argument("--workers", type=int, default=8, help="extractor calls in flight")
jobs.add_remote_args(p)
p.add_argument("--answers", default=None,
               help='score existing answers, no model loaded: JSONL (or JSON list) of {"question_id", "image", '
                    '"answer"} ("text" is read as "answer"; a missing image is looked up in --questions)')
p.add_argument("--max_new_tokens", type=int, default=512, help="description length cap (recorded with each answer)")
p.add_argument("--batch_size", type=int, default=8, help="generations per forward")
common.add_format_args(p)
args = p.parse_args()

# ---- the CHAIR engine: words -> singular -> longest synonym phrase first -> COCO class
NOT_OBJECTS = {("home", "plate"), ("train", "track"), ("train", "station"), ("bus", "stop"), ("baseball", "cap"),
               ("baseball", "field"), ("baseball", "game"), ("baseball", "diamond"), ("baseball", "uniform"),
               ("tennis", "court"), ("football", "field"), ("soccer", "field")}  # their words name no object here
MODIFIERS = {"baby", "adult", "passenger"}  # "baby elephant" is an elephant; "baby" alone is a person


def read_synonyms(path):
    """{phrase as a tuple of words: class}; the class name is a synonym of itself."""
    table = {}
    for line_no, line in enumerate(jobs.read_utf8(path).splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        names = [n.strip() for n in line.split(",")]
        if not all(re.fullmatch(r"[a-z]+( [a-z]+)*", n) for n in names):
            raise jobs.DataError(f"{path}:{line_no}: expected 'class, synonym, ...' in lower-case words")
        for n in names:
            if table.get(tuple(n.split()), names[0]) != names[0]:
                raise jobs.DataError(f"{path}:{line_no}: {n!r} is already a synonym of {table[tuple(n.split())]!r}")
            table[tuple(n.split())] = names[0]
    return table


_inflect = inflect.engine()


@lru_cache(maxsize=None)
def singular(word):
    return _inflect.singular_noun(word) or word


def mentions(text, table):
    """(phrase, class) of every object mention in the text, in order; a repeated mention counts again."""
    words = [w if w in vocab else singular(w) for w in re.findall(r"[a-z]+", text.lower())]  # "bus" stays

    def match(i):  # (length, class or None) of the longest phrase starting at word i
        for n in range(min(longest, len(words) - i), 0, -1):
            phrase = tuple(words[i:i + n])
            if phrase in table or phrase in NOT_OBJECTS:
                return n, table.get(phrase)
        return None

    found, i = [], 0
    while i < len(words):
        m = match(i)
        if m is None:
            i += 1
            continue
        if words[i] in MODIFIERS and m[0] == 1 and (match(i + 1) or (0, None))[1]:
            i += 1  # a modifier of the object that follows
            continue
        if m[1]:
            found.append((" ".join(words[i:i + m[0]]), m[1]))
        i += m[0]
    if any(c == "toilet" for _, c in found):  # "the seat of the toilet" names no chair
        found = [(w, c) for w, c in found if w != "seat"]
    return found


def chair_scores(found, truths, answers):
    """Percent scores from, per response: its (phrase, class) mentions, its ground-truth classes and its text."""
    hallucinated = [[c for _, c in f if c not in t] for f, t in zip(found, truths)]
    n_mentions = sum(len(f) for f in found)
    n_truth = sum(len(t) for t in truths)
    return {"chair_s": 100 * sum(bool(h) for h in hallucinated) / len(found),
            "chair_i": 100 * sum(map(len, hallucinated)) / n_mentions if n_mentions else 0.0,
            "recall": 100 * sum(len({c for _, c in f} & t) for f, t in zip(found, truths)) / n_truth if n_truth else 0.0,
            "avg_len": sum(len(a.split()) for a in answers) / len(answers),
            "n": len(found)}


try:
    table = read_synonyms(args.synonyms)
except (jobs.DataError, OSError) as e:
    sys.exit(f"error: {e}")
vocab = {w for phrase in list(table) + list(NOT_OBJECTS) for w in phrase}  # words never singularised
longest = max(len(phrase) for phrase in list(table) + list(NOT_OBJECTS))


def classes_of(name):
    cls = {c for _, c in mentions(name, table)}
    if not cls:
        unknown.add(name)
    return cls


# ---- ground truth: {image file name: set of classes}
unknown = set()  # ground-truth names the table does not know (they cannot be hallucinated or recalled)
truth = defaultdict(set)
gt_file = args.objects  # the file being read, for error messages
try:
    if args.objects:
        objects = json.loads(jobs.read_utf8(args.objects))
        if not isinstance(objects, dict) or not all(isinstance(v, list) for v in objects.values()):
            raise TypeError('expected {"<image>": ["class", ...]}')
        for image, names in objects.items():
            truth[os.path.basename(image)] = {c for n in names for c in classes_of(str(n))}
    else:
        gt_file = os.path.join(args.coco_dir, "annotations", "instances_val2014.json")
        instances = json.loads(jobs.read_utf8(gt_file))
        file_of = {im["id"]: im["file_name"] for im in instances["images"]}
        category = {c["id"]: c["name"] for c in instances["categories"]}
        for a in instances["annotations"]:
            truth[file_of[a["image_id"]]] |= classes_of(category[a["category_id"]])
        gt_file = os.path.join(args.coco_dir, "annotations", "captions_val2014.json")
        captions = json.loads(jobs.read_utf8(gt_file))
        for a in captions["annotations"]:  # objects the reference captions name count as present too
            truth[file_of[a["image_id"]]] |= {c for _, c in mentions(a["caption"], table)}
except json.JSONDecodeError as e:
    sys.exit(f"error: {gt_file}:{e.lineno}: not valid JSON ({e.msg})")
except (KeyError, TypeError, AttributeError) as e:
    sys.exit(f"error: {gt_file}: not in the expected format ({type(e).__name__}: {e})")
except (jobs.DataError, OSError) as e:
    sys.exit(f"error: {e}")
if unknown:
    print(f"warning: {len(unknown)} ground-truth names not in {args.synonyms}, ignored: {sorted(unknown)[:10]}",
          file=sys.stderr)

def valid_id(qid):
    return isinstance(qid, (str, int)) and not isinstance(qid, bool)


# ---- questions (to generate, or to find the images of answers that lack them)
questions, where = [], {}  # where[question_id] = file:line, for messages
if args.questions:
    try:
        for line, q in jobs.read_json_or_jsonl(args.questions):
            at = f"{args.questions}:{line}"
            if not valid_id(q.get("question_id")) or not isinstance(q.get("image"), str) or not q["image"].strip() \
                    or not isinstance(q.get("question"), str) or not common.question_text(q["question"]):
                raise jobs.DataError(f"{at}: a question needs question_id (a string or an integer), image and "
                                       f"question (non-empty strings)")
            if q["question_id"] in where:
                raise jobs.DataError(f"{at}: question_id {q['question_id']!r} appears twice (first at "
                                       f"{where[q['question_id']]})")
            where[q["question_id"]] = at
            questions.append({**q, "question": common.question_text(q["question"])})
    except (jobs.DataError, OSError) as e:
        sys.exit(f"error: {e}")

# ---- answers: read as they are, or generated (resumable: answers.jsonl is appended)
os.makedirs(args.out_dir, exist_ok=True)
answers_path = os.path.join(args.out_dir, "answers.jsonl")
if args.answers:
    image_of = {q["question_id"]: q["image"] for q in questions}
    answers, seen = [], {}
    try:
        for line, r in jobs.read_json_or_jsonl(args.answers):
            text = r.get("answer", r.get("text"))
            if not isinstance(text, str) or not valid_id(r.get("question_id")):
                raise jobs.DataError(f"{args.answers}:{line}: expected {{\"question_id\", \"image\", \"answer\"}}")
            if r["question_id"] in seen:  # it would be scored twice
                raise jobs.DataError(f"{args.answers}:{line}: question_id {r['question_id']!r} appears twice "
                                       f"(first at line {seen[r['question_id']]})")
            seen[r["question_id"]] = line
            image = r.get("image") or image_of.get(r["question_id"])
            if not image:
                raise jobs.DataError(f"{args.answers}:{line}: no image, and question {r['question_id']!r} is "
                                       f"not in --questions")
            answers.append({"question_id": r["question_id"], "image": image, "answer": text})
    except (jobs.DataError, OSError) as e:
        sys.exit(f"error: {e}")
    if os.path.abspath(args.answers) != os.path.abspath(answers_path):
        jobs.write_atomic(answers_path, "".join(json.dumps(a, ensure_ascii=False) + "\n" for a in answers))
else:
    if not questions or not args.image_dir:
        sys.exit("error: to generate answers give --questions and --image_dir (or score existing ones with --answers)")
    config = {"model": args.model, "adapter": args.adapter, "max_new_tokens": args.max_new_tokens,
              **common.input_format(args)._asdict()}
    jobs.answer_all(questions, answers_path, "question_id", config,
                    lambda it: jobs.load_image(args.image_dir, it["image"]), args.batch_size, where, "describe")
    by_id = {r["question_id"]: r for r in jobs.read_jsonl(answers_path, tolerate_partial_last=True)}
    answers = [by_id[q["question_id"]] for q in questions]
if not answers:
    sys.exit("error: no answers to score")
missing = sorted({os.path.basename(a["image"]) for a in answers} - set(truth))
if missing:
    sys.exit(f"error: no ground truth for {len(missing)} images (e.g. {missing[0]}) in {args.objects or args.coco_dir}")

# ---- mentions: the rules on the text, or an LLM's list of present objects through the same rules
if args.extractor == "rules":
    found = [mentions(a["answer"], table) for a in tqdm(answers, desc="chair")]
else:
    EXTRACT = ("Below is a description of an image. List every physical object that the description says is "
               "present in the image, one name per object kind, as the words it uses (for example: man, dogs, "
               "dining table). Leave out objects it says are absent or only possible. Reply with the names "
               "separated by commas and nothing else, or 'none'.\n\nDescription:\n{description}")
    client = jobs.openai_client(args.base_url, args.timeout, args.retries)

    def extract(job):
        text = jobs.chat(client, job["extractor"],
                         [{"role": "user", "content": EXTRACT.replace("{description}", job["answer"])}],
                         tries=args.retries)
        return {"objects": [n.strip() for n in re.split(r"[,\n]", text) if n.strip() and n.strip().lower() != "none"]}

    jobs = [{"question_id": a["question_id"], "extractor": args.extractor, "answer": a["answer"]} for a in answers]
    records, errors = jobs.cached_map(os.path.join(args.out_dir, "extractions.jsonl"), jobs, extract,
                                        args.workers, "extract")
    if errors:
        sys.exit(f"error: {len(errors)} extractions failed, e.g. {errors[0]}; rerun to retry them")
    found = [[m for name in r["objects"] for m in mentions(name, table)] for r in records]

# ---- scores and per-response details
truths = [truth[os.path.basename(a["image"])] for a in answers]
jobs.write_atomic(os.path.join(args.out_dir, "details.jsonl"), "".join(
    json.dumps({"question_id": a["question_id"], "image": a["image"], "mentions": fd,
                "mentioned": sorted({c for _, c in fd}), "hallucinated": sorted({c for _, c in fd} - t),
                "ground_truth": sorted(t)}, ensure_ascii=False) + "\n" for a, fd, t in zip(answers, found, truths)))
scores = chair_scores(found, truths, [a["answer"] for a in answers])
jobs.write_atomic(os.path.join(args.out_dir, "scores.json"), json.dumps(scores, indent=1))
print(f"Object HalBench ({scores['n']} responses, extractor {args.extractor}"
      f"{'' if args.answers else f', max_new_tokens {args.max_new_tokens}'}): "
      f"Resp (CHAIR_s) {scores['chair_s']:.1f}  Obj (CHAIR_i) {scores['chair_i']:.1f}  "
      f"recall {scores['recall']:.1f}  avg_len {scores['avg_len']:.1f} words")
