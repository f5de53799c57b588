"""What an existing train.output_dir means: a run killed before its first checkpoint starts again with the same
command; anything not started by qtune is refused, never deleted."""
from __future__ import annotations

import pytest


def _cfg(out):
    from qtune.config import compose, to_object

    return to_object(compose(["model=tiny_qwen3", f"train.output_dir={out}"]))


def test_a_run_stopped_before_its_first_checkpoint_starts_afresh(tmp_path):
    from qtune.runs import resume_point, write_config

    out = tmp_path / "run"
    (out / "checkpoints" / "checkpoint-2").mkdir(parents=True)       # half-written: no trainer_state.json
    (out / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors").write_bytes(b"\0" * 10)
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    cfg = _cfg(out)
    write_config(out, cfg)
    assert resume_point(out, cfg) is None
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
    assert (out / "config.yaml").is_file()


def test_a_folder_with_files_of_yours_is_refused_and_kept(tmp_path):
    from qtune.errors import ConfigError
    from qtune.runs import resume_point, write_config

    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    cfg = _cfg(out)
    write_config(out, cfg)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="exists and is not a qtune run folder"):
        resume_point(out, cfg)
    assert (out / "notes.txt").read_text() == "mine" and (out / "checkpoints").is_dir()
