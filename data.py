"""The records 01-03 read, validated before any work: ground-truth items (LLaVA conversations),
preference pairs, images and their roots; every bad record named by file:line (dist_io.DataError),
or skipped and counted under --on_error skip."""
import collections
import os
import random
import sys

from tqdm import tqdm

import common
from dist_io import DataError, OnError, read_json_or_jsonl

# ----------------------------------------------------------------------------- ground-truth items (01, 02)


def add_ground_truth_args(parser, out):
    """--data NAME=PATH (repeated), --out (default `out`), --samples_per_source, --turns: 01's and 02's input."""
    parser.add_argument("--data", action="append", required=True, metavar="NAME=PATH",
                        help="ground truth in LLaVA conversation format (JSON list or JSONL); repeat per source")
    parser.add_argument("--out", default=out, help="pairs JSONL (appended to: reruns resume)")
    parser.add_argument("--samples_per_source", type=int, default=-1, help="uniform sample per source; -1 = all")
    parser.add_argument("--turns", choices=["first", "all"], default="first", help="which human/gpt turns become items")


def parse_data_specs(specs):
    """`--data NAME=PATH` flags -> [(name, path)]."""
    out = []
    for s in specs:
        if "=" not in s:
            sys.exit(f"--data {s!r}: expected NAME=PATH (e.g. sharegpt4v=sharegpt4v.json)")
        name, path = s.split("=", 1)
        out.append((name, path))
    return out


def outside_root(rel):
    """Whether a relative path from a data file leaves its root: absolute, or ../ above it."""
    return os.path.isabs(rel) or os.path.normpath(rel).split(os.sep, 1)[0] == ".."


def _turns(conv, turns):
    """The (human, gpt) turn pairs of a conversation that become items: the first, or all."""
    pairs = [(conv[i], conv[i + 1]) for i in range(0, len(conv) - 1, 2)]
    return pairs[:1] if turns == "first" else pairs


def _ground_truth_problem(rec, turns):
    """(kind, detail) of what makes a ground-truth record unusable, ("no image", "") for a record
    without an image (skipped in any mode), or None."""
    for key in ("id", "conversations"):
        if key not in rec:
            return "missing field", repr(key)
    if isinstance(rec["id"], bool) or not isinstance(rec["id"], (str, int)):
        return "wrong type", "'id' must be a string or an integer"
    if not str(rec["id"]).strip():
        return "empty field", "'id'"
    if rec.get("image") in (None, ""):
        return "no image", ""
    if not isinstance(rec["image"], str):
        return "wrong type", "'image' must be a path string"
    if outside_root(rec["image"]):
        return "image path outside the image root", rec["image"]
    conv = rec["conversations"]
    if not isinstance(conv, list) or not all(isinstance(turn, dict) for turn in conv):
        return "wrong type", "'conversations' must be a list of objects"
    if not _turns(conv, turns):
        return "missing field", "no human/gpt turn"
    for t, (q, a) in enumerate(_turns(conv, turns)):
        if q.get("from") != "human" or a.get("from") != "gpt":
            return "not a human/gpt turn", f"turn {t}"
        if not isinstance(q.get("value"), str) or not isinstance(a.get("value"), str):
            return "wrong type", f"turn {t}: 'value' must be a string"
        if not common.question_text(q["value"]) or not a["value"].strip():
            return "empty field", f"turn {t}: empty question or answer"
    return None


def load_items(name, path, turns="first", bad=None):
    """LLaVA conversation records -> items {id, image, prompt, answer, source, where}, one per
    human/gpt turn pair; `where` is file:line for messages. Returns (items, n records without
    image). A bad record raises DataError naming file:line, or, given an OnError `bad` in skip mode,
    is left out whole and counted; of records with the same id the first is kept."""
    bad = bad or OnError("fail")
    items, no_image, first_at = [], 0, {}
    for line, rec in read_json_or_jsonl(path, bad):
        where = f"{path}:{line}"
        problem = _ground_truth_problem(rec, turns)
        if problem and problem[0] == "no image":
            no_image += 1
            continue
        if problem:
            bad(where, *problem)
            continue
        if str(rec["id"]) in first_at:
            bad(where, "duplicate id", f"{rec['id']!r}, first at {first_at[str(rec['id'])]}")
            continue
        first_at[str(rec["id"])] = where
        for t, (q, a) in enumerate(_turns(rec["conversations"], turns)):
            items.append({"id": f"{name}/{rec['id']}-{t}", "image": rec["image"], "prompt": common.question_text(q["value"]),
                          "answer": a["value"].strip(), "source": name, "where": where})
    return items, no_image


def sample_per_source(items, n, seed):
    """Uniform sample of n items (all if n <= 0 or n >= len), in a seed-determined order."""
    rng = random.Random(seed)
    return list(items) if n <= 0 or n >= len(items) else rng.sample(items, n)


def load_sources(specs, samples_per_source, seed, turns, bad=None):
    """Items of every `--data NAME=PATH`, each source sampled uniformly with the seed (from its good
    records). Returns (items, n records without image); bad records go to `bad` (see load_items);
    exits with a one-line reason on a DataError or on two sources with the same NAME."""
    items, no_image = [], 0
    for name, path in parse_data_specs(specs):
        try:
            source_items, n = load_items(name, path, turns, bad)
        except (DataError, OSError) as e:
            sys.exit(f"error: {e}")
        no_image += n
        items += sample_per_source(source_items, samples_per_source, seed)
    ids = [it["id"] for it in items]
    if len(set(ids)) != len(ids):
        sys.exit("error: duplicate item ids (source name + record id + turn); give each --data a distinct NAME")
    return items, no_image


# ----------------------------------------------------------------------------- images


def parse_image_roots(specs):
    """`--image_root DIR` (one root for every source) or `--image_root NAME=DIR` repeated, one per source
    (NAME as in --data NAME=PATH, or a pair's `source`) -> {NAME or None: DIR}."""
    roots = {}
    for s in specs:
        name, _, path = s.partition("=") if "=" in s and not os.path.isdir(s) else ("", "", s)
        if (name or None) in roots:
            sys.exit(f"error: --image_root given twice for {name or 'every source'}")
        roots[name or None] = path
    if None in roots and len(roots) > 1:
        sys.exit("error: --image_root takes either one DIR for every source or NAME=DIR per source, not both")
    return roots


def image_root(roots, source):
    """The image folder of a source (see parse_image_roots); DataError if it has none."""
    if None in roots:
        return roots[None]
    if source not in roots:
        raise DataError(f"no --image_root for source {source!r} (given: {', '.join(sorted(roots))})")
    return roots[source]


def image_path(image_root, rel):
    """The file of a data record's image path; DataError where the path is not a non-empty string
    or leaves image_root (absolute, or ../ above it)."""
    if not isinstance(rel, str) or not rel:
        raise DataError(f"image path {rel!r} is not a non-empty string")
    if outside_root(rel):
        raise DataError(f"image path {rel!r} is outside the image root {image_root} (absolute or ../)")
    return os.path.join(image_root, rel)


def check_image(image_root, rel):
    """The path of image_root/rel after what can be checked without decoding it: inside the root,
    present, a readable header, no more pixels than PIL.Image.MAX_IMAGE_PIXELS (a decompression
    bomb). DataError naming the file otherwise."""
    from PIL import Image
    path = image_path(image_root, rel)
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such image file")
    try:
        with Image.open(path) as im:
            size = im.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot read the image ({type(e).__name__}: {e})") from None
    if size[0] * size[1] > Image.MAX_IMAGE_PIXELS:
        raise DataError(f"{path}: {size[0]}x{size[1]} pixels, more than PIL.Image.MAX_IMAGE_PIXELS "
                        f"({Image.MAX_IMAGE_PIXELS})")
    return path


def load_image(image_root, rel):
    """The RGB image at image_root/rel (checked first by check_image). Transparency is composited on
    white (as transformers' convert_to_rgb does; a plain convert shows whatever colour hides under
    alpha 0) and 16-bit samples are scaled to 8 bits (a plain convert clips them to white). DataError
    naming the file for a path outside the root, a missing, unreadable or truncated file, or a
    decompression bomb."""
    import numpy as np
    from PIL import Image
    path = check_image(image_root, rel)
    try:
        with Image.open(path) as im:
            if im.mode.startswith("I"):  # 16-bit (or wider) integer samples
                samples = np.clip(np.asarray(im, dtype=np.int64), 0, 65535) >> 8
                return Image.fromarray(samples.astype(np.uint8)).convert("RGB")
            if "A" in im.mode or "transparency" in im.info:
                white = Image.new("RGBA", im.size, (255, 255, 255, 255))
                return Image.alpha_composite(white, im.convert("RGBA")).convert("RGB")
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot read the image ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------- preference pairs (03)


PAIR_FIELDS = ("id", "image", "prompt", "chosen", "rejected")


def load_pairs(paths, roots, bad):
    """Every pair of the pair files, validated before any training: fields, chosen != rejected, an id
    once per file (01's and 02's pairs share ids), the image's root (roots: parse_image_roots, by the
    pair's `source`), path and header. `<image>` is
    stripped from prompts (the chat format puts the image in once). Returns (pairs, where, keys):
    where[i] = "file:line" of pairs[i] for messages, keys[i] = "abs file\tid", unique over files.
    A bad pair raises DataError naming file:line, or goes to `bad` (see OnError)."""
    pairs, where, keys, seen = [], [], [], {}
    for path in paths:
        for line, rec in read_json_or_jsonl(path, bad):
            at = f"{path}:{line}"
            if isinstance(rec.get("prompt"), str):
                rec["prompt"] = common.question_text(rec["prompt"])
            missing = [k for k in PAIR_FIELDS if not isinstance(rec.get(k), str) or not rec[k].strip()]
            if missing:
                bad(at, "missing, empty or non-string field", ", ".join(missing))
                continue
            if rec["chosen"].strip() == rec["rejected"].strip():
                bad(at, "chosen and rejected are identical")
                continue
            if (path, rec["id"]) in seen:
                bad(at, "duplicate id", f"{rec['id']!r}, first at {seen[path, rec['id']]}")
                continue
            try:  # root, path, presence and header: cheap enough for every pair (decoding 170k images is not)
                check_image(image_root(roots, rec.get("source")), rec["image"])
            except DataError as e:
                bad(at, "unreadable image", str(e))
                continue
            seen[path, rec["id"]] = at
            pairs.append(rec)
            where.append(at)
            keys.append(f"{os.path.abspath(path)}\t{rec['id']}")
    return pairs, where, keys


# ----------------------------------------------------------------------------- dry runs


def print_lengths(name, lengths, limit=None, what="over the limit"):
    """A dry run's line: count and percentiles of token lengths, and how many exceed `limit`."""
    s = sorted(lengths) or [0]
    cut = f"; {sum(n > limit for n in s)} {what} ({limit})" if limit else ""
    print(f"  {name}: n={len(lengths)}  p50={s[len(s) // 2]}  p90={s[int(0.9 * (len(s) - 1))]}  "
          f"p99={s[int(0.99 * (len(s) - 1))]}  max={s[-1]}{cut}")


def dry_run_items(items, roots, args, fmt, bad):
    """01/02 --dry_run: every item's image root and header checked (roots None: no images, as in 02's
    text-only backends), every prompt and answer tokenised by args.model's tokenizer (when given),
    counts and length percentiles printed. Nothing is generated or written."""
    unreadable = 0
    for it in tqdm(items if roots is not None else [], desc="image headers"):
        try:
            check_image(image_root(roots, it["source"]), it["image"])
        except DataError as e:
            try:
                bad(it["where"], "unreadable image", str(e))
            except DataError as failed:
                sys.exit(f"error: {failed}")
            unreadable += 1
    per_source = ", ".join(f"{n} {s}" for s, n in sorted(collections.Counter(it["source"] for it in items).items()))
    print(f"dry run: {len(items)} items ({per_source}); {unreadable} unreadable images; "
          f"{bad.summary('bad ground-truth records')}")
    if args.model:
        processor = common.load_processor(args.model)
        tok = processor.tokenizer
        extra = common.image_token_count(processor) - 1 if roots is not None else 0  # <image> becomes n tokens
        prompts = [len(tok(common.chat_prompt(processor, it["prompt"], fmt, image=roots is not None)).input_ids) + extra
                   for it in tqdm(items, desc="tokenise")]
        answers = [len(tok(it["answer"], add_special_tokens=False).input_ids) + 1 for it in items]
        print_lengths("prompt tokens (image included)", prompts)
        print_lengths("ground-truth answer tokens (+EOS)", answers, args.max_new_tokens, "longer than --max_new_tokens")
    print("nothing generated or written (--dry_run)")

