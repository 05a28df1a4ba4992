"""Step 2: error-injected negatives. A language model (or, offline, a substitution vocabulary)
rewrites each ground-truth answer so that it stays fluent, common and plausible but is wrong in
specific details: an object added or removed, a colour, a count, a position. The pair is
(chosen = ground truth, rejected = the rewrite). Every rewrite is validated before it is written
and retried up to --max_tries; failures are counted, never written. Resumable by id; sharded under
torchrun (for --backend hf)."""
import argparse
import collections
import json
import os
import random
import re
import sys

import torch
from tqdm import tqdm

import common
import data
import dist_io
import loading
import remote

# The one few-shot prompt (written for this project; --prompt_file replaces it). {question} and
# {answer} are filled in with str.replace, so braces elsewhere are kept as they are; the model
# continues after the last label, and a "Label:" it starts on a new line ends its rewrite.
PROMPT = """Below is a question about an image and its correct answer. Rewrite the answer so that it becomes wrong about the image while still sounding like a typical, sensible answer about a similar scene.
Keep the wording, style and length of the original and change one to three specific details:
- existence: add an object that usually appears in such scenes but is not mentioned, or leave out one that is;
- attribute: change a colour, size, material or other property;
- count: change a number;
- position: change where something is (left and right, above and below, in front of and behind).
The new details must be common and logical, never absurd. Do not mark or explain the changes; write only the wrong answer.

Question: What is the woman holding?
Answer: The woman is holding a blue umbrella in her right hand.
Wrong answer: The woman is holding a black umbrella in her left hand.

Question: Describe the image in detail.
Answer: A wooden kitchen table with two bananas and a white coffee mug next to a toaster. A window above the sink lets in sunlight.
Wrong answer: A wooden kitchen table with three bananas, a white coffee mug and a plate of cookies next to a toaster. A window beside the refrigerator lets in sunlight.

Question: How many dogs are on the grass?
Answer: There are two dogs lying on the grass.
Wrong answer: There are three dogs lying on the grass.

Question: Is there a bus in the picture?
Answer: No, the street only has a few cars and a cyclist.
Wrong answer: Yes, a red bus is parked behind the cars on the street.

Question: {question}
Answer: {answer}
Wrong answer:"""

REASONS = ("empty", "identical", "echo", "cut off", "nothing to change", "api error")
ENDS_SENTENCE = re.compile(r"[.!?\"')\]]\s*$")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=dist_io.HelpFormatter)
    p.add_argument("--backend", choices=["hf", "openai", "rules"], required=True,
                   help="who rewrites: the MLLM's own language model (paper), an OpenAI-compatible endpoint, "
                        "or deterministic vocabulary substitutions (offline)")
    data.add_ground_truth_args(p, out="pairs_injected.jsonl")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling of items and of the rewrites")
    p.add_argument("--max_tries", type=int, default=3, help="rewrites tried per item before it counts as failed")
    p.add_argument("--prompt_file", help="text file replacing the built-in few-shot prompt; must contain {answer}, "
                                         "may contain {question} (hf, openai)")
    p.add_argument("--model", default=common.DEFAULT_MODEL,
                   help="hf: the MLLM whose language model rewrites, prompted with text only (dir or hub id)")
    p.add_argument("--batch_size", type=int, default=16, help="hf: generations per forward, per process")
    p.add_argument("--temperature", type=float, default=0.8, help="hf, openai: sampling temperature (authors' 0.8)")
    p.add_argument("--top_p", type=float, default=0.95, help="hf: nucleus sampling (authors' 0.95)")
    p.add_argument("--max_new_tokens", type=int, default=512,
                   help="hf, openai: length limit of a rewrite; a rewrite cut off by it is rejected")
    p.add_argument("--api_model", default="lmsys/vicuna-7b-v1.5",
                   help="openai: model name at the endpoint (the paper served LLaVA-1.5's base LLM, Vicuna, with vLLM)")
    p.add_argument("--base_url", default="http://localhost:8000/v1",
                   help="openai: endpoint (vLLM's default address; https://api.openai.com/v1 for OpenAI); "
                        "the key comes from OPENAI_API_KEY, optional for local servers")
    p.add_argument("--workers", type=int, default=8, help="openai: requests in flight at once")
    remote.add_remote_args(p)
    p.add_argument("--vocab", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "vocab_coco.json"),
                   help="rules: substitution vocabulary, a vocabulary JSON (as data/vocab_coco.json) or a toy "
                        "world.json")
    p.add_argument("--edits", type=int, default=2, help="rules: details changed per answer (fewer if it has fewer)")
    p.add_argument("--dry_run", action="store_true",
                   help="check every record and tokenise every question and answer (with --model's tokenizer for hf); "
                        "print counts and lengths; rewrite and write nothing")
    common.add_format_args(p)  # hf: the conversation the MLLM's language model is prompted in (no image)
    dist_io.add_on_error_arg(p, "skip", "ground-truth record")
    args = p.parse_args(argv)
    if args.max_tries < 1:
        p.error("--max_tries must be at least 1")
    return args


def words(text):
    return re.findall(r"\w+", text.lower())


class FewShot:
    """The rewriting prompt (built in or --prompt_file) and what it implies: how an item fills it, how the
    model's continuation is cut to the rewrite alone, and why a rewrite cannot be a negative."""

    def __init__(self, text):
        self.text = text
        self.labels = re.findall(r"^([A-Z][\w ]{0,30}):", text, re.M)  # "Question", "Answer", ..., "Wrong answer"
        self.next_label = re.compile(r"(?:^|\n)\s*(?:" + "|".join(map(re.escape, set(self.labels))) + r"):",
                                     re.I) if self.labels else None
        # any sentence of the prompt of 6+ words (rules and examples) found in a rewrite is an echo, not a rewrite
        self.sentences = [" ".join(words(s)) for s in re.split(r"[.\n:;]", re.sub(r"\{\w+\}", "\n", text))
                          if len(words(s)) >= 6]

    def fill(self, it):
        return self.text.replace("{question}", it["prompt"]).replace("{answer}", it["answer"])

    def trim(self, text):
        """The rewrite alone: the prompt's last label dropped where the model repeats it, and anything
        from a few-shot label on cut, as a stop string would. Returns (text, whether a label ended it)."""
        text = text.strip()
        if self.labels:
            text = re.sub(r"^" + re.escape(self.labels[-1]) + r":\s*", "", text, flags=re.I)
        m = self.next_label.search(text) if self.next_label else None
        return (text[:m.start()].strip(), True) if m else (text, False)

    def problem(self, it, text):
        """Why a rewrite cannot be a negative, or None."""
        if not text:
            return "empty"
        if words(text) == words(it["answer"]):
            return "identical"
        norm = " ".join(words(text))
        if any(s in norm for s in self.sentences):
            return "echo"
        if ENDS_SENTENCE.search(it["answer"]) and not ENDS_SENTENCE.search(text):
            return "cut off"  # the ground truth ends a sentence and the rewrite stops mid-way
        return None


# ---- backends: each returns rewrites(items, k), which yields (item, rewrite, problem found by the backend or
#      None, meta) for try k; meta records the backend, the model and, for rules, what changed


def load_vocab(path):
    """{phrase: (category, substitutes)}. A vocabulary JSON maps each category to a list (any
    other member substitutes) or to {phrase: [substitutes]}, objects in the singular, with
    irregular "plurals"; a toy world.json's objects swap with their partner of the prior."""
    try:
        with open(path, encoding="utf-8") as f:
            v = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        sys.exit(f"error: --vocab {path}: {e}")
    if "images" in v:  # a toy world.json: the trigger <-> partner pairs are the co-occurrences
        pairs = {**v["partners"], **{b: a for a, b in v["partners"].items()}}
        rest = [o for o in v["objects"] if o not in pairs]
        n = v["numbers"]  # counts move by one; "zero" never, "one" only from "one" (agreement)
        v = {"objects": {o: [pairs[o]] if o in pairs else [x for x in rest if x != o] for o in v["objects"]},
             "plurals": v["plurals"], "colours": v["colours"], "positions": v["positions"],
             "numbers": {n[i]: [n[j] for j in (i - 1, i + 1) if 2 <= j < len(n)] for i in range(1, len(n))},
             "answers": {"yes": ["no"], "no": ["yes"]}}
    plural = lambda o: v.get("plurals", {}).get(o, o + "s")
    table = {}
    for category, entries in v.items():
        if category == "plurals" or category.startswith("_"):
            continue
        if isinstance(entries, list):
            entries = {e: [x for x in entries if x != e] for e in entries}
        for phrase, subs in entries.items():
            if subs:
                table[phrase.lower()] = (category, subs)
                if category == "objects":
                    table[plural(phrase).lower()] = (category, [plural(s) for s in subs])
    if not table:
        sys.exit(f"error: --vocab {path}: no phrases with substitutes")
    return table


def rules_backend(args, prompt, device):
    """Deterministic substitutions from a vocabulary (offline): seeded per item and try."""
    table = load_vocab(args.vocab)
    phrase_re = re.compile(r"\b(" + "|".join(map(re.escape, sorted(table, key=len, reverse=True))) + r")\b", re.I)

    def substitute(text, rng, question=""):
        """Swaps up to --edits vocabulary phrases (yes/no only as an answer: the first word, or a word before a
        stop or comma, as "Yes, there is ..." or the toy's "plate yes ."; not "there is no cup"), never one the
        question names (that error would contradict the question, not the image); returns (rewrite, changes).
        Capitals and a preceding a/an follow the new word."""
        asked = {m.group(0).lower() for m in phrase_re.finditer(question)}
        spans = [m for m in phrase_re.finditer(text) if m.group(0).lower() not in asked and (
                 table[m.group(0).lower()][0] != "answers" or m.start() == 0
                 or re.match(r"\s*([.,!?]|$)", text[m.end():]))]
        changes = []
        for m in sorted(rng.sample(spans, min(args.edits, len(spans))), key=lambda m: -m.start()):  # right to left
            old = m.group(0)
            category, subs = table[old.lower()]
            new = rng.choice(subs)
            new = new[0].upper() + new[1:] if old[0].isupper() else new
            head = re.sub(r"\b([Aa])n?(\s+)$", lambda a: a.group(1) + "n" * (new[0].lower() in "aeiou") + a.group(2),
                          text[:m.start()])
            text = head + new + text[m.end():]
            changes.append({"type": category, "from": old, "to": new})
        return text, changes[::-1]

    def rewrites(batch, k):
        for it in batch:
            text, changes = substitute(it["answer"], random.Random(f"{args.seed}/{it['id']}/{k}"), it["prompt"])
            yield it, text, None if changes else "nothing to change", {
                "backend": "rules", "vocab": os.path.basename(args.vocab), "seed": args.seed, "changes": changes}

    return rewrites


def openai_backend(args, prompt, device):
    client = remote.openai_client(args.base_url, args.timeout, args.retries)
    meta = {"backend": "openai", "model": args.api_model, "temperature": args.temperature,
            "max_new_tokens": args.max_new_tokens, "prompt": args.prompt_file or "built-in"}

    def ask(it):
        return remote.chat(client, args.api_model, [{"role": "user", "content": prompt.fill(it)}], args.temperature,
                           args.max_new_tokens, tries=args.retries).text

    def rewrites(batch, k):
        for it, result in remote.map_concurrent(ask, batch, args.workers):
            if isinstance(result, remote.RemoteError):
                print(f"{it['id']}: {result}", file=sys.stderr)
                yield it, "", "api error", meta
            elif isinstance(result, BaseException):
                raise result
            else:
                yield it, prompt.trim(result)[0], None, meta
    return rewrites


def hf_backend(args, prompt, device):
    """The MLLM's language model, prompted without an image, batched."""
    model, processor = loading.load_model(args.model, device=device)
    tok = processor.tokenizer
    eos = model.generation_config.eos_token_id
    eos = torch.tensor(eos if isinstance(eos, list) else [eos])
    fmt = common.input_format(args)
    meta = {"backend": "hf", "model": args.model, "temperature": args.temperature, "top_p": args.top_p,
            "max_new_tokens": args.max_new_tokens, "prompt": args.prompt_file or "built-in"}

    @torch.no_grad()
    def rewrites(batch, k):
        for i in range(0, len(batch), args.batch_size):
            chunk = batch[i:i + args.batch_size]
            texts = [common.chat_prompt(processor, prompt.fill(it), fmt, image=False) for it in chunk]
            enc = tok(texts, return_tensors="pt", padding=True).to(device)
            out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=True, temperature=args.temperature,
                                 top_p=args.top_p, pad_token_id=tok.pad_token_id)[:, enc["input_ids"].shape[1]:]
            ended = torch.isin(out.cpu(), eos).any(1).tolist()
            for it, text, eos_seen in zip(chunk, tok.batch_decode(out, skip_special_tokens=True), ended):
                text, stopped = prompt.trim(text)
                yield it, text, None if eos_seen or stopped else "cut off", meta
    return rewrites


BACKENDS = {"rules": rules_backend, "openai": openai_backend, "hf": hf_backend}


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = dist_io.dist_setup()
    torch.manual_seed(args.seed + rank)

    # ---- the prompt: built in or from --prompt_file
    text = PROMPT
    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as f:
            text = f.read()
        if "{answer}" not in text:
            sys.exit(f"error: --prompt_file {args.prompt_file} has no {{answer}} placeholder")
    prompt = FewShot(text)

    # ---- items: every source read, sampled uniformly with the seed, the ones already written dropped
    bad_records = dist_io.OnError(args.on_error, quiet=rank != 0)
    items, no_image = data.load_sources(args.data, args.samples_per_source, args.seed, args.turns, bad_records)
    if args.dry_run:
        args.model = args.model if args.backend == "hf" else None  # rules and openai use no local tokenizer
        data.dry_run_items(items, None, args, common.input_format(args), bad_records)
        return
    todo, part, n_done = dist_io.pending_items(items, args.out, rank, world)
    if rank == 0:
        print(f"{len(items)} items, {n_done} already done, {no_image} records without image skipped; "
              f"{bad_records.summary('bad ground-truth records')}")
    rewrites = BACKENDS[args.backend](args, prompt, device)

    # ---- the loop: every item tried, the invalid ones again, up to --max_tries; valid pairs written at once
    writer = dist_io.JsonlAppender(part)
    n_rejected = 0  # rewrites rejected by validation or the backend, all tries
    last = {}  # id -> why its latest rewrite was rejected, for the items still without a pair
    pending, written = todo, 0
    for k in range(args.max_tries):
        retry = []
        bar = tqdm(rewrites(pending, k), total=len(pending), desc=f"{args.backend} try {k + 1}/{args.max_tries}",
                   disable=rank != 0 and world > 1)
        for it, text, bad, meta in bar:
            bad = bad or prompt.problem(it, text)
            if bad:
                n_rejected += 1
                last[it["id"]] = bad
                if bad != "nothing to change":  # the vocabulary would find nothing the next time either
                    retry.append(it)
                continue
            last.pop(it["id"], None)
            writer.write({"id": it["id"], "image": it["image"], "prompt": it["prompt"], "chosen": it["answer"],
                          "rejected": text, "source": it["source"], "method": "error_injection",
                          "meta": {**meta, "tries": k + 1}})
            written += 1
        pending = retry
        if not pending:
            break
    writer.close()

    # ---- merge the part files into --out (rank 0, after everyone is done) and report
    dist_io.barrier()
    failed = collections.Counter(last.values())
    counts = dist_io.mean_over_ranks({"written": written, "retried": n_rejected - len(last),
                                      **{f"failed {r}": failed[r] for r in REASONS}})
    if rank == 0:
        total = dist_io.merge_parts(args.out)
        n = {key: round(v * world) for key, v in counts.items()}
        why = ", ".join(f"{n[f'failed {r}']} {r}" for r in REASONS if n[f"failed {r}"])
        n_failed = sum(n[f"failed {r}"] for r in REASONS)
        print(f"wrote {n['written']} pairs this run ({total} in {args.out}); failed {n_failed} items "
              f"(up to {args.max_tries} tries each{': ' + why if why else ''}); {n['retried']} rejected rewrites "
              f"retried")
        print(bad_records.summary("bad ground-truth records"))
        if n_failed and not n["written"] and (not total or n_failed == n["failed api error"]):
            sys.exit("error: no valid rewrite at all; check the backend (see the reasons above)")
        if n["failed api error"]:  # no reply is a failure of the run, not a verdict on the data: the exit code says so
            sys.exit(f"error: {n['failed api error']} items got no reply from {args.base_url}; the pairs that did are "
                     f"written, rerun the same command to retry the rest")
    dist_io.dist_cleanup()


if __name__ == "__main__":
    main()
