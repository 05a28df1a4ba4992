"""What 04-07 share around their scores: the model's answers to a benchmark, generated in batches and
appended the moment they exist (a rerun resumes; a cache made with other settings is refused), and the
printed result table."""
import hashlib
import os
import sys

from tqdm import tqdm

import common
import generation
import loading
from data import load_image
from dist_io import DataError, JsonlAppender, dist_setup, read_jsonl


def add_model_args(parser, max_new_tokens, why, batch_size=8):
    """The flags of the model that answers a benchmark: --model, --adapter, --max_new_tokens (its default and
    why), --batch_size and the input format."""
    parser.add_argument("--model", default=common.DEFAULT_MODEL, help="base model (dir or hub id)")
    parser.add_argument("--adapter", default=None,
                        help="peft adapter dir (03's D/adapter) merged onto --model; none = base model")
    parser.add_argument("--max_new_tokens", type=int, default=max_new_tokens,
                        help=f"answer length cap ({why}); recorded with each answer")
    parser.add_argument("--batch_size", type=int, default=batch_size, help="generations per forward")
    common.add_format_args(parser)


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
    _, _, device = dist_setup()
    model, processor = loading.load_model(config["model"], config["adapter"], device=device)
    fmt = common.InputFormat(config["chat_format"], config["pad_square"])
    writer = JsonlAppender(path)
    for i in tqdm(range(0, len(todo), batch_size), desc=desc):
        batch = todo[i:i + batch_size]
        texts = generation.generate(model, processor, [image_of(it) for it in batch], [it["question"] for it in batch], fmt,
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


def print_scores(title, columns, rows):
    """The printed result: a title line, then a Markdown table, a row per (name, values, std over runs or
    None) with, per columns {key: heading}, the value (± std where given; n/a for None)."""
    def cell(values, std, k):
        if values.get(k) is None:
            return "n/a"
        return f"{values[k]:.1f}" + (f" ± {std[k]:.1f}" if std and std.get(k) is not None else "")
    print(title)
    print("| Model | " + " | ".join(columns.values()) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, values, std in rows:
        print(f"| {name} | " + " | ".join(cell(values, std, k) for k in columns) + " |")
