"""`python -m qtune`, less the seconds of imports: a process that has imported qtune and the libraries its verbs load
(torch, transformers, peft, trl, datasets: ~10 s of every fresh qtune process that reaches a model, most of a bad-input
test's time), then forks one child per request. The child takes the request's argv, cwd and environment, its stdin
from /dev/null and its stdout and stderr into the request's files, and runs qtune as `python -m qtune` does
(runpy.run_module("qtune", run_name="__main__")): qtune's own main() and error handling, a traceback and exit
status 1 for an exception it lets through, then what the interpreter does at exit (non-daemon threads joined, atexit
functions, streams flushed) before os._exit: tearing down torch's modules in a forked child takes ~10 s and shows
nothing. What a child cannot show is what those imports print or do once, at import time; and the libraries'
import-time settings come from the environment the server started in (tests/conftest.py's: HF_HUB_OFFLINE and the rest),
so a request that changes those belongs in a fresh process.

Protocol, one JSON line per request on stdin: {"argv": [...], "cwd": ..., "env": {...}, "stdout": path, "stderr": path};
the server answers `pid <n>` once the child runs, then `rc <returncode>` (negative: killed by that signal)."""
from __future__ import annotations

import gc
import importlib
import json
import os
import pkgutil
import runpy
import sys

PRELOAD = ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "safetensors")
OPTIONAL = ("lm_eval",)  # qtune[eval]: its import alone is ~30 s of the one eval row that reaches it


def preload() -> None:
    """The libraries, then every qtune module (those that need what this machine lacks, such as triton, excepted) and
    Hydra's plugin scan: what a verb would import, so that a child imports next to nothing."""
    for name in PRELOAD:
        importlib.import_module(name)
    for name in OPTIONAL:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    import qtune

    for m in pkgutil.walk_packages(qtune.__path__, "qtune."):
        if m.name != "qtune.__main__":
            try:
                importlib.import_module(m.name)
            except ImportError:
                pass
    from hydra.core.plugins import Plugins

    Plugins.instance()
    gc.freeze()  # the collector leaves the preloaded objects alone in each child: no copy of their pages


def exit_code(code) -> int:
    """What the interpreter makes of SystemExit(code): None is 0, a number itself, anything else printed and 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def child(request: dict) -> None:
    """In the forked child: be `python -m qtune <argv>`, then exit as the interpreter would (never returns)."""
    import atexit
    import threading

    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY),
                            (2, request["stderr"], os.O_WRONLY)):
        f = os.open(path, flags)
        os.dup2(f, fd)
        os.close(f)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.path[0] = os.getcwd()  # as `python -m` puts it (this file's folder was there)
    sys.argv = ["-m", *request["argv"]]  # run_module puts qtune/__main__.py in argv[0], as `python -m` does
    try:
        runpy.run_module("qtune", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = exit_code(e.code)
    except BaseException:
        sys.excepthook(*sys.exc_info())  # the traceback the interpreter prints for an exception nothing caught
        code = 1
    threading._shutdown()  # the interpreter's own steps at exit, in its order
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def serve() -> None:
    preload()
    out = sys.stdout
    print("ready", file=out, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            child(request)
        print(f"pid {pid}", file=out, flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"rc {os.waitstatus_to_exitcode(status)}", file=out, flush=True)


if __name__ == "__main__":  # not when a process that qtune spawns imports this file as __mp_main__
    serve()
