"""Shared fixtures: one quick toy world per test session, built by the real 00_make_toy.py."""
import contextlib
import io
import os
import runpy
import signal
import subprocess
import sys
import time
from unittest import mock

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # two test processes at once on 2 cores
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a long smoke run, skipped unless its environment variable asks for it")


def run_script(name, *args, check=True, env=None, **kw):
    """Runs a numbered script like a user would; returns the CompletedProcess."""
    cmd = [sys.executable, os.path.join(ROOT, name), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def run_here(name, *args, env=None):
    """Runs a numbered script inside this process (runpy, as `python name args`; env: variables set
    for the run), which saves the seconds of importing torch and transformers again; the same code
    path as run_script otherwise. Returns a CompletedProcess whose returncode and stderr mirror the
    interpreter's: a sys.exit message goes to stderr with code 1, an uncaught exception to
    sys.excepthook (the script's own, if it sets one; restored afterwards) with code 1."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    argv = [os.path.join(ROOT, name), *map(str, args)]
    with mock.patch.object(sys, "argv", argv), mock.patch.dict(os.environ, env or {}), \
            mock.patch.object(sys, "excepthook", sys.__excepthook__), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(argv[0], run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except Exception as e:
            code = 1
            sys.excepthook(type(e), e, e.__traceback__)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


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


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """The quick toy world; BPO_TEST_TOY=DIR reuses one built earlier by `00_make_toy.py --out DIR
    --quick` (for running a few tests while working; CI builds it afresh)."""
    from pathlib import Path
    reuse = os.environ.get("BPO_TEST_TOY")
    if reuse and os.path.exists(os.path.join(reuse, "prior_check.json")):
        return Path(reuse)
    out = tmp_path_factory.mktemp("toy")
    run_script("00_make_toy.py", "--out", out, "--quick", "--seed", 0)
    return out


@pytest.fixture(scope="session")
def toy_model(toy):
    import common
    import torch
    torch.manual_seed(0)
    return common.load_model(str(toy / "model"))
