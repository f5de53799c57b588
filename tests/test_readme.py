"""Every `qtune …` command in the README's bash blocks composes: a documented command that no longer parses, names
an option or key that is gone, or gives a value the schema refuses fails here. Nothing runs (`--cfg` stops after
composing; a sweep is checked job by job), so commands that need files or a GPU are checked too."""
from __future__ import annotations

import re
import shlex

import pytest

from conftest import REPO


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [line.strip() for line in lines if line.strip().startswith("qtune ")]


COMMANDS = readme_commands()


def test_the_readme_documents_every_verb():
    from qtune.cli import app

    verbs = {c.name or c.callback.__name__ for c in app.registered_commands}
    assert {shlex.split(c, comments=True)[1] for c in COMMANDS} == verbs


@pytest.mark.parametrize("command", COMMANDS, ids=[c.split("#")[0].strip() for c in COMMANDS])
def test_readme_command_composes(command):
    from typer.testing import CliRunner

    from qtune.cli import app
    from qtune.config.compose import check_sweep

    args = shlex.split(command, comments=True)[1:]
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
