"""02_inject_errors.py: the rules backend against the toy world's ground truth, the openai backend
against a local OpenAI-compatible server over real HTTP, the hf backend killed and rerun, torchrun."""
import collections
import json
import os
import re

import data
import dist_io
from conftest import kill_after_lines, run_here, run_torchrun
from openai_stub import OpenAIStub

PAIR_FIELDS = {"id", "image", "prompt", "chosen", "rejected", "source", "method", "meta"}


def inject(*args, **kw):
    return run_here("02_inject_errors.py", *args, **{"check": True, **kw})


def summary(proc):
    """(written this run, failed items, {reason: count}) from the summary line."""
    line = [x for x in proc.stdout.splitlines() if x.startswith("wrote ")][-1]
    written, failed = map(int, re.search(r"wrote (\d+) pairs.*failed (\d+) items", line).groups())
    reasons = {r: int(n) for n, r in re.findall(r"(\d+) (empty|identical|echo|cut off|nothing to change|api error)", line)}
    return written, failed, reasons


def check_pairs(path, method="error_injection"):
    recs = dist_io.read_jsonl(path)
    assert recs and len({r["id"] for r in recs}) == len(recs), "duplicate ids"
    for r in recs:
        assert PAIR_FIELDS <= set(r) and r["method"] == method
        assert r["rejected"].strip() and r["rejected"].split() != r["chosen"].split()
    return recs


def facts(text, w):
    """The (object, colour, count, position) statements of a toy caption, read with world.json's
    own vocabulary; a sentence of another shape gives nothing."""
    singular = {pl: o for o, pl in w["plurals"].items()}
    out = set()
    for s in text.split(" . "):
        m = re.fullmatch(r"there (?:is an?|are (\w+)) (\w+) at the (\w+ \w+) , (?:it is|they are) (\w+)\s*\.?",
                         s.strip())
        if m and (m[1] is None or m[1] in w["numbers"]):
            count = 1 if m[1] is None else w["numbers"].index(m[1])
            out.add((m[2] if m[1] is None else singular.get(m[2], "?"), m[4], count, m[3]))
    return out


def test_rules_on_toy_contradict_world_ground_truth(toy, tmp_path):
    out = tmp_path / "pairs.jsonl"
    inject("--backend", "rules", "--data", f"toy={toy / 'train.json'}", "--vocab", toy / "world.json", "--out", out)
    w = json.load(open(toy / "world.json"))
    records = json.load(open(toy / "train.json"))
    recs = {r["id"]: r for r in check_pairs(out)}
    contradicting = 0
    for rec in records:
        scene = {(o["name"], o["colour"], o["count"], o["position"]) for o in w["images"][rec["image"]]["objects"]}
        pair = recs.get(f"toy/{rec['id']}-0")
        assert facts(rec["conversations"][1]["value"], w) == scene  # the checker reads the truth right
        if pair and facts(pair["rejected"], w) - scene:  # states something the image does not have
            contradicting += 1
            assert pair["meta"]["backend"] == "rules" and pair["meta"]["changes"]
    assert contradicting >= 0.95 * len(records), f"{contradicting}/{len(records)}"


def test_rules_all_turns_count_failures_and_resume(toy, tmp_path):
    out = tmp_path / "pairs.jsonl"
    args = ("--backend", "rules", "--data", f"toy={toy / 'train.json'}", "--vocab", toy / "world.json",
            "--out", out, "--turns", "all", "--samples_per_source", 200)
    written, failed, reasons = summary(inject(*args))
    items, _ = data.load_items("toy", toy / "train.json", "all")
    sampled = {it["id"]: it for it in data.sample_per_source(items, 200, 0)}
    recs = check_pairs(out)
    unchangeable = [i for i, it in sampled.items() if it["answer"] in ("none .", "nothing .")]
    assert unchangeable and written == len(recs) and written + failed == len(sampled)
    assert reasons == {"nothing to change": len(unchangeable)}
    assert not {r["id"] for r in recs} & set(unchangeable)  # a failure is never written as a pair
    # short answers change too: a yes/no flips, a count moves, a colour changes
    changed = {r["chosen"]: r["rejected"] for r in recs}
    # an existence answer ("the image has cup and fork , plate no .") never swaps the object the question asks
    # about; its yes/no flips in some
    exist = {c: r for c, r in changed.items() if re.fullmatch(r"the image has [\w ]+ , \w+ (yes|no) \.", c)}
    asked = lambda answer: answer.split(" , ")[-1].split()[0]
    assert exist and all(asked(r) == asked(c) for c, r in exist.items())
    assert any(r.split()[-2] != c.split()[-2] for c, r in exist.items())
    again = inject(*args)
    assert summary(again)[:2] == (0, failed) and f"{len(sampled)} items, {written} already done" in again.stdout
    assert len(check_pairs(out)) == written


def test_rules_coco_vocabulary(tmp_path):
    data = tmp_path / "coco.json"
    answers = ["There is an apple on the wooden table.", "No, the man is standing to the left of two dogs.",
               "A cat sleeps under a bench.", "People walk past a building.", "Yes, there is an apple and no cup."]
    questions = ["Q?"] * 4 + ["Is there an apple?"]
    json.dump([{"id": i, "image": f"{i}.jpg", "conversations": [{"from": "human", "value": f"<image>\n{q}"},
                                                                {"from": "gpt", "value": a}]}
               for i, (q, a) in enumerate(zip(questions, answers))], open(data, "w"))
    out = tmp_path / "pairs.jsonl"
    inject("--backend", "rules", "--data", f"coco={data}", "--out", out, "--edits", 9)  # default vocab: COCO
    got = {r["chosen"]: r for r in check_pairs(out)}
    assert len(got) == 5
    # the asked-about apple stays, the answer flips, the "no" of "no cup" is not an answer
    asked = got[answers[4]]["rejected"]
    assert asked.startswith("No, there is an apple and no ") and not asked.endswith(" cup."), asked
    apple = got[answers[0]]["rejected"]
    assert re.fullmatch(r"There is a (banana|pear) on the (metal|plastic) (desk|counter)\.", apple), apple
    assert re.fullmatch(r"Yes, the (woman|boy) is sitting to the right of three cats\.", got[answers[1]]["rejected"])
    assert {c["type"] for c in got[answers[1]]["meta"]["changes"]} == {"answers", "objects", "attributes",
                                                                      "positions", "numbers"}
    assert got[answers[3]]["rejected"] in ("Children walk past a house.", "Children walk past a tower.")


def test_openai_backend_over_http(tmp_path):
    answers = {"normal": "A cat sleeps on a red sofa.", "rate": "Two men ride brown horses.",
               "server": "A bus waits at the stop.", "malformed": "A clock hangs on the wall.",
               "same": "A kite flies in the sky.", "cut": "A plate of pasta sits on the table.",
               "echo": "A train stands at the station.", "labelled": "A boy throws a ball."}
    data = tmp_path / "gt.jsonl"
    with open(data, "w") as f:
        for k, a in answers.items():
            f.write(json.dumps({"id": k, "image": f"{k}.jpg", "conversations": [
                {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": a}]}) + "\n")
    calls = collections.Counter()

    def reply(body):
        text = body["messages"][0]["content"]
        kind = next(k for k, a in answers.items() if f"Answer: {a}" in text)
        calls[kind] += 1
        return {"normal": "A dog sleeps on a blue sofa.", "rate": 429 if calls[kind] == 1 else "Three men ride horses.",
                "server": 500, "malformed": b'{"choices": [', "same": "  a kite flies in the sky ",
                "cut": "A plate of pasta sits on the", "echo": text.splitlines()[0],
                "labelled": "Wrong answer: A girl throws a ball.\n\nQuestion: What is on the table?"}[kind]

    out = tmp_path / "pairs.jsonl"
    env = {**os.environ, "OPENAI_API_KEY": "sk-test-secret-123"}
    with OpenAIStub(default=reply) as stub:
        proc = inject("--backend", "openai", "--data", f"gt={data}", "--out", out, "--base_url", stub.url,
                      "--api_model", "stub-model", "--workers", 4, "--retries", 2,
                      "--max_tries", 2, env=env, check=False)
    assert proc.returncode == 1 and "2 items got no reply" in proc.stderr  # the two api errors: not a silent success
    written, failed, reasons = summary(proc)
    recs = {r["id"]: r for r in check_pairs(out)}
    assert set(recs) == {"gt/normal-0", "gt/rate-0", "gt/labelled-0"} and written == 3
    assert recs["gt/rate-0"]["rejected"] == "Three men ride horses." and calls["rate"] == 2
    assert recs["gt/labelled-0"]["rejected"] == "A girl throws a ball."  # label dropped, continuation cut
    assert recs["gt/normal-0"]["meta"] == {"backend": "openai", "model": "stub-model", "temperature": 0.8,
                                           "max_new_tokens": 512, "prompt": "built-in", "tries": 1}
    assert failed == 5 and reasons == {"identical": 1, "cut off": 1, "echo": 1, "api error": 2}
    assert calls["server"] == calls["malformed"] == 4 and calls["same"] == 2  # retries x tries, tries
    assert {k.lower(): v for k, v in stub.headers[0].items()}["authorization"] == "Bearer sk-test-secret-123"
    assert "sk-test" not in proc.stdout + proc.stderr + open(out).read()
    with OpenAIStub(default="Something else entirely.") as stub:  # a rerun asks only for what is missing
        inject("--backend", "openai", "--data", f"gt={data}", "--out", out, "--base_url", stub.url,
               env=env)
        assert len(stub.requests) == 5
    assert len(check_pairs(out)) == 8


def test_hf_backend_killed_and_rerun_loses_and_duplicates_nothing(toy, tmp_path):
    out, prompt = tmp_path / "pairs.jsonl", tmp_path / "prompt.txt"
    prompt.write_text("{answer}")  # the toy's 256 positions and word vocabulary have no room for the few-shot prompt
    args = ["--backend", "hf", "--model", toy / "model", "--data", f"toy={toy / 'train.json'}", "--out", out,
            "--samples_per_source", 60, "--batch_size", 1, "--max_new_tokens", 24, "--prompt_file", prompt]
    part = f"{out}.part0"
    kill_after_lines(["02_inject_errors.py", *args], part, 3)
    before = {r["id"] for r in dist_io.read_jsonl(part, tolerate_partial_last=True)}
    written, failed, _ = summary(inject(*args))
    recs = check_pairs(out)
    ids = {r["id"] for r in recs}
    items, _ = data.load_items("toy", toy / "train.json")
    assert before <= ids <= {it["id"] for it in data.sample_per_source(items, 60, 0)}
    assert len(ids) + failed == 60 and written == len(ids) - len(before)
    assert not os.path.exists(part)
    for r in recs:
        assert r["meta"]["backend"] == "hf" and r["meta"]["model"] == str(toy / "model") and r["image"].endswith(".png")


def test_torchrun_two_ranks_equal_one_process(toy, tmp_path):
    args = ["--backend", "rules", "--data", f"toy={toy / 'train.json'}", "--vocab", str(toy / "world.json"),
            "--samples_per_source", "50"]
    inject(*args, "--out", tmp_path / "one.jsonl")
    proc = run_torchrun("02_inject_errors.py", *args, "--out", tmp_path / "two.jsonl")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "wrote 50 pairs this run (50 in" in proc.stdout
    key = lambda path: sorted(json.dumps(r, sort_keys=True) for r in dist_io.read_jsonl(path))
    assert key(tmp_path / "one.jsonl") == key(tmp_path / "two.jsonl")
    assert not [f for f in os.listdir(tmp_path) if ".part" in f]
