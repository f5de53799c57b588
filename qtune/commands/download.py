"""`qtune download`: put a model's files in `model.local_dir`, complete and verified (qtune.modeling.hub does the work)."""
from __future__ import annotations

from pathlib import Path

from qtune.config.schema import Config


def run(cfg: Config, dry_run: bool = False) -> Path | None:
    from qtune import ui
    from qtune.modeling.hub import ensure_model, plan_download

    if dry_run:
        plan = plan_download(cfg.model, cfg.download)
        ui.files_table(f"would fetch {cfg.model.repo_id}@{cfg.model.revision} into {cfg.model.local_dir}", plan)
        return None
    path = ensure_model(cfg.model, cfg.download, cfg.paths, warn=ui.print_warning, repair=True)
    files = [(f.relative_to(path), f.stat().st_size) for f in sorted(path.rglob("*")) if f.is_file()]
    ui.files_table(f"{cfg.model.name} ({cfg.model.repo_id})",
                   [(rel.as_posix(), size) for rel, size in files if ".cache" not in rel.parts])
    ui.info(f"ready: {path}")
    return path
