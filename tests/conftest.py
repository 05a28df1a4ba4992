"""Shared fixtures: one quick toy world per test session, built by the real 00_make_toy.py."""
import contextlib
import importlib.util
import io
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from unittest import mock

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # two test processes at once on 2 cores
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a long smoke run, skipped unless its environment variable asks for it")
    config.addinivalue_line("markers", "toy: needs the quick toy world (built once a session); `make test-fast` "
                                       "runs the tests without it")


def pytest_collection_modifyitems(items):
    for item in items:  # fixturenames holds every fixture a test needs, directly or through another one
        arch = getattr(item, "callspec", None) and item.callspec.params.get("arch")
        if {"toy", "qwen_toy", "toy_model", "qwen_model"} & set(item.fixturenames) or arch:
            item.add_marker(pytest.mark.toy)


def run_script(name, *args, check=True, env=None, **kw):
    """Runs a numbered script like a user would; returns the CompletedProcess."""
    cmd = [sys.executable, os.path.join(ROOT, name), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def script(name):
    """A script as a module (importing a numbered script does no work), by its path from the repository root."""
    module = os.path.splitext(name)[0].replace("/", ".")
    if module not in sys.modules:
        spec = importlib.util.spec_from_file_location(module, os.path.join(ROOT, name))
        sys.modules[module] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[module])
    return sys.modules[module]


def torchrun(name, *args, nproc=2, **popen):
    """A numbered script started under torchrun with nproc CPU processes (gloo) on a free port, in a session of its
    own (os.killpg reaches the ranks too)."""
    with socket.socket() as s:  # a free port: another test may run torchrun at the same time
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
           os.path.join(ROOT, name), *map(str, args)]
    return subprocess.Popen(cmd, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            start_new_session=True, **popen)


def run_torchrun(name, *args, nproc=2, timeout=300):
    """Runs a numbered script under torchrun (torchrun()); a hang fails the test after `timeout` seconds instead of
    stalling the suite."""
    proc = torchrun(name, *args, nproc=nproc, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    cmd = proc.args
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the ranks too, not only the launcher
        out, err = proc.communicate()
        raise AssertionError(f"{name} under torchrun hung for {timeout} s:\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_torchrun_nodes(name, *node_args, timeout=300):
    """Runs a numbered script as len(node_args) torchrun "nodes" of one process each on this machine (gloo,
    --nnodes N --node_rank r, rendezvous on 127.0.0.1), node r with the arguments node_args[r]; returns the
    CompletedProcess of each node."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", str(len(node_args)),
                               "--node_rank", str(r), "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
                               "--master_port", str(port), os.path.join(ROOT, name), *map(str, a)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
             for r, a in enumerate(node_args)]
    done = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                os.killpg(p.pid, signal.SIGKILL)
            raise AssertionError(f"{name} on {len(procs)} nodes hung for {timeout} s") from None
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


def run_here(name, *args, env=None, check=False):
    """Runs a numbered script's main(argv) inside this process (env: variables set for the run), which saves
    the seconds of importing torch and transformers again; the same code path as run_script otherwise.
    Returns a CompletedProcess whose returncode and stderr mirror the interpreter's: a sys.exit message goes
    to stderr with code 1, an uncaught exception's traceback to stderr with code 1. check: a failure raises."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    argv = [str(a) for a in args]
    with mock.patch.dict(os.environ, env or {}), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            script(name).main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except Exception as e:
            code = 1
            traceback.print_exception(e)
    if check and code != 0:
        raise AssertionError(f"{name} failed ({code}):\n{err.getvalue()[-3000:]}")
    return subprocess.CompletedProcess([name, *argv], code, out.getvalue(), err.getvalue())


def toy_pair_records(toy, n):
    """n good pairs on the toy's images: chosen the ground-truth caption, rejected the next image's."""
    import json
    recs = json.load(open(toy / "train.json"))[:n + 1]
    return [{"id": r["id"], "image": r["image"], "prompt": "Describe the image.",
             "chosen": r["conversations"][1]["value"], "rejected": n["conversations"][1]["value"],
             "source": "toy", "method": "test"} for r, n in zip(recs, recs[1:])]


def as_if_killed_after(out, step):
    """A finished 03 run in `out` made into the run a kill right after checkpoint-`step` leaves: the later
    checkpoints, the adapter and the finished mark gone (metrics.jsonl keeps its later rows, as a kill leaves them)."""
    import json
    import shutil
    for name in os.listdir(out):
        if name.startswith("checkpoint-") and int(name.rsplit("-", 1)[1]) > step or name == "adapter":
            shutil.rmtree(os.path.join(out, name))
    run = json.load(open(os.path.join(out, "run.json")))
    json.dump({**run, "finished_step": None}, open(os.path.join(out, "run.json"), "w"))


def kill_after_lines(args, path, n_lines, timeout=120):
    """Starts a numbered script (args[0]) and kill -9s it once `path` holds n_lines records;
    asserts that it really was interrupted."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, args[0]), *map(str, args[1:])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(path) and open(path).read().count("\n") >= n_lines:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"{args[0]} finished before it could be interrupted"


ARCHS = ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3"]  # every family (families/)
_WORLDS = {}


def quick_world(arch, tmp_path_factory):
    """The quick toy world of a family (00_make_toy.py --quick --arch ARCH), built once a session; BPO_TEST_TOYS=DIR
    reuses DIR/ARCH built earlier (for running a few tests while working; CI builds them afresh)."""
    from pathlib import Path
    if arch not in _WORLDS:
        reuse = os.path.join(os.environ.get("BPO_TEST_TOYS", "/nonexistent"), arch)
        if os.path.exists(os.path.join(reuse, "prior_check.json")):
            _WORLDS[arch] = Path(reuse)
        else:
            out = tmp_path_factory.mktemp(f"toy_{arch}")
            run_script("00_make_toy.py", "--out", out, "--quick", "--seed", 0, "--arch", arch)
            _WORLDS[arch] = out
    return _WORLDS[arch]


_MODELS = {}


def world_model(arch, tmp_path_factory):
    """(model, processor) of a family's quick world, loaded once a session."""
    if arch not in _MODELS:
        import torch

        import loading
        torch.manual_seed(0)
        _MODELS[arch] = loading.load_model(str(quick_world(arch, tmp_path_factory) / "model"))
    return _MODELS[arch]


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """LLaVA-1.5's quick toy world (the one most tests use)."""
    return quick_world("llava", tmp_path_factory)


@pytest.fixture(scope="session")
def toy_model(tmp_path_factory):
    return world_model("llava", tmp_path_factory)


@pytest.fixture(scope="session")
def qwen_toy(tmp_path_factory):
    return quick_world("qwen2_5_vl", tmp_path_factory)


@pytest.fixture(scope="session")
def qwen_model(tmp_path_factory):
    return world_model("qwen2_5_vl", tmp_path_factory)


def arch_world(request, arch):
    """(toy world folder, (model, processor)) of a family, for tests parametrized over `arch`."""
    factory = request.getfixturevalue("tmp_path_factory")
    return quick_world(arch, factory), world_model(arch, factory)


def plain_inputs(model, input_ids, vision, attention_mask=None):
    """The model's own inputs for a plain forward of token ids with their images (and which tokens are the image's,
    where the family's forward wants it: Qwen's multimodal positions, Gemma 3's image block)."""
    from families import family_of
    return dict(input_ids=input_ids, attention_mask=attention_mask, **vision,
                **family_of(model).token_types(input_ids, model.config))
