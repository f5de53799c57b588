"""`qtune serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) over a base and its adapters
(qtune.inference.openai_api is the app). Binds 127.0.0.1 unless told otherwise; checks the port before the model
loads; SIGTERM stops running generations and the server within a few seconds. serve.engine=vllm hands the base and
adapters to vLLM's own OpenAI server instead.

"""
from __future__ import annotations

import json
import os
import shutil
import socket

from qtune.config.schema import Config
from qtune.errors import QtuneError


def run(cfg: Config):
    if cfg.serve.engine == "vllm":
        return run_vllm(cfg)
    if cfg.serve.engine != "builtin":
        raise QtuneError(f"serve.engine={cfg.serve.engine}: valid: builtin, vllm")
    check_port(cfg.serve.host, cfg.serve.port)   # before minutes of loading, not after
    import uvicorn

    from qtune import ui
    from qtune.inference.load import load
    from qtune.inference.openai_api import SHUTDOWN_GRACE_S, build_app

    with ui.status("loading"):
        loaded = load(cfg, use="adapter", extra_adapters=dict(cfg.serve.adapters))
        loaded.notice = ui.note
    app = build_app(loaded, cfg, log=ui.line if cfg.serve.log_requests else None)
    ui.info(f"qtune serve: {loaded.label}; models: {', '.join(loaded.names())}; {app.state.engine_line}; "
            f"http://{cfg.serve.host}:{cfg.serve.port}/v1" + (" (Bearer key required)" if cfg.serve.api_key else ""))

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGINT/SIGTERM: end running generations first, then uvicorn's shutdown
            app.state.stop_all()
            super().handle_exit(sig, frame)

    Server(uvicorn.Config(app, host=cfg.serve.host, port=cfg.serve.port, log_level="warning",
                          timeout_graceful_shutdown=SHUTDOWN_GRACE_S)).run()


def check_port(host: str, port: int) -> None:
    """serve.port must be free on serve.host: say so in one line before the model loads."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a closed server's TIME_WAIT is fine
        try:
            s.bind((host, port))
        except OSError as e:
            raise QtuneError(f"serve.port={port} is in use on {host} ({e.strerror or e}); choose another serve.port, "
                             "or stop what listens there") from None


def vllm_command(cfg: Config) -> list[str]:
    """vLLM's OpenAI server over the run's base with its adapter(s) as LoRA modules."""
    from qtune.modeling.hub import ensure_model
    from qtune.ui import print_warning
    from qtune.runs import adapter_folder, model_output, run_config, run_folder

    run = run_folder(cfg) if cfg.run else None
    rcfg = run_config(run, cfg) if run else cfg
    trained = model_output(run) if run else None  # train.method=full|freeze: model/ is the model, no adapter
    base = trained or ensure_model(rcfg.model, rcfg.download, rcfg.paths, warn=print_warning)
    adapters = {run.name: run / "adapter"} if run and trained is None else {}
    adapters.update({n: adapter_folder(p, "serve.adapters") for n, p in cfg.serve.adapters.items()})
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
