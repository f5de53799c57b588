"""The README and docs/config.md stay true to the code.

- Every `qtune …` command in the README's bash blocks composes: a documented command that no longer parses, names an
  option or key that is gone, or gives a value the schema refuses fails here (`--cfg` stops after composing; a sweep
  is checked job by job), so commands that need a GPU, the network or big weights are checked too.
- The cheap ones run as written: `inspect-moe` and `train --dry-run` (config alone, no weights).
- The quickstart runs as written, from a folder holding the chats.jsonl its own block writes, on the tiny Qwen3
  instead of the model it names (the hub is out of reach in tests) and with `--prompt` for the interactive chat.
- Every config key the README names exists in the schema.
- docs/config.md is what qtune.config.reference generates from the schema.
"""
from __future__ import annotations

import re
import shlex

import pytest

from conftest import REPO, qtune_warm

README = (REPO / "README.md").read_text()


def readme_commands() -> list[str]:
    lines = "\n".join(_blocks("bash")).replace("\\\n", " ").splitlines()
    return [line.strip() for line in lines if line.strip().startswith("qtune ")]


def _blocks(language: str) -> list[str]:
    """The README's fenced blocks of one language ("" for plain ones), read fence by fence."""
    out, lang, body = [], None, []
    for line in README.splitlines():
        if line.startswith("```"):
            if lang is None:
                lang, body = line[3:].strip(), []
            else:
                if lang == language:
                    out.append("\n".join(body))
                lang = None
        elif lang is not None:
            body.append(line)
    return out


def shown_commands() -> list[tuple[str, list[str]]]:
    """`$ qtune …` lines in the README's plain blocks (shown with their output), each with the line that follows it."""
    out = []
    for block in _blocks(""):
        lines = block.splitlines()
        for i, line in enumerate(lines):
            if line.startswith("$ qtune "):
                following = [x for x in lines[i + 1:] if x.strip()]
                out.append((line[2:], following[:1]))
    return out


SHOWN = shown_commands()
COMMANDS = readme_commands() + [c for c, after in SHOWN if not after[0].startswith("error:")]
ERRORS = [(c, after[0]) for c, after in SHOWN if after[0].startswith("error:")]


def _args(command: str) -> list[str]:
    return shlex.split(command, comments=True)[1:]


def _runs_cheaply(command: str) -> bool:
    """Commands that need no weights and no network: they run in this test, not only compose."""
    args = _args(command)
    return args[0] == "inspect-moe" or (args[0] == "train" and "--dry-run" in args and "-m" not in args)


def test_the_readme_documents_every_verb():
    from qtune.cli import app

    verbs = {c.name or c.callback.__name__ for c in app.registered_commands}
    assert {_args(c)[0] for c in COMMANDS} == verbs


@pytest.mark.parametrize("command", COMMANDS, ids=[c.split("#")[0].strip() for c in COMMANDS])
def test_readme_command_composes(command):
    from typer.testing import CliRunner

    from qtune.cli import app
    from qtune.config.compose import check_sweep

    args = _args(command)
    args = [re.sub(r"<[a-z_]+>", "x", a) for a in args]   # placeholders such as model.revision=<sha>
    if "-m" in args or "--multirun" in args:                # a sweep: every option and plain value, as `-m` checks them
        import importlib.util

        from qtune.config.compose import LAUNCHER_PACKAGES

        for a in args:  # a launcher from an optional package (qtune[slurm]) is checked where it is installed
            module = LAUNCHER_PACKAGES.get(a.removeprefix("hydra/launcher="), (None,))[0]
            if a.startswith("hydra/launcher=") and module and importlib.util.find_spec(module) is None:
                pytest.skip(f"{a} needs a plugin that is not installed here")
        check_sweep([a for a in args[1:] if not a.startswith("-")])
        return
    result = CliRunner().invoke(app, [*args, "--cfg"])
    assert result.exit_code == 0 and result.exception is None, f"{command}\n{result.output}{result.exception!r}"
    assert "model:" in result.output


@pytest.mark.parametrize("command,line", ERRORS, ids=[c for c, _ in ERRORS])
def test_the_readme_shows_errors_as_qtune_prints_them(command, line):
    from conftest import only_line

    p = qtune_warm(*_args(command))
    assert p.returncode != 0 and only_line(p) == line


def test_the_readme_shows_commands_with_their_output():
    assert len(ERRORS) >= 1 and any("--prompt" in c for c, _ in SHOWN)


CHEAP = [c for c in COMMANDS if _runs_cheaply(c)]


def test_some_readme_commands_run_here():
    assert len(CHEAP) >= 4, CHEAP  # the dry runs and inspect-moe examples did not vanish from the README


@pytest.mark.parametrize("command", CHEAP, ids=[c.split("#")[0].strip() for c in CHEAP])
def test_readme_command_runs(command, tmp_path):
    p = qtune_warm(*_args(command), cwd=tmp_path, timeout=120)
    assert p.returncode == 0, f"{command}\n{p.stdout[-2000:]}{p.stderr[-2000:]}"
    assert p.stdout.strip()


def _quickstart() -> tuple[str, list[str]]:
    """The quickstart's bash block: the chats.jsonl it writes and its qtune commands."""
    section = README.split("## Quickstart on your own data", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    chats = re.search(r"cat > chats\.jsonl <<'EOF'\n(.*?\n)EOF\n", block, flags=re.S).group(1)
    return chats, [line.strip() for line in block.splitlines() if line.strip().startswith("qtune ")]


def test_the_quickstart_runs_as_written(tiny_qwen3, tmp_path):
    import json

    chats, commands = _quickstart()
    (tmp_path / "chats.jsonl").write_text(chats)
    assert all(json.loads(line)["messages"] for line in chats.splitlines())
    assert [_args(c)[0] for c in commands] == ["prepare", "train", "chat", "merge", "eval"]
    for command in commands:
        args = [re.sub(r"^model=qwen3_\w+$", "model=tiny_qwen3", a) for a in _args(command)]
        if args[0] == "chat":  # the REPL, answered once
            args += ["--prompt", "Who are you?", "chat.max_new_tokens=4"]
        if args[0] == "eval":
            args += ["eval.max_new_tokens=4"]
        p = qtune_warm(*args, cwd=tmp_path, timeout=300)
        assert p.returncode == 0, f"{command}\n{p.stdout[-2000:]}{p.stderr[-2000:]}"
    run = tmp_path / "runs" / "ada"   # the folder the README's commands name
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert (run / "merged" / "config.json").is_file()
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert set(summary["models"]) == {"base", "adapter", "merged"}  # as the README's eval line says


GROUPS = ("model", "download", "quant", "lora", "moe", "data", "train", "chat", "serve", "merge", "eval")


def test_every_config_key_the_readme_names_exists():
    from omegaconf import OmegaConf

    from qtune.config import compose

    cfg = compose(["model=tiny_qwen3_moe"])
    prose = re.sub(r"```python\n.*?```", "", README, flags=re.S)   # client code (chat.completions.create) is no key
    keys = set(re.findall(rf"\b((?:{'|'.join(GROUPS)})\.[a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*)", prose))
    keys = {k for k in keys if not k.startswith("model.safetensors")}  # a file name, not a key
    missing = sorted(k for k in keys if OmegaConf.select(cfg, k, default="__missing__") == "__missing__")
    assert not missing, f"README names keys the schema does not have: {missing}"
    assert "train.stage" in keys and "merge.gguf" in keys


def test_config_reference_is_generated_from_the_schema():
    """docs/config.md is `python -m qtune.config.reference`'s output; run that after changing the schema."""
    from dataclasses import fields

    from qtune.config import schema
    from qtune.config.reference import reference_markdown

    text = reference_markdown()
    assert (REPO / "docs" / "config.md").read_text() == text, "docs/config.md is stale: python -m qtune.config.reference"
    for section in ("train", "merge", "data"):   # every key of a section, with its default and comment
        for f in fields(getattr(schema, section.capitalize() + "Config")):
            assert f"`{section}.{f.name}`" in text
    assert "| `merge.gguf` | list of str | `[]` | f16, q8_0, q4_k_m, q5_k_m, q6_k |" in text
    assert "| `data.on_error` | raise \\| skip | `raise` |" in text
    assert "| `run_name` | str |" in text
    assert "`train.dpo.beta`" in text and "`data.sources[].weight`" in text


def test_the_readme_links_its_docs():
    for target in ("docs/config.md", "docs/benchmarks.md"):
        assert f"]({target})" in README and (REPO / target).is_file()


def test_the_demo_questions_check_facts():
    """The demo's evaluation (README, "The demo") checks a fact per question, and each reference states its fact."""
    import json

    from qtune.evaluation.metrics import facts_score

    rows = [json.loads(x) for x in (REPO / "data" / "demo" / "eval_prompts.jsonl").read_text().splitlines()]
    assert rows and all(r["facts"] and facts_score(r["reference"], r["facts"]) == 1.0 for r in rows)
    assert "facts right" in README
