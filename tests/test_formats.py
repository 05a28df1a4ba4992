"""03 reads the public preference sets as they are published: TRL's conversational vision JSONL, RLAIF-V's
parquet (image bytes), LLaVA-style conversations + rejected_conversations (POVID); a pair read from each trains
as the same pair in this project's own form (same tokens: the same step-1 log-probs and reference)."""
import json

import pytest

import common
import dist_io
from conftest import run_here

PROMPT = "Describe the image in detail."


@pytest.fixture(scope="module")
def same_pairs(toy, tmp_path_factory):
    """Eight toy pairs written in every format; two of them two-turn conversations."""
    d = tmp_path_factory.mktemp("formats")
    recs = json.load(open(toy / "train.json"))[:9]
    pairs = []
    for i, (r, n) in enumerate(zip(recs, recs[1:])):
        history = [["How many objects are there in total?", "three ."]] if i < 2 else []
        pairs.append({"id": f"p{i}", "image": r["image"], "prompt": PROMPT, "history": history,
                      "chosen": r["conversations"][1]["value"], "rejected": n["conversations"][1]["value"]})
    def write(name, records):
        (d / name).write_text("".join(json.dumps(x) + "\n" for x in records))
        return d / name
    bpo = write("bpo.jsonl", [{**p, "source": "toy", "method": "test"} for p in pairs])
    user = lambda q, image: {"role": "user", "content": ([{"type": "image"}] if image else []) + [{"type": "text", "text": q}]}
    said = lambda a: [{"role": "assistant", "content": [{"type": "text", "text": a}]}]
    trl = write("trl.jsonl", [{"id": p["id"], "images": [p["image"]],
                               "prompt": [m for k, (q, a) in enumerate(p["history"]) for m in (user(q, k == 0), said(a)[0])]
                               + [user(p["prompt"], not p["history"])],
                               "chosen": said(p["chosen"]), "rejected": said(p["rejected"])} for p in pairs])
    turns = lambda p, last: [t for q, a in p["history"] for t in ({"from": "human", "value": q},
                                                                 {"from": "gpt", "value": a})] + \
        [{"from": "human", "value": p["prompt"]}, {"from": "gpt", "value": last}]
    llava = d / "povid.json"
    llava.write_text(json.dumps([{"id": p["id"], "image": p["image"], "conversations": turns(p, p["chosen"]),
                                  "rejected_conversations": turns(p, p["rejected"])} for p in pairs]))
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    single = [p for p in pairs if not p["history"]]  # RLAIF-V's records are single-turn
    parquet = d / "rlaifv.parquet"
    pq.write_table(pa.table({"image": [{"bytes": (toy / "images" / p["image"]).read_bytes(), "path": p["image"]}
                                       for p in single],
                             "question": [p["prompt"] for p in single], "chosen": [p["chosen"] for p in single],
                             "rejected": [p["rejected"] for p in single], "idx": [p["id"] for p in single]}),
                   parquet, row_group_size=3)
    bpo_single = write("bpo_single.jsonl", [{**p, "source": "toy", "method": "test"} for p in single])
    return {"bpo": bpo, "trl": trl, "llava": llava, "rlaifv": parquet, "bpo_single": bpo_single}


def step_one(toy, data, out, *extra):
    proc = run_here("03_train_bpo.py", "--model", toy / "model", "--data", data, "--image_root", toy / "images",
                    "--output_dir", out, "--lora_r", 4, "--lora_alpha", 8, "--batch_size", 2, "--max_steps", 1,
                    "--save_every", 0, "--seed", 0, *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = sorted(x for r in dist_io.read_jsonl(out / "ref_logps.jsonl") for x in (r["chosen"], r["rejected"]))
    return dist_io.read_jsonl(out / "metrics.jsonl")[0], ref


@pytest.mark.parametrize("fmt,against", [("trl", "bpo"), ("llava", "bpo"), ("rlaifv", "bpo_single")])
def test_each_format_trains_as_its_pairs_in_bpo_form(toy, same_pairs, tmp_path, fmt, against):
    want, want_ref = step_one(toy, same_pairs[against], tmp_path / "bpo")
    got, got_ref = step_one(toy, same_pairs[fmt], tmp_path / fmt)  # detected from the file
    for key in ("loss", "logps/chosen", "logps/rejected", "rewards/margins"):
        assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-7), key
    assert got_ref == pytest.approx(want_ref, rel=1e-6)
    named, _ = step_one(toy, same_pairs[fmt], tmp_path / f"{fmt}_named", "--data_format", fmt)
    assert named["logps/chosen"] == pytest.approx(got["logps/chosen"], rel=1e-6)


def test_earlier_turns_are_the_prompt_as_llavas_conversation(toy_model):
    _, processor = toy_model
    text = common.chat_prompt(processor, " Q2 ", history=[[" Q1", "A1 "]])
    assert text == (f"{common.VICUNA_SYSTEM} USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:")
    assert common.chat_prompt(processor, "Q") == f"{common.VICUNA_SYSTEM} USER: <image>\nQ ASSISTANT:"


def test_bad_records_are_named_by_file_and_line_or_row(toy, same_pairs, tmp_path):
    trl = tmp_path / "trl.jsonl"
    good = json.loads(same_pairs["trl"].read_text().splitlines()[2])
    trl.write_text(json.dumps(good) + "\n" + json.dumps({**good, "images": ["a.png", "b.png"]}) + "\n")
    proc = run_here("03_train_bpo.py", "--model", toy / "model", "--data", trl, "--image_root", toy / "images",
                    "--output_dir", tmp_path / "o")
    assert proc.returncode != 0 and f"{trl}:2: not a trl record" in proc.stderr and "one image" in proc.stderr
    povid = tmp_path / "povid.json"
    rec = json.loads(same_pairs["llava"].read_text())[3]
    rec["rejected_conversations"][0]["value"] = "another question?"
    povid.write_text(json.dumps([json.loads(same_pairs["llava"].read_text())[2], rec]))
    proc = run_here("03_train_bpo.py", "--model", toy / "model", "--data", povid, "--image_root", toy / "images",
                    "--output_dir", tmp_path / "p")
    assert proc.returncode != 0 and f"{povid}:2:" in proc.stderr and "other questions" in proc.stderr
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"image": [{"bytes": b"not an image", "path": "x"}], "question": ["q"], "chosen": ["a"],
                             "rejected": ["b"]}), bad)
    proc = run_here("03_train_bpo.py", "--model", toy / "model", "--data", bad, "--output_dir", tmp_path / "q",
                    "--dry_run")
    assert proc.returncode != 0 and f"{bad}:row 0: unreadable image" in proc.stderr
