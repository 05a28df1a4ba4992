"""Generation for 01 and 04-07: greedy, sampled or beam-searched answers with a static KV cache, its decode step
compiled once on CUDA; and the authors' released contrastive sampler (clean vs weakened image)."""
import math

import torch

import common
from families import family_of, image_features

CACHE_BLOCK = 256  # a static KV cache is sized in whole blocks of this many tokens


def decode_compile_config(device):
    """How transformers compiles the decode step of a static-cache generate, on CUDA (None elsewhere: it compiles
    nothing there): the batch size and the cache length dynamic from the first call, so a run compiles it once, not
    per prompt length (a count the tests pin); CUDA graphs (its default mode) then record once per cache size, which
    CACHE_BLOCK keeps to a few."""
    from transformers import CompileConfig
    return CompileConfig(dynamic=True) if device.type == "cuda" else None


@torch.no_grad()
def generate(model, processor, images, prompts, fmt=common.LLAVA_15, max_new_tokens=512, do_sample=False,
             temperature=1.0, top_p=1.0, num_beams=1, keep_unfinished=True, static_cache=True):
    """One batch of answers, left-padded; prompts are plain questions. With keep_unfinished=False an
    answer that reached max_new_tokens without EOS (cut mid-sentence) comes back as None. A static KV cache
    (allocated for prompt + max_new_tokens, rounded up to CACHE_BLOCK; on CUDA transformers then compiles the decode
    step, decode_compile_config): the same tokens as the dynamic cache's (static_cache=False, the bench's
    comparison), faster on CPU too (bench/README.md)."""
    enc = common.encode(processor, [common.chat_prompt(processor, p, fmt) for p in prompts], images, fmt)
    enc = {k: v.to(model.device) for k, v in enc.items()}
    enc["pixel_values"] = enc["pixel_values"].to(model.dtype)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if do_sample else dict(do_sample=False)
    n_prompt = enc["input_ids"].shape[1]
    cache = dict(cache_implementation="static", compile_config=decode_compile_config(model.device),
                 max_cache_len=-(-(n_prompt + max_new_tokens) // CACHE_BLOCK) * CACHE_BLOCK) if static_cache else {}
    out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=processor.tokenizer.pad_token_id,
                         num_beams=num_beams, **cache, **sampling)[:, n_prompt:]
    texts = [s.strip() for s in processor.batch_decode(out, skip_special_tokens=True)]
    if keep_unfinished:
        return texts
    eos = model.generation_config.eos_token_id
    ended = torch.isin(out, torch.tensor(eos if isinstance(eos, list) else [eos], device=out.device)).any(1)
    return [t if e else None for t, e in zip(texts, ended.tolist())]


def contrastive_logits(clean, weak, alpha, beta):
    """The authors' released sampler (VCD's rule), per position: (1 + alpha) clean - alpha weak over the tokens
    whose clean probability is at least beta times the clean maximum (logit >= log beta + max logit), -inf
    elsewhere. It pushes the sample towards what the clean image adds, away from the prior."""
    cutoff = math.log(beta) + clean.max(dim=-1, keepdim=True).values
    return ((1 + alpha) * clean - alpha * weak).masked_fill(clean < cutoff, float("-inf"))


@torch.no_grad()
def generate_contrastive(model, processor, images, prompts, fmt, weakening, alpha, beta, temperature=1.0,
                         top_p=1.0, max_new_tokens=512, keep_unfinished=True):
    """generate's sampling with the authors' released rule: at every step contrastive_logits of the clean
    image's and the weakened image's next-token logits (weakening: (noise step, "features"|"pixels", torch
    generator), applied to the images once), then temperature and top-p, then a sample. Each branch keeps its
    own KV cache; the batch is left-padded as generate's. Returns the texts (None for one cut off by
    max_new_tokens, with keep_unfinished=False)."""
    family = family_of(model)
    enc = common.encode(processor, [common.chat_prompt(processor, p, fmt) for p in prompts], images, fmt)
    enc = {k: v.to(model.device) for k, v in enc.items()}
    enc["pixel_values"] = enc["pixel_values"].to(model.dtype)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    step, where, generator = weakening
    with common.weaken_images(model, step, where, generator):
        weak = image_features(model, enc)
    positions = family.generation_positions(model, enc)  # the model's own, of the left-padded prompts
    branches = [model(input_ids=ids, mm_encoder_outputs={"image": features}, attention_mask=mask, position_ids=positions,
                      use_cache=True, **family.prefill_inputs(enc))
                for features in (image_features(model, enc), weak)]
    eos = model.generation_config.eos_token_id
    eos = torch.tensor(eos if isinstance(eos, list) else [eos], device=ids.device)
    pad = processor.tokenizer.pad_token_id
    done, out = torch.zeros(len(prompts), dtype=torch.bool, device=ids.device), []
    for _ in range(max_new_tokens):
        scores = contrastive_logits(*(b.logits[:, -1].float() for b in branches), alpha, beta) / temperature
        if top_p < 1.0:  # the smallest set of tokens whose probability reaches top_p
            sorted_scores, order = scores.sort(dim=-1, descending=True)
            outside = sorted_scores.softmax(-1).cumsum(-1) - sorted_scores.softmax(-1) >= top_p
            scores = scores.scatter(-1, order, sorted_scores.masked_fill(outside, float("-inf")))
        token = torch.multinomial(scores.softmax(-1), 1).squeeze(1)
        token = torch.where(done, torch.full_like(token, pad), token)
        out.append(token)
        done |= torch.isin(token, eos)
        if done.all():
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[..., -1:] + 1
        branches = [model(input_ids=token[:, None], attention_mask=mask, position_ids=positions,
                          cache=b.cache, use_cache=True) for b in branches]
    tokens = torch.stack(out, dim=1)
    texts = [t.strip() for t in processor.batch_decode(tokens, skip_special_tokens=True)]
    return texts if keep_unfinished else [t if d else None for t, d in zip(texts, done.tolist())]


# ----------------------------------------------------------------------------- token convention and log-probs
