"""Is a file that qtune wrote whole? Header checks that take milliseconds and run before any model loads, so a
truncated or corrupt adapter, checkpoint or merged model is one line naming the file and what to do, instead of a
loader's traceback (safetensors' "incomplete metadata", torch's "failed finding central directory", a JSON error).
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Callable

from qtune.errors import DamagedFile

WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def problem(path: Path) -> str | None:
    """What is wrong with one file, or None. Knows safetensors, JSON and torch.save archives (.pt, .pth, .bin)."""
    if not path.is_file():
        return "missing"
    suffix = path.suffix
    if suffix == ".safetensors":
        return _safetensors(path)
    if suffix == ".json":
        try:
            json.loads(path.read_bytes())
        except (ValueError, UnicodeDecodeError) as e:
            return f"not valid JSON: {str(e).splitlines()[0]}"
    if suffix in (".pt", ".pth", ".bin") and not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        return f"truncated or not a torch archive: {path.stat().st_size:,} bytes, no zip directory at its end"
    return None


def _safetensors(path: Path) -> str | None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size < 8:
            return f"truncated: {size} bytes, less than a safetensors header"
        n = int.from_bytes(f.read(8), "little")
        if 8 + n > size:
            return f"truncated: {size:,} bytes, its header alone announces {8 + n:,}"
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            return "its header is not valid JSON"
    ends = [v["data_offsets"][1] for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and len(v.get("data_offsets", ())) == 2]
    need = 8 + n + max(ends, default=0)
    return f"truncated: {size:,} of {need:,} bytes" if need > size else None


def check(files: list[Path], remedy: str | Callable[[], str]) -> None:
    """DamagedFile for the first file with a problem; remedy (a function: worked out only then) says what to do."""
    for f in files:
        why = problem(f)
        if why:
            raise DamagedFile(f"{f} is damaged ({why}); {remedy() if callable(remedy) else remedy}")


def check_adapter(folder: Path, remedy: str | Callable[[], str]) -> None:
    """adapter_config.json readable and the adapter's weights whole."""
    weights = next((folder / w for w in WEIGHTS if (folder / w).exists()), folder / WEIGHTS[0])
    check([folder / "adapter_config.json", weights], remedy)


def check_model(folder: Path, remedy: str | Callable[[], str]) -> None:
    """A saved model folder: config.json, weights (every shard its index lists), the index and every safetensors shard
    whole."""
    why = model_problem(folder)
    if why:
        raise DamagedFile(f"{why}; {remedy() if callable(remedy) else remedy}")


def model_problem(folder: Path) -> str | None:
    """What is wrong with a model folder, as the start of a line: "<folder> is incomplete (...)" or "<file> is damaged
    (...)"; None when it is whole."""
    why = missing(folder)
    if why:
        return f"{folder} is incomplete ({why})"
    for f in [folder / "config.json", *sorted(folder.glob("*.safetensors.index.json")), *sorted(folder.glob("*.safetensors"))]:
        why = problem(f)
        if why:
            return f"{f} is damaged ({why})"
    return None


def missing(folder: Path) -> str | None:
    """What a model folder lacks to load, or None: config.json, or its weights (a weights file, or a shard that its
    index lists)."""
    if not (folder / "config.json").is_file():
        return "config.json is missing"
    for index in sorted(folder.glob("*.index.json")):  # model.safetensors.index.json, pytorch_model.bin.index.json
        try:
            shards = set(json.loads(index.read_bytes())["weight_map"].values())
        except (OSError, ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            return None  # damaged, not missing: check() names it
        lost = sorted(s for s in shards if not (folder / s).is_file())
        if lost:
            return f"{lost[0]} is missing, {len(lost)} of the {len(shards)} shards {index.name} lists"
        return None
    if any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin")):
        return None
    return "no weights: model.safetensors is missing"


def check_checkpoint(folder: Path, remedy: str) -> None:
    """A trainer checkpoint: every JSON, safetensors and torch file in it (adapter, optimizer, scheduler, RNG)."""
    check([p for p in sorted(folder.iterdir()) if p.suffix in (".json", ".safetensors", ".pt", ".pth", ".bin")], remedy)


# ---------------------------------------------------------------- folders with a manifest (the prepared-data cache)

MANIFEST = "manifest.json"


def _digest(path: Path) -> str:
    """xxh3-128 of a file: 4-5 GB/s on one core, four times sha256 here (the manifest guards against bit-rot and
    truncation, not an attacker, who could rewrite the manifest too). datasets depends on xxhash."""
    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    """Every file under folder with its size and checksum, in folder/manifest.json (written atomically; write it last,
    inside the atomic folder, so that both appear together)."""
    from qtune.io import atomic_write_json

    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    atomic_write_json(folder / MANIFEST, {"algorithm": "xxh3_128", "files": {
        p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "xxh3_128": _digest(p)} for p in files}})


def manifest_problem(folder: Path) -> str | None:
    """What is wrong with a folder that write_manifest described, or None: each file it lists present, of its size
    and checksum (files added later, such as a config beside the data, are not checked)."""
    try:
        listed = json.loads((folder / MANIFEST).read_bytes())["files"]
        entries = [(name, int(e["bytes"]), str(e["xxh3_128"])) for name, e in listed.items()]
    except FileNotFoundError:
        return f"no {MANIFEST}"
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        return f"{MANIFEST} is not valid"
    for name, size, _ in entries:  # sizes first: a cut file costs no reading
        p = folder / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != size:
            return f"{name} has {p.stat().st_size:,} of its {size:,} bytes"
    for name, _, digest in entries:
        if _digest(folder / name) != digest:
            return f"{name} differs from its checksum"
    return None
