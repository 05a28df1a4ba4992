"""Our DPO training step (03_train_bpo.py) against TRL's DPOTrainer, on one machine in one run.

    OMP_NUM_THREADS=2 .venv/bin/python bench/train_vs_trl.py [--steps 10 --batch_size 4 --device cpu|cuda]
    (TRL first: .venv/bin/pip install -r bench/requirements.txt)

It builds a tiny random-init LLaVA with LLaVA-1.5's vision geometry (336 px images, 14 px patches: 576 image
tokens per image) from the toy model's config and processor, rule-injected pairs of the toy world (02's
rules backend), and trains each side in a process of its own for --steps steps. Printed: steady
samples/s (pairs per second, the first --warmup steps left out), peak memory, and the step-1 mean
logps/chosen and logps/rejected; then the ratios ours/TRL, each beside its limit (bench/limits.py: the
language model's token passes per pair, TRL's over ours, counted from these pairs) and the share of the
limit it reached (goal: >= 85% for 03's default), and how far each side's step-1 log-probs are from an
independent plain forward under the token convention of docs/training.md (goal for ours: within 1e-3 relative).

What is the same on both sides, so that the comparison is fair:
- the model files, the pairs and their order (TRL's dataset is put in 03's shuffled order and read
  sequentially), so step N sees the same pairs on both sides; batch size, beta, lr, a cosine schedule
  without warmup (03's and HF's warmups differ by a step: 03 starts at lr / warmup steps, HF at 0), AdamW,
  gradient clipping at 1, LoRA r/alpha with dropout 0 on 03's target modules (every linear layer of the
  language model; vision tower and projector frozen), reference = the adapter disabled;
- the tokens: TRL gets the same prompt text (LLaVA-1.5's Vicuna-v1 conversation, 03's default), the same
  images padded to a square as 03 pads them, and the responses with EOS appended, so both score the
  response tokens and EOS; TRL's collator drops BOS (add_special_tokens=False), the one difference, which
  is why its log-probs differ from ours and the reference by a little; bench/trl_side.py checks that the
  step-1 sequences TRL's collator builds are 03's less BOS, token for token, and this prints the count;
- precision: fp32 on CPU; on CUDA bf16 weights and bf16 autocast on both sides (03's CUDA setting);
- TRL's own defaults that would change the work done are turned off: gradient checkpointing (TRL turns
  it on), bf16 on CPU, truncation (max_length=None); data loading in the main process on both sides;
- timing: each step from the start of its data loading to the end of its optimizer step (03's own
  samples_per_s; a callback in bench/trl_side.py for TRL), logging and checkpointing excluded;
- the reference: 03 runs twice, once with a reference forward every step like TRL (--no-precompute_ref),
  once as it runs by default, scoring the reference once before training; that pass is charged to its
  samples/s as if it trained --epochs epochs of the pairs (the paper: 2);
- memory: on CPU the peak resident set of each training process (its ru_maxrss, from os.wait4), whole
  and over the RSS of a process that only imports that side's libraries (TRL pulls in datasets, pandas and
  pyarrow: about 0.1 GB more before any work); on CUDA torch.cuda.max_memory_allocated in each process.
TRL keeps what is its own design: its fused LM head and its extra logged metrics (entropy, mean logits,
token accuracy). That head scores only the response positions with Triton (CUDA); elsewhere, CPU included,
it scores every position in tiles of 32768 tokens, i.e. full logits at these sizes, so with a large
--vocab_size the CPU numbers show TRL at its worst.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import limits  # noqa: E402  (bench/limits.py: this script's folder is on sys.path)

class HelpFormat(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows each flag's default and keeps the docstring's layout."""


p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormat)
p.add_argument("--toy", default=os.path.join(ROOT, "toy"),
               help="toy world (00_make_toy.py) whose config, tokenizer, images and captions are used; "
                    "a quick one is built under --work if it has no model/")
p.add_argument("--work", default=None, help="working folder (None: a new temporary one)")
p.add_argument("--out", default=None, help="the table as JSON (None: WORK/result.json)")
p.add_argument("--steps", type=int, default=10, help="optimizer steps per side")
p.add_argument("--warmup", type=int, default=2, help="first steps left out of samples/s")
p.add_argument("--batch_size", type=int, default=4, help="pairs per step (the paper's per-GPU batch)")
p.add_argument("--lr", type=float, default=1e-4, help="learning rate, both sides")
p.add_argument("--beta", type=float, default=0.1, help="DPO beta, both sides")
p.add_argument("--lora_r", type=int, default=64, help="LoRA rank (03's default, the paper's)")
p.add_argument("--lora_alpha", type=int, default=128, help="LoRA alpha (03's default)")
p.add_argument("--lm_hidden", type=int, default=256, help="language model hidden size (heads of 64)")
p.add_argument("--lm_layers", type=int, default=2, help="language model layers")
p.add_argument("--vocab_size", type=int, default=0,
               help="rows of the embeddings and LM head (0: the toy tokenizer's 92; LLaVA-1.5's 32064 makes the "
                    "LM head and its logits dominate this small model's compute and memory, far more than in the 7B)")
p.add_argument("--epochs", type=int, default=2,
               help="for 03's default run (reference scored once before training): samples/s amortised over "
                    "this many epochs of the pairs, the pass included (the paper trains 2 epochs)")
p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="None: cuda if available")
p.add_argument("--seed", type=int, default=0, help="model init, pairs, shuffling (both sides)")
p.add_argument("--turns", choices=["first", "all"], default="first",
               help="02's turns: first = the detailed captions (similar lengths); all = captions and short answers "
                    "mixed (padding's worst case)")
args = p.parse_args()

import torch  # noqa: E402

import common  # noqa: E402
import data  # noqa: E402
import dist_io  # noqa: E402

device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
work = args.work or tempfile.mkdtemp(prefix="bench_trl_")
os.makedirs(work, exist_ok=True)
out_json = args.out or os.path.join(work, "result.json")
# the children see only the device asked for (03 and TRL both take CUDA whenever it is visible)
child_env = dict(os.environ, **({} if device == "cuda" else {"CUDA_VISIBLE_DEVICES": ""}))


def run(name, cmd):
    """Runs cmd in its own process, output to WORK/NAME.log; returns its peak RSS in GB (ru_maxrss of
    that process alone, from wait4) and its wall time. Exits with the log's tail if it fails."""
    log = os.path.join(work, f"{name}.log")
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, *map(str, cmd)], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                                env=child_env)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        with open(log) as f:
            sys.exit(f"{name} failed (exit {proc.returncode}); the end of {log}:\n{f.read()[-3000:]}")
    print(f"{name}: {wall:.0f}s", flush=True)
    return usage.ru_maxrss / 2**20, wall  # ru_maxrss is in KiB on Linux


# ---- the toy world: config, tokenizer, chat template, images, captions
toy = args.toy
if not os.path.exists(os.path.join(toy, "model")):
    toy = os.path.join(work, "toy")
    if not os.path.exists(os.path.join(toy, "model")):
        run("toy", ["00_make_toy.py", "--out", toy, "--quick", "--seed", args.seed])
image_root = os.path.join(toy, "images")


def build_model(path):
    """A random-init LLaVA with the toy's tokenizer and chat template and LLaVA-1.5's image geometry:
    336 px images, 14 px patches, the CLS feature dropped ("default" strategy), so 24 x 24 = 576 image
    tokens, expanded by the processor from each <image>. The vision tower keeps the toy's width and depth."""
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration
    cfg = AutoConfig.from_pretrained(os.path.join(toy, "model"))
    cfg.vision_config.image_size, cfg.vision_config.patch_size = 336, 14
    cfg.image_seq_length = (336 // 14) ** 2
    text = cfg.text_config
    text.hidden_size, text.num_hidden_layers = args.lm_hidden, args.lm_layers
    text.intermediate_size = round(args.lm_hidden * 11008 / 4096)  # LLaMA-2-7B's MLP ratio
    text.num_attention_heads = text.num_key_value_heads = max(1, args.lm_hidden // 64)
    text.head_dim = args.lm_hidden // text.num_attention_heads
    text.max_position_embeddings = 4096
    text.vocab_size = max(args.vocab_size, text.vocab_size)
    torch.manual_seed(args.seed)
    model = LlavaForConditionalGeneration(cfg)
    model.save_pretrained(path)
    processor = AutoProcessor.from_pretrained(os.path.join(toy, "model"))
    processor.patch_size = 14  # the processor's own count of image tokens: (336 / 14)^2 + 1 CLS - 1 dropped
    processor.image_processor.size = {"shortest_edge": 336}
    processor.image_processor.crop_size = {"height": 336, "width": 336}
    processor.save_pretrained(path)
    image = data.load_image(image_root, min(os.listdir(image_root)))
    ids = processor(text=[common.chat_prompt(processor, "Describe.")], images=[image]).input_ids[0]
    n_image = sum(i == cfg.image_token_index for i in ids)
    assert n_image == 576, f"the processor expands <image> to {n_image} tokens, not 576"
    return sum(t.numel() for t in model.parameters())


model_dir = os.path.join(work, "model")
n_params = build_model(model_dir)

# ---- pairs: the toy's detailed captions (chosen) and 02's rule-based rewrites of them (rejected)
pairs_path = os.path.join(work, "pairs.jsonl")
if os.path.exists(pairs_path):
    os.remove(pairs_path)  # 02 appends (resumes); a fresh set each run
need = args.steps * args.batch_size
run("pairs", ["02_inject_errors.py", "--backend", "rules", "--vocab", os.path.join(toy, "world.json"),
              "--data", f"toy={os.path.join(toy, 'train.json')}", "--samples_per_source", 2 * need,
              "--turns", args.turns, "--seed", args.seed, "--out", pairs_path])
pairs = dist_io.read_jsonl(pairs_path)
assert len(pairs) >= need, f"02 wrote {len(pairs)} pairs, fewer than {need}"
pairs = pairs[:need]  # exactly one epoch, so that 03's reference pass scores only these
with open(pairs_path, "w") as f:
    f.writelines(json.dumps(pair) + "\n" for pair in pairs)
# 03's step 1: the first batch_size pairs of randperm(len(pairs)) seeded with seed + epoch 0
step1 = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(args.seed)).tolist()[:args.batch_size]
lora_targets = common.LORA_TARGETS  # 03's

# ---- the sides, each in a process of its own: 03 with the reference forward every step (the same work
# per step as TRL), 03 as it runs by default (reference scored once before training), TRL
ours_args = ["03_train_bpo.py", "--model", model_dir, "--data", pairs_path, "--image_root", image_root,
             "--max_steps", args.steps, "--batch_size", args.batch_size, "--lr", args.lr, "--beta", args.beta,
             "--lora_r", args.lora_r, "--lora_alpha", args.lora_alpha, "--lora_dropout", 0, "--warmup_ratio", 0,
             "--save_every", 0, "--log_every", 1, "--seed", args.seed, "--overwrite"]  # --work may hold a run
trl_json = os.path.join(work, "trl.json")
sides = {  # tag: (name in the table, command)
    "ours": ("ours (03), reference every step", [*ours_args, "--output_dir", os.path.join(work, "ours"),
                                                "--no-precompute_ref"]),
    "ours_default": (f"ours (03), default: reference once, {args.epochs} epochs",
                     [*ours_args, "--output_dir", os.path.join(work, "ours_default")]),
    "ours_padded": (f"ours (03) --no-padding_free: padded rows, reference once, {args.epochs} epochs",
                    [*ours_args, "--output_dir", os.path.join(work, "ours_padded"), "--no-padding_free"]),
    "trl": (f"TRL {version('trl')}", ["bench/trl_side.py", "--model", model_dir, "--pairs", pairs_path,
                                      "--image_root", image_root, "--output_dir", os.path.join(work, "trl"),
                                      "--result", trl_json, "--steps", args.steps, "--batch_size", args.batch_size,
                                      "--lr", args.lr, "--beta", args.beta, "--lora_r", args.lora_r,
                                      "--lora_alpha", args.lora_alpha, "--lora_targets", lora_targets,
                                      "--seed", args.seed])}
# what each side's process imports before any work: the floor of its RSS
imports = {"ours": "import torch, peft, transformers, matplotlib.pyplot, common",
           "trl": "import torch, peft, datasets, transformers, common; from trl import DPOTrainer"}
results = {}
for tag, (name, cmd) in sides.items():
    rss, wall = run(tag, cmd)
    if tag.startswith("ours"):  # 03's own log: per-step samples_per_s (its step timing), peak_mem_gb on CUDA
        rows = dist_io.read_jsonl(os.path.join(work, tag, "metrics.jsonl"))
        r = {"seconds_per_step": [args.batch_size / row["samples_per_s"] for row in rows],
             "logps/chosen": rows[0]["logps/chosen"], "logps/rejected": rows[0]["logps/rejected"]}
        if device == "cuda":
            r["peak_cuda_gb"] = rows[-1]["peak_mem_gb"]  # max_memory_allocated since the start
        with open(os.path.join(work, f"{tag}.log")) as f:  # 03 prints how long its reference pass took
            found = re.search(r"pairs scored in ([0-9.]+)s", f.read())
        r["reference_pass_s"] = float(found.group(1)) if found else 0.0
    else:
        with open(trl_json) as f:
            r = json.load(f)
    r.update(peak_rss_gb=rss, wall_s=wall)
    if device == "cpu":
        r["rss_over_imports_gb"] = rss - run(f"{tag}-imports", ["-c", imports[tag.split("_")[0]]])[0]
    results[name] = r


# ---- the independent reference: a plain forward of the base model (LoRA's B starts at zero, so the
# step-1 policy is the base model) on step 1's pairs, written here from the token convention (docs/training.md) with the
# processor and tokenizer alone (not with common.chat_prompt / build_sequences / packed_logps): LLaVA's
# conv_vicuna_v1 text, the image padded to a square with the mean colour, fp32, a full log_softmax
VICUNA_V1 = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
             "detailed, and polite answers to the user's questions. USER: {image}\n{question} ASSISTANT:")


def expand2square(image, mean):
    """LLaVA-1.5's expand2square (llava/mm_utils.py), written out again."""
    from PIL import Image
    w, h = image.size
    if w == h:
        return image
    out = Image.new(image.mode, (max(w, h),) * 2, tuple(int(255 * m) for m in mean))
    out.paste(image, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
    return out


@torch.no_grad()
def reference_logps(indices):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    tok = processor.tokenizer
    sums, lengths = {"chosen": [], "rejected": []}, []
    for i in indices:
        pair = pairs[i]
        prompt_text = VICUNA_V1.format(image=processor.image_token, question=pair["prompt"].strip())
        assert prompt_text == common.chat_prompt(processor, pair["prompt"]), "03's prompt is not LLaVA's conv_vicuna_v1"
        image = expand2square(data.load_image(image_root, pair["image"]), processor.image_processor.image_mean)
        enc = processor(text=[prompt_text], images=[image], return_tensors="pt")  # BOS, <image> expanded to 576
        prompt_ids = tok(prompt_text).input_ids
        for key, acc in sums.items():
            joint = tok(prompt_text + " " + pair[key]).input_ids
            assert joint[:len(prompt_ids)] == prompt_ids, "the prompt's tokens are not a prefix of prompt + response"
            response = torch.tensor(joint[len(prompt_ids):] + [tok.eos_token_id])
            ids = torch.cat([enc.input_ids[0], response]).unsqueeze(0).to(device)
            logits = model(input_ids=ids, pixel_values=enc.pixel_values.to(device)).logits[0].float()
            logp = logits.log_softmax(-1)[enc.input_ids.shape[1] - 1:-1]  # the positions predicting the response
            acc.append(logp.gather(1, response.to(device).unsqueeze(1)).sum().item())
            lengths.append(ids.shape[1])
    return ({f"logps/{k}": sum(v) / len(v) for k, v in sums.items()}, sum(lengths) / len(lengths))


ref, mean_tokens = reference_logps(step1)
from transformers import AutoProcessor  # noqa: E402

P, R = limits.pair_lengths(AutoProcessor.from_pretrained(model_dir), pairs)


def samples_per_s(side, median=False):
    """Steady pairs per second over the steps after --warmup (from their mean time, or their median: robust
    to a busy machine's odd slow step); a reference pass before training (03's default) is charged to
    --epochs epochs of these pairs: E*N / (E*N / steady + pass)."""
    timed = sorted(side["seconds_per_step"][args.warmup:])
    step = (timed[(len(timed) - 1) // 2] + timed[len(timed) // 2]) / 2 if median else sum(timed) / len(timed)
    steady = args.batch_size / step
    trained = args.epochs * need
    return trained / (trained / steady + side.get("reference_pass_s", 0.0))


mem_keys = ["peak_cuda_gb"] if device == "cuda" else ["peak_rss_gb", "rss_over_imports_gb"]
mem_names = {"peak_cuda_gb": "peak CUDA GB", "peak_rss_gb": "peak RSS GB", "rss_over_imports_gb": "over imports GB"}
print(f"\n{device}, {torch.get_num_threads()} threads; torch {version('torch')}, transformers "
      f"{version('transformers')}, peft {version('peft')}, trl {version('trl')}; "
      f"{'bf16 weights + autocast' if device == 'cuda' else 'fp32'}")
print(f"model: {n_params / 1e6:.1f}M params (LM hidden {args.lm_hidden} x {args.lm_layers} layers), 576 image "
      f"tokens, {mean_tokens:.0f} tokens per sequence (step 1); {args.steps} steps of {args.batch_size} pairs, "
      f"samples/s over steps {args.warmup + 1}-{args.steps}; LoRA r {args.lora_r} alpha {args.lora_alpha}\n")
print(f"| side | samples/s (median step) | {' | '.join(mem_names[k] for k in mem_keys)} | step-1 logps/chosen "
      f"| logps/rejected "
      f"| rel. diff. to independent (chosen / rejected) |")
print("|---" * (5 + len(mem_keys)) + "|")
table = {}
for name, r in results.items():
    t = table[name] = {"samples_per_s": samples_per_s(r), "samples_per_s_median": samples_per_s(r, median=True),
                       **{k: r[k] for k in mem_keys},
                       **{k: r[k] for k in ("logps/chosen", "logps/rejected")},
                       **{f"rel_diff_{k}": abs(r[f"logps/{k}"] - ref[f"logps/{k}"]) / abs(ref[f"logps/{k}"])
                          for k in ("chosen", "rejected")},
                       **{k: r[k] for k in ("seconds_per_step", "wall_s", "reference_pass_s") if k in r}}
    print(f"| {name} | {t['samples_per_s']:.3g} ({t['samples_per_s_median']:.3g}) | "
          f"{' | '.join(f'{t[k]:.3f}' for k in mem_keys)} | "
          f"{t['logps/chosen']:.4f} | {t['logps/rejected']:.4f} | "
          f"{t['rel_diff_chosen']:.1e} / {t['rel_diff_rejected']:.1e} |")
print(f"| independent forward | |{' |' * len(mem_keys)} {ref['logps/chosen']:.4f} | {ref['logps/rejected']:.4f} | |")

*ours_sides, trl = table.values()
ratios, limit_of = {}, {}
print(f"\nlimits (bench/limits.py) from these pairs: prefix P = {P:.1f} tokens, answers R = {R:.1f} tokens (EOS "
      f"included); token passes per pair: TRL 6(P+R) = {limits.token_passes(P, R, 'trl'):.0f}, ours 2(P+2R) + "
      f"(P+2R)/{args.epochs} = {limits.token_passes(P, R, 'ours', args.epochs):.0f} (reference once, {args.epochs} "
      f"epochs), 3(P+2R) = {limits.token_passes(P, R, 'ours_every_step'):.0f} (reference every step)")
print("| side | samples/s ours/TRL (median steps) | limit | of the limit (median steps) | peak memory ours/TRL |\n"
      "|---|---|---|---|---|")
for tag, name, ours in zip([t for t in sides if t != "trl"], list(table)[:-1], ours_sides):
    lim = limits.limit(P, R, "ours_every_step" if tag == "ours" else "ours", args.epochs)
    ratio = ours["samples_per_s"] / trl["samples_per_s"]
    ratio_median = ours["samples_per_s_median"] / trl["samples_per_s_median"]
    ratios.update({f"{name}: samples/s ours/TRL": ratio, f"{name}: limit": lim, f"{name}: of the limit": ratio / lim,
                   f"{name}: samples/s ours/TRL, median steps": ratio_median,
                   **{f"{name}: {k} ours/TRL": ours[k] / trl[k] for k in mem_keys},
                   f"{name}: vs independent, max rel. diff.": max(ours["rel_diff_chosen"], ours["rel_diff_rejected"])})
    print(f"| {name} | {ratio:.2f} ({ratio_median:.2f}) | {lim:.2f} | {100 * ratio / lim:.0f}% "
          f"({100 * ratio_median / lim:.0f}%) | "
          f"{' / '.join(f'{ours[k] / trl[k]:.2f}' for k in mem_keys)} |")
tokens = results[list(results)[-1]].get("tokens", {})
print(f"\nTRL's step-1 sequences equal to 03's less BOS, token for token: {tokens.get('equal_less_bos')} of "
      f"{tokens.get('sequences')}" + (f" (first difference: {tokens['first_difference']})"
                                      if tokens.get("first_difference") else ""))
print("\n" + "\n".join(f"{k} = {v:.3g}" for k, v in ratios.items()))
print("goals: samples/s ours/TRL >= 85% of its limit (03's default), peak memory ours/TRL <= 1, ours vs independent "
      "<= 1e-3 in fp32 (bf16 on CUDA is coarser; TRL differs by the BOS it drops)")
with open(out_json, "w") as f:
    json.dump({"args": vars(args), "device": device, "n_params": n_params, "mean_tokens": mean_tokens,
               "P": P, "R": R, "trl_tokens": tokens,
               "sides": table, "independent": ref, "ratios": ratios}, f, indent=1)
print(f"written: {out_json} (logs and outputs in {work})")
