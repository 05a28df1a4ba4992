"""The paper's Fig. 5 on the toy world: as the image is weakened (forward diffusion on the
projector input, common.weaken_images), does the language prior take over?

1. At the slot where the prior wants the partner (the clause right after a present trigger whose
   partner is absent), teacher-forced on the ground-truth caption up to that slot, the log-prob of
   the true next object's word vs the partner's word (same count, same prefix).
2. Greedy captions of the HalBench images: CHAIR_s, CHAIR_i, recall, objects per caption, and how
   often the absent partner is named vs any other absent object.

    python experiments/noise_probe.py --toy toy --out runs/study/noise_probe.json [--steps 0 500 800] [--seeds 0 1 2]
"""
import argparse
import json
import os
import sys

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import generation  # noqa: E402
import loading  # noqa: E402
import data  # noqa: E402
import dist_io  # noqa: E402
from toyworld import World  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--toy", default="toy")
p.add_argument("--questions", default="halbench.jsonl", help="HalBench-style questions, relative to --toy (the study: dev/)")
p.add_argument("--out", required=True)
p.add_argument("--steps", type=int, nargs="+", default=[0, 200, 400, 500, 600, 700, 800, 900, 999])
p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the noise draws")
p.add_argument("--max_new_tokens", type=int, default=72)
p.add_argument("--batch_size", type=int, default=50)
args = p.parse_args()

world = World(os.path.join(args.toy, "world.json"))
model, processor = loading.load_model(os.path.join(args.toy, "model"))
model.eval()
tok = processor.tokenizer
questions = dist_io.read_jsonl(os.path.join(args.toy, args.questions))
images = [data.load_image(os.path.join(args.toy, "images"), q["image"]) for q in questions]
prompts = [q["question"] for q in questions]
scenes = [world.images[q["image"]]["objects"] for q in questions]
truths = [{o["name"] for o in s} for s in scenes]


def clause(o):
    n = o["count"]
    return (f"there is a {o['name']} at the {o['position']} , it is {o['colour']} ." if n == 1 else
            f"there are {world.numbers[n]} {world.plurals[o['name']]} at the {o['position']} , they are {o['colour']} .")


# ---- the probe items: (image, prompt, prefix up to the noun, true noun, partner noun), on the
# HalBench and MM-Vet images (never trained on)
probe = []
extra = sorted(n for n, v in world.images.items() if v["split"] == "mmvet")
probe_images = images + [data.load_image(os.path.join(args.toy, "images"), n) for n in extra]
probe_prompts = prompts + [prompts[k % len(prompts)] for k in range(len(extra))]
for i, objs in enumerate(scenes + [world.images[n]["objects"] for n in extra]):
    names = [o["name"] for o in objs]  # caption order
    for k, o in enumerate(objs):
        partner = world.partners.get(o["name"])
        if partner is None or partner in names or k + 1 >= len(objs):
            continue
        nxt = objs[k + 1]
        lead = "there is a" if nxt["count"] == 1 else f"there are {world.numbers[nxt['count']]}"
        form = (lambda x: x) if nxt["count"] == 1 else (lambda x: world.plurals[x])
        prefix = " ".join([clause(x) for x in objs[:k + 1]] + [lead])
        probe.append((i, prefix, form(nxt["name"]), form(partner)))
print(f"{len(probe)} probe slots (trigger present, partner absent, another object next)")


@torch.no_grad()
def object_logps(step, gen):
    """Mean log-prob of the true and the partner word at the probe slots, and the share of slots
    where the partner is more likely."""
    true_lp, partner_lp = [], []
    for b in range(0, len(probe), args.batch_size):
        batch = probe[b:b + args.batch_size]
        pixels, seqs, where, ids_pair = [], [], [], []
        for i, prefix, t, pw in batch:
            pv, (s,), _ = common.build_sequences(processor, probe_images[i], probe_prompts[i], [prefix + " " + t], 4096)
            pixels.append(pv["pixel_values"])
            seqs.append(s)
            where.append(len(s[0]) - 3)  # predicts the noun (the sequence ends noun, EOS)
            ids_pair.append((tok.convert_tokens_to_ids(t), tok.convert_tokens_to_ids(pw)))
        ids, mask, _ = common.pad_batch(seqs, tok.pad_token_id)
        with common.weaken_images(model, step, "features", gen):
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=torch.cat(pixels)).logits
        lp = logits.float().log_softmax(-1)
        for r, (w, (ti, pi)) in enumerate(zip(where, ids_pair)):
            assert ids[r, w + 1].item() == ti
            true_lp.append(lp[r, w, ti].item())
            partner_lp.append(lp[r, w, pi].item())
    n = max(1, len(true_lp))
    return {"logp_true": sum(true_lp) / n, "logp_partner": sum(partner_lp) / n,
            "partner_wins": sum(pl > tl for tl, pl in zip(true_lp, partner_lp)) / n}


rows = []
for seed in args.seeds:
    gen = torch.Generator().manual_seed(seed)
    for step in tqdm(args.steps, desc=f"noise steps (seed {seed})"):
        clean = [r for r in rows if r["noise_step"] == 0]
        if step == 0 and clean:  # no noise, greedy: the same for every seed
            rows.append({**clean[0], "seed": seed})
            continue
        lp = object_logps(step, gen)
        caps = []
        for b in range(0, len(images), args.batch_size):
            with common.weaken_images(model, step, "features", gen):
                caps += generation.generate(model, processor, images[b:b + args.batch_size], prompts[b:b + args.batch_size],
                                            max_new_tokens=args.max_new_tokens)
        rows.append({"seed": seed, "noise_step": step, **lp, **world.stats(caps, truths), "example": caps[0]})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "example"}))
os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
with open(args.out + ".tmp", "w") as f:
    json.dump({"n_images": len(images), "n_probe_slots": len(probe), "rows": rows}, f, indent=1)
os.replace(args.out + ".tmp", args.out)
