"""The training step's fast path (packed [prompt, chosen, rejected] sequences, image features once,
logits only where scored, reference log-probs cached) against the plain path: one padded sequence
per response, pixel values through the full model, a full log-softmax."""
import json

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig

import attention
import common
import data
from conftest import plain_inputs

I = common.IGNORE


def test_packed_batch_by_hand():
    # pair 0: prompt [1 2 3], responses [4 5] and [6]; pair 1: prompt [7 8], responses [9] and [10 11]
    packs = [common.pack_responses([([1, 2, 3, 4, 5], [I, I, I, 4, 5]), ([1, 2, 3, 6], [I, I, I, 6])]),
             common.pack_responses([([7, 8, 9], [I, I, 9]), ([7, 8, 10, 11], [I, I, 10, 11])])]
    assert packs[0][:3] == ([1, 2, 3, 4, 5, 6], [[0, 1, 2, 3, 4, 3]], [0, 0, 0, 1, 1, 2])
    assert packs[1][:3] == ([7, 8, 9, 10, 11], [[0, 1, 2, 2, 3]], [0, 0, 1, 2, 2])
    input_ids, position_ids, mask, keep, scored = common.packed_batch(packs, pad_id=0)
    assert input_ids.tolist() == [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 0]]
    assert position_ids.tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 2, 2, 3, 0]]
    sees = {  # query -> keys it may attend to, written out by hand
        0: [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 3, 4], [0, 1, 2, 5]],
        1: [[0], [0, 1], [0, 1, 2], [0, 1, 3], [0, 1, 3, 4]],  # row 1's last position is padding
    }
    for b, rows in sees.items():
        for q, keys in enumerate(rows):
            assert [k for k in range(6) if mask[b, 0, q, k] == 0] == keys, (b, q)
    assert mask.min() == torch.finfo(torch.float32).min
    assert keep.tolist() == [[False, False, True, True, False, False], [False, True, False, True, False, False]]
    # kept logits: (0,2) (0,3) (1,1) (1,3); slots: [pair0 first, pair1 first, pair0 second, pair1 second]
    logits = torch.randn(4, 12, dtype=torch.float64)
    ls = F.log_softmax(logits, -1)
    want = [ls[0, 4] + ls[1, 5], ls[2, 9], ls[0, 6], ls[2, 10] + ls[3, 11]]
    got = common.packed_logps(logits, scored, 4)
    assert torch.allclose(got, torch.stack(want), atol=1e-6)  # float64 logits stay float64


def test_flat_batch_by_hand():
    # the same two pairs as above, in one row: no padding, positions per pack, doc and seg for the block mask
    packs = [common.pack_responses([([1, 2, 3, 4, 5], [I, I, I, 4, 5]), ([1, 2, 3, 6], [I, I, I, 6])]),
             common.pack_responses([([7, 8, 9], [I, I, 9]), ([7, 8, 10, 11], [I, I, 10, 11])])]
    input_ids, position_ids, doc, seg, keep, scored = common.flat_batch(packs)
    assert input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
    assert position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 0, 1, 2, 2, 3]]
    assert doc.tolist() == [[0] * 6 + [1] * 5] and seg.tolist() == [[0, 0, 0, 1, 1, 2, 0, 0, 1, 2, 2]]
    assert keep[0].nonzero().flatten().tolist() == [2, 3, 7, 9]
    logits = torch.randn(4, 12, dtype=torch.float64)
    ls = F.log_softmax(logits, -1)
    want = [ls[0, 4] + ls[1, 5], ls[2, 9], ls[0, 6], ls[2, 10] + ls[3, 11]]
    assert torch.allclose(common.packed_logps(logits, scored, 4), torch.stack(want), atol=1e-6)


def lora_model(toy, arch="llava", dtype=torch.float32, dropout=0.0, checkpointing=False):
    """The toy model with LoRA on the language model (as 03 makes it: checkpointing first), B initialised away
    from zero so the adapter changes the outputs and every LoRA weight gets a gradient."""
    model, processor = common.load_model(str(toy / "model"))
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(0)
    model = common.with_lora(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                               target_modules=common.LORA_TARGETS))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model.to(dtype), processor


def _pairs(toy, processor, arch, n=3):
    """n real toy images and questions, each with a chosen answer and a shorter rejected one of
    varying length, so prompts, responses and padding differ across the batch."""
    recs = json.load(open(toy / "train.json"))[:n]
    visions, seqs = [], []
    for i, rec in enumerate(recs):
        image = data.load_image(str(toy / "images"), rec["image"])
        answer = rec["conversations"][1]["value"]
        question = rec["conversations"][0]["value"].replace("<image>\n", "") + " please" * i
        vision, pair_seqs, _ = common.build_sequences(processor, image, question,
                                                      [answer, " ".join(answer.split()[:2 + 2 * i])], 512,
                                                      common.family_format(arch))
        visions.append(vision)
        seqs.append(pair_seqs)
    return visions, seqs


def _plain_logps(model, processor, visions, seqs):
    """Independent path: each response its own padded sequence, pixel values through the full
    model (its own positions: Qwen2.5-VL's from its get_rope_index), a full log-softmax over every
    position, labels shifted by one."""
    flat = [s[0] for s in seqs] + [s[1] for s in seqs]
    input_ids, mask, labels = common.pad_batch(flat, processor.tokenizer.pad_token_id)
    vision = common.cat_images(visions + visions)
    vision["pixel_values"] = vision["pixel_values"].to(model.dtype)
    logits = model(**plain_inputs(model, input_ids, vision, mask)).logits
    logprobs = F.log_softmax(logits[:, :-1].double(), dim=-1)
    target = labels[:, 1:]
    scored = target != I
    picked = logprobs.gather(2, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * scored).sum(-1)


def _packs(processor, visions, seqs):
    return [common.pack_responses(s, common.prompt_positions(processor, s[0][0][:s[0][1].count(I)], v))
            for v, s in zip(visions, seqs)]


def _embeds(model, input_ids, visions):
    vision = common.cat_images(visions)
    return common.image_embeds(model, input_ids, {**vision, "pixel_values": vision["pixel_values"].to(model.dtype)})


def _packed_logps(model, processor, visions, seqs):
    input_ids, position_ids, mask, keep, scored = common.packed_batch(_packs(processor, visions, seqs),
                                                                      processor.tokenizer.pad_token_id, model.dtype)
    logits = model(inputs_embeds=_embeds(model, input_ids, visions), attention_mask=mask, position_ids=position_ids,
                   logits_to_keep=keep).logits
    return common.packed_logps(logits.double(), scored, 2 * len(seqs)).double()


def _flat_logps(model, processor, visions, seqs):
    """The padding-free path: one row, each pack's attention its own (CPU: FlexAttention has no backward here)."""
    input_ids, position_ids, doc, seg, keep, scored = common.flat_batch(_packs(processor, visions, seqs))
    attention.use_packed_attention(model)
    inputs = attention.Kernel("per_pair", "tested").inputs(dict(doc=doc, seg=seg))
    try:
        logits = model(inputs_embeds=_embeds(model, input_ids, visions), position_ids=position_ids,
                       logits_to_keep=keep, **inputs).logits
    finally:
        attention.use_packed_attention(model, on=False)
    return common.packed_logps(logits.double(), scored, 2 * len(seqs)).double()


@pytest.mark.parametrize("fast_path,arch,dtype", [
    (_packed_logps, "llava", torch.float32), (_flat_logps, "llava", torch.float32),
    (_packed_logps, "qwen2_5_vl", torch.float32), (_flat_logps, "qwen2_5_vl", torch.float32),
    (_packed_logps, "qwen2_5_vl", torch.float64)], ids=["llava-padded", "llava-flat", "qwen-padded", "qwen-flat",
                                                         "qwen-padded-float64"])
def test_packed_logps_and_lora_grads_equal_plain_forward(fast_path, arch, dtype, request):
    """Packed log-probs (the prefix once, each response continuing its positions; Qwen2.5-VL's multimodal
    rotary positions from common.mrope_positions) and their LoRA gradients = the model's own plain forward of
    each [prefix, response]; in float64 to rounding."""
    model, processor = lora_model(request.getfixturevalue("toy" if arch == "llava" else "qwen_toy"), arch, dtype)
    visions, seqs = _pairs(request.getfixturevalue("toy" if arch == "llava" else "qwen_toy"), processor, arch)
    weights = torch.randn(2 * len(seqs), dtype=torch.float64)  # a random linear loss: every log-prob's gradient counts
    results = []
    for path in (_plain_logps, fast_path):
        model.zero_grad()
        logps = path(model, processor, visions, seqs)
        (weights * logps).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        with torch.no_grad(), model.disable_adapter():
            ref = path(model, processor, visions, seqs)
        results.append((logps.detach(), ref, grads))
    (plain, plain_ref, plain_grads), (fast, fast_ref, fast_grads) = results
    # fp32: summed log-probs ~ -10..-100; float64 to 1e-10 (the RMSNorms compute in float32)
    rtol, atol = (1e-5, 1e-4) if dtype == torch.float32 else (1e-10, 1e-9)
    assert torch.allclose(fast, plain, rtol=rtol, atol=atol), (fast, plain)
    assert torch.allclose(fast_ref, plain_ref, rtol=rtol, atol=atol)
    assert not torch.allclose(plain, plain_ref, atol=1e-2)  # the adapter matters, so the grads are informative
    assert len(plain_grads) > 0 and plain_grads.keys() == fast_grads.keys()
    assert all(".language_model." in n for n in plain_grads)  # LoRA on the LM only
    for name, g in plain_grads.items():
        assert g.abs().sum() > 0, name
        if dtype == torch.float32:  # float64's gradients carry the float32 RMSNorms' last-bit flips, amplified
            assert torch.allclose(fast_grads[name], g, rtol=1e-3, atol=1e-6), name


def test_block_mask_and_pack_masks_are_the_same_attention():
    """FlexAttention with block_mask (eager: CPU has no fused kernel) = one SDPA per pack with pack_masks = a dense
    mask written from the rule (same pack, causal, key in the prompt or in the query's response), float64."""
    from torch.nn.attention.flex_attention import flex_attention
    doc = torch.tensor([[0] * 9 + [1] * 7])
    seg = torch.tensor([[0, 0, 0, 0, 1, 1, 2, 2, 2, 0, 0, 1, 1, 1, 2, 2]])
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 8, dtype=torch.float64) for _ in range(3))
    dense = torch.tensor([[doc[0, j] == doc[0, i] and j <= i and (seg[0, j] == 0 or seg[0, j] == seg[0, i])
                           for j in range(16)] for i in range(16)])
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    flex = flex_attention(q, k, v, block_mask=attention.block_mask(doc, seg))
    per_pack, _ = attention.packed_attention_forward(None, q, k, v, None, pack_masks=attention.pack_masks(doc, seg))
    assert torch.allclose(flex, want, atol=1e-12)
    assert torch.allclose(per_pack.transpose(1, 2), want, atol=1e-12)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_static_cache_generation_equals_the_dynamic_cache(toy, num_beams):
    """common.generate (static KV cache) returns the tokens of transformers' default dynamic cache, greedy and
    with beams (05's protocol), on a batch of left-padded prompts of different lengths."""
    model, processor = common.load_model(str(toy / "model"))
    recs = json.load(open(toy / "train.json"))[:6]
    images = [data.load_image(str(toy / "images"), r["image"]) for r in recs]
    # captions and short questions (the quick world's weak model words every caption alike)
    prompts = ["Describe the image in detail."] * 3 + [r["conversations"][2]["value"] + " please" * i
                                                         for i, r in enumerate(recs[3:])]
    ours = common.generate(model, processor, images, prompts, max_new_tokens=24, num_beams=num_beams)
    enc = common.encode(processor, [common.chat_prompt(processor, p) for p in prompts], images, common.LLAVA_15)
    out = model.generate(**enc, max_new_tokens=24, do_sample=False, num_beams=num_beams,
                         pad_token_id=processor.tokenizer.pad_token_id)[:, enc["input_ids"].shape[1]:]
    assert ours == [t.strip() for t in processor.batch_decode(out, skip_special_tokens=True)]
    assert len(set(ours)) > 1  # the answers differ: a real comparison, not one repeated string
