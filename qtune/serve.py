"""`qtune serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) over a base and its adapters.

POST /v1/chat/completions (streamed over SSE or not), POST /v1/completions, GET /v1/models, GET /health.
Requests name a model: the base (model.name) or an adapter (the run's folder name, or a name from
serve.adapters). One model in memory serves them all, so generations run one at a time, in arrival
order (a lock; waiting requests queue). Binds 127.0.0.1 unless told otherwise; serve.api_key makes
`Authorization: Bearer <key>` mandatory. Errors have OpenAI's shape: {"error": {"message", "type", "code"}}.
serve.engine=vllm hands the base and adapters to vLLM's own OpenAI server instead.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
import time
import uuid
from typing import List, Optional, Union

from pydantic import BaseModel, Field

from qtune.config.schema import Config
from qtune.errors import QtuneError


class Message(BaseModel):
    role: str
    content: Union[str, List[dict], None] = None


class ChatRequest(BaseModel):
    model: str
    messages: List[Message] = Field(min_length=1)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    stream: bool = False
    stop: Union[str, List[str], None] = None
    n: int = Field(default=1, ge=1, le=1)
    enable_thinking: Optional[bool] = None  # Qwen3: also accepted as chat_template_kwargs.enable_thinking
    chat_template_kwargs: Optional[dict] = None


class CompletionRequest(BaseModel):
    model: str
    prompt: Union[str, List[str]]
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    stream: bool = False
    stop: Union[str, List[str], None] = None
    n: int = Field(default=1, ge=1, le=1)


def run(cfg: Config):
    if cfg.serve.engine == "vllm":
        return run_vllm(cfg)
    if cfg.serve.engine != "builtin":
        raise QtuneError(f"serve.engine={cfg.serve.engine}: valid: builtin, vllm")
    import uvicorn

    from qtune import ui
    from qtune.inference import load

    with ui.status("loading"):
        loaded = load(cfg, use="adapter", extra_adapters=dict(cfg.serve.adapters))
    app = build_app(loaded, cfg)
    ui.info(f"qtune serve: {loaded.label}; models: {', '.join(loaded.names())}; "
            f"http://{cfg.serve.host}:{cfg.serve.port}/v1" + (" (Bearer key required)" if cfg.serve.api_key else ""))
    uvicorn.run(app, host=cfg.serve.host, port=cfg.serve.port, log_level="warning")


def build_app(loaded, cfg: Config):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from qtune.inference import Generation, Sampling, render

    app = FastAPI(title="qtune serve")
    lock = threading.Lock()  # one generation at a time on the one model; others wait their turn
    created = int(time.time())
    settings = cfg.serve

    def error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": None,
                                                                   "code": code}})

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if settings.api_key and request.url.path.startswith("/v1"):
            if request.headers.get("authorization", "") != f"Bearer {settings.api_key}":
                return error(401, "missing or wrong API key: send Authorization: Bearer <serve.api_key>",
                             "authentication_error", "invalid_api_key")
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > settings.max_body_bytes:
            return error(413, f"request body of {length} bytes exceeds serve.max_body_bytes={settings.max_body_bytes}")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return error(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        return error(exc.status_code, str(exc.detail), "invalid_request_error" if exc.status_code < 500 else "server_error")

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": loaded.names()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "qtune"}
                                           for n in loaded.names()]}

    def check(model: str, max_tokens: Optional[int]):
        if model not in loaded.names():
            return error(404, f"model {model!r} not found; available: {', '.join(loaded.names())}", code="model_not_found")
        if max_tokens is not None and max_tokens > settings.max_tokens_limit:
            return error(400, f"max_tokens={max_tokens} exceeds serve.max_tokens_limit={settings.max_tokens_limit}")
        return None

    def sampling(req, max_tokens: Optional[int]) -> Sampling:
        s = Sampling.from_chat(cfg.chat)
        s.max_new_tokens = min(max_tokens or s.max_new_tokens, settings.max_tokens_limit)
        if req.temperature is not None:
            s.temperature = req.temperature
        if req.top_p is not None:
            s.top_p = req.top_p
        s.stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        return s

    async def respond(req, prompt: str, s: Sampling, chunk, final):
        """Run one generation under the lock; a JSON body or an SSE stream of chunks."""
        rid = f"{'chatcmpl' if chunk is _chat_chunk else 'cmpl'}-{uuid.uuid4().hex[:24]}"

        def generate_all():
            with lock, loaded.using(req.model):
                gen = Generation(loaded, prompt, s)
                text = "".join(gen)
            return text, gen

        if not req.stream:
            text, gen = await asyncio.to_thread(generate_all)
            return final(rid, req.model, text, gen)

        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        done = object()

        def produce():
            gen = None
            try:
                with lock, loaded.using(req.model):
                    gen = Generation(loaded, prompt, s)
                    for piece in gen:
                        loop.call_soon_threadsafe(queue.put_nowait, piece)
                        if stopped.is_set():
                            gen.stop()
            except BaseException as e:  # reported as an error event
                loop.call_soon_threadsafe(queue.put_nowait, e)
            loop.call_soon_threadsafe(queue.put_nowait, (done, gen))

        stopped = threading.Event()
        threading.Thread(target=produce, daemon=True).start()

        async def events():
            try:
                yield _sse(chunk(rid, req.model, None, first=True))
                while True:
                    item = await queue.get()
                    if isinstance(item, tuple) and item and item[0] is done:
                        gen = item[1]
                        yield _sse(chunk(rid, req.model, None, finish=gen.finish_reason if gen else "stop"))
                        break
                    if isinstance(item, BaseException):
                        yield _sse({"error": {"message": str(item), "type": "server_error"}})
                        break
                    yield _sse(chunk(rid, req.model, item))
                yield "data: [DONE]\n\n"
            finally:
                stopped.set()  # the client went away: let the generation end

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        max_tokens = req.max_completion_tokens or req.max_tokens
        bad = check(req.model, max_tokens)
        if bad:
            return bad
        messages = []
        for m in req.messages:
            if m.role not in ("system", "user", "assistant", "tool"):
                return error(400, f"messages: unknown role {m.role!r}; valid: system, user, assistant, tool")
            content = m.content if isinstance(m.content, str) else "".join(
                p.get("text", "") for p in (m.content or []) if isinstance(p, dict))
            messages.append({"role": m.role, "content": content})
        think = req.enable_thinking
        if think is None and req.chat_template_kwargs:
            think = req.chat_template_kwargs.get("enable_thinking")
        prompt = render(loaded, messages, cfg.chat.enable_thinking if think is None else bool(think))
        return await respond(req, prompt, sampling(req, max_tokens), _chat_chunk, _chat_final)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        bad = check(req.model, req.max_tokens)
        if bad:
            return bad
        if isinstance(req.prompt, list):
            if len(req.prompt) != 1:
                return error(400, "prompt: one prompt per request")
            prompt = req.prompt[0]
        else:
            prompt = req.prompt
        return await respond(req, prompt, sampling(req, req.max_tokens), _text_chunk, _text_final)

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


def vllm_command(cfg: Config) -> list[str]:
    """vLLM's OpenAI server over the run's base with its adapter(s) as LoRA modules."""
    from qtune.download import ensure_model
    from qtune.inference import _adapter_dir
    from qtune.merge import run_config, run_folder

    run = run_folder(cfg) if cfg.run else None
    rcfg = run_config(run, cfg) if run else cfg
    base = ensure_model(rcfg.model, rcfg.download, rcfg.paths)
    adapters = {run.name: run / "adapter"} if run else {}
    adapters.update({n: _adapter_dir(p) for n, p in cfg.serve.adapters.items()})
    cmd = ["vllm", "serve", str(base), "--served-model-name", rcfg.model.name, "--host", cfg.serve.host,
           "--port", str(cfg.serve.port)]
    if adapters:
        ranks = [json.loads((p / "adapter_config.json").read_text()).get("r", 16) for p in adapters.values()]
        cmd += ["--enable-lora", "--max-lora-rank", str(max(ranks)), "--lora-modules",
                *[f"{n}={p}" for n, p in adapters.items()]]
    if cfg.serve.api_key:
        cmd += ["--api-key", cfg.serve.api_key]
    return cmd


def run_vllm(cfg: Config):
    if shutil.which("vllm") is None:
        raise QtuneError("serve.engine=vllm: vLLM is not installed here (pip install vllm, on a CUDA machine); "
                         "serve.engine=builtin works without it")
    cmd = vllm_command(cfg)
    from qtune import ui

    ui.info("handing over to vLLM: " + " ".join(cmd))
    os.execvp(cmd[0], cmd)
