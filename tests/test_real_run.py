"""The paper's run, for real: LLaVA-1.5's input format, per-source image roots, the run-directory
contract of 03 (fresh, --overwrite, --resume), cut-off negatives, dry runs, SFT's token mean, and
QLoRA's dtypes. All on CPU, offline, on the quick toy world (and the real LLaMA-2 tokenizer)."""
import json
import os
import shutil
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from PIL import Image

import common
import data
import dist_io
import loading
from conftest import as_if_killed_after, run_here
from test_hardening import error_line, write_lines

LLAMA_TOK = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "llama2-tokenizer")
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")


def test_vicuna_v1_prompt_token_for_token_on_llama2():
    if not os.path.isdir(LLAMA_TOK):
        pytest.skip("../shared/llama2-tokenizer not present")
    pytest.importorskip("sentencepiece")
    from transformers import LlamaTokenizer
    tok = LlamaTokenizer.from_pretrained(LLAMA_TOK, add_bos_token=True, legacy=False)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})  # as llava-hf's tokenizer has it
    processor = SimpleNamespace(image_token="<image>", tokenizer=tok)
    text = common.chat_prompt(processor, "  What is on the table?\n")  # stripped, as LLaVA's preprocessing
    assert text == SYSTEM + " USER: <image>\nWhat is on the table? ASSISTANT:"
    want = ["<s>", "▁A", "▁chat", "▁between", "▁a", "▁curious", "▁user", "▁and", "▁an", "▁artificial",
            "▁intelligence", "▁assistant", ".", "▁The", "▁assistant", "▁gives", "▁helpful", ",", "▁detailed", ",",
            "▁and", "▁pol", "ite", "▁answers", "▁to", "▁the", "▁user", "'", "s", "▁questions", ".", "▁US", "ER", ":",
            "▁", "<image>", "<0x0A>", "What", "▁is", "▁on", "▁the", "▁table", "?", "▁A", "SS", "IST", "ANT", ":"]
    assert tok.convert_ids_to_tokens(tok(text).input_ids) == want
    # the answer, then EOS: "ASSISTANT: A cup on a plate.</s>" as LLaVA-1.5 was trained
    answer = common.response_ids(tok, text, "A cup on a plate.")
    assert tok.convert_ids_to_tokens(answer) == ["▁A", "▁cup", "▁on", "▁a", "▁plate", ".", "</s>"]
    # LLaVA's own chunk-wise tokenisation differs by the one documented "▁" after the image
    before, after = text.split("<image>")
    llava = tok(before).input_ids + [tok.convert_tokens_to_ids("<image>")] + tok(after).input_ids[1:]
    assert tok.convert_ids_to_tokens(llava) == want[:36] + ["▁"] + want[36:]
    assert common.chat_prompt(processor, "Rewrite: a cup.", image=False) == SYSTEM + " USER: Rewrite: a cup. ASSISTANT:"


def test_pad_square_centres_the_image_on_the_mean_colour():
    processor = SimpleNamespace(image_processor=SimpleNamespace(image_mean=[0.48145466, 0.4578275, 0.40821073]))
    mean = (122, 116, 104)  # int(255 * m), by hand
    wide = Image.new("RGB", (4, 2), (255, 0, 0))
    wide.putpixel((3, 1), (0, 255, 0))
    square = common.pad_square(wide, processor)
    want = Image.new("RGB", (4, 4), mean)  # rows 1-2 hold the image, (4 - 2) // 2 = 1 row above it
    for x in range(4):
        for y in range(2):
            want.putpixel((x, y + 1), wide.getpixel((x, y)))
    assert square.tobytes() == want.tobytes()
    tall = Image.new("RGB", (1, 4), (0, 0, 255))
    square = common.pad_square(tall, processor)  # (4 - 1) // 2 = 1 column left of it, 2 right
    assert square.size == (4, 4) and [square.getpixel((x, 0)) for x in range(4)] == [mean, (0, 0, 255), mean, mean]
    same = Image.new("RGB", (3, 3))
    assert common.pad_square(same, processor) is same


def test_pad_square_reaches_the_processor(toy):
    """A wide image: with padding, the model sees all of it (CLIP's centre crop would cut its edges)."""
    processor = loading.load_processor(str(toy / "model"))
    image = Image.new("RGB", (128, 64), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 16, 64))  # a white band at the left edge: the crop cuts it off
    text = [common.chat_prompt(processor, "x")]
    padded = common.encode(processor, text, [image], common.LLAVA_15)["pixel_values"]
    cropped = common.encode(processor, text, [image], common.InputFormat("vicuna_v1", False))["pixel_values"]
    white = processor.image_processor(Image.new("RGB", (64, 64), (255, 255, 255)), return_tensors="pt")["pixel_values"]
    level = white[0, 0, 0, 0]
    assert (padded[0, 0, 20:44, :3] - level).abs().max() < 0.05  # the band is there, left of the image
    assert (padded[0, 0, :12, :3] - level).abs().min() > 0.5  # above the image: the mean colour
    assert (cropped[0, 0, :, :4] - level).abs().min() > 0.5  # and cut off without padding


@pytest.fixture(scope="module")
def two_sources(toy, tmp_path_factory):
    """Two pair files whose images lie in two folders, one per source."""
    base = tmp_path_factory.mktemp("sources")
    recs = json.load(open(toy / "train.json"))[:9]
    files = {}
    for s, name in enumerate(("coco", "laion")):
        (base / name).mkdir()
        pairs = []
        for k in range(4):
            r, n = recs[4 * s + k], recs[4 * s + k + 1]
            shutil.copy(toy / "images" / r["image"], base / name / f"img{k}.png")
            pairs.append({"id": f"{name}-{k}", "image": f"img{k}.png", "prompt": "Describe the image.",
                          "chosen": r["conversations"][1]["value"], "rejected": n["conversations"][1]["value"],
                          "source": name, "method": "test"})
        files[name] = write_lines(base / f"{name}.jsonl", map(json.dumps, pairs))
    return base, files


def train(toy, out, data, roots, *extra):
    args = ["03_train_bpo.py", "--model", toy / "model", "--output_dir", out, "--lora_r", 4, "--lora_alpha", 8,
            "--batch_size", 4, "--save_every", 0, "--seed", 0]
    for d in data:
        args += ["--data", d]
    for r in roots:
        args += ["--image_root", r]
    return run_here(*args, *extra)


def test_per_source_image_roots(toy, two_sources, tmp_path):
    base, files = two_sources
    roots = [f"coco={base / 'coco'}", f"laion={base / 'laion'}"]
    proc = train(toy, tmp_path / "run", files.values(), roots, "--max_steps", 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(dist_io.read_jsonl(tmp_path / "run" / "metrics.jsonl")) == 2
    missing = train(toy, tmp_path / "missing", files.values(), roots[:1], "--max_steps", 1)
    assert "no --image_root for source 'laion'" in error_line(missing, f"{files['laion']}:1")


def test_run_directory_contract(toy, two_sources, tmp_path):
    base, files = two_sources
    data, roots = [files["coco"], files["laion"]], [f"coco={base / 'coco'}", f"laion={base / 'laion'}"]
    out = tmp_path / "run"
    first = train(toy, out, data, roots, "--max_steps", 2, "--save_every", 1, "--keep_checkpoints", 0)
    assert first.returncode == 0, first.stderr[-3000:]
    assert not [d for d in os.listdir(out) if d.startswith("checkpoint-")]  # 0 keeps none
    assert json.loads((out / "run.json").read_text())["finished_step"] == 2
    # a fresh run into it refuses before loading anything (the model path does not even exist)
    again = run_here("03_train_bpo.py", "--model", tmp_path / "no-model", "--output_dir", out, "--data", data[0],
                     "--data", data[1], "--image_root", roots[0], "--image_root", roots[1])
    message = error_line(again, str(out))
    assert "--resume" in message and "--overwrite" in message
    # --resume of a finished run: nothing to do, exit 0
    done = train(toy, out, data, roots, "--max_steps", 2, "--resume")
    assert done.returncode == 0 and "nothing to do" in done.stdout, done.stderr[-2000:]
    # --resume with a setting that changes what a step sees: refused, naming each
    changed = train(toy, out, data, roots, "--max_steps", 2, "--resume", "--max_length", 300, "--batch_size", 2)
    message = error_line(changed, "--resume")
    assert "pairs per step" in message and "(4 -> 2)" in message and "--max_length (2048 -> 300)" in message
    # a longer --max_steps with no checkpoint kept trains from the start (a finished run's checkpoint: test_step.py)
    more = train(toy, out, data, roots, "--max_steps", 3, "--resume")
    assert more.returncode == 0, more.stderr[-3000:]
    assert [r["step"] for r in dist_io.read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]
    # --overwrite starts clean: no stale checkpoint, log or reference cache survives
    (out / "checkpoint-99").mkdir()
    clean = train(toy, out, data, roots, "--max_steps", 1, "--overwrite")
    assert clean.returncode == 0, clean.stderr[-3000:]
    assert not (out / "checkpoint-99").exists() and len(dist_io.read_jsonl(out / "metrics.jsonl")) == 1
    assert "reference log-probs: 8 pairs scored" in clean.stdout


def test_reference_cache_is_never_read_stale(toy, two_sources, tmp_path):
    base, files = two_sources
    data, roots = [files["coco"], files["laion"]], [f"coco={base / 'coco'}", f"laion={base / 'laion'}"]
    out = tmp_path / "run"
    assert train(toy, out, data, roots, "--max_steps", 2, "--save_every", 1).returncode == 0
    as_if_killed_after(out, 1)
    cache = out / "ref_logps.jsonl"
    rows = dist_io.read_jsonl(cache)
    assert len(rows) == 8 and len({r["key"] for r in rows}) == 1
    # records of another model, data or length (another key) are never read: a resume scores afresh
    cache.write_text("".join(json.dumps({**r, "key": "other", "chosen": 0.0}) + "\n" for r in rows))
    resumed = train(toy, out, data, roots, "--max_steps", 2, "--resume")
    assert "reference log-probs: 8 pairs scored" in resumed.stdout, resumed.stdout[-2000:]
    assert all(r["chosen"] != 0.0 for r in dist_io.read_jsonl(cache))


def test_training_forwards_build_no_kv_cache(toy, two_sources, tmp_path):
    from transformers import LlavaForConditionalGeneration
    base, files = two_sources
    seen, forward = [], LlavaForConditionalGeneration.forward

    def spy(self, *a, **k):
        seen.append(k.get("use_cache"))
        return forward(self, *a, **k)
    with mock.patch.object(LlavaForConditionalGeneration, "forward", spy):
        proc = train(toy, tmp_path / "run", [files["coco"]], [base / "coco"], "--max_steps", 1, "--no-precompute_ref")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert seen and all(u is False for u in seen)


def test_sft_loss_is_the_token_mean_over_the_micro_batch(toy, toy_model, two_sources, tmp_path):
    base, files = two_sources
    proc = train(toy, tmp_path / "run", [files["coco"]], [base / "coco"], "--loss", "sft", "--max_steps", 1,
                 "--lora_dropout", 0)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = dist_io.read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]["loss"]
    model, processor = toy_model  # LoRA's B starts at zero: step 1's policy is the base model
    nll, tokens, per_answer = 0.0, 0, []
    with torch.no_grad():
        for pair in dist_io.read_jsonl(files["coco"]):
            image = data.load_image(base / "coco", pair["image"])
            vision, ((ids, labels),), _ = common.build_sequences(processor, image, pair["prompt"], [pair["chosen"]], 2048)
            out = model(input_ids=torch.tensor([ids]), **vision, labels=torch.tensor([labels]))
            n = sum(1 for x in labels if x != common.IGNORE)
            nll, tokens = nll + out.loss.item() * n, tokens + n
            per_answer.append(out.loss.item())
    assert got == pytest.approx(nll / tokens, rel=1e-4)
    assert abs(nll / tokens - sum(per_answer) / len(per_answer)) > 1e-3  # the two means differ on this batch


def test_build_pairs_never_writes_a_cut_off_negative(toy, tmp_path):
    out = tmp_path / "pairs.jsonl"
    args = ["--model", toy / "model", "--data", f"toy={toy / 'train.json'}", "--image_root", toy / "images",
            "--out", out, "--samples_per_source", 8, "--batch_size", 8, "--max_new_tokens", 3, "--max_tries", 2]
    proc = run_here("01_build_pairs.py", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("wrote "))
    written, dropped = int(line.split()[1]), int(line.split("dropped ")[1].split()[0])
    cut_off = int(line.split(" negatives and ")[1].split()[0])
    assert cut_off >= 4 and written + dropped + cut_off == 8 and "cut off by --max_new_tokens 2 times" in line
    tok = loading.load_processor(str(toy / "model")).tokenizer
    for pair in dist_io.read_jsonl(out):  # what was written ended by itself: EOS within the 3 new tokens
        assert len(tok(pair["rejected"], add_special_tokens=False).input_ids) < 3


def test_dry_runs_check_and_count_and_write_nothing(toy, two_sources, tmp_path):
    base, files = two_sources
    pairs_out = tmp_path / "pairs.jsonl"
    proc = run_here("01_build_pairs.py", "--model", toy / "model", "--data", f"toy={toy / 'train.json'}",
                    "--image_root", toy / "images", "--out", pairs_out, "--samples_per_source", 20, "--dry_run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dry run: 20 items (20 toy)" in proc.stdout and "prompt tokens (image included): n=20" in proc.stdout
    assert not pairs_out.exists()
    proc = run_here("02_inject_errors.py", "--backend", "hf", "--model", toy / "model", "--data",
                    f"toy={toy / 'train.json'}", "--out", pairs_out, "--samples_per_source", 20, "--dry_run")
    assert proc.returncode == 0 and "dry run: 20 items" in proc.stdout and not pairs_out.exists()
    out = tmp_path / "run"
    proc = train(toy, out, files.values(), [f"coco={base / 'coco'}", f"laion={base / 'laion'}"], "--dry_run",
                 "--max_length", 60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert "dry run: 8 pairs in 2 files" in text and "2 steps per epoch of 4 pairs, 4 steps in all" in text
    assert "estimated peak memory per GPU" in text and "responses cut at --max_length 60:" in text
    assert int(text.split("responses cut at --max_length 60: ")[1].split()[0]) > 0  # toy captions are long
    assert not out.exists()


def test_prompt_over_max_length_fails_before_training(toy, two_sources, tmp_path):
    base, files = two_sources
    proc = train(toy, tmp_path / "run", [files["coco"]], [base / "coco"], "--max_length", 20, "--max_steps", 1)
    assert "--max_length is 20" in error_line(proc, f"{files['coco']}:1")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_qlora_keeps_the_rest_in_bf16(toy):
    """03 freezes the 4-bit model as loaded: nothing is upcast to fp32 (peft's
    prepare_model_for_kbit_training would upcast vision tower, projector, embeddings, head, norms)."""
    from peft import LoraConfig
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                               llm_int8_skip_modules=["vision_tower", "multi_modal_projector", "lm_head"])
    model = AutoModelForImageTextToText.from_pretrained(str(toy / "model"), dtype=torch.bfloat16,
                                                        quantization_config=quant, device_map={"": "cpu"})
    model.requires_grad_(False)  # what 03 does with a 4-bit model before adding LoRA
    model = loading.with_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)"))
    frozen = {n: p.dtype for n, p in model.named_parameters() if "lora_" not in n and p.dtype.is_floating_point}
    assert frozen and all(d == torch.bfloat16 for d in frozen.values()), {n: d for n, d in frozen.items()
                                                                            if d != torch.bfloat16}
    source = open(os.path.join(os.path.dirname(__file__), "..", "03_train_bpo.py")).read()
    assert "prepare_model_for_kbit_training(" not in source


def test_qlora_quantizes_the_language_model_only(toy):
    """--load_in_4bit: every Linear layer of the language model in NF4, none of the vision tower's, the projector's or
    the head's (transformers reads a bare "vision_tower" in the skip list as one module's name only, and quantized the
    vision tower's layers before the names were written from the root)."""
    import bitsandbytes as bnb
    model, _ = loading.load_model(str(toy / "model"), load_in_4bit=True)
    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    nf4 = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert nf4 == {n for n in linear if ".language_model." in n} and len(nf4) == 28


def test_report_to_tensorboard_logs_metrics_jsonl_scalars(toy, two_sources, tmp_path):
    """--report_to tensorboard: the event files under OUTPUT_DIR/tensorboard/ hold metrics.jsonl's scalars, step by
    step."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    base, files = two_sources
    out = tmp_path / "run"
    proc = train(toy, out, files.values(), [f"coco={base / 'coco'}", f"laion={base / 'laion'}"], "--max_steps", 2,
                 "--report_to", "tensorboard")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = dist_io.read_jsonl(out / "metrics.jsonl")
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    for key in ("loss", "rewards/accuracies", "logps/chosen", "lr"):
        logged = events.Scalars(key)
        assert [e.step for e in logged] == [r["step"] for r in rows] == [1, 2]
        assert [e.value for e in logged] == pytest.approx([r[key] for r in rows], rel=1e-6)


def test_report_to_wandb_offline(toy, two_sources, tmp_path, monkeypatch):
    """--report_to wandb, where wandb is installed, in offline mode: a local run directory, no network."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    base, files = two_sources
    proc = train(toy, tmp_path / "run", files.values(), [f"coco={base / 'coco'}", f"laion={base / 'laion'}"],
                 "--max_steps", 1, "--report_to", "wandb")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert any(d.startswith("offline-run") for d in os.listdir(tmp_path / "run" / "wandb"))
