"""The OpenAI-compatible HTTP API over a loaded base and its adapters (qtune serve's app): the request schemas, the
guard every request passes (API key, body size), and the endpoints.

POST /v1/chat/completions (streamed over SSE or not), POST /v1/completions, GET /v1/models, GET /health.
Requests name a model: the base (model.name) or an adapter (the run's folder name, or a name from
serve.adapters). One model in memory serves them all, so generations run one at a time, in arrival
order (a lock; waiting requests queue). serve.api_key makes `Authorization: Bearer <key>` mandatory. Errors have
OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

One request must not hold the server: bodies are counted as they arrive (chunked ones too) and cut off past
serve.max_body_bytes; a prompt that with max_tokens exceeds the model's context (or serve.max_prompt_tokens)
is refused before it queues; a client that goes away cancels its generation, streamed or not; stop_all() (on
SIGTERM) stops running generations. Parameters qtune cannot honour (logprobs, tools, image parts, response_format
other than text) are refused with 400 rather than silently ignored; seed, logit_bias, presence/frequency penalties,
stop strings and stream_options.include_usage are honoured as OpenAI does.

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
    n: int = Field(default=1, ge=1, le=1)
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


class CompletionRequest(Sampled):
    prompt: Union[str, List[str]]


# OpenAI parameters qtune's generation cannot honour: a request that asks for one gets 400, not a silent default.
# (name, value that means "not asked for")
UNSUPPORTED = {"chat": [("logprobs", (None, False)), ("top_logprobs", (None, 0)), ("tools", (None, [])),
                        ("tool_choice", (None, "none")), ("functions", (None, [])), ("function_call", (None, "none")),
                        ("audio", (None,)), ("modalities", (None, ["text"]))],
               "completions": [("logprobs", (None, 0)), ("echo", (None, False)), ("suffix", (None, "")),
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

    from qtune.inference.load import Controls, Generation, render

    app = FastAPI(title="qtune serve")
    app.add_middleware(Guard, limit=cfg.serve.max_body_bytes, api_key=cfg.serve.api_key)
    if log is not None:
        app.add_middleware(RequestLog, log=log)   # added last: the outermost
    lock = threading.Lock()  # one generation at a time on the one model; others wait their turn
    created = int(time.time())
    settings = cfg.serve
    active: set = set()       # running Generations, stopped on shutdown
    closing = threading.Event()
    config = getattr(loaded.model, "config", None)
    context = getattr(config, "max_position_embeddings", None)

    def stop_all():
        closing.set()
        for gen in list(active):
            gen.stop()

    app.state.stop_all = stop_all

    def error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
              param: str | None = None):
        return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param,
                                                                   "code": code}})

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

    def too_long(prompt: str, s: Wanted):
        n = len(loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if settings.max_prompt_tokens and n > settings.max_prompt_tokens:
            return error(400, f"the prompt is {n} tokens; serve.max_prompt_tokens={settings.max_prompt_tokens}",
                         code="context_length_exceeded")
        if context and n + s.chat.max_new_tokens > context:
            return error(400, f"This model's maximum context length is {context} tokens. However, you requested "
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

    def generation(prompt: str, s: Wanted, cancelled: threading.Event):
        """A Generation under the lock, registered for shutdown; None when cancelled while it waited its turn."""
        if cancelled.is_set() or closing.is_set():
            return None
        gen = Generation(loaded, prompt, s.chat, s.stop, s.controls)
        active.add(gen)
        if cancelled.is_set() or closing.is_set():
            gen.stop()
        return gen

    async def respond(request: Request, req, prompt: str, s: Wanted, chunk, final):
        """Run one generation under the lock; a JSON body or an SSE stream of chunks."""
        rid = f"{'chatcmpl' if chunk is _chat_chunk else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        bad = too_long(prompt, s)
        if bad:
            return bad
        cancelled = threading.Event()
        running: list = []

        def generate_all():
            with lock, loaded.using(req.model):
                gen = generation(prompt, s, cancelled)
                if gen is None:
                    return "", None
                running.append(gen)
                try:
                    return "".join(gen), gen
                finally:
                    active.discard(gen)

        if not req.stream:
            task = asyncio.ensure_future(asyncio.to_thread(generate_all))
            while not task.done():  # a client that hangs up cancels its generation (or its place in the queue)
                await asyncio.wait({task}, timeout=0.25)
                if not task.done() and await request.is_disconnected():
                    cancelled.set()
                    for gen in running:
                        gen.stop()
            text, gen = task.result()
            if gen is not None:
                note(request, prompt_tokens=gen.prompt_tokens, completion_tokens=gen.completion_tokens)
            if gen is None:
                return error(503, "the request was cancelled before it ran", "server_error")
            return final(rid, req.model, text, gen)

        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        done = object()

        def produce():
            gen = None
            try:
                with lock, loaded.using(req.model):
                    gen = generation(prompt, s, cancelled)
                    for piece in gen or ():
                        loop.call_soon_threadsafe(queue.put_nowait, piece)
                        if cancelled.is_set():
                            gen.stop()
            except BaseException as e:  # reported as an error event
                loop.call_soon_threadsafe(queue.put_nowait, e)
            finally:
                active.discard(gen)
            loop.call_soon_threadsafe(queue.put_nowait, (done, gen))

        threading.Thread(target=produce, daemon=True).start()

        usage = bool(req.stream_options and req.stream_options.include_usage)

        def sse(obj) -> str:   # with include_usage every chunk says usage: null, as OpenAI's
            return _sse({**obj, "usage": None} if usage else obj)

        async def events():
            try:
                yield sse(chunk(rid, req.model, None, first=True))
                while True:
                    item = await queue.get()
                    if isinstance(item, tuple) and item and item[0] is done:
                        gen = item[1]
                        if gen is not None:
                            note(request, prompt_tokens=gen.prompt_tokens, completion_tokens=gen.completion_tokens)
                        yield sse(chunk(rid, req.model, None, finish=gen.finish_reason if gen else "stop"))
                        if usage and gen is not None:   # the last chunk: no choices, the whole request's usage
                            yield _sse({**chunk(rid, req.model, None, finish="stop"), "choices": [],
                                        "usage": _usage(gen)})
                        break
                    if isinstance(item, BaseException):
                        yield _sse({"error": {"message": str(item), "type": "server_error"}})
                        break
                    yield sse(chunk(rid, req.model, item))
                yield "data: [DONE]\n\n"
            finally:
                cancelled.set()  # the client went away: let the generation end

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
        return await respond(request, req, prompt, sampling(req, max_tokens), _chat_chunk, _chat_final)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        note(request, model=req.model)
        bad = check(req, "completions", req.max_tokens)
        if bad:
            return bad
        if isinstance(req.prompt, list):
            if len(req.prompt) != 1:
                return error(400, "prompt: one prompt per request")
            prompt = req.prompt[0]
        else:
            prompt = req.prompt
        return await respond(request, req, prompt, sampling(req, req.max_tokens), _text_chunk, _text_final)

    return app


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _usage(gen) -> dict:
    return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
            "total_tokens": gen.prompt_tokens + gen.completion_tokens}


def _chat_final(rid, model, text, gen):
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": gen.finish_reason}], "usage": _usage(gen)}


def _chat_chunk(rid, model, piece, first=False, finish=None):
    delta = {"role": "assistant", "content": ""} if first else ({} if finish else {"content": piece})
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def _text_final(rid, model, text, gen):
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": gen.finish_reason}],
            "usage": _usage(gen)}


def _text_chunk(rid, model, piece, first=False, finish=None):
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": "" if (first or finish) else piece, "logprobs": None,
                         "finish_reason": finish}]}
