"""What is the Qwen families' own (families/qwen2_vl.py): multimodal rotary positions written from the rule = each
model's get_rope_index, the noise scaled per image over a block of patches, the ChatML prompt and the image token
count, the family's input format by default. Everything the families share is in test_families.py."""
import json

import pytest
import torch

import common
import data
import generation
from conftest import arch_world
from families import family_of, model_type
from families.qwen2_vl import mrope_positions


def _prompt(processor, toy, question="Describe the image.", k=0):
    recs = json.load(open(toy / "train.json"))
    image = data.load_image(toy / "images", recs[k]["image"])
    enc = common.encode(processor, [common.chat_prompt(processor, question, common.TEMPLATE)], [image],
                        common.TEMPLATE)
    return image, enc


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_mrope_positions_equal_the_models_rope_index(arch, request):
    """mrope_positions (written from the rule, no model) = the model's own get_rope_index, on the toy's prompt and on
    a made-up 2-image sequence with a non-square grid."""
    toy, (model, processor) = arch_world(request, arch)
    _, enc = _prompt(processor, toy)
    want, _ = model.model.get_rope_index(enc["input_ids"], enc["mm_token_type_ids"], enc["image_grid_thw"])
    got = mrope_positions(enc["input_ids"][0].tolist(), model.config.image_token_id, enc["image_grid_thw"], 2)
    assert got == want[:, 0].tolist()
    assert len(set(got[1])) > len(set(got[0]))  # the image's tokens really spread over height and width
    img = model.config.image_token_id
    ids = [20, 21, *[img] * 6, 22, 23, *[img] * 4, 24]  # a 2 x 3 and a 2 x 2 grid of merged cells
    grids = torch.tensor([[1, 4, 6], [1, 4, 4]])
    types = torch.tensor([[int(t == img) for t in ids]])
    want, _ = model.model.get_rope_index(torch.tensor([ids]), types, grids)
    assert mrope_positions(ids, img, grids, 2) == want[:, 0].tolist()


def test_weakening_scales_the_noise_per_image(qwen_model):
    """Qwen2.5-VL hands the merger every image's patches as one block: each image's noise is scaled by its own
    features' std (as LLaVA's per-image rows), not the batch's."""
    x = torch.cat([torch.randn(64, 8), 10 * torch.randn(16, 8)])
    scale = common._feature_scale(x, [64, 16])
    assert scale.shape == (80, 1)
    assert scale[0].item() == pytest.approx(x[:64].std().item()) and scale[-1].item() == pytest.approx(x[64:].std().item())


def test_generation_and_image_token_count(qwen_toy, qwen_model):
    """The template's prompt (ChatML, its system turn), 16 image tokens for a 64 px image (8 px patches merged
    2 x 2) as image_token_count says, and batched greedy answers that end at <|im_end|>."""
    model, processor = qwen_model
    image, enc = _prompt(processor, qwen_toy)
    text = common.chat_prompt(processor, "Describe the image.", common.TEMPLATE)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    n_image = int((enc["input_ids"] == model.config.image_token_id).sum())
    assert n_image == 16 == family_of(processor).image_extra_tokens(processor, image, common.TEMPLATE) + 1
    ids = common.response_ids(processor.tokenizer, text, "there is a cup .")
    assert ids[-1] == processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert processor.tokenizer.decode(ids[:-1]) == "there is a cup ."
    answers = generation.generate(model, processor, [image, image], ["Describe the image.", "Is there a cup?"],
                                  common.TEMPLATE, max_new_tokens=8)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_format_defaults_follow_the_family(qwen_toy, toy):
    """No --chat_format / --pad_square: Qwen2.5-VL's template at its own resolution, LLaVA-1.5's Vicuna-v1 with
    square padding; a flag given wins."""
    import argparse
    ns = lambda model, **kw: argparse.Namespace(model=str(model), chat_format=None, pad_square=None, **{
        k: v for k, v in kw.items()})
    assert common.input_format(ns(qwen_toy / "model")) == common.TEMPLATE
    assert common.input_format(ns(toy / "model")) == common.LLAVA_15
    assert common.input_format(argparse.Namespace(model=str(qwen_toy / "model"), chat_format=None,
                                                  pad_square=True)) == ("template", True)
    # a hub id not in the cache: a family's known checkpoint, nothing fetched (an error test must not wait on the network)
    assert model_type("Qwen/Qwen2.5-VL-7B-Instruct") == "qwen2_5_vl"
    assert model_type("llava-hf/llava-1.5-7b-hf") == "llava" and model_type("google/gemma-3-12b-it") == "gemma3"
