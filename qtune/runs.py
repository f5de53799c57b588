"""Run folders: every verb that writes output leaves the resolved config beside it."""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import asdict
from enum import Enum
from pathlib import Path

from qtune import integrity
from qtune.config.schema import Config
from qtune.errors import ConfigError, InUse
from qtune.io import atomic_write_json, atomic_write_text, pid_alive


def write_config(folder: Path, cfg: Config, distributed: dict | None = None, data_digest: str | None = None) -> Path:
    """Save the fully resolved config as `config.yaml` in folder (atomically); `distributed`: what a training run was
    launched as (qtune.training.distributed.Setup.record(): world size, strategy, global batch), kept beside it, and
    `data_digest`: the digest of the examples it trains on (qtune.data.prepare.digests), which a resume compares."""
    import yaml

    path = Path(folder) / "config.yaml"
    saved = saved_form(cfg) | ({"distributed": distributed} if distributed else {}) | \
        ({"data_digest": data_digest} if data_digest else {})
    atomic_write_text(path, yaml.safe_dump(saved, sort_keys=False))
    return path


def write_data_counts(folder: Path, stats: dict) -> Path:
    """`data.json`: the examples a run trains and is evaluated on, per split and per source (from the prepared data's
    stats), so that the run describes its data without the data cache."""
    keys = ("examples", "kept", "tokens", "trainable_tokens", "truncated")
    counts = {split: {**{k: stats[split].get(k) for k in keys},
                      "per_source": [{k: s.get(k) for k in ("source", "examples", "kept", "tokens")}
                                     for s in stats[split].get("per_source", [])]}
              for split in ("train", "eval") if split in stats}
    path = Path(folder) / "data.json"
    atomic_write_json(path, {"stage": stats.get("stage"), "rejected": stats.get("rejected", 0), **counts})
    return path


def saved_form(cfg: Config) -> dict:
    """The config as a run folder keeps it: plain values, and local paths made absolute, so that
    `qtune eval run=/abs/run` (or merge, chat, serve) finds the run's data and model from any folder."""
    from qtune.io import is_hub_dataset

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


# ---------------------------------------------------------------- one process trains into a run folder at a time

LOCK = ".lock"  # in a run folder, while a process trains into it: flock'ed, naming that process (pid, host, start)
_HELD = "QTUNE_RUN_LOCK"  # the run folder this process holds, for the processes it launches (train.nproc)


def launched() -> bool:
    """Started by a launcher (torchrun, accelerate launch, train.nproc), which sets LOCAL_RANK: never start processes
    again."""
    return "LOCAL_RANK" in os.environ


def main_process() -> bool:
    """Rank 0 of a launched world, or the only process (RANK, as every torch launcher sets it; qtune.modeling.world
    reads the whole world)."""
    return os.environ.get("RANK", "0") in ("", "0")


@contextmanager
def hold(out: Path, warn=None):
    """An exclusive lock on the run folder `out` while this process trains into it (fcntl.flock on <out>/.lock, which
    names the process). The system drops a flock when its process ends, however it ends, so a lock file left by a
    killed process is found free and taken over (`warn` says so). Another live holder: InUse, naming its pid.
    The processes a launcher started for the run (train.nproc) work under their launcher's lock; under torchrun or
    `accelerate launch`, rank 0 takes it and the others, which write nothing into the folder, take none."""
    out = Path(os.path.abspath(Path(out).expanduser()))
    if launched() and (not main_process() or os.environ.get(_HELD) == str(out)):
        yield
        return
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    f, previous = _take(out / LOCK)
    if previous is not None and warn:
        warn(f"train.output_dir={out}: took over {LOCK} from {_holder(previous)}, which no longer holds it (it ended "
             "without releasing the folder, e.g. killed)")
    before = os.environ.get(_HELD)
    os.environ[_HELD] = str(out)  # inherited by the processes this run starts (qtune.training.launch)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(_HELD, None)
        else:
            os.environ[_HELD] = before
        try:  # removed while still held, so that a process that opened it meanwhile sees it gone and starts over
            if os.stat(out / LOCK).st_ino == os.fstat(f.fileno()).st_ino:
                (out / LOCK).unlink()
        except OSError:
            pass
        f.close()
        if made:  # a run refused before it wrote anything leaves no folder behind
            try:
                out.rmdir()
            except OSError:
                pass


def _take(path: Path):
    """Lock `path` (made if missing) and write this process into it; returns the open file and what a previous
    holder that is gone left in it (None when nobody had)."""
    import fcntl
    import json
    import socket
    import time

    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = _holder(f.read())
            f.close()
            raise InUse(f"train.output_dir={path.parent} is in use: {holder} is training into it (it holds {path}); "
                        "wait for it to end or stop it, or choose another train.output_dir") from None
        except OSError:  # a file system without flock: the pid in the file decides
            f.seek(0)
            text = f.read()
            if _alive(text, me["host"]):
                f.close()
                raise InUse(f"train.output_dir={path.parent} is in use: {_holder(text)} is training into it (it holds "
                            f"{path}); wait for it to end or stop it, or choose another train.output_dir (or delete "
                            f"{path} if that process has ended)") from None
        try:
            same = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # its holder removed it as this process opened it: take the new one
            f.close()
            continue
        f.seek(0)
        previous = f.read()
        f.seek(0)
        f.truncate()
        f.write(json.dumps(me) + "\n")
        f.flush()
        return f, (previous if previous.strip() else None)


def _holder(text: str) -> str:
    """'process 1234 (on host, since 2026-01-01 12:00:00)' from a lock file's text."""
    import json
    import socket

    try:
        h = json.loads(text)
        where = "" if h.get("host") == socket.gethostname() else f"on {h.get('host')}, "
        return f"process {int(h['pid'])} ({where}since {h.get('started')})"
    except (ValueError, TypeError, KeyError):
        return "another process" + (" (it has just started)" if not text.strip() else "")


def _alive(text: str, host: str) -> bool:
    """Whether the process a lock file names may still run (another host's: assumed so)."""
    import json

    try:
        h = json.loads(text)
        pid = int(h["pid"])
    except (ValueError, TypeError, KeyError):
        return False
    if h.get("host") != host:
        return True
    return pid != os.getpid() and pid_alive(pid)


# Settings a resumed run must share with the run it continues (anything else may change, e.g. train.max_steps).
_RESUME_KEYS = ("model", "quant", "lora", "moe", "train.stage", "train.init_adapter", "train.method", "train.freeze",
                "train.trainable_dtype")


def resume_point(out: Path, cfg: Config) -> Path | None:
    """What an existing output folder means for `train`: None (start fresh) or the checkpoint to resume.

    A finished run (adapter/) is refused unless train.resume=continue (trains it on from its last checkpoint) or
    train.overwrite=true, a folder of checkpoints with train.resume=never unless train.overwrite=true; resuming with
    different model/quant/lora/moe settings is refused too (and with other data: check_same_data, once the data is
    prepared). train.resume=continue is auto otherwise.
    """
    import shutil

    from qtune.errors import ConfigError

    t = cfg.train
    if t.overwrite and out.exists():  # (all but the lock this run holds: hold())
        for p in out.iterdir():
            if p.name != LOCK:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    if t.resume not in ("auto", "never", "continue"):
        ck = Path(t.resume).expanduser()
        if not (ck / "trainer_state.json").is_file():
            raise ConfigError(f"train.resume={t.resume}: not a checkpoint folder (no trainer_state.json); "
                              f"valid: auto, never, continue, or a path like {out / 'checkpoints' / 'checkpoint-100'}")
        _check_same_settings(out, cfg)
        integrity.check_checkpoint(ck, "choose another checkpoint with train.resume=<path>, or train.resume=auto")
        return ck
    # Hidden entries are others' bookkeeping (Hydra writes .hydra/ into each sweep job's folder first).
    if not out.exists() or not any(not p.name.startswith(".") for p in out.iterdir()):
        return None
    checkpoints = latest_checkpoints(out)
    if output_of(out) is not None:
        return _continued(out, cfg, checkpoints)
    if not checkpoints:
        if _started_by_qtune(out):
            # a run stopped (killed, failed) before its first complete checkpoint: nothing to resume, so the same
            # command starts afresh; what the stopped start left (a half-written checkpoint, its first metrics)
            # would only mislead the new run
            for leftover in ("checkpoints", "tensorboard"):
                shutil.rmtree(out / leftover, ignore_errors=True)
            for leftover in ("metrics.jsonl", "samples.jsonl", "loss.png", "experts.json", "data.json"):
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


def _continued(out: Path, cfg: Config, checkpoints: list[Path]) -> Path:
    """A finished run (adapter/): with train.resume=continue, the checkpoint it trains on from (to a larger
    train.max_steps or train.epochs: the schedule is laid out again for the new length, from the step it reached);
    otherwise refused, with the ways on."""
    import json

    t = cfg.train
    try:
        steps = int(json.loads((out / "summary.json").read_text())["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        steps = None
    trained = f"{steps} steps" if steps is not None else "its steps"
    if t.resume != "continue":
        more = t.max_steps > 0 and steps is not None and t.max_steps > steps
        ask = f"train.max_steps={t.max_steps}" if more else "a larger train.max_steps (or train.epochs)"
        raise ConfigError(f"train.output_dir={out} holds a finished run ({output_of(out).name}/, {trained}); to train it on to "
                          f"{ask} from its last checkpoint set train.resume=continue; to keep it and start another "
                          "choose another train.output_dir (or run_name=...); train.overwrite=true discards it")
    if not checkpoints:
        raise ConfigError(f"train.resume=continue: {out} has no checkpoint to continue from (checkpoints/ is empty); "
                          "train it again with train.overwrite=true, or start another run from its adapter with "
                          f"train.init_adapter={out} and another train.output_dir")
    last = int(checkpoints[-1].name.rsplit("-", 1)[-1])
    if t.max_steps > 0 and last >= t.max_steps:
        raise ConfigError(f"train.resume=continue: {out} already trained {max(last, steps or 0)} steps and "
                          f"train.max_steps={t.max_steps} asks for no more; set a larger train.max_steps (or "
                          "train.epochs with train.max_steps=-1)")
    _check_same_settings(out, cfg)
    integrity.check_checkpoint(checkpoints[-1], "delete that checkpoint to continue from the one before, or set "
                                                "train.overwrite=true to start over")
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
            "job.json", "data.json"}  # job.json: a sweep job's row (qtune.commands.sweep)
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


def now_default(key: str):
    """train.<key>'s default as config.yaml writes it."""
    from qtune.config.schema import TrainConfig

    return _plain(asdict(TrainConfig()))[key]


def _check_same_settings(out: Path, cfg: Config) -> None:
    import yaml

    from qtune.errors import ConfigError

    saved_path = out / "config.yaml"
    if not saved_path.is_file():
        return
    saved = yaml.safe_load(saved_path.read_text()) or {}
    saved.setdefault("train", {}).setdefault("stage", "sft")  # (run folders from before stages)
    # (run folders from before train.method: LoRA runs)
    saved["train"].setdefault("method", "lora")
    saved["train"].setdefault("trainable_dtype", now_default("trainable_dtype"))
    saved["train"].setdefault("freeze", now_default("freeze"))
    now = saved_form(cfg)
    lora = saved["train"]["method"] == now["train"]["method"] == "lora"
    for key in _RESUME_KEYS:
        if lora and key in ("train.freeze", "train.trainable_dtype"):  # what full/freeze read, not LoRA
            continue
        group, _, leaf = key.partition(".")
        old, new = saved.get(group) or {}, now.get(group) or {}
        diff = _first_difference(old.get(leaf) if leaf else old, new.get(leaf) if leaf else new, key)
        if diff:
            key, old, new = diff
            raise ConfigError(f"{key}={new}: {out} was trained with {key}={old}; resume with the same setting, "
                              "choose another train.output_dir, or set train.overwrite=true")


# What the examples are made of: data settings a resume compares (the others only say how to prepare them)
_DATA_IGNORED = ("cache_dir", "num_proc", "on_error")


def check_same_data(out: Path, cfg: Config, digest: str) -> None:
    """A resumed run goes on with the examples it was trained on: the digest of its prepared data (config.yaml's
    data_digest) must be this run's. The digest, not the paths: the same files moved or renamed still resume, and
    files changed in place do not. A run folder from before the digest: its data settings must be the same."""
    import yaml

    try:
        saved = yaml.safe_load((out / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return
    old, new = saved.get("data") or {}, saved_form(cfg)["data"]
    changed = [d for d in _differences(old, new, "data") if d[0].split(".")[1] not in _DATA_IGNORED]
    recorded = saved.get("data_digest")
    if (recorded == digest) if recorded else not changed:
        return
    if not changed:  # the settings are the same: the files are not
        what = f"{_data_key(cfg)}: the data changed since {out} was trained on it (same settings, other contents)"
    else:
        what = (f"{out} was trained on other examples: " +
                ", ".join(f"{k}={_shown(n)} (was {_shown(o)})" for k, o, n in changed))
    raise ConfigError(f"{what}; resume with the data it was trained on, or start a new run: another "
                      "train.output_dir (or run_name=...), or train.overwrite=true to replace this one")


def _shown(value) -> str:
    return "null" if value is None else str(value)


def _data_key(cfg: Config) -> str:
    d = cfg.data
    return f"data.path={d.path}" if d.path else "data.sources"


def _differences(a, b, key: str) -> list:
    """Every (key, old, new) where a and b differ (dicts by key; lists as wholes)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), f"{key}.{k}")]
    return [] if a == b else [(key, a, b)]


def _first_difference(a, b, key: str):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = _first_difference(a.get(k), b.get(k), f"{key}.{k}")
            if d:
                return d
        return None
    return None if a == b else (key, a, b)


# ---------------------------------------------------------------- reading a finished run


def output_of(run: Path) -> Path | None:
    """A finished run's output: adapter/ (train.method=lora) or model/ (full, freeze: a whole checkpoint); None if
    neither is there."""
    for name in ("adapter", "model"):
        if (run / name).is_dir():
            return run / name
    return None


def model_output(run: Path) -> Path | None:
    """<run>/model/ when the run trained the weights themselves (train.method=full|freeze), else None."""
    return run / "model" if (run / "model" / "config.json").is_file() else None


def run_folder(cfg: Config) -> Path:
    """The folder `run=` names, checked to hold a complete, undamaged adapter or, for train.method=full|freeze, model/
    (what merge, chat, serve, eval read)."""
    if not cfg.run:
        raise ConfigError("run: which run folder? set run=runs/<name> (a folder `qtune train` wrote)")
    run = Path(cfg.run).expanduser()
    if not run.exists():
        raise ConfigError(f"run={cfg.run}: no such folder; name a run folder `qtune train` wrote (runs/<name>)")
    if not run.is_dir():
        raise ConfigError(f"run={cfg.run} is a file; name a run folder `qtune train` wrote (runs/<name>)")
    if model_output(run) is not None:
        integrity.check_model(run / "model", "train the run again with train.overwrite=true (or resume it from its "
                                             "last checkpoint after deleting model/)")
        return run
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
    for group in ("merge", "chat", "serve", "eval", "hub", "paths"):
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
