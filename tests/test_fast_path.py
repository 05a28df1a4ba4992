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
import generation
import loading
from conftest import ARCHS, arch_world, plain_inputs
from families import family_of

I = common.IGNORE


def test_packed_batch_by_hand():
    # pair 0: prompt [1 2 3], responses [4 5] and [6]; pair 1: prompt [7 8], responses [9] and [10 11]
    packs = [common.pack_responses([([1, 2, 3, 4, 5], [I, I, I, 4, 5]), ([1, 2, 3, 6], [I, I, I, 6])]),
             common.pack_responses([([7, 8, 9], [I, I, 9]), ([7, 8, 10, 11], [I, I, 10, 11])])]
    assert packs[0][:3] == ([1, 2, 3, 4, 5, 6], [[0, 1, 2, 3, 4, 3]], [0, 0, 0, 1, 1, 2])
    assert packs[1][:3] == ([7, 8, 9, 10, 11], [[0, 1, 2, 2, 3]], [0, 0, 1, 2, 2])
    input_ids, position_ids, seg, keep, scored = common.packed_batch(packs, pad_id=0)
    assert input_ids.tolist() == [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 0]]
    assert position_ids.tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 2, 2, 3, 0]]
    mask = attention.Kernel("padded", "tested").inputs(dict(input_ids=input_ids, position_ids=position_ids,
                                                            seg=seg))["attention_mask"]
    sees = {  # query -> keys it may attend to, written out by hand
        0: [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 3, 4], [0, 1, 2, 5]],
        1: [[0], [0, 1], [0, 1, 2], [0, 1, 3], [0, 1, 3, 4], [5]],  # row 1's last position is padding: itself
    }
    for b, rows in sees.items():
        for q, keys in enumerate(rows):
            assert [k for k in range(6) if mask[b, 0, q, k]] == keys, (b, q)
    assert mask.dtype == torch.bool
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
    model, processor = loading.load_model(str(toy / "model"))
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(0)
    model = loading.with_lora(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                target_modules=common.LORA_TARGETS))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model.to(dtype), processor


def _examples(toy, n=3):
    """n real toy images and questions, each with a chosen answer and a shorter rejected one of varying length, so
    prompts, responses and padding differ across the batch."""
    recs = json.load(open(toy / "train.json"))[:n]
    return [(data.load_image(str(toy / "images"), rec["image"]),
             rec["conversations"][0]["value"].replace("<image>\n", "") + " please" * i,
             [rec["conversations"][1]["value"], " ".join(rec["conversations"][1]["value"].split()[:2 + 2 * i])], ())
            for i, rec in enumerate(recs)]


def _plain_logps(model, processor, examples, fmt):
    """Independent path: each response its own padded sequence, pixel values through the full model (its own
    positions, masks and image handling), a full log-softmax over every position, labels shifted by one."""
    family = family_of(model)
    visions, flat = [], []
    for image, prompt, responses, history in examples:
        vision, seqs, _ = common.build_sequences(processor, image, prompt, responses, 512, fmt, history)
        visions.append(vision)
        flat.append(seqs)
    seqs = [s[0] for s in flat] + [s[1] for s in flat]
    input_ids, mask, labels = common.pad_batch(seqs, processor.tokenizer.pad_token_id)
    vision = family.cat_images(visions + visions)
    vision["pixel_values"] = vision["pixel_values"].to(model.dtype)
    logits = model(**plain_inputs(model, input_ids, vision, mask)).logits
    logprobs = F.log_softmax(logits[:, :-1].double(), dim=-1)
    target = labels[:, 1:]
    scored = target != I
    picked = logprobs.gather(2, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * scored).sum(-1)


def packed_logps(model, processor, examples, fmt, kernel):
    """03's path: the examples packed (padded rows, or one flat row), the kernel's attention, common.response_logps
    (the image features once, logits at the scored positions only)."""
    batch = common.pack_pairs(processor, examples, 512, fmt, flat=kernel != "padded")
    batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
    attention.use_packed_attention(model, on=kernel != "padded")
    try:
        inputs = attention.Kernel(kernel, "tested", rule=attention.rule_for(model.config)).inputs(batch)
        return common.response_logps(model, model, inputs, batch["scored"], len(batch["n_tokens"]))[0].double()
    finally:
        attention.use_packed_attention(model, on=False)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kernel,dtype", [("padded", torch.float32), ("per_pair", torch.float32),
                                          ("padded", torch.float64)], ids=["padded", "per_pair", "padded-float64"])
def test_packed_logps_and_lora_grads_equal_plain_forward(arch, kernel, dtype, request):
    """Packed log-probs (the prefix once, each response continuing its positions: the family's own, multimodal rotary
    ones for Qwen; the family's attention rule: Gemma 3's image block and sliding windows) and their LoRA gradients =
    the model's own plain forward of each [prefix, response]; in float64 to rounding."""
    toy = arch_world(request, arch)[0]
    model, processor = lora_model(toy, arch, dtype)
    fmt = family_of(model).input_format
    examples = _examples(toy)
    weights = torch.randn(2 * len(examples), dtype=torch.float64)  # a random linear loss: every log-prob's gradient
    results = []
    for path in (lambda: _plain_logps(model, processor, examples, fmt),
                 lambda: packed_logps(model, processor, examples, fmt, kernel)):
        model.zero_grad()
        logps = path()
        (weights * logps).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        with torch.no_grad(), model.disable_adapter():
            ref = path()
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


@pytest.mark.parametrize("image,window", [(False, None), (True, 4)], ids=["causal", "image-block-and-window"])
def test_block_mask_pack_masks_and_dense_are_the_same_attention(image, window):
    """FlexAttention with block_mask (eager: CPU has no fused kernel) = one SDPA per pack with pack_masks = the dense
    mask = a mask written from the rule by hand loops (same pack, and key earlier in the prompt or the query's
    response, or both in one image; within `window` positions), float64. Pack 1's second response continues the
    prompt's positions, so the window is in positions, not places in the row."""
    from torch.nn.attention.flex_attention import flex_attention
    doc = torch.tensor([[0] * 9 + [1] * 7])
    seg = torch.tensor([[0, 0, 0, 0, 1, 1, 2, 2, 2, 0, 0, 1, 1, 1, 2, 2]])
    img = torch.tensor([[-1, 0, 0, 0, -1, -1, -1, -1, -1, -1, 1, -1, -1, -1, -1, -1]]) if image else torch.full_like(doc, -1)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 4, 5, 6, 0, 1, 2, 3, 4, 2, 3]])
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 8, dtype=torch.float64) for _ in range(3))
    by_hand = torch.tensor([[doc[0, j] == doc[0, i] and (
        (j <= i and (seg[0, j] == 0 or seg[0, j] == seg[0, i])) or (img[0, i] >= 0 and img[0, i] == img[0, j]))
        and (window is None or pos[0, i] - pos[0, j] < window) for j in range(16)] for i in range(16)])
    if image:
        assert by_hand[1, 3] and not by_hand[4, 5]  # the image sees ahead within itself; text stays causal
    if window:
        assert not by_hand[8, 1] and by_hand[8, 3]  # 6 - 1 >= 4 positions back; 6 - 3 < 4
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=by_hand)
    flex = flex_attention(q, k, v, block_mask=attention.block_mask(doc, seg, img, pos, window))
    layer = "sliding_attention" if window else "full_attention"
    masks = {layer: attention.pack_masks(doc, seg, img, pos, window)}
    per_pack, _ = attention.packed_attention_forward(None, q, k, v, None, sliding_window=window, pack_masks=masks)
    dense = attention.dense_mask(doc, seg, img, pos, window)
    assert torch.equal(dense[0, 0], by_hand)
    assert torch.allclose(flex, want, atol=1e-12)
    assert torch.allclose(per_pack.transpose(1, 2), want, atol=1e-12)


@pytest.mark.parametrize("arch,num_beams", [(arch, 1) for arch in ARCHS] + [("llava", 3)])
def test_static_cache_generation_equals_the_dynamic_cache(arch, num_beams, request):
    """generation.generate (static KV cache) returns the tokens of transformers' default dynamic cache, greedy and
    with beams (05's protocol), on a batch of left-padded prompts of different lengths, in the family's format."""
    toy, (model, processor) = arch_world(request, arch)
    fmt = family_of(model).input_format
    recs = json.load(open(toy / "train.json"))[:6]
    images = [data.load_image(str(toy / "images"), r["image"]) for r in recs]
    # captions and short questions (the quick world's weak model words every caption alike)
    prompts = ["Describe the image in detail."] * 3 + [r["conversations"][2]["value"] + " please" * i
                                                         for i, r in enumerate(recs[3:])]
    ours = generation.generate(model, processor, images, prompts, fmt, max_new_tokens=24, num_beams=num_beams)
    enc = common.encode(processor, [common.chat_prompt(processor, p, fmt) for p in prompts], images, fmt)
    out = model.generate(**enc, max_new_tokens=24, do_sample=False, num_beams=num_beams,
                         pad_token_id=processor.tokenizer.pad_token_id)[:, enc["input_ids"].shape[1]:]
    assert ours == [t.strip() for t in processor.batch_decode(out, skip_special_tokens=True)]
    assert len(set(ours)) > 1  # the answers differ: a real comparison, not one repeated string
