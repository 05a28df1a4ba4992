"""Process groups and files, for every script: torchrun's ranks, JSON and JSONL read with file:line
errors (DataError, --on_error), whole files replaced atomically, records appended so that a kill loses
at most one, and the sharded, resumable outputs of 01 and 02."""
import argparse
import collections
import glob
import json
import os
import re
import sys

import torch
import torch.distributed as dist

# ----------------------------------------------------------------------------- process groups


def dist_setup(group=False):
    """Returns (rank, world_size, device). Under torchrun it joins the process group
    (nccl on GPU, gloo on CPU); a plain `python script.py` is rank 0 of 1, in a process group of
    its own where `group` asks for one (03 --fsdp: FSDP shards over a group, even of one)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend)
    elif group and not dist.is_initialized():
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return int(os.environ.get("RANK", 0)), world, device


def barrier():
    if dist.is_initialized():
        dist.barrier()


def mean_over_ranks(values: dict) -> dict:
    """Averages a dict of floats over all ranks (one all_reduce)."""
    if not dist.is_initialized():
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    t = t.cpu() / dist.get_world_size()
    return {k: v.item() for k, v in zip(keys, t)}


def agree(ok, error):
    """Every rank says whether it can go on; if one cannot, all stop with its one-line error (a rank that stopped
    alone would leave the others waiting in a collective)."""
    if not dist.is_initialized():
        if not ok:
            sys.exit(f"error: {error}")
        return
    said = [None] * dist.get_world_size()
    dist.all_gather_object(said, (ok, error))
    failed = [(rank, e) for rank, (good, e) in enumerate(said) if not good]
    if failed:
        sys.exit(f"error: rank {failed[0][0]}: {failed[0][1]}")


def dist_cleanup():
    """Leaves the process group, after a barrier: with a collective still finishing, a gloo worker thread can
    wait for the GIL that the main thread holds while it joins that thread (a hang at exit, seen in 6 of 25
    two-process runs without the barrier, none of 25 with it)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- command lines and bad input


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help with every flag's default and the script's docstring as written."""


class DataError(ValueError):
    """Bad input; the message names the file and line."""


class OnError:
    """What a script does with a bad input record (`--on_error`): "fail" raises DataError naming
    file:line; "skip" prints that same line as a warning and counts the record by kind, for the
    run's summary. `quiet` silences the warnings (ranks other than 0 see the same records)."""

    def __init__(self, mode="fail", quiet=False):
        self.mode, self.quiet, self.counts = mode, quiet, collections.Counter()

    def __call__(self, where, kind, detail=""):
        message = f"{where}: {kind}" + (f" ({detail})" if detail else "")
        if self.mode == "fail":
            raise DataError(message)
        if not self.quiet:
            print(f"skip {message}", file=sys.stderr)
        self.counts[kind] += 1

    def summary(self, what):
        """"skipped N <what> (n kind, ...)", for the run's summary line."""
        n = sum(self.counts.values())
        kinds = ", ".join(f"{c} {k}" for k, c in sorted(self.counts.items()))
        return f"skipped {n} {what}" + (f" ({kinds})" if n else "")


def add_on_error_arg(parser, default, what):
    parser.add_argument("--on_error", choices=["skip", "fail"], default=default,
                        help=f"a bad {what} (a line that is not UTF-8 JSON, a missing or empty field, a wrong type, a "
                             "duplicate id, an image path outside the image root, an unreadable image): 'fail' stops "
                             "with file:line, 'skip' warns with file:line, leaves it out and counts it in the summary")


# ----------------------------------------------------------------------------- reading


def numbered_jsonl(path, tolerate_partial_last=False, bad=None):
    """(line number, record) of each non-blank line of a JSONL file. A line that is not a UTF-8 JSON
    object raises DataError naming path:line, or, given an OnError `bad`, is reported to it and left
    out. With tolerate_partial_last, an unterminated last line (a write cut off by a kill) is
    dropped, which is how resumable outputs are read back."""
    bad = bad or OnError("fail")
    with open(path, "rb") as f:
        raw = f.read()
    lines = raw.split(b"\n")
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if tolerate_partial_last and i == len(lines) and not raw.endswith(b"\n"):
            break  # half-written last record: it will be produced again
        try:
            rec = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            bad(f"{path}:{i}", "not UTF-8", f"byte {line[e.start]:#04x} at column {e.start + 1}")
            continue
        except json.JSONDecodeError as e:
            bad(f"{path}:{i}", "not a valid JSON line", str(e))
            continue
        if not isinstance(rec, dict):
            bad(f"{path}:{i}", "expected a JSON object", f"got {type(rec).__name__}")
            continue
        records.append((i, rec))
    return records


def read_jsonl(path, tolerate_partial_last=False):
    """The records of a JSONL file (see numbered_jsonl)."""
    return [rec for _, rec in numbered_jsonl(path, tolerate_partial_last)]


def read_utf8(path):
    """The text of a file; DataError naming the line of a byte that is not UTF-8."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 (byte {raw[e.start]:#04x})") from None


def read_json_or_jsonl(path, bad=None):
    """A JSON list (as LLaVA's instruction files) or JSONL, as (line, record) pairs; for a JSON
    list the "line" is the record's position in the list. A JSON list that does not parse as a
    whole always raises DataError (naming the line); its elements that are not objects, like bad
    JSONL lines, go to `bad` (see numbered_jsonl)."""
    bad = bad or OnError("fail")
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if not head.startswith(b"["):
        return numbered_jsonl(path, bad=bad)
    try:
        data = json.loads(read_utf8(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    out = []
    for i, rec in enumerate(data, 1):
        if isinstance(rec, dict):
            out.append((i, rec))
        else:
            bad(f"{path}:{i}", "expected a JSON object", f"got {type(rec).__name__}")
    return out


def valid_id(value):
    """A record id as benchmark files give them: a string or an integer (not a bool)."""
    return isinstance(value, (str, int)) and not isinstance(value, bool)


def read_json(path):
    """A JSON file's value; DataError naming the line of a byte that is not UTF-8 or of invalid JSON."""
    try:
        return json.loads(read_utf8(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def line_of(raw, key, nth=1):
    """Line of the nth occurrence of a key in a JSON text (for error messages)."""
    found = [m.start() for m in re.finditer(re.escape(json.dumps(key)) + r"\s*:", raw)]
    return raw[:found[nth - 1]].count("\n") + 1 if len(found) >= nth else 1


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs):
    """object_pairs_hook of json.loads: a dict, or _DuplicateKey (json.loads would keep the last silently)."""
    seen = set()
    for k, _ in pairs:
        if k in seen:
            raise _DuplicateKey(k)
        seen.add(k)
    return dict(pairs)


def read_json_dict(path):
    """A JSON object {id: ...} and its text; DataError naming file:line for a byte that is not UTF-8,
    invalid JSON, another type, or an id given twice."""
    raw = read_utf8(path)
    try:
        data = json.loads(raw, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except _DuplicateKey as e:
        raise DataError(f"{path}:{line_of(raw, e.args[0], 2)}: {e.args[0]!r} appears twice "
                        f"(first at line {line_of(raw, e.args[0])})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}:1: expected a JSON object {{id: ...}}")
    return data, raw


# ----------------------------------------------------------------------------- writing and resuming


def write_atomic(path, text):
    """Writes a whole file through a temporary file and a rename, so that a reader (or a kill) never
    sees half of it."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def append_line(path, record):
    """One JSON line appended to a file (a log that is read whole, and cut back on resume)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


class JsonlAppender:
    """Appends one record a line, flushed and fsynced, so a kill loses at most the record being
    written (and read_jsonl(tolerate_partial_last=True) drops that one)."""

    def __init__(self, path):
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        if os.path.exists(path) and os.path.getsize(path):
            with open(path, "rb+") as f:  # cut a half-written last line left by a kill
                data = f.read()
                if not data.endswith(b"\n"):
                    f.truncate(data.rfind(b"\n") + 1)
        self.f = open(path, "a", encoding="utf-8")

    def write(self, record):
        self.f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self):
        self.f.close()


def existing_ids(*paths):
    """Ids already written to any of these (possibly absent, possibly half-written) JSONL files."""
    ids = set()
    for p in paths:
        if os.path.exists(p):
            ids.update(r["id"] for r in read_jsonl(p, tolerate_partial_last=True) if "id" in r)
    return ids


def pending_items(items, out, rank, world):
    """(this rank's share of the items whose id is in neither `out` nor a part file `out.partR` left
    by a run cut short, nor in `out.no_pair` (items a finished try left without a record, so a rerun
    does not draw them again), the part file this rank appends to, how many items are done). Every
    rank reads the done ids before any rank writes (barrier), so all ranks shard the same list."""
    done = existing_ids(out, *glob.glob(f"{out}.part*"), f"{out}.no_pair", *glob.glob(f"{out}.no_pair.part*"))
    barrier()
    todo = [it for it in items if it["id"] not in done]
    return todo[rank::world], f"{out}.part{rank}", len(items) - len(todo)


def merge_parts(out):
    """Rank 0, once every rank is done: appends each record of the part files `out.partR` whose id
    is not in `out` yet, removes the parts, returns the number of records in `out`."""
    writer, have = JsonlAppender(out), existing_ids(out)
    for part in sorted(glob.glob(f"{out}.part*")):
        for rec in read_jsonl(part, tolerate_partial_last=True):
            if rec["id"] not in have:
                writer.write(rec)
                have.add(rec["id"])
        os.remove(part)
    writer.close()
    return len(have)

