"""Run folders: every verb that writes output leaves the resolved config beside it."""
from __future__ import annotations

from dataclasses import asdict
from enum import Enum
from pathlib import Path

from qtune import integrity
from qtune.config.schema import Config
from qtune.errors import ConfigError
from qtune.io import atomic_write_text


def write_config(folder: Path, cfg: Config, distributed: dict | None = None) -> Path:
    """Save the fully resolved config as `config.yaml` in folder (atomically); `distributed`: what a training run was
    launched as (qtune.distributed.Setup.record(): world size, strategy, global batch), kept beside it."""
    import yaml

    path = Path(folder) / "config.yaml"
    saved = saved_form(cfg) | ({"distributed": distributed} if distributed else {})
    atomic_write_text(path, yaml.safe_dump(saved, sort_keys=False))
    return path


def saved_form(cfg: Config) -> dict:
    """The config as a run folder keeps it: plain values, and local paths made absolute, so that
    `qtune eval run=/abs/run` (or merge, chat, serve) finds the run's data and model from any folder."""
    from qtune.data.formats import is_hub_dataset

    d = _plain(asdict(cfg))
    data = d["data"]
    for holder, key in [(data, "path"), (data, "eval_path"), *[(src, "path") for src in data["sources"]]]:
        if holder[key] and not is_hub_dataset(holder[key]):
            holder[key] = _absolute(holder[key])
    for group, key in (("data", "cache_dir"), ("model", "local_dir"), ("train", "output_dir"), ("train", "init_adapter")):
        if d[group][key]:
            d[group][key] = _absolute(d[group][key])
    return d


def _absolute(path: str) -> str:
    import os

    return os.path.abspath(os.path.expanduser(path))


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj.value if isinstance(obj, Enum) else obj


# Settings a resumed run must share with the run it continues (anything else may change, e.g. train.max_steps).
_RESUME_KEYS = ("model", "quant", "lora", "moe", "train.stage", "train.init_adapter")


def resume_point(out: Path, cfg: Config) -> Path | None:
    """What an existing output folder means for `train`: None (start fresh) or the checkpoint to resume.

    A finished run (adapter/) or a folder of checkpoints with train.resume=never is refused unless
    train.overwrite=true; resuming with different model/quant/lora/moe settings is refused too.
    """
    import shutil

    from qtune.errors import ConfigError

    t = cfg.train
    if t.overwrite and out.exists():
        shutil.rmtree(out)
    if t.resume not in ("auto", "never"):
        ck = Path(t.resume).expanduser()
        if not (ck / "trainer_state.json").is_file():
            raise ConfigError(f"train.resume={t.resume}: not a checkpoint folder (no trainer_state.json); "
                              f"valid: auto, never, or a path like {out / 'checkpoints' / 'checkpoint-100'}")
        _check_same_settings(out, cfg)
        integrity.check_checkpoint(ck, "choose another checkpoint with train.resume=<path>, or train.resume=auto")
        return ck
    # Hidden entries are others' bookkeeping (Hydra writes .hydra/ into each sweep job's folder first).
    if not out.exists() or not any(not p.name.startswith(".") for p in out.iterdir()):
        return None
    if (out / "adapter").is_dir():
        raise ConfigError(f"train.output_dir={out} holds a finished run (adapter/); choose another "
                          "train.output_dir (or run_name=...) or set train.overwrite=true")
    checkpoints = latest_checkpoints(out)
    if not checkpoints:
        if _started_by_qtune(out):
            # a run stopped (killed, failed) before its first complete checkpoint: nothing to resume, so the same
            # command starts afresh; what the stopped start left (a half-written checkpoint, its first metrics)
            # would only mislead the new run
            for leftover in ("checkpoints", "tensorboard"):
                shutil.rmtree(out / leftover, ignore_errors=True)
            for leftover in ("metrics.jsonl", "samples.jsonl", "loss.png", "experts.json"):
                (out / leftover).unlink(missing_ok=True)
            return None
        raise ConfigError(f"train.output_dir={out} exists and is not a qtune run folder; choose another "
                          "train.output_dir or set train.overwrite=true")
    if t.resume == "never":
        raise ConfigError(f"train.output_dir={out} has checkpoints; train.resume=never refuses to reuse it: "
                          "set train.resume=auto to continue or train.overwrite=true to start over")
    _check_same_settings(out, cfg)
    then = f"it resumes from {checkpoints[-2].name}" if len(checkpoints) > 1 else "it starts afresh"
    integrity.check_checkpoint(checkpoints[-1], f"delete that checkpoint and run the same command again ({then}), "
                                                "or set train.overwrite=true to start over")
    return checkpoints[-1]


def _started_by_qtune(out: Path) -> bool:
    """A folder `qtune train` started: its config.yaml is a qtune config, and nothing else is there but what a
    run writes."""
    import yaml

    try:
        saved = yaml.safe_load((out / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return False
    ours = {"config.yaml", "checkpoints", "tensorboard", "metrics.jsonl", "samples.jsonl", "loss.png", "experts.json",
            "job.json"}  # job.json: a sweep job's row (qtune.sweep)
    return (isinstance(saved, dict) and {"model", "train", "lora"} <= saved.keys()
            and all(p.name in ours or p.name.startswith(".") for p in out.iterdir()))


def latest_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a checkpoint is complete once trainer_state.json is written)."""
    import json

    def complete(p: Path) -> bool:
        try:
            json.loads((p / "trainer_state.json").read_text())
            return True
        except (OSError, ValueError):
            return False

    cks = [p for p in (out / "checkpoints").glob("checkpoint-*") if p.name.rsplit("-", 1)[-1].isdigit() and complete(p)]
    return sorted(cks, key=lambda p: int(p.name.rsplit("-", 1)[-1]))


def _check_same_settings(out: Path, cfg: Config) -> None:
    import yaml

    from qtune.errors import ConfigError

    saved_path = out / "config.yaml"
    if not saved_path.is_file():
        return
    saved = yaml.safe_load(saved_path.read_text()) or {}
    saved.setdefault("train", {}).setdefault("stage", "sft")  # (run folders from before stages)
    now = saved_form(cfg)
    for key in _RESUME_KEYS:
        group, _, leaf = key.partition(".")
        old, new = saved.get(group) or {}, now.get(group) or {}
        diff = _first_difference(old.get(leaf) if leaf else old, new.get(leaf) if leaf else new, key)
        if diff:
            key, old, new = diff
            raise ConfigError(f"{key}={new}: {out} was trained with {key}={old}; resume with the same setting, "
                              "choose another train.output_dir, or set train.overwrite=true")


def _first_difference(a, b, key: str):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = _first_difference(a.get(k), b.get(k), f"{key}.{k}")
            if d:
                return d
        return None
    return None if a == b else (key, a, b)


# ---------------------------------------------------------------- reading a finished run


def run_folder(cfg: Config) -> Path:
    """The folder `run=` names, checked to hold a complete, undamaged adapter (what merge, chat, serve, eval read)."""
    if not cfg.run:
        raise ConfigError("run: which run folder? set run=runs/<name> (a folder `qtune train` wrote)")
    run = Path(cfg.run).expanduser()
    if not run.exists():
        raise ConfigError(f"run={cfg.run}: no such folder; name a run folder `qtune train` wrote (runs/<name>)")
    if not run.is_dir():
        raise ConfigError(f"run={cfg.run} is a file; name a run folder `qtune train` wrote (runs/<name>)")
    if not (run / "adapter" / "adapter_config.json").is_file():
        raise ConfigError(f"run={cfg.run}: no adapter/ there (finish or resume `qtune train` first)")
    check_adapter(run / "adapter")
    return run


def find_adapter(path: Path) -> Path | None:
    """The adapter folder `path` names: a run folder's adapter/, or an adapter folder itself; None if neither."""
    if (path / "adapter" / "adapter_config.json").is_file():
        return path / "adapter"
    return path if (path / "adapter_config.json").is_file() else None


def adapter_folder(path: str | Path, key: str) -> Path:
    """The adapter a setting (`key`) names, as find_adapter reads it, checked to be undamaged."""
    p = Path(path).expanduser()
    adapter = find_adapter(p)
    if adapter is None:
        raise ConfigError(f"{key}: {path} is neither a run folder nor an adapter folder")
    check_adapter(adapter)
    return adapter


def check_adapter(adapter: Path) -> None:
    """One line for a truncated or corrupt adapter, with the remedy for where it lives (a run's, or a copy)."""
    if adapter.name == "adapter" and (adapter.parent / "config.yaml").is_file():
        integrity.check_adapter(adapter, lambda: adapter_remedy(adapter.parent))
    else:
        integrity.check_adapter(adapter, "copy the adapter folder again, or train it again")


def adapter_remedy(run: Path) -> str:
    """What to do about a damaged <run>/adapter: the checkpoint of the run's last step holds the same adapter."""
    import json

    last = latest_checkpoints(run)[-1:]
    try:
        steps = json.loads((run / "summary.json").read_text())["steps"]
    except (OSError, ValueError, KeyError, TypeError):
        steps = None
    if last and last[0].name == f"checkpoint-{steps}":
        return (f"{last[0]} holds the same adapter: copy its adapter files into {run / 'adapter'}, "
                "or train again with train.overwrite=true")
    return "train the run again with train.overwrite=true"


def run_config(run: Path, overrides: Config) -> Config:
    """The run's own settings (model, quant, lora, moe, data, train), with this command's merge/chat/serve/eval ones."""
    import yaml

    from qtune.config import compose, to_object

    try:
        saved = yaml.safe_load((run / "config.yaml").read_text())
        saved["model"]["name"]
    except (OSError, UnicodeDecodeError, yaml.YAMLError, KeyError, TypeError) as e:
        from qtune.errors import DamagedFile

        why = "missing" if isinstance(e, FileNotFoundError) else "not a qtune run config"
        raise DamagedFile(f"{run / 'config.yaml'} is damaged ({why}); it holds the run's settings: restore it, "
                          "or train the run again with train.overwrite=true") from None
    cfg = to_object(compose([f"model={saved['model']['name']}"]))
    for group in ("model", "quant", "lora", "moe", "data", "train", "download"):
        setattr(cfg, group, _merge_into(getattr(cfg, group), saved.get(group) or {}))
    for group in ("merge", "chat", "serve", "eval", "paths"):
        setattr(cfg, group, getattr(overrides, group))
    cfg.run = str(run)
    return cfg


def _merge_into(obj, values: dict):
    """A typed config object rebuilt from saved plain values (Enums and nested dataclasses included)."""
    from omegaconf import OmegaConf

    node = OmegaConf.structured(obj)
    node.merge_with(values)
    return OmegaConf.to_object(node)


# ---------------------------------------------------------------- summaries of several runs


def _order(row: dict):
    return (row["error"] is not None, row["eval_loss"] is None, row["eval_loss"] or 0.0, row["train_loss"] or 0.0)


SUMMARY_COLUMNS = ["job", "overrides", "train_loss", "eval_loss", "seconds", "peak_memory_bytes", "run", "error"]


def write_summary(rows: list[dict], folder: Path, extra: list[str] = (), shared_overrides_known: bool = False) -> list[dict]:
    """summary.csv and summary.md of a sweep's (or an eval's) jobs, best first; returns the rows as written. `extra`
    columns (e.g. qtune eval's) follow the others."""
    import csv
    import io

    from qtune.text import human_bytes, num

    # Show what tells the jobs apart; the overrides every job shares go in the header of summary.md.
    # (Rewriting a summary, the overrides already are the distinguishing ones.)
    common = set() if shared_overrides_known or len(rows) < 2 else set.intersection(*(set(r["overrides"]) for r in rows))
    rows = [{**r, "overrides": " ".join(o for o in r["overrides"] if o not in common)} for r in sorted(rows, key=_order)]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SUMMARY_COLUMNS + list(extra), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(folder / "summary.csv", buf.getvalue())
    header = "| job | overrides | train loss | eval loss | time (s) | peak memory | " + \
        "".join(f"{c.replace('_', ' ')} | " for c in extra) + "error |"
    md = ([f"Every job: `{' '.join(sorted(common)) or '(no shared overrides)'}`", ""] if not shared_overrides_known else []) + \
        [header, "|---" * (7 + len(extra)) + "|"]
    for r in rows:
        md.append(f"| {r['job']} | `{r['overrides']}` | {num(r['train_loss'])} | {num(r['eval_loss'])} | "
                  f"{'-' if r['seconds'] is None else round(r['seconds'])} | {human_bytes(r['peak_memory_bytes'])} | "
                  + "".join(f"{num(r.get(c))} | " for c in extra) + f"{r['error'] or ''} |")
    if shared_overrides_known and (folder / "summary.md").is_file():
        first = (folder / "summary.md").read_text().splitlines()[0]
        if first.startswith("Every job:"):
            md = [first, ""] + md
    atomic_write_text(folder / "summary.md", "\n".join(md) + "\n")
    return rows
