"""Atomic writes: a file or folder either appears complete or not at all. And what a data path names: local files, or
a Hub dataset."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_dir(target: Path, replace: bool = False, need: int | None = None, remedy: str | None = None) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it becomes `target`.

    replace=False (caches): an existing target is kept (another process finished first) and the new copy dropped.
    replace=True (outputs rewritten on purpose): the new folder is complete before anything is touched, then the
    old one is renamed aside, the new one renamed in, and only then is the old one removed, so a crash at any
    moment leaves either the old output or the new one in place, never neither.
    The temporary folders carry their process in their name and are locked by it (owned_temp), so what a killed
    process left beside `target` is found and removed here (remove_stale_temps), and a live one's never is.
    A disk that fills up meanwhile is a DiskFull naming `target`, the bytes it needs (`need`, where the caller knows
    them) and those free, and `remedy` (what to do; by default: free space or write elsewhere).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    tmp, lock = owned_temp(target, ".tmp")
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
            old, old_lock = owned_temp(target, ".old")
            try:
                os.replace(target, old / "x")       # aside, on the same file system: a rename, not a copy
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            finally:
                os.close(old_lock)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and out_of_space(e, target.parent):
            kept = f"; the previous {target.name} is kept as it was" if target.exists() else ""
            raise disk_full(f"writing {target}", target.parent, need,
                            f"nothing half-written was left{kept}; {remedy or 'free space or write it elsewhere'}") from None
        raise
    finally:
        os.close(lock)


def _owner() -> str:
    import socket

    return f"{os.getpid()}@{socket.gethostname().replace(os.sep, '_')}"


def owned_temp(target: Path, suffix: str) -> tuple[Path, int]:
    """A new hidden folder beside `target`, `.<name>.<pid>@<host>.<random><suffix>`, and an open descriptor holding an
    exclusive flock on it: the system drops the lock when this process ends, however it ends, which is how
    remove_stale_temps tells a killed process's folder from a live one's (the pid names it; on a file system without
    flock, the pid decides). The caller closes the descriptor when done."""
    import fcntl

    while True:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{_owner()}.", suffix=suffix, dir=target.parent))
        fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # (blocks only while a cleaner that found it first removes it)
        except OSError:
            return tmp, fd
        try:
            if os.stat(tmp).st_ino == os.fstat(fd).st_ino:
                return tmp, fd
        except FileNotFoundError:
            pass
        os.close(fd)  # removed by a cleaner in the instant before the lock: make another


def remove_stale_temps(target: Path) -> tuple[int, int, list[int]]:
    """Remove the temporary folders (owned_temp) beside `target` whose process is gone: a write killed midway (kill
    -9, a crash, the machine stopping) leaves a full-size copy there that nothing else would remove. Returns how many
    were removed, their bytes and their pids. Folders a live process holds are left alone, and so are those whose name
    carries no owner (made before temporaries had one: their owner cannot be told)."""
    import fcntl
    import socket

    target = Path(target)
    prefix = f".{target.name}."
    here = socket.gethostname().replace(os.sep, "_")
    count, freed, pids = 0, 0, []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return 0, 0, []
    for e in sorted(entries, key=lambda e: not e.name.endswith(".old")):  # an old output first (it may go back)
        if not (e.name.startswith(prefix) and e.name.endswith((".tmp", ".old"))):
            continue
        owner = e.name[len(prefix):-4].rsplit(".", 1)[0]
        pid, _, host = owner.partition("@")
        if not (pid.isdigit() and host) or not e.is_dir(follow_symlinks=False):
            continue
        try:
            fd = os.open(e.path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its process is alive
            except OSError:  # no flock here: the pid decides (another host's cannot be told)
                if host != here or pid_alive(int(pid)):
                    continue
            restored = e.name.endswith(".old") and not target.exists() and os.path.isdir(os.path.join(e.path, "x"))
            if restored:  # killed between moving the old output aside and the new one in: the old one goes back
                os.replace(os.path.join(e.path, "x"), target)
            size = tree_bytes(Path(e.path))
            shutil.rmtree(e.path, ignore_errors=True)
            if not os.path.exists(e.path) and not restored:
                count, freed = count + 1, freed + size
                pids.append(int(pid))
        finally:
            os.close(fd)
    return count, freed, pids


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host (this process counts; one of another user's, too)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def tree_bytes(path: Path) -> int:
    """The bytes of the files under `path` (links not followed)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


# How writers say that the disk is full: OSError's errno, safetensors' and Rust's "os error 28", torch.save's failed write
# (which names no cause: it counts as a full disk when the disk is all but full).
_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_WORDS = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")
_FAILED_WRITE_WORDS = ("PytorchStreamWriter failed", "inline_container.cc", "iostream error", "file write failed")
ALL_BUT_FULL = 64 * 2**20


def out_of_space(e: BaseException, folder: Path | None = None) -> bool:
    """Whether `e` (or what caused it) means that the disk holding `folder` filled up (or a quota ran out)."""
    from qtune.errors import exception_chain

    chain = exception_chain(e)
    if any(isinstance(c, OSError) and c.errno in _NO_SPACE_ERRNOS for c in chain):
        return True
    if any(w in str(c) for c in chain for w in _NO_SPACE_WORDS):
        return True
    return (folder is not None and any(w in str(c) for c in chain for w in _FAILED_WRITE_WORDS)
            and free_bytes(folder) < ALL_BUT_FULL)


def free_bytes(folder: Path) -> int:
    """Free bytes on the disk that holds `folder` (or would: its nearest existing parent)."""
    return shutil.disk_usage(_existing(folder)).free


def disk_full(doing: str, folder: Path, need: int | None, then: str):
    """The one line for a disk that filled up while `doing` (e.g. "writing runs/x/merged"), measured now: its free
    bytes, and `need` where it is known; `then` says what was left and what to do."""
    from qtune.errors import DiskFull
    from qtune.text import human_bytes

    needs = f"it needs about {human_bytes(need)}, " if need else ""
    return DiskFull(f"no space left on device {doing}: {needs}{human_bytes(free_bytes(folder))} free in "
                    f"{_existing(folder)}; {then}")


def _existing(folder: Path) -> Path:
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


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
