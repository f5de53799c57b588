"""The command surface: verbs, help, light start-up, and a wheel that carries its config."""
from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from conftest import REPO, qtune

VERBS = ["download", "prepare", "inspect-moe", "train", "merge", "chat", "serve", "eval", "push"]


def test_the_cli_has_exactly_its_verbs_each_calling_its_module():
    """The registered commands are the verbs (no more, none missing), `--help` lists them, and each command
    calls its own module's run (qtune inspect-moe -> qtune.commands.inspect_moe.run)."""
    import inspect

    from qtune.cli import app

    names = {c.name or c.callback.__name__ for c in app.registered_commands}
    assert names == set(VERBS), names
    out = qtune("--help", check=True).stdout
    assert all(verb in out for verb in VERBS)
    for c in app.registered_commands:
        module = (c.name or c.callback.__name__).replace("-", "_")
        assert f"from qtune.commands.{module} import run" in inspect.getsource(c.callback), module


@pytest.mark.parametrize("verb", VERBS)
def test_verb_help_has_examples(verb):
    out = qtune(verb, "--help", check=True).stdout
    assert "Examples" in out and "--cfg" in out


def test_help_does_not_import_heavy_modules():
    code = ("import sys; from typer.testing import CliRunner; from qtune.cli import app; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0; "
            "heavy = [m for m in ('torch', 'transformers', 'hydra', 'peft', 'datasets') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_a_bad_setting_is_refused_before_heavy_modules_load():
    """A wrong value fails at compose time, in about a second: test_errors' rows run in a process that has these
    modules already (conftest's qtune_warm), so this fresh one is where their absence is seen."""
    code = ("import atexit, sys; atexit.register(lambda: print(sorted(m for m in ('torch', 'transformers', 'peft', "
            "'datasets') if m in sys.modules), file=sys.stderr)); sys.argv = ['qtune', 'train', 'train.lr=-1']; "
            "from qtune.cli import main; main()")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.splitlines() == ["error: train.lr=-1: valid: > 0", "[]"], p.stderr


def test_wheel_ships_config_and_runs_outside_the_repo(tmp_path):
    """Build the wheel, install it (without deps) into a fresh venv that borrows this env's
    dependencies, and compose a config from a folder with no checkout."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(REPO)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("qtune-*.whl"))
    env_dir = tmp_path / "fresh"
    venv.create(env_dir, with_pip=False)
    site = next(env_dir.glob("lib/python*/site-packages"))
    deps = next(p for p in sys.path if p.endswith("site-packages") and Path(p, "omegaconf").is_dir())
    (site / "borrowed_deps.pth").write_text(deps + "\n")  # a path line: the editable install there is not read
    py = env_dir / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([str(py), "-m", "qtune", "train", "--cfg", "model=qwen3_8b", "quant=nf4"], cwd=outside,
                       capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    assert "repo_id: Qwen/Qwen3-8B" in p.stdout
    where = subprocess.run([str(py), "-c", "import qtune.config as c; print(c.CONF_DIR)"], cwd=outside,
                           capture_output=True, text=True, env=env).stdout.strip()
    assert where.startswith(str(site)), where
    # data=demo and eval=demo name the demo files the wheel carries
    p = subprocess.run([str(py), "-m", "qtune", "eval", "--cfg", "data=demo", "eval=demo"], cwd=outside,
                       capture_output=True, text=True, env=env)
    paths = [line.split(": ", 1)[1] for line in p.stdout.splitlines()
             if line.strip().startswith(("path:", "eval_path:", "prompts:")) and ": " in line]
    assert len(paths) == 3 and all(x.startswith(str(site)) and Path(x).is_file() for x in paths), p.stdout + p.stderr


VERBS = ("download", "prepare", "inspect-moe", "train", "merge", "chat", "serve", "eval", "push")


@pytest.mark.parametrize("verb", VERBS)
def test_an_experiment_file_is_what_cfg_printed(verb, tmp_path):
    """`qtune <verb> --cfg ... > exp.yaml` then `qtune <verb> exp.yaml` is the same resolved config, and overrides after
    the file win over it (a derived value such as the run folder follows them)."""
    settings = ["model=qwen3_8b", "quant=nf4", "lora=r32", "data.path=/data/chats.jsonl", "train.lr=1e-4",
                "chat.temperature=0.2", "serve.adapters={b: /adapters/b}", "merge.gguf=[f16]"]
    printed = qtune(verb, "--cfg", *settings, cwd=tmp_path, check=True).stdout
    (tmp_path / "exp.yaml").write_text(printed)
    assert qtune(verb, "--cfg", "exp.yaml", cwd=tmp_path, check=True).stdout == printed
    if verb == "train":
        again = qtune(verb, "--cfg", "exp.yaml", "lora=r64", "train.lr=3e-4", cwd=tmp_path, check=True).stdout
        assert "  lr: 0.0003\n" in again and "run_name: qwen3_8b-chats-nf4-r64\n" in again and "  r: 64\n" in again


def test_an_experiment_file_with_defaults_and_a_few_keys(tmp_path):
    (tmp_path / "exp.yaml").write_text("defaults:\n  - model: qwen3_8b\n  - quant: nf4\ntrain:\n  lr: 5.0e-5\n"
                                       "data:\n  path: chats.jsonl\n")
    out = qtune("train", "--cfg", "exp.yaml", cwd=tmp_path, check=True).stdout
    assert "run_name: qwen3_8b-chats-nf4-r16\n" in out and "  lr: 5.0e-05\n" in out and "  method: nf4\n" in out


@pytest.mark.parametrize("content,words", [
    ("train:\n  lerning_rate: 1e-4\n", "exp.yaml: train.lerning_rate: unknown key in 'train'; did you mean train.lr"),
    ("trian:\n  lr: 1e-4\n", "exp.yaml: trian: unknown key in the top level"),
    ("defaults:\n  - model: qwen9\n", "exp.yaml: defaults: model: qwen9: no such option; valid: qwen3_0_6b"),
    ("train: [1, 2\n", "exp.yaml:2:1: not valid YAML"),
])
def test_a_wrong_key_in_an_experiment_file_is_one_line_naming_the_file(tmp_path, content, words):
    from conftest import only_line

    (tmp_path / "exp.yaml").write_text(content)
    assert words in only_line(qtune("train", "exp.yaml", cwd=tmp_path))
