"""Outputs are replaced atomically and nothing a user owns is deleted (qtune.io, qtune merge)."""
from __future__ import annotations

import os

import pytest

from conftest import qtune_warm


def test_atomic_dir_replace_swaps_in_the_new_folder_whole(tmp_path):
    from qtune.io import atomic_dir

    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_dir(target, replace=True) as tmp:
        (tmp / "new.txt").write_text("new")
        assert (target / "old.txt").is_file()          # untouched until the new folder is complete
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no leftovers beside it


def test_atomic_dir_keeps_the_old_output_when_writing_fails(tmp_path):
    from qtune.io import atomic_dir

    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target, replace=True) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("crash while writing")
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_dir_without_replace_keeps_what_exists(tmp_path):
    from qtune.io import atomic_dir

    target = tmp_path / "cache"
    target.mkdir()
    (target / "first.txt").write_text("first")
    with atomic_dir(target) as tmp:
        (tmp / "second.txt").write_text("second")
    assert [p.name for p in target.iterdir()] == ["first.txt"]


@pytest.mark.slow
def test_merge_into_a_foreign_folder_is_refused_and_deletes_nothing(tmp_path, smol_run):
    mine = tmp_path / "my-models"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    p = qtune_warm("merge", f"run={smol_run}", f"merge.output_dir={mine}")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert f"merge.output_dir={mine} holds files that no qtune merge wrote" in p.stderr
    assert "merge.overwrite=true" in p.stderr
    assert (mine / "thesis.tex").read_text() == "years of work"
    assert os.listdir(mine) == ["thesis.tex"]

    afile = tmp_path / "a-file"
    afile.write_text("x")
    p = qtune_warm("merge", f"run={smol_run}", f"merge.output_dir={afile}")
    assert p.returncode == 2 and "is a file" in p.stderr and afile.read_text() == "x"


@pytest.mark.slow
def test_merge_replaces_its_own_previous_merge_and_overwrite_replaces_a_foreign_one(tmp_path, smol_run):
    out = tmp_path / "merged"
    assert qtune_warm("merge", f"run={smol_run}", f"merge.output_dir={out}").returncode == 0
    (out / "stale.txt").write_text("from an older merge")
    p = qtune_warm("merge", f"run={smol_run}", f"merge.output_dir={out}")  # ours (qtune_merge.json): replaced whole
    assert p.returncode == 0, p.stderr
    assert (out / "qtune_merge.json").is_file() and not (out / "stale.txt").exists()

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    p = qtune_warm("merge", f"run={smol_run}", f"merge.output_dir={foreign}", "merge.overwrite=true")
    assert p.returncode == 0, p.stderr
    assert (foreign / "config.json").is_file() and not (foreign / "notes.txt").exists()


# ---------------------------------------------------------------- what a killed write leaves beside its target

WRITER = ("import sys, time\nfrom pathlib import Path\nfrom qtune.io import atomic_dir\n"
          "with atomic_dir(Path(sys.argv[1]), replace=True) as tmp:\n"
          "    (tmp / 'model.safetensors').write_bytes(bytes(int(sys.argv[2])))\n"
          "    print(tmp, flush=True)\n    time.sleep(600)\n")


def _writer(target, size: int):
    """A process midway through writing `target` as qtune does (atomic_dir: `qtune merge`, a run's adapter, caches);
    returns it and its temporary folder."""
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target), str(size)], stdout=subprocess.PIPE, text=True)
    return proc, Path(proc.stdout.readline().strip())


def _kill(proc) -> None:
    import signal

    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_temporaries_of_killed_writes_are_removed_and_a_live_ones_kept(tmp_path):
    import socket

    from qtune.io import atomic_dir, remove_stale_temps

    target = tmp_path / "merged"
    killed, left = _writer(target, 3 << 20)
    live, writing = _writer(target, 1 << 20)              # (its own start leaves the other's, alive then, alone)
    _kill(killed)                                          # kill -9 midway: its full-size copy stays behind
    try:
        assert left.is_dir() and left.name.startswith(f".merged.{killed.pid}@") and writing.is_dir()
        legacy = tmp_path / ".merged.k2j4x_9a.tmp"         # no owner in its name: it cannot be told, so it stays
        legacy.mkdir()
        other = tmp_path / ".merged-nf4.1@elsewhere.abc.tmp"  # another target's
        other.mkdir()
        assert remove_stale_temps(target) == (1, 3 << 20, [killed.pid])
        assert not left.exists() and writing.is_dir() and legacy.is_dir() and other.is_dir()
        with atomic_dir(target, replace=True) as tmp:      # this process's own write is untouched by the cleaning
            (tmp / "a").write_text("a")
        assert (target / "a").is_file() and writing.is_dir()
    finally:
        _kill(live)
    # killed between moving the old output aside and the new one in: the old output comes back, not away
    target.rename(tmp_path / "elsewhere")
    old = tmp_path / f".merged.999999@{socket.gethostname()}.x1.old"
    (old / "x").mkdir(parents=True)
    (old / "x" / "config.json").write_text("{}")
    count, freed, pids = remove_stale_temps(target)
    assert (target / "config.json").is_file() and not old.exists() and not writing.exists()
    assert (count, pids) == (1, [live.pid]) and freed == 1 << 20


@pytest.mark.slow
def test_merge_removes_what_killed_merges_left_and_says_how_much(tmp_path, tiny_run):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    killed, left = _writer(run / "merged", 5 << 20)
    _kill(killed)
    live, writing = _writer(run / "merged-nf4", 1 << 20)  # a live process's (another merge's 4-bit copy): kept
    try:
        p = qtune_warm("merge", f"run={run}")
        assert p.returncode == 0, p.stderr
        lines = [x for x in p.stderr.splitlines() if "unfinished merge" in x]
        assert lines == [f"warning: removed 1 unfinished merge beside {run / 'merged'} that process {killed.pid} left "
                         "when it was stopped: 5.0 MiB freed"], p.stderr
        assert not left.exists() and writing.is_dir() and (run / "merged" / "qtune_merge.json").is_file()
        assert sorted(p.name for p in run.iterdir() if p.name.startswith(".merged")) == [writing.name]
    finally:
        _kill(live)
    p = qtune_warm("merge", f"run={run}")                     # its process gone, the next merge removes it too
    assert p.returncode == 0 and f"process {live.pid} left" in p.stderr and "1.0 MiB freed" in p.stderr, p.stderr
    assert not [p for p in run.iterdir() if p.name.startswith(".merged")]
