"""`qtune <verb> -m ...`: one job per combination through Hydra's sweeper and launcher.

Each job writes into its own folder under the sweep folder (`runs/sweep-<time>/<job>/`), where Hydra
also records the job's overrides; the verb's run() receives typed config like a single run. A train
sweep ends with a summary: a Rich table plus summary.csv and summary.md in the sweep folder, sorted by
eval loss. Jobs may run in other processes (hydra/launcher=joblib) or on other machines (submitit), so each leaves
its row in its own folder (job.json) and the summary is read from there, the same whichever launcher ran them.
"""
from __future__ import annotations

import json
from pathlib import Path

from qtune.errors import QtuneError

ROW = "job.json"  # a job's row of the summary, in the job's folder


def run(train, overrides: list[str], flags: dict, sweep_dir: str | None = None) -> list[dict]:
    """One `train(cfg)` a job of the sweep (the CLI passes qtune.commands.train.run), then the summary."""
    from qtune.config.compose import check_sweep, multirun
    from qtune.stages import SWEEP_COLUMNS

    base = check_sweep(overrides)
    if not flags.get("dry_run"):  # what every job would fail on fails once, before any job or folder
        _check_shared(base, overrides)
    folder = Path(sweep_dir or _sweep_dir(overrides))  # chosen here: the jobs may not run in this process
    multirun(overrides, lambda cfg: _job(train, cfg, flags), sweep_dir=str(folder))
    if flags.get("dry_run"):
        return []
    rows = sorted((json.loads(p.read_text()) for p in folder.glob(f"*/{ROW}")), key=lambda r: r["job"])
    if rows:  # dpo, kto, rm: with the stage's own figures
        write_summary(rows, folder, [c for c in SWEEP_COLUMNS if any(r.get(c) is not None for r in rows)])
    if rows and all(r["error"] for r in rows):
        raise QtuneError(f"every job of the sweep failed; see {folder / 'summary.md'}")
    return rows


def _check_shared(base, overrides: list[str]) -> None:
    """The data inputs and the model, when the sweep does not vary them, checked once (cheaply: no model loads):
    `qtune train -m lora=r16,r64` without data.path is one line, not a row of errors per job and a sweep folder."""
    from qtune.config.compose import swept_keys, to_object
    from qtune.data.prepare import check_inputs
    from qtune.modeling.hub import check_available

    varied = swept_keys(overrides)
    touches = lambda group: any(k == group or k.startswith(group + ".") for k in varied)  # noqa: E731
    cfg = to_object(base)
    if not touches("data"):
        check_inputs(cfg.data)
    if not touches("model"):
        check_available(cfg.model, cfg.paths)


def _sweep_dir(overrides: list[str]) -> str:
    import time

    given = [o.split("=", 1)[1] for o in overrides if o.startswith("hydra.sweep.dir=")]
    return given[-1] if given else time.strftime("runs/sweep-%Y%m%d-%H%M%S")


def _job(train, cfg, flags: dict) -> dict:
    """One job, wherever the launcher runs it. Under a parallel launcher on a machine of several GPUs it takes GPUs of
    its own (qtune.training.launch.claim_gpus)."""
    from hydra.core.hydra_config import HydraConfig

    from qtune.training import launch
    from qtune.config.compose import to_object

    hc = HydraConfig.get()
    row = {"job": hc.job.num, "overrides": list(hc.overrides.task), "run": hc.runtime.output_dir,
           "train_loss": None, "eval_loss": None, "seconds": None, "peak_memory_bytes": None, "error": None}
    parallel = hc.runtime.choices.get("hydra/launcher") == "joblib"
    try:
        obj = to_object(cfg)  # this job's values checked (train.lr=-1): a ConfigError, a row like any failure
        obj.train.output_dir = hc.runtime.output_dir
        with launch.claim_gpus(obj.train.nproc if parallel else 0, Path(hc.sweep.dir)) as gpus:
            # GPUs of its own: fresh processes, which see only them (this worker of the launcher may hold CUDA already)
            result = train(obj, **flags) if gpus is None else launch.start(train, obj, obj.train.nproc, **flags)
    except QtuneError as e:  # one job's failure is a row of the summary, not the end of the sweep
        from qtune.ui import print_error

        print_error(f"job {hc.job.num} ({' '.join(row['overrides'])}): {e}")
        row["error"] = str(e)
    else:
        if isinstance(result, dict):
            row.update({k: result.get(k) for k in ("train_loss", "eval_loss", "seconds", "peak_memory_bytes")})
            from qtune.stages import sweep_figures

            row.update(sweep_figures(result))
    if not flags.get("dry_run"):
        from qtune.io import atomic_write_json

        atomic_write_json(Path(hc.runtime.output_dir) / ROW, row)
    return row


def write_summary(rows: list[dict], folder: Path, extra: list[str] = (), shared_overrides_known: bool = False) -> None:
    """summary.csv and summary.md (qtune.runs.write_summary), then the Rich table."""
    from qtune import ui
    from qtune.runs import write_summary as write_files

    ui.show_sweep_summary(write_files(rows, folder, extra, shared_overrides_known), folder, extra)
