"""The arithmetic limit of 03's speed-up over TRL's DPOTrainer: token passes through the language model.

A token pass is one token through one forward of the language model. With the base frozen and LoRA
on its linear layers, a backward costs about one forward (the input gradients; LoRA's own are small),
and activation checkpointing adds one more forward (the recomputation). Per pair with a prefix of P
tokens (image + prompt) and answers of R tokens (chosen and rejected, EOS included: R is their mean):
- TRL: chosen and rejected as two sequences of P + R; the policy's forward and backward and a reference
  forward on each: 2 x 2(P + R) + 2(P + R) = 6(P + R) (8(P + R) with checkpointing);
- ours (03): one packed sequence [P, chosen, rejected] of P + 2R; forward and backward: 2(P + 2R)
  (3(P + 2R) with checkpointing); the reference either scored once before training, spread over the
  epochs, (P + 2R) / epochs (03's default; 0.5(P + 2R) for the paper's 2 epochs), or a forward every
  step (--no-precompute_ref): (P + 2R).
The limit of a measured ratio samples/s ours / TRL is TRL's passes over ours: what the saved tokens can
buy at most, with the vision tower, attention's quadratic term, the LM head and per-step overheads
left out (the first two favour ours; the last one favours neither). Measured ratio / limit says how
much of it a run realised.
"""

SIDES = ("trl", "ours", "ours_every_step", "ours_padded")  # ours_padded: ours' token passes, and padding
PAPER_PAIRS, PAPER_EPOCHS, PAPER_GPUS, PAPER_HOURS = 170_000, 2, 8, 17.0  # the paper's run (bench/README.md)


def token_passes(P, R, side, epochs=2, checkpointing=False):
    """Language-model token passes per pair and epoch (see the module's docstring). P: prefix tokens
    (image + prompt), R: mean answer tokens of chosen and rejected (EOS included)."""
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    train = 3 if checkpointing else 2  # forward + backward (+ the recomputed forward)
    if side == "trl":
        return train * 2 * (P + R) + 2 * (P + R)
    packed = P + 2 * R
    return train * packed + (packed if side == "ours_every_step" else packed / epochs)


def step_passes(P, R, side, checkpointing=False):
    """Token passes per pair of one training step (a reference forward only where the step runs one: TRL and
    --no-precompute_ref; 03's default scores the reference in a pass of its own, P + 2R a pair)."""
    return token_passes(P, R, side, float("inf"), checkpointing)


def flops_per_pair(P, R, side, passes, lm_params, layers, hidden):
    """Model FLOPs per pair of `passes` token passes, counted from the shapes and token counts (not from a
    profiler): 2 per language-model weight per token pass, plus attention's scores and weighted sum, 4 x layers x
    hidden per (query, key) pair a causal forward attends: TRL's sequence [P, answer] P^2/2 + R(P + R/2), two a
    pair; ours, one packed row [P, chosen, rejected] P^2/2 + 2R(P + R/2). The frozen vision tower (~1% at 7B)
    and padding are left out: padding is work, not model FLOPs."""
    if side == "trl":
        tokens, attended = 2 * (P + R), 2 * (P * P / 2 + R * (P + R / 2))
    else:
        tokens, attended = P + 2 * R, P * P / 2 + 2 * R * (P + R / 2)
    return 2 * lm_params * passes + passes / tokens * 4 * layers * hidden * attended


# dense bf16 peak TFLOP/s (no sparsity) by a GPU name's part: the share of peak in bench/gpu_check.py's table
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A40": 149.7, "A6000": 154.8}


def peak_tflops(device_name):
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)


def limit(P, R, side, epochs=2, checkpointing=False):
    """The most samples/s `side` can gain over TRL from the tokens it saves: TRL's passes / its passes."""
    return token_passes(P, R, "trl", epochs, checkpointing) / token_passes(P, R, side, epochs, checkpointing)


def full_run_hours(samples_per_s, pairs=PAPER_PAIRS, epochs=PAPER_EPOCHS, gpus=PAPER_GPUS):
    """Hours of a run of `epochs` over `pairs` pairs on `gpus` GPUs at a measured per-GPU samples/s
    (perfect data-parallel scaling)."""
    return pairs * epochs / (samples_per_s * gpus) / 3600


def pair_lengths(processor, pairs, fmt=None, images=None):
    """(P, R): mean prefix tokens (BOS, system line, the image's tokens, question) and mean answer tokens
    (chosen and rejected, EOS included) of these pairs, as 03 counts them (images: {name: PIL image}, for the
    families whose image tokens depend on the image's size)."""
    import common
    from families import family_of
    fmt = fmt or common.LLAVA_15
    eos = family_of(processor).eos_token_id(processor.tokenizer)
    prefix, answers = [], []
    for pair in pairs:
        text = common.chat_prompt(processor, pair["prompt"], fmt)
        prefix.append(common.prompt_length(processor, text, images[pair["image"]], fmt))
        answers += [len(common.response_ids(processor.tokenizer, text, pair[k], eos)) for k in ("chosen", "rejected")]
    return sum(prefix) / len(prefix), sum(answers) / len(answers)
