"""The records 01-03 read, validated before any work: ground-truth items (LLaVA conversations),
preference pairs, images and their roots; every bad record named by file:line (dist_io.DataError),
or skipped and counted under --on_error skip."""
import collections
import functools
import io
import os
import random
import sys

from tqdm import tqdm

import common
import loading
from dist_io import DataError, OnError, read_json_or_jsonl
from families import family_of

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
    from PIL import Image
    path = check_image(image_root, rel)
    try:
        with Image.open(path) as im:
            return _as_rgb(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot read the image ({type(e).__name__}: {e})") from None


def _as_rgb(im):
    import numpy as np
    from PIL import Image
    if im.mode.startswith("I"):  # 16-bit (or wider) integer samples
        samples = np.clip(np.asarray(im, dtype=np.int64), 0, 65535) >> 8
        return Image.fromarray(samples.astype(np.uint8)).convert("RGB")
    if "A" in im.mode or "transparency" in im.info:
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im.convert("RGBA")).convert("RGB")
    return im.convert("RGB")


# ----------------------------------------------------------------------------- preference pairs (03)


PAIR_FIELDS = ("id", "image", "prompt", "chosen", "rejected")
PAIR_FORMATS = ("auto", "bpo", "trl", "rlaifv", "llava")


def detect_format(first):
    """A pair file's format from its first record: one with `rejected_conversations` is LLaVA-style (POVID);
    one with message lists or `images` is TRL's conversational format; else this project's own (bpo).
    (A .parquet file is RLAIF-V's.)"""
    if "rejected_conversations" in first:
        return "llava"
    if "images" in first or isinstance(first.get("prompt"), list):
        return "trl"
    return "bpo"


def _text(content):
    """The text of a TRL message's content: a string, or a list of parts ({"type": "text", "text"} ...)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(c, dict) for c in content):
        return "".join(c.get("text", "") for c in content if c.get("type") == "text")
    raise DataError("a message's content must be a string or a list of parts")


def _from_trl(rec, n):
    """TRL's conversational vision format: {"images": [path], "prompt": [messages], "chosen": [messages],
    "rejected": [messages]}; the prompt's earlier user/assistant turns are the history."""
    images = rec.get("images")
    if not isinstance(images, list) or len(images) != 1 or not isinstance(images[0], str):
        raise DataError("'images' must be a list of one image path (LLaVA-1.5 takes one image)")
    msgs = rec.get("prompt")
    if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
        raise DataError("'prompt' must be a non-empty list of messages")
    roles = [m.get("role") for m in msgs]
    if roles != ["user", "assistant"] * (len(msgs) // 2) + ["user"]:
        raise DataError(f"'prompt' must alternate user and assistant messages and end with the user's "
                        f"(got {roles}; a system message is the input format's own)")
    turns = [_text(m.get("content")) for m in msgs]
    answers = {}
    for k in ("chosen", "rejected"):
        m = rec.get(k)
        if not isinstance(m, list) or len(m) != 1 or not isinstance(m[0], dict) or m[0].get("role") != "assistant":
            raise DataError(f"'{k}' must be a list of one assistant message")
        answers[k] = _text(m[0].get("content"))
    return {"id": str(rec.get("id", f"row{n}")), "image": images[0], "prompt": turns[-1],
            "history": [[turns[i], turns[i + 1]] for i in range(0, len(turns) - 1, 2)], **answers}


def _from_llava(rec, n):
    """LLaVA-style preference records (POVID's): `conversations` and `rejected_conversations`, the same human
    turns, the last gpt turn the chosen and the rejected answer; the earlier turns are the history."""
    conv, rej = rec.get("conversations"), rec.get("rejected_conversations")
    ok = lambda c: isinstance(c, list) and len(c) >= 2 and len(c) % 2 == 0 and all(
        isinstance(t, dict) and t.get("from") == ("human", "gpt")[i % 2] and isinstance(t.get("value"), str)
        for i, t in enumerate(c))
    if not ok(conv) or not ok(rej) or len(conv) != len(rej):
        raise DataError("'conversations' and 'rejected_conversations' must be human/gpt turns of the same length")
    if [t["value"] for t in conv[0::2]] != [t["value"] for t in rej[0::2]]:
        raise DataError("'rejected_conversations' asks other questions than 'conversations'")
    values = [common.question_text(t["value"]) if i % 2 == 0 else t["value"] for i, t in enumerate(conv)]
    return {"id": str(rec.get("id", f"row{n}")), "image": rec.get("image"), "prompt": values[-2],
            "history": [[values[i], values[i + 1]] for i in range(0, len(values) - 2, 2)],
            "chosen": conv[-1]["value"], "rejected": rej[-1]["value"]}


def _parquet_records(path):
    """(row, record) of RLAIF-V's parquet (image {"bytes"}, question, chosen, rejected), the image left in the
    file: the record holds {"parquet": path, "row": n} and pair_image reads its bytes when needed."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    table = pq.read_table(path, columns=[c for c in pq.ParquetFile(path).schema_arrow.names if c != "image"])
    for n, rec in enumerate(table.to_pylist()):
        yield n, {"id": str(rec.get("idx", f"row{n}")), "image": {"parquet": os.path.abspath(path), "row": n},
                  "prompt": rec.get("question"), "chosen": rec.get("chosen"), "rejected": rec.get("rejected")}


@functools.lru_cache(maxsize=4)
def _parquet_group(path, group):
    import pyarrow.parquet as pq
    return pq.ParquetFile(path).read_row_group(group, columns=["image"]).column("image").to_pylist()


@functools.lru_cache(maxsize=None)
def _parquet_group_sizes(path):
    import pyarrow.parquet as pq
    meta = pq.ParquetFile(path).metadata
    return [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]


def _parquet_image_bytes(path, row):
    """A row's image bytes, read with the rest of its row group (the last few groups are kept)."""
    for g, n in enumerate(_parquet_group_sizes(path)):
        if row < n:
            cell = _parquet_group(path, g)[row]
            data = cell.get("bytes") if isinstance(cell, dict) else cell
            if not isinstance(data, bytes):
                raise DataError(f"{path}: row {row}: the image has no bytes")
            return data
        row -= n
    raise DataError(f"{path}: no row {row}")


def pair_image(pair, roots):
    """A pair's RGB image: a file under its source's image root, or the bytes in a parquet row (RLAIF-V's)."""
    if isinstance(pair["image"], dict):
        return image_from_bytes(_parquet_image_bytes(pair["image"]["parquet"], pair["image"]["row"]))
    return load_image(image_root(roots, pair.get("source")), pair["image"])


def image_from_bytes(data):
    """An encoded image (PNG, JPEG, ...) as RGB, composited and scaled as load_image does; DataError otherwise."""
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as im:
            return _as_rgb(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"not a readable image ({type(e).__name__}: {e})") from None


def read_pairs(path, data_format, bad):
    """(where, record in this project's pair form: id, image, prompt, chosen, rejected, history) of a pair file
    in any PAIR_FORMATS, file:line (parquet: file:row N) for messages; a record the format cannot be read as
    goes to `bad`."""
    if data_format == "rlaifv" or data_format == "auto" and str(path).endswith(".parquet"):
        for n, rec in _parquet_records(path):
            yield f"{path}:row {n}", {**rec, "source": os.path.basename(path)}
        return
    records = read_json_or_jsonl(path, bad)
    fmt = detect_format(records[0][1] if records else {}) if data_format == "auto" else data_format
    for line, rec in records:
        if fmt == "bpo":
            yield f"{path}:{line}", rec
            continue
        try:
            pair = (_from_trl if fmt == "trl" else _from_llava)(rec, line)
        except DataError as e:
            bad(f"{path}:{line}", f"not a {fmt} record", str(e))
            continue
        yield f"{path}:{line}", {**pair, "source": rec.get("source", os.path.splitext(os.path.basename(path))[0])}


def load_pairs(paths, roots, bad, data_format="auto"):
    """Every pair of the pair files (any PAIR_FORMATS; one --data_format for all, or detected per file),
    validated before any training: fields, chosen != rejected, an id once per file (01's and 02's pairs
    share ids), the image's root (roots: parse_image_roots, by the pair's `source`), path and header (a
    parquet image: its bytes decode). `<image>` is stripped from prompts (the chat format puts the image in
    once). Returns (pairs, where, keys): where[i] = "file:line" of pairs[i] for messages, keys[i] = "abs
    file\tid", unique over files. A bad pair raises DataError naming file:line, or goes to `bad` (see
    OnError)."""
    pairs, where, keys, seen = [], [], [], {}
    for path in paths:
        for at, rec in read_pairs(path, data_format, bad):
            if isinstance(rec.get("prompt"), str):
                rec["prompt"] = common.question_text(rec["prompt"])
            missing = [k for k in PAIR_FIELDS if k != "image" and (not isinstance(rec.get(k), str) or not rec[k].strip())]
            if not isinstance(rec.get("image"), dict) and (not isinstance(rec.get("image"), str) or not rec["image"]):
                missing.insert(1, "image")
            if missing:
                bad(at, "missing, empty or non-string field", ", ".join(missing))
                continue
            history = rec.get("history", [])
            if not isinstance(history, list) or not all(isinstance(t, list) and len(t) == 2 and
                                                        all(isinstance(x, str) for x in t) for t in history):
                bad(at, "wrong type", "'history' must be a list of [question, answer] pairs")
                continue
            if rec["chosen"].strip() == rec["rejected"].strip():
                bad(at, "chosen and rejected are identical")
                continue
            if (path, rec["id"]) in seen:
                bad(at, "duplicate id", f"{rec['id']!r}, first at {seen[path, rec['id']]}")
                continue
            try:  # root, path, presence and header: cheap enough for every pair (decoding 170k images is not)
                if isinstance(rec["image"], dict):
                    pair_image(rec, roots)
                else:
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
        processor = loading.load_processor(args.model)
        tok = processor.tokenizer
        fixed = family_of(processor).fixed_image_tokens

        def length(it):  # the prompt with its image (without one for 02's text-only backends)
            text = common.chat_prompt(processor, it["prompt"], fmt, image=roots is not None)
            if roots is None:
                return len(common.tokenize(tok, text))
            image = None if fixed else load_image(image_root(roots, it["source"]), it["image"])
            return common.prompt_length(processor, text, image, fmt)
        prompts = [length(it) for it in tqdm(items, desc="tokenise")]
        answers = [len(tok(it["answer"], add_special_tokens=False).input_ids) + 1 for it in items]
        print_lengths("prompt tokens (image included)", prompts)
        print_lengths("ground-truth answer tokens (+EOS)", answers, args.max_new_tokens, "longer than --max_new_tokens")
    print("nothing generated or written (--dry_run)")

