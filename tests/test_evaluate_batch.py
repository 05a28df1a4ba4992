"""experiments/evaluate.py: several scripts in one process, in order, stopping at the first failure; with
--marker finished ones (scores.json present) are skipped and the marker is written at the end."""
import json
import os
import subprocess
import sys

from conftest import ROOT

SCRIPT = """import json, os, sys
def main(argv):
    out = argv[argv.index("--out_dir") + 1]
    with open(os.path.join(os.path.dirname(out), "log.txt"), "a") as f:
        f.write(os.path.basename(out) + "\\n")
    if "--fail" in argv:
        sys.exit(f"error: {out}: bad input")
    os.makedirs(out, exist_ok=True)
    json.dump({"n": 1}, open(os.path.join(out, "scores.json"), "w"))
"""


def evaluate(tmp_path, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "evaluate.py"), *args],
                          capture_output=True, text=True, cwd=tmp_path)


def test_runs_commands_in_order_and_stops_at_the_first_failure(tmp_path):
    (tmp_path / "s.py").write_text(SCRIPT)
    proc = evaluate(tmp_path, "--command", f"s.py --out_dir {tmp_path}/a", "--command", "s.py --out_dir '" +
                    f"{tmp_path}/b c" + "' --fail", "--command", f"s.py --out_dir {tmp_path}/d")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == f"error: {tmp_path}/b c: bad input"  # the script's own line
    assert (tmp_path / "log.txt").read_text().split("\n") == ["a", "b c", ""]  # quoted argument kept, d not run


def test_marker_skips_scored_commands_and_json_commands_follow_the_lines(tmp_path):
    (tmp_path / "s.py").write_text(SCRIPT)
    (tmp_path / "cmds.json").write_text(json.dumps([["s.py", "--out_dir", str(tmp_path / "b")]]))
    args = ["--command", f"s.py --out_dir {tmp_path}/a", "--commands", "cmds.json"]
    assert evaluate(tmp_path, *args).returncode == 0  # no marker: every command runs, every time
    assert evaluate(tmp_path, *args).returncode == 0
    assert (tmp_path / "log.txt").read_text().split() == ["a", "b"] * 2
    (tmp_path / "a" / "scores.json").unlink()
    assert evaluate(tmp_path, *args, "--marker", "done").returncode == 0
    assert (tmp_path / "log.txt").read_text().split() == ["a", "b"] * 2 + ["a"]  # b had its scores
    assert json.loads((tmp_path / "done").read_text()) == {"commands": 2}
    assert evaluate(tmp_path).returncode == 2  # nothing to run: a usage error
