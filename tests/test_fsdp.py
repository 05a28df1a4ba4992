"""03 --fsdp: the language model sharded with FSDP2 over 2 gloo processes trains the adapter one process trains
without it (per step and at the end), with accumulation, checkpointing, the conditional term and the precomputed or
per-step reference; a run resumed from its checkpoint ends as the straight run, with or without --fsdp; the adapter
loads with plain peft; flex's failure at its first training call falls back on every rank; the dry run's memory per
GPU by hand values."""
import json
import os
import re

import pytest
import torch

import dist_io
import loading
import runs
from conftest import ARCHS, ROOT, quick_world, run_here, run_torchrun, script, toy_pair_records
from test_pipeline import adapter, assert_same_weights, stopped_copy


def pairs_file(toy, folder, n):
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in toy_pair_records(toy, n)))
    return path


def train_args(toy, pairs, *extra):
    return ["--model", toy / "model", "--data", pairs, "--image_root", toy / "images", "--lora_r", 4,
            "--lora_alpha", 8, "--lora_dropout", 0, "--lr", 1e-3, "--seed", 0, *extra]


def assert_same_steps(a, b):
    rows_a, rows_b = (dist_io.read_jsonl(d / "metrics.jsonl") for d in (a, b))
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
    for x, y in zip(rows_a, rows_b):
        for key in ("loss", "logps/chosen", "logps/rejected", "grad_norm", "loss/conditional"):
            assert (key in x) == (key in y) and (key not in x or y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6)), \
                (key, x.get(key), y.get(key))


def test_fsdp_two_processes_train_as_one_and_resume(toy, tmp_path):
    """LLaVA: 2 processes --fsdp x batch 1 x accumulation 2, checkpointing, the conditional term, 25 pairs (the
    reference pass's shares uneven: 13 and 12, so a rank scores one batch more and drops it) = 1 process of 4 without
    it. Resumed from checkpoint-2 under --fsdp, and in one process without it (the checkpoint holds whole tensors):
    the straight run's adapter. The adapter loads onto the base with plain peft."""
    pairs = pairs_file(toy, tmp_path, 25)
    args = train_args(toy, pairs, "--max_steps", 4, "--save_every", 2, "--keep_checkpoints", 5,
                      "--conditional_weight", 0.5)
    run_here("03_train_bpo.py", *args, "--batch_size", 4, "--output_dir", tmp_path / "one", check=True)
    sharded = ("--batch_size", 1, "--grad_accum", 2, "--gradient_checkpointing", "--fsdp")
    two = run_torchrun("03_train_bpo.py", *args, *sharded, "--output_dir", tmp_path / "two")
    assert two.returncode == 0, two.stderr[-3000:]
    held = re.findall(r"fsdp: the language model in 5 units over 2 process\(es\); rank 0 holds ([\d,]+) of the "
                      r"model's ([\d,]+) parameters \(the vision side's ([\d,]+) whole\)", two.stdout)
    assert len(held) == 1, two.stdout[-2000:]
    mine, whole, vision = (int(x.replace(",", "")) for x in held[0])
    assert mine == pytest.approx(vision + (whole - vision) / 2, rel=0.01)  # half the rest (a shard rounds up)
    assert_same_weights(adapter(tmp_path / "two"), adapter(tmp_path / "one"), atol=1e-5)
    assert_same_steps(tmp_path / "one", tmp_path / "two")
    assert len(dist_io.read_jsonl(tmp_path / "two" / "ref_logps.jsonl")) == 25

    cut, _ = stopped_copy(tmp_path / "two", tmp_path / "cut", 2, 3)
    resumed = run_torchrun("03_train_bpo.py", *args, *sharded, "--output_dir", cut, "--resume")
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-3000:]
    assert_same_weights(adapter(cut), adapter(tmp_path / "two"), atol=1e-6)
    assert [r["step"] for r in dist_io.read_jsonl(cut / "metrics.jsonl")] == [1, 2, 3, 4]
    plain, _ = stopped_copy(tmp_path / "two", tmp_path / "plain", 2, 3)  # the same pairs per step: 1 x 2 x 2
    run_here("03_train_bpo.py", *args, "--batch_size", 2, "--grad_accum", 2, "--output_dir", plain, "--resume",
             check=True)
    assert_same_weights(adapter(plain), adapter(tmp_path / "two"), atol=1e-5)

    model, _ = loading.load_model(str(toy / "model"), adapter=str(tmp_path / "two" / "adapter"))
    base, _ = loading.load_model(str(toy / "model"))
    merged = dict(model.named_parameters())
    for name, param in base.named_parameters():  # LoRA moved the language model's projections, nothing else
        assert (not torch.equal(merged[name], param)) == (".language_model." in name and name.endswith("proj.weight"))


EAGER_03 = f"""import runpy, sys
sys.path.insert(0, {ROOT!r})
import attention
attention.COMPILE_BACKEND = "eager"  # FlexAttention's own kernels, no C++ compiled (minutes on a busy CPU)
runpy.run_path({os.path.join(ROOT, '03_train_bpo.py')!r}, run_name="__main__")
"""


def test_fsdp_flex_falls_back_on_every_rank_and_trains_as_one(qwen_toy, tmp_path):
    """Qwen2.5-VL, --attention flex asked for on CPU under --fsdp, the reference every step: the first training
    micro-batch, a collective under FSDP, runs flex's forward on both ranks and fails in its backward (CPU's flex has
    none); both fall back to per_pair, FSDP runs the micro-batch again, and the run = one process per_pair."""
    pairs = pairs_file(qwen_toy, tmp_path, 8)
    args = train_args(qwen_toy, pairs, "--max_steps", 2, "--save_every", 0, "--no-precompute_ref")
    run_here("03_train_bpo.py", *args, "--batch_size", 4, "--output_dir", tmp_path / "one", check=True)
    shim = tmp_path / "eager_03.py"
    shim.write_text(EAGER_03)
    two = run_torchrun(shim, *args, "--batch_size", 2, "--fsdp", "--attention", "flex",
                       "--output_dir", tmp_path / "two")
    assert two.returncode == 0, two.stderr[-3000:]
    warnings = [line for line in two.stderr.splitlines() if "falling back" in line]
    assert len(warnings) == 2 and all("does not support backward on CPU" in w for w in warnings), two.stderr[-2000:]
    assert json.loads((tmp_path / "two" / "run.json").read_text())["attention"].startswith(
        "attention: per_pair (fell back from flex: NotImplementedError")
    assert_same_weights(adapter(tmp_path / "two"), adapter(tmp_path / "one"), atol=1e-5)
    assert_same_steps(tmp_path / "one", tmp_path / "two")


def test_fsdp_refuses_4bit_and_its_dry_run_says_the_sharing(toy, tmp_path):
    pairs = pairs_file(toy, tmp_path, 8)
    args = train_args(toy, pairs, "--output_dir", tmp_path / "run", "--fsdp")
    refused = run_here("03_train_bpo.py", *args, "--load_in_4bit")
    assert refused.returncode != 0 and refused.stderr.strip().splitlines()[-1].startswith("error: --fsdp with "
                                                                                          "--load_in_4bit")
    dry = run_here("03_train_bpo.py", *args, "--dry_run", check=True)
    assert "--fsdp over 1 process: the language model and its LoRA state sharded" in dry.stdout
    assert "at 2 / 4 / 8 / 16 / 32 processes:" in dry.stdout and not (tmp_path / "run").exists()


@pytest.mark.parametrize("arch", ARCHS)
def test_the_vision_side_is_all_but_the_language_model(arch, tmp_path_factory):
    """What --fsdp leaves whole (families' vision encoder and projectors) is every parameter outside the language
    model and its LM head: anything else would be a shard where families.image_features reads it."""
    from transformers import AutoConfig, AutoModelForImageTextToText
    config = AutoConfig.from_pretrained(quick_world(arch, tmp_path_factory) / "model")
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    vision = loading.vision_side(model)
    language = {p for n, p in model.named_parameters() if ".language_model." in f".{n}" or n.startswith("lm_head")}
    assert vision and not vision & language and vision | language == set(model.parameters())


def tiny_llava(folder):
    """A LLaVA config small enough to count by hand: LLaMA 8 wide x 2 layers (MLP 16, vocabulary 10), CLIP 8 wide x 1
    layer at 28 px / 14 px patches, the 2-layer projector."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    text = LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2)
    vision = CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                              image_size=28, patch_size=14, projection_dim=8)
    LlavaConfig(vision_config=vision, text_config=text, image_token_index=9).save_pretrained(folder)
    return folder


def test_memory_per_gpu_by_hand(tmp_path):
    """runs.memory_estimate on a config counted by hand. The LM: embeddings 80, a layer 656 (q k v o 4 x 64, gate up
    down 3 x 128, 2 norms of 8), final norm 8, LM head 80: 1480, of which Linear 1280; LoRA r 4: 544 a layer. The
    vision side: CLIP 5384 (class 8, patches 3 x 8 x 14 x 14, 5 positions x 8, 2 + 1 layer norms, a layer 600) +
    the projector 144. --fsdp over W: 2 bytes x (the vision side + 1/W of the LM + its root and 2 layers gathered),
    16/W bytes a LoRA parameter (+ 4 for the whole gradient that accumulation keeps); the rest does not depend on W."""
    folder = tiny_llava(tmp_path / "tiny")
    parse = script("03_train_bpo.py").parse_args
    base = ["--model", folder, "--data", "x", "--output_dir", "y", "--lora_r", 4, "--gradient_checkpointing"]
    lengths = [(10, [3, 4])] * 100
    plain, T = runs.memory_estimate(parse(map(str, base)), lengths)
    assert T == 17 and plain["weights"] == 2 * 7008 and plain["lora"] == 16 * 1088
    assert runs.memory_estimate(parse(map(str, base + ["--load_in_4bit"])), lengths)[0]["weights"] == \
        2 * (7008 - 1280) + 1280 / 2
    fsdp = parse(map(str, base + ["--fsdp"]))
    for world in (1, 2, 8):
        parts = runs.memory_estimate(fsdp, lengths, world)[0]
        assert parts["weights"] == pytest.approx(2 * (5528 + 1480 / world + 80 + 8 + 80 + 2 * 656))
        assert parts["lora"] == pytest.approx(16 * 1088 / world)
        assert {k: parts[k] for k in ("activations", "mask", "logits")} == \
            {k: plain[k] for k in ("activations", "mask", "logits")}
    assert runs.memory_estimate(parse(map(str, base + ["--fsdp", "--grad_accum", 2])), lengths, 8)[0]["lora"] == \
        pytest.approx(16 * 1088 / 8 + 4 * 1088)
    # activations checkpointed: 4 pairs x 17 tokens x (2 layers x 2 h + 52 h), h = 8
    assert plain["activations"] == 4 * 17 * (2 * 2 * 8 + 52 * 8)
