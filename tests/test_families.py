"""Every model family (families/) through the same scripts, each on a quick toy world of its own architecture
(00_make_toy.py --arch MODEL_TYPE): weakening moves only what the image feeds, 01 -> 03 (step-1 loss ln 2, every
objective at step 1, resume = straight, DDP 2 = 1), 05 and 07 on the adapter, 08's export = base + adapter, and an
unknown model_type is a one-line error. LLaVA-1.5's own tests of these are in test_pipeline.py, test_objectives.py and
test_export.py; the packed log-probs against the plain forward are in test_fast_path.py, for every family."""
import json
import math

import pytest
import torch

import common
import dist_io
import loading
from conftest import ARCHS, arch_world, quick_world, run_here, run_torchrun
from families import FAMILIES, family_of, image_features
from test_pipeline import adapter, assert_same_weights, stopped_copy

OTHERS = [a for a in ARCHS if a != "llava"]  # LLaVA-1.5 runs these in the files named above


def fed(out):
    """Every image's features an encoder output hands to the language model: pooler_output's, and each deepstack
    layer's (Qwen3-VL), one tensor an image."""
    return [image for seq in [out.pooler_output, *(getattr(out, "deepstack_features", None) or [])] for image in seq]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("noise_on", ["features", "pixels"])
def test_weakening_moves_only_what_the_image_feeds(arch, noise_on, request):
    """Weakened features (every place the family feeds the image into the language model: Qwen3-VL's deepstack too)
    or pixels: every image feature the encoder hands over changes, for every image; step 0 changes nothing; the hooks
    are gone after the context."""
    toy, (model, processor) = arch_world(request, arch)
    recs = json.load(open(toy / "train.json"))[:2]
    from data import load_image
    images = [load_image(toy / "images", r["image"]) for r in recs]
    fmt = family_of(model).input_format
    enc = common.encode(processor, [common.chat_prompt(processor, "Describe the image.", fmt)] * 2, images, fmt)
    clean = fed(image_features(model, enc))
    with common.weaken_images(model, 0, noise_on):
        assert all(torch.equal(a, b) for a, b in zip(fed(image_features(model, enc)), clean))
    with common.weaken_images(model, 600, noise_on, torch.Generator().manual_seed(0)):
        weak = fed(image_features(model, enc))
    assert len(weak) == len(clean) >= 2
    assert all((a - b).abs().max() > 1e-4 for a, b in zip(weak, clean))  # every image, every place it enters
    assert all(torch.equal(a, b) for a, b in zip(fed(image_features(model, enc)), clean))
    if arch == "qwen3_vl":
        assert len(image_features(model, enc).deepstack_features) == 2  # two deepstack layers, both noised


def test_an_unknown_model_type_is_a_one_line_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "idefics3"}))
    with pytest.raises(SystemExit) as e:
        family_of(str(tmp_path))
    assert "'idefics3'" in str(e.value) and all(arch in str(e.value) for arch in FAMILIES)
    proc = run_here("03_train_bpo.py", "--model", tmp_path, "--data", tmp_path / "config.json", "--image_root",
                    tmp_path, "--output_dir", tmp_path / "run", "--dry_run")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1 and "supported model_types" in errors[0], proc.stderr[-2000:]


_PAIRS = {}


def family_pairs(arch, tmp_path_factory):
    """01's image-weakened pairs on the family's quick world (24 items), once a session."""
    if arch not in _PAIRS:
        toy = quick_world(arch, tmp_path_factory)
        out = tmp_path_factory.mktemp(f"pairs_{arch}") / "pairs.jsonl"
        run_here("01_build_pairs.py", "--model", toy / "model", "--data", f"toy={toy / 'train.json'}",
                 "--image_root", toy / "images", "--out", out, "--max_new_tokens", 40, "--seed", 0,
                 "--samples_per_source", 24, "--batch_size", 12, check=True)
        _PAIRS[arch] = out
    return _PAIRS[arch]


def train(toy, pairs, out, *extra):
    return run_here("03_train_bpo.py", "--model", toy / "model", "--data", pairs, "--image_root", toy / "images",
                    "--output_dir", out, "--lora_r", 8, "--lora_alpha", 16, "--lora_dropout", 0, "--seed", 0,
                    "--lr", 1e-3, "--save_every", 0, *extra, check=True)


@pytest.mark.parametrize("arch", OTHERS)
def test_pairs_step_one_objectives_and_export(arch, tmp_path_factory, tmp_path):
    """01's pairs (and its dry run, which counts each image's tokens the family's way), 03 at step 1: DPO's loss ln 2
    and margin 0 (LoRA's B is zero), IPO on per-token log-ratios 25, the anchor and the conditional term (the chosen
    answer given the weakened image) ln 2 each; the adapter moves the language model only; 08's export loads back
    as base + adapter, with the family's processor."""
    toy, pairs = quick_world(arch, tmp_path_factory), family_pairs(arch, tmp_path_factory)
    recs = dist_io.read_jsonl(pairs)
    assert len(recs) > 4 and all(r["method"] == "image_weakened" and r["chosen"] != r["rejected"] for r in recs)
    dry = run_here("01_build_pairs.py", "--model", toy / "model", "--data", f"toy={toy / 'train.json'}",
                   "--image_root", toy / "images", "--out", tmp_path / "unused.jsonl", "--dry_run", check=True)
    assert "prompt tokens (image included)" in dry.stdout and not (tmp_path / "unused.jsonl").exists()
    train(toy, pairs, tmp_path / "dpo", "--batch_size", 4, "--max_steps", 2)
    rows = dist_io.read_jsonl(tmp_path / "dpo" / "metrics.jsonl")
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert rows[0]["rewards/margins"] == pytest.approx(0, abs=1e-6)
    train(toy, pairs, tmp_path / "ipo", "--batch_size", 4, "--max_steps", 1, "--loss", "ipo", "--length_normalize",
          "--anchor_weight", 0.5, "--conditional_weight", 0.3)
    row = dist_io.read_jsonl(tmp_path / "ipo" / "metrics.jsonl")[0]
    assert row["loss/anchor"] == pytest.approx(math.log(2), abs=1e-5)
    assert row["loss/conditional"] == pytest.approx(math.log(2), abs=1e-5)
    assert row["loss"] == pytest.approx(25 + 0.8 * math.log(2), abs=1e-4)
    assert all(r["chosen_weak"] != r["chosen"] for r in dist_io.read_jsonl(tmp_path / "ipo" / "ref_logps.jsonl"))
    merged, _ = loading.load_model(str(toy / "model"), adapter=str(tmp_path / "dpo" / "adapter"))
    base, _ = loading.load_model(str(toy / "model"))
    merged_params = dict(merged.named_parameters())
    for name, base_param in base.named_parameters():  # LoRA moved the language model, nothing of the vision side
        changed = not torch.equal(merged_params[name], base_param)
        assert changed == (".language_model." in name and name.endswith("proj.weight")), name
    run_here("08_export.py", "--model", toy / "model", "--adapter", tmp_path / "dpo" / "adapter", "--out",
             tmp_path / "export", check=True)
    exported, processor = loading.load_model(str(tmp_path / "export"))
    for name, p in exported.named_parameters():
        assert torch.allclose(p, merged_params[name], atol=1e-6), name
    assert processor.chat_template == loading.load_processor(str(toy / "model")).chat_template


@pytest.mark.parametrize("arch", OTHERS)
def test_resume_equals_straight_run(arch, tmp_path_factory, tmp_path):
    toy, pairs = quick_world(arch, tmp_path_factory), family_pairs(arch, tmp_path_factory)
    args = ("--batch_size", 4, "--max_steps", 4, "--save_every", 2)
    train(toy, pairs, tmp_path / "straight", *args)
    cut, _ = stopped_copy(tmp_path / "straight", tmp_path / "cut", 2, 3)
    proc = train(toy, pairs, cut, *args, "--resume")
    assert "checkpoint-2" in proc.stdout
    assert_same_weights(adapter(cut), adapter(tmp_path / "straight"), atol=1e-6)
    assert [r["step"] for r in dist_io.read_jsonl(cut / "metrics.jsonl")] == [1, 2, 3, 4]


@pytest.mark.parametrize("arch", OTHERS)
def test_ddp_two_processes_equal_one(arch, tmp_path_factory, tmp_path):
    toy, pairs = quick_world(arch, tmp_path_factory), family_pairs(arch, tmp_path_factory)
    args = ["--model", toy / "model", "--data", pairs, "--image_root", toy / "images", "--lora_r", 8,
            "--lora_alpha", 16, "--lora_dropout", 0, "--lr", 1e-3, "--max_steps", 2, "--save_every", 0, "--seed", 0]
    run_here("03_train_bpo.py", *args, "--output_dir", tmp_path / "one", "--batch_size", 4, check=True)
    proc = run_torchrun("03_train_bpo.py", *args, "--output_dir", tmp_path / "two", "--batch_size", 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_weights(adapter(tmp_path / "two"), adapter(tmp_path / "one"), atol=1e-5)
    for a, b in zip(*(dist_io.read_jsonl(tmp_path / d / "metrics.jsonl") for d in ("one", "two"))):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)


@pytest.mark.parametrize("arch", OTHERS)
def test_halbench_and_pope_answer_and_score(arch, tmp_path_factory, tmp_path):
    """05 and 07 on the family's base model, as make demo runs them: answers for every question, scores in range."""
    toy = quick_world(arch, tmp_path_factory)
    run_here("05_eval_halbench.py", "--model", toy / "model", "--questions", toy / "halbench.jsonl", "--image_dir",
             toy / "images", "--objects", toy / "halbench_objects.json", "--synonyms", toy / "synonyms.txt",
             "--out_dir", tmp_path / "hal", "--max_new_tokens", 24, "--num_beams", 1, check=True)
    scores = json.loads((tmp_path / "hal" / "scores.json").read_text())
    assert scores["n"] == len((toy / "halbench.jsonl").read_text().splitlines()) and 0 <= scores["chair_s"] <= 100
    run_here("07_eval_pope.py", "--model", toy / "model", "--questions", toy / "pope" / "coco_pope_random.json",
             "--image_dir", toy / "images", "--out_dir", tmp_path / "pope", "--prompt_suffix", "",
             "--max_new_tokens", 12, check=True)
    pope = json.loads((tmp_path / "pope" / "scores.json").read_text())["random"]
    assert pope["n"] == len((toy / "pope" / "coco_pope_random.json").read_text().splitlines())
