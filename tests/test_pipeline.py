"""The numbered scripts end to end on the quick toy world: 01 -> 03, resume, DDP."""
import glob
import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

import common
import data
import dist_io
import loading
import scoring
from conftest import as_if_killed_after, kill_after_lines, run_here, run_script, run_torchrun, run_torchrun_nodes, script

PAIR_FIELDS = {"id", "image", "prompt", "chosen", "rejected", "source", "method", "meta"}


def build_pairs(toy, out, *extra):
    return run_here("01_build_pairs.py", "--model", toy / "model", "--data", f"toy={toy / 'train.json'}",
                    "--image_root", toy / "images", "--out", out, "--max_new_tokens", 96, "--seed", 0, *extra,
                    check=True)


@pytest.fixture(scope="session")
def built_pairs(toy, tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    return out, build_pairs(toy, out, "--samples_per_source", 64, "--batch_size", 16).stdout


@pytest.fixture(scope="session")
def pairs(built_pairs):
    return built_pairs[0]


def test_pairs_follow_spec(built_pairs, toy):
    pairs, stdout = built_pairs
    recs = dist_io.read_jsonl(pairs)
    gt = {f"toy/{r['id']}-0": r for r in json.load(open(toy / "train.json"))}
    # every item is a pair or a counted drop (a negative equal to the truth), most of them pairs
    dropped = int(re.search(r"dropped (\d+) empty or identical", stdout)[1])
    assert len(recs) + dropped == 64 and len(recs) >= 40 and len({r["id"] for r in recs}) == len(recs)
    for r in recs:
        assert PAIR_FIELDS <= set(r) and r["method"] == "image_weakened" and r["source"] == "toy"
        assert r["meta"]["noise_step"] == 500 and r["meta"]["noise_on"] == "features"
        src = gt[r["id"]]
        assert r["chosen"] == src["conversations"][1]["value"] and r["image"] == src["image"]
        assert "<image>" not in r["prompt"] and r["rejected"] and r["rejected"] != r["chosen"]


SMALL_WORLD = ("--quick", "--seed", 0, "--lm_width", 32, "--align_steps", 2)


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    """A quick world with a narrower LM aligned 2 steps (built in this environment): (folder, 00's stderr)."""
    out = tmp_path_factory.mktemp("small") / "toy"
    return out, run_script("00_make_toy.py", "--out", out, *SMALL_WORLD).stderr


def test_toy_world_knobs_change_the_model_and_nothing_else(toy, small_world):
    """--lm_width and --align_steps (the build's time-vs-quality trade) change the model, not the world's data."""
    out, stderr = small_world
    assert " 2/2 " in stderr.split("c2)")[-1].split("\n")[0]  # the alignment stage's bar ran 2 steps
    text = json.loads((out / "model" / "config.json").read_text())["text_config"]
    assert (text["hidden_size"], text["intermediate_size"]) == (32, 64)
    for f in ("train.json", "world.json", "halbench.jsonl", "mmvet.json", "pope/coco_pope_adversarial.json"):
        assert (out / f).read_bytes() == (toy / f).read_bytes(), f
    default = json.loads((toy / "model" / "config.json").read_text())["text_config"]
    assert default["hidden_size"] == 64


def test_toy_world_is_one_world_under_any_kernel_dispatch_and_thread_count(small_world, tmp_path):
    """00 pins the float code paths before torch loads (cpu_pins.py) and runs torch on 2 threads: the same seed built
    with OMP_NUM_THREADS=1, torch's scalar kernels and MKL's own branch in the environment (what another CPU, or no
    pinning, would run: a different world) gives the same weights and prior check, byte for byte."""
    toy_world = script("00_make_toy.py")
    out = tmp_path / "toy"
    env = dict(os.environ, OMP_NUM_THREADS="1", ATEN_CPU_CAPABILITY="default", MKL_CBWR="AUTO", ONEDNN_MAX_CPU_ISA="ALL")
    proc = run_script("00_make_toy.py", "--out", out, *SMALL_WORLD, env=env)
    assert "torch kernels DEFAULT" not in proc.stdout and "MKL_CBWR=COMPATIBLE" in proc.stdout
    assert toy_world.world_hash(out) == toy_world.world_hash(small_world[0])
    assert (out / "prior_check.json").read_bytes() == (small_world[0] / "prior_check.json").read_bytes()


def test_toy_world_compare_with_records_the_prior_excess_and_refuses_a_bad_world(toy, tmp_path):
    """--compare_with: the prior world (the larger text co-occurrence) first, the difference prior minus control; a
    world that is no control of this build is a one-line error before any work."""
    toy_world = script("00_make_toy.py")
    check = lambda rate: {"rows": [{"partner_rate": 1 - rate}], "partner_probe": {"partner_rate": rate}}
    e = toy_world.prior_excess(("control_dir", 0.63, check(0.10)), ("prior_dir", 0.99, check(0.25)))
    assert e["prior"] == {"world": "prior_dir", "p_partner_text": 0.99, "partner_rate": 0.25}
    assert e["control"]["world"] == "control_dir" and e["difference"] == pytest.approx(0.15)
    assert json.loads((toy / "world.json").read_text())["p_partner_text"] == 0.99
    assert json.loads((toy / "prior_check.json").read_text())["world_hash"] == toy_world.world_hash(toy)
    probe = json.loads((toy / "prior_check.json").read_text())["partner_probe"]
    assert probe["n_images"] == toy_world.sizes(quick=True)[0]["probe"] and not list((toy / "images").glob("probe*"))
    # a control built before the partner probe: its prior check has none to compare
    old = tmp_path / "old"
    old.mkdir()
    (old / "world.json").write_text(json.dumps({**json.loads((toy / "world.json").read_text()), "p_partner_text": 0.63}))
    (old / "prior_check.json").write_text(json.dumps({k: v for k, v in json.loads((toy / "prior_check.json").read_text())
                                                      .items() if k != "partner_probe"}))
    for other, extra, says in [(toy, [], "same --p_partner_text 0.99"), (tmp_path, [], "not a complete toy world"),
                               (toy, ["--seed", 1], "seed 0 --quick, this build seed 1 --quick"),
                               (old, [], "no partner probe (built before it): rebuild it")]:
        proc = run_script("00_make_toy.py", "--out", tmp_path / "w", "--quick", "--compare_with", other, *extra,
                          check=False)
        assert proc.returncode != 0 and says in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert not (tmp_path / "w").exists()  # refused before any work


def test_build_pairs_killed_and_rerun_has_every_id_once(toy, tmp_path):
    out = tmp_path / "pairs.jsonl"
    args = ["01_build_pairs.py", "--model", toy / "model", "--data", f"toy={toy / 'train.json'}", "--image_root",
            toy / "images", "--out", out, "--samples_per_source", 40, "--batch_size", 1, "--max_new_tokens", 96]
    part = f"{out}.part0"
    kill_after_lines(args, part, 5)
    with open(part, "a") as f:
        f.write('{"id": "toy/half-written')  # as if the kill had landed mid-line
    rerun = run_here(*args, check=True).stdout
    ids = [r["id"] for r in dist_io.read_jsonl(out)]
    no_pair = [r["id"] for r in dist_io.read_jsonl(f"{out}.no_pair")]
    expected = {it["id"] for it in data.sample_per_source(data.load_items("toy", toy / "train.json")[0], 40, 0)}
    assert not os.path.exists(part) and not glob.glob(f"{out}.no_pair.part*")
    # every sampled item is done exactly once: a pair in the file, or listed in F.no_pair (cut off, or an empty or
    # identical negative); how many of each depends on where the kill fell (the sampling draws shift)
    assert sorted(ids + no_pair) == sorted(expected), (len(ids), len(no_pair), len(expected))
    n = re.search(r"wrote \d+ pairs this run \((\d+) in .*\); dropped (\d+) empty or identical negatives and (\d+) "
                  r"cut off.*; (\d+) items without a pair listed in", rerun)
    assert n, rerun
    total, dropped, cut_off, listed = map(int, n.groups())
    assert total == len(ids) and listed == len(no_pair) and dropped + cut_off <= listed
    # a finished run rerun draws nothing again: items without a pair are not retried into new pairs
    before = out.read_bytes()
    again = run_here(*args, check=True).stdout
    assert "wrote 0 pairs this run" in again and f"{len(expected)} already done" in again, again
    assert out.read_bytes() == before


def train(toy, data, out, *extra):
    return run_here("03_train_bpo.py", "--model", toy / "model", "--data", data, "--image_root", toy / "images",
                    "--output_dir", out, "--lora_r", 8, "--lora_alpha", 16, "--seed", 0, *extra, check=True)


def test_dpo_training_learns_the_toy_pairs(toy, pairs, tmp_path):
    proc = train(toy, pairs, tmp_path, "--lr", 2e-3, "--batch_size", 8, "--epochs", 5, "--save_every", 0)
    rows = dist_io.read_jsonl(tmp_path / "metrics.jsonl")
    need = {"step", "epoch", "loss", "lr", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
            "rewards/margins", "logps/chosen", "logps/rejected", "samples_per_s"}
    assert need <= set(rows[0]) and [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    assert rows[0]["rewards/margins"] == pytest.approx(0, abs=1e-4)  # policy == reference at step 1
    last = rows[-4:]  # chance is accuracy 0.5, margin 0, loss ln 2 = 0.693
    assert sum(r["rewards/accuracies"] for r in last) / 4 > 0.7
    assert sum(r["rewards/margins"] for r in last) / 4 > 0.15
    assert sum(r["loss"] for r in last) / 4 < 0.65
    assert (tmp_path / "curves.png").stat().st_size > 1000 and (tmp_path / "adapter" / "adapter_config.json").exists()
    assert "final" in proc.stdout
    # the adapter loads back onto the base model and changes it
    model, _ = loading.load_model(str(toy / "model"), adapter=str(tmp_path / "adapter"))
    base, _ = loading.load_model(str(toy / "model"))
    merged = dict(model.named_parameters())
    for name, base_param in base.named_parameters():  # LoRA moved the language model, nothing else
        changed = not torch.equal(merged[name], base_param)
        assert changed == (".language_model." in name and name.endswith("proj.weight")), name


def test_sft_baseline_learns_the_chosen_answers(toy, pairs, tmp_path):
    # the toy base already fits its own captions, so teach it one answer it does not give yet
    recs = dist_io.read_jsonl(pairs)
    target = recs[0]["chosen"]
    sft_pairs = tmp_path / "sft_pairs.jsonl"
    sft_pairs.write_text("".join(json.dumps({**r, "chosen": target}) + "\n" for r in recs if r["rejected"] != target))
    train(toy, sft_pairs, tmp_path, "--loss", "sft", "--lr", 6e-3, "--batch_size", 8, "--max_steps", 20,
          "--save_every", 0)
    rows = dist_io.read_jsonl(tmp_path / "metrics.jsonl")
    assert set(rows[0]) >= {"loss", "logps/chosen"} and "rewards/margins" not in rows[0]
    assert rows[-1]["logps/chosen"] > rows[0]["logps/chosen"] + 5
    assert rows[-1]["loss"] < 0.92 * rows[0]["loss"]


def adapter(path):
    return load_file(os.path.join(path, "adapter", "adapter_model.safetensors"))


def assert_same_weights(a, b, atol):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol), (k, (a[k] - b[k]).abs().max())


def stopped_copy(straight, cut, step, n_lines):
    """A copy of a finished run as if stopped right after checkpoint-`step`: the later checkpoints, the adapter and
    the finish mark never written, n_lines log lines kept (one too many is the usual state).
    Returns (the copy, the straight run's log lines)."""
    shutil.copytree(straight, cut)
    as_if_killed_after(cut, step)
    rows = dist_io.read_jsonl(cut / "metrics.jsonl")
    (cut / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:n_lines]))
    return cut, rows


# beyond the paper's DPO: IPO on per-token log-ratios with the anchor and the conditional (weakened-image) term
OBJECTIVES = ("--loss", "ipo", "--length_normalize", "--anchor_weight", 0.5, "--conditional_weight", 0.5)


@pytest.mark.parametrize("objective", [(), OBJECTIVES], ids=["dpo", "ipo+terms"])
def test_resume_equals_straight_run(toy, pairs, tmp_path, objective):
    # length-grouped batches too: their order must come out the same after a restart
    args = ("--lr", 1e-3, "--batch_size", 4, "--max_steps", 6, "--save_every", 3, "--keep_checkpoints", 2,
            "--group_by_length", *objective)
    train(toy, pairs, tmp_path / "straight", *args)
    cut, rows = stopped_copy(tmp_path / "straight", tmp_path / "cut", 3, 4)
    proc = train(toy, pairs, cut, *args, "--resume")
    assert "resumed from" in proc.stdout and "checkpoint-3" in proc.stdout
    assert_same_weights(adapter(cut), adapter(tmp_path / "straight"), atol=1e-6)
    resumed = dist_io.read_jsonl(cut / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, 7))
    assert resumed[-1]["loss"] == pytest.approx(rows[-1]["loss"], rel=1e-4)


@pytest.mark.parametrize("objective", [(), OBJECTIVES], ids=["dpo", "ipo+terms"])
def test_ddp_two_processes_equal_one(toy, pairs, tmp_path, objective):
    args = ["--model", toy / "model", "--data", pairs, "--image_root", toy / "images", "--lora_r", 8,
            "--lora_alpha", 16, "--lora_dropout", 0, "--lr", 1e-3, "--max_steps", 3, "--save_every", 0, "--seed", 0,
            *objective]
    run_here("03_train_bpo.py", *args, "--output_dir", tmp_path / "one", "--batch_size", 4, check=True)
    proc = run_torchrun("03_train_bpo.py", *args, "--output_dir", tmp_path / "two", "--batch_size", 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_weights(adapter(tmp_path / "two"), adapter(tmp_path / "one"), atol=1e-5)
    one, two = (dist_io.read_jsonl(tmp_path / d / "metrics.jsonl") for d in ("one", "two"))
    for a, b in zip(one, two):  # metrics averaged over ranks = the single process's batch means
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["logps/chosen"] == pytest.approx(a["logps/chosen"], rel=1e-4)
        for key in ("loss/anchor", "loss/conditional"):
            assert (key in a) == (key in b) == bool(objective)
            assert key not in a or b[key] == pytest.approx(a[key], rel=1e-4)


def test_data_workers_give_the_same_training(toy, pairs, tmp_path):
    """Micro-batches prepared by DataLoader workers ahead of the step = prepared in the training process."""
    args = ["--model", toy / "model", "--data", pairs, "--image_root", toy / "images", "--max_steps", 3,
            "--batch_size", 4, "--grad_accum", 2, "--lr", 1e-3, "--lora_r", 4, "--lora_alpha", 8, "--save_every", 0]
    run_here("03_train_bpo.py", *args, "--output_dir", tmp_path / "main", "--num_workers", 0, check=True)
    run_here("03_train_bpo.py", *args, "--output_dir", tmp_path / "workers", "--num_workers", 2, check=True)
    assert_same_weights(adapter(tmp_path / "workers"), adapter(tmp_path / "main"), atol=1e-7)
    for a, b in zip(*(dist_io.read_jsonl(tmp_path / d / "metrics.jsonl") for d in ("main", "workers"))):
        assert {k: v for k, v in a.items() if k != "samples_per_s"} == {k: v for k, v in b.items()
                                                                         if k != "samples_per_s"}


def test_precomputed_reference_trains_like_the_per_step_reference(toy, pairs, tmp_path):
    common_args = ["--model", toy / "model", "--data", pairs, "--image_root", toy / "images", "--max_steps", 3,
                   "--batch_size", 4, "--lr", 1e-3, "--lora_r", 4, "--lora_alpha", 8, "--save_every", 0]
    run_here("03_train_bpo.py", *common_args, "--output_dir", tmp_path / "cached", check=True)
    run_here("03_train_bpo.py", *common_args, "--output_dir", tmp_path / "per_step", "--no-precompute_ref", check=True)
    cache = dist_io.read_jsonl(tmp_path / "cached" / "ref_logps.jsonl")
    n_pairs = len(dist_io.read_jsonl(pairs))
    assert len(cache) == n_pairs and len({r["id"] for r in cache}) == n_pairs
    assert not (tmp_path / "per_step" / "ref_logps.jsonl").exists()
    for a, b in zip(dist_io.read_jsonl(tmp_path / "cached" / "metrics.jsonl"),
                    dist_io.read_jsonl(tmp_path / "per_step" / "metrics.jsonl")):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key


def test_released_sampler_writes_pairs_and_resumes(toy, tmp_path):
    """01 with the authors' released settings (contrastive sampling, pixels noised at step 900, temperature 0.2):
    pairs in the same format, the sampler's settings in meta, and a rerun that has nothing left to do."""
    out = tmp_path / "pairs.jsonl"
    args = ("--samples_per_source", 8, "--batch_size", 4, "--contrast_alpha", 1, "--contrast_beta", 0.2,
            "--temperature", 0.2, "--noise_on", "pixels", "--noise_step", 900)
    build_pairs(toy, out, *args)
    pairs = dist_io.read_jsonl(out)
    assert pairs and all(p["meta"]["contrast_alpha"] == 1 and p["meta"]["noise_on"] == "pixels" for p in pairs)
    assert all(p["rejected"] and p["rejected"] != p["chosen"] for p in pairs)
    again = build_pairs(toy, out, *args)
    assert "wrote 0 pairs this run" in again.stdout and len(dist_io.read_jsonl(out)) == len(pairs)


def test_prior_check_reads_colours_counts_and_pope_by_hand(toy):
    """00's prior check: the colour and count a caption gives each present object it names, against the scene;
    the built world's prior_check.json holds them, POPE of the clean model and every floor and goal as pass/fail."""
    toy_world = script("00_make_toy.py")
    chair = scoring.Chair(scoring.synonym_table("\n".join(toy_world.synonym_lines())))
    scene = [{"name": "cup", "colour": "red", "count": 1}, {"name": "knife", "colour": "blue", "count": 2},
             {"name": "ball", "colour": "green", "count": 3}]
    cap = ("there is a cup at the top left , it is red . there are three knives at the top right , they are blue . "
           "there is a book at the bottom left , it is white .")
    stats = toy_world.prior_stats([cap], [scene], chair)
    # named and present: cup (red, 1: both right), knife (blue right, three wrong); the ball is not named
    assert stats["colour_accuracy"] == 1.0 and stats["count_accuracy"] == 0.5 and stats["recall"] == 2 / 3
    check = json.loads((toy / "prior_check.json").read_text())
    assert {"colour_accuracy", "count_accuracy"} <= set(check["rows"][0])
    assert set(check["pope"]) == {"random", "adversarial"} and 0 <= check["pope"]["random"]["accuracy"] <= 1
    assert set(check["checks"]["floors"]) == set(toy_world.FLOORS) and set(check["checks"]["goals"]) == set(toy_world.GOALS)


def test_two_nodes_train_as_one_node_of_two_processes(toy, pairs, tmp_path):
    """Two torchrun "nodes" of one process each (--nnodes 2 --node_rank 0/1, rendezvous on 127.0.0.1) train the
    adapter one node of two processes trains; a node whose --output_dir is not the folder rank 0 wrote (as on a
    disk the nodes do not share) stops the run on every node with a one-line error."""
    args = ["--model", toy / "model", "--data", pairs, "--image_root", toy / "images", "--lora_r", 8,
            "--lora_alpha", 16, "--lora_dropout", 0, "--lr", 1e-3, "--max_steps", 2, "--save_every", 0, "--seed", 0,
            "--batch_size", 2]
    one = run_torchrun("03_train_bpo.py", *args, "--output_dir", tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    nodes = run_torchrun_nodes("03_train_bpo.py", [*args, "--output_dir", tmp_path / "two"],
                               [*args, "--output_dir", tmp_path / "two"])
    assert all(n.returncode == 0 for n in nodes), nodes[0].stderr[-2000:] + nodes[1].stderr[-2000:]
    assert_same_weights(adapter(tmp_path / "two"), adapter(tmp_path / "one"), atol=1e-6)
    apart = run_torchrun_nodes("03_train_bpo.py", [*args, "--output_dir", tmp_path / "a"],
                               [*args, "--output_dir", tmp_path / "b"])
    assert all(n.returncode != 0 for n in apart)
    assert all("rank 1: --output_dir" in n.stderr and "filesystem that every node shares" in n.stderr for n in apart)
    assert not (tmp_path / "a" / "run.json").exists()  # nothing of the run written
