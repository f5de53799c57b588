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


# ---------------------------------------------------------------- one process trains into a run folder at a time

HOLD = ("import sys, time\nfrom qtune.runs import hold\nwith hold(sys.argv[1]):\n    print('held', flush=True)\n"
        "    time.sleep(600)\n")


def _holder(out, env=None):
    """Another process holding the run folder `out` through qtune's own lock (as `qtune train` does while it trains)."""
    import os
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_run_folder_in_use_is_refused_naming_its_process_then_taken_over_once_it_is_killed(tmp_path):
    import json
    import os
    import signal

    from conftest import REPO, only_line, qtune_warm
    from qtune.errors import InUse
    from qtune.runs import LOCK, hold

    out = tmp_path / "run"
    proc = _holder(out)
    try:
        assert json.loads((out / LOCK).read_text())["pid"] == proc.pid
        with pytest.raises(InUse, match=f"train.output_dir={out} is in use: process {proc.pid} "):
            with hold(out):
                pass
        # the CLI: one line naming the process; train.overwrite=true deletes nothing of the live run's
        (out / "metrics.jsonl").write_text("the live run's\n")
        for extra in ([], ["train.overwrite=true"]):
            p = qtune_warm("train", "model=tiny_qwen3", f"data.path={REPO}/data/demo/captains_log.jsonl",
                           f"train.output_dir={out}", *extra)
            line = only_line(p)
            assert f"error: train.output_dir={out} is in use: process {proc.pid} " in line, line
            assert "choose another train.output_dir" in line
            assert (out / "metrics.jsonl").read_text() == "the live run's\n"
    finally:
        proc.send_signal(signal.SIGKILL)  # the system drops its flock; the file stays, naming it
        proc.wait()
    assert json.loads((out / LOCK).read_text())["pid"] == proc.pid
    warnings = []
    with hold(out, warn=warnings.append):
        assert json.loads((out / LOCK).read_text())["pid"] == os.getpid()
    assert len(warnings) == 1 and f"took over {LOCK} from process {proc.pid} " in warnings[0], warnings
    assert "no longer holds it" in warnings[0]
    assert not (out / LOCK).exists() and (out / "metrics.jsonl").is_file()  # released: the file goes, the run stays


def test_a_lock_file_naming_a_dead_process_is_taken_over_and_a_folder_made_for_nothing_goes(tmp_path):
    import json
    import socket
    import subprocess

    from qtune.runs import LOCK, hold

    gone = subprocess.Popen(["true"])
    gone.wait()
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK).write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname(), "started": "earlier"}))
    warnings = []
    with hold(out, warn=warnings.append):
        pass
    assert len(warnings) == 1 and f"from process {gone.pid} (since earlier)" in warnings[0], warnings
    assert list(out.iterdir()) == []
    fresh = tmp_path / "a" / "b"  # made for the lock alone (a run refused before writing): removed again
    with hold(fresh):
        assert (fresh / LOCK).is_file()
    assert not fresh.exists() and (tmp_path / "a").is_dir()


def test_the_processes_of_a_launched_run_work_under_their_launchers_lock(tmp_path):
    """train.nproc=N: the launcher holds the folder and its processes (QTUNE_RUN_LOCK names it) take no lock; under
    torchrun, rank 0 takes it and the other ranks none."""
    import os
    import signal

    from qtune.errors import InUse
    from qtune.runs import _HELD, hold

    out = tmp_path / "run"
    with hold(out):
        assert os.environ[_HELD] == str(out)
        rank0 = _holder(out, env={"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "2"})  # inherits QTUNE_RUN_LOCK
        rank0.send_signal(signal.SIGKILL)
        rank0.wait()
    assert _HELD not in os.environ
    rank1 = _holder(out, env={"LOCAL_RANK": "1", "RANK": "1", "WORLD_SIZE": "2"})
    try:
        with hold(out):  # rank 1 took none
            pass
    finally:
        rank1.send_signal(signal.SIGKILL)
        rank1.wait()
    torchrun0 = _holder(out, env={"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "2"})
    try:
        with pytest.raises(InUse, match=f"process {torchrun0.pid} "):
            with hold(out):
                pass
    finally:
        torchrun0.send_signal(signal.SIGKILL)
        torchrun0.wait()
