"""The OpenAI-compatible HTTP API over a loaded base and its adapters (qtune serve's app): the request schemas, the
guard every request passes (API key, body size), and the endpoints.

POST /v1/chat/completions (streamed over SSE or not), POST /v1/completions, GET /v1/models, GET /health.
Requests name a model: the base (model.name) or an adapter (the run's folder name, or a name from
serve.adapters). One model in memory serves them all through qtune.inference.engine.Scheduler: requests decode
together, continuously batched (each joins the running batch when a slot frees and leaves it when it ends), each
row with its own adapter or none (qtune.inference.adapters; where those cannot serve the adapters, rows of one
batch share one adapter and a request for another waits until the running rows are done). serve.api_key makes
`Authorization: Bearer <key>` mandatory. Errors have OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

One request must not hold the server: bodies are counted as they arrive (chunked ones too) and cut off past
serve.max_body_bytes; a prompt that with max_tokens exceeds a slot (serve.max_model_len, or serve.max_prompt_tokens)
is refused before it queues; past serve.max_queue waiting requests the answer is 429 with Retry-After; a client that
goes away frees its slot at the next step, streamed or not; stop_all() (on SIGTERM) ends every generation at the
next step. Parameters qtune cannot honour (tools, image parts, response_format other than text, suffix, best_of)
are refused with 400 rather than silently ignored; /v1/completions takes several prompts, as text or token ids, and
echo (with logprobs: the prompt's tokens scored, as lm-eval's local-completions asks for log-likelihoods); n, logprobs/top_logprobs, seed, logit_bias,
presence/frequency penalties, stop strings and stream_options.include_usage are honoured as OpenAI does (a seeded
request answers the same whatever else runs beside it; choice i of n draws with seed + i).

With a `log` callback (serve.log_requests, on by default), every /v1 request ends in one line: its time, method and
path, status, the model it named, prompt and completion tokens and its latency (RequestLog; /health, polled by
monitors, is not logged).
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import threading
import time
import uuid
from typing import Dict, List, NamedTuple, Optional, Union

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field

from qtune.config.schema import ChatConfig, Config
from qtune.inference.load import _stop_prefix


class Wanted(NamedTuple):
    """What one request asks for: the chat settings it changes, where its text stops, its seed, bias and penalties."""
    chat: ChatConfig
    stop: list[str]
    controls: object    # qtune.inference.load.Controls


class Message(BaseModel):
    role: str
    content: Union[str, List[Union[str, dict]], None] = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampled(BaseModel):
    """The OpenAI parameters both endpoints share beyond the prompt (ranges as OpenAI's)."""
    model_config = ConfigDict(extra="allow")  # unknown parameters are checked against UNSUPPORTED, others ignored
    model: str
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[str, List[str], None] = None
    n: int = Field(default=1, ge=1)
    seed: Optional[int] = Field(default=None, ge=-2 ** 63, lt=2 ** 64)
    logit_bias: Optional[Dict[str, float]] = None    # token id -> -100..100, checked against the model's vocabulary
    presence_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(default=None, ge=-2, le=2)


class ChatRequest(Sampled):
    messages: List[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    response_format: Optional[dict] = None    # {"type": "text"} only: qtune has no constrained decoding
    enable_thinking: Optional[bool] = None  # Qwen3: also accepted as chat_template_kwargs.enable_thinking
    chat_template_kwargs: Optional[dict] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)


class CompletionRequest(Sampled):
    prompt: Union[str, List[str], List[int], List[List[int]]]   # text or token ids, one prompt or several
    logprobs: Optional[int] = Field(default=None, ge=0, le=5)
    echo: bool = False           # the prompt too, in the text and (with logprobs) scored token by token


# OpenAI parameters qtune's generation cannot honour: a request that asks for one gets 400, not a silent default.
# (name, value that means "not asked for")
UNSUPPORTED = {"chat": [("tools", (None, [])),
                        ("tool_choice", (None, "none")), ("functions", (None, [])), ("function_call", (None, "none")),
                        ("audio", (None,)), ("modalities", (None, ["text"]))],
               "completions": [("suffix", (None, "")),
                               ("best_of", (None, 1))]}
SHUTDOWN_GRACE_S = 2
DRAIN_FACTOR = 8


class Guard:
    """ASGI middleware in front of every request (plain ASGI: Starlette's BaseHTTPMiddleware would hide a client's
    disconnect from the endpoints): the API key, in constant time; bodies over `limit` bytes refused by
    Content-Length, and the bytes of any body (chunked transfers have none) counted as they arrive, the request cut
    off with 413 at the limit."""

    def __init__(self, app, limit: int, api_key: str | None):
        self.app, self.limit = app, limit
        self.key = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.key is not None and scope["path"].startswith("/v1"):
            if not hmac.compare_digest(headers.get(b"authorization", b""), self.key):
                return await _send_error(send, 401, "missing or wrong API key: send Authorization: Bearer <serve.api_key>",
                                         "authentication_error", "invalid_api_key")
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await self._refuse(send, f"{int(length)} bytes")
        seen = 0
        answered = False   # we sent the 413: whatever the app sends after is dropped

        async def counted():
            nonlocal seen, answered
            if answered:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    answered = True
                    # read and drop the rest first (nothing is kept), up to DRAIN_FACTOR x the limit, so that a client
                    # still sending has sent it all when the 413 and the close come: answered first, the server
                    # marked the response complete, its receive() gave a disconnect at once and the close broke the
                    # client's pipe before it read the 413 (seen in CI). Past that the connection is simply closed
                    while message.get("more_body") and seen <= DRAIN_FACTOR * self.limit:
                        message = await receive()
                        seen += len(message.get("body", b""))
                    await self._refuse(send, f"more than {self.limit} bytes")
                    return {"type": "http.disconnect"}   # the app stops reading
            return message

        async def guarded(message):
            if not answered:
                await send(message)

        await self.app(scope, counted, guarded)

    async def _refuse(self, send, size: str):
        await _send_error(send, 413, f"request body of {size} exceeds serve.max_body_bytes={self.limit}",
                          "invalid_request_error", "request_too_large")


LOG_KEY = "qtune.request"   # the ASGI scope's entry where the endpoints note the model and the token counts


class RequestLog:
    """ASGI middleware outside every other (the Guard's 401 and 413 are logged too): one line per /v1 request once
    its response has ended (a stream: its last chunk), through `log`. The endpoints note what they know in
    scope[LOG_KEY] (note())."""

    def __init__(self, app, log):
        self.app, self.log = app, log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1"):
            return await self.app(scope, receive, send)
        start = time.time()
        seen = scope[LOG_KEY] = {"status": None}
        logged = False

        def line():
            nonlocal logged
            if logged:
                return
            logged = True
            tokens = (f"prompt_tokens={seen['prompt_tokens']} completion_tokens={seen['completion_tokens']}"
                      if seen.get("prompt_tokens") is not None else "prompt_tokens=- completion_tokens=-")
            self.log(f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(start))} {scope['method']} {scope['path']} "
                     f"{seen['status'] or 500} model={seen.get('model') or '-'} {tokens} "
                     f"{time.time() - start:.2f} s" + (" stream" if seen.get("stream") else ""))

        async def logged_send(message):
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                line()

        try:
            await self.app(scope, receive, logged_send)
        finally:  # a client gone mid-stream, or an error before any response: the line still comes
            line()


def note(request, **what) -> None:
    """What the log line of `request` should say (model, prompt_tokens, completion_tokens, stream)."""
    seen = request.scope.get(LOG_KEY)
    if seen is not None:
        seen.update(what)


async def _send_error(send, status: int, message: str, kind: str, code: str) -> None:
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def build_app(loaded, cfg: Config, log=None):
    """The app; `log` (a callable taking one line, e.g. print) receives a line per /v1 request (None: no log)."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from qtune.inference.engine import Job
    from qtune.inference.load import Controls, render

    app = FastAPI(title="qtune serve")
    app.add_middleware(Guard, limit=cfg.serve.max_body_bytes, api_key=cfg.serve.api_key)
    if log is not None:
        app.add_middleware(RequestLog, log=log)   # added last: the outermost
    created = int(time.time())
    settings = cfg.serve
    closing = threading.Event()
    config = getattr(loaded.model, "config", None)
    engine, app.state.engine_line = scheduler(loaded, cfg)
    app.state.engine = engine
    length = engine.length

    def stop_all():
        """SIGTERM: running and waiting generations end at the next step; new requests get 503."""
        closing.set()
        engine.close(timeout=2.0)

    app.state.stop_all = stop_all

    def error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
              param: str | None = None, headers: dict | None = None):
        return JSONResponse(status_code=status, headers=headers,
                            content={"error": {"message": message, "type": kind, "param": param, "code": code}})

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        return error(400, f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request')}",
                     param=loc[0] if loc else None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        return error(exc.status_code, str(exc.detail), "invalid_request_error" if exc.status_code < 500 else "server_error")

    @app.get("/health")
    async def health():  # the model names only where no key guards them
        return {"status": "ok"} if settings.api_key else {"status": "ok", "models": loaded.names()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "qtune"}
                                           for n in loaded.names()]}

    def check(req, kind: str, max_tokens: Optional[int]):
        if req.model not in loaded.names():
            return error(404, f"model {req.model!r} not found; available: {', '.join(loaded.names())}",
                         code="model_not_found")
        if max_tokens is not None and max_tokens > settings.max_tokens_limit:
            return error(400, f"max_tokens={max_tokens} exceeds serve.max_tokens_limit={settings.max_tokens_limit}")
        extra = req.model_extra or {}
        for name, absent in UNSUPPORTED[kind]:
            if name in extra and extra[name] not in absent:
                return error(400, f"{name} is not supported by qtune serve (serve.engine=vllm supports more of the "
                                  "OpenAI API)", code="unsupported_parameter", param=name)
        wanted = (getattr(req, "response_format", None) or {"type": "text"}).get("type")
        if wanted != "text":
            return error(400, f"response_format: type {wanted!r} is not supported by qtune serve, which has no "
                              "constrained decoding; valid: text (serve.engine=vllm supports json_object and "
                              "json_schema)", code="unsupported_parameter", param="response_format")
        if req.stream_options is not None and not req.stream:
            return error(400, "stream_options: only allowed when stream is true", param="stream_options")
        if req.n > settings.max_n:
            return error(400, f"n={req.n} exceeds serve.max_n={settings.max_n}", param="n")
        if kind == "chat" and req.top_logprobs is not None and not req.logprobs:
            return error(400, "top_logprobs: only allowed when logprobs is true", param="top_logprobs")
        vocab = getattr(config, "vocab_size", None)
        for token, value in (req.logit_bias or {}).items():
            if not token.strip().lstrip("-").isdigit():
                return error(400, f"logit_bias: key {token!r} is not a token id (an integer)", param="logit_bias")
            if int(token) < 0 or (vocab and int(token) >= vocab):
                return error(400, f"logit_bias: token id {token} is not in this model's vocabulary (ids 0 to "
                                  f"{vocab - 1 if vocab else '...'})", param="logit_bias")
            if not -100 <= value <= 100:
                return error(400, f"logit_bias[{token!r}]={value:g}: valid: -100 to 100", param="logit_bias")
        return None

    def too_long(n: int, s: Wanted):
        if settings.max_prompt_tokens and n > settings.max_prompt_tokens:
            return error(400, f"the prompt is {n} tokens; serve.max_prompt_tokens={settings.max_prompt_tokens}",
                         code="context_length_exceeded")
        if n + s.chat.max_new_tokens > length:
            return error(400, f"This model's maximum context length is {length} tokens. However, you requested "
                              f"{n + s.chat.max_new_tokens} tokens ({n} in the prompt, {s.chat.max_new_tokens} for the completion). "
                              "Please reduce the length of the prompt or max_tokens.", code="context_length_exceeded")
        return None

    def sampling(req, max_tokens: Optional[int]) -> Wanted:
        """The chat group's settings with what the request sets (its ranges were checked by its schema and check)."""
        chat = cfg.chat
        return Wanted(dataclasses.replace(
            chat, max_new_tokens=min(max_tokens or chat.max_new_tokens, settings.max_tokens_limit),
            temperature=chat.temperature if req.temperature is None else req.temperature,
            top_p=chat.top_p if req.top_p is None else req.top_p),
            [req.stop] if isinstance(req.stop, str) else list(req.stop or []),
            Controls(seed=req.seed, logit_bias={int(k): v for k, v in (req.logit_bias or {}).items()},
                     presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0))

    async def respond(request: Request, req, prompts: list, s: Wanted, chunk, final, echo: bool = False):
        """Decode req.n choices of each prompt (a text, or token ids) through the scheduler; choice i·n + j is prompt
        i's j-th. A JSON body or an SSE stream of chunks."""
        rid = f"{'chatcmpl' if chunk is _chat_chunk else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        tokenized = [p if isinstance(p, list) else loaded.tokenizer(p, add_special_tokens=False)["input_ids"]
                     for p in prompts]
        vocab = getattr(config, "vocab_size", None)
        for i, ids in enumerate(tokenized):
            if not ids:
                return error(400, f"prompt{f'[{i}]' if len(prompts) > 1 else ''}: empty", param="prompt")
            if vocab and any(not 0 <= t < vocab for t in ids):
                return error(400, f"prompt: token ids must be 0 to {vocab - 1}", param="prompt")
            bad = too_long(len(ids), s)
            if bad:
                return bad
        if closing.is_set():
            return error(503, "qtune serve is shutting down", "server_error")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        top = _top_logprobs(req)
        choices = [Choice(i * req.n + j, loaded.tokenizer, s.stop, queue, loop)
                   for i in range(len(tokenized)) for j in range(req.n)]
        for c in choices:
            ids = tokenized[c.index // req.n]
            c.job = Job(prompt=list(ids), max_new_tokens=s.chat.max_new_tokens, on_token=c.token, on_end=c.end,
                        temperature=s.chat.temperature, top_p=s.chat.top_p, top_k=s.chat.top_k,
                        repetition_penalty=s.chat.repetition_penalty,
                        presence_penalty=s.controls.presence_penalty, frequency_penalty=s.controls.frequency_penalty,
                        logit_bias=s.controls.logit_bias, top_logprobs=top, adapter=req.model,
                        seed=None if s.controls.seed is None else s.controls.seed + c.index % req.n,
                        score_prompt=echo and top >= 0)
            if not engine.submit(c.job):
                for other in choices:
                    other.job.cancel()
                waiting = engine.load()["waiting"]
                return error(429, f"qtune serve is at capacity: {waiting} requests wait for a slot "
                                  f"(serve.max_queue={settings.max_queue}); retry shortly", "rate_limit_error",
                             code="rate_limit_exceeded", headers={"Retry-After": "1"})
        prompt_tokens = sum(map(len, tokenized))

        def usage() -> dict:
            done = sum(c.job.generated for c in choices)
            return {"prompt_tokens": prompt_tokens, "completion_tokens": done, "total_tokens": prompt_tokens + done}

        def cancel_all():
            for c in choices:
                c.job.cancel()

        async def pieces():
            """(choice, text, logprobs, finish) as they come; finish set on each choice's last."""
            left = len(choices)
            while left:
                index, kind, value = await queue.get()
                c = choices[index]
                if kind == "error":
                    raise RuntimeError(value)
                for text, lps, finish in c.feed(kind, value):
                    if finish:
                        left -= 1
                    yield c, text, lps, finish

        if not req.stream:
            texts, lps, finish = [""] * len(choices), [[] for _ in choices], [None] * len(choices)

            async def collect():
                async for c, text, lp, end in pieces():
                    texts[c.index] += text
                    lps[c.index] += lp
                    finish[c.index] = end or finish[c.index]

            if echo:   # the prompt before each choice's text, and its tokens' scores before the completion's
                for c in choices:
                    ids = c.job.prompt
                    texts[c.index] = loaded.tokenizer.decode(ids) + texts[c.index]

            task = asyncio.ensure_future(collect())
            try:
                while not task.done():  # a client that hangs up cancels its generations (or their place in the queue)
                    await asyncio.wait({task}, timeout=0.25)
                    if not task.done() and await request.is_disconnected():
                        cancel_all()
                task.result()
            except RuntimeError as e:
                return error(500, f"generation failed: {e}", "server_error")
            finally:
                cancel_all()
            if echo and top >= 0:
                for c in choices:
                    dec = loaded.tokenizer.decode
                    scored = [(dec([c.job.prompt[0]]), None, None)]
                    scored += [(dec([t]), lp, [(dec([i]), v) for i, v in alts])
                               for t, (lp, alts) in zip(c.job.prompt[1:], c.job.prompt_scores)]
                    lps[c.index] = scored + lps[c.index]
            u = usage()
            note(request, prompt_tokens=u["prompt_tokens"], completion_tokens=u["completion_tokens"])
            if closing.is_set() and any(f == "cancelled" for f in finish):
                return error(503, "qtune serve is shutting down", "server_error")
            return final(rid, req.model, texts, finish, lps, u, top)

        include = bool(req.stream_options and req.stream_options.include_usage)

        def sse(obj) -> str:   # with include_usage every chunk says usage: null, as OpenAI's
            return _sse({**obj, "usage": None} if include else obj)

        async def events():
            try:
                for c in choices:
                    yield sse(chunk(rid, req.model, c.index, None, first=True))
                try:
                    async for c, text, lp, end in pieces():
                        if text or lp:
                            yield sse(chunk(rid, req.model, c.index, text, logprobs=_logprobs(lp, top, chunk)))
                        if end:
                            yield sse(chunk(rid, req.model, c.index, None, finish=_finish(end)))
                except RuntimeError as e:
                    yield _sse({"error": {"message": f"generation failed: {e}", "type": "server_error"}})
                    return
                u = usage()
                note(request, prompt_tokens=u["prompt_tokens"], completion_tokens=u["completion_tokens"])
                if include:   # the last chunk: no choices, the whole request's usage
                    yield _sse({**chunk(rid, req.model, 0, None), "choices": [], "usage": u})
                yield "data: [DONE]\n\n"
            finally:
                cancel_all()  # the client went away: free the slots

        note(request, stream=True)
        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        note(request, model=req.model)
        max_tokens = req.max_completion_tokens or req.max_tokens
        bad = check(req, "chat", max_tokens)
        if bad:
            return bad
        messages = []
        for i, m in enumerate(req.messages):
            if m.role not in ("system", "user", "assistant", "tool"):
                return error(400, f"messages: unknown role {m.role!r}; valid: system, user, assistant, tool")
            if isinstance(m.content, str) or m.content is None:
                content = m.content or ""
            else:
                texts = []
                for j, part in enumerate(m.content):
                    kind = part.get("type", "text") if isinstance(part, dict) else "text"
                    if kind != "text":
                        return error(400, f"messages[{i}].content[{j}]: type {kind!r} is not supported; qtune serves "
                                          "text models (parts of type 'text' only)", code="unsupported_content")
                    texts.append(part if isinstance(part, str) else str(part.get("text", "")))
                content = "".join(texts)
            messages.append({"role": m.role, "content": content})
        think = req.enable_thinking
        if think is None and req.chat_template_kwargs:
            think = req.chat_template_kwargs.get("enable_thinking")
        prompt = render(loaded, messages, cfg.chat.enable_thinking if think is None else bool(think))
        return await respond(request, req, [prompt], sampling(req, max_tokens), _chat_chunk, _chat_final)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        note(request, model=req.model)
        bad = check(req, "completions", req.max_tokens)
        if bad:
            return bad
        p = req.prompt
        prompts = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not prompts:
            return error(400, "prompt: empty", param="prompt")
        if len(prompts) * req.n > settings.max_n * 4:
            return error(400, f"{len(prompts)} prompts x n={req.n}: at most {settings.max_n * 4} completions a "
                              "request (4 x serve.max_n)", param="prompt")
        if req.echo and req.stream:
            return error(400, "echo: not with stream (ask without streaming)", param="echo")
        return await respond(request, req, prompts, sampling(req, req.max_tokens), _text_chunk, _text_final,
                             echo=req.echo)

    return app


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _finish(end: str | None) -> str:
    return end if end in ("stop", "length") else "stop"


def _top_logprobs(req) -> int:
    """-1: no log-probabilities; 0: the chosen tokens'; k: and the k most likely at each."""
    if isinstance(req, ChatRequest):
        return (req.top_logprobs or 0) if req.logprobs else -1
    return -1 if req.logprobs is None else req.logprobs


def _logprobs(entries: list, top: int, chat: bool):
    """OpenAI's logprobs object for (token text, log-probability, [(text, log-probability)] of the top) entries."""
    if top < 0:
        return None
    if chat:
        return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()),
                             "top_logprobs": [{"token": a, "logprob": b, "bytes": list(a.encode())}
                                              for a, b in alts]} for t, lp, alts in entries]}
    offsets, at = [], 0
    for t, _, _ in entries:
        offsets.append(at)
        at += len(t)
    return {"tokens": [t for t, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [None if alts is None else dict(alts) for _, _, alts in entries] if top else None,
            "text_offset": offsets}


def _chat_final(rid, model, texts, finish, lps, usage, top):
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": text},
                         "logprobs": _logprobs(lps[i], top, True), "finish_reason": _finish(finish[i])}
                        for i, text in enumerate(texts)], "usage": usage}


def _chat_chunk(rid, model, index, piece, first=False, finish=None, logprobs=None):
    delta = {"role": "assistant", "content": ""} if first else ({} if finish else {"content": piece})
    choice = {"index": index, "delta": delta, "finish_reason": finish}
    if logprobs is not None:
        choice["logprobs"] = logprobs
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [choice]}


def _text_final(rid, model, texts, finish, lps, usage, top):
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "text": text, "logprobs": _logprobs(lps[i], top, False),
                         "finish_reason": _finish(finish[i])} for i, text in enumerate(texts)], "usage": usage}


def _text_chunk(rid, model, index, piece, first=False, finish=None, logprobs=None):
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "text": "" if (first or finish) else piece, "logprobs": logprobs,
                         "finish_reason": finish}]}


class Choice:
    """One choice of one request: the engine thread hands it tokens (token(), end()), the event loop turns them into
    text (feed()): decoded incrementally, an incomplete UTF-8 character held back until it completes, and text stops
    exactly before the first of the request's stop strings to appear (the job is cancelled there; text that could
    begin one is held back until it cannot)."""

    def __init__(self, index: int, tokenizer, stops: list, queue, loop):
        self.index, self.tokenizer, self.queue, self.loop = index, tokenizer, queue, loop
        self.stops = [x for x in stops if x]
        self.ids: list = []
        self.prefix = self.read = 0
        self.held = ""
        self.pending: list = []     # log-probability entries not given out yet
        self.finished = False
        self.job = None

    # -- the engine thread
    def _put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:   # the event loop is gone (the server stopped): nobody waits for it
            pass

    def token(self, t: int, lp) -> None:
        self._put((self.index, "token", (t, lp)))

    def end(self, reason: str) -> None:
        self._put((self.index, "error" if reason.startswith("error") else "end", reason))

    # -- the event loop
    def _text(self, final: bool = False) -> str:
        dec = self.tokenizer.decode
        before = dec(self.ids[self.prefix:self.read], skip_special_tokens=True)
        now = dec(self.ids[self.prefix:], skip_special_tokens=True)
        if len(now) > len(before) and (final or not now.endswith("\ufffd")):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before):]
        return ""

    def feed(self, kind: str, value) -> list:
        """(text, log-probability entries, finish reason or None) to give out for one event."""
        if self.finished:
            return []
        if kind == "token":
            t, lp = value
            self.ids.append(t)
            if lp is not None:
                word = self.tokenizer.decode([t])
                self.pending.append((word, lp[0], [(self.tokenizer.decode([i]), v) for i, v in lp[1]]))
            piece = self._text()
            if not self.stops:
                return self._out(piece)
            self.held += piece
            hit = min((self.held.find(x) for x in self.stops if x in self.held), default=-1)
            if hit >= 0:
                text, self.held = self.held[:hit], ""
                self.finished = True
                self.job.cancel()
                return [(text, self._take(), "stop")]
            keep = _stop_prefix(self.held, self.stops)
            text, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
            return self._out(text)
        self.finished = True     # the end: what is held goes out (it began no stop string after all)
        text = self.held + self._text(final=True)
        self.held = ""
        return [(text, self._take(), value)]

    def _take(self) -> list:
        out, self.pending = self.pending, []
        return out

    def _out(self, text: str) -> list:
        return [(text, self._take(), None)] if text else []


def scheduler(loaded, cfg: Config):
    """The decoding engine for `loaded`, its slots sized from serve.max_batch and serve.max_model_len and, on a GPU, its
    free memory; and the line that says so."""
    import torch

    from qtune.errors import QtuneError
    from qtune.inference import engine

    model, s = loaded.model, cfg.serve
    param = next(model.parameters())
    gpu = param.is_cuda
    config = engine._base(model).config
    context = getattr(config, "max_position_embeddings", None) or 2048
    length = s.max_model_len or min(context, 4096 if gpu else 2048)
    slots = s.max_batch or (32 if gpu else 4)
    dtype = engine._compute_dtype(model)
    vocab = model.get_output_embeddings().weight.shape[0]

    def size(n: int) -> int:   # keys and values, and each slot's penalty counts, seen tokens and bias
        return engine.cache_bytes(config, n, length + 1, torch.finfo(dtype).bits // 8) + n * vocab * 9

    note = ""
    if gpu:
        free = torch.cuda.mem_get_info(param.device)[0] * 0.9
        if size(slots) > free:
            fit = int(slots * free // size(slots))
            if fit < 1:
                raise QtuneError(f"serve: one slot of serve.max_model_len={length} tokens needs "
                                 f"{size(1) / 2**30:.1f} GiB, more than the GPU's free memory; lower serve.max_model_len")
            note = f" (serve.max_batch={slots} would not fit in 90 % of the GPU's free memory)"
            slots = fit
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = set([eos] if isinstance(eos, int) else list(eos or []))
    if loaded.tokenizer.eos_token_id is not None:
        eos.add(loaded.tokenizer.eos_token_id)
    mixed, why = None, ""
    if loaded.adapters:
        from qtune.inference.adapters import MixedRows, RowAdapters

        try:
            mixed = MixedRows(RowAdapters(model, list(loaded.adapters), max_batch=slots), loaded.base_name)
        except QtuneError as e:   # rows of one batch then share one adapter
            why = f"; one adapter per batch ({e})"
    from qtune.modeling.fast import liger_for_decoding

    kernels = liger_for_decoding(model, s.liger)
    if gpu:
        from qtune.inference.fused import fuse_siblings

        if fuse_siblings(model):
            kernels += ("; " if kernels else "") + "q/k/v and gate/up as one matmul for a lone row"
    sched = engine.Scheduler(model, slots=slots, length=length, eos=sorted(eos), chunk=s.prefill_chunk,
                             queue=s.max_queue, switch=loaded.switch, adapters=mixed, notice=loaded.notice)
    graphs = "eager steps"
    if sched.graph:
        import time

        began = time.perf_counter()
        captured = sched.capture()
        graphs = (f"CUDA graphs for batches of 1-{slots} ({captured} captured in {time.perf_counter() - began:.1f}s)"
                  if sched.graph else "eager steps (capturing a step failed)")
    line = (f"{slots} slots of {length} tokens ({size(slots) / 2**30:.2f} GiB){note}; "
            f"{graphs}" + (f"; {kernels}" if kernels else "")
            + ("; adapters mixed in a batch" if mixed else why))
    return sched, line



