"""Atomic writes: a file or folder either appears complete or not at all. And what a data path names: local files, or
a Hub dataset."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_dir(target: Path, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it becomes `target`.

    replace=False (caches): an existing target is kept (another process finished first) and the new copy dropped.
    replace=True (outputs rewritten on purpose): the new folder is complete before anything is touched, then the
    old one is renamed aside, the new one renamed in, and only then is the old one removed, so a crash at any
    moment leaves either the old output or the new one in place, never neither.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        tmp.chmod(0o755)
        if not target.exists():
            try:
                os.replace(tmp, target)
            except OSError:  # another process (a parallel sweep's job) made the same cache in between
                if replace or not target.exists():
                    raise
                shutil.rmtree(tmp)
        elif not replace:
            shutil.rmtree(tmp)
        else:
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old / "x")       # aside, on the same file system: a rename, not a copy
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_writable(path: Path, key: str, beside: bool = False) -> None:
    """One ConfigError line, before any work, when the folder `path` cannot be written: it is a file, it would be
    created under a file, or it (or the folder it would be created in) is read-only. beside=True: the new output is
    made next to the old one and renamed over it (atomic_dir(replace=True)), so the folder holding it must be
    writable too."""
    from qtune.errors import ConfigError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}={path} is a file; name a folder (it is created if missing)")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key}={path}: {existing} is a file, so no folder can be made under it; choose another {key}")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "is read-only" if existing == path else f"cannot be created: {existing} is read-only"
        raise ConfigError(f"{key}={path} {where}; choose another {key} or make it writable")
    if beside and existing == path and not os.access(path.parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={path} cannot be replaced: {path.parent} is read-only (the new folder is made "
                          f"beside the old one); choose another {key} or make it writable")


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


# The data files qtune reads (qtune.data.formats)
EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet", ".tsv")


def is_hub_dataset(path: str) -> bool:
    """Whether a data path (data.path, a source's path) names a Hub dataset (`org/name`, `hf://...`), not local files."""
    return path.startswith("hf://") or (not Path(path).expanduser().exists() and path.count("/") == 1
                                         and not any(c in path for c in "*?[") and Path(path).suffix not in EXTENSIONS)
