"""The method of BPO, in small functions read top to bottom: the input format, the forward-diffusion noise that
weakens an image, the token convention with packed sequences and their response log-probs, and the whole preference
objective (DPO, IPO, SFT and the added terms). What differs per model family is in families/ (one file a family);
loading.py loads a model, generation.py generates, attention.py runs a packed row's attention. The job plumbing is
beside it: dist_io.py (process groups, files), data.py (records), runs.py (03's run directory), remote.py
(endpoints), scoring.py (every scoring rule)."""
import argparse
import collections
import contextlib
import hashlib

import torch
import torch.nn.functional as F

IGNORE = -100  # label of a position whose token is not scored
DEFAULT_MODEL = "llava-hf/llava-1.5-7b-hf"  # the paper's model, every script's default
# LoRA on every linear layer of the language model; nothing in the vision tower or the projector, so the model
# with the adapter disabled is exactly the reference
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"

# ----------------------------------------------------------------------------- input format

# LLaVA-1.5's conversation (LLaVA's conv_vicuna_v1): how it was trained and how it is evaluated
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
InputFormat = collections.namedtuple("InputFormat", "chat_format pad_square")
LLAVA_15 = InputFormat("vicuna_v1", True)
TEMPLATE = InputFormat("template", False)  # the processor's own chat template at its own resolution (other families)


def add_format_args(parser):
    """--chat_format and --pad_square, on every script that builds a prompt."""
    parser.add_argument("--chat_format", choices=["vicuna_v1", "template"], default=None,
                        help="vicuna_v1: LLaVA-1.5's conversation (its system line, then ' USER: <image>\\n{question} "
                             "ASSISTANT:'), as it was trained and evaluated; template: the processor's own chat "
                             "template (default: the model family's: vicuna_v1 for LLaVA-1.5, template for the others)")
    parser.add_argument("--pad_square", action=argparse.BooleanOptionalAction, default=None,
                        help="pad each image to a square with the image processor's mean colour, centred, before the "
                             "processor (LLaVA-1.5's image_aspect_ratio: pad); --no-pad_square: the processor alone "
                             "(CLIP's resize and centre crop; the others' own resolution). Default: the model family's "
                             "(on for LLaVA-1.5, off for the others)")


def input_format(args):
    """The input format the flags ask for; where one is not given, the model family's (families/: LLaVA-1.5's
    Vicuna-v1 and square padding; the others' chat template at their own resolution). No model, or a name that is no
    model: LLaVA-1.5's."""
    from families import family_of, model_type
    default, name = LLAVA_15, getattr(args, "model", None)
    # a model whose config can be read (a folder, the hub cache, a known checkpoint, else a hub id on the hub); a name
    # that is none of these fails when the script loads it, after its input is checked
    if None in (args.chat_format, args.pad_square) and name and (model_type(name) or name.count("/") == 1):
        default = family_of(name).input_format
    return InputFormat(args.chat_format or default.chat_format,
                       default.pad_square if args.pad_square is None else args.pad_square)


def chat_prompt(processor, question, fmt=LLAVA_15, image=True, history=()):
    """The text of a conversation ending where the answer to `question` starts: the earlier turns
    `history` ([question, answer] pairs, the image in the first) and then the question. Questions and
    answers are stripped of surrounding white space, as LLaVA's preprocessing does. Vicuna-v1 joins the
    turns as LLaVA's conv_vicuna_v1: `SYSTEM USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:`."""
    turns = [(q.strip(), a.strip()) for q, a in history] + [(question.strip(), None)]
    if fmt.chat_format == "vicuna_v1":
        text = VICUNA_SYSTEM + " "
        for k, (q, a) in enumerate(turns):
            text += "USER: " + (f"{processor.image_token}\n" if image and k == 0 else "") + q + " ASSISTANT:"
            text += f" {a}{processor.tokenizer.eos_token}" if a is not None else ""
        return text
    messages = []
    for k, (q, a) in enumerate(turns):
        messages.append({"role": "user", "content": ([{"type": "image"}] if image and k == 0 else [])
                         + [{"type": "text", "text": q}]})
        if a is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": a}]})
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def pad_square(image, processor):
    """LLaVA-1.5's expand2square: the image centred on a square of the processor's mean colour, so
    that the resize keeps all of it (CLIP's centre crop would cut the edges, and objects there)."""
    from PIL import Image
    w, h = image.size
    if w == h:
        return image
    colour = tuple(int(255 * m) for m in processor.image_processor.image_mean)
    square = Image.new(image.mode, (max(w, h), max(w, h)), colour)
    square.paste(image, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
    return square


def encode(processor, texts, images, fmt):
    """Processor inputs for prompts with one image each, padded to squares where the format says so (the family's
    processor call: families/)."""
    from families import family_of
    if fmt.pad_square:
        images = [pad_square(im, processor) for im in images]
    return family_of(processor).encode(processor, texts, images)


def adds_bos(tokenizer, text):
    """Whether tokenising `text` should add BOS: not where the rendered prompt starts with it (Gemma 3's template
    writes it), as the processors' own apply_chat_template decides."""
    return not (tokenizer.bos_token and text.startswith(tokenizer.bos_token))


def tokenize(tokenizer, text):
    """The token ids of a rendered prompt (BOS added unless the text has it, adds_bos)."""
    return tokenizer(text, add_special_tokens=adds_bos(tokenizer, text)).input_ids


def prompt_length(processor, prompt_text, image, fmt):
    """Tokens of a rendered prompt with its image in this input format, without running the model's processor where
    the family can count the image's tokens (image None: a family whose images all make the same count)."""
    from families import family_of
    return len(tokenize(processor.tokenizer, prompt_text)) + family_of(processor).image_extra_tokens(processor, image, fmt)


def question_text(text):
    """A question as the chat template takes it: every literal `<image>` removed, since the template
    puts the image in exactly once (a second placeholder would take another image's features)."""
    return text.replace("<image>", "").strip()


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


def _feature_scale(x, rows=None):
    # per image std, so that a step means the same signal-to-noise ratio for any encoder: unit-variance noise
    # on features of std ~4 (the toy's CLIP stand-in) would barely touch them (docs/toy_world.md). `rows`: the rows of x
    # each image holds (Qwen's patches come as one block); None: one row an image
    if rows is None:
        return x.float().flatten(1).std(dim=1).view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    return torch.cat([part.float().std().expand(len(part)) for part in x.split(rows)]).view(
        -1, *([1] * (x.dim() - 1))).to(x.dtype)


@contextlib.contextmanager
def weaken_images(model, noise_step, noise_on="features", generator=None):
    """Within this context every image the model sees is weakened by `noise_step` steps of forward diffusion: on the
    features the vision encoder hands to the language model's side (as in the paper: LLaVA's CLIP features before the
    projector; every such place a family has, families/: Qwen's before each patch merger, Qwen3-VL's deepstack ones
    too), scaled per image, or on the normalised pixels (as in the authors' released script, unit-variance noise as in
    VCD)."""
    from families import family_of
    if noise_step <= 0:
        yield
        return
    if noise_on not in ("features", "pixels"):
        raise ValueError(f"noise_on must be features or pixels, got {noise_on!r}")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    family, rows, handles = family_of(base), [], []
    if noise_on == "features":
        handles += family.watch_image_rows(base, rows)

        def hook(_mod, args):
            x = args[0]
            return (diffuse(x, noise_step, _feature_scale(x, rows[-1] if rows else None), generator),) + args[1:]
        handles += [module.register_forward_pre_hook(hook) for module in family.feature_modules(base)]
    else:
        module, name = family.pixel_module(base)

        def hook(_mod, args, kwargs):  # the pixels as the model passes them: by name or first
            if name in kwargs:
                return args, {**kwargs, name: diffuse(kwargs[name], noise_step, 1.0, generator)}
            return (diffuse(args[0], noise_step, 1.0, generator),) + args[1:], kwargs
        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def pair_weakening(key, meta, noise_step=-1, noise_on=None):
    """(noise step, where, seed) of a pair's weakened image (the conditional term's): 01's settings from
    the pair's meta unless given (noise_step -1, noise_on None), else step 500 on the features; the seed
    from the pair's key and the step, so that the policy, the reference and a resumed run all see the
    same weakened image."""
    meta = meta if isinstance(meta, dict) else {}
    step = noise_step if noise_step >= 0 else int(meta.get("noise_step", 500))
    where = noise_on or meta.get("noise_on", "features")
    return step, where, int(hashlib.sha256(f"{key}\t{step}\t{where}".encode()).hexdigest()[:15], 16)


# ----------------------------------------------------------------------------- token convention and log-probs


def response_ids(tokenizer, prompt_text, response, eos_token_id=None):
    """Token ids of the response after the chat prompt, plus the token that ends an answer (the family's: EOS, or
    Gemma 3's <end_of_turn>): the tokens the model produces at inference. Tokenised jointly with the prompt (subword
    merges as at inference) when the prompt's own tokens are a prefix of the joint ones; otherwise the response
    alone. The answer follows the prompt after a space (Vicuna-v1's "ASSISTANT: answer"), or directly where the
    prompt ends in a line break (ChatML's "<|im_start|>assistant\n", Qwen's; Gemma's "<start_of_turn>model\n")."""
    prompt = tokenize(tokenizer, prompt_text)
    joint = tokenize(tokenizer, prompt_text + ("" if prompt_text[-1:].isspace() else " ") + response)
    if joint[:len(prompt)] == prompt:
        ids = joint[len(prompt):]
    else:  # a merge across the boundary: keep the prompt's tokens as generation sees them
        ids = tokenizer(response, add_special_tokens=False).input_ids
    return ids + [tokenizer.eos_token_id if eos_token_id is None else eos_token_id]


def build_sequences(processor, image, prompt, responses, max_length, fmt=LLAVA_15, history=()):
    """Encodes one image + prompt and its responses under the token convention (the prompt tokenised
    in one call, as at inference; the response and EOS scored). Returns ({image input: tensor},
    list of (input_ids, labels), n_truncated). Responses longer than max_length allows are
    cut at the end; the image and prompt tokens are never cut. The image inputs: the family's vision_keys."""
    from families import family_of
    family = family_of(processor)
    prompt_text = chat_prompt(processor, prompt, fmt, history=history)
    enc = encode(processor, [prompt_text], [image], fmt)
    prompt_ids = enc["input_ids"][0].tolist()
    room = max_length - len(prompt_ids)
    if room < 1:
        raise ValueError(f"prompt with image takes {len(prompt_ids)} tokens, more than --max_length {max_length}")
    seqs, cut = [], 0
    for r in responses:
        ids = response_ids(processor.tokenizer, prompt_text, r, family.eos_token_id(processor.tokenizer))
        if len(ids) > room:
            ids, cut = ids[:room], cut + 1
        seqs.append((prompt_ids + ids, [IGNORE] * len(prompt_ids) + ids))
    return {k: enc[k] for k in family.vision_keys}, seqs, cut


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


def pack_responses(seqs, prompt_pos=None):
    """One image + prompt and its k responses (build_sequences' output: they share the prompt) as one
    sequence [prompt, response_1, ..., response_k] in which each response sees the prompt and itself
    only, its positions continuing the prompt's as if it were the only response: the shared prefix
    (LLaVA-1.5's 576 image tokens and the question) runs through the model once instead of k times.
    prompt_pos: the prompt's position rows (prompt_positions; default one row 0..n-1). Returns
    (input_ids, position rows, segment (0: prompt, i: response i), scored), scored = (predictor position,
    token, response index) per response token: a response's first token is predicted from the prompt's end."""
    n_prompt = sum(1 for label in seqs[0][1] if label == IGNORE)
    prompt_pos = prompt_pos or [list(range(n_prompt))]
    ids, pos, seg, scored = list(seqs[0][0][:n_prompt]), [list(row) for row in prompt_pos], [0] * n_prompt, []
    first = max(max(row) for row in prompt_pos) + 1  # the position after the prompt, on every row
    for i, (full, _) in enumerate(seqs):
        response, start = full[n_prompt:], len(ids)
        scored += [(n_prompt - 1 if j == 0 else start + j - 1, tok, i) for j, tok in enumerate(response)]
        ids += response
        for row in pos:
            row += range(first, first + len(response))
        seg += [i + 1] * len(response)
    return ids, pos, seg, scored


def packed_batch(packs, pad_id):
    """Right-pads pack_responses' outputs into model inputs: input_ids and position_ids [B, T] ([3, B, T] for
    multimodal rotary positions), `seg` [B, T] (0: prompt, i: response i, -1: padding) from which attention.py
    builds the attention (a token sees the earlier tokens of the prompt and of its own response), `keep` [B, T]
    marking the positions whose logits are needed, and `scored` = (index into the kept positions' logits, token,
    output slot) with slot = response_index * B + row, so the log-probs come out as [all first responses..., all
    second responses...]."""
    B, T, P = len(packs), max(len(p[0]) for p in packs), len(packs[0][1])
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    position_ids = torch.zeros((P, B, T), dtype=torch.long)
    seg = torch.full((B, T), -1, dtype=torch.long)  # -1: padding
    rows, preds, toks, slots = [], [], [], []
    for b, (ids, pos, sg, scored) in enumerate(packs):
        input_ids[b, :len(ids)] = torch.tensor(ids)
        position_ids[:, b, :len(ids)] = torch.tensor(pos)
        seg[b, :len(sg)] = torch.tensor(sg)
        for pred, tok, i in scored:
            rows.append(b), preds.append(pred), toks.append(tok), slots.append(i * B + b)
    keep = torch.zeros((B, T), dtype=torch.bool)
    keep[rows, preds] = True
    flat = keep.flatten().cumsum(0) - 1  # position (b, t) -> its row among the kept logits
    index = flat[torch.tensor(rows) * T + torch.tensor(preds)]
    position_ids = position_ids[0] if P == 1 else position_ids
    return input_ids, position_ids, seg, keep, (index, torch.tensor(toks), torch.tensor(slots))


def flat_batch(packs, pad_id=0, block=1):
    """pack_responses' outputs concatenated into one row, no padding between packs (03's --padding_free): input_ids
    and position_ids [1, T] or [3, 1, T] (each pack's positions its own), `doc` [1, T] (the pack of each token) and
    `seg` [1, T] (0: prompt, i: response i) from which attention.py builds the attention on the device, `keep` and
    `scored` as packed_batch's (slot = response_index * B + pack). block > 1: the row padded with pad_id to whole
    blocks, two at least (FlexAttention's: a run then compiles once, not per length); the tail is a pack of its own
    (doc -1), never scored."""
    B, P = len(packs), len(packs[0][1])
    ids, pos, doc, seg, preds, toks, slots = [], [[] for _ in range(P)], [], [], [], [], []
    for b, (p_ids, p_pos, p_seg, scored) in enumerate(packs):
        for pred, tok, i in scored:
            preds.append(len(ids) + pred), toks.append(tok), slots.append(i * B + b)
        ids += p_ids
        for row, p_row in zip(pos, p_pos):
            row += p_row
        seg += p_seg
        doc += [b] * len(p_ids)
    tail = 0 if block == 1 else max(2 * block, -(-len(ids) // block) * block) - len(ids)
    ids, doc, seg = ids + [pad_id] * tail, doc + [-1] * tail, seg + [0] * tail
    for row in pos:
        row += [0] * tail
    keep = torch.zeros((1, len(ids)), dtype=torch.bool)
    keep[0, preds] = True
    index = (keep.flatten().cumsum(0) - 1)[torch.tensor(preds)]
    as_row = lambda x: torch.tensor([x], dtype=torch.long)
    position_ids = as_row(pos[0]) if P == 1 else torch.tensor(pos, dtype=torch.long)[:, None]
    return as_row(ids), position_ids, as_row(doc), as_row(seg), keep, (index, torch.tensor(toks), torch.tensor(slots))


def pack_pairs(processor, examples, max_length, fmt=LLAVA_15, flat=False, row_block=1):
    """One packed micro-batch of CPU tensors from examples (image, prompt, [responses], earlier turns): per example one
    sequence [image + prompt, responses...] (pack_responses), padded (packed_batch) or, flat, all in one row
    (flat_batch, padded to whole blocks of row_block). A dict of the model's inputs (input_ids, position_ids,
    logits_to_keep, the family's image inputs; seg, and for a flat row doc, from which attention.py makes the attention
    on the device), `scored`, `n_tokens`: the scored tokens (+EOS) per output slot, and `n_real`: the tokens of the packs
    (input_ids' size less padding)."""
    from families import family_of
    family = family_of(processor)
    visions, packs = [], []
    for image, prompt, responses, history in examples:
        vision, seqs, _ = build_sequences(processor, image, prompt, responses, max_length, fmt, history)
        visions.append(vision)
        n_prompt = seqs[0][1].count(IGNORE)
        packs.append(pack_responses(seqs, family.prompt_positions(processor, seqs[0][0][:n_prompt], vision)))
    if flat:
        input_ids, position_ids, doc, seg, keep, scored = flat_batch(packs, processor.tokenizer.pad_token_id, row_block)
        attention = dict(doc=doc, seg=seg)
    else:
        input_ids, position_ids, seg, keep, scored = packed_batch(packs, processor.tokenizer.pad_token_id)
        attention = dict(seg=seg)
    n_out = len(examples[0][2]) * len(examples)
    return dict(input_ids=input_ids, position_ids=position_ids, **attention, logits_to_keep=keep,
                **family.cat_images(visions), scored=scored, n_tokens=torch.bincount(scored[2], minlength=n_out),
                n_real=sum(len(p[0]) for p in packs))


def packed_logps(logits, scored, n_out):
    """Summed log-probs per output slot from the kept positions' logits [N, V] (packed_batch's
    `scored`): logit - logsumexp at the scored tokens only, no log-softmax over all positions; in float32
    (float64 logits stay float64)."""
    index, toks, slots = (t.to(logits.device) for t in scored)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    picked = logits[index, toks] - torch.logsumexp(logits, dim=-1)[index]
    return torch.zeros(n_out, device=logits.device, dtype=logits.dtype).index_add(0, slots, picked)


ATTENTION_INPUTS = ("attention_mask", "pack_masks", "block_masks", "flex_options")  # attention.Kernel.inputs's


def response_logps(net, model, inputs, scored, n_out, features=None):
    """(summed response log-probs per output slot, the image features) of a packed micro-batch (pack_pairs' model
    inputs, a padding-free row's attention made by attention.Kernel.inputs). net runs the language model (the
    policy, its DDP wrapper, or the reference: the model with its adapter disabled); the image features, from model's
    frozen vision encoder (families.image_features), are made once (unless given) and serve policy and reference alike.
    bf16 autocast on CUDA; no KV cache (2-3 GB at 7B, and nothing reads it)."""
    device = inputs["input_ids"].device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        if features is None:
            from families import image_features
            features = image_features(model, inputs)
        attention = {k: inputs[k] for k in ATTENTION_INPUTS if k in inputs}
        logits = net(input_ids=inputs["input_ids"], mm_encoder_outputs={"image": features},
                     position_ids=inputs["position_ids"], logits_to_keep=inputs["logits_to_keep"], use_cache=False,
                     **attention).logits
    return packed_logps(logits, scored, n_out), features


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """Sigmoid DPO loss (paper Eq. 4) per pair, with the implicit rewards
    beta * (log pi - log pi_ref) of chosen and rejected."""
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def ipo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """IPO (Azar et al., 2023) per pair: (h - 1 / (2 beta))^2, h = the chosen's log-ratio log pi/pi_ref
    minus the rejected's; it regresses the margin to a fixed target instead of pushing it to
    infinity. Rewards as dpo_loss's."""
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    losses = (chosen_ratio - rejected_ratio - 1 / (2 * beta)) ** 2
    return losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


def conditional_loss(policy_chosen, policy_chosen_weak, ref_chosen, ref_chosen_weak, beta):
    """mDPO's conditional term (Wang et al., 2024) per pair: the chosen answer given the real image
    preferred over the same answer given the weakened image, -log sigmoid(beta * [log pi/pi_ref(y_w | I)
    - log pi/pi_ref(y_w | I')]): a preference that text alone cannot satisfy."""
    return -F.logsigmoid(beta * ((policy_chosen - ref_chosen) - (policy_chosen_weak - ref_chosen_weak)))


def anchor_loss(policy_chosen, ref_chosen, beta):
    """mDPO's anchor per pair: -log sigmoid(beta * log pi/pi_ref(y_w)), which keeps the chosen answer's
    reward above zero (plain DPO may lower the chosen log-prob as long as the rejected falls faster)."""
    return -F.logsigmoid(beta * (policy_chosen - ref_chosen))


def preference_loss(policy, reference, n_tokens, *, loss="dpo", beta=0.1, length_normalize=False, sft_weight=0.0,
                    conditional_weight=0.0, anchor_weight=0.0, weak=None):
    """The whole objective of one micro-batch of B pairs: (loss, metrics), the metrics detached 0-d
    tensors (nothing waits for the device until they are logged). `loss` is the whole objective; each
    added term is also reported on its own (loss/sft, loss/anchor, loss/conditional).

    policy, reference, n_tokens: summed log-probs under the policy and the reference, and scored tokens
    (+EOS), of [B chosen..., B rejected...] (loss "sft": [B chosen], reference unused).
    loss: "dpo" (paper Eq. 4), "ipo", or "sft" (the chosen answers' NLL, the mean over the micro-batch's
    answer tokens, as LLaVA's fine-tuning). dpo and ipo take: length_normalize (each log-ratio divided
    by its response's token count, in every term), sft_weight (+ W x each chosen answer's per-token NLL),
    anchor_weight (+ W x anchor_loss), conditional_weight (+ W x conditional_loss, with weak = (policy,
    reference, n_tokens) of the chosen answers given the weakened image)."""
    B = len(policy) // (1 if loss == "sft" else 2)
    chosen = policy[:B]
    if loss == "sft":
        value = -chosen.sum() / n_tokens[:B].sum()
        return value, {"loss": value.detach(), "logps/chosen": chosen.detach().mean()}
    per = n_tokens.float() if length_normalize else torch.ones_like(policy)  # log-ratio per token or summed
    pol, ref = policy / per, reference / per
    objective = ipo_loss if loss == "ipo" else dpo_loss
    losses, r_chosen, r_rejected = objective(pol[:B], pol[B:], ref[:B], ref[B:], beta)
    terms = {}
    if sft_weight:
        terms["sft"] = (sft_weight, -chosen / n_tokens[:B])
    if anchor_weight:
        terms["anchor"] = (anchor_weight, anchor_loss(pol[:B], ref[:B], beta))
    if conditional_weight:
        weak_policy, weak_reference, weak_tokens = weak
        per_weak = weak_tokens.float() if length_normalize else 1.0
        terms["conditional"] = (conditional_weight, conditional_loss(pol[:B], weak_policy / per_weak, ref[:B],
                                                                     weak_reference / per_weak, beta))
    metrics = {}
    for name, (weight, term) in terms.items():
        losses = losses + weight * term
        metrics[f"loss/{name}"] = term.detach().mean()
    value = losses.mean()
    return value, {"loss": value.detach(), **metrics, "rewards/chosen": r_chosen.mean(),
                   "rewards/rejected": r_rejected.mean(), "rewards/accuracies": (r_chosen > r_rejected).float().mean(),
                   "rewards/margins": (r_chosen - r_rejected).mean(),
                   "logps/chosen": chosen.detach().mean(), "logps/rejected": policy[B:].detach().mean()}
