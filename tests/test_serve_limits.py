"""`qtune serve` under hostile or careless requests: one request must not hold the server. A real uvicorn
on a free port serving the tiny random Qwen3 (random weights rarely end an answer early, so a generation
runs as long as it is allowed to), queried over raw HTTP."""
from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest

from conftest import QTUNE


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(*overrides: str):
    port = _free_port()
    proc = subprocess.Popen([*QTUNE, "serve", "model=tiny_qwen3", f"serve.port={port}", "chat.temperature=0",
                             "serve.max_tokens_limit=100000", *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc, port
        except (urllib.error.URLError, ConnectionError):
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise AssertionError(f"qtune serve did not start:\n{proc.stdout.read()}")
            time.sleep(0.3)


@pytest.fixture(scope="module")
def tiny_server(tiny_qwen3):
    proc, port = _start()
    yield port
    proc.terminate()
    proc.wait(timeout=30)


def _post(port: int, path: str, body, timeout: float = 120, chunked: bool = False):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    if chunked:
        pieces = (data[i:i + 65536] for i in range(0, len(data), 65536))
        conn.request("POST", path, body=pieces, encode_chunked=True,
                     headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
    else:
        conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    status, payload = r.status, json.loads(r.read() or b"{}")
    conn.close()
    return status, payload


def _chat(text: str, max_tokens: int, **extra) -> dict:
    return {"model": "tiny_qwen3", "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, **extra}


@pytest.mark.slow
def test_a_chunked_body_over_the_limit_is_413(tiny_server):
    big = json.dumps(_chat("x" * 1_500_000, 4)).encode()              # 1.5 MB, no Content-Length
    status, body = _post(tiny_server, "/v1/chat/completions", big, chunked=True)
    assert status == 413 and "serve.max_body_bytes=1048576" in body["error"]["message"]
    status, body = _post(tiny_server, "/v1/chat/completions", _chat("hello", 2))
    assert status == 200                                               # and the server still answers


@pytest.mark.slow
def test_a_prompt_past_the_context_is_400_context_length_exceeded(tiny_server):
    status, body = _post(tiny_server, "/v1/chat/completions", _chat("hello " * 5000, 16))
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    # a slot holds the model's context (4096) capped at 2048 on a CPU (serve.max_model_len)
    assert "maximum context length is 2048 tokens" in body["error"]["message"]
    status, body = _post(tiny_server, "/v1/chat/completions", _chat("hello " * 100, 4000))  # prompt + max_tokens
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"


@pytest.mark.slow
@pytest.mark.parametrize("extra,words", [
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio is not supported"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools is not supported"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]},
     "messages[0].content[0]: type 'image_url' is not supported"),
])
def test_what_qtune_cannot_honour_is_400_not_ignored(tiny_server, extra, words):
    status, body = _post(tiny_server, "/v1/chat/completions", {**_chat("hi", 2), **extra})
    assert status == 400 and words in body["error"]["message"], body


@pytest.mark.slow
def test_text_parts_given_as_plain_strings_are_read(tiny_server):
    status, body = _post(tiny_server, "/v1/chat/completions",
                         {**_chat("", 2), "messages": [{"role": "user", "content": ["a", {"type": "text", "text": "b"}]}]})
    assert status == 200 and body["usage"]["prompt_tokens"] > 0


@pytest.mark.slow
def test_a_client_that_hangs_up_frees_the_server(tiny_server):
    # how fast this machine generates, so the abandoned request is one that would hold the server for long
    t = time.time()
    status, body = _post(tiny_server, "/v1/chat/completions", _chat("count", 200))
    assert status == 200 and body["usage"]["completion_tokens"] == 200, body
    per_token = (time.time() - t) / 200
    long = 3900
    assert long * per_token > 8, f"the abandoned request would take only {long * per_token:.1f} s here"

    conn = http.client.HTTPConnection("127.0.0.1", tiny_server, timeout=5)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(_chat("count", long)),
                 headers={"Content-Type": "application/json"})
    time.sleep(1.0)
    conn.sock.shutdown(socket.SHUT_RDWR)                               # the client goes away mid-generation
    conn.close()
    t = time.time()
    status, body = _post(tiny_server, "/v1/chat/completions", _chat("hi", 2), timeout=60)
    waited = time.time() - t
    assert status == 200
    assert waited < 3, f"the next request waited {waited:.1f} s (the abandoned one would have run {long * per_token:.0f} s)"


@pytest.mark.slow
def test_sigterm_mid_generation_exits_within_five_seconds(tiny_qwen3):
    proc, port = _start()
    done: dict = {}

    def ask():
        try:
            done["r"] = _post(port, "/v1/chat/completions", _chat("count", 3900), timeout=120)
        except Exception as e:  # noqa: BLE001 (the server is going away: a cut connection is expected)
            done["r"] = e

    threading.Thread(target=ask, daemon=True).start()
    time.sleep(1.5)
    t = time.time()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    took = time.time() - t
    assert took < 5, f"SIGTERM took {took:.1f} s to stop the server"


def test_a_busy_port_is_one_line_before_loading(tiny_qwen3):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        t = time.time()
        p = subprocess.run([*QTUNE, "serve", "model=tiny_qwen3", f"serve.port={port}"], capture_output=True, text=True,
                           timeout=120)
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert len(lines) == 1 and f"serve.port={port} is in use on 127.0.0.1" in lines[0], p.stderr
    assert time.time() - t < 30   # the model was not loaded first


LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (POST|GET) (/v1/\S+) (\d{3}) model=(\S+) "
                      r"prompt_tokens=(\S+) completion_tokens=(\S+) (\d+\.\d\d) s( stream)?$")


def _stop(proc) -> str:
    proc.terminate()
    out, _ = proc.communicate(timeout=30)
    return out


def test_serve_logs_a_line_per_request_unless_log_requests_is_false(tiny_qwen3):
    proc, port = _start()
    try:
        status, body = _post(port, "/v1/chat/completions", _chat("hello", 5))
        assert status == 200
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/v1/completions", headers={"Content-Type": "application/json"},
                     body=json.dumps({"model": "tiny_qwen3", "prompt": "one two", "max_tokens": 3, "stream": True,
                                      "stream_options": {"include_usage": True}}))
        events = [json.loads(x[6:]) for x in conn.getresponse().read().decode().splitlines()
                  if x.startswith("data: {")]
        conn.close()
        usage = events[-1]["usage"]
        assert _post(port, "/v1/chat/completions", {**_chat("hi", 2), "model": "nope"})[0] == 404
    finally:
        out = _stop(proc)
    lines = [m.groups() for m in map(LOG_LINE.match, out.splitlines()) if m]
    assert len(lines) == 3, out                                        # /health (polled by _start) is not logged
    assert lines[0][:6] == ("POST", "/v1/chat/completions", "200", "tiny_qwen3", str(body["usage"]["prompt_tokens"]),
                            str(body["usage"]["completion_tokens"])) and lines[0][7] is None
    assert lines[1][:6] == ("POST", "/v1/completions", "200", "tiny_qwen3", str(usage["prompt_tokens"]),
                            str(usage["completion_tokens"])) and lines[1][7] == " stream"
    assert lines[2][:6] == ("POST", "/v1/chat/completions", "404", "nope", "-", "-")

    proc, port = _start("serve.log_requests=false")
    try:
        assert _post(port, "/v1/chat/completions", _chat("hello", 2))[0] == 200
    finally:
        out = _stop(proc)
    assert "/v1/chat/completions" not in out and "qtune serve:" in out, out


@pytest.mark.slow
def test_n_choices_logprobs_and_usage(tiny_server):
    status, body = _post(tiny_server, "/v1/chat/completions", _chat("hi", 5, n=3, temperature=1.0, seed=7,
                                                                     logprobs=True, top_logprobs=2))
    assert status == 200, body
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    texts = [c["message"]["content"] for c in body["choices"]]
    assert len(set(texts)) > 1                       # choice i draws with seed + i
    for c in body["choices"]:
        entries = c["logprobs"]["content"]
        assert len(entries) == 5 and all(len(e["top_logprobs"]) == 2 and e["logprob"] <= 0 for e in entries)
    assert body["usage"]["completion_tokens"] == 15
    again = _post(tiny_server, "/v1/chat/completions", _chat("hi", 5, n=3, temperature=1.0, seed=7))[1]
    assert [c["message"]["content"] for c in again["choices"]] == texts   # seeded: the same answers
    status, body = _post(tiny_server, "/v1/completions", {"model": "tiny_qwen3", "prompt": "a b c", "max_tokens": 4,
                                                          "logprobs": 1})
    lp = body["choices"][0]["logprobs"]
    assert status == 200 and len(lp["tokens"]) == 4 and len(lp["token_logprobs"]) == 4
    assert all(len(t) == 1 for t in lp["top_logprobs"])


@pytest.mark.slow
@pytest.mark.parametrize("extra,words", [
    ({"n": 0}, "n: "), ({"n": 9}, "n=9 exceeds serve.max_n=8"), ({"max_tokens": 0}, "max_tokens: "),
    ({"top_logprobs": 2}, "top_logprobs: only allowed when logprobs is true"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs: "), ({"model": "nope"}, "model 'nope' not found"),
])
def test_bad_sampling_requests_are_openai_shaped_errors(tiny_server, extra, words):
    status, body = _post(tiny_server, "/v1/chat/completions", {**_chat("hi", 2), **extra})
    assert status in (400, 404) and words in body["error"]["message"], body


@pytest.mark.slow
def test_thirty_two_streams_at_once_one_hanging_up(tiny_server):
    """32 concurrent streamed requests through 4 slots with the openai client, one of them dropped mid-stream: every
    other one gets the text it gets alone, and its usage."""
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{tiny_server}/v1", api_key="none", timeout=300)

    def ask(i):
        r = client.chat.completions.create(model="tiny_qwen3", max_tokens=4 + i % 5, stream=True, temperature=0,
                                           stream_options={"include_usage": True},
                                           messages=[{"role": "user", "content": f"question {i}"}])
        text, usage = "", None
        for c in r:
            if c.choices:
                text += c.choices[0].delta.content or ""
            if c.usage:
                usage = c.usage
            if i == 5 and len(text) > 0:
                r.close()            # this client goes away mid-stream
                return text, None
        return text, usage

    alone = {i: ask(i) for i in range(6)}
    got: dict = {}
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, ask(i))) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sorted(got) == list(range(32))
    for i in range(32):
        if i != 5:
            assert got[i][1].completion_tokens == 4 + i % 5, (i, got[i])
    assert all(got[i] == alone[i] for i in range(6) if i != 5)
    status, _ = _post(tiny_server, "/v1/chat/completions", _chat("hi", 2))
    assert status == 200


@pytest.mark.slow
def test_a_full_queue_answers_429_with_retry_after(tiny_qwen3):
    proc, port = _start("serve.max_batch=1", "serve.max_queue=1")
    try:
        holders = [threading.Thread(target=_post, args=(port, "/v1/chat/completions", _chat("count", 1500)),
                                    kwargs={"timeout": 60}, daemon=True) for _ in range(2)]
        for t in holders:      # one in the slot, one in the queue
            t.start()
            time.sleep(1.0)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/v1/chat/completions", body=json.dumps(_chat("hi", 2)),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        body = json.loads(r.read())
        assert r.status == 429 and r.getheader("Retry-After") == "1", body
        assert "serve.max_queue=1" in body["error"]["message"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_echo_scores_the_prompt_as_the_model_does(tiny_server, tiny_qwen3):
    """/v1/completions with echo and logprobs (lm-eval's local-completions log-likelihood request: token ids, several
    prompts, max_tokens 1): each prompt token's log-probability is the model's, the first is null."""
    import torch
    from transformers import AutoModelForCausalLM

    prompts = [[11, 305, 2048, 77, 9, 400], [5, 6, 7]]
    status, body = _post(tiny_server, "/v1/completions", {"model": "tiny_qwen3", "prompt": prompts, "max_tokens": 1,
                                                          "echo": True, "logprobs": 1, "temperature": 0})
    assert status == 200, body
    assert [c["index"] for c in body["choices"]] == [0, 1]
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32)
    for prompt, choice in zip(prompts, body["choices"]):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(prompt) + 1 and lp["token_logprobs"][0] is None
        assert lp["top_logprobs"][0] is None and all(len(t) == 1 for t in lp["top_logprobs"][1:])
        with torch.no_grad():
            want = model(input_ids=torch.tensor([prompt])).logits[0].float().log_softmax(-1)
        for i, t in enumerate(prompt[1:]):
            assert lp["token_logprobs"][i + 1] == pytest.approx(want[i, t].item(), abs=1e-4)
    assert body["usage"]["prompt_tokens"] == 9
