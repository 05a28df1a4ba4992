"""What only a GPU can show, prepared as one run that fits a 10-minute command on an H100 (estimated 5-7 min,
not yet run there): 03's DPO training with each attention kernel (and TRL's DPOTrainer, --rows trl:on), the
compiles each run makes, QLoRA, and 01's generation with a static and a dynamic cache, on a model of
LLaVA-1.5-7B's shapes.

    python bench/gpu_check.py --out $OUT/gpu_check.json       # on the GPU (bf16); prints one markdown table
    .venv/bin/python bench/gpu_check.py --device cpu --tiny   # the same steps at a toy size, a few minutes on 2 cores
    python bench/gpu_check.py --arch qwen2_5_vl ...           # the same on Qwen2.5-VL-7B's shapes

--arch qwen2_5_vl: Qwen2.5-VL-7B's shapes (Qwen2 LM 3584 wide x 28 layers, MLP 18944, 28 heads / 4 KV heads,
vocabulary 152064; its windowed ViT 1280 wide x 32 layers, 14 px patches merged 2 x 2, so a 448 x 336 image is
192 tokens), its ChatML template at its own resolution (no square padding), the same pairs and measurements.

The lent H200's image lacks TRL and datasets and has an older transformers: bench/gpu_wheels.sh fetches the
wheels of this repo's versions into bench/.whl (here, once); the device command installs them first (see there).

The model: LLaVA-1.5-7B's shapes with random weights, built once, in bf16, straight on the device (nothing
downloaded, nothing big saved): LLaMA 4096 wide x 32 layers, MLP 11008, 32 heads, vocabulary 32000; CLIP
ViT-L/14 at 336 px (1024 wide, 24 layers, MLP 4096, 16 heads, 14 px patches: 576 image tokens, the
second-to-last layer's features); a 2-layer MLP projector. --lm_layers, --lm_hidden etc. shrink it (the
output says so when the model is not the 7B's shape); --tiny is a CPU smoke test of every step.
The pairs: synthetic, with the paper's lengths: a ~40-token question and ~150-token answers (EOS included)
after LLaVA-1.5's Vicuna-v1 conversation (its system line: prefix P ~ 576 + ~80 tokens), over non-square
images; a word-level tokenizer of --vocab words built here (one word, one token).

What is measured, each in this one process, at --batch_size 4 (the paper's per GPU), LoRA r 64 on every
linear layer of the language model (03's targets), each --rows entry a side at checkpointing off or on:
- 03_train_bpo.py itself (its main(argv) in this process, its model loader handed the model built here),
  the reference scored once before training (that pass charged as if training --epochs epochs of the
  pairs): with --attention flex (FlexAttention, PyTorch's tiles), flex with the tiles auto gives ~99 KB
  boards such as the paper's A40 (compiled and run here), per_pair, --no-padding_free, --no-precompute_ref
  (a reference forward every step, TRL's work), --fsdp (FSDP2 over a process group of one: each unit still
  gathered and reduced, so its samples/s beside the same kernel's row without it is the wrapping's cost on one
  GPU; 03 runs no DDP in one process, and the communication of many GPUs is not measured here; it shards a copy
  of the model, the original parked in host memory meanwhile) and --load_in_4bit (the language model quantized to
  NF4 in place, last); steady samples/s over --steps steps after --warmup; the compiles each run made (dynamo's
  unique graphs: flex's first run 2, reference and training, however the lengths vary: the answers' lengths
  spread over +-answer_spread tokens); step 1's log-probs beside the padded path's (bf16 tolerance); peak
  CUDA memory (allocated and reserved) beside 03 --dry_run's estimate; whether 4 pairs fit a 48 GB GPU (an
  A40, the paper's: 46068 MiB, so a reserved peak under 44.5 GiB);
- TRL's DPOTrainer (bench/trl_side.py: the same pairs in the same order, prompt text, padded images, LoRA,
  beta, lr and batch; bf16 autocast as 03's CUDA setting);
- the ratio samples/s 03 / TRL beside its limit (bench/limits.py: the language model's token passes per
  pair, TRL's 6(P+R) over ours 2(P+2R) + (P+2R)/epochs, or 3(P+2R) with a reference every step; with
  checkpointing one forward more on the policy's passes; P and R counted from these pairs) and the share
  of the limit reached;
- the paper's full run projected from each measured per-pair time (2 epochs of ~170k pairs on 8 such
  GPUs, perfect scaling), beside the paper's 17 hours on 8 A40s;
- 01's generation (its loop body: image-weakened sampling at --noise_step 500, generation.generate) at
  several batch sizes, --gen_tokens new tokens each (random weights rarely stop early), with the static
  cache (its decode step compiled: the compiles counted over every batch size and prompt length) and the
  dynamic one.
Each result is printed when measured, so a run cut short still shows what it got; --budget_s stops
starting new measurements in time to print the table.
"""
import argparse
import contextlib
import copy
import gc
import importlib
import io
import json
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from unittest import mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from families import FAMILIES  # noqa: E402

T0 = time.time()
SIZE_FLAGS = ("lm_hidden", "lm_layers", "lm_mlp", "lm_heads", "vocab", "vision_hidden", "vision_layers", "vision_heads",
              "image_size")  # the model's sizes a flag can change; the rest follow the family's 7B-class checkpoint
# --tiny: every step of the check at a size a busy 2-core CPU runs in minutes (8 x 8 patches an image)
TINY = dict(lm_hidden=64, lm_layers=2, lm_mlp=172, lm_heads=1, vocab=1000, vision_hidden=32, vision_layers=2,
            vision_heads=2, question_tokens=16, answer_tokens=32, answer_spread=8, batch_size=2, steps=2, warmup=1,
            gen_tokens=8, gen_batch_sizes=[1, 2])
DEFAULTS = dict(question_tokens=40, answer_tokens=150, answer_spread=100, batch_size=4, steps=8, warmup=2,
                gen_tokens=150, gen_batch_sizes=[1, 8, 32])
# a side: (the row's name, 03's flags, the bench/limits.py side whose token passes it makes)
SIDES = {"flex": ("03 --attention flex (reference once, charged to {epochs} epochs)", ["--attention", "flex"], "ours"),
         "small_tiles": ("03 --attention flex, a 99 KB board's tiles (A40)", ["--attention", "flex"], "ours"),
         "per_pair": ("03 --attention per_pair", ["--attention", "per_pair"], "ours"),
         "padded": ("03 --no-padding_free (right-padded rows, a dense mask)", ["--no-padding_free"], "ours_padded"),
         "every_step": ("03 --no-precompute_ref (reference every step)", ["--no-precompute_ref"], "ours_every_step"),
         "fsdp": ("03 --fsdp (FSDP2 in one process: the wrapping's cost)", ["--fsdp"], "ours"),
         "qlora": ("03 --load_in_4bit (QLoRA)", ["--load_in_4bit"], "ours"),
         "trl": ("TRL {trl} DPOTrainer", None, "trl")}
ROWS = ["flex:off", "flex:on", "per_pair:off", "per_pair:on", "padded:off", "padded:on", "small_tiles:on", "fsdp:on",
        "qlora:on"]
A40_GIB = 44.5  # an A40's 46068 MiB less the CUDA context and some room
PAPER_A40_NOTE = "8 A40s, the authors' code (TRL's layout per pair)"


class HelpFormat(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows each flag's default and keeps the docstring's layout."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormat)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="None: cuda if available")
    p.add_argument("--arch", choices=sorted(FAMILIES), default="llava",
                   help="the model family whose 7B-class checkpoint's shapes are built (families/: its seven_b)")
    p.add_argument("--tiny", action="store_true",
                   help=f"a toy size for a CPU smoke test of every step: {TINY}, images of 8 x 8 patches (flags "
                        "given explicitly win)")
    for k in SIZE_FLAGS:
        p.add_argument(f"--{k}", type=int, default=None,
                       help="model size (None: the family's 7B-class checkpoint's, e.g. LLaVA-1.5-7B's "
                            f"{FAMILIES['llava'].seven_b[k]})")
    p.add_argument("--question_tokens", type=int, default=None,
                   help="question tokens (None: 40, the paper's; --tiny 16)")
    p.add_argument("--answer_tokens", type=int, default=None,
                   help="mean answer tokens, EOS included (None: 150, the paper's; --tiny 32)")
    p.add_argument("--answer_spread", type=int, default=None, help="answer lengths uniform in mean +- this (None: 10)")
    p.add_argument("--batch_size", type=int, default=None,
                   help="pairs per step (None: 4, the paper's per GPU; --tiny 2)")
    p.add_argument("--steps", type=int, default=None, help="measured steps per configuration (None: 10; --tiny 2)")
    p.add_argument("--warmup", type=int, default=None, help="steps before them, not measured (None: 3; --tiny 1)")
    p.add_argument("--epochs", type=int, default=2,
                   help="03's default run: its reference pass charged to this many epochs")
    p.add_argument("--lora_r", type=int, default=64, help="LoRA rank, both sides (03's default, the paper's)")
    p.add_argument("--lora_alpha", type=int, default=128, help="LoRA alpha, both sides (03's default)")
    p.add_argument("--lora_dropout", type=float, default=0.0,
                   help="LoRA dropout, both sides (TRL sets every dropout to 0 anyway: DPOConfig.disable_dropout)")
    p.add_argument("--lr", type=float, default=2e-6, help="learning rate, both sides (the paper's)")
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta, both sides (the paper's)")
    p.add_argument("--rows", nargs="+", default=ROWS, metavar="SIDE:off|on",
                   help=f"training runs to measure, each a side ({', '.join(SIDES)}) at gradient checkpointing off "
                        "or on; qlora quantizes the model in place, so it runs after the others")
    p.add_argument("--gen_batch_sizes", type=int, nargs="*", default=None,
                   help="01's generation at these batch sizes (None: 1 8 32, 8 being 01's default; --tiny 1 2; "
                        "none: skip)")
    p.add_argument("--gen_tokens", type=int, default=None, help="new tokens per generation (None: 150; --tiny 8)")
    p.add_argument("--noise_step", type=int, default=500, help="01's image weakening step")
    p.add_argument("--budget_s", type=float, default=500,
                   help="start no new measurement after this many seconds (the table is still printed)")
    p.add_argument("--compile_backend", default="inductor",
                   help="torch.compile's backend for FlexAttention (attention.COMPILE_BACKEND); eager: its own kernels "
                        "without code generation, for a CPU smoke test (inductor compiles C++ there for a minute)")
    p.add_argument("--work", default=None, help="scratch folder (None: a new temporary one, removed at the end)")
    p.add_argument("--out", default=None, help="write the results as JSON here too")
    p.add_argument("--seed", type=int, default=0, help="model init, pairs, order")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="the device's dense bf16 peak for the share-of-peak column (None: bench/limits.py's table by "
                        "GPU name)")
    args = p.parse_args(argv)
    for row in args.rows:
        side, _, c = row.partition(":")
        if side not in SIDES or c not in ("off", "on"):
            p.error(f"--rows {row}: SIDE:off|on with SIDE one of {', '.join(SIDES)}")
    args.rows = sorted(args.rows, key=lambda r: r.startswith("qlora:"))  # stable: the rest as given
    preset = TINY if args.tiny else {}
    seven = FAMILIES[args.arch].seven_b
    preset = {**preset, "image_size": 8 * seven["patch_size"]} if args.tiny else {}
    for k in SIZE_FLAGS:
        if getattr(args, k) is None:
            setattr(args, k, preset.get(k, seven[k]))
    for k, v in DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, preset.get(k, v))
    return args


def row_names(args, trl_version="1.16.0"):
    """The first cell of every row of the final table, in order (tests check the table has each)."""
    names = [f"{SIDES[s][0].format(epochs=args.epochs, trl=trl_version)}, checkpointing {c}"
             for s, c in (row.split(":") for row in args.rows)]
    names += [f"01 generation, batch {b}, {cache} cache" for b in args.gen_batch_sizes for cache in ("static", "dynamic")]
    return names + [f"paper: {PAPER_A40_NOTE}"]


def model_sizes(args):
    """The sizes families/'s config_for builds: the family's 7B-class checkpoint's, the flags' over them; off that
    shape, what follows from them in proportion (KV heads, the ViT's MLP, Gemma 3's pooled image tokens)."""
    seven = FAMILIES[args.arch].seven_b
    sizes = {**seven, **{k: getattr(args, k) for k in SIZE_FLAGS}}
    if sizes != seven:
        sizes["lm_kv_heads"] = max(1, sizes["lm_heads"] * seven["lm_kv_heads"] // seven["lm_heads"])
        sizes["vision_mlp"] = sizes["vision_hidden"] * seven["vision_mlp"] // seven["vision_hidden"]
        sizes.pop("head_dim", None)
        if "image_tokens" in seven:  # patches pooled into image tokens as the checkpoint pools them
            pool = seven["image_size"] // seven["patch_size"] // int(seven["image_tokens"] ** 0.5)
            sizes["image_tokens"] = (sizes["image_size"] // sizes["patch_size"] // pool) ** 2
    return sizes


def size_note(args):
    """'' for the family's 7B-class shapes, else what differs (fewer layers said first)."""
    family = FAMILIES[args.arch]
    want, name = family.seven_b, f"{family.name}'s 7B-class ({family.checkpoints[0]})"
    diff = [f"{k} {getattr(args, k)} (7B: {want[k]})" for k in SIZE_FLAGS if getattr(args, k) != want[k]]
    if not diff:
        return ""
    return (f"NOT {name} size" + (f": {args.lm_layers} of its {want['lm_layers']} language-model layers"
                                  if args.lm_layers < want["lm_layers"] else "") + "; " + ", ".join(diff))


# ----------------------------------------------------------------------------- processor, pairs, model


def build_processor(args, path):
    """The family's processor over a word-level tokenizer of args.vocab words (its special tokens, its conversation's
    words, then filler words: one word, one token, so lengths are exact), its chat template, images of
    args.image_size px; saved to `path` as the family's checkpoints hold it."""
    family = FAMILIES[args.arch]
    toy = importlib.import_module("00_make_toy")
    words = list(dict.fromkeys(list(family.special_tokens) + toy.words(family.conversation_text)))
    words += [f"w{i}" for i in range(args.vocab - len(words))]
    tok = toy.word_tokenizer(words, family.special_tokens, **family.tokenizer_tokens)
    tok.chat_template = family.chat_template
    processor = family.processor_for(tok, model_sizes(args))
    family.save_processor(processor, path)
    return processor


def build_pairs(args, processor, n, folder):
    """n pairs with the paper's lengths over 8 non-square images (questions of 1/2 to 3/2 --question_tokens, answers
    of --answer_tokens +- --answer_spread, so rows and prompts vary in length); returns (pairs path, image folder,
    pairs)."""
    from PIL import Image
    rng = random.Random(args.seed)
    images = os.path.join(folder, "images")
    os.makedirs(images, exist_ok=True)
    for k in range(8):  # blocky random pictures, 448 x 336 (4:3, so padding to a square matters)
        small = Image.frombytes("RGB", (8, 6), bytes(rng.randrange(256) for _ in range(8 * 6 * 3)))
        small.resize((448, 336), Image.NEAREST).save(os.path.join(images, f"img{k}.png"))
    vocab = processor.tokenizer.get_vocab()  # a dict in no fixed order: sorted by id, so a seed makes the same pairs
    filler = sorted((w for w in vocab if re.fullmatch(r"w\d+", w)), key=vocab.get)
    words = lambda k: " ".join(rng.choice(filler) for _ in range(k))
    pairs = []
    for i in range(n):
        lengths = [args.answer_tokens - 1 + rng.randint(-args.answer_spread, args.answer_spread) for _ in range(2)]
        question = args.question_tokens - 1 + rng.randint(-args.question_tokens // 2, args.question_tokens // 2)
        pairs.append({"id": f"bench/{i}", "image": f"img{i % 8}.png", "prompt": words(question) + " ?",
                      "chosen": words(lengths[0]), "rejected": words(lengths[1]), "source": "bench",
                      "method": "error_injection", "meta": {}})
    path = os.path.join(folder, "pairs.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in pairs)
    return path, images, pairs


def build_model(args, processor, device, path):
    """The family's architecture at the asked sizes (model_sizes), random weights in the device's dtype (bf16 on CUDA,
    fp32 on CPU, as loading.load_model loads), built on the device; its config saved to `path` (03 --dry_run reads
    it)."""
    return finish_model(args, FAMILIES[args.arch].config_for(processor.tokenizer, model_sizes(args)),
                        processor.tokenizer, device, path)


def finish_model(args, cfg, tok, device, path):
    """The model of cfg with random weights in the device's dtype (bf16 on CUDA, fp32 on CPU), built on it."""
    import torch
    from transformers import AutoModelForImageTextToText
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(cfg, dtype=dtype)
    model.to(device)  # a no-op where the parameters were made on the device
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {(device.type, dtype)}
    g = model.generation_config
    g.pad_token_id, g.bos_token_id, g.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    model.config.save_pretrained(path)
    return model.eval()


# ----------------------------------------------------------------------------- measuring


def fmt_of(args):
    return FAMILIES[args.arch].input_format


def sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def memory_reset(device):
    import torch
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def memory_now(device):
    """GiB allocated now (the model's weights between runs: more means an earlier run left something)."""
    import torch
    return torch.cuda.memory_allocated() / 2**30 if device.type == "cuda" else None


def memory_peak(device):
    """(allocated, reserved) peak GiB since memory_reset; (None, None) off CUDA."""
    import torch
    if device.type != "cuda":
        return None, None
    return torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30


def restore(model):
    """The model as built, after a run wrapped it, whether the run ended well or not: each LoRA layer
    replaced by the layer it wraps (peft's unload without its PeftModel), checkpointing and input grads
    off, TRL's fused LM head (an instance-level forward) taken off, SDPA again (03 sets its packed attention)."""
    from peft.tuners.lora import LoraLayer

    import attention
    wrapped = [name for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    for name in wrapped:  # outermost first; a LoRA layer holds no other
        parent, _, child = name.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        setattr(holder, child, getattr(holder, child).get_base_layer())
    assert not any(isinstance(m, LoraLayer) for m in model.modules()), "LoRA layers left in the model"
    model.__dict__.pop("forward", None)
    (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
    if getattr(model, "_require_grads_hooks", None) or getattr(model, "_require_grads_hook", None) is not None:
        model.disable_input_require_grads()  # TRL's, for checkpointing
    if hasattr(model, "peft_config"):
        del model.peft_config
    attention.use_packed_attention(model, on=False)
    model.requires_grad_(False)
    model.eval()


def run_03(flags, model, out, dry_run=False, patches=()):
    """03_train_bpo.py's main in this process, its model loader handed `model` (and `patches`: (object, name, value)
    set for the run); returns (stdout, metrics rows). The LoRA 03 puts on the model is taken off again whatever
    happens."""
    import loading
    train = importlib.import_module("03_train_bpo")
    argv = [*map(str, flags), "--output_dir", out, "--overwrite", *(["--dry_run"] if dry_run else [])]
    buf = io.StringIO()
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(mock.patch.object(loading, "load_model",
                                                  lambda name, **_: (model, loading.load_processor(name))))
            for obj, name, value in patches:
                stack.enter_context(mock.patch.object(obj, name, value))
            stack.enter_context(contextlib.redirect_stdout(buf))
            try:
                train.main(argv)
            except SystemExit as e:
                if e.code not in (None, 0):
                    raise RuntimeError(f"03 exited: {e.code}\n{buf.getvalue()[-2000:]}") from None
    finally:
        restore(model)
    rows = []
    if not dry_run:
        with open(os.path.join(out, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
    return buf.getvalue(), rows


def compiles():
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def quantize_lm_4bit(model, device):
    """The language model's Linear layers replaced in place by bitsandbytes' NF4 layers (double quantisation, bf16
    compute), as loading.load_model(load_in_4bit=True) loads them: the random weights need no file."""
    import bitsandbytes as bnb
    import torch
    dtype = next(model.parameters()).dtype
    for name, linear in [(n, m) for n, m in model.named_modules() if ".language_model." in f".{n}."
                         and isinstance(m, torch.nn.Linear)]:
        nf4 = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                compute_dtype=dtype, compress_statistics=True, quant_type="nf4")
        nf4.weight = bnb.nn.Params4bit(linear.weight.data.cpu(), requires_grad=False, compress_statistics=True,
                                       quant_type="nf4").to(device)
        if linear.bias is not None:
            nf4.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, nf4)
    return model


@contextlib.contextmanager
def host_copy(model, device):
    """A copy of the model in host memory, for 03 --fsdp to shard (fully_shard changes the model it is given for
    good; 03 --fsdp loads onto the host too), the original parked there meanwhile so the peak is the run's alone."""
    model.to("cpu")
    try:
        yield copy.deepcopy(model)
    finally:
        model.to(device)


def measure_ours(args, side, checkpointing, model, device, common_flags, scratch):
    import attention
    out = os.path.join(scratch, f"{side}_{checkpointing}")
    flags = common_flags + SIDES[side][1] + (["--gradient_checkpointing"] if checkpointing == "on" else [])
    # the tiles auto gives a ~99 KB board, forced on this one
    patches = [(attention, "flex_plan", lambda *a: (dict(attention.SMALL_TILES), None))] if side == "small_tiles" else []
    if side == "qlora" and not any(type(m).__name__ == "Linear4bit" for m in model.modules()):
        quantize_lm_4bit(model, device)
    if side == "small_tiles":  # its own compiles, not the default tiles' graphs from an earlier row
        import torch
        torch._dynamo.reset()
        attention.compiled_flex.cache_clear()
    text, _ = run_03(flags, model, out, dry_run=True)  # 03 --dry_run's estimated peak, beside the measured one
    found = re.search(r"estimated peak memory per GPU: ([0-9.]+) GiB", text)
    estimate = float(found.group(1)) if found else None
    with host_copy(model, device) if side == "fsdp" else contextlib.nullcontext(model) as run_model:
        memory_reset(device)
        base, graphs = memory_now(device), compiles()
        text, rows = run_03(flags, run_model, out, patches=patches)
        alloc, reserved = memory_peak(device)
    with open(os.path.join(out, "run.json")) as f:
        kernel = json.load(f)["attention"]  # the kernel the run ended with (a fallback is written there)
    shutil.rmtree(out, ignore_errors=True)  # the adapter and checkpoint (~2.6 GB at 7B)
    seconds = [args.batch_size / r["samples_per_s"] for r in rows]
    found = re.search(r"reference log-probs: (\d+) pairs scored in ([0-9.]+)s", text)
    ref_pairs, ref_s = (int(found.group(1)), float(found.group(2))) if found else (0, 0.0)
    if side != "every_step":
        assert found, f"03 printed no reference pass:\n{text[-1500:]}"
    return {"seconds_per_step": seconds, "reference_pass_s": ref_s, "reference_pairs": ref_pairs,
            "alloc_before_gib": base, "peak_alloc_gib": alloc, "peak_reserved_gib": reserved,
            "dry_run_estimate_gb": estimate, "compiles": compiles() - graphs,
            "attention": kernel, "fell_back": "fell back from flex" in kernel,
            "row_tokens": sorted({int(r["tokens/real"] + r["tokens/padding"]) for r in rows}),
            "logps/chosen": rows[0]["logps/chosen"], "logps/rejected": rows[0]["logps/rejected"]}


def measure_trl(args, checkpointing, model, processor, pairs, order, image_root, targets, scratch, device):
    import trl_side
    rows = trl_side.rows_in_order(pairs, order, image_root, processor, fmt_of(args))
    config = trl_side.dpo_config(os.path.join(scratch, f"trl_{checkpointing}"), args.warmup + args.steps,
                                 args.batch_size, args.lr, args.beta, args.seed, checkpointing == "on")
    memory_reset(device)
    base = memory_now(device)
    trainer = None
    try:
        trainer, clock = trl_side.trainer_for(model, processor, rows, config, args.lora_r, args.lora_alpha, targets,
                                              args.lora_dropout)
        with contextlib.redirect_stdout(io.StringIO()):  # TRL prints its logs
            trainer.train()
    finally:
        if trainer is not None:
            trainer.optimizer = trainer.lr_scheduler = None
        del trainer
        restore(model)
    alloc, reserved = memory_peak(device)
    shutil.rmtree(config.output_dir, ignore_errors=True)
    return {"seconds_per_step": clock.seconds, "alloc_before_gib": base, "peak_alloc_gib": alloc,
            "peak_reserved_gib": reserved,
            "logps/chosen": clock.step1.get("logps/chosen"), "logps/rejected": clock.step1.get("logps/rejected")}


def measure_generation(args, model, processor, pairs, image_root, device, batch_size, cache):
    """01's loop body on batch_size items: images read, weakened (noise on the projector's input), sampled, with a
    static cache (its decode step compiled on CUDA) or the dynamic one."""
    import torch

    import common
    import generation
    import data
    items = [pairs[k % len(pairs)] for k in range(batch_size)]
    images = [data.load_image(image_root, it["image"]) for it in items]
    generator = torch.Generator().manual_seed(args.seed)

    def answer(max_new_tokens):
        with common.weaken_images(model, args.noise_step, "features", generator):
            return generation.generate(model, processor, images, [it["prompt"] for it in items], fmt_of(args),
                                       max_new_tokens=max_new_tokens, do_sample=True, static_cache=cache == "static")

    model.eval()
    graphs = compiles()
    answer(2)  # warm-up at this batch size
    sync(device)
    t0 = time.perf_counter()
    texts = answer(args.gen_tokens)
    sync(device)
    seconds = time.perf_counter() - t0
    new = sum(len(processor.tokenizer(t, add_special_tokens=False).input_ids) for t in texts)
    return {"seconds": seconds, "samples_per_s": batch_size / seconds, "new_tokens_per_s": new / seconds,
            "compiles": compiles() - graphs}


def steady(args, r, median=False):
    """Pairs per second over the measured steps (their mean time, or their median: robust to the odd slow step
    at a new allocation size); 03's reference pass charged to --epochs epochs of the pairs."""
    timed = r["seconds_per_step"][args.warmup:]
    per_s = args.batch_size / (statistics.median(timed) if median else statistics.mean(timed))
    trained = args.epochs * (args.warmup + args.steps) * args.batch_size
    return trained / (trained / per_s + r.get("reference_pass_s", 0.0))


# ----------------------------------------------------------------------------- main


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from importlib.metadata import version

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import limits

    import attention
    attention.COMPILE_BACKEND = args.compile_backend
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no CUDA GPU is visible")
    try:
        trl_version = version("trl")
    except Exception:  # the TRL rows then say why they failed; 03's and 01's still run
        trl_version = "(not installed)"
    work = args.work or tempfile.mkdtemp(prefix="gpu_check_")
    os.makedirs(work, exist_ok=True)
    # 03's adapter and checkpoint are written at the end of each run (~2.6 GB at 7B) and removed: RAM if it has room
    shm = "/dev/shm"
    scratch = tempfile.mkdtemp(prefix="gpu_check_runs_", dir=shm if os.path.isdir(shm)
                               and shutil.disk_usage(shm).free > 8 * 2**30 else work)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{gpu}; torch {version('torch')}, transformers {version('transformers')}, peft {version('peft')}, "
          f"trl {trl_version}; {'bf16' if device.type == 'cuda' else 'fp32'}", flush=True)
    note = size_note(args)
    if note:
        print(f"NOTE: {note}", flush=True)

    # ---- processor, pairs, model: built once
    model_dir = os.path.join(work, "model")
    processor = build_processor(args, model_dir)
    n_pairs = (args.warmup + args.steps) * args.batch_size
    pairs_path, image_root, pairs = build_pairs(args, processor, n_pairs, work)
    import common
    import data
    image_tokens = common.prompt_length(processor, processor.image_token, data.load_image(image_root, "img0.png"),
                                        fmt_of(args)) - len(common.tokenize(processor.tokenizer, processor.image_token)) + 1
    shape = (f"{args.arch}: LM {args.lm_hidden} x {args.lm_layers} layers (MLP {args.lm_mlp}, {args.lm_heads} heads, "
             f"vocabulary {args.vocab}), vision {args.vision_hidden} x {args.vision_layers} layers at {args.image_size} "
             f"px ({image_tokens} tokens for a 448 x 336 image)")
    P, R = limits.pair_lengths(processor, pairs, fmt_of(args),
                               {p["image"]: data.load_image(image_root, p["image"]) for p in pairs})
    t = time.time()
    model = build_model(args, processor, device, model_dir)
    sync(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:,.1f}M parameters, {shape}; built on {device} in {time.time() - t:.0f}s; "
          f"{n_pairs} pairs: P = {P:.1f} prefix tokens, R = {R:.1f} answer tokens (EOS included)", flush=True)
    import common
    targets = common.LORA_TARGETS  # 03's LoRA targets, for TRL too
    order = torch.randperm(n_pairs, generator=torch.Generator().manual_seed(args.seed)).tolist()  # 03's epoch 0
    common_flags = ["--model", model_dir, "--data", pairs_path, "--image_root", image_root,
                    "--max_steps", args.warmup + args.steps, "--batch_size", args.batch_size, "--lr", args.lr,
                    "--beta", args.beta, "--lora_r", args.lora_r, "--lora_alpha", args.lora_alpha,
                    "--lora_dropout", args.lora_dropout, "--warmup_ratio", 0, "--save_every", 0, "--seed", args.seed]

    results, errors = {}, {}

    def attempt(key, fn):
        if time.time() - T0 > args.budget_s:
            errors[key] = f"skipped: past --budget_s {args.budget_s:.0f}"
            print(f"--- {key}: {errors[key]}", flush=True)
            return
        t = time.time()
        try:
            results[key] = fn()
            results[key]["wall_s"] = time.time() - t
            shown = {k: v for k, v in results[key].items() if k != "seconds_per_step"}
            steps = results[key].get("seconds_per_step")
            print(f"--- {key}: {time.time() - t:.0f}s; {json.dumps(shown, default=str)}"
                  + (f"; step seconds {[round(s, 3) for s in steps]}" if steps else ""), flush=True)
        except Exception as e:  # one failing measurement does not cost the others
            import traceback
            errors[key] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"--- {key}: FAILED\n{traceback.format_exc()[-3000:]}", flush=True)
            memory_reset(device)

    if device.type == "cuda":  # a first 03 run in a fresh process met slow steps (3 of 10 at ~4x) that later runs
        # on the same shapes did not (kernel selection, the allocator's first blocks): one unmeasured run first
        t = time.time()  # per_pair: the flex rows' compiles are counted in their own runs
        run_03(common_flags + ["--attention", "per_pair"], model, os.path.join(scratch, "warm_up"))
        shutil.rmtree(os.path.join(scratch, "warm_up"), ignore_errors=True)
        print(f"--- warm-up run of 03 (not measured): {time.time() - t:.0f}s", flush=True)
    lm_params = sum(p.numel() for n, p in model.named_parameters() if "language_model" in n)  # before qlora
    rows = [tuple(row.split(":")) for row in args.rows]
    for side, c in [r for r in rows if r[0] != "qlora"]:
        if side == "trl":
            attempt(("trl", c), lambda: measure_trl(args, c, model, processor, pairs, order, image_root, targets,
                                                    scratch, device))
        else:
            attempt((side, c), lambda: measure_ours(args, side, c, model, device, common_flags, scratch))
    for b in args.gen_batch_sizes:
        for cache in ("static", "dynamic"):
            attempt(("gen", b, cache), lambda: measure_generation(args, model, processor, pairs, image_root, device,
                                                                  b, cache))
    for side, c in [r for r in rows if r[0] == "qlora"]:  # last: it quantizes the model in place
        attempt((side, c), lambda: measure_ours(args, side, c, model, device, common_flags, scratch))
    shutil.rmtree(scratch, ignore_errors=True)

    # ---- the table
    names = row_names(args, trl_version)
    cols = ["run", "samples/s", "median step s", "peak GiB alloc. / reserved", "fits 48 GB", "x TRL (median steps)",
            "limit", "of limit", "model TFLOP/s", "of bf16 peak", "paper's run, 8 GPUs (h)", "notes"]
    peak = args.peak_tflops or limits.peak_tflops(gpu)
    share = lambda tflops: f"{100 * tflops / peak:.0f}%" if peak else "–"
    lines = [f"\n{gpu}, {shape}" + (f" -- {note}" if note else "") + f"; batch {args.batch_size}, LoRA r {args.lora_r} "
             f"on every linear of the language model; {args.steps} measured steps after {args.warmup}; P = {P:.0f}, "
             f"R = {R:.0f}; paper's run = {limits.PAPER_EPOCHS} epochs of {limits.PAPER_PAIRS} pairs on "
             f"{limits.PAPER_GPUS} of these GPUs, perfect scaling\n",
             "| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    table = []
    padded = {c: results.get(("padded", c)) for c in ("off", "on")}  # step 1's log-probs, the padded path's
    for name, (side, c) in zip(names, rows):
        r = results.get((side, c))
        if r is None:
            lines.append(f"| {name} | | | | | | | | | | | {errors.get((side, c), 'not run')} |")
            table.append({"run": name, "error": errors.get((side, c))})
            continue
        sps = steady(args, r)
        mem = ("n/a (CPU)" if r["peak_alloc_gib"] is None
               else f"{r['peak_alloc_gib']:.1f} / {r['peak_reserved_gib']:.1f}")
        fits = "" if r["peak_reserved_gib"] is None else ("yes" if r["peak_reserved_gib"] < A40_GIB else "no")
        trl, passes_side = results.get(("trl", c)), SIDES[side][2]
        ratio = ratio_median = lim = None
        if side != "trl" and trl is not None:
            ratio = sps / steady(args, trl)
            ratio_median = steady(args, r, median=True) / steady(args, trl, median=True)
            lim = limits.limit(P, R, passes_side, args.epochs, c == "on")
        hours = limits.full_run_hours(sps)
        median = statistics.median(r["seconds_per_step"][args.warmup:])
        # model FLOPs of the training steps alone (the reference pass is charged to the epochs in samples/s)
        flops = lambda passes: limits.flops_per_pair(P, R, passes_side, passes, lm_params, args.lm_layers,
                                                     args.lm_hidden)
        tflops = flops(limits.step_passes(P, R, passes_side, c == "on")) * args.batch_size / median / 1e12
        notes = [r["attention"]] if r.get("attention") else []
        if "compiles" in r:
            notes.append(f"{r['compiles']} compiles over {len(r['row_tokens'])} row lengths"
                         + (" (FELL BACK to per_pair)" if r["fell_back"] else ""))
        base = padded[c]
        if base and side not in ("padded", "trl"):
            rel = abs(r["logps/chosen"] - base["logps/chosen"]) / abs(base["logps/chosen"])
            notes.append(f"step-1 logps/chosen {r['logps/chosen']:.2f} vs padded {base['logps/chosen']:.2f} "
                         f"({rel:.1e} relative)")
        if r.get("reference_pairs") and r["reference_pass_s"] > 0:  # a tiny pass can print 0.00 s
            ref_tflops = r["reference_pairs"] / r["reference_pass_s"] * flops(P + 2 * R) / 1e12
            notes.append(f"reference pass {r['reference_pass_s']:.2f}s for {r['reference_pairs']} pairs "
                         f"({ref_tflops:.0f} TFLOP/s, {share(ref_tflops)} of peak; its compile included)")
        if r.get("dry_run_estimate_gb") is not None:
            notes.append(f"03 --dry_run estimated {r['dry_run_estimate_gb']:.1f} GB")
        if side == "fsdp":  # the wrapping's cost: beside the row of the kernel it ran, without --fsdp
            same = "flex" if r["attention"].startswith("attention: flex") else "per_pair"
            if results.get((same, c)):
                notes.append(f"x{sps / steady(args, results[(same, c)]):.2f} the samples/s of the {same} row")
        lines.append(f"| {name} | {sps:.3g} | {median:.3f} | {mem} | {fits} | "
                     + (f"{ratio:.2f} ({ratio_median:.2f}) | {lim:.2f} | {100 * ratio / lim:.0f}% | " if ratio
                        else "| | | ")
                     + f"{tflops:.3g} | {share(tflops)} | {hours:.1f} | {'; '.join(notes)} |")
        table.append({"run": name, "samples_per_s": sps, "median_step_s": median, **r, "x_trl": ratio,
                      "model_tflops": tflops, "peak_share": tflops / peak if peak else None,
                      "x_trl_median_steps": ratio_median, "limit": lim, "paper_run_hours": hours, "fits_48gb": fits})
    gens = [(b, cache) for b in args.gen_batch_sizes for cache in ("static", "dynamic")]
    for (b, cache), name in zip(gens, names[len(rows):]):
        r = results.get(("gen", b, cache))
        if r is None:
            lines.append(f"| {name} | | | | | | | | | | | {errors.get(('gen', b, cache), 'not run')} |")
            table.append({"run": name, "error": errors.get(("gen", b, cache))})
            continue
        dynamic = results.get(("gen", b, "dynamic"))
        x = f"x{r['samples_per_s'] / dynamic['samples_per_s']:.2f} the dynamic cache; " \
            if dynamic and cache == "static" else ""
        hours = limits.PAPER_PAIRS / (r["samples_per_s"] * limits.PAPER_GPUS) / 3600
        lines.append(f"| {name} | {r['samples_per_s']:.3g} | | | | | | | | | {hours:.1f} | {x}{r['new_tokens_per_s']:.0f} "
                     f"new tokens/s; {r['compiles']} compiles; {args.gen_tokens} new tokens each; hours = "
                     f"{limits.PAPER_PAIRS} negatives, one try |")
        table.append({"run": name, **r, "paper_negatives_hours": hours})
    lines.append(f"| {names[-1]} | | | | | | | | | | {limits.PAPER_HOURS:.0f} | the paper's reported training time |")
    table.append({"run": names[-1], "paper_run_hours": limits.PAPER_HOURS})
    print("\n".join(lines))
    print(f"\nfits 48 GB: reserved peak < {A40_GIB} GiB (an A40: 46068 MiB). x TRL: samples/s over TRL's at the same "
          "checkpointing, from mean step times (from median ones); limit: bench/limits.py's token passes; of limit: "
          "x TRL / limit (goal >= 85%). Model TFLOP/s: bench/limits.py's flops_per_pair of the training step (real tokens, "
          "no reference pass) x pairs / median step; of bf16 peak: over the device's dense bf16 peak. Paper's run: "
          "measured per-pair time x 2 x 170k / 8; an A40 has ~1/6.6 of an H100's dense bf16 peak (149.7 vs 989 "
          "TFLOP/s). Compiles: graphs dynamo compiled during the run (flex: 2 expected, reference and training).")
    result = {"args": vars(args), "device": gpu, "n_params": n_params, "P": P, "R": R, "note": note, "rows": table,
              "errors": {str(k): v for k, v in errors.items()}, "wall_s": time.time() - T0}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, default=str)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\ntotal {time.time() - T0:.0f}s", flush=True)
    return 1 if errors and not all(v.startswith("skipped") for v in errors.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
