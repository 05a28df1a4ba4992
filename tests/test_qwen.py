"""The second family, Qwen2.5-VL, on its quick toy world (00_make_toy.py --arch qwen2_5_vl): its multimodal
rotary positions, weakening before the patch merger, and 01 -> 03 as for LLaVA (step-1 loss ln 2, resume, DDP).
The packed log-probs against the plain forward are in test_fast_path.py and test_objectives.py, both families."""
import json
import math

import pytest
import torch

import common
import data
import dist_io
from conftest import plain_inputs, run_here, run_torchrun
from test_pipeline import adapter, assert_same_weights, stopped_copy


def _prompt(processor, toy, question="Describe the image.", k=0):
    recs = json.load(open(toy / "train.json"))
    image = data.load_image(toy / "images", recs[k]["image"])
    enc = common.encode(processor, [common.chat_prompt(processor, question, common.QWEN_FORMAT)], [image],
                        common.QWEN_FORMAT)
    return image, enc


def test_mrope_positions_equal_the_models_rope_index(qwen_toy, qwen_model):
    """common.mrope_positions (written from the rule, no model) = Qwen2.5-VL's own get_rope_index, on the toy's
    prompt and on a made-up 2-image sequence with a non-square grid."""
    model, processor = qwen_model
    _, enc = _prompt(processor, qwen_toy)
    want, _ = model.model.get_rope_index(enc["input_ids"], enc["mm_token_type_ids"], enc["image_grid_thw"])
    got = common.mrope_positions(enc["input_ids"][0].tolist(), model.config.image_token_id, enc["image_grid_thw"], 2)
    assert got == want[:, 0].tolist()
    assert len(set(got[1])) > len(set(got[0]))  # the image's tokens really spread over height and width
    img = model.config.image_token_id
    ids = [20, 21, *[img] * 6, 22, 23, *[img] * 4, 24]  # a 2 x 3 and a 2 x 2 grid of merged cells
    grids = torch.tensor([[1, 4, 6], [1, 4, 4]])
    types = torch.tensor([[int(t == img) for t in ids]])
    want, _ = model.model.get_rope_index(torch.tensor([ids]), types, grids)
    assert common.mrope_positions(ids, img, grids, 2) == want[:, 0].tolist()


@pytest.mark.parametrize("noise_on", ["features", "pixels"])
def test_weakening_changes_the_image_features_and_nothing_else(qwen_toy, qwen_model, noise_on):
    """Weakened before the merger (features) or on the pixels: the image tokens' embeddings change, every text
    token's stays; step 0 changes nothing; the hooks are gone after the context."""
    model, processor = qwen_model
    _, enc = _prompt(processor, qwen_toy)
    embeds = lambda: common.image_embeds(model, enc["input_ids"], enc)
    clean = embeds()
    with common.weaken_images(model, 0, noise_on):
        assert torch.equal(embeds(), clean)
    with common.weaken_images(model, 500, noise_on, torch.Generator().manual_seed(0)):
        weak = embeds()
    is_image = enc["input_ids"][0] == model.config.image_token_id
    assert (weak[0, is_image] - clean[0, is_image]).abs().min() > 0
    assert torch.equal(weak[0, ~is_image], clean[0, ~is_image])
    assert torch.equal(embeds(), clean)


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
    text = common.chat_prompt(processor, "Describe the image.", common.QWEN_FORMAT)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    n_image = int((enc["input_ids"] == model.config.image_token_id).sum())
    assert n_image == 16 == common.image_token_count(processor, image, common.QWEN_FORMAT)
    ids = common.response_ids(processor.tokenizer, text, "there is a cup .")
    assert ids[-1] == processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert processor.tokenizer.decode(ids[:-1]) == "there is a cup ."
    answers = common.generate(model, processor, [image, image], ["Describe the image.", "Is there a cup?"],
                              common.QWEN_FORMAT, max_new_tokens=8)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_format_defaults_follow_the_family(qwen_toy, toy):
    """No --chat_format / --pad_square: Qwen2.5-VL's template at its own resolution, LLaVA-1.5's Vicuna-v1 with
    square padding; a flag given wins."""
    import argparse
    ns = lambda model, **kw: argparse.Namespace(model=str(model), chat_format=None, pad_square=None, **{
        k: v for k, v in kw.items()})
    assert common.input_format(ns(qwen_toy / "model")) == common.QWEN_FORMAT
    assert common.input_format(ns(toy / "model")) == common.LLAVA_15
    assert common.input_format(argparse.Namespace(model=str(qwen_toy / "model"), chat_format=None,
                                                  pad_square=True)) == ("template", True)
    # a hub id not in the cache: read off its name, nothing fetched (an error test must not wait on the network)
    assert common.model_family("Qwen/Qwen2.5-VL-7B-Instruct") == common.QWEN_VL
    assert common.model_family("llava-hf/llava-1.5-7b-hf") == "llava"


@pytest.fixture(scope="module")
def qwen_pairs(qwen_toy, tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen_pairs") / "pairs.jsonl"
    run_here("01_build_pairs.py", "--model", qwen_toy / "model", "--data", f"toy={qwen_toy / 'train.json'}",
             "--image_root", qwen_toy / "images", "--out", out, "--max_new_tokens", 48, "--seed", 0,
             "--samples_per_source", 24, "--batch_size", 12, check=True)
    return out


def _train(toy, pairs, out, *extra):
    return run_here("03_train_bpo.py", "--model", toy / "model", "--data", pairs, "--image_root", toy / "images",
                    "--output_dir", out, "--lora_r", 8, "--lora_alpha", 16, "--lora_dropout", 0, "--seed", 0,
                    "--lr", 1e-3, *extra, check=True)


def test_pairs_and_step_one_loss_is_ln2(qwen_toy, qwen_pairs, tmp_path):
    recs = dist_io.read_jsonl(qwen_pairs)
    assert len(recs) > 4 and all(r["method"] == "image_weakened" and r["chosen"] != r["rejected"] for r in recs)
    # the dry runs measure each prompt with its image's tokens (16 here)
    dry = run_here("01_build_pairs.py", "--model", qwen_toy / "model", "--data", f"toy={qwen_toy / 'train.json'}",
                   "--image_root", qwen_toy / "images", "--out", tmp_path / "unused.jsonl", "--dry_run", check=True)
    assert "prompt tokens (image included)" in dry.stdout and not (tmp_path / "unused.jsonl").exists()
    dry = _train(qwen_toy, qwen_pairs, tmp_path / "dry", "--dry_run")
    assert "dry run:" in dry.stdout and not (tmp_path / "dry").exists()
    _train(qwen_toy, qwen_pairs, tmp_path, "--batch_size", 4, "--max_steps", 2, "--save_every", 0)
    rows = dist_io.read_jsonl(tmp_path / "metrics.jsonl")
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # LoRA's B is zero: policy = reference
    assert rows[0]["rewards/margins"] == pytest.approx(0, abs=1e-6)
    model, _ = common.load_model(str(qwen_toy / "model"), adapter=str(tmp_path / "adapter"))
    base, _ = common.load_model(str(qwen_toy / "model"))
    merged = dict(model.named_parameters())
    for name, base_param in base.named_parameters():  # LoRA moved the language model, nothing of the vision side
        changed = not torch.equal(merged[name], base_param)
        assert changed == (".language_model." in name and name.endswith("proj.weight")), name
    # 08: the merged checkpoint (processor without its video half) loads back as the base + adapter
    run_here("08_export.py", "--model", qwen_toy / "model", "--adapter", tmp_path / "adapter", "--out",
             tmp_path / "export", check=True)
    exported, processor = common.load_model(str(tmp_path / "export"))
    for name, p in exported.named_parameters():
        assert torch.allclose(p, merged[name], atol=1e-6), name
    assert processor.chat_template == common.load_processor(str(qwen_toy / "model")).chat_template


def test_objective_terms_at_step_one(qwen_toy, qwen_pairs, tmp_path):
    """IPO on per-token log-ratios (25 at beta 0.1), the anchor and the conditional term (the chosen answer given
    the image weakened before the merger) ln 2 each at step 1."""
    _train(qwen_toy, qwen_pairs, tmp_path, "--batch_size", 4, "--max_steps", 1, "--save_every", 0, "--loss", "ipo",
           "--length_normalize", "--anchor_weight", 0.5, "--conditional_weight", 0.3)
    row = dist_io.read_jsonl(tmp_path / "metrics.jsonl")[0]
    assert row["loss/anchor"] == pytest.approx(math.log(2), abs=1e-5)
    assert row["loss/conditional"] == pytest.approx(math.log(2), abs=1e-5)
    assert row["loss"] == pytest.approx(25 + 0.8 * math.log(2), abs=1e-4)
    cache = dist_io.read_jsonl(tmp_path / "ref_logps.jsonl")
    assert all(r["chosen_weak"] != r["chosen"] for r in cache)


def test_resume_equals_straight_run(qwen_toy, qwen_pairs, tmp_path):
    args = ("--batch_size", 4, "--max_steps", 4, "--save_every", 2)
    _train(qwen_toy, qwen_pairs, tmp_path / "straight", *args)
    cut, _ = stopped_copy(tmp_path / "straight", tmp_path / "cut", 2, 3)
    proc = _train(qwen_toy, qwen_pairs, cut, *args, "--resume")
    assert "checkpoint-2" in proc.stdout
    assert_same_weights(adapter(cut), adapter(tmp_path / "straight"), atol=1e-6)
    assert [r["step"] for r in dist_io.read_jsonl(cut / "metrics.jsonl")] == [1, 2, 3, 4]


def test_ddp_two_processes_equal_one(qwen_toy, qwen_pairs, tmp_path):
    args = ["--model", qwen_toy / "model", "--data", qwen_pairs, "--image_root", qwen_toy / "images", "--lora_r", 8,
            "--lora_alpha", 16, "--lora_dropout", 0, "--lr", 1e-3, "--max_steps", 2, "--save_every", 0, "--seed", 0]
    run_here("03_train_bpo.py", *args, "--output_dir", tmp_path / "one", "--batch_size", 4, check=True)
    proc = run_torchrun("03_train_bpo.py", *args, "--output_dir", tmp_path / "two", "--batch_size", 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_weights(adapter(tmp_path / "two"), adapter(tmp_path / "one"), atol=1e-5)
    one, two = (dist_io.read_jsonl(tmp_path / d / "metrics.jsonl") for d in ("one", "two"))
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)

