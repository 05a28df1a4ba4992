"""What two or more of the numbered scripts share: loading, chat formatting, image weakening,
response log-probs, the DPO loss, JSONL I/O and torchrun helpers. Math lives in small pure functions."""
import collections
import contextlib
import json
import os
import random
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

IGNORE = -100  # label of a position whose token is not scored

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


def existing_ids(*paths, key="id"):
    """Ids already written to any of these (possibly absent, possibly half-written) JSONL files."""
    ids = set()
    for p in paths:
        if os.path.exists(p):
            ids.update(r[key] for r in read_jsonl(p, tolerate_partial_last=True) if key in r)
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


def question_text(text):
    """A question as the chat template takes it: every literal `<image>` removed, since the template
    puts the image in exactly once (a second placeholder would take another image's features)."""
    return text.replace("<image>", "").strip()


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
        if not question_text(q["value"]) or not a["value"].strip():
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
            items.append({"id": f"{name}/{rec['id']}-{t}", "image": rec["image"], "prompt": question_text(q["value"]),
                          "answer": a["value"].strip(), "source": name, "where": where})
    return items, no_image


def sample_per_source(items, n, seed):
    """Uniform sample of n items (all if n <= 0 or n >= len), in a seed-determined order."""
    rng = random.Random(seed)
    return list(items) if n <= 0 or n >= len(items) else rng.sample(items, n)


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


# ----------------------------------------------------------------------------- model loading


def load_model(name, adapter=None, device="cpu", dtype=None, load_in_4bit=False):
    """(model, processor) for a LLaVA-style checkpoint dir or hub id; optionally with a peft
    adapter merged in for inference. dtype None = bf16 on CUDA, fp32 elsewhere."""
    from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kwargs = {"dtype": dtype}
    if load_in_4bit:  # QLoRA: the language model in NF4, vision tower and projector kept as is
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True,
            llm_int8_skip_modules=["vision_tower", "multi_modal_projector", "lm_head"])
        kwargs["device_map"] = {"": device}
    model = AutoModelForImageTextToText.from_pretrained(name, **kwargs)
    if not load_in_4bit:
        model.to(device)
    processor = AutoProcessor.from_pretrained(name)
    processor.tokenizer.padding_side = "left"  # generation pads on the left
    if adapter:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter)
        if not load_in_4bit:
            model = model.merge_and_unload()
    model.eval()
    return model, processor


def chat_prompt(processor, question):
    """The chat-template text of one image + question turn, ending with the generation prompt."""
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(msgs, add_generation_prompt=True)


# ----------------------------------------------------------------------------- image weakening


def noise_schedule(num_steps=1000):
    """abar_t of the forward diffusion used by VCD and BPO: betas = sigmoid(linspace(-6, 6))
    scaled into [1e-5, 5e-3]."""
    betas = torch.sigmoid(torch.linspace(-6, 6, num_steps, dtype=torch.float64)) * (0.5e-2 - 1e-5) + 1e-5
    return torch.cumprod(1 - betas, dim=0)


def diffuse(x, step, scale, generator=None):
    """x_t = sqrt(abar_t) x + sqrt(1 - abar_t) * scale * eps. Step 0 returns x untouched (no
    weakening), steps 1..1000 index abar[step - 1]."""
    if step <= 0:
        return x
    abar = noise_schedule()[min(step, 1000) - 1].item()
    eps = torch.randn(x.shape, generator=generator, dtype=torch.float32, device="cpu").to(x.device, x.dtype)
    return abar ** 0.5 * x + (1 - abar) ** 0.5 * scale * eps


def _feature_scale(x):
    # per image std, so that a step means the same SNR for any encoder (TOY_NOTES.md)
    return x.float().flatten(1).std(dim=1).view(-1, *([1] * (x.dim() - 1))).to(x.dtype)


@contextlib.contextmanager
def weaken_images(model, noise_step, noise_on="features", generator=None):
    """Within this context every image the model sees is weakened by `noise_step` steps of
    forward diffusion: on the projector's input (the CLIP features, as in the paper) or on the
    normalised pixels (as in the authors' released script, unit-variance noise as in VCD)."""
    if noise_step <= 0:
        yield
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = base.model
    if noise_on == "features":
        module, scale_of = inner.multi_modal_projector, _feature_scale
    elif noise_on == "pixels":
        module, scale_of = inner.vision_tower, (lambda x: 1.0)
    else:
        raise ValueError(f"noise_on must be features or pixels, got {noise_on!r}")

    def hook(_mod, args):
        x = args[0]
        return (diffuse(x, noise_step, scale_of(x), generator),) + tuple(args[1:])

    handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# ----------------------------------------------------------------------------- generation


@torch.no_grad()
def generate(model, processor, images, prompts, max_new_tokens=512, do_sample=False,
             temperature=1.0, top_p=1.0):
    """One batch of answers, left-padded; prompts are plain questions."""
    texts = [chat_prompt(processor, p) for p in prompts]
    enc = processor(text=texts, images=images, return_tensors="pt", padding=True)
    enc = {k: v.to(model.device) for k, v in enc.items()}
    if "pixel_values" in enc:
        enc["pixel_values"] = enc["pixel_values"].to(model.dtype)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if do_sample else dict(do_sample=False)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=processor.tokenizer.pad_token_id,
                         **sampling)
    return [s.strip() for s in processor.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]



def answer_all(items, path, key, config, image_dir, batch_size, where, desc="answer"):
    """Greedy answers of config's model (+ adapter) to items {key, image, question}, appended to the
    JSONL `path` as {**item, answer, **config} the moment a batch is done, so a rerun resumes. A cache
    made with another model, adapter or max_new_tokens is refused rather than mixed. Every image is
    read before the model loads, so a bad one stops the run at once, named by where[item[key]]
    (the benchmark's file:line): a score over part of a benchmark is not the benchmark's score."""
    old = read_jsonl(path, tolerate_partial_last=True) if os.path.exists(path) else []
    if any({k: r.get(k) for k in config} != config for r in old):
        sys.exit(f"error: {path} holds answers of another model, adapter or --max_new_tokens; use another --out_dir")
    done = {r[key] for r in old}
    todo = [it for it in items if it[key] not in done]
    print(f"{len(items)} questions, {len(items) - len(todo)} already answered")
    if not todo:
        return
    for it in todo:
        try:
            load_image(image_dir, it["image"])
        except DataError as e:
            sys.exit(f"error: {where[it[key]]}: {e}")
    from tqdm import tqdm
    _, _, device = dist_setup()
    model, processor = load_model(config["model"], config["adapter"], device=device)
    writer = JsonlAppender(path)
    for i in tqdm(range(0, len(todo), batch_size), desc=desc):
        batch = todo[i:i + batch_size]
        images = [load_image(image_dir, it["image"]) for it in batch]
        texts = generate(model, processor, images, [it["question"] for it in batch],
                         max_new_tokens=config["max_new_tokens"])
        for it, text in zip(batch, texts):
            writer.write({**it, "answer": text, **config})
    writer.close()


# ----------------------------------------------------------------------------- token convention and log-probs


def response_ids(tokenizer, prompt_text, response):
    """Token ids of the response after the chat prompt, plus EOS: the tokens the model produces at
    inference. Tokenised jointly with the prompt (subword merges as at inference) when the prompt's
    own tokens are a prefix of the joint ones; otherwise the response alone."""
    prompt = tokenizer(prompt_text).input_ids
    joint = tokenizer(prompt_text + " " + response).input_ids
    if joint[:len(prompt)] == prompt:
        ids = joint[len(prompt):]
    else:  # a merge across the boundary: keep the prompt's tokens as generation sees them
        ids = tokenizer(response, add_special_tokens=False).input_ids
    return ids + [tokenizer.eos_token_id]


def build_sequences(processor, image, prompt, responses, max_length):
    """Encodes one image + prompt and its responses under the token convention.
    Returns (pixel_values [1,...], list of (input_ids, labels)), n_truncated. Responses longer than
    max_length allows are cut at the end; the image and prompt tokens are never cut."""
    prompt_text = chat_prompt(processor, prompt)
    enc = processor(text=[prompt_text], images=[image], return_tensors="pt")
    prompt_ids = enc["input_ids"][0].tolist()
    room = max_length - len(prompt_ids)
    if room < 1:
        raise DataError(f"prompt with image takes {len(prompt_ids)} tokens, more than --max_length {max_length}")
    seqs, cut = [], 0
    for r in responses:
        ids = response_ids(processor.tokenizer, prompt_text, r)
        if len(ids) > room:
            ids, cut = ids[:room], cut + 1
        seqs.append((prompt_ids + ids, [IGNORE] * len(prompt_ids) + ids))
    return enc["pixel_values"], seqs, cut


def pad_batch(seqs, pad_id):
    """Right-pads (input_ids, labels) pairs into tensors (input_ids, attention_mask, labels)."""
    n = max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, (ids, lab) in enumerate(seqs):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(lab)] = torch.tensor(lab)
        mask[i, :len(ids)] = 1
    return input_ids, mask, labels


def pack_responses(seqs):
    """One image + prompt and its k responses (build_sequences' output: they share the prompt) as one
    sequence [prompt, response_1, ..., response_k] in which each response sees the prompt and itself
    only, its positions restarting after the prompt: the shared prefix (LLaVA-1.5's 576 image tokens
    and the question) runs through the model once instead of k times. Returns (input_ids,
    position_ids, segment (0: prompt, i: response i), scored), scored = (predictor position, token,
    response index) per response token: a response's first token is predicted from the prompt's end."""
    n_prompt = sum(1 for label in seqs[0][1] if label == IGNORE)
    ids, pos, seg, scored = list(seqs[0][0][:n_prompt]), list(range(n_prompt)), [0] * n_prompt, []
    for i, (full, _) in enumerate(seqs):
        response, start = full[n_prompt:], len(ids)
        scored += [(n_prompt - 1 if j == 0 else start + j - 1, tok, i) for j, tok in enumerate(response)]
        ids += response
        pos += range(n_prompt, n_prompt + len(response))
        seg += [i + 1] * len(response)
    return ids, pos, seg, scored


def packed_batch(packs, pad_id, dtype=torch.float32):
    """Right-pads pack_responses' outputs into model inputs: input_ids and position_ids [B, T], a 4D
    additive attention mask [B, 1, T, T] (a token sees the earlier tokens of the prompt and of its own
    response), `keep` [B, T] marking the positions whose logits are needed, and `scored` = (index into
    the kept positions' logits, token, output slot) with slot = response_index * B + row, so the
    log-probs come out as [all first responses..., all second responses...]."""
    B, T = len(packs), max(len(p[0]) for p in packs)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    seg = torch.full((B, T), -1, dtype=torch.long)  # -1: padding
    rows, preds, toks, slots = [], [], [], []
    for b, (ids, pos, sg, scored) in enumerate(packs):
        input_ids[b, :len(ids)] = torch.tensor(ids)
        position_ids[b, :len(pos)] = torch.tensor(pos)
        seg[b, :len(sg)] = torch.tensor(sg)
        for pred, tok, i in scored:
            rows.append(b), preds.append(pred), toks.append(tok), slots.append(i * B + b)
    q, k = seg[:, :, None], seg[:, None, :]
    allowed = torch.ones(T, T, dtype=torch.bool).tril() & (k >= 0) & ((k == 0) | (k == q))
    allowed |= torch.eye(T, dtype=torch.bool)  # a padding row sees itself: no all-masked softmax row (NaN)
    mask = torch.zeros((B, 1, T, T), dtype=dtype).masked_fill(~allowed[:, None], torch.finfo(dtype).min)
    keep = torch.zeros((B, T), dtype=torch.bool)
    keep[rows, preds] = True
    flat = keep.flatten().cumsum(0) - 1  # position (b, t) -> its row among the kept logits
    index = flat[torch.tensor(rows) * T + torch.tensor(preds)]
    return input_ids, position_ids, mask, keep, (index, torch.tensor(toks), torch.tensor(slots))


def image_embeds(model, input_ids, pixel_values):
    """Input embeddings with each image's projected features in its placeholder tokens. The vision
    tower, projector and embeddings are frozen, so this runs once per batch (no grad) and serves the
    policy and the reference forward alike."""
    with torch.no_grad():
        features = torch.cat(model.get_image_features(pixel_values=pixel_values).pooler_output)
        embeds = model.get_input_embeddings()(input_ids)
        is_image = (input_ids == model.config.image_token_id).unsqueeze(-1)
        return embeds.masked_scatter(is_image, features.to(embeds.dtype))


def packed_logps(logits, scored, n_out):
    """Summed log-probs per output slot from the kept positions' logits [N, V] (packed_batch's
    `scored`): logit - logsumexp at the scored tokens only, no log-softmax over all positions."""
    index, toks, slots = (t.to(logits.device) for t in scored)
    picked = logits[index, toks].float() - torch.logsumexp(logits.float(), dim=-1)[index]
    return torch.zeros(n_out, device=logits.device).index_add(0, slots, picked)


def sequence_logps(logits, labels):
    """Sum over scored positions of log p(label_t | tokens < t). logits [B, T, V] predict the
    next token, labels [B, T] with IGNORE where not scored. The log-softmax is taken only at the
    gathered tokens (logit - logsumexp) so no [B, T, V] float32 copy is kept."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != IGNORE
    safe = labels.masked_fill(~mask, 0)
    picked = torch.gather(logits, 2, safe.unsqueeze(-1)).squeeze(-1).float()
    lse = torch.logsumexp(logits.float(), dim=-1)
    return ((picked - lse) * mask).sum(-1)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """Sigmoid DPO loss (paper Eq. 4) per pair, with the implicit rewards
    beta * (log pi - log pi_ref) of chosen and rejected."""
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


# ----------------------------------------------------------------------------- OpenAI-compatible endpoints


class RemoteError(RuntimeError):
    """A remote call that still failed after its retries."""


def add_remote_args(parser):
    """The retry and timeout flags of every script that calls an OpenAI-compatible endpoint."""
    parser.add_argument("--retries", type=int, default=5,
                        help="attempts per call on rate limits (429), server errors (5xx, 408, 409), timeouts, dropped "
                             "connections and empty or malformed replies; then the call counts as failed")
    parser.add_argument("--backoff", type=float, default=1.0,
                        help="seconds before the first retry, doubled each time (at most 60), with jitter")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before a call counts as timed out")


def openai_client(base_url=None, timeout=120.0):
    """A client for OpenAI or any compatible server (vLLM, ...). The key comes from OPENAI_API_KEY
    only; local servers usually take none. The client's own retries are off: chat() retries."""
    from openai import OpenAI
    return OpenAI(api_key=os.environ.get("OPENAI_API_KEY") or "none", base_url=base_url, timeout=timeout,
                  max_retries=0)


RETRIED_STATUS = {408, 409}  # besides 429 and 5xx: request timeout and conflict (OpenAI's own client retries them)


def chat(client, model, messages, temperature=0.0, max_tokens=None, tries=5, backoff=1.0, sleep=None):
    """Text of one chat completion. Rate limits, server errors, timeouts, dropped connections,
    empty `choices` and malformed bodies are retried with exponential backoff (capped at 60 s) and
    jitter; after `tries` attempts, or at once on another 4xx, RemoteError says what went wrong
    last (never the key nor the server's error text, which may quote it)."""
    import time

    import openai
    sleep = sleep or time.sleep
    last = None
    for attempt in range(tries):
        try:
            resp = client.chat.completions.create(model=model, messages=messages, temperature=temperature,
                                                  max_tokens=max_tokens)
            text = resp.choices[0].message.content if resp.choices else None
            if isinstance(text, str):
                return text
            last = "response without choices or content"
        except (openai.RateLimitError, openai.InternalServerError, openai.APITimeoutError,
                openai.APIConnectionError) as e:
            last = f"{type(e).__name__}: {getattr(e, 'status_code', '') or ''}".strip(": ")
        except (openai.APIResponseValidationError, ValueError, AttributeError, TypeError) as e:
            last = f"malformed response ({type(e).__name__})"
        except openai.APIStatusError as e:
            if e.status_code not in RETRIED_STATUS:  # 400, 401, 404, ...: asking again will not help
                raise RemoteError(f"{type(e).__name__} {e.status_code} from {model}") from None
            last = f"{type(e).__name__}: {e.status_code}"
        if attempt < tries - 1:
            sleep(min(60.0, backoff * 2 ** attempt) * (0.5 + random.random()))
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
