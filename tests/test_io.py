"""Outputs are replaced atomically and nothing a user owns is deleted (qtune.io, qtune merge)."""
from __future__ import annotations

import os

import pytest

from conftest import qtune


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
    p = qtune("merge", f"run={smol_run}", f"merge.output_dir={mine}")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert f"merge.output_dir={mine} holds files that no qtune merge wrote" in p.stderr
    assert "merge.overwrite=true" in p.stderr
    assert (mine / "thesis.tex").read_text() == "years of work"
    assert os.listdir(mine) == ["thesis.tex"]

    afile = tmp_path / "a-file"
    afile.write_text("x")
    p = qtune("merge", f"run={smol_run}", f"merge.output_dir={afile}")
    assert p.returncode == 2 and "is a file" in p.stderr and afile.read_text() == "x"


@pytest.mark.slow
def test_merge_replaces_its_own_previous_merge_and_overwrite_replaces_a_foreign_one(tmp_path, smol_run):
    out = tmp_path / "merged"
    assert qtune("merge", f"run={smol_run}", f"merge.output_dir={out}").returncode == 0
    (out / "stale.txt").write_text("from an older merge")
    p = qtune("merge", f"run={smol_run}", f"merge.output_dir={out}")  # ours (qtune_merge.json): replaced whole
    assert p.returncode == 0, p.stderr
    assert (out / "qtune_merge.json").is_file() and not (out / "stale.txt").exists()

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    p = qtune("merge", f"run={smol_run}", f"merge.output_dir={foreign}", "merge.overwrite=true")
    assert p.returncode == 0, p.stderr
    assert (foreign / "config.json").is_file() and not (foreign / "notes.txt").exists()
