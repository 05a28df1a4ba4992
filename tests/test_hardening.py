"""Failures and resuming: every script killed with kill -9 and rerun against an uninterrupted run;
every kind of bad input in ground-truth, pair and benchmark files; remote faults of the judge and
the injector against a real local HTTP server; training faults; the API key, remote code, pickles
and paths that leave the image root. Scripts run in this process (run_here) where no kill is
needed, to keep the suite fast."""
import collections
import io
import json
import os
import pickle
import random
import shutil
import struct
import traceback
import zlib
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import common
import data
import dist_io
import loading
import remote
from conftest import as_if_killed_after, kill_after_lines, run_here, toy_pair_records
from openai_stub import RESET, Delay, OpenAIStub

SECRET = "sk-test-hardening-never-print-this"
KEY = {"OPENAI_API_KEY": SECRET}


def write_lines(path, lines):
    """A file of these lines (str or raw bytes), each ended by a newline."""
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return path


def error_line(proc, where):
    """The one `error:` line of a failed run (it may follow a progress bar's unfinished line), which
    must name `where` (file:line); no traceback."""
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [x[x.index("error: "):] for x in proc.stderr.splitlines() if "error: " in x]
    assert len(errors) == 1 and where in errors[0], proc.stderr[-2000:]
    return errors[0]


def half_line(path, text='{"id": "half-written'):
    """What a kill in the middle of a write leaves: a last line without its end."""
    with open(path, "a") as f:
        f.write(text)


def assert_no_secret(root, *procs):
    """The key is in no output file under root (any depth, any format) and in no stdout/stderr."""
    for proc in procs:
        assert SECRET not in proc.stdout + proc.stderr
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                assert SECRET.encode() not in f.read(), os.path.join(folder, name)


def absolute(line, root):
    """The line with its image path ABSOLUTE made the absolute path of an existing file outside root."""
    return line.replace("ABSOLUTE", str(root.parent / "outside.png")) if isinstance(line, str) else line


def png_with_size(width, height):
    """A valid 1x1 PNG whose header claims width x height: what a decompression bomb looks like to
    a reader that trusts the header (no pixel data needs decoding to find out)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = buf.getvalue()
    body = b"IHDR" + struct.pack(">II", width, height) + data[24:29]
    return data[:8] + struct.pack(">I", 13) + body + struct.pack(">I", zlib.crc32(body)) + data[33:]


@pytest.fixture(scope="module")
def root(toy, tmp_path_factory):
    """An image root with four toy images, images in the modes a loader gets wrong, and broken ones;
    ../outside.png exists, so a path that escapes the root would really find a file."""
    base = tmp_path_factory.mktemp("hardening")
    r = base / "images"
    r.mkdir()
    for i, name in enumerate(sorted(os.listdir(toy / "images"))[:4]):
        shutil.copy(toy / "images" / name, r / f"good_{i}.png")
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))  # transparent black: must show as white
    rgba.paste((255, 0, 0, 255), (0, 0, 32, 64))
    rgba.paste((0, 0, 255, 128), (32, 0, 48, 64))
    rgba.save(r / "rgba.png")
    Image.new("L", (64, 64), 77).save(r / "grey.png")
    Image.fromarray(np.full((64, 64), 32768, dtype=np.uint16)).save(r / "grey16.png")  # mid-grey in 16 bits
    palette = Image.new("P", (64, 64), 0)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.paste(1, (0, 0, 32, 64))
    palette.save(r / "palette.png", transparency=0)  # index 0 transparent, index 1 opaque green
    (r / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00 not an image" * 20)
    good = (r / "good_0.png").read_bytes()
    (r / "truncated.png").write_bytes(good[:len(good) // 2])
    (r / "huge.png").write_bytes(png_with_size(30000, 30000))
    shutil.copy(r / "good_1.png", base / "outside.png")
    return r


# ----------------------------------------------------------------------------- images


def test_odd_image_modes_load_as_what_a_person_sees(root):
    rgba = data.load_image(root, "rgba.png")
    assert rgba.mode == "RGB" and rgba.size == (64, 64)
    assert rgba.getpixel((0, 0)) == (255, 0, 0)
    assert rgba.getpixel((60, 0)) == (255, 255, 255)  # transparent: white, not the black under it
    assert all(abs(a - b) <= 1 for a, b in zip(rgba.getpixel((40, 0)), (127, 127, 255)))  # half-transparent blue
    assert data.load_image(root, "grey.png").getpixel((5, 5)) == (77, 77, 77)
    assert data.load_image(root, "grey16.png").getpixel((5, 5)) == (128, 128, 128)  # not clipped to white
    palette = data.load_image(root, "palette.png")
    assert palette.getpixel((0, 0)) == (0, 255, 0) and palette.getpixel((60, 0)) == (255, 255, 255)


@pytest.mark.parametrize("rel, says", [
    ("missing.png", "no such image file"),
    ("corrupt.png", "cannot read the image"),
    ("truncated.png", "cannot read the image"),
    ("huge.png", "pixels"),
    ("../outside.png", "outside the image root"),
    ("sub/../../outside.png", "outside the image root"),
    ("ABSOLUTE", "outside the image root"),
])
def test_bad_image_is_a_data_error_naming_it(root, rel, says):
    rel = str(root.parent / "outside.png") if rel == "ABSOLUTE" else rel
    with pytest.raises(dist_io.DataError, match=says) as e:
        data.load_image(root, rel)
    assert os.path.basename(rel) in str(e.value)


# ----------------------------------------------------------------------------- ground truth (01, 02)


def gt(rid, image, question="<image>\nWhat is in the image?", answer="there is a cup at the top left , it is red ."):
    return {"id": rid, "image": image, "conversations": [{"from": "human", "value": question},
                                                         {"from": "gpt", "value": answer}]}


def bad_ground_truth(outside):
    """{case: (the line, the kind it is counted as)}; each a record 01 and 02 must not turn into a
    pair. `outside`: an existing file outside the image root."""
    return {
        "malformed JSON": ('{"id": "m", "image": "good_0.png", "conversations": [', "not a valid JSON line"),
        "non-UTF-8 bytes": (json.dumps(gt("latin", "good_0.png")).replace("cup", "caf\\u00e9").encode()
                            .replace(b"\\u00e9", b"\xe9"), "not UTF-8"),
        "not an object": ('["a", "list"]', "expected a JSON object"),
        "missing field": (json.dumps({"id": "nf", "image": "good_0.png"}), "missing field"),
        "wrong type": (json.dumps(gt("wt", "good_0.png", answer=["a", "list"])), "wrong type"),
        "empty string": (json.dumps(gt("es", "good_0.png", answer="  ")), "empty field"),
        "only an image token": (json.dumps(gt("it", "good_0.png", question="<image>\n")), "empty field"),
        "duplicate id": (json.dumps(gt("good0", "good_1.png")), "duplicate id"),
        "path with ../": (json.dumps(gt("up", "../outside.png")), "image path outside the image root"),
        "absolute path": (json.dumps(gt("abs", str(outside))), "image path outside the image root"),
    }


@pytest.mark.parametrize("case", list(bad_ground_truth("")))
def test_bad_ground_truth_record_fails_or_is_skipped_and_counted(root, tmp_path, case):
    line, kind = bad_ground_truth(root.parent / "outside.png")[case]
    f = write_lines(tmp_path / "gt.jsonl", [json.dumps(gt("good0", "good_0.png")), line])
    with pytest.raises(dist_io.DataError, match=rf"^{f}:2: {kind}"):
        data.load_items("src", f)  # the default: fail
    bad = dist_io.OnError("skip")
    items, _ = data.load_items("src", f, bad=bad)
    assert [it["id"] for it in items] == ["src/good0-0"] and bad.counts == {kind: 1}


def test_ground_truth_json_list_that_does_not_parse_names_the_line(tmp_path):
    f = tmp_path / "gt.json"
    f.write_bytes(b'[\n{"id": "a", "image": "a.png", "conversations": []},\n{"id": "caf\xe9"}\n]')
    with pytest.raises(dist_io.DataError, match=rf"^{f}:3: not UTF-8"):
        data.load_items("src", f, bad=dist_io.OnError("skip"))  # no record can be told from the next
    f.write_text('[\n{"id": "a"},\n{"id": \n]')
    with pytest.raises(dist_io.DataError, match=rf"^{f}:4: not valid JSON"):
        data.load_items("src", f, bad=dist_io.OnError("skip"))


@pytest.fixture(scope="module")
def ground_truth(root):
    """A ground-truth file of good records (odd image modes and stray <image> tokens included),
    every bad record, and records whose image is missing, corrupt, truncated or a bomb."""
    good = [gt(f"good{i}", f"good_{i}.png") for i in range(4)]
    good += [gt(m, f"{m}.png") for m in ("rgba", "grey", "grey16", "palette")]
    good.append(gt("twice", "good_2.png", question="What is <image> in\n<image> the image?"))
    unreadable = [gt(name, f"{name}.png") for name in ("missing", "corrupt", "truncated", "huge")]
    bad = bad_ground_truth(root.parent / "outside.png").values()
    lines = [json.dumps(r) for r in good[:2]] + [x for x, _ in bad] + [json.dumps(r) for r in good[2:] + unreadable]
    f = write_lines(root.parent / "gt.jsonl", lines)
    kinds = collections.Counter(kind for _, kind in bad)
    return f, [r["id"] for r in good], [r["id"] for r in unreadable], kinds


def summary_line(proc, start):
    return [x for x in proc.stdout.splitlines() if x.startswith(start)][-1]


def test_build_pairs_skips_and_counts_bad_ground_truth(toy, root, ground_truth, tmp_path):
    f, good, unreadable, kinds = ground_truth
    out = tmp_path / "pairs.jsonl"
    args = ["--model", toy / "model", "--data", f"src={f}", "--image_root", root, "--out", out,
            "--max_new_tokens", 40, "--batch_size", 4]
    proc = run_here("01_build_pairs.py", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = [r["id"] for r in dist_io.read_jsonl(out)]
    dropped = int(summary_line(proc, "wrote ").split("dropped ")[1].split()[0])
    cut_off = int(summary_line(proc, "wrote ").split(" negatives and ")[1].split()[0])  # never written
    assert len(ids) == len(set(ids)) and set(ids) <= {f"src/{i}-0" for i in good}
    assert len(ids) + dropped + cut_off == len(good)
    assert f"skipped {len(unreadable)} unreadable images" in proc.stdout
    skipped = summary_line(proc, "skipped ")
    assert skipped.startswith(f"skipped {sum(kinds.values())} bad ground-truth records (")
    assert all(f"{n} {kind}" in skipped for kind, n in kinds.items())
    for line in range(3, 3 + sum(kinds.values())):  # each bad line named on stderr
        assert f"skip {f}:{line}: " in proc.stderr
    assert all("<image>" not in r["prompt"] for r in dist_io.read_jsonl(out))
    # --on_error fail: the first bad line, then (with that one fixed) the first unreadable image
    error_line(run_here("01_build_pairs.py", *args, "--on_error", "fail"), f"{f}:3: not a valid JSON line")
    only_images = write_lines(tmp_path / "gt.jsonl", [json.dumps(gt("missing", "missing.png")),
                                                      json.dumps(gt("good0", "good_0.png"))])
    proc = run_here("01_build_pairs.py", *args[:2], "--data", f"src={only_images}", *args[4:], "--on_error", "fail")
    assert "no such image file" in error_line(proc, f"{only_images}:1: ")


def test_inject_skips_and_counts_bad_ground_truth(toy, root, ground_truth, tmp_path):
    f, good, unreadable, kinds = ground_truth
    out = tmp_path / "pairs.jsonl"
    proc = run_here("02_inject_errors.py", "--backend", "rules", "--vocab", toy / "world.json", "--data", f"src={f}",
                    "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 02 never opens images (03 checks them): only the records themselves are judged here
    assert sorted(r["id"] for r in dist_io.read_jsonl(out)) == sorted(f"src/{i}-0" for i in good + unreadable)
    skipped = summary_line(proc, "skipped ")
    assert skipped.startswith(f"skipped {sum(kinds.values())} bad ground-truth records (")
    assert all(f"{n} {kind}" in skipped for kind, n in kinds.items())


# ----------------------------------------------------------------------------- pairs (03)


@pytest.fixture(scope="module")
def pair_records(toy):
    return toy_pair_records(toy, 16)


def train_cmd(toy, image_root, data, out, *extra):
    return ["03_train_bpo.py", "--model", toy / "model", "--data", data, "--image_root", image_root, "--output_dir",
            out, "--lora_r", 8, "--lora_alpha", 16, "--seed", 0, "--save_every", 0, *extra]


def train(*args):
    return run_here(*train_cmd(*args))


def image_cases(line):
    """The bad image paths every file with images can hold, as lines made by `line(image=...)`."""
    return {"missing image": line(image="missing.png"), "corrupt image bytes": line(image="corrupt.png"),
            "truncated image": line(image="truncated.png"), "huge image": line(image="huge.png"),
            "path with ../": line(image="../outside.png"), "absolute path": line(image="ABSOLUTE")}


def bad_pairs(good):
    """{case: the line}, for a pair file; test_io already covers malformed JSON, an empty chosen and
    a duplicate id."""
    p = lambda **kw: json.dumps({**good, **kw})
    return {
        "non-UTF-8 bytes": p(chosen="a caf\u00e9 .").encode().replace(b"\\u00e9", b"\xe9"),
        "missing field": json.dumps({k: v for k, v in good.items() if k != "rejected"}),
        "wrong type": p(chosen=3),
        "chosen == rejected": p(rejected=" " + good["chosen"] + " "),
        **image_cases(p),
    }


@pytest.mark.parametrize("case", list(bad_pairs({"chosen": ""})))
def test_bad_pair_stops_training_naming_file_and_line(toy, root, pair_records, tmp_path, case):
    good = {**pair_records[0], "image": "good_0.png"}
    line = absolute(bad_pairs({**pair_records[1], "image": "good_1.png"})[case], root)
    f = write_lines(tmp_path / "pairs.jsonl", [json.dumps(good), line])
    proc = train(toy, root, f, tmp_path / "run", "--batch_size", 2, "--max_steps", 1)  # the one step sees both
    error_line(proc, f"{f}:2:")
    assert not (tmp_path / "run" / "adapter").exists()


def test_odd_images_train_and_long_responses_are_cut_and_counted(toy, root, pair_records, tmp_path):
    recs = [{**r, "image": image} for r, image in zip(pair_records, ["rgba.png", "grey.png", "grey16.png",
                                                                    "palette.png"])]
    recs[0]["chosen"] = " ".join(["there is a cup ."] * 60)  # far longer than --max_length allows
    f = write_lines(tmp_path / "pairs.jsonl", map(json.dumps, recs))
    proc = train(toy, root, f, tmp_path / "run", "--batch_size", 4, "--max_steps", 1, "--max_length", 128)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 responses cut at --max_length 128" in proc.stdout


def test_pair_prompt_with_image_token_gets_one_image(toy, pair_records, tmp_path):
    recs = [{**r, "prompt": "<image>\n" + r["prompt"]} for r in pair_records[:2]]
    f = write_lines(tmp_path / "pairs.jsonl", map(json.dumps, recs))
    proc = train(toy, toy / "images", f, tmp_path / "run", "--batch_size", 2, "--max_steps", 1)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_train_on_error_skip_counts_and_prints_skipped_pairs(toy, root, pair_records, tmp_path):
    good = [{**r, "image": f"good_{i % 4}.png"} for i, r in enumerate(pair_records[:4])]
    bad = [absolute(x, root) for case, x in bad_pairs({**pair_records[4], "image": "good_0.png"}).items()
           if case != "truncated image"]  # only decoding finds a truncated file
    bad += ['{"id": "cut', json.dumps({**good[0], "chosen": ""}), json.dumps(good[1])]  # test_io's three
    lines = [json.dumps(r) for r in good[:2]] + bad + [json.dumps(r) for r in good[2:]]
    f = write_lines(tmp_path / "pairs.jsonl", lines)
    proc = train(toy, root, f, tmp_path / "run", "--batch_size", 4, "--max_steps", 1, "--on_error", "skip")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"skipped {len(bad)} pairs" in proc.stdout
    for line in range(3, 3 + len(bad)):
        assert f"{f}:{line}:" in proc.stderr
    error_line(train(toy, root, f, tmp_path / "run2", "--batch_size", 4, "--max_steps", 1, "--on_error", "fail"),
               f"{f}:3:")


def finite(adapter_dir):
    weights = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    return all(torch.isfinite(t).all() for t in weights.values())


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(toy, pair_records, tmp_path):
    f = write_lines(tmp_path / "pairs.jsonl", map(json.dumps, pair_records[:8]))
    out = tmp_path / "run"
    # lr 1e30: step 1 is finite (its update makes the LoRA weights ~1e30), step 2's forward overflows to NaN
    proc = train(toy, toy / "images", f, out, "--lr", 1e30, "--batch_size", 4, "--max_steps", 4, "--save_every", 1)
    message = error_line(proc, "step 2")
    assert any(w in message.lower() for w in ("nan", "inf", "finite")) and "checkpoint-1" in message
    assert [d for d in os.listdir(out) if d.startswith("checkpoint-")] == ["checkpoint-1"]
    assert finite(out / "checkpoint-1" / "adapter")
    assert not (out / "adapter").exists() or finite(out / "adapter")
    for line in (out / "metrics.jsonl").read_text().splitlines():  # strict JSON: NaN is no JSON value
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))


def test_out_of_memory_says_what_to_lower(toy, pair_records, tmp_path):
    from transformers import LlavaForConditionalGeneration
    f = write_lines(tmp_path / "pairs.jsonl", map(json.dumps, pair_records[:4]))
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    with mock.patch.object(LlavaForConditionalGeneration, "forward", side_effect=oom):
        proc = train(toy, toy / "images", f, tmp_path / "run", "--batch_size", 4, "--max_steps", 1)
    message = error_line(proc, "out of memory")
    assert "--batch_size" in message and "--gradient_checkpointing" in message


def test_train_killed_between_checkpoints_resumes_to_the_same_weights(toy, pair_records, tmp_path):
    f = write_lines(tmp_path / "pairs.jsonl", map(json.dumps, pair_records))
    args = ("--lr", 1e-3, "--batch_size", 4, "--max_steps", 8, "--save_every", 3, "--keep_checkpoints", 5)
    straight = tmp_path / "straight"
    assert train(toy, toy / "images", f, straight, *args).returncode == 0
    out = tmp_path / "killed"
    cmd = train_cmd(toy, toy / "images", f, out, *args)
    kill_after_lines(cmd, out / "metrics.jsonl", random.Random(3).randint(4, 5))  # after checkpoint-3, before 6
    done = sorted(int(d.split("-")[1]) for d in os.listdir(out) if d.startswith("checkpoint-") and "." not in d)
    assert done and done[-1] < 8
    # a kill while the next checkpoint was being written, and in the middle of a log line
    partial = out / f"checkpoint-{done[-1] + 3}.tmp" / "adapter"
    partial.mkdir(parents=True, exist_ok=True)
    (partial / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    half_line(out / "metrics.jsonl", '{"step": 99, "loss": 0.')
    proc = train(toy, toy / "images", f, out, *args, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {out / f'checkpoint-{done[-1]}'} at step {done[-1]}" in proc.stdout
    a, b = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (out, straight))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert [r["step"] for r in dist_io.read_jsonl(out / "metrics.jsonl")] == list(range(1, 9))


# ----------------------------------------------------------------------------- benchmark files (04, 05)


def bad_questions(good):
    """{case: the line}, for a benchmark question (a JSONL line of 05, a value line of 04's JSON)."""
    q = lambda **kw: json.dumps({**good, **kw})
    return {
        "non-UTF-8 bytes": q(question="What is on the caf\u00e9 table?").encode().replace(b"\\u00e9", b"\xe9"),
        "missing field": json.dumps({k: v for k, v in good.items() if k != "question"}),
        "wrong type": q(question=42),
        "empty string": q(question="  "),
        **image_cases(q),
    }


@pytest.mark.parametrize("case", [*bad_questions({"image": "", "question": ""}), "malformed JSON", "duplicate id"])
def test_bad_halbench_question_stops_naming_file_and_line(root, tmp_path, case):
    good = {"question_id": 0, "image": "good_0.png", "question": "Describe the image."}
    line = {"malformed JSON": '{"question_id": 1, "image": ',
            "duplicate id": json.dumps({**good, "image": "good_1.png"}),
            **bad_questions({**good, "question_id": 1, "image": "good_1.png"})}[case]
    f = write_lines(tmp_path / "questions.jsonl", [json.dumps(good), absolute(line, root)])
    objects = tmp_path / "objects.json"
    truth = {"good_0.png": ["cup"], "good_1.png": ["cup"]}
    try:  # ground truth for a bad image too, so that it is the image check that stops the run
        image = json.loads(absolute(line, root))["image"]
        truth.update({image: ["cup"]} if isinstance(image, str) else {})
    except (ValueError, KeyError, TypeError):
        pass
    objects.write_text(json.dumps(truth))
    proc = run_here("05_eval_halbench.py", "--model", "never-loaded", "--questions", f, "--image_dir", root,
                    "--objects", objects, "--out_dir", tmp_path / "out")
    assert "no ground truth" not in error_line(proc, f"{f}:2:")


@pytest.mark.parametrize("case", list(bad_questions({"image": "", "question": ""})) + ["duplicate id"])
def test_bad_mmvet_question_stops_naming_file_and_line(root, tmp_path, case):
    good = {"imagename": "good_0.png", "capability": ["rec"], "question": "What is it?", "answer": "a cup"}
    other = {"image": "good_1.png", "capability": ["rec"], "question": "What is it?", "answer": "a cup"}
    line = absolute(bad_questions(other)[case] if case != "duplicate id" else json.dumps(other), root)
    line = (line if isinstance(line, bytes) else line.encode()).replace(b'"image"', b'"imagename"')  # 04's name
    key = b'"v1_0"' if case == "duplicate id" else b'"v1_1"'
    f = tmp_path / "mm-vet.json"  # one question a line: line 2 is v1_0, line 3 the bad one
    f.write_bytes(b'{\n "v1_0": ' + json.dumps(good).encode() + b',\n ' + key + b": " + line + b"\n}\n")
    proc = run_here("04_eval_mmvet.py", "--model", "never-loaded", "--mmvet_json", f, "--image_dir", root,
                    "--out_dir", tmp_path / "out", "--judge", "exact")
    error_line(proc, f"{f}:3:")


def test_benchmarks_take_odd_images_and_image_tokens_in_questions(toy, root, tmp_path):
    images = ["good_0.png", "rgba.png", "grey.png", "grey16.png", "palette.png"]
    questions = [{"question_id": i, "image": im, "question": "<image>\nDescribe the image." if i == 0 else
                  "Describe <image> the image."} for i, im in enumerate(images)]
    f = write_lines(tmp_path / "questions.jsonl", map(json.dumps, questions))
    objects = tmp_path / "objects.json"
    objects.write_text(json.dumps({im: ["cup"] for im in images}))
    proc = run_here("05_eval_halbench.py", "--model", toy / "model", "--questions", f, "--image_dir", root,
                    "--objects", objects, "--synonyms", toy / "synonyms.txt", "--out_dir", tmp_path / "hal",
                    "--max_new_tokens", 4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "hal" / "scores.json").read_text())["n"] == len(images)
    mm = tmp_path / "mm-vet.json"
    mm.write_text(json.dumps({f"v1_{i}": {"imagename": im, "capability": ["rec"], "question": "<image>\nWhat is it?",
                                          "answer": "cup"} for i, im in enumerate(images)}))
    proc = run_here("04_eval_mmvet.py", "--model", toy / "model", "--mmvet_json", mm, "--image_dir", root,
                    "--out_dir", tmp_path / "mm", "--judge", "exact", "--max_new_tokens", 4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(json.loads((tmp_path / "mm" / "answers.json").read_text())) == len(images)


# ----------------------------------------------------------------------------- remote faults


MESSAGES = [{"role": "user", "content": "Grade this."}]


def fast_backoff(monkeypatch):
    """The openai client's waits before each retry, recorded and then shortened 1000x (tests stay fast)."""
    from openai._base_client import SyncAPIClient
    waits, real = [], SyncAPIClient._calculate_retry_timeout

    def recorded(self, *a, **k):
        waits.append(real(self, *a, **k))
        return waits[-1] / 1000
    monkeypatch.setattr(SyncAPIClient, "_calculate_retry_timeout", recorded)
    return waits


def test_chat_retries_each_transient_fault_with_backoff_and_jitter(monkeypatch):
    transport = [429, 500, 502, 503, (408, {"error": {}}), (409, {}), RESET, Delay(1.5, "too late")]
    bodies = [{"choices": []}, {"object": "chat.completion"}, {"choices": [{"index": 0}]}, b'{"choices": [']
    waits = fast_backoff(monkeypatch)
    with OpenAIStub(transport + bodies + ["0.7"]) as stub:
        client = remote.openai_client(stub.url, timeout=0.5, tries=len(transport) + 1)  # the Delay outlasts the timeout
        assert remote.chat(client, "judge", MESSAGES, tries=len(bodies) + 1).text == "0.7"
        assert len(stub.requests) == len(transport) + len(bodies) + 1  # every fault asked again, none given up
    # the client's exponential backoff with jitter, before each transport retry (malformed bodies are re-asked)
    factors = [w / min(0.5 * 2 ** k, 8.0) for k, w in enumerate(waits)]
    assert len(waits) == len(transport) and all(0.75 <= x <= 1 for x in factors) and len(set(factors)) > 1
    assert max(waits) <= 8.0  # capped


def test_chat_gives_up_after_bounded_tries_and_never_quotes_the_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    fast_backoff(monkeypatch)
    with OpenAIStub(default=503) as stub:
        with pytest.raises(remote.RemoteError, match=r"gave up after 3 tries \(InternalServerError: 503\)"):
            remote.chat(remote.openai_client(stub.url, tries=3), "judge", MESSAGES, tries=3)
        assert len(stub.requests) == 3
    with OpenAIStub(default={"choices": []}) as stub:
        with pytest.raises(remote.RemoteError, match=r"gave up after 3 tries \(response without choices"):
            remote.chat(remote.openai_client(stub.url, tries=3), "judge", MESSAGES, tries=3)
        assert len(stub.requests) == 3
    echo = (401, {"error": {"message": f"Incorrect API key provided: {SECRET}", "code": "invalid_api_key"}})
    with OpenAIStub(default=echo) as stub:  # a server that quotes the key back
        with pytest.raises(remote.RemoteError) as e:
            remote.chat(remote.openai_client(stub.url, tries=3), "judge", MESSAGES, tries=3)
        assert len(stub.requests) == 1 and stub.headers[0]["authorization"] == f"Bearer {SECRET}"
    assert SECRET not in "".join(traceback.format_exception(e.value)) and "401" in str(e.value)


def by_marker(script, healthy):
    """A stub reply per request: the first script entry whose marker is in the prompt gives its
    faults in order, then `healthy(prompt)`; requests without a marker are healthy at once."""
    queues = {m: list(faults) for m, faults in script.items()}

    def reply(body):
        prompt = body["messages"][-1]["content"]
        marker = next((m for m in queues if m in prompt), None)
        return queues[marker].pop(0) if marker and queues[marker] else healthy(prompt)
    return reply


def test_inject_openai_survives_faults_and_a_failure_sets_the_exit_code(tmp_path):
    answers = ["A red cup .", "A blue plate .", "Two forks .", "A green ball .", "A big clock .", "An old book ."]
    data = write_lines(tmp_path / "gt.jsonl", [json.dumps(gt(i, f"{i}.png", answer=a)) for i, a in enumerate(answers)])
    prompt = write_lines(tmp_path / "prompt.txt", ["{answer}"])
    reply = by_marker({"cup": [RESET], "plate": [Delay(1.5, "late")], "forks": [{"choices": []}], "ball": [503, 502],
                       "clock": [(409, {})], "book": [500] * 99}, lambda p: "Not " + p.strip().lower())
    out = tmp_path / "pairs.jsonl"
    args = ["--backend", "openai", "--data", f"src={data}", "--out", out, "--prompt_file", prompt, "--retries", 3,
            "--timeout", 0.5, "--max_tries", 1, "--workers", 3]
    with OpenAIStub(default=reply) as stub:
        proc = run_here("02_inject_errors.py", *args, "--base_url", stub.url, env=KEY)
    assert "1 items got no reply" in error_line(proc, stub.url)
    assert "failed 1 items (up to 1 tries each: 1 api error)" in summary_line(proc, "wrote 5 pairs this run (5 in")
    assert sorted(r["chosen"] for r in dist_io.read_jsonl(out)) == sorted(answers[:5])
    with OpenAIStub(default=lambda body: "Not an old book .") as stub:  # the rerun asks for the missing one only
        again = run_here("02_inject_errors.py", *args, "--base_url", stub.url, env=KEY)
        assert again.returncode == 0 and len(stub.requests) == 1
    assert len(dist_io.read_jsonl(out)) == 6
    assert_no_secret(tmp_path, proc, again)


def judge_score(prompt):
    """A judge that is deterministic in the answer (the last row of the grader prompt)."""
    return f"{len(prompt.splitlines()[-1]) % 11 / 10:.1f}"


MMVET = {"v1_0": {"imagename": "a.png", "capability": ["rec"], "question": "Which animals?", "answer": "cat"},
         "v1_1": {"imagename": "b.png", "capability": ["rec"], "question": "How many cups?", "answer": "3"},
         "v1_2": {"imagename": "c.png", "capability": ["math"], "question": "What is the sum?", "answer": "12"},
         "v1_3": {"imagename": "d.png", "capability": ["math"], "question": "What is 2+2?", "answer": "4"}}


def test_mmvet_judge_faults_are_retried_and_a_failure_is_never_a_zero(tmp_path):
    mm = tmp_path / "mm.json"
    mm.write_text(json.dumps(MMVET))
    ans = tmp_path / "ans.json"
    ans.write_text(json.dumps({"v1_0": "A cat.", "v1_1": "Three.", "v1_2": "13", "v1_3": "4"}))
    quoting = (503, {"error": {"message": f"overloaded, key {SECRET}"}})
    reply = by_marker({"Which animals?": [RESET, 429], "How many cups?": [Delay(1.5, "1.0")],
                       "What is the sum?": [{"choices": []}, b"<html>"], "What is 2+2?": [quoting] * 99}, judge_score)
    out = tmp_path / "out"
    args = ["--mmvet_json", mm, "--answers", ans, "--out_dir", out, "--judge", "gpt-stub", "--retries", 3,
            "--timeout", 0.5, "--workers", 2]
    with OpenAIStub(default=reply) as stub:
        proc = run_here("04_eval_mmvet.py", *args, "--base_url", stub.url, env=KEY)
    assert "1 grades got no reply" in error_line(proc, "rerun to resume")
    assert not (out / "scores.json").exists()  # no total with a 0.0 standing in for the failed grade
    grades = {g["id"]: g for g in dist_io.read_jsonl(out / "grades.jsonl")}
    assert sorted(grades) == ["v1_0", "v1_1", "v1_2"] and not any(g["failed"] for g in grades.values())
    with OpenAIStub(default=lambda body: judge_score(body["messages"][-1]["content"])) as stub:
        again = run_here("04_eval_mmvet.py", *args, "--base_url", stub.url, env=KEY)
        assert again.returncode == 0 and len(stub.requests) == 1  # only the failed grade is asked again
    assert json.loads((out / "scores_runs.json").read_text())["failed_grades"] == 0
    assert_no_secret(tmp_path, proc, again)


def test_halbench_extractor_failure_exits_nonzero_and_rerun_asks_only_for_it(tmp_path):
    answers = write_lines(tmp_path / "answers.jsonl", [
        json.dumps({"question_id": 0, "image": "a.jpg", "answer": "A cup on a table."}),
        json.dumps({"question_id": 1, "image": "b.jpg", "answer": "A dog on a sofa."})])
    objects = tmp_path / "objects.json"
    objects.write_text(json.dumps({"a.jpg": ["cup"], "b.jpg": ["dog"]}))
    out = tmp_path / "out"
    args = ["--answers", answers, "--objects", objects, "--out_dir", out, "--extractor", "gpt-stub", "--retries", 2,
           ]
    with OpenAIStub(default=by_marker({"sofa": [500] * 99}, lambda p: "cup")) as stub:
        proc = run_here("05_eval_halbench.py", *args, "--base_url", stub.url, env=KEY)
    assert "1 extractions failed" in error_line(proc, "gave up after 2 tries")
    assert not (out / "scores.json").exists()
    with OpenAIStub(default="dog") as stub:
        again = run_here("05_eval_halbench.py", *args, "--base_url", stub.url, env=KEY)
        assert again.returncode == 0 and len(stub.requests) == 1
    assert json.loads((out / "scores.json").read_text())["chair_s"] == 0.0
    assert_no_secret(tmp_path, proc, again)


# ----------------------------------------------------------------------------- kill -9 and rerun


def lines_as_set(path):
    return sorted(json.dumps(r, sort_keys=True) for r in dist_io.read_jsonl(path))


def test_inject_openai_killed_and_rerun_equals_uninterrupted(toy, tmp_path):
    prompt = write_lines(tmp_path / "prompt.txt", ["{answer}"])
    args = ["02_inject_errors.py", "--backend", "openai", "--data", f"toy={toy / 'train.json'}", "--prompt_file",
            prompt, "--samples_per_source", 40, "--workers", 2]
    rewrite = lambda body: Delay(0.05, "not " + body["messages"][-1]["content"].strip())
    with OpenAIStub(default=rewrite) as stub:
        straight, killed = tmp_path / "straight.jsonl", tmp_path / "killed.jsonl"
        assert run_here(*args, "--base_url", stub.url, "--out", straight).returncode == 0
        part = f"{killed}.part0"
        kill_after_lines([*args, "--base_url", stub.url, "--out", killed], part, random.Random(2).randint(5, 30))
        half_line(part)
        assert run_here(*args, "--base_url", stub.url, "--out", killed).returncode == 0
    ids = [r["id"] for r in dist_io.read_jsonl(killed)]
    assert len(ids) == len(set(ids)) == 40 and lines_as_set(killed) == lines_as_set(straight)


def test_mmvet_killed_answering_then_grading_equals_uninterrupted(toy, tmp_path):
    mm, n = toy / "mmvet.json", len(json.loads((toy / "mmvet.json").read_text()))
    rng = random.Random(4)
    slow_judge = lambda body: Delay(0.05, judge_score(body["messages"][-1]["content"]))
    with OpenAIStub(default=slow_judge) as stub:
        args = ["04_eval_mmvet.py", "--model", toy / "model", "--mmvet_json", mm, "--image_dir", toy / "images",
                "--judge", "gpt-stub", "--base_url", stub.url, "--max_new_tokens", 6, "--batch_size", 1, "--workers", 1]
        straight, out = tmp_path / "straight", tmp_path / "killed"
        assert run_here(*args, "--out_dir", straight).returncode == 0
        kill_after_lines([*args, "--out_dir", out], out / "answers.jsonl", rng.randint(2, n - 3))
        half_line(out / "answers.jsonl")
        kill_after_lines([*args, "--out_dir", out], out / "grades.jsonl", rng.randint(2, n - 3))
        half_line(out / "grades.jsonl")
        assert run_here(*args, "--out_dir", out).returncode == 0
    for name in ("answers.json", "scores.json"):
        assert (out / name).read_text() == (straight / name).read_text()
    assert lines_as_set(out / "answers.jsonl") == lines_as_set(straight / "answers.jsonl")
    assert lines_as_set(out / "grades.jsonl") == lines_as_set(straight / "grades.jsonl")
    assert len(dist_io.read_jsonl(out / "grades.jsonl")) == n  # each question graded exactly once


def test_halbench_killed_and_rerun_equals_uninterrupted(toy, tmp_path):
    n = len((toy / "halbench.jsonl").read_text().splitlines())
    args = ["05_eval_halbench.py", "--model", toy / "model", "--questions", toy / "halbench.jsonl", "--image_dir",
            toy / "images", "--objects", toy / "halbench_objects.json", "--synonyms", toy / "synonyms.txt",
            "--max_new_tokens", 12, "--batch_size", 1]
    straight, out = tmp_path / "straight", tmp_path / "killed"
    assert run_here(*args, "--out_dir", straight).returncode == 0
    kill_after_lines([*args, "--out_dir", out], out / "answers.jsonl", random.Random(5).randint(3, n - 6))
    half_line(out / "answers.jsonl", '{"question_id": 0, "ans')
    assert run_here(*args, "--out_dir", out).returncode == 0
    ids = [r["question_id"] for r in dist_io.read_jsonl(out / "answers.jsonl")]
    assert len(ids) == len(set(ids)) == n
    assert lines_as_set(out / "answers.jsonl") == lines_as_set(straight / "answers.jsonl")
    for name in ("details.jsonl", "scores.json"):
        assert (out / name).read_text() == (straight / name).read_text()


def test_whole_file_outputs_are_replaced_atomically(tmp_path):
    f = tmp_path / "scores.json"
    dist_io.write_atomic(f, '{"total": 50.0}')
    with pytest.raises(UnicodeEncodeError):  # a write that dies half-way (a lone surrogate cannot be encoded)
        dist_io.write_atomic(f, '{"total": 12.5, "note": "' + "x" * 100_000 + '\ud800"}')
    assert json.loads(f.read_text()) == {"total": 50.0} and os.listdir(tmp_path) == ["scores.json"]


# ----------------------------------------------------------------------------- security


def test_model_code_in_a_checkpoint_dir_is_never_run(toy, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(toy / "model", model)
    marker = tmp_path / "remote-code-ran"
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w')\n"
                                   "from transformers import LlavaConfig as EvilConfig\n"
                                   "from transformers import LlavaForConditionalGeneration as EvilModel\n")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForImageTextToText": "evil.EvilModel"}
    (model / "config.json").write_text(json.dumps(config))
    try:
        loading.load_model(str(model))
    except ValueError:
        pass  # refusing is fine too; running it is not
    assert not marker.exists()


class Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):  # unpickling this creates the marker file: code ran
        return (open, (self.marker, "w"))


def test_pickled_code_in_a_checkpoint_or_adapter_is_never_run(toy, pair_records, tmp_path):
    f = write_lines(tmp_path / "pairs.jsonl", map(json.dumps, pair_records[:4]))
    out = tmp_path / "run"
    assert train(toy, toy / "images", f, out, "--batch_size", 4, "--max_steps", 2, "--save_every", 1).returncode == 0
    shutil.copytree(out / "adapter", tmp_path / "trained_adapter")
    as_if_killed_after(out, 1)
    marker = tmp_path / "pickle-ran"
    torch.save({"step": 1, "optimizer": Evil(marker)}, out / "checkpoint-1" / "state.pt")
    proc = train(toy, toy / "images", f, out, "--batch_size", 4, "--max_steps", 2, "--resume")
    error_line(proc, str(out / "checkpoint-1"))
    assert not marker.exists()
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    shutil.copy(tmp_path / "trained_adapter" / "adapter_config.json", adapter)
    with open(adapter / "adapter_model.bin", "wb") as fh:  # an old-style adapter: a pickle
        pickle.dump({"weight": Evil(marker)}, fh)
    with pytest.raises(Exception):
        loading.load_model(str(toy / "model"), adapter=str(adapter))
    assert not marker.exists()
