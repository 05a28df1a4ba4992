"""Remote calls to OpenAI-compatible endpoints (OpenAI, vLLM, ...): the client and its retries, one chat
completion, calls in flight at once, a JSONL cache so that no call is paid twice, and judged runs
(04, 06). The key comes from OPENAI_API_KEY only and never appears in a message."""
import hashlib
import json
import os
import sys
from typing import NamedTuple

from dist_io import JsonlAppender, read_jsonl


class RemoteError(RuntimeError):
    """A remote call that still failed after its retries."""


def add_remote_args(parser):
    """The retry and timeout flags of every script that calls an OpenAI-compatible endpoint."""
    parser.add_argument("--retries", type=int, default=5,
                        help="attempts per call: the openai client retries rate limits (429), 408, 409, 5xx, timeouts "
                             "and dropped connections with its own backoff, and a reply with no text or a malformed "
                             "body is asked again; then the call counts as failed")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before a call counts as timed out")


def openai_client(base_url=None, timeout=120.0, tries=5):
    """A client for OpenAI or any compatible server (vLLM, ...) that makes up to `tries` attempts at
    a call on what the openai client retries (429, 408, 409, 5xx, timeouts, connection errors), with
    its exponential backoff and jitter. The key comes from OPENAI_API_KEY only."""
    from openai import OpenAI
    return OpenAI(api_key=os.environ.get("OPENAI_API_KEY") or "none", base_url=base_url, timeout=timeout,
                  max_retries=max(0, tries - 1))


class Reply(NamedTuple):
    text: str
    model: str  # the model the endpoint says answered (an alias resolves to a dated version)


def chat(client, model, messages, temperature=0.0, max_tokens=None, tries=5):
    """One chat completion, as a Reply. Transport faults are the client's to retry; what it cannot see,
    a reply without choices or text or with a malformed body, is asked again, up to `tries` times.
    RemoteError says what went wrong last, never the key nor the server's error text (it may quote it)."""
    import openai
    last = None
    for _ in range(tries):
        try:
            resp = client.chat.completions.create(model=model, messages=messages, temperature=temperature,
                                                  max_tokens=max_tokens)
            text = resp.choices[0].message.content if resp.choices else None
            if isinstance(text, str):
                return Reply(text, str(getattr(resp, "model", None) or model))
            last = "response without choices or content"
        except (openai.APIResponseValidationError, ValueError, AttributeError, TypeError) as e:
            last = f"malformed response ({type(e).__name__})"
        except openai.APIStatusError as e:
            code = e.status_code
            if code in (408, 409, 429) or code >= 500:  # the client retried it already
                raise RemoteError(f"{model}: gave up after {tries} tries ({type(e).__name__}: {code})") from None
            raise RemoteError(f"{type(e).__name__} {code} from {model}") from None  # 400, 401, 404: no retry helps
        except openai.APIConnectionError as e:  # timeouts included; retried by the client
            raise RemoteError(f"{model}: gave up after {tries} tries ({type(e).__name__})") from None
    raise RemoteError(f"{model}: gave up after {tries} tries ({last})")


def map_concurrent(fn, items, workers):
    """fn over items with at most `workers` calls in flight; yields (item, result or exception)
    as they complete, so each result can be written (and resumed) the moment it exists. A consumer
    that stops early (an error, Ctrl-C) cancels the calls not started: none is paid for unwritten."""
    from concurrent.futures import ThreadPoolExecutor, as_completed
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        futures = {pool.submit(fn, it): it for it in items}
        for fut in as_completed(futures):
            exc = fut.exception()
            yield futures[fut], exc if exc is not None else fut.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def cached_map(path, calls, fn, workers=8, desc="calls"):
    """fn(call) -> dict of results, for calls that are dicts with the same fields, each computed once
    ever: a call whose fields all match a record of the JSONL cache at `path` is answered from it;
    the others run with at most `workers` in flight and are appended ({**call, **result}) the moment
    they finish, so a rerun never pays twice and a kill loses only the calls in flight. A call
    that raises RemoteError is not cached (a rerun retries it). Returns (records in call order,
    None for failed ones; the RemoteError messages)."""
    from tqdm import tqdm
    fields = sorted(calls[0]) if calls else []
    key = lambda r: json.dumps([r.get(k) for k in fields])
    cache = {key(r): r for r in read_jsonl(path, tolerate_partial_last=True)} if os.path.exists(path) else {}
    records = [cache.get(key(call)) for call in calls]
    todo = [i for i, r in enumerate(records) if r is None]
    errors = []
    if todo:
        writer = JsonlAppender(path)
        for i, result in tqdm(map_concurrent(lambda i: fn(calls[i]), todo, workers), total=len(todo), desc=desc):
            if isinstance(result, RemoteError):
                errors.append(str(result))
                continue
            if isinstance(result, BaseException):
                raise result
            records[i] = {**calls[i], **result}
            writer.write(records[i])
        writer.close()
    return records, errors


def judge_runs(path, key, prompts, answers, judge, num_runs, fn, workers=8, what="grade"):
    """Every answer judged num_runs times (a run is one independent judgement of each; a sampling
    judge differs between runs), fn(job) -> result dict, each judgement made once ever: cached in the
    JSONL `path` by its inputs ({key: question id, run, judge, answer, prompt_sha: a hash of the
    filled prompt}), so a new answer, prompt or judge asks again and nothing else does. A call that
    still got no reply after its retries exits non-zero before any score is written, so that no
    score stands on part of the benchmark; a rerun asks only for those. Returns per run
    {question id: {**job, **result}}."""
    todo = [{key: qid, "run": run, "judge": judge, "answer": answers[qid],
             "prompt_sha": hashlib.sha256(prompts[qid].encode()).hexdigest()[:16]}
            for run in range(num_runs) for qid in prompts]
    records, errors = cached_map(path, todo, fn, workers, what)
    if errors:
        sys.exit(f"error: {len(errors)} {what}s got no reply from {judge}, e.g. {errors[0]}; rerun to resume")
    return [{r[key]: r for r in records if r["run"] == run} for run in range(num_runs)]

