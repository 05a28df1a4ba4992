"""The math of common.py against independent computations."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import attention
import common
import data
import generation
from conftest import ARCHS, arch_world
from families import family_of

LLAMA_TOK = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "llama2-tokenizer")


def test_noise_schedule_matches_closed_form():
    abar = common.noise_schedule()
    # independent: the betas of VCD written out in plain floats, the product taken term by term
    prod = 1.0
    for i in range(1000):
        x = -6 + 12 * i / 999
        beta = (1 / (1 + math.exp(-x))) * (0.5e-2 - 1e-5) + 1e-5
        prod *= 1 - beta
        if i + 1 in (1, 200, 500, 800, 1000):
            assert abar[i].item() == pytest.approx(prod, rel=1e-9)
    # abar at t = 200 / 500 / 800 / 999 as docs/toy_world.md quotes them
    for t, want in [(200, 0.99), (500, 0.75), (800, 0.22), (999, 0.08)]:
        assert abar[t - 1].item() == pytest.approx(want, abs=0.01)


def test_diffuse_is_x_t():
    x = torch.randn(2, 5, 7) * 3 + 1
    for step in (1, 500, 1000):
        got = common.diffuse(x, step, scale=2.5, generator=torch.Generator().manual_seed(7))
        eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
        a = common.noise_schedule()[step - 1].item()
        assert torch.allclose(got, math.sqrt(a) * x + math.sqrt(1 - a) * 2.5 * eps, atol=1e-6)
    assert common.diffuse(x, 0, scale=2.5) is x


def _logits(model, processor, image, noise_step=0, noise_on="features"):
    enc = processor(text=[common.chat_prompt(processor, "Describe the image in detail.")], images=[image],
                    return_tensors="pt")
    with torch.no_grad(), common.weaken_images(model, noise_step, noise_on, torch.Generator().manual_seed(0)):
        return model(**enc).logits


@pytest.mark.parametrize("noise_on", ["features", "pixels"])
def test_weakening_changes_logits_and_step0_does_not(toy, toy_model, noise_on):
    model, processor = toy_model
    image = data.load_image(toy / "images", sorted(os.listdir(toy / "images"))[0])
    clean = _logits(model, processor, image)
    assert torch.equal(clean, _logits(model, processor, image, 0, noise_on))
    weak = _logits(model, processor, image, 800, noise_on)
    assert (weak - clean).abs().max() > 1e-3
    assert torch.equal(clean, _logits(model, processor, image))  # the hook is gone after the context


def test_packed_logps_equals_log_softmax_gather():
    torch.manual_seed(0)
    logits = torch.randn(7, 11)  # the kept positions' logits
    index = torch.tensor([0, 1, 2, 4, 5, 6])  # row 3 is kept but scores nothing
    toks = torch.randint(0, 11, (6,))
    slots = torch.tensor([0, 0, 2, 2, 2, 0])  # slot 1: a response with no scored token
    want = torch.zeros(3)
    logp = torch.log_softmax(logits.double(), -1)
    for i, t, s in zip(index.tolist(), toks.tolist(), slots.tolist()):
        want[s] += logp[i, t]
    got = common.packed_logps(logits, (index, toks, slots), 3)
    assert torch.allclose(got, want.float(), atol=1e-5)
    assert got[1] == 0


def test_packed_logps_equal_model_token_loss(toy, toy_model):
    """Summed response log-probs = -(mean token loss of the model's own loss) x number of tokens,
    with prompt and image tokens masked."""
    model, processor = toy_model
    image = data.load_image(toy / "images", sorted(os.listdir(toy / "images"))[0])
    words = [w for w in processor.tokenizer.get_vocab() if w.isalpha()][:5]
    vision, seqs, cut = common.build_sequences(processor, image, "Describe the image in detail.",
                                                     [" ".join(words), words[0]], max_length=512)
    input_ids, mask, labels = common.pad_batch(seqs, processor.tokenizer.pad_token_id)
    with torch.no_grad():
        ids, position_ids, seg, keep, scored = common.packed_batch([common.pack_responses(seqs)],
                                                                   processor.tokenizer.pad_token_id)
        inputs = attention.Kernel("padded", "tested").inputs(dict(input_ids=ids, position_ids=position_ids, seg=seg,
                                                                  logits_to_keep=keep, **vision))
        ours = common.response_logps(model, model, inputs, scored, 2)[0]
        for i in range(2):
            out = model(input_ids=input_ids[i:i + 1], attention_mask=mask[i:i + 1], **vision,
                        labels=labels[i:i + 1])
            n = (labels[i, 1:] != common.IGNORE).sum()
            assert ours[i].item() == pytest.approx(-(out.loss * n).item(), rel=1e-4)
    assert cut == 0
    # scored: exactly the response words and EOS, nothing of the prompt or the image
    n_image = int((input_ids[0] == model.config.image_token_id).sum())
    assert n_image > 0 and (labels[0][input_ids[0] == model.config.image_token_id] == common.IGNORE).all()
    scored = labels[0][labels[0] != common.IGNORE].tolist()
    assert scored == processor.tokenizer(" ".join(words), add_special_tokens=False).input_ids + [
        processor.tokenizer.eos_token_id]


def test_truncation_cuts_the_response_never_the_image(toy, toy_model):
    model, processor = toy_model
    image = data.load_image(toy / "images", sorted(os.listdir(toy / "images"))[0])
    prompt_len = len(processor(text=[common.chat_prompt(processor, "q")], images=[image]).input_ids[0])
    _, seqs, cut = common.build_sequences(processor, image, "q", ["a " * 50, "a"], max_length=prompt_len + 5)
    assert cut == 1 and len(seqs[0][0]) == prompt_len + 5 and len(seqs[1][0]) == prompt_len + 2
    with pytest.raises(ValueError, match="more than --max_length"):
        common.build_sequences(processor, image, "q", ["a"], max_length=prompt_len - 1)


def test_response_ids_on_real_llama2_subwords():
    if not os.path.isdir(LLAMA_TOK):
        pytest.skip("../shared/llama2-tokenizer not present")
    pytest.importorskip("sentencepiece")
    from transformers import LlamaTokenizer
    tok = LlamaTokenizer.from_pretrained(LLAMA_TOK, add_bos_token=True, legacy=False)
    prompt = "USER: <image>\nWhat is on the table? ASSISTANT:"
    assert tok(prompt).input_ids[0] == tok.bos_token_id
    ids = common.response_ids(tok, prompt, "A cup and a plate.")
    assert tok.convert_ids_to_tokens(ids) == ["▁A", "▁cup", "▁and", "▁a", "▁plate", ".", "</s>"]
    # joint tokenisation: prompt tokens are a prefix, the response continues exactly as generated
    assert tok(prompt + " A cup and a plate.").input_ids == tok(prompt).input_ids + ids[:-1]


def test_dpo_loss_hand_computed():
    pc, pr = torch.tensor([-10.0, -20.0, -5.0]), torch.tensor([-12.0, -18.0, -5.0])
    rc, rr = torch.tensor([-11.0, -19.0, -6.0]), torch.tensor([-11.0, -19.0, -4.0])
    losses, cr, rj = common.dpo_loss(pc, pr, rc, rr, beta=0.5)
    # rewards: 0.5*(pc-rc) = [0.5, -0.5, 0.5]; 0.5*(pr-rr) = [-0.5, 0.5, -0.5]; margins [1, -1, 1]
    assert cr.tolist() == [0.5, -0.5, 0.5] and rj.tolist() == [-0.5, 0.5, -0.5]
    want = [math.log(1 + math.exp(-1)), math.log(1 + math.exp(1)), math.log(1 + math.exp(-1))]
    assert losses.tolist() == pytest.approx(want, rel=1e-6)
    assert (cr > rj).float().mean().item() == pytest.approx(2 / 3)


def test_dpo_loss_gradient_direction():
    pc = torch.tensor([-3.0], requires_grad=True)
    pr = torch.tensor([-3.0], requires_grad=True)
    losses, _, _ = common.dpo_loss(pc, pr, torch.tensor([-3.0]), torch.tensor([-3.0]), beta=0.1)
    losses.sum().backward()
    # at zero margin d/dpc = -beta * sigmoid(0) = -0.05: raising chosen lowers the loss
    assert pc.grad.item() == pytest.approx(-0.05) and pr.grad.item() == pytest.approx(0.05)
    assert F.logsigmoid(torch.tensor(0.0)).item() == pytest.approx(-losses.item())


def test_contrastive_logits_by_hand():
    """The released sampler's rule (VCD's): (1 + a) clean - a weak, kept where the clean probability is at least
    beta times the clean maximum (a logit within log beta of the best), -inf elsewhere."""
    clean = torch.tensor([[2.0, 1.0, 0.0, -3.0]])
    weak = torch.tensor([[1.0, 2.0, 0.0, 0.0]])
    got = generation.contrastive_logits(clean, weak, alpha=1.0, beta=0.2)
    # cutoff log 0.2 + 2 = 0.391: tokens 0 and 1 stay (2, 1), tokens 2 (0) and 3 (-3) go
    assert got[0, :2].tolist() == [2 * 2.0 - 1.0, 2 * 1.0 - 2.0] and torch.isinf(got[0, 2:]).all()
    p = torch.softmax(clean, -1)
    assert ((p >= 0.2 * p.max()) == torch.isfinite(got)).all()  # the cut is on probabilities, as VCD's


@pytest.mark.parametrize("arch", ARCHS)
def test_contrastive_sampling_first_step_and_cache(arch, request):
    """generate_contrastive's first token at a near-zero temperature is the argmax of contrastive_logits over a
    plain forward of the clean and of the weakened image; its cached decoding equals greedy generate at alpha 0
    (each family's branches on the model's own positions and image inputs: Qwen's multimodal rotary positions,
    Qwen3-VL's deepstack, Gemma 3's image block)."""
    toy, (model, processor) = arch_world(request, arch)
    fmt = family_of(model).input_format
    recs = json.load(open(toy / "train.json"))[:2]
    images = [data.load_image(toy / "images", r["image"]) for r in recs]
    prompts = ["Describe the image in detail."] * 2
    enc = common.encode(processor, [common.chat_prompt(processor, p, fmt) for p in prompts], images, fmt)
    with torch.no_grad():
        clean = model(**enc).logits[:, -1]
        with common.weaken_images(model, 900, "pixels", torch.Generator().manual_seed(5)):
            weak = model(**enc).logits[:, -1]
    want = generation.contrastive_logits(clean, weak, 1.0, 0.2).argmax(-1)
    texts = generation.generate_contrastive(model, processor, images, prompts, fmt,
                                            (900, "pixels", torch.Generator().manual_seed(5)), 1.0, 0.2,
                                            temperature=1e-6, max_new_tokens=1)
    assert texts == [processor.tokenizer.decode([t], skip_special_tokens=True).strip() for t in want.tolist()]
    plain = generation.generate(model, processor, images, prompts, fmt, max_new_tokens=20)
    assert generation.generate_contrastive(model, processor, images, prompts, fmt, (0, "features", None),
                                           0.0, 1e-9, temperature=1e-6, max_new_tokens=20) == plain
