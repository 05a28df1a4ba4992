"""Why the toy world's existence answers name the asked object just before yes/no (docs/toy_world.md): the toy's
language model (00's Llama config), trained from scratch on text alone, asked whether an object is in a list
written before the question, with the answer token predicted at one of three places:

  object    "... the image has cup and fork . Is there a plate in the image? ASSISTANT: plate" -> no
  next      the same, then "?" -> no (one token after the restated object)
  end       "... in the image? ASSISTANT:" -> no (the question's object is 7 tokens back)

It prints the answer token's loss and accuracy (running means) every 100 steps; 0.693 is chance.

    python experiments/matching_probe.py --answer_at object [--system] [--steps 800]
"""
import argparse
import importlib
import math
import os
import random
import sys

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
toy = importlib.import_module("00_make_toy")

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--answer_at", choices=["object", "next", "end"], default="object")
p.add_argument("--system", action="store_true", help="LLaVA-1.5's system line before USER: (as the toy's prompts)")
p.add_argument("--width", type=int, default=64)
p.add_argument("--steps", type=int, default=800)
p.add_argument("--batch", type=int, default=32)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--seed", type=int, default=0)
args = p.parse_args()

toy.seed_all(args.seed)
rng = random.Random(args.seed)
tok = toy.build_processor().tokenizer
model = LlamaForCausalLM(LlamaConfig(
    vocab_size=len(tok), hidden_size=args.width, intermediate_size=2 * args.width, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, bos_token_id=tok.bos_token_id,
    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
yes, no = tok.convert_tokens_to_ids(["yes", "no"])
system = toy.common.VICUNA_SYSTEM + " " if args.system else ""
tail = {"object": " {x}", "next": " {x} ?", "end": ""}[args.answer_at]


def example():
    """(token ids, answer token): a list of 1-4 objects, an object asked about that is in it half the time."""
    seen = rng.sample(toy.OBJECTS, rng.randint(1, 4))
    x = rng.choice(seen) if rng.random() < 0.5 else rng.choice([o for o in toy.OBJECTS if o not in seen])
    text = (f"{system}USER: the image has {' and '.join(seen)} . Is there a {x} in the image? ASSISTANT:"
            + tail.format(x=x))
    return tok(text).input_ids, yes if x in seen else no


opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
warm = 30
sched = torch.optim.lr_scheduler.LambdaLR(
    opt, lambda s: min((s + 1) / warm, 0.5 * (1 + math.cos(math.pi * s / args.steps))))
loss_avg = acc_avg = None
for step in range(1, args.steps + 1):
    batch = [example() for _ in range(args.batch)]
    n = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), n), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, (seq, _) in enumerate(batch):  # left-padded: every answer is predicted at the last position
        ids[i, n - len(seq):], mask[i, n - len(seq):] = torch.tensor(seq), 1
    logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -1]
    target = torch.tensor([t for _, t in batch])
    loss = F.cross_entropy(logits, target)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
    acc = (logits[:, [yes, no]].argmax(-1) == (target == no).long()).float().mean().item()
    loss_avg = loss.item() if loss_avg is None else 0.95 * loss_avg + 0.05 * loss.item()
    acc_avg = acc if acc_avg is None else 0.95 * acc_avg + 0.05 * acc
    if step % 100 == 0:
        print(f"step {step}: loss {loss_avg:.3f}  accuracy {acc_avg:.3f}", flush=True)
