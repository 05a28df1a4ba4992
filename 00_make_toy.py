"""Step 0: an offline toy world in the real formats. Renders a synthetic image world with a known
language prior, builds a tiny LLaVA (word-level tokenizer that knows LLaVA-1.5's conversation; with --arch another
family's tiny model, with its special tokens and chat template: families/), trains it in stages so that it sees but
leans on the prior, writes the ground truth and both benchmarks, and measures the prior: hallucination of clean and
weakened captions (prior_check.json)."""
import cpu_pins

if __name__ == "__main__":  # before torch loads: one world on every x86-64 CPU (cpu_pins.py; imported, 00 cannot pin)
    cpu_pins.pin()

import argparse
import hashlib
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tqdm import tqdm
from transformers import AutoModelForImageTextToText, PreTrainedTokenizerFast

import common
import dist_io
import generation
import scoring
from families import FAMILIES


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=dist_io.HelpFormatter)
    p.add_argument("--out", default="toy", help="output folder (model/, images/, train.json, benchmarks, world.json)")
    p.add_argument("--seed", type=int, default=0, help="seed of the world, the weights and the noise")
    p.add_argument("--p_partner_text", type=float, default=0.99,
                   help="P(partner | trigger) in the text-only caption corpus; 0.63, the image data's, builds a "
                        "control "
                        "world with no excess language prior (the study's)")
    p.add_argument("--quick", action="store_true",
                   help="few images and steps (well under a minute): a weak model, for tests of formats and code paths")
    # The alignment stage is most of the build's time and decides how much of the text's prior survives the images:
    # after the projector's own 300 steps, 500 steps keep it in seed 0 (700 kept less; docs/toy_world.md)
    p.add_argument("--align_steps", type=int, default=None,
                   help="steps of the projector + LM alignment stage (default 500; 40 with --quick)")
    p.add_argument("--lm_width", type=int, default=64, help="hidden size of the tiny Llama (its MLP is twice as wide)")
    p.add_argument("--compare_with", metavar="DIR", default=None,
                   help="a built world of the same seed and another --p_partner_text (make study passes the prior "
                        "world when it builds the control): prior_check.json also records both worlds' clean partner "
                        "rates and their difference, the prior's excess (default: none)")
    p.add_argument("--arch", choices=sorted(FAMILIES), default="llava",
                   help="the model family (its checkpoints' model_type, families/): LLaVA-1.5 (CLIP stand-in, projector, "
                        "Llama) or another family's architecture at the same toy size; the same world and stages")
    return p.parse_args(argv)


def sizes(quick, align_steps=None):
    """Images per set and optimiser steps per stage (full, quick). The study's sets: dev HalBench + POPE, dev
    MM-Vet, a 240-question MM-Vet (one question < 0.5 points), HalBench + POPE on images with clear glyphs only. The
    partner probe: images captioned by the prior check only, for ~900 chances to name an absent partner."""
    if quick:
        n = dict(train=300, text=2000, hal=24, mmvet=12, dev_hal=12, dev_mmvet=12, mmvet_study=12, clear=12, probe=24)
        steps = dict(vision=40, match=40, lm=40, projector=20, joint=40)
    else:
        n = dict(train=3000, text=20000, hal=300, mmvet=60, dev_hal=150, dev_mmvet=120, mmvet_study=240, clear=300,
                 probe=3000)
        steps = dict(vision=400, match=1000, lm=500, projector=300, joint=500)
    if align_steps is not None:
        steps["joint"] = align_steps
    return n, steps


BATCH = 32
NOISE_STEPS = (0, 500, 800)  # weakening levels of the prior check
POPE_TOKENS = 20  # an existence answer lists what the image holds first: "the image has cup and plate , plate yes ."

# ---- the world: glyph kinds, colours, positions (quadrants), and the prior
OBJECTS = ["cup", "plate", "fork", "knife", "apple", "banana", "ball", "book", "bottle", "clock"]
PLURALS = {o: o + "s" for o in OBJECTS} | {"knife": "knives"}
SYNONYMS = {"cup": ["mug"], "plate": ["dish"], "fork": [], "knife": [], "apple": [], "banana": [],
            "ball": [], "book": ["novel"], "bottle": ["flask"], "clock": ["watch"]}
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (60, 100, 240),
           "yellow": (230, 210, 40), "purple": (160, 60, 210), "white": (235, 235, 235)}
POSITIONS = {"top left": (0, 0), "top right": (0, 1), "bottom left": (1, 0), "bottom right": (1, 1)}
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
           "eleven", "twelve"]
PARTNER = {"cup": "plate", "fork": "knife", "apple": "banana", "ball": "book"}  # trigger -> partner
TRIGGER_OF = {v: k for k, v in PARTNER.items()}
FRUITS = ["apple", "banana"]
P_PARTNER_IMAGE = 0.63  # P(partner | trigger) in the image data (the text corpus's: --p_partner_text)
P_FAINT, FAINT_CONTRAST = 0.35, (0.03, 0.25)  # faint glyphs: the ambiguity the prior fills
TEXT_UNSEEN = 0.1  # share of a text scene's objects its word grid leaves out: the text's ambiguity (word_grid)
BACKGROUND, PIXEL_NOISE = (40, 40, 40), 8.0
DESCRIBE = ["Describe the image in detail.", "Provide a thorough description of the given image.",
            "What is this photo about? Please answer in great detail."]
QUESTIONS = {"colour": "What colour is the {obj}?", "count": "How many {objs} are there?",
             "exist": "Is there {a_obj} in the image?", "where": "Where is the {obj}?",
             "what_at": "What is at the {pos}?", "total": "How many objects are there in total?",
             "fruit": "Which fruit is in the image?"}
def words(text):
    """Word-level split as the tokenizer does it: lower case, punctuation as separate words."""
    return re.findall(r"\w+|[^\w\s]", text.lower())


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # The thread count orders the float reductions: torch on 1 thread builds another world (docs/toy_world.md
    # #determinism). Fixed at 2 whatever the machine has (on one core they share it: the same world, slower).
    torch.set_num_threads(2)


# ----------------------------------------------------------------------------- scenes and text


def sample_scene(rng, p_partner, p_faint=P_FAINT):
    """1-3 'units' in at most 4 quadrants; a unit is one kind, or a trigger plus its partner with
    probability p_partner. Triggers need room for a pair and a lone partner bans its trigger, so
    P(partner | trigger) is exactly p_partner."""
    kinds, banned = [], set()
    for _ in range(rng.choice([1, 2, 2, 3, 3])):
        room = 4 - len(kinds)
        if room == 0:
            break
        kind = rng.choice([o for o in OBJECTS if o not in kinds and o not in banned and (o not in PARTNER or room >= 2)])
        kinds.append(kind)
        if kind in PARTNER and rng.random() < p_partner:
            kinds.append(PARTNER[kind])
        elif kind in PARTNER:
            banned.add(PARTNER[kind])
        elif kind in TRIGGER_OF:
            banned.add(TRIGGER_OF[kind])
    positions = rng.sample(list(POSITIONS), len(kinds))
    objs = [{"name": k, "colour": rng.choice(list(COLOURS)), "count": rng.choices([1, 2, 3], [6, 3, 2])[0],
             "position": pos, "faint": rng.random() < p_faint} for k, pos in zip(kinds, positions)]
    return sorted(objs, key=lambda o: OBJECTS.index(o["name"]))  # captions name the kinds in this order


def caption(objs):
    """Kind first, then place and colour: in a trial the tiny LM named the right objects more often
    this way than with "there is a red cup at ..." (CHAIR_s 0.36 vs 0.59) or place-first captions."""
    return " ".join(f"there is a {o['name']} at the {o['position']} , it is {o['colour']} ." if o["count"] == 1 else
                    f"there are {NUMBERS[o['count']]} {PLURALS[o['name']]} at the {o['position']} , they are "
                    f"{o['colour']} ."
                    for o in objs)


def noun_phrase(o):
    return (f"a {o['colour']} {o['name']}" if o["count"] == 1 else
            f"{NUMBERS[o['count']]} {o['colour']} {PLURALS[o['name']]}")


def existence_answer(objs, name):
    """The objects seen, then the asked one restated and the answer: the tiny LM decides well at the asked object's
    own token, matching it against the list it has just written, and not tokens later (docs/toy_world.md)."""
    present = {o["name"] for o in objs}
    return f"the image has {' and '.join(x for x in OBJECTS if x in present)} , {name} {'yes' if name in present else 'no'}"


def article(obj):
    return ("an " if obj[0] in "aeiou" else "a ") + obj


def word_grid(objs, rng, unseen=TEXT_UNSEEN):
    """The text corpus's picture of a scene: a word per 16-px cell, row-major as the image's tokens, the object drawn
    there or "none" (its cells drawn as render draws them); an object is left out, all its cells "none", with
    probability `unseen`, as a faint glyph can be invisible. The text fills in what the grid leaves out by its own
    co-occurrence (--p_partner_text)."""
    grid = ["none"] * 16
    for o in objs:
        qr, qc = POSITIONS[o["position"]]
        cells = rng.sample(range(4), o["count"])
        if rng.random() >= unseen:
            for cell in cells:
                grid[4 * (2 * qr + cell // 2) + 2 * qc + cell % 2] = o["name"]
    return grid


def qa(kind, objs, rng):
    """One short question about the scene: (question, answer as trained, capabilities, MM-Vet answer)."""
    present = {o["name"]: o for o in objs}
    o = present[rng.choice(list(present))]
    if kind == "colour":
        return QUESTIONS[kind].format(obj=o["name"]), o["colour"], ["rec"], o["colour"]
    if kind == "count":
        n = o["count"]
        return QUESTIONS[kind].format(objs=PLURALS[o["name"]]), NUMBERS[n], ["rec", "math"], f"{NUMBERS[n]} <OR> {n}"
    if kind == "exist":  # half present; absent ones are mostly the missing partner of a present trigger
        lures = [PARTNER[t] for t in present if t in PARTNER and PARTNER[t] not in present]
        absent = [x for x in OBJECTS if x not in present]
        name = o["name"] if rng.random() < 0.5 else rng.choice(lures if lures and rng.random() < 0.7 else absent)
        a = "yes" if name in present else "no"
        return QUESTIONS[kind].format(a_obj=article(name)), \
            existence_answer(objs, name), ["rec"], a
    if kind == "where":
        return QUESTIONS[kind].format(obj=o["name"]), o["position"], ["spat"], o["position"]
    if kind == "what_at":
        pos = rng.choice(list(POSITIONS))
        at = [x for x in objs if x["position"] == pos]
        return (QUESTIONS[kind].format(pos=pos), noun_phrase(at[0]) if at else "nothing", ["rec", "spat"],
                at[0]["name"] if at else "nothing")
    if kind == "total":
        n = sum(x["count"] for x in objs)
        return QUESTIONS[kind], NUMBERS[n], ["math"], f"{NUMBERS[n]} <OR> {n}"
    fruits = [f for f in FRUITS if f in present]
    return QUESTIONS[kind], " and ".join(fruits) or "none", ["rec", "know"], " <AND> ".join(fruits) or "none"


# the toy's sizes: a 64 px image is 16 tokens (one per 16 px cell), a 4-layer LM of --lm_width; what differs by family
TOY_SIZES = dict(lm_layers=4, lm_heads=4, lm_kv_heads=4, vision_hidden=96, vision_layers=3, vision_mlp=192,
                 vision_heads=4, image_size=64, patch_size=16)
TOY_FAMILY_SIZES = {  # 8 px patches where 2 x 2 of them make one token (Qwen's merger, Gemma's pooling)
    "qwen2_vl": dict(patch_size=8), "qwen2_5_vl": dict(patch_size=8), "qwen3_vl": dict(patch_size=8),
    # a window of 16 positions on every other layer: shorter than a caption, so the window is exercised
    "gemma3": dict(patch_size=8, image_tokens=16, sliding_window=16, full_every=2, lm_kv_heads=2)}


def toy_sizes(arch, width):
    return {**TOY_SIZES, "lm_hidden": width, "lm_mlp": 2 * width, **TOY_FAMILY_SIZES.get(arch, {})}


def vocabulary(arch="llava"):
    """Every word the world can say or ask, independent of the sampled data, and the family's conversation."""
    texts = OBJECTS + list(PLURALS.values()) + list(COLOURS) + list(POSITIONS) + NUMBERS + DESCRIBE
    texts += [re.sub(r"\{\w+\}", "", q) for q in QUESTIONS.values()]
    texts += ["there is are a an at the it they and yes no nothing none has , .", FAMILIES[arch].conversation_text]
    return list(FAMILIES[arch].special_tokens) + sorted({w for t in texts for w in words(t)})


# ----------------------------------------------------------------------------- rendering


def draw_glyph(d, kind, x, y, c):
    """A 16x16 pictogram with its top-left corner at (x, y)."""
    box = lambda a, b, e, f: d.rectangle([x + a, y + b, x + e, y + f], fill=c)
    ring = lambda a, b, e, f, w=2: d.ellipse([x + a, y + b, x + e, y + f], outline=c, width=w)
    if kind == "cup":
        box(3, 5, 10, 13); d.rectangle([x + 10, y + 7, x + 13, y + 11], outline=c, width=2)
    elif kind == "plate":
        ring(1, 4, 14, 11)
    elif kind == "fork":
        box(7, 7, 8, 14); box(4, 5, 11, 6); [box(t, 1, t, 5) for t in (4, 7, 8, 11)]
    elif kind == "knife":
        d.polygon([(x + 6, y + 1), (x + 10, y + 2), (x + 10, y + 9), (x + 6, y + 9)], fill=c); box(7, 10, 9, 14)
    elif kind == "apple":
        d.ellipse([x + 2, y + 4, x + 13, y + 14], fill=c); box(7, 1, 8, 4); box(9, 2, 11, 3)
    elif kind == "banana":
        d.arc([x, y - 6, x + 15, y + 12], start=15, end=165, fill=c, width=4)
    elif kind == "ball":
        ring(2, 2, 13, 13); box(2, 7, 13, 8)
    elif kind == "book":
        d.rectangle([x + 2, y + 3, x + 13, y + 12], outline=c, width=2); box(7, 3, 8, 12)
    elif kind == "bottle":
        box(5, 6, 10, 14); box(7, 1, 8, 6)
    else:  # clock
        ring(1, 1, 14, 14, 1); box(7, 3, 7, 7); box(7, 7, 11, 7)


def render(objs, rng):
    """The image and its per-patch labels (4x4 grid, 16-px cells): object class and colour, 0 = none."""
    img = Image.new("RGB", (64, 64), BACKGROUND)
    d = ImageDraw.Draw(img)
    cls, col = np.zeros(16, np.int64), np.zeros(16, np.int64)
    for o in objs:
        qr, qc = POSITIONS[o["position"]]
        rgb = COLOURS[o["colour"]]
        if o["faint"]:  # low contrast over the background, still named in the caption
            a = rng.uniform(*FAINT_CONTRAST)
            rgb = tuple(int(b + a * (v - b)) for b, v in zip(BACKGROUND, rgb))
        for cell in rng.sample(range(4), o["count"]):
            r, c = 2 * qr + cell // 2, 2 * qc + cell % 2
            draw_glyph(d, o["name"], 16 * c + rng.randint(-1, 1), 16 * r + rng.randint(-1, 1), rgb)
            cls[4 * r + c], col[4 * r + c] = 1 + OBJECTS.index(o["name"]), 1 + list(COLOURS).index(o["colour"])
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, PIXEL_NOISE, (64, 64, 3))
    img = Image.fromarray(np.clip(np.asarray(img, np.float32) + noise, 0, 255).astype(np.uint8))
    return img, cls, col


def make_images(prefix, n, rng, image_dir, p_faint=P_FAINT):
    """n scenes drawn from the image distribution (p_faint 0: every glyph clear), rendered and saved as PNG (image_dir
    None: kept in memory only)."""
    names, scenes, imgs, cls, col = [], [], [], [], []
    for i in tqdm(range(n), desc=f"render {prefix}"):
        objs = sample_scene(rng, P_PARTNER_IMAGE, p_faint)
        img, c, k = render(objs, rng)
        name = f"{prefix}_{i:05d}.png"
        if image_dir:
            img.save(image_dir / name)
        names.append(name); scenes.append(objs); imgs.append(img); cls.append(c); col.append(k)
    return names, scenes, imgs, np.stack(cls), np.stack(col)


def partner_rate(scenes):
    with_trigger = [(t, {o["name"] for o in s}) for s in scenes for t in PARTNER if t in {o["name"] for o in s}]
    return sum(PARTNER[t] in names for t, names in with_trigger) / max(1, len(with_trigger))


def mmvet_questions(names, scenes, rng, prefix="v1"):
    """One question an image, the question kinds in turn, in MM-Vet's format."""
    mmvet = {}
    for i, (name, objs) in enumerate(zip(names, scenes)):
        q, _, caps, short = qa(list(QUESTIONS)[i % len(QUESTIONS)], objs, rng)
        mmvet[f"{prefix}_{i}"] = {"imagename": name, "capability": caps, "question": q, "answer": short}
    return mmvet


def write_halbench(folder, names, scenes, train_scenes, pope_rng):
    """A HalBench-style set (description prompts; objects present per image) and POPE's splits over its images
    (returned: {split: records})."""
    (folder / "pope").mkdir(parents=True, exist_ok=True)
    with open(folder / "halbench.jsonl", "w") as f:
        for i, name in enumerate(names):
            f.write(json.dumps({"question_id": i, "image": name, "question": DESCRIBE[i % len(DESCRIBE)]}) + "\n")
    (folder / "halbench_objects.json").write_text(json.dumps({n: [o["name"] for o in s] for n, s in zip(names, scenes)},
                                                             indent=1))
    splits = pope_splits(names, scenes, train_scenes, pope_rng)
    for split, records in splits.items():
        (folder / "pope" / f"coco_pope_{split}.json").write_text("".join(json.dumps(r) + "\n" for r in records))
    return splits


def write_study_sets(out, seed, train_scenes, n):
    """The study's sets, on new images from their own random stream: dev/ (HalBench, POPE, MM-Vet) for choosing
    hyperparameters, mmvet_study.json (the test MM-Vet of the study), clear/ (HalBench, POPE on images whose
    glyphs are all clear: the prior's error is refutable there). Returns {set: (names, scenes)}."""
    rng = random.Random(f"study{seed}")
    sets = {}
    sets["dev_halbench"] = make_images("dev", n["dev_hal"], rng, out / "images")[:2]
    write_halbench(out / "dev", *sets["dev_halbench"], train_scenes, rng)
    sets["dev_mmvet"] = make_images("devmm", n["dev_mmvet"], rng, out / "images")[:2]
    (out / "dev" / "mmvet.json").write_text(json.dumps(mmvet_questions(*sets["dev_mmvet"], rng, "dev"), indent=1))
    sets["mmvet_study"] = make_images("mmstudy", n["mmvet_study"], rng, out / "images")[:2]
    (out / "mmvet_study.json").write_text(json.dumps(mmvet_questions(*sets["mmvet_study"], rng, "st"), indent=1))
    sets["clear_halbench"] = make_images("clear", n["clear"], rng, out / "images", p_faint=0.0)[:2]
    write_halbench(out / "clear", *sets["clear_halbench"], train_scenes, rng)
    return sets


WILD_RULE = ("Two AI assistants answered the question above about an image, which the context describes. Rate {what} "
             "of each answer on a scale of 1 to 10 (higher is better). On the first line write only the two scores, "
             "Assistant 1's then Assistant 2's, separated by a space; below it explain briefly, and do not let the "
             "order of the answers sway you.")


def write_llavabench(folder, seed, n_images=24):
    """A toy LLaVA-Bench in-the-Wild in the published formats, on new images rendered with its own
    random stream (nothing else in the world moves): per image a conv question (a short one), a
    detail question (a description prompt) and a complex one (a total or the fruit), the ground
    truth as the reference answers (answers_gpt4.jsonl; not GPT-4's) and the caption as the context;
    rule.json in LLaVA's structure, with this repo's own wording."""
    rng = random.Random(f"llavabench{seed}")
    (folder / "images").mkdir(parents=True, exist_ok=True)
    names, scenes, _, _, _ = make_images("llavabench", n_images, rng, folder / "images")
    questions, references = [], []
    for i, (name, objs) in enumerate(zip(names, scenes)):
        conv = qa(["colour", "count", "exist", "where", "what_at"][i % 5], objs, rng)[:2]
        complex_ = qa(["total", "fruit"][i % 2], objs, rng)[:2]
        for category, (q, a) in [("conv", conv), ("detail", (DESCRIBE[i % len(DESCRIBE)], caption(objs))),
                                 ("complex", complex_)]:
            questions.append({"question_id": len(questions), "image": name, "text": q, "category": category})
            references.append({"question_id": len(references), "text": a if category == "detail" else f"{a} ."})
    jsonl = lambda records: "".join(json.dumps(r) + "\n" for r in records)
    (folder / "questions.jsonl").write_text(jsonl(questions))
    (folder / "answers_gpt4.jsonl").write_text(jsonl(references))
    (folder / "context.jsonl").write_text(jsonl({"image": n, "caption": [caption(s)]} for n, s in zip(names, scenes)))
    what = {"conv": "the helpfulness, relevance and accuracy", "detail": "the accuracy and level of detail",
            "complex": "the accuracy and reasoning"}
    rule = {f"llava_bench_{c}": {"role": "Assistant", "prompt": WILD_RULE.format(what=w)} for c, w in what.items()}
    (folder / "rule.json").write_text(json.dumps(rule, indent=1))


# ----------------------------------------------------------------------------- model


def word_tokenizer(words_, specials, **kw):
    """A word-level tokenizer over words_ (lower case, punctuation split off; specials kept whole)."""
    vocab = {w: i for i, w in enumerate(words_)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    bos = kw.get("bos_token")
    if bos:
        tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                          special_tokens=[(bos, vocab[bos])])
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # words joined by spaces: "red ." stays "red ."
    tk.add_special_tokens([AddedToken(w, special=True) for w in specials])
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", padding_side="left",
                                   clean_up_tokenization_spaces=False, **kw)


def build_processor(arch, sizes):
    family = FAMILIES[arch]
    tok = word_tokenizer(vocabulary(arch), family.special_tokens, **family.tokenizer_tokens)
    tok.chat_template = family.chat_template
    return family.processor_for(tok, sizes)


def build_model(processor, sizes, arch):
    family, tok = FAMILIES[arch], processor.tokenizer
    model = AutoModelForImageTextToText.from_config(family.config_for(tok, sizes))
    g = model.generation_config
    g.pad_token_id, g.bos_token_id, g.eos_token_id = tok.pad_token_id, tok.bos_token_id, family.eos_token_id(tok)
    return model


class Pixels:
    """The training images' processor inputs (the family's image inputs), indexable by a list of image indices."""

    def __init__(self, processor, images, family):
        enc = processor.image_processor(images, return_tensors="pt")
        self.family, self.images = family, family.split_images({k: enc[k] for k in family.vision_keys})

    def __len__(self):
        return len(self.images)

    def __getitem__(self, idx):
        return self.family.cat_images([self.images[i] for i in idx])


# ----------------------------------------------------------------------------- POPE


def pope_splits(names, scenes, train_scenes, rng):
    """POPE's three splits over these images, as published (records of JSON lines): per image up to 3
    present objects (label yes; the same ones in every split), each followed by an absent one (label
    no): random; popular = the most frequent in the training images; adversarial = the missing prior
    partner of a present trigger, then the objects that co-occur most with the present ones in the
    training images. Ties go to OBJECTS order."""
    train_sets = [{o["name"] for o in s} for s in train_scenes]
    freq = {x: sum(x in s for s in train_sets) for x in OBJECTS}
    splits = {"random": [], "popular": [], "adversarial": []}
    for name, objs in zip(names, scenes):
        present = [x for x in OBJECTS if x in {o["name"] for o in objs}]
        absent = [x for x in OBJECTS if x not in present]
        yes = rng.sample(present, min(3, len(present)))
        lures = [PARTNER[t] for t in present if t in PARTNER and PARTNER[t] not in present]
        cooc = {x: sum(x in s and g in s for s in train_sets for g in present) for x in absent}
        no = {"random": rng.sample(absent, len(yes)),
              "popular": sorted(absent, key=lambda x: -freq[x])[:len(yes)],
              "adversarial": (lures + sorted([x for x in absent if x not in lures], key=lambda x: -cooc[x]))[:len(yes)]}
        for split, records in splits.items():
            for obj, label in [q for y, n in zip(yes, no[split]) for q in ((y, "yes"), (n, "no"))]:
                records.append({"question_id": len(records) + 1, "image": name, "label": label,
                                "text": QUESTIONS["exist"].format(a_obj=article(obj))})
    return splits


# ----------------------------------------------------------------------------- training


def encode_items(processor, items, fmt, family, grids=None, image_token=None):
    """(index, question, answer) -> (index, input_ids, labels) with the token convention of common.py: chat prompt
    with the image tokens, answer + the family's EOS scored. With grids (the text corpus), index names the item's
    word grid, whose 16 words take the places of the image tokens (image_token) in order ("none" for any beyond 16: LLaVA-NeXT's tiles)."""
    tok = processor.tokenizer
    cache, out = {}, []
    for i, q, a in items:
        if q not in cache:  # few distinct questions: tokenise each prompt once
            text = common.chat_prompt(processor, q, fmt)
            ids = family.encode(processor, [text], [Image.new("RGB", (64, 64))])["input_ids"][0].tolist()
            cache[q] = (text, ids)
        text, ids = cache[q]
        if grids is not None:
            cells = iter(tok.convert_tokens_to_ids(grids[i]))
            ids = [next(cells, tok.convert_tokens_to_ids("none")) if t == image_token else t for t in ids]
        resp = common.response_ids(tok, text, a, family.eos_token_id(tok))
        out.append((i, ids + resp, [common.IGNORE] * len(ids) + resp))
    assert all(tok.unk_token_id not in ids for _, ids, _ in out), "a word is missing from the vocabulary"
    return out


def sampler(n, rng):
    """Endless random batches of indices, reshuffled each epoch."""
    while True:
        order = rng.sample(range(n), n)
        yield from (order[i:i + BATCH] for i in range(0, n - BATCH + 1, BATCH))


def image_loss(model, batch, pixels):
    ids, mask, labels = common.pad_batch([(s[1], s[2]) for s in batch], pad_id=model.config.text_config.pad_token_id)
    vision = pixels[[s[0] for s in batch]]  # and which tokens are the image's, where the family's forward needs it
    return model(input_ids=ids, attention_mask=mask, labels=labels, **vision,
                 **pixels.family.token_types(ids, model.config)).loss


def text_loss(model, batch):
    ids, mask, labels = common.pad_batch([(s[1], s[2]) for s in batch], pad_id=model.config.text_config.pad_token_id)
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


def train(groups, steps, loss_fn, desc):
    """AdamW, 5% warmup then cosine; groups: [(parameters, peak learning rate)], and only those move."""
    groups = [{"params": list(params), "lr": lr} for params, lr in groups]
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    bar = tqdm(range(steps), desc=desc)
    for _ in bar:
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")


def train_vision(model, pixels, cls, col, rng, steps):
    """Stands in for a pretrained vision encoder: from the features the language model's side reads, one per 16 px
    cell (the family's cell_features: LLaVA's layer -2, CLS dropped; Qwen's merged cells), a temporary linear head
    (thrown away) predicts each cell's object class, colour and place in the grid, so that the features say what is
    where."""
    family = pixels.family
    vt = family.pixel_module(model)[0]
    sizes = [1 + len(OBJECTS), 1 + len(COLOURS), 16]
    head = torch.nn.Linear(family.cell_dim(model.config), sum(sizes))
    batches, cls, col = sampler(len(pixels), rng), torch.from_numpy(cls), torch.from_numpy(col)

    def loss_fn():
        b = next(batches)
        logits = head(family.cell_features(model, pixels[b])).split(sizes, dim=-1)
        targets = (cls[b], col[b], torch.arange(16).expand(len(b), 16))
        return sum(F.cross_entropy(l.flatten(0, 1), t.flatten()) for l, t in zip(logits, targets))
    train([(list(vt.parameters()) + list(head.parameters()), 2e-3)], steps, loss_fn, "a) vision")


def set_trainable(model, *params):
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------- prior check


def synonym_lines():
    """synonyms.txt's lines (class, plural, synonyms): the toy HalBench's table, and the prior check's."""
    return [", ".join([o, PLURALS[o]] + SYNONYMS[o]) for o in OBJECTS]


def clauses(text):
    """{object: (count, colour)} of the first clause naming each object in a caption of the world's grammar
    ("there is a cup at the top left , it is red ." / "there are two cups at ... , they are red .")."""
    pos = "|".join(POSITIONS)
    singular = {PLURALS[o]: o for o in OBJECTS}
    found = {}
    for m in re.finditer(rf"there is an? (\w+) at the (?:{pos}) , it is (\w+) \.|"
                         rf"there are (\w+) (\w+) at the (?:{pos}) , they are (\w+) \.", " ".join(text.split())):
        name, count, colour = (m[1], 1, m[2]) if m[1] else (singular.get(m[4]), NUMBERS.index(m[3])
                                                            if m[3] in NUMBERS else None, m[5])
        found.setdefault(name, (count, colour))
    return found


def prior_stats(captions, scenes, chair):
    """CHAIR_s, recall and objects per caption (fractions) of captions against their scenes; the rate at which
    an absent object is named: the missing partner of a present trigger vs. any other absent object; and of the
    named objects that are present, the share whose colour and whose count the caption gets right."""
    rows, named, colour_right, count_right = [], 0, 0, 0
    for cap, objs in zip(captions, scenes):
        truth, said, told = {o["name"] for o in objs}, chair.classes(cap), clauses(cap)
        lures = {PARTNER[t] for t in truth if t in PARTNER}
        rows.append(scoring.hallucination_counts(sorted(said), truth, lures, OBJECTS))
        for o in objs:
            if o["name"] in said:
                count, colour = told.get(o["name"], (None, None))
                named, colour_right, count_right = named + 1, colour_right + (colour == o["colour"]), \
                    count_right + (count == o["count"])
    counts = scoring.sum_counts(rows)
    rates = scoring.hallucination_rates(counts, scale=1)
    return {**{k: rates[k] for k in ("chair_s", "partner_rate", "other_absent_rate", "recall", "objects_per_caption")},
            "colour_accuracy": colour_right / max(1, named), "count_accuracy": count_right / max(1, named),
            "n_partner_chances": counts["partner_chances"]}


def captions(model, processor, imgs, prompts, fmt, noise_step=0, gen=None):
    """Greedy captions (64 tokens) of imgs, the image features weakened to noise_step."""
    caps = []
    for i in tqdm(range(0, len(imgs), 50), desc=f"captions t={noise_step}"):
        with common.weaken_images(model, noise_step, "features", gen):
            caps += generation.generate(model, processor, imgs[i:i + 50], prompts[i:i + 50], fmt, max_new_tokens=64)
    return caps


def prior_check(model, processor, names, imgs, scenes, prompts, pope, probe, seed, fmt):
    """prior_stats of greedy captions at each of NOISE_STEPS (the features weakened), the first five captions,
    the clean model's POPE (random and adversarial; rates as fractions) on the same images, and prior_stats of clean
    captions of the probe's images (imgs, scenes)."""
    chair = scoring.Chair(scoring.synonym_table("\n".join(synonym_lines())))
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    rows, examples = [], {}
    for t in NOISE_STEPS:
        caps = captions(model, processor, imgs, prompts, fmt, t, gen)
        rows.append({"noise_step": t, **prior_stats(caps, scenes, chair)})
        examples[str(t)] = caps[:5]
    image_of, yes_no = dict(zip(names, imgs)), {}
    for split in ("random", "adversarial"):
        recs, said = pope[split], []
        for i in tqdm(range(0, len(recs), 64), desc=f"prior check POPE {split}"):
            said += generation.generate(model, processor, [image_of[r["image"]] for r in recs[i:i + 64]],
                                        [r["text"] for r in recs[i:i + 64]], fmt, max_new_tokens=POPE_TOKENS)
        scores = scoring.pope_metrics([r["label"] for r in recs], said)
        yes_no[split] = {k: v if k == "n" else v / 100 for k, v in scores.items()}
    probe_imgs, probe_scenes = probe
    probe_caps = captions(model, processor, probe_imgs, [DESCRIBE[i % len(DESCRIBE)] for i in range(len(probe_imgs))],
                          fmt)
    return rows, examples, yes_no, {"n_images": len(probe_imgs), **prior_stats(probe_caps, probe_scenes, chair)}


# what a base model worth judging the method on must show (floors) and should (goals); the build records each
FLOORS = {"clean chair_s <= 0.35": lambda r, p: r[0]["chair_s"] <= 0.35,
          "clean recall >= 0.85": lambda r, p: r[0]["recall"] >= 0.85,
          "clean partner rate >= 3 x other absent": lambda r, p: r[0]["partner_rate"] >= 3 * r[0]["other_absent_rate"],
          "partner rate at t=500 above clean": lambda r, p: r[1]["partner_rate"] > r[0]["partner_rate"],
          "POPE random accuracy >= 0.75": lambda r, p: p["random"]["accuracy"] >= 0.75}
GOALS = {"clean colour right >= 0.5": lambda r, p: r[0]["colour_accuracy"] >= 0.5,
         "clean count right >= 0.5": lambda r, p: r[0]["count_accuracy"] >= 0.5,
         "POPE random accuracy >= 0.85": lambda r, p: p["random"]["accuracy"] >= 0.85,
         "POPE random yes-ratio in 0.40-0.65": lambda r, p: 0.40 <= p["random"]["yes_ratio"] <= 0.65}


def checks(rows, pope):
    """{"floors": {check: passed}, "goals": {check: passed}} of a prior check (rows at NOISE_STEPS, POPE)."""
    return {kind: {name: bool(test(rows, pope)) for name, test in tests.items()}
            for kind, tests in (("floors", FLOORS), ("goals", GOALS))}


def world_hash(out):
    """The world's short name: the first 12 hex digits of the sha256 of its weights (one seed, one hash, on every
    x86-64 CPU: cpu_pins.py)."""
    return hashlib.sha256((Path(out) / "model" / "model.safetensors").read_bytes()).hexdigest()[:12]


def other_world(folder, seed, quick, p_partner_text):
    """--compare_with's world: (its text co-occurrence, its prior_check.json), checked before the build; a one-line
    error when it is not a complete world of this seed and size with another text co-occurrence."""
    try:
        world, check = (dist_io.read_json(Path(folder) / f) for f in ("world.json", "prior_check.json"))
    except (OSError, dist_io.DataError) as e:
        sys.exit(f"error: --compare_with {folder}: not a complete toy world ({e})")
    if (world["seed"], world["quick"]) != (seed, quick):
        sys.exit(f"error: --compare_with {folder}: seed {world['seed']}{' --quick' * world['quick']}, this build seed "
                 f"{seed}{' --quick' * quick}: the excess compares worlds of the same images")
    if world.get("p_partner_text", p_partner_text) == p_partner_text:  # absent: a world built before the flag
        sys.exit(f"error: --compare_with {folder}: built with the same --p_partner_text {p_partner_text}, or before "
                 "the flag existed")
    if "partner_probe" not in check:
        sys.exit(f"error: --compare_with {folder}: its prior check has no partner probe (built before it): rebuild it")
    return world["p_partner_text"], check


def prior_excess(this, other):
    """Both worlds' clean partner rates on the partner probe (the prior world: the larger text co-occurrence) and the
    difference, prior minus control: how much more often the text prior makes the base name an absent partner.
    this/other: (folder, --p_partner_text, prior_check dict)."""
    prior, control = sorted([this, other], key=lambda w: -w[1])
    rate = lambda w: w[2]["partner_probe"]["partner_rate"]
    return {"prior": {"world": str(prior[0]), "p_partner_text": prior[1], "partner_rate": rate(prior)},
            "control": {"world": str(control[0]), "p_partner_text": control[1], "partner_rate": rate(control)},
            "difference": rate(prior) - rate(control)}


def failed_floors(path):
    """The floors a built world's prior_check.json fails (make demo and make study print them)."""
    with open(path) as f:
        return [name for name, ok in json.load(f).get("checks", {}).get("floors", {}).items() if not ok]


def main(argv=None):
    args = parse_args(argv)
    other = other_world(args.compare_with, args.seed, args.quick, args.p_partner_text) if args.compare_with else None
    n, steps = sizes(args.quick, args.align_steps)
    t0 = time.time()
    seed_all(args.seed)
    rng = random.Random(args.seed)
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "prior_check.json").unlink(missing_ok=True)  # written last: it marks a complete world (make demo)

    # ---- world: image sets (train / MM-Vet / HalBench) and the text-only caption corpus
    train_names, train_scenes, train_imgs, patch_cls, patch_col = make_images("train", n["train"], rng, out / "images")
    hal_names, hal_scenes, hal_imgs, _, _ = make_images("hal", n["hal"], rng, out / "images")
    mm_names, mm_scenes, mm_imgs, _, _ = make_images("mmvet", n["mmvet"], rng, out / "images")
    text_scenes = [sample_scene(rng, args.p_partner_text) for _ in range(n["text"])]

    train_records, items = [], []  # LLaVA conversations; (image index, question, answer) to train on
    for i, (name, objs) in enumerate(zip(train_names, train_scenes)):
        turns = [(rng.choice(DESCRIBE), caption(objs))]
        # two existence questions an image beside 1-2 others: the tiny LM learns them only from many examples
        for kind in rng.sample([k for k in QUESTIONS if k != "exist"], rng.choice([1, 2])) + ["exist"] * 2:
            q, a, _, _ = qa(kind, objs, rng)
            turns.append((q, f"{a} ."))
        conv = []
        for t, (q, a) in enumerate(turns):
            conv += [{"from": "human", "value": f"<image>\n{q}" if t == 0 else q}, {"from": "gpt", "value": a}]
            items.append((i, q, a))
        train_records.append({"id": f"toy_{i:05d}", "image": name, "conversations": conv})

    mmvet = mmvet_questions(mm_names, mm_scenes, rng)
    hal_prompts = [DESCRIBE[i % len(DESCRIBE)] for i in range(n["hal"])]

    # ---- model: processor (tokenizer + image processor + template) and a tiny LLaVA (or the family's model)
    family, arch_sizes = FAMILIES[args.arch], toy_sizes(args.arch, args.lm_width)
    processor = build_processor(args.arch, arch_sizes)
    model = build_model(processor, arch_sizes, args.arch)
    fmt = family.input_format
    print(f"vocabulary {len(processor.tokenizer)} words, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
          f"parameters")
    pixels = Pixels(processor, train_imgs, family)
    image_items = encode_items(processor, items, fmt, family)
    # the text corpus: a description of every scene, and for half of them an existence answer (present or not, half
    # each), so the list matching is learnt from text too (the prior's co-occurrences in both); each in the images'
    # conversation with the scene's word grid in the image's place, so the prior is learnt where captions are written
    asked = [rng.choice(s)["name"] if rng.random() < 0.5 else rng.choice([x for x in OBJECTS if x not in
             {o["name"] for o in s}]) for s in text_scenes[:n["text"] // 2]]
    grids = [word_grid(s, rng) for s in text_scenes]
    as_text = dict(grids=grids, image_token=family.image_token_id(model.config))
    exist_items = encode_items(processor, [(k, QUESTIONS["exist"].format(a_obj=article(x)), f"{existence_answer(s, x)} .")
                                           for k, (s, x) in enumerate(zip(text_scenes, asked))], fmt, family, **as_text)
    text_items = encode_items(processor, [(k, rng.choice(DESCRIBE), caption(s)) for k, s in enumerate(text_scenes)],
                              fmt, family, **as_text) + exist_items

    # ---- stages: a) vision, b) list matching, then the language prior, c) alignment (projector, then projector + LM)
    model.train()
    train_vision(model, pixels, patch_cls, patch_col, rng, steps["vision"])
    lm = [*model.model.language_model.parameters(), *model.lm_head.parameters()]
    # the existence answers' check (is the restated object in the list?) alone first: within the world's mix the
    # LM learnt it in some seeds only; alone, 500 steps left seed 1's control at 74% right (its POPE 5.7 points under
    # its prior world's), 1000 steps at 100% (docs/toy_world.md)
    exist_batches = sampler(len(exist_items), rng)
    train([(set_trainable(model, *lm), 1e-3)], steps["match"],
          lambda: text_loss(model, [exist_items[j] for j in next(exist_batches)]), "b0) list matching")
    txt_batches, img_batches = sampler(len(text_items), rng), sampler(len(image_items), rng)
    next_text = lambda: text_loss(model, [text_items[j] for j in next(txt_batches)])
    next_image = lambda: image_loss(model, [image_items[j] for j in next(img_batches)], pixels)
    train([(set_trainable(model, *lm), 2e-3)], steps["lm"], next_text, "b) language prior")
    projector = family.projector_parameters(model)
    train([(set_trainable(model, *projector), 2e-3)], steps["projector"], next_image, "c1) projector")
    # the LM moves 6x slower than the projector while the images teach it: as LLaVA's, a language model pretrained
    # on far more text than the brief alignment that follows, so the prior survives it (docs/toy_world.md)
    trainable, is_projector = set_trainable(model, *projector, *lm), {id(p) for p in projector}
    train([([p for p in trainable if id(p) in is_projector], 3e-3), ([p for p in trainable if id(p) not in is_projector],
                                                                     5e-4)],
          steps["joint"], lambda: next_image() + next_text(), "c2) projector + LM, text replayed 1:1")
    model.requires_grad_(True)
    model.eval()

    # ---- write: checkpoint, ground truth, benchmarks, world
    model.save_pretrained(out / "model")
    family.save_processor(processor, out / "model")
    (out / "train.json").write_text(json.dumps(train_records, indent=1))
    (out / "mmvet.json").write_text(json.dumps(mmvet, indent=1))
    # POPE over the HalBench images, its own random stream: nothing else moves
    pope = write_halbench(out, hal_names, hal_scenes, train_scenes, random.Random(f"pope{args.seed}"))
    write_llavabench(out / "llavabench", args.seed)
    (out / "synonyms.txt").write_text("".join(line + "\n" for line in synonym_lines()))
    sets = {"train": (train_names, train_scenes), "halbench": (hal_names, hal_scenes), "mmvet": (mm_names, mm_scenes),
            **write_study_sets(out, args.seed, train_scenes, n)}
    world = {"seed": args.seed, "quick": args.quick, "objects": OBJECTS, "plurals": PLURALS, "colours": list(COLOURS),
             "numbers": NUMBERS, "positions": list(POSITIONS), "partners": PARTNER, "fruits": FRUITS,
             "describe_prompts": DESCRIBE, "questions": QUESTIONS, "vocabulary": vocabulary(args.arch),
             "p_partner_text": args.p_partner_text,
             "p_partner": {"text": partner_rate(text_scenes), **{k: partner_rate(v[1]) for k, v in sets.items()}},
             "faint_share": P_FAINT, "faint_contrast": FAINT_CONTRAST,
             "images": {n: {"split": k, "caption": caption(s), "objects": s} for k, v in sets.items() for n, s in zip(*v)}}
    (out / "world.json").write_text(json.dumps(world, indent=1))
    print(f"wrote {out} ({time.time() - t0:.0f} s); P(partner | trigger): {world['p_partner']}")
    digest = world_hash(out)
    print(f"world hash {digest} (torch kernels {torch.backends.cpu.get_cpu_capability()}; "
          + ", ".join(f"{k}={os.environ.get(k, 'unset')}" for k in cpu_pins.PINS if k != "ATEN_CPU_CAPABILITY") + ")")

    # ---- measure the prior: clean and weakened captions of the HalBench images
    # and the partner rate on many more chances (the partner probe): new images of the same distribution, their own
    # random stream, captioned here only. HalBench's 66-92 chances leave a partner rate's standard error near 4.5
    # points, and a difference of two worlds' near the excess rule's 5 (docs/toy_world.md)
    _, probe_scenes, probe_imgs, _, _ = make_images("probe", n["probe"], random.Random(f"probe{args.seed}"), None)
    rows, examples, yes_no, partner_probe = prior_check(model, processor, hal_names, hal_imgs, hal_scenes, hal_prompts,
                                                        pope, (probe_imgs, probe_scenes), args.seed, fmt)
    verdicts = checks(rows, yes_no)
    check = {"world_hash": digest, "noise_on": "features", "n_images": n["hal"], "rows": rows, "pope": yes_no,
             "partner_probe": partner_probe, "checks": verdicts, "examples": examples}
    if other:
        check["prior_excess"] = prior_excess((out, args.p_partner_text, check), (args.compare_with, *other))
    (out / "prior_check.json").write_text(json.dumps(check, indent=1))
    print(f"{'step':>5} {'CHAIR_s':>8} {'partner':>8} {'other':>8} {'recall':>7} {'obj/cap':>8} {'colour':>7} "
          f"{'count':>6}")
    for r in rows:
        print(f"{r['noise_step']:>5} {r['chair_s']:>8.3f} {r['partner_rate']:>8.3f} {r['other_absent_rate']:>8.3f} "
              f"{r['recall']:>7.3f} {r['objects_per_caption']:>8.2f} {r['colour_accuracy']:>7.3f} "
              f"{r['count_accuracy']:>6.3f}")
    print(f"partner probe ({n['probe']} new images, {partner_probe['n_partner_chances']} chances): partner "
          f"{partner_probe['partner_rate']:.3f}, other absent {partner_probe['other_absent_rate']:.3f}, recall "
          f"{partner_probe['recall']:.3f}")
    print("POPE (clean): " + ", ".join(f"{k} accuracy {v['accuracy']:.3f} yes-ratio {v['yes_ratio']:.3f}"
                                       for k, v in yes_no.items()))
    for kind, results in verdicts.items():
        print(f"{kind}: " + "; ".join(f"{name} {'pass' if ok else 'FAIL'}" for name, ok in results.items()))
    if other:
        e = check["prior_excess"]
        worlds = [f"{k} world {e[k]['partner_rate']:.3f} (text {e[k]['p_partner_text']}, {e[k]['world']})"
                  for k in ("prior", "control")]
        print(f"clean partner rate (partner probe): {', '.join(worlds)}; the prior's excess {100 * e['difference']:+.1f} points "
              "(the study's rule: experiments/rules.py)")
    if not all(verdicts["floors"].values()):
        print(f"WARNING: this world fails a floor ({', '.join(failed_floors(out / 'prior_check.json'))}): its base "
              "model is not one to judge the method on (docs/toy_world.md)")
    print(f"done in {time.time() - t0:.0f} s; world hash {digest}")


if __name__ == "__main__":
    main()
