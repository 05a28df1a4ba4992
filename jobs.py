"""The job plumbing the numbered scripts share, kept apart from the method (common.py): process
groups, bad-input reporting, JSONL with resume, ground-truth items and images, sharded resumable
output, benchmark answering, and remote calls with caching."""
import argparse
import collections
import hashlib
import json
import os
import random
import sys

import torch
import torch.distributed as dist

import common

# ----------------------------------------------------------------------------- distributed


def dist_setup():
    """Returns (rank, world_size, device). Under torchrun it joins the process group
    (nccl on GPU, gloo on CPU); a plain `python script.py` is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return int(os.environ.get("RANK", 0)), world, device


def barrier():
    if dist.is_initialized():
        dist.barrier()


def mean_over_ranks(values: dict) -> dict:
    """Averages a dict of floats over all ranks (one all_reduce)."""
    if not dist.is_initialized():
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    t = t.cpu() / dist.get_world_size()
    return {k: v.item() for k, v in zip(keys, t)}


def dist_cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- JSON / JSONL I/O


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help with every flag's default and the script's docstring as written."""


class DataError(ValueError):
    """Bad input; the message names the file and line."""


class OnError:
    """What a script does with a bad input record (`--on_error`): "fail" raises DataError naming
    file:line; "skip" prints that same line as a warning and counts the record by kind, for the
    run's summary. `quiet` silences the warnings (ranks other than 0 see the same records)."""

    def __init__(self, mode="fail", quiet=False):
        self.mode, self.quiet, self.counts = mode, quiet, collections.Counter()

    def __call__(self, where, kind, detail=""):
        message = f"{where}: {kind}" + (f" ({detail})" if detail else "")
        if self.mode == "fail":
            raise DataError(message)
        if not self.quiet:
            print(f"skip {message}", file=sys.stderr)
        self.counts[kind] += 1

    def summary(self, what):
        """"skipped N <what> (n kind, ...)", for the run's summary line."""
        n = sum(self.counts.values())
        kinds = ", ".join(f"{c} {k}" for k, c in sorted(self.counts.items()))
        return f"skipped {n} {what}" + (f" ({kinds})" if n else "")


def add_on_error_arg(parser, default, what):
    parser.add_argument("--on_error", choices=["skip", "fail"], default=default,
                        help=f"a bad {what} (a line that is not UTF-8 JSON, a missing or empty field, a wrong type, a "
                             "duplicate id, an image path outside the image root, an unreadable image): 'fail' stops "
                             "with file:line, 'skip' warns with file:line, leaves it out and counts it in the summary")


def numbered_jsonl(path, tolerate_partial_last=False, bad=None):
    """(line number, record) of each non-blank line of a JSONL file. A line that is not a UTF-8 JSON
    object raises DataError naming path:line, or, given an OnError `bad`, is reported to it and left
    out. With tolerate_partial_last, an unterminated last line (a write cut off by a kill) is
    dropped, which is how resumable outputs are read back."""
    bad = bad or OnError("fail")
    with open(path, "rb") as f:
        raw = f.read()
    lines = raw.split(b"\n")
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if tolerate_partial_last and i == len(lines) and not raw.endswith(b"\n"):
            break  # half-written last record: it will be produced again
        try:
            rec = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            bad(f"{path}:{i}", "not UTF-8", f"byte {line[e.start]:#04x} at column {e.start + 1}")
            continue
        except json.JSONDecodeError as e:
            bad(f"{path}:{i}", "not a valid JSON line", str(e))
            continue
        if not isinstance(rec, dict):
            bad(f"{path}:{i}", "expected a JSON object", f"got {type(rec).__name__}")
            continue
        records.append((i, rec))
    return records


def read_jsonl(path, tolerate_partial_last=False):
    """The records of a JSONL file (see numbered_jsonl)."""
    return [rec for _, rec in numbered_jsonl(path, tolerate_partial_last)]


def read_utf8(path):
    """The text of a file; DataError naming the line of a byte that is not UTF-8."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 (byte {raw[e.start]:#04x})") from None


def read_json_or_jsonl(path, bad=None):
    """A JSON list (as LLaVA's instruction files) or JSONL, as (line, record) pairs; for a JSON
    list the "line" is the record's position in the list. A JSON list that does not parse as a
    whole always raises DataError (naming the line); its elements that are not objects, like bad
    JSONL lines, go to `bad` (see numbered_jsonl)."""
    bad = bad or OnError("fail")
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if not head.startswith(b"["):
        return numbered_jsonl(path, bad=bad)
    try:
        data = json.loads(read_utf8(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    out = []
    for i, rec in enumerate(data, 1):
        if isinstance(rec, dict):
            out.append((i, rec))
        else:
            bad(f"{path}:{i}", "expected a JSON object", f"got {type(rec).__name__}")
    return out


def write_atomic(path, text):
    """Writes a whole file through a temporary file and a rename, so that a reader (or a kill) never
    sees half of it."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class JsonlAppender:
    """Appends one record a line, flushed and fsynced, so a kill loses at most the record being
    written (and read_jsonl(tolerate_partial_last=True) drops that one)."""

    def __init__(self, path):
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        if os.path.exists(path) and os.path.getsize(path):
            with open(path, "rb+") as f:  # cut a half-written last line left by a kill
                data = f.read()
                if not data.endswith(b"\n"):
                    f.truncate(data.rfind(b"\n") + 1)
        self.f = open(path, "a", encoding="utf-8")

    def write(self, record):
        self.f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self):
        self.f.close()


def existing_ids(*paths):
    """Ids already written to any of these (possibly absent, possibly half-written) JSONL files."""
    ids = set()
    for p in paths:
        if os.path.exists(p):
            ids.update(r["id"] for r in read_jsonl(p, tolerate_partial_last=True) if "id" in r)
    return ids


# ----------------------------------------------------------------------------- ground truth items


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
    without an image (skipped in any mode, as SPEC says), or None."""
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


# ----------------------------------------------------------------------------- items and resumable sharded output (01, 02)


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
    from collections import Counter

    from tqdm import tqdm
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
    per_source = ", ".join(f"{n} {s}" for s, n in sorted(Counter(it["source"] for it in items).items()))
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


def packed_lengths(lengths, max_length):
    """Tokens of each pair's packed sequence [image + prompt, responses...] from (prompt tokens,
    [response tokens]), responses cut at max_length as 03 cuts them."""
    return [n + sum(min(r, max_length - n) for r in rs) for n, rs in lengths]


def train_memory_estimate(args, lengths, responses):
    """03 --dry_run's line: peak GPU memory per process, estimated from the model's config (built on
    the meta device: nothing loaded) for a micro-batch of --batch_size pairs at the p99 packed
    length. Bytes: bf16 weights (NF4 language-model linears with --load_in_4bit), LoRA in fp32 with
    its gradient and AdamW's two moments, activations ~52 h per token and layer (Megatron's 34 h of a
    bf16 LLaMA layer + the LoRA inputs) or, checkpointed, 2 h per layer + one whole layer, the 4D mask,
    and fp32 logits at the scored positions. A rough figure (+-30%): measure with bench/gpu_check.py."""
    from transformers import AutoConfig, AutoModelForImageTextToText
    config = AutoConfig.from_pretrained(args.model)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    text = config.text_config
    h, layers = text.hidden_size, text.num_hidden_layers
    linears = [m for n, m in model.named_modules() if "language_model" in n and isinstance(m, torch.nn.Linear)]
    n_linear = sum(m.weight.numel() for m in linears)
    weights = (sum(p.numel() for p in model.parameters()) - n_linear) * 2 + n_linear * (0.5 if args.load_in_4bit else 2)
    lora = 16 * sum(args.lora_r * (m.in_features + m.out_features) for m in linears)
    packed = sorted(packed_lengths(lengths, args.max_length))
    T = packed[int(0.99 * (len(packed) - 1))]
    tokens = args.batch_size * T
    acts = tokens * (layers * 2 * h + 52 * h) if args.gradient_checkpointing else tokens * layers * 52 * h
    mask = args.batch_size * T * T * 2
    scored = sorted(sum(min(r, args.max_length - n) for r in rs) for n, rs in lengths)
    logits = args.batch_size * scored[int(0.99 * (len(scored) - 1))] * text.vocab_size * 4 * 3
    gb = lambda x: f"{x / 2**30:.1f} GiB"
    return (f"  estimated peak memory per GPU: {gb(weights + lora + acts + mask + logits)} (weights {gb(weights)}, "
            f"LoRA + AdamW {gb(lora)}, activations {gb(acts)}, mask {gb(mask)}, logits {gb(logits)}) for "
            f"{args.batch_size} pairs of the p99 packed length {T}"
            + ("" if args.gradient_checkpointing else "; --gradient_checkpointing lowers the activations ~20x"))


def pending_items(items, out, rank, world):
    """(this rank's share of the items whose id is in neither `out` nor a part file `out.partR` left
    by a run cut short, the part file this rank appends to, how many items are done). Every rank
    reads the done ids before any rank writes (barrier), so all ranks shard the same list."""
    import glob
    done = existing_ids(out, *glob.glob(f"{out}.part*"))
    barrier()
    todo = [it for it in items if it["id"] not in done]
    return todo[rank::world], f"{out}.part{rank}", len(items) - len(todo)


def merge_parts(out):
    """Rank 0, once every rank is done: appends each record of the part files `out.partR` whose id
    is not in `out` yet, removes the parts, returns the number of records in `out`."""
    import glob
    writer, have = JsonlAppender(out), existing_ids(out)
    for part in sorted(glob.glob(f"{out}.part*")):
        for rec in read_jsonl(part, tolerate_partial_last=True):
            if rec["id"] not in have:
                writer.write(rec)
                have.add(rec["id"])
        os.remove(part)
    writer.close()
    return len(have)


def answer_all(items, path, key, config, image_of, batch_size, where, desc="answer", field="answer"):
    """Answers of config's model (+ adapter) to items {key, question, ...}, greedy (or config's
    num_beams), in config's input format (chat_format, pad_square), appended to the JSONL `path` as
    {**item, <field>: answer, **config} the moment a batch is done, so a rerun resumes. A cache made with
    other settings is refused rather than mixed. image_of(item) gives the item's PIL image or raises
    DataError; every image is read before the model loads, so a bad one stops the run at once, named
    by where[item[key]] (the benchmark's file:line): a score over part of a benchmark is not the
    benchmark's score."""
    weights = os.path.join(config.get("adapter") or "", "adapter_model.safetensors")
    if config.get("adapter") and os.path.exists(weights):  # the same folder retrained (03 --overwrite): another model
        with open(weights, "rb") as f:
            config = {**config, "adapter_sha256": hashlib.sha256(f.read()).hexdigest()}
    old = read_jsonl(path, tolerate_partial_last=True) if os.path.exists(path) else []
    if any({k: r.get(k) for k in config} != config for r in old):
        sys.exit(f"error: {path} holds answers made with other settings (model, adapter, format, decoding); "
                 "use another --out_dir")
    done = {r[key] for r in old}
    todo = [it for it in items if it[key] not in done]
    print(f"{len(items)} questions, {len(items) - len(todo)} already answered")
    if not todo:
        return
    for it in todo:
        try:
            image_of(it)
        except DataError as e:
            sys.exit(f"error: {where[it[key]]}: {e}")
    from tqdm import tqdm
    _, _, device = dist_setup()
    model, processor = common.load_model(config["model"], config["adapter"], device=device)
    fmt = common.InputFormat(config["chat_format"], config["pad_square"])
    writer = JsonlAppender(path)
    for i in tqdm(range(0, len(todo), batch_size), desc=desc):
        batch = todo[i:i + batch_size]
        texts = common.generate(model, processor, [image_of(it) for it in batch], [it["question"] for it in batch], fmt,
                                max_new_tokens=config["max_new_tokens"], num_beams=config.get("num_beams", 1))
        for it, text in zip(batch, texts):
            writer.write({**it, field: text, **config})
    writer.close()


def benchmark_answers(args, items, path, key, where, desc="answer", field="answer", **config):
    """{item[key]: answer} of a benchmark script's model: answer_all with its --model, --adapter,
    --max_new_tokens, --batch_size, input format flags and images under --image_dir, plus `config`
    (e.g. num_beams). Exits with a one-line reason without --image_dir."""
    if not args.image_dir:
        sys.exit("error: to generate answers give --image_dir (or score existing ones with --answers)")
    config = {"model": args.model, "adapter": args.adapter, "max_new_tokens": args.max_new_tokens, **config,
              **common.input_format(args)._asdict()}
    answer_all(items, path, key, config, lambda it: load_image(args.image_dir, it["image"]), args.batch_size, where,
               desc, field)
    return {r[key]: r[field] for r in read_jsonl(path, tolerate_partial_last=True)}


# ----------------------------------------------------------------------------- OpenAI-compatible endpoints


class RemoteError(RuntimeError):
    """A remote call that still failed after its retries."""


def add_remote_args(parser):
    """The retry and timeout flags of every script that calls an OpenAI-compatible endpoint."""
    parser.add_argument("--retries", type=int, default=5,
                        help="attempts per call: the openai client retries rate limits (429), 408, 409, 5xx, timeouts "
                             "and dropped connections with its own backoff, and a reply with no text or a malformed "
                             "body is asked again; then the call counts as failed")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before a call counts as timed out")


def openai_client(base_url=None, timeout=120.0, tries=5):
    """A client for OpenAI or any compatible server (vLLM, ...) that makes up to `tries` attempts at
    a call on what the openai client retries (429, 408, 409, 5xx, timeouts, connection errors), with
    its exponential backoff and jitter. The key comes from OPENAI_API_KEY only."""
    from openai import OpenAI
    return OpenAI(api_key=os.environ.get("OPENAI_API_KEY") or "none", base_url=base_url, timeout=timeout,
                  max_retries=max(0, tries - 1))


def chat(client, model, messages, temperature=0.0, max_tokens=None, tries=5):
    """Text of one chat completion. Transport faults are the client's to retry; what it cannot see,
    a reply without choices or text or with a malformed body, is asked again, up to `tries` times.
    RemoteError says what went wrong last, never the key nor the server's error text (it may quote it)."""
    import openai
    last = None
    for _ in range(tries):
        try:
            resp = client.chat.completions.create(model=model, messages=messages, temperature=temperature,
                                                  max_tokens=max_tokens)
            text = resp.choices[0].message.content if resp.choices else None
            if isinstance(text, str):
                return text
            last = "response without choices or content"
        except (openai.APIResponseValidationError, ValueError, AttributeError, TypeError) as e:
            last = f"malformed response ({type(e).__name__})"
        except openai.APIStatusError as e:
            code = e.status_code
            if code in (408, 409, 429) or code >= 500:  # the client retried it already
                raise RemoteError(f"{model}: gave up after {tries} tries ({type(e).__name__}: {code})") from None
            raise RemoteError(f"{type(e).__name__} {code} from {model}") from None  # 400, 401, 404: no retry helps
        except openai.APIConnectionError as e:  # timeouts included; retried by the client
            raise RemoteError(f"{model}: gave up after {tries} tries ({type(e).__name__})") from None
    raise RemoteError(f"{model}: gave up after {tries} tries ({last})")


def map_concurrent(fn, items, workers):
    """fn over items with at most `workers` calls in flight; yields (item, result or exception)
    as they complete, so each result can be written (and resumed) the moment it exists. A consumer
    that stops early (an error, Ctrl-C) cancels the calls not started: none is paid for unwritten."""
    from concurrent.futures import ThreadPoolExecutor, as_completed
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        futures = {pool.submit(fn, it): it for it in items}
        for fut in as_completed(futures):
            exc = fut.exception()
            yield futures[fut], exc if exc is not None else fut.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------- cached remote calls (04, 05)


def cached_map(path, jobs, fn, workers=8, desc="calls"):
    """fn(job) -> dict of results, for jobs that are dicts with the same fields, each computed once
    ever: a job whose fields all match a record of the JSONL cache at `path` is answered from it;
    the others run with at most `workers` in flight and are appended ({**job, **result}) the moment
    they finish, so a rerun never pays twice and a kill loses only the calls in flight. A call
    that raises RemoteError is not cached (a rerun retries it). Returns (records in job order,
    None for failed ones; the RemoteError messages)."""
    from tqdm import tqdm
    fields = sorted(jobs[0]) if jobs else []
    key = lambda r: json.dumps([r.get(k) for k in fields])
    cache = {key(r): r for r in read_jsonl(path, tolerate_partial_last=True)} if os.path.exists(path) else {}
    records = [cache.get(key(job)) for job in jobs]
    todo = [i for i, r in enumerate(records) if r is None]
    errors = []
    if todo:
        writer = JsonlAppender(path)
        for i, result in tqdm(map_concurrent(lambda i: fn(jobs[i]), todo, workers), total=len(todo), desc=desc):
            if isinstance(result, RemoteError):
                errors.append(str(result))
                continue
            if isinstance(result, BaseException):
                raise result
            records[i] = {**jobs[i], **result}
            writer.write(records[i])
        writer.close()
    return records, errors


# ----------------------------------------------------------------------------- judged benchmarks (04, 06)


def judge_runs(path, key, prompts, answers, judge, num_runs, fn, workers=8, what="grade"):
    """Every answer judged num_runs times (a run is one independent judgement of each; a sampling
    judge differs between runs), fn(job) -> result dict, each judgement made once ever: cached in the
    JSONL `path` by its inputs ({key: question id, run, judge, answer, prompt_sha: a hash of the
    filled prompt}), so a new answer, prompt or judge asks again and nothing else does. A call that
    still got no reply after its retries exits non-zero before any score is written, so that no
    score stands on part of the benchmark; a rerun asks only for those. Returns per run
    {question id: {**job, **result}}."""
    import hashlib
    todo = [{key: qid, "run": run, "judge": judge, "answer": answers[qid],
             "prompt_sha": hashlib.sha256(prompts[qid].encode()).hexdigest()[:16]}
            for run in range(num_runs) for qid in prompts]
    records, errors = cached_map(path, todo, fn, workers, what)
    if errors:
        sys.exit(f"error: {len(errors)} {what}s got no reply from {judge}, e.g. {errors[0]}; rerun to resume")
    return [{r[key]: r for r in records if r["run"] == run} for run in range(num_runs)]


def mean_std(runs):
    """(mean, sample standard deviation, 0.0 for one run) over runs of the same shape: dicts and
    lists of numbers, elementwise; None wherever a run has None."""
    import statistics

    def over(values, f):
        if any(v is None for v in values):
            return None
        if isinstance(values[0], dict):
            return {k: over([v[k] for v in values], f) for k in values[0]}
        if isinstance(values[0], list):
            return [over(list(column), f) for column in zip(*values)]
        return f(values)
    return over(runs, statistics.fmean), over(runs, lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)


def print_scores(title, columns, name, mean, std, num_runs):
    """The printed result: a title line, then a one-row Markdown table, `name` and, per columns
    {key: heading}, the mean (± std over runs where there were several; n/a for None)."""
    cell = lambda k: "n/a" if mean[k] is None else f"{mean[k]:.1f}" + (f" ± {std[k]:.1f}" if num_runs > 1 else "")
    print(title)
    print("| Model | " + " | ".join(columns.values()) + " |")
    print("|---" * (len(columns) + 1) + "|")
    print(f"| {name} | " + " | ".join(cell(k) for k in columns) + " |")
