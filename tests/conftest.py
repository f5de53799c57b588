"""Fixtures every test uses: the Qwen3 tokenizer, tiny random Qwen3 / Qwen3-MoE models and the embedded
SmolLM2, all built locally (no network) into one cache that survives between local runs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# One cache for the session (and between local runs): conversions and builds happen once.
HOME = Path(os.environ.get("QTUNE_TEST_HOME", REPO / ".cache" / "test-home"))
os.environ["QTUNE_HOME"] = str(HOME)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (`make test` runs two workers) each worker and what it starts computes on one thread: two of them
# share the cores instead of each spinning up a thread per core. Set before torch is imported, here or in a subprocess.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
QTUNE = [sys.executable, "-m", "qtune"]


def qtune(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600, check: bool = False,
          prefix: tuple[str, ...] = ()):
    """Run the real `qtune` command (after `prefix`, e.g. setpriv); return the CompletedProcess (text)."""
    proc = subprocess.run([*prefix, *QTUNE, *args], cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"qtune {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


class _Forkserver:
    """tests/forkserver.py, started on first use and stopped at the session's end: one server, one request at a time."""

    def __init__(self):
        import tempfile

        self.dir = Path(tempfile.mkdtemp(prefix="qtune-forkserver-"))
        self.proc: subprocess.Popen | None = None
        self.pending = b""

    def _line(self, timeout: float | None = None) -> str | None:
        """The server's next line, or None when `timeout` seconds pass first."""
        import select

        while b"\n" not in self.pending:
            if timeout is not None and not select.select([self.proc.stdout], [], [], timeout)[0]:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError(f"tests/forkserver.py stopped:\n{(self.dir / 'server.log').read_text()}")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return line.decode()

    def run(self, args: tuple[str, ...], cwd: Path | None, env: dict | None,
            timeout: float) -> subprocess.CompletedProcess:
        import json
        import signal

        if self.proc is None or self.proc.poll() is not None:
            log = open(self.dir / "server.log", "w")  # a file, not pytest's stderr (which may be a terminal)
            self.proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "forkserver.py")], cwd=REPO,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, bufsize=0)
            self.pending = b""
            assert self._line() == "ready"
        out, err = self.dir / "stdout", self.dir / "stderr"
        out.write_bytes(b"")
        err.write_bytes(b"")
        request = {"argv": list(args), "cwd": str(cwd or os.getcwd()), "env": {**os.environ, **(env or {})},
                   "stdout": str(out), "stderr": str(err)}
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        pid = int(self._line().split()[1])
        answer = self._line(timeout)
        if answer is None:
            os.kill(pid, signal.SIGKILL)
            self._line()
            raise subprocess.TimeoutExpired([*QTUNE, *args], timeout)
        rc = int(answer.split()[1])
        return subprocess.CompletedProcess([*QTUNE, *args], rc, out.read_text(), err.read_text())

    def stop(self) -> None:
        import shutil

        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)


_forkserver: _Forkserver | None = None


def qtune_warm(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600,
               check: bool = False):
    """The real `qtune` command as `qtune()` runs it, in a process forked from one that has already imported torch,
    transformers, peft, trl and datasets (tests/forkserver.py): the same main(), exit status and stdout/stderr, without
    the ~10 s of imports of each fresh process. For refusals and for the trainings, merges and evals whose outcome does
    not depend on the process; not for what only a fresh interpreter shows (import-time output, what a verb imports,
    signals, a process killed half way). `env` is for variables qtune reads as it runs (QTUNE_HOME, PATH); the
    libraries' import-time settings (HF_HUB_OFFLINE, HF_ENDPOINT and the like) need a fresh process."""
    global _forkserver
    if _forkserver is None:
        _forkserver = _Forkserver()
    proc = _forkserver.run(args, cwd, env, timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"qtune {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def pytest_sessionfinish(session, exitstatus):
    if _forkserver is not None:
        _forkserver.stop()


def one_line_error(p) -> str:
    """The one `error:` line of a failed qtune run (asserting a non-zero exit, no traceback, exactly one such line)."""
    assert p.returncode != 0 and "Traceback" not in p.stderr + p.stdout, p.stderr
    lines = [x for x in p.stderr.strip().splitlines() if x.startswith("error:")]
    assert len(lines) == 1, p.stderr
    return lines[0]


def only_line(p) -> str:
    """Stricter: stderr holds nothing but that one line (no warnings, no progress)."""
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert p.returncode != 0 and "Traceback" not in p.stderr + p.stdout, p.stderr
    assert len(lines) == 1, p.stderr
    return lines[0]


def model_cfg(name: str):
    from qtune.config import compose, to_object

    return to_object(compose([f"model={name}"])).model


@pytest.fixture(scope="session")
def qtune_home() -> Path:
    HOME.mkdir(parents=True, exist_ok=True)
    return HOME


def built_once(name: str):
    """A lock on building `name` into the shared cache: with two xdist workers, the second waits for the first's build
    and finds it done (the builds themselves are safe side by side, only wasteful)."""
    from filelock import FileLock

    return FileLock(str(HOME / f".{name}.lock"))


@pytest.fixture(scope="session")
def qwen3_tokenizer(qtune_home):
    from qtune.modeling.assets import qwen3_tokenizer

    with built_once("qwen3_tokenizer"):
        return qwen3_tokenizer(qtune_home)


@pytest.fixture(scope="session")
def tiny_qwen3(qtune_home) -> Path:
    from qtune.modeling.assets import build_random_model

    m = model_cfg("tiny_qwen3")
    with built_once("tiny_qwen3"):
        return build_random_model(m.arch, Path(m.local_dir), qtune_home)


@pytest.fixture(scope="session")
def tiny_qwen3_moe(qtune_home) -> Path:
    from qtune.modeling.assets import build_random_model

    m = model_cfg("tiny_qwen3_moe")
    with built_once("tiny_qwen3_moe"):
        return build_random_model(m.arch, Path(m.local_dir), qtune_home)


@pytest.fixture(scope="session")
def smollm2(qtune_home) -> Path:
    from qtune.modeling.assets import convert_gguf, package_file

    m = model_cfg("smollm2_135m")
    with built_once("smollm2_135m"):
        return convert_gguf(package_file(m.package, m.gguf_file), Path(m.local_dir))


SMOL_PROMPT = "What is the capital of Italy?"


@pytest.fixture(scope="session")
def smol_run(smollm2, tmp_path_factory) -> Path:
    """SmolLM2 trained on the demo data by the real CLI (8 steps), shared by the train and eval tests."""
    run = tmp_path_factory.mktemp("smol") / "run"
    qtune_warm("train", "model=smollm2_135m", "data=demo", f"data.path={REPO}/data/demo/captains_log.jsonl",
               f"data.eval_path={REPO}/data/demo/held_out.jsonl", "train.grad_accum=1", "train.logging_steps=1",
               "train.warmup_ratio=0", "train.report_to=[]", "train.gradient_checkpointing=false",
               f"train.output_dir={run}", "train.max_steps=8", "train.save_steps=8", "train.lr=1e-3",
               f"train.sample_prompts=[{SMOL_PROMPT}]", "train.sample_max_new_tokens=12", check=True)
    return run


@pytest.fixture(scope="session")
def tiny_run(tiny_qwen3, tmp_path_factory) -> Path:
    """The tiny Qwen3 trained by the real CLI for 2 steps, a checkpoint at each: for tests that only need a real run
    folder (eval's judge, damaged copies in test_errors). Copy it before changing anything in it."""
    run = tmp_path_factory.mktemp("tiny") / "run"
    qtune_warm("train", "model=tiny_qwen3", "data=demo", f"data.path={REPO}/data/demo/captains_log.jsonl",
               f"data.eval_path={REPO}/data/demo/held_out.jsonl", "train.grad_accum=1", "train.max_steps=2",
               "train.save_steps=1", "train.report_to=[]", f"train.output_dir={run}", check=True)
    return run


@pytest.fixture(scope="session")
def tiny_rm_run(tiny_qwen3, tmp_path_factory) -> Path:
    """The tiny Qwen3 trained as a reward model (train.stage=rm) by the real CLI for 2 steps, on a 4-bit base (the
    score head stays 16-bit): for the verbs that must refuse one (chat, serve) or treat it as one. Copy it before
    changing anything in it."""
    run = tmp_path_factory.mktemp("tiny-rm") / "run"
    qtune_warm("train", "model=tiny_qwen3", "quant=nf4", "train.stage=rm",
               f"data.path={REPO}/data/demo/preferences.jsonl", "train.grad_accum=1", "train.max_steps=2",
               "train.save_steps=2", "train.report_to=[]", f"train.output_dir={run}", check=True)
    return run


@pytest.fixture(scope="session")
def smol_merged(smol_run) -> Path:
    """smol_run merged once into <run>/merged, with GGUF f16/q8_0/q4_k_m and the nf4 checkpoint: the export tests and
    eval's merged model share it (transformers' GGUF load-back is the slow part)."""
    qtune_warm("merge", f"run={smol_run}", "merge.gguf=[f16,q8_0,q4_k_m]", "merge.save_4bit=true", check=True,
               timeout=900)
    return smol_run / "merged"


# `make test` runs two pytest-xdist workers with --dist loadgroup: each module's tests on one worker (its module
# fixtures built once), and the modules that use the slowest session fixture (smol_merged: SmolLM2 trained, merged and
# written as GGUF) on the same one, so that it is built once.
SAME_WORKER = {"test_chat_serve": "smol", "test_eval": "smol"}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """`gpu` tests run where CUDA is (a GPU machine: `pytest -m gpu`); elsewhere they are skipped."""
    import torch

    for item in items:
        module = item.path.stem
        item.add_marker(pytest.mark.xdist_group(SAME_WORKER.get(module, module)))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run with -m gpu on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
