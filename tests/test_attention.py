"""attention.py: which kernel runs a padding-free row on which device, the fallback from a failing FlexAttention, and
how often compiling happens (counted with a backend that only traces: it guards and recompiles like inductor,
without its code generation), for the packed attention and for generation's decode step."""
import json
import types

import pytest
import torch
from transformers import LlamaConfig, LlavaConfig

import attention
import common
import data
import dist_io
import generation
from conftest import ARCHS, arch_world, run_here, toy_pair_records
from families import family_of

KB = 1024
# (name, compute capability, shared memory per block opt-in): as torch.cuda.get_device_properties reports them
BOARDS = {"H100": ((9, 0), 227 * KB), "A100": ((8, 0), 163 * KB), "A40": ((8, 6), 99 * KB),
          "RTX 4090": ((8, 9), 99 * KB), "T4": ((7, 5), 64 * KB), "V100": ((7, 0), 96 * KB)}


@pytest.mark.parametrize("board,head_dim,want", [
    ("H100", 128, {}), ("A100", 128, {}), ("A100", 256, {}),
    ("A40", 128, attention.SMALL_TILES), ("RTX 4090", 64, attention.SMALL_TILES),
    ("A40", 256, None), ("T4", 64, None), ("V100", 128, None)])
def test_auto_takes_flex_only_where_its_backward_fits(board, head_dim, want, monkeypatch):
    """auto's choice from faked device properties: PyTorch's tiles where the shared memory holds them (A100, H100),
    the small tiles on ~99 KB boards up to head_dim 128 (A40: LLaVA-1.5-7B's 128), per-pair SDPA elsewhere."""
    capability, smem = BOARDS[board]
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(
        name=f"NVIDIA {board}", major=capability[0], minor=capability[1], shared_memory_per_block_optin=smem))
    config = LlavaConfig(text_config=LlamaConfig(hidden_size=32 * head_dim, num_attention_heads=32))
    kernel = attention.choose("auto", torch.device("cuda", 0), config)
    assert (kernel.name, kernel.options) == (("per_pair", None) if want is None else ("flex", want))
    assert kernel.describe().startswith(f"attention: {kernel.name} (auto: ")
    if want is None:  # the reason names what the device lacks
        assert any(s in kernel.reason for s in (f"{capability[0]}.{capability[1]}", f"{smem // KB} KB"))
    # asked for by name, a kernel is taken whatever the device
    assert attention.choose("per_pair", torch.device("cuda", 0), config).name == "per_pair"
    assert attention.choose("flex", torch.device("cuda", 0), config).name == "flex"


def test_auto_on_cpu_is_per_pair():
    kernel = attention.choose("auto", torch.device("cpu"), LlavaConfig())
    assert kernel.name == "per_pair" and "no backward on cpu" in kernel.reason


def test_a_failing_first_call_falls_back_once(capsys):
    """A compile or kernel failure at the first call of a kind: one warning line, per_pair from then on, the call
    made again with per_pair's inputs; out of memory is no kernel failure; a later failure is not hidden."""
    kernel = attention.Kernel("flex", "tested", {})
    row = dict(doc=torch.tensor([[0, 0, 0, 1, 1]]), seg=torch.tensor([[0, 1, 1, 0, 1]]),
               input_ids=torch.tensor([[5, 6, 7, 5, 8]]), position_ids=torch.tensor([[0, 1, 2, 0, 1]]))
    seen = []

    def step():
        seen.append(sorted(set(kernel.inputs(row)) - set(row)))
        if kernel.name == "flex":
            raise RuntimeError("out of resource: shared memory, Required: 131074, Hardware limit: 101376\nmore")
        return "done"
    assert kernel.run("train", step) == "done"
    assert seen == [["block_masks", "flex_options"], ["pack_masks"]]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "falling back to per_pair" in err[0] and "Required: 131074" in err[0]
    assert kernel.name == "per_pair" and kernel.reason.startswith("fell back from flex: RuntimeError")
    oom = attention.Kernel("flex", "tested", {})
    with pytest.raises(torch.OutOfMemoryError):
        oom.run("train", lambda: (_ for _ in ()).throw(torch.OutOfMemoryError("CUDA out of memory")))
    assert oom.name == "flex"
    later = attention.Kernel("flex", "tested", {})
    later.run("train", lambda: None)
    with pytest.raises(ValueError):  # past the first call, an error is the error
        later.run("train", lambda: (_ for _ in ()).throw(ValueError("a bug")))


def test_flat_rows_come_in_whole_blocks():
    pack = common.pack_responses([([1, 2, 3, 4, 5], [-100, -100, -100, 4, 5]), ([1, 2, 3, 6], [-100] * 3 + [6])])
    plain = common.flat_batch([pack] * 3)
    ids, pos, doc, seg, keep, scored = common.flat_batch([pack] * 3, pad_id=9, block=8)
    assert ids.shape[1] == 24 and ids[0, 18:].tolist() == [9] * 6  # 18 tokens -> 3 blocks of 8
    assert doc[0, 18:].tolist() == [-1] * 6 and not keep[0, 18:].any()
    assert torch.equal(keep[:, :18], plain[4]) and all(torch.equal(a, b) for a, b in zip(scored, plain[5]))
    assert common.flat_batch([pack], pad_id=9, block=8)[0].shape[1] == 16  # two blocks at least


def toy_examples(toy, processor, n):
    """n micro-batches' examples of different lengths from the toy's images: batch k holds 1 + k % 3 pairs of
    answers of 2 + 12k words (captions repeated)."""
    recs = json.load(open(toy / "train.json"))
    batches = []
    for k in range(n):
        examples = []
        for j in range(1 + k % 3):
            rec = recs[(3 * k + j) % len(recs)]
            answer = " ".join((rec["conversations"][1]["value"].split() * (1 + k))[:2 + 12 * k])
            examples.append((data.load_image(str(toy / "images"), rec["image"]), "Describe the image.",
                             [answer, answer + " ."], ()))
        batches.append(examples)
    return batches


def toy_rows(toy, processor, n):
    """toy_examples as flat rows in whole blocks of 128 tokens, as 03 packs them for flex."""
    return [common.pack_pairs(processor, examples, 2048, common.LLAVA_15, flat=True, row_block=attention.ROW_BLOCK)
            for examples in toy_examples(toy, processor, n)]


@pytest.fixture
def count_compiles(monkeypatch):
    """Every compile of the packed attention counted (the backend runs the traced graph without autograd: CPU's
    FlexAttention has no backward, and a count needs none)."""
    from torch.nn.attention import flex_attention as fa
    counted = []

    def backend(gm, example_inputs):
        counted.append(gm)

        def run(*args):
            with torch.no_grad():
                return gm(*args)
        return run
    monkeypatch.setattr(attention, "COMPILE_BACKEND", backend)
    monkeypatch.setattr(fa, "_validate_device", lambda *a: None)  # traced on CPU in grad mode, run without grad
    torch._dynamo.reset()
    attention.compiled_flex.cache_clear()
    yield counted
    torch._dynamo.reset()
    attention.compiled_flex.cache_clear()


def test_packed_attention_compiles_once_per_kind(toy, toy_model, count_compiles):
    """Over 12 micro-batches of 6 row lengths (in whole blocks; 12 without them) the packed attention compiles once for
    the no-grad reference pass and once for the training pass (before: twice per kind with PyTorch's default dynamism
    on unpadded rows; with dynamic=False once per length until dynamo's limit of 8, then an eager unfused kernel);
    and FlexAttention's log-probs = per_pair's on the same rows."""
    model, processor = toy_model
    rows = toy_rows(toy, processor, 12)
    assert len({r["input_ids"].shape[1] for r in rows}) >= 5  # several lengths in whole blocks
    flex, per_pair = attention.Kernel("flex", "tested", {}), attention.Kernel("per_pair", "tested")
    attention.use_packed_attention(model)
    try:
        for grad in (False, True):
            for row in rows:
                n_out = len(row["n_tokens"])
                with torch.set_grad_enabled(grad):
                    got = common.response_logps(model, model, flex.inputs(row), row["scored"], n_out)[0]
                if not grad:
                    want = common.response_logps(model, model, per_pair.inputs(row), row["scored"], n_out)[0]
                    assert torch.allclose(got, want, rtol=1e-5, atol=1e-4), (got, want)
            assert len(count_compiles) == 1 + grad, len(count_compiles)
    finally:
        attention.use_packed_attention(model, on=False)


def test_flex_asked_on_cpu_scores_the_reference_then_falls_back(toy, tmp_path, monkeypatch):
    """03 --attention flex on CPU: the reference pass runs FlexAttention (forward only), the first training step
    cannot (no backward on CPU) and falls back to per_pair with one warning; the run = a per_pair run."""
    monkeypatch.setattr(attention, "COMPILE_BACKEND", "eager")  # FlexAttention's own kernels, no code generation
    attention.compiled_flex.cache_clear()
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in toy_pair_records(toy, 8)))
    args = ["03_train_bpo.py", "--model", toy / "model", "--data", pairs, "--image_root", toy / "images",
            "--lora_r", 4, "--lora_alpha", 8, "--lora_dropout", 0, "--batch_size", 4, "--max_steps", 2,
            "--save_every", 0, "--lr", 1e-3, "--seed", 0]
    flex = run_here(*args, "--output_dir", tmp_path / "flex", "--attention", "flex", check=True)
    per_pair = run_here(*args, "--output_dir", tmp_path / "per_pair", "--attention", "per_pair", check=True)
    assert "attention: flex (asked for, on cpu (expected to fail: FlexAttention has no backward on cpu))" in flex.stdout
    warnings = [line for line in flex.stderr.splitlines() if "falling back" in line]
    assert len(warnings) == 1 and "does not support backward on CPU" in warnings[0], flex.stderr[-2000:]
    run = json.loads((tmp_path / "flex" / "run.json").read_text())
    assert run["attention"].startswith("attention: per_pair (fell back from flex: NotImplementedError")
    assert "attention: per_pair (asked for)" in per_pair.stdout
    a, b = (dist_io.read_jsonl(tmp_path / d / "metrics.jsonl") for d in ("flex", "per_pair"))
    for key in ("loss", "logps/chosen", "logps/rejected", "rewards/margins"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=1e-4, abs=1e-5), key
    ref = [dist_io.read_jsonl(tmp_path / d / "ref_logps.jsonl") for d in ("flex", "per_pair")]
    assert [r["chosen"] for r in ref[0]] == pytest.approx([r["chosen"] for r in ref[1]], rel=1e-5)
    attention.compiled_flex.cache_clear()


def test_generation_compiles_the_decode_step_once(toy, toy_model, monkeypatch):
    """The static cache's decode step, as transformers compiles it on CUDA (forced here on CPU with a counting
    backend): once over prompts of 6 lengths and 2 batch sizes (before: 3 with transformers' default config, 4 with
    dynamic=False), the same answers as without compiling."""
    model, processor = toy_model
    recs = json.load(open(toy / "train.json"))[:3]
    images = [data.load_image(str(toy / "images"), r["image"]) for r in recs]
    questions = ["What is this?", "Describe the image.", "How many cups are there in the image?",
                 "Is there a cup in the image? Is there a plate?", "What colour is the cup? Where is it?", "What?"]
    plain = [generation.generate(model, processor, images[:b], [q] * b, max_new_tokens=6) for b in (2, 3)
             for q in questions]
    counted = []
    real = generation.decode_compile_config
    backend = lambda gm, example_inputs: counted.append(gm) or gm.forward  # one backend: a new one recompiles

    def counting(device):  # the real config for CUDA (a new one each call, as generate makes it), its backend counting
        config = real(torch.device("cuda"))
        config.backend = backend
        config.mode = "default"  # CUDA graphs ("reduce-overhead") are inductor's, a backend of its own takes none
        config._compile_all_devices = True  # transformers compiles on CUDA only, unless told
        return config
    monkeypatch.setattr(generation, "decode_compile_config", counting)
    torch._dynamo.reset()
    for attr in ("_compiled_call", "_last_compile_config", "_previous_max_cache_length"):
        monkeypatch.delattr(model, attr, raising=False)
    try:
        compiled = [generation.generate(model, processor, images[:b], [q] * b, max_new_tokens=6) for b in (2, 3)
                    for q in questions]
    finally:
        torch._dynamo.reset()
        for attr in ("_compiled_call", "_last_compile_config"):
            model.__dict__.pop(attr, None)
    assert compiled == plain
    assert len(counted) == 1, len(counted)


@pytest.mark.parametrize("arch", ARCHS)
def test_flex_forward_equals_per_pair_for_every_family(arch, request, monkeypatch):
    """FlexAttention's block masks (no grad: CPU has no backward) give per_pair's log-probs on each family's packed
    rows, its rule included: Gemma 3's image block both ways and its sliding windows."""
    monkeypatch.setattr(attention, "COMPILE_BACKEND", "eager")
    attention.compiled_flex.cache_clear()
    toy, (model, processor) = arch_world(request, arch)
    rule = attention.rule_for(model.config)
    assert (rule.image_token is not None, rule.window is not None) == ((True, True) if arch == "gemma3" else (False, False))
    examples = toy_examples(toy, processor, 3)[2]  # 3 pairs of 26-word answers: longer than Gemma's window of 16
    row = common.pack_pairs(processor, examples, 2048, family_of(model).input_format, flat=True,
                            row_block=attention.ROW_BLOCK)
    attention.use_packed_attention(model)
    try:
        with torch.no_grad():
            got, want = (common.response_logps(model, model, attention.Kernel(k, "tested", {}, rule).inputs(row),
                                               row["scored"], len(row["n_tokens"]))[0] for k in ("flex", "per_pair"))
    finally:
        attention.use_packed_attention(model, on=False)
        attention.compiled_flex.cache_clear()
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-4), (got, want)
