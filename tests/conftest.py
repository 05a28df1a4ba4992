"""Shared fixtures: one quick toy world per test session, built by the real 00_make_toy.py."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # two test processes at once on 2 cores
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_script(name, *args, check=True, env=None, **kw):
    """Runs a numbered script like a user would; returns the CompletedProcess."""
    cmd = [sys.executable, os.path.join(ROOT, name), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    run_script("00_make_toy.py", "--out", out, "--quick", "--seed", 0)
    return out


@pytest.fixture(scope="session")
def toy_model(toy):
    import common
    import torch
    torch.manual_seed(0)
    return common.load_model(str(toy / "model"))
