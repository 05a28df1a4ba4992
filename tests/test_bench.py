"""The bench's arithmetic (bench/limits.py) against hand values, bench/gpu_check.py's settings and rows, and
(BENCH_SMOKE=1 only: minutes on a busy CPU) gpu_check.py end to end at its CPU size. Speed itself is never
asserted: machines are noisy."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import gpu_check  # noqa: E402
import limits  # noqa: E402


@pytest.mark.parametrize("P,R,side,epochs,ckpt,want", [
    # the paper's lengths: P = 576 image tokens + 80, R = 150
    (656, 150, "trl", 2, False, 6 * 806),                        # 2 x 2(P+R) + 2(P+R)
    (656, 150, "ours", 2, False, 2 * 956 + 956 / 2),             # 2(P+2R) + (P+2R)/2
    (656, 150, "ours_every_step", 2, False, 3 * 956),            # 2(P+2R) + (P+2R)
    (656, 150, "trl", 2, True, 8 * 806),                         # one recomputed forward more on the policy's
    (656, 150, "ours", 2, True, 3 * 956 + 478),
    (656, 150, "ours_every_step", 2, True, 4 * 956),
    (100, 10, "ours", 1, False, 3 * 120),                        # one epoch: the pass costs what it costs
    (100, 10, "ours", 4, False, 2 * 120 + 30),
    (0, 10, "trl", 2, False, 60),
])
def test_token_passes_hand_values(P, R, side, epochs, ckpt, want):
    assert limits.token_passes(P, R, side, epochs, ckpt) == pytest.approx(want)


def test_limits_hand_values():
    assert limits.limit(656, 150, "ours") == pytest.approx(4836 / 2390)            # 2.02
    assert limits.limit(656, 150, "ours_every_step") == pytest.approx(4836 / 2868)  # 1.69
    assert limits.limit(656, 150, "ours", checkpointing=True) == pytest.approx(6448 / 3346)
    # answers of no length: the packing saves nothing, the reference pass is all that is left
    assert limits.limit(100, 0, "ours_every_step") == pytest.approx(2.0)
    assert limits.limit(100, 0, "ours") == pytest.approx(2.4)
    # the limit grows with the prefix's share: all prefix -> 6P / 2.5P, all answers -> 6R / 5R
    assert limits.limit(10**6, 1, "ours") == pytest.approx(2.4, rel=1e-4)
    assert limits.limit(1, 10**6, "ours") == pytest.approx(1.2, rel=1e-4)
    with pytest.raises(ValueError):
        limits.token_passes(1, 1, "ours_default")


def test_flops_hand_values():
    # the figure: 4 pairs of P = 650, R = 150 through a 6.7B LM (32 x 4096), forward + input-gradient backward
    P, R, N, L, h = 650, 150, 6.7e9, 32, 4096
    passes = limits.step_passes(P, R, "ours")
    assert passes == 2 * 950  # the reference is not in 03's default step
    attended = P * P / 2 + 2 * R * (P + R / 2)  # prefix with itself, each answer with the prefix and itself
    want = 2 * N * passes + 2 * 4 * L * h * attended
    assert limits.flops_per_pair(P, R, "ours", passes, N, L, h) == pytest.approx(want)
    assert 4 * want == pytest.approx(1.05e14, rel=0.05)  # ~1.05e14 a step, as the issue counts it
    # TRL's two sequences attend less in total (no response sees the other) but run more token passes
    trl = limits.flops_per_pair(P, R, "trl", limits.step_passes(P, R, "trl"), N, L, h)
    assert trl == pytest.approx(2 * N * 6 * 800 + 3 * 4 * L * h * 2 * (P * P / 2 + R * (P + R / 2)))
    assert limits.step_passes(P, R, "ours_every_step") == 3 * 950 and limits.step_passes(P, R, "ours", True) == 3 * 950
    assert limits.peak_tflops("NVIDIA H200") == 989.0 and limits.peak_tflops("CPU") is None


def test_full_run_hours():
    # 1 pair/s per GPU: 2 x 170k pairs on 8 GPUs = 42500 s
    assert limits.full_run_hours(1.0) == pytest.approx(2 * 170_000 / 8 / 3600)
    assert limits.full_run_hours(2.0, pairs=1000, epochs=1, gpus=1) == pytest.approx(500 / 3600)


def test_gpu_check_sizes_and_rows():
    full = gpu_check.parse_args([])
    assert (full.lm_hidden, full.lm_layers, full.lm_mlp, full.lm_heads, full.vocab) == (4096, 32, 11008, 32, 32000)
    assert (full.vision_hidden, full.vision_layers, full.vision_heads, full.image_size) == (1024, 24, 16, 336)
    assert (full.batch_size, full.lora_r, full.question_tokens, full.answer_tokens) == (4, 64, 40, 150)
    assert full.steps + full.warmup <= 13 and full.budget_s < 600  # the 10-minute command on the H200
    assert gpu_check.size_note(full) == ""
    tiny = gpu_check.parse_args(["--tiny", "--lm_layers", "3"])
    assert tiny.lm_layers == 3 and tiny.lm_hidden == gpu_check.TINY["lm_hidden"]  # an explicit flag wins
    assert "3 of its 32 language-model layers" in gpu_check.size_note(tiny)
    names = gpu_check.row_names(full)
    assert len(names) == len(set(names)) == 9 + 3 * 2 + 1  # 9 training rows, 3 batch sizes x 2 caches, the paper
    assert sum("checkpointing on" in n for n in names) == 6 and not any(n.startswith("TRL") for n in names)
    assert names[-1].startswith("paper") and "QLoRA" in names[8]  # QLoRA quantizes the model: last
    assert "--fsdp" in names[7]
    assert gpu_check.parse_args(["--rows", "qlora:on", "flex:off"]).rows == ["flex:off", "qlora:on"]
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--rows", "flex:maybe"])


# published parameter counts of each family's 7B-class checkpoint (model cards), in billions
CHECKPOINT_PARAMS = {"llava": 7.06, "llava_next": 7.06, "qwen2_vl": 8.29, "qwen2_5_vl": 8.29, "qwen3_vl": 8.77,
                     "gemma3": 12.19}


@pytest.mark.parametrize("arch", sorted(CHECKPOINT_PARAMS))
def test_each_family_builds_its_7b_class_shape(arch, tmp_path):
    """bench/gpu_check.py --arch ARCH builds the family's 7B-class checkpoint's shapes (on the meta device here):
    its parameter count within 2% of the published one; --tiny's sizes build the same architecture."""
    from transformers import AutoModelForImageTextToText
    from families import FAMILIES
    args = gpu_check.parse_args(["--arch", arch])
    assert gpu_check.size_note(args) == ""
    processor = gpu_check.build_processor(args, tmp_path / "model")
    config = FAMILIES[arch].config_for(processor.tokenizer, gpu_check.model_sizes(args))
    with torch.device("meta"):
        n = sum(p.numel() for p in AutoModelForImageTextToText.from_config(config).parameters())
    assert n / 1e9 == pytest.approx(CHECKPOINT_PARAMS[arch], rel=0.02)
    tiny = gpu_check.parse_args(["--arch", arch, "--tiny"])
    assert gpu_check.size_note(tiny).startswith("NOT")
    config = FAMILIES[arch].config_for(processor.tokenizer, gpu_check.model_sizes(tiny))
    assert type(AutoModelForImageTextToText.from_config(config)).__name__.lower().startswith(arch.split("_")[0])


def run_gpu_check(tmp_path, *flags):
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--device", "cpu", "--tiny",
                           "--budget_s", "3000", "--work", str(tmp_path / "work"), "--out", str(out), *flags],
                          capture_output=True, text=True, cwd=ROOT, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    for name in gpu_check.row_names(gpu_check.parse_args(["--device", "cpu", "--tiny", *flags])):
        row = [line for line in table if line.startswith(f"| {name} |")]
        assert len(row) == 1, f"no row {name!r} in:\n" + "\n".join(table)
        assert "FAILED" not in row[0] and "skipped" not in row[0] and "not run" not in row[0], row[0]
    assert "NOT LLaVA-1.5's 7B-class" in proc.stdout
    result = json.loads(out.read_text())
    assert not result["errors"]
    return {r["run"]: r for r in result["rows"]}


def test_gpu_check_tiny_on_cpu(tmp_path):
    """The prepared GPU check's every row at a tiny size on the CPU (the GPU half waits for a lent device): flex asked
    for falls back here (no backward on CPU) after compiling its reference pass, the small tiles' compiles are their
    own, every padding-free row's step-1 log-probs = the padded path's (--fsdp's too, in 03's group of one, on a copy
    of the model: the rows after it run on the model as built), QLoRA runs on NF4 layers, and on CPU the static cache
    compiles nothing."""
    rows = run_gpu_check(tmp_path, "--compile_backend", "eager")
    by_side = {side: next(r for k, r in rows.items() if k.startswith(gpu_check.SIDES[side][0].split(" (")[0]))
               for side in ("flex", "small_tiles", "per_pair", "padded", "fsdp", "qlora")}
    assert by_side["flex"]["fell_back"] and by_side["flex"]["compiles"] >= 1
    assert by_side["small_tiles"]["fell_back"] and by_side["small_tiles"]["compiles"] >= 1
    assert not by_side["per_pair"]["fell_back"] and by_side["per_pair"]["compiles"] == 0
    assert not by_side["fsdp"]["fell_back"] and by_side["fsdp"]["attention"].startswith("attention: per_pair (auto")
    for side in ("flex", "small_tiles", "per_pair", "fsdp"):
        assert by_side[side]["logps/chosen"] == pytest.approx(by_side["padded"]["logps/chosen"], rel=1e-5)
    assert by_side["qlora"]["logps/chosen"] == pytest.approx(by_side["padded"]["logps/chosen"], rel=1e-2)
    assert by_side["qlora"]["logps/chosen"] != by_side["padded"]["logps/chosen"]  # NF4 weights: not the same model
    gens = [r for k, r in rows.items() if k.startswith("01 generation")]
    assert len(gens) == 4 and all(r["compiles"] == 0 and r["samples_per_s"] > 0 for r in gens)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("BENCH_SMOKE") != "1", reason="minutes of CPU: set BENCH_SMOKE=1 to run it")
def test_gpu_check_trl_rows_on_cpu(tmp_path):
    pytest.importorskip("trl", reason="TRL is a bench-only dependency: pip install -r bench/requirements.txt")
    rows = run_gpu_check(tmp_path, "--rows", "per_pair:off", "per_pair:on", "every_step:on", "trl:off", "trl:on")
    for side in ("03 --attention per_pair", "03 --no-precompute_ref"):
        for c in ("off", "on") if "per_pair" in side else ("on",):
            r = next(v for k, v in rows.items() if k.startswith(side) and k.endswith(f"checkpointing {c}"))
            assert r["x_trl"] > 0 and r["limit"] > 1 and r["samples_per_s"] > 0
            # what 03 and TRL log at step 1 are the same pairs under the same (untrained) model: TRL drops BOS only
            trl = next(v for k, v in rows.items() if k.startswith("TRL") and k.endswith(f"checkpointing {c}"))
            assert r["logps/chosen"] == pytest.approx(trl["logps/chosen"], rel=1e-3)
