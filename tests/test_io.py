"""JSONL reading and writing: clear errors, nothing lost to a kill."""
import json

import pytest
from PIL import Image

import data
import dist_io
from conftest import run_here


def test_malformed_line_names_file_and_line(tmp_path):
    f = tmp_path / "pairs.jsonl"
    f.write_text('{"id": "a"}\n\n{"id": "b",\n{"id": "c"}\n')
    with pytest.raises(dist_io.DataError, match=r"pairs\.jsonl:3: not a valid JSON line"):
        dist_io.read_jsonl(f)
    f.write_text('{"id": "a"}\n[1, 2]\n')
    with pytest.raises(dist_io.DataError, match=r"pairs\.jsonl:2: expected a JSON object"):
        dist_io.read_jsonl(f)


def test_training_script_reports_file_and_line(tmp_path):
    f = tmp_path / "pairs.jsonl"
    good = {"id": "x", "image": "a.png", "prompt": "q", "chosen": "a", "rejected": "b"}
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    f.write_text(json.dumps(good) + "\n" + json.dumps({**good, "id": "y", "chosen": ""}) + "\n")
    proc = run_here("03_train_bpo.py", "--model", "unused", "--data", f, "--image_root", tmp_path,
                    "--output_dir", tmp_path / "run")
    assert proc.returncode != 0
    assert f"{f}:2: missing, empty or non-string field (chosen)" in proc.stderr
    f.write_text(json.dumps(good) + "\n" + json.dumps({**good, "rejected": "c"}) + "\n")
    proc = run_here("03_train_bpo.py", "--model", "unused", "--data", f, "--image_root", tmp_path,
                    "--output_dir", tmp_path / "run")
    assert proc.returncode != 0 and f"{f}:2: duplicate id ('x', first at {f}:1)" in proc.stderr
    f.write_text(json.dumps(good) + "\n" + "{oops\n")
    proc = run_here("03_train_bpo.py", "--model", "unused", "--data", f, "--image_root", tmp_path,
                    "--output_dir", tmp_path / "run")
    assert proc.returncode != 0 and f"{f}:2: not a valid JSON line" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_partial_last_line_dropped_and_truncated_on_append(tmp_path):
    f = tmp_path / "out.jsonl"
    f.write_bytes(b'{"id": "a"}\n{"id": "b"}\n{"id": "c", "rej')  # a kill in the middle of a write
    assert dist_io.existing_ids(f) == {"a", "b"}
    with pytest.raises(dist_io.DataError):
        dist_io.read_jsonl(f)  # a reader that does not expect a partial line still refuses it
    w = dist_io.JsonlAppender(f)
    w.write({"id": "c"})
    w.close()
    assert [r["id"] for r in dist_io.read_jsonl(f)] == ["a", "b", "c"]


def test_json_list_and_jsonl_read_alike(tmp_path):
    recs = [{"id": "1", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cup."},
        {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Red."}]},
        {"id": "2", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}]
    (tmp_path / "a.json").write_text(json.dumps(recs))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    for name in ("a.json", "a.jsonl"):
        items, no_image = data.load_items("src", tmp_path / name, turns="all")
        assert no_image == 1
        assert [(i["id"], i["prompt"], i["answer"]) for i in items] == [
            ("src/1-0", "What is it?", "A cup."), ("src/1-1", "Colour?", "Red.")]
    items, _ = data.load_items("src", tmp_path / "a.json", turns="first")
    assert [i["id"] for i in items] == ["src/1-0"]


def test_sample_per_source_is_uniform_and_seeded():
    items = list(range(100))
    a, b = data.sample_per_source(items, 10, 3), data.sample_per_source(items, 10, 3)
    assert a == b and len(set(a)) == 10 and a != data.sample_per_source(items, 10, 4)
    assert data.sample_per_source(items, -1, 0) == items
