"""`qtune <verb> -m ...`: one job per combination through Hydra's sweeper and launcher.

Each job writes into its own folder under the sweep folder (`runs/sweep-<time>/<job>/`), where Hydra
also records the job's overrides; the verb's run() receives typed config like a single run. A train
sweep ends with a summary: a Rich table plus summary.csv and summary.md in the sweep folder, sorted by
eval loss.
"""
from __future__ import annotations

from pathlib import Path

from qtune.errors import QtuneError



def run(train, overrides: list[str], flags: dict, sweep_dir: str | None = None) -> list[dict]:
    """One `train(cfg)` a job of the sweep (the CLI passes qtune.train.run), then the summary."""
    from hydra.core.hydra_config import HydraConfig

    from qtune.config.compose import check_sweep, multirun, to_object
    from qtune.stages import SWEEP_COLUMNS, sweep_figures

    check_sweep(overrides)
    rows: list[dict] = []
    folder: list[Path] = []

    def job(cfg):
        hc = HydraConfig.get()
        obj = to_object(cfg)
        obj.train.output_dir = hc.runtime.output_dir
        folder[:] = [Path(hc.sweep.dir)]
        row = {"job": hc.job.num, "overrides": list(hc.overrides.task), "run": hc.runtime.output_dir,
               "train_loss": None, "eval_loss": None, "seconds": None, "peak_memory_bytes": None, "error": None}
        try:
            result = train(obj, **flags)
        except QtuneError as e:  # one job's failure is a row of the summary, not the end of the sweep
            from qtune.ui import print_error

            print_error(f"job {hc.job.num} ({' '.join(row['overrides'])}): {e}")
            row["error"] = str(e)
        else:
            if isinstance(result, dict):
                row.update({k: result.get(k) for k in ("train_loss", "eval_loss", "seconds", "peak_memory_bytes")})
                row.update(sweep_figures(result))  # dpo, kto, rm: the stage's own figures
        rows.append(row)

    multirun(overrides, job, sweep_dir=sweep_dir)
    if folder and not flags.get("dry_run"):
        write_summary(rows, folder[0], [c for c in SWEEP_COLUMNS if any(r.get(c) is not None for r in rows)])
    if rows and all(r["error"] for r in rows):
        raise QtuneError(f"every job of the sweep failed; see {folder[0] / 'summary.md'}")
    return rows


def write_summary(rows: list[dict], folder: Path, extra: list[str] = (), shared_overrides_known: bool = False) -> None:
    """summary.csv and summary.md (qtune.runs.write_summary), then the Rich table."""
    from qtune import ui
    from qtune.runs import write_summary as write_files

    ui.show_sweep_summary(write_files(rows, folder, extra, shared_overrides_known), folder, extra)
