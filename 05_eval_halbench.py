"""Step 5: Object HalBench, as RLHF-V/RLAIF-V run it. The model describes each image (by default
their decoding: temperature 0, 3 beams, up to 1024 new tokens); a CHAIR engine finds the COCO
objects each description names and checks them against the image's ground truth (COCO 2014
instance annotations + objects in the reference captions, train and val merged, or a plain objects
JSON). Reports Resp twice: chair_s over all responses and chair_s_refine over the responses that
name at least one COCO object (RLHF-V/RLAIF-V's Resp, 'Response Hall'); Obj (chair_i: hallucinated
mentions over all object mentions); plus recall and length, since CHAIR moves with length.
Questions: RLHF-V/RLAIF-V's published obj_halbench_300_with_image.jsonl as it is (base64 images),
or JSONL with image paths. Resumable: answers and LLM extractions are appended as they come."""
import argparse
import base64
import binascii
import io
import json
import os
import re
import sys

from tqdm import tqdm

import benchmarks
import common
import data
import dist_io
import remote
import scoring

# The LLM extractor's request (--extractor MODEL): the objects said to be present, as the description names them
EXTRACT = ("Below is a description of an image. List every physical object that the description says is "
           "present in the image, one name per object kind, as the words it uses (for example: man, dogs, "
           "dining table). Leave out objects it says are absent or only possible. Reply with the names "
           "separated by commas and nothing else, or 'none'.\n\nDescription:\n{description}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=dist_io.HelpFormatter)
    p.add_argument("--questions", default=None,
                   help="questions JSONL: RLHF-V/RLAIF-V's obj_halbench_300_with_image.jsonl as it is "
                        '({"image_id": <COCO id>, "question", "image": "<base64 JPEG>"}; the line index from 0 is the '
                        'question id) or {"question_id", "image": "relative/path.jpg", "question"}; needed unless '
                        "--answers has every image")
    p.add_argument("--image_dir", default=None,
                   help="image paths of the questions are relative to this (needed to generate for them; base64 "
                        "images need none)")
    gt = p.add_mutually_exclusive_group(required=True)
    gt.add_argument("--objects", default=None,
                    help='ground truth as a plain JSON {"<image file name or image_id>": ["dog", "person", ...]}')
    gt.add_argument("--coco_dir", default=None,
                    help="ground truth from COCO 2014: DIR/annotations/instances_{train,val}2014.json + "
                         "captions_{train,val}2014.json, train and val merged where both are present (either split "
                         "alone works); an image's COCO id is its image_id, else the number ending its file name "
                         "(COCO_val2014_000000123456.jpg)")
    p.add_argument("--out_dir", required=True, help="writes answers.jsonl, details.jsonl, scores.json (reruns resume)")
    p.add_argument("--synonyms", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "coco_synonyms.txt"),
                   help="synonym table, one class a line: class, synonym, ... (the repo ships a COCO-80 table)")
    p.add_argument("--extractor", default="rules",
                   help="'rules': every synonym in the text is a mention (classic CHAIR, negations count; offline); "
                        "an OpenAI model name: that model lists the objects said to be present first (cached)")
    p.add_argument("--base_url", default=None, help="OpenAI-compatible server of the extractor (none: OpenAI)")
    p.add_argument("--workers", type=int, default=8, help="extractor calls in flight")
    remote.add_remote_args(p)
    p.add_argument("--answers", default=None,
                   help='score existing answers, no model loaded: JSONL (or JSON list) of {"question_id", "image", '
                        '"answer"} ("text" is read as "answer"; a missing image is looked up in --questions), or '
                        'RLAIF-V\'s answer files {"question_id", "image_id", "text", ...}, matched to --questions by '
                        "image_id (their question_id restarts in every GPU chunk)")
    p.add_argument("--num_beams", type=int, default=3,
                   help="beam search width, temperature 0 (RLHF-V's protocol: 3; 1 = greedy); recorded with each "
                        "answer")
    benchmarks.add_model_args(p, max_new_tokens=1024, why="RLHF-V's protocol: 1024")
    return p.parse_args(argv)


def as_coco_id(value):
    """A COCO image id from an image_id (an integer or a string of digits), or None."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return int(value) if isinstance(value, str) and value.strip().isdigit() else None


def read_questions(path):
    """(questions {question_id, image, question, ...}, where {question_id: file:line}, image_bytes
    {question_id: the decoded base64 image of RLHF-V's published file, kept out of the question and so out
    of answers.jsonl}); DataError naming file:line."""
    questions, where, image_bytes = [], {}, {}
    for index, (line, q) in enumerate(dist_io.read_json_or_jsonl(path)):
        at = f"{path}:{line}"
        if "question_id" not in q:  # RLHF-V's published file: a COCO image_id and a base64 image
            if as_coco_id(q.get("image_id")) is None or not isinstance(q.get("image"), str) \
                    or not isinstance(q.get("question"), str) or not common.question_text(q["question"]):
                raise dist_io.DataError(f"{at}: a line without question_id (RLHF-V's published format) needs image_id "
                                        f"(a COCO id), image (a base64 JPEG) and question (a non-empty string)")
            try:
                image_bytes[index] = base64.b64decode("".join(q["image"].split()), validate=True)
            except (binascii.Error, ValueError) as e:
                raise dist_io.DataError(f"{at}: image is not base64 ({e})") from None
            q = {"question_id": index, **{k: v for k, v in q.items() if k != "image"}}
        elif not dist_io.valid_id(q.get("question_id")) or not isinstance(q.get("image"), str) or not q["image"].strip() \
                or not isinstance(q.get("question"), str) or not common.question_text(q["question"]):
            raise dist_io.DataError(f"{at}: a question needs question_id (a string or an integer), image and question "
                                    f"(non-empty strings)")
        if q["question_id"] in where:
            raise dist_io.DataError(f"{at}: question_id {q['question_id']!r} appears twice (first at "
                                    f"{where[q['question_id']]})")
        where[q["question_id"]] = at
        questions.append({**q, "question": common.question_text(q["question"])})
    return questions, where, image_bytes


def read_answers(path, questions, questions_path):
    """Existing answers as {question_id, image and/or image_id, answer}, with the file:line of each.
    An answer with an image_id and no image (RLAIF-V's answer files, whose question_id restarts in
    every GPU chunk) is matched to the question with that image_id; any other by question_id, whose
    question gives the image an answer lacks."""
    by_id, by_image_id = {q["question_id"]: q for q in questions}, {}
    for q in questions:
        if dist_io.valid_id(q.get("image_id")):
            by_image_id.setdefault(str(q["image_id"]), []).append(q)
    answers, at_of, seen = [], [], {}
    for line, r in dist_io.read_json_or_jsonl(path):
        at = f"{path}:{line}"
        text = r.get("answer", r.get("text"))
        by_image = dist_io.valid_id(r.get("image_id")) and not r.get("image")
        if not isinstance(text, str) or not (by_image or dist_io.valid_id(r.get("question_id"))):
            raise dist_io.DataError(f'{at}: expected {{"question_id", "image", "answer"}} or RLAIF-V\'s '
                                    f'{{"question_id", "image_id", "text"}}')
        if not by_image:
            q = by_id.get(r["question_id"], {})
        elif questions:
            matches = by_image_id.get(str(r["image_id"]), [])
            if len(matches) != 1:
                raise dist_io.DataError(f"{at}: image_id {r['image_id']!r} is {'not unique' if matches else 'not'} "
                                        f"in {questions_path}")
            q = matches[0]
        else:
            q = {}  # the image_id alone finds the ground truth
        a = {"question_id": q.get("question_id", r.get("question_id"))}
        for k in ("image", "image_id"):
            value = r.get(k) if r.get(k) not in (None, "") else q.get(k)
            if value not in (None, ""):
                a[k] = value
        if "image" not in a and "image_id" not in a:
            raise dist_io.DataError(f"{at}: no image, and question {r['question_id']!r} is not in --questions")
        key = ("image_id", str(a["image_id"])) if by_image and not q else ("question_id", a["question_id"])
        if key in seen:  # it would be scored twice
            raise dist_io.DataError(f"{at}: {key[0]} {key[1]!r} appears twice (first at line {seen[key]})")
        seen[key] = line
        answers.append({**a, "answer": text})
        at_of.append(at)
    return answers, at_of


def truth_key(rec, coco):
    """Where a question's or answer's ground truth is filed: with COCO (coco true) its COCO id (its image_id,
    else the number ending its file name, as in COCO_val2014_000000123456.jpg); with --objects its image's
    file name, else its image_id as a string. None when it has none of these."""
    image = os.path.basename(rec.get("image") or "")
    if not coco:
        return image or (str(rec["image_id"]) if dist_io.valid_id(rec.get("image_id")) else None)
    coco_id, named = as_coco_id(rec.get("image_id")), re.search(r"(?:^|_)(\d+)\.[A-Za-z]+$", image)
    return coco_id if coco_id is not None else int(named.group(1)) if named else None


def objects_truth(path, chair):
    """{image file name or image_id: classes} from a plain {"<image>": ["class", ...]} JSON."""
    objects = dist_io.read_json(path)
    if not isinstance(objects, dict) or not all(isinstance(v, list) for v in objects.values()):
        raise dist_io.DataError(f'{path}: expected {{"<image>": ["class", ...]}}')
    return {os.path.basename(image): {c for n in names for c in chair.classes_of(str(n))}
            for image, names in objects.items()}


def coco_truth(coco_dir, wanted, chair):
    """The wanted images' classes from COCO 2014, every split present merged (RLHF-V merges train and
    val): their instance annotations plus the objects their reference captions name."""
    annotations = os.path.join(coco_dir, "annotations")
    splits = [s for s in ("train", "val") if os.path.exists(os.path.join(annotations, f"instances_{s}2014.json"))]
    if not splits:
        raise dist_io.DataError(f"{annotations} holds neither instances_train2014.json nor instances_val2014.json")
    truth = {}
    for split in splits:
        for kind in ("instances", "captions"):
            path = os.path.join(annotations, f"{kind}_{split}2014.json")
            coco = dist_io.read_json(path)
            try:
                for im in coco["images"]:
                    if im["id"] in wanted:
                        truth.setdefault(im["id"], set())
                category = {c["id"]: c["name"] for c in coco.get("categories", [])}
                for a in coco["annotations"]:  # the objects that reference captions name count as present too
                    if a["image_id"] in wanted:
                        truth[a["image_id"]] |= (chair.classes_of(category[a["category_id"]]) if kind == "instances"
                                                 else chair.classes(a["caption"]))
            except (KeyError, TypeError, AttributeError) as e:
                raise dist_io.DataError(f"{path}: not in COCO's format ({type(e).__name__}: {e})") from None
    return truth


def image_of(question, image_bytes, image_dir):
    """A question's image: its decoded base64 image (RLHF-V's published file), or the file it names."""
    if question["question_id"] not in image_bytes:
        return data.load_image(image_dir, question["image"])
    from PIL import Image
    try:
        with Image.open(io.BytesIO(image_bytes[question["question_id"]])) as im:
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise dist_io.DataError(f"the base64 image is not a readable image ({type(e).__name__}: {e})") from None


def main(argv=None):
    args = parse_args(argv)
    try:
        chair = scoring.Chair(scoring.read_synonyms(args.synonyms))
        questions, where, image_bytes = read_questions(args.questions) if args.questions else ([], {}, {})
    except (dist_io.DataError, OSError) as e:
        sys.exit(f"error: {e}")

    # ---- what gets scored, in order: existing answers (--answers), or the questions (answered below)
    if args.answers:
        try:
            targets, target_at = read_answers(args.answers, questions, args.questions)
        except (dist_io.DataError, OSError) as e:
            sys.exit(f"error: {e}")
    else:
        if not questions:
            sys.exit("error: to generate answers give --questions (or score existing ones with --answers)")
        if not args.image_dir and any(q["question_id"] not in image_bytes for q in questions):
            sys.exit(f"error: the questions in {args.questions} give image paths: give --image_dir")
        targets, target_at = questions, [where[q["question_id"]] for q in questions]
    if not targets:
        sys.exit("error: no answers to score")

    # ---- ground truth of those images, found before any generation: {truth key: set of classes}
    keys = [truth_key(t, bool(args.coco_dir)) for t in targets]
    if None in keys:
        sys.exit(f"error: {target_at[keys.index(None)]}: no COCO id for this image: give an image_id, or a file name "
                 f"ending in the id (COCO_val2014_000000123456.jpg)")
    try:
        truth = coco_truth(args.coco_dir, set(keys), chair) if args.coco_dir else objects_truth(args.objects, chair)
    except (dist_io.DataError, OSError) as e:
        sys.exit(f"error: {e}")
    if chair.unknown:
        print(f"warning: {len(chair.unknown)} ground-truth names not in {args.synonyms}, ignored: "
              f"{sorted(chair.unknown)[:10]}", file=sys.stderr)
    lacking = [(at, k) for at, k in zip(target_at, keys) if k not in truth]
    if lacking:
        sys.exit(f"error: {lacking[0][0]}: no ground truth for image {lacking[0][1]!r} in "
                 f"{args.objects or args.coco_dir} ({len(lacking)} of the {len(keys)} to score lack it)")

    # ---- answers: read as they are, or generated (resumable: answers.jsonl is appended)
    os.makedirs(args.out_dir, exist_ok=True)
    answers_path = os.path.join(args.out_dir, "answers.jsonl")
    if args.answers:
        answers = targets
        if os.path.abspath(args.answers) != os.path.abspath(answers_path):
            dist_io.write_atomic(answers_path, "".join(json.dumps(a, ensure_ascii=False) + "\n" for a in answers))
    else:
        config = {"model": args.model, "adapter": args.adapter, "max_new_tokens": args.max_new_tokens,
                  "num_beams": args.num_beams, **common.input_format(args)._asdict()}
        benchmarks.answer_all(questions, answers_path, "question_id", config,
                              lambda q: image_of(q, image_bytes, args.image_dir), args.batch_size, where, "describe")
        by_id = {r["question_id"]: r for r in dist_io.read_jsonl(answers_path, tolerate_partial_last=True)}
        answers = [by_id[q["question_id"]] for q in questions]

    # ---- mentions: the rules on the text, or an LLM's list of present objects through the same rules
    served = []  # the models an LLM extractor's endpoint says answered
    if args.extractor == "rules":
        found = [chair.mentions(a["answer"]) for a in tqdm(answers, desc="chair")]
    else:
        client = remote.openai_client(args.base_url, args.timeout, args.retries)

        def extract(call):
            reply = remote.chat(client, call["extractor"],
                                [{"role": "user", "content": EXTRACT.replace("{description}", call["answer"])}],
                                tries=args.retries)
            names = [n.strip() for n in re.split(r"[,\n]", reply.text) if n.strip() and n.strip().lower() != "none"]
            return {"objects": names, "model": reply.model}

        calls = [{"question_id": a["question_id"], "extractor": args.extractor, "answer": a["answer"]} for a in answers]
        records, errors = remote.cached_map(os.path.join(args.out_dir, "extractions.jsonl"), calls, extract,
                                            args.workers, "extract")
        if errors:
            sys.exit(f"error: {len(errors)} extractions failed, e.g. {errors[0]}; rerun to retry them")
        found = [[m for name in r["objects"] for m in chair.mentions(name)] for r in records]
        served = sorted({r.get("model") for r in records if r.get("model")})

    # ---- scores and per-response details
    truths = [truth[k] for k in keys]
    dist_io.write_atomic(os.path.join(args.out_dir, "details.jsonl"), "".join(
        json.dumps({"question_id": a["question_id"], **{k: a[k] for k in ("image", "image_id") if k in a},
                    "mentions": fd, "mentioned": sorted({c for _, c in fd}),
                    "hallucinated": sorted({c for _, c in fd} - t), "ground_truth": sorted(t)}, ensure_ascii=False)
        + "\n" for a, fd, t in zip(answers, found, truths)))
    scores = {**scoring.chair_scores(found, truths, [a["answer"] for a in answers]), "extractor": args.extractor,
              **({"extractor_models": served} if args.extractor != "rules" else {})}
    dist_io.write_atomic(os.path.join(args.out_dir, "scores.json"), json.dumps(scores, indent=1))
    decoding = "" if args.answers else f", num_beams {args.num_beams}, max_new_tokens {args.max_new_tokens}"
    print(f"Object HalBench: {scores['n']} responses, {scores['n_with_objects']} of them name a COCO object "
          f"(extractor {args.extractor}{decoding})\n"
          f"  Resp  chair_s         {scores['chair_s']:5.1f}  responses with a hallucinated object, over all "
          f"responses\n"
          f"  Resp  chair_s_refine  {scores['chair_s_refine']:5.1f}  the same over the responses that name an object "
          f"(RLHF-V/RLAIF-V's Resp)\n"
          f"  Obj   chair_i         {scores['chair_i']:5.1f}  hallucinated object mentions, over all mentions\n"
          f"  recall {scores['recall']:.1f}  avg_len {scores['avg_len']:.1f} words")


if __name__ == "__main__":
    main()
