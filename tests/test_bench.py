"""The benchmarks in bench/ run on a GPU machine, never in CI; so that one cannot rot unseen, CI checks what it can
of each on a CPU: every script imports, every qtune name it takes (at the top or inside a function) exists, no name
is undefined (pyflakes), and the parts that run without a GPU run: the model builders on the tiny models (one training
step through them), the data writers, and each script's own `--check`."""
from __future__ import annotations

import ast
import importlib
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

BENCH = REPO / "bench"
# sitecustomize.py files patch a process at its start (bench/trace, bench/fsdp_cpu_emulation): read, never imported
SCRIPTS = sorted(p for p in BENCH.rglob("*.py") if "results" not in p.parts and "__pycache__" not in p.parts)
IMPORTABLE = [p for p in SCRIPTS if p.name != "sitecustomize.py"]


@pytest.fixture(autouse=True)
def bench_path(monkeypatch):
    for folder in (BENCH, BENCH / "seed"):
        monkeypatch.syspath_prepend(str(folder))


def _module(path: Path):
    spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", IMPORTABLE, ids=lambda p: str(p.relative_to(BENCH)))
def test_every_bench_script_imports(path):
    _module(path)


def _qtune_names(path: Path):
    """(module, name or None, line) for every qtune import in the file, inside functions too."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "qtune":
            for alias in node.names:
                yield node.module, alias.name, node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "qtune":
                    yield alias.name, None, node.lineno


def test_every_qtune_name_a_bench_script_takes_exists():
    missing = []
    for path in SCRIPTS:
        for module, name, line in _qtune_names(path):
            where = f"{path.relative_to(REPO)}:{line}"
            try:
                mod = importlib.import_module(module)
            except ImportError as e:
                missing.append(f"{where}: {module} ({e})")
                continue
            if name is not None and not hasattr(mod, name) and importlib.util.find_spec(f"{module}.{name}") is None:
                missing.append(f"{where}: {module}.{name}")
    assert not missing, "\n".join(missing)


def test_no_bench_script_uses_an_undefined_name():
    from pyflakes import api, reporter

    class Collect(reporter.Reporter):
        def __init__(self):
            self.found = []

        def flake(self, message):
            if type(message).__name__ in ("UndefinedName", "UndefinedLocal", "UndefinedExport"):
                self.found.append(str(message))

        def unexpectedError(self, filename, msg):
            self.found.append(f"{filename}: {msg}")

        def syntaxError(self, filename, msg, lineno, offset, text):
            self.found.append(f"{filename}:{lineno}: {msg}")

    collect = Collect()
    for path in SCRIPTS:
        api.checkPath(str(path), collect)
    assert not collect.found, "\n".join(collect.found)


def _one_step(model, seq: int = 32) -> float:
    from common import fused_head_step

    loss = fused_head_step(model, seq)()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    return float(loss.detach())


@pytest.mark.parametrize("variant", ["ref", "fast", "fast_linear"])
def test_profile_train_builds_its_variants_as_train_does(tiny_qwen3, variant):
    """bench/profile_train.py's models come from qtune.modeling.builder; on a CPU the tiny Qwen3 takes one step."""
    import profile_train

    model, fast = profile_train.build("none", variant, 32, model="tiny_qwen3", folder=tiny_qwen3, device="cpu")
    assert fast.on == (variant != "ref")
    assert math.isfinite(_one_step(model))


def test_profile_moe_builds_the_moe_model_as_train_does(tiny_qwen3_moe):
    import profile_moe

    model, fast = profile_moe.build(str(tiny_qwen3_moe), "fast", 32, model="tiny_qwen3_moe", device="cpu")
    assert fast.on and any("grouped-matmul experts" in p for p in fast.pieces)
    assert math.isfinite(_one_step(model))


def test_prepare_alpaca_runs_on_a_few_rows(tmp_path, qtune_home, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    p = subprocess.run([sys.executable, str(BENCH / "prepare_alpaca.py"), "300"], capture_output=True, text=True,
                       timeout=300, env={**__import__("os").environ, "QTUNE_HOME": str(qtune_home), "OUT": str(tmp_path)})
    assert p.returncode == 0, p.stderr[-2000:]


def test_serve_bench_check(tiny_qwen3):
    """The serving benchmark's served-row path (warm-up, medians, second bursts, a prelude) and its step profile,
    against a real qtune serve and a Scheduler on the CPU."""
    p = subprocess.run([sys.executable, str(BENCH / "serve_gpu.py"), "--check"], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:] + p.stdout[-2000:]


def test_grpo_bench_check(tiny_qwen3, qtune_home, tmp_path):
    """Both rollout engines through the real CLI on the CPU, as the GRPO benchmark runs them on a GPU."""
    import os

    p = subprocess.run([sys.executable, str(BENCH / "train_grpo_gpu.py"), "--check"], capture_output=True, text=True,
                       timeout=600, env={**os.environ, "QTUNE_HOME": str(qtune_home), "OUT": str(tmp_path)})
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert "check: rollouts" in p.stdout, p.stdout[-2000:]


def test_full_bench_plain_side_trains_what_it_names(tiny_qwen3, tmp_path):
    """bench/train_full_gpu.py's plain transformers Trainer: every weight, or the last N layers only."""
    import train_full_gpu

    full = train_full_gpu.plain(tiny_qwen3, seq=16, steps=2, optim="adamw_torch", device="cpu", out=tmp_path / "a")
    last = train_full_gpu.plain(tiny_qwen3, seq=16, steps=2, trainable_layers=1, optim="adamw_torch", device="cpu",
                                out=tmp_path / "b")
    assert len(full["losses"]) == 2 and all(math.isfinite(x) for x in full["losses"] + last["losses"])
    assert full["trainable"] == 9_798_016 and 0 < last["trainable"] < 40_000



def test_vllm_handoff_help():
    """bench/vllm_handoff.py needs a vLLM to run (test_serve_vllm runs it where QTUNE_VLLM names one); its --help runs
    anywhere."""
    p = subprocess.run([sys.executable, str(BENCH / "vllm_handoff.py"), "--help"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and "--vllm" in p.stdout and "--runs" in p.stdout, p.stderr[-2000:]
