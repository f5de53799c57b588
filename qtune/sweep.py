"""`qtune <verb> -m ...`: one job per combination through Hydra's sweeper and launcher.

Each job writes into its own folder under the sweep folder (`runs/sweep-<time>/<job>/`), where Hydra
also records the job's overrides; the verb's run() receives typed config like a single run. A train
sweep ends with a summary: a Rich table plus summary.csv and summary.md in the sweep folder, sorted by
eval loss.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

from qtune.errors import NotYetAvailable, QtuneError

COLUMNS = ["job", "overrides", "train_loss", "eval_loss", "seconds", "peak_memory_bytes", "run", "error"]


def run(verb: str, overrides: list[str], flags: dict, sweep_dir: str | None = None) -> list[dict]:
    from hydra.core.hydra_config import HydraConfig

    from qtune.cli import _verb_module
    from qtune.config.compose import check_sweep, multirun, to_object

    check_sweep(overrides)
    if verb != "train":
        raise NotYetAvailable(f"`qtune {verb} -m`: sweeps are for `qtune train`")
    module = _verb_module(verb)  # says so, in one line, when the verb is not built yet
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
            result = module.run(obj, **flags)
        except QtuneError as e:  # one job's failure is a row of the summary, not the end of the sweep
            from qtune.ui import print_error

            print_error(f"job {hc.job.num} ({' '.join(row['overrides'])}): {e}")
            row["error"] = str(e)
        else:
            if isinstance(result, dict):
                row.update({k: result.get(k) for k in ("train_loss", "eval_loss", "seconds", "peak_memory_bytes")})
        rows.append(row)

    multirun(overrides, job, sweep_dir=sweep_dir)
    if folder and not flags.get("dry_run"):
        write_summary(rows, folder[0])
    if rows and all(r["error"] for r in rows):
        raise QtuneError(f"every job of the sweep failed; see {folder[0] / 'summary.md'}")
    return rows


def _order(row: dict):
    return (row["error"] is not None, row["eval_loss"] is None, row["eval_loss"] or 0.0, row["train_loss"] or 0.0)


def write_summary(rows: list[dict], folder: Path, extra: list[str] = (), shared_overrides_known: bool = False) -> None:
    """summary.csv, summary.md and the Rich table; `extra` columns (e.g. qtune eval's) follow the others."""
    from qtune import ui
    from qtune.io import atomic_write_text

    # Show what tells the jobs apart; the overrides every job shares go in the header of summary.md.
    # (Rewriting a summary, the overrides already are the distinguishing ones.)
    common = set() if shared_overrides_known or len(rows) < 2 else set.intersection(*(set(r["overrides"]) for r in rows))
    rows = [{**r, "overrides": " ".join(o for o in r["overrides"] if o not in common)} for r in sorted(rows, key=_order)]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS + list(extra), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(folder / "summary.csv", buf.getvalue())
    header = "| job | overrides | train loss | eval loss | time (s) | peak memory | " + \
        "".join(f"{c.replace('_', ' ')} | " for c in extra) + "error |"
    md = ([f"Every job: `{' '.join(sorted(common)) or '(no shared overrides)'}`", ""] if not shared_overrides_known else []) + \
        [header, "|---" * (7 + len(extra)) + "|"]
    for r in rows:
        md.append(f"| {r['job']} | `{r['overrides']}` | {ui._num(r['train_loss'])} | {ui._num(r['eval_loss'])} | "
                  f"{'-' if r['seconds'] is None else round(r['seconds'])} | {ui.human_bytes(r['peak_memory_bytes'])} | "
                  + "".join(f"{ui._num(r.get(c))} | " for c in extra) + f"{r['error'] or ''} |")
    if shared_overrides_known and (folder / "summary.md").is_file():
        first = (folder / "summary.md").read_text().splitlines()[0]
        if first.startswith("Every job:"):
            md = [first, ""] + md
    atomic_write_text(folder / "summary.md", "\n".join(md) + "\n")
    ui.show_sweep_summary(rows, folder, extra)
