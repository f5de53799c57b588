"""Run folders: every verb that writes output leaves the resolved config beside it."""
from __future__ import annotations

from dataclasses import asdict
from enum import Enum
from pathlib import Path

from qtune.config.schema import Config
from qtune.io import atomic_write_text


def write_config(folder: Path, cfg: Config) -> Path:
    """Save the fully resolved config as `config.yaml` in folder (atomically)."""
    import yaml

    path = Path(folder) / "config.yaml"
    atomic_write_text(path, yaml.safe_dump(_plain(asdict(cfg)), sort_keys=False))
    return path


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj.value if isinstance(obj, Enum) else obj
