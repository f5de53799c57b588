"""`qtune push`: a run's adapter (hub.what=adapter), merged model (merged) or GGUF files (gguf) to a Hugging Face Hub
repo, with a generated model card and the loss plot (the work is qtune.export.hub's; this verb checks the run and what
it holds before any request, and reports)."""
from __future__ import annotations

from qtune.config.schema import Config
from qtune.errors import ConfigError


def run(cfg: Config):
    from qtune import ui
    from qtune.export.hub import artifact_files, push, token
    from qtune.runs import run_config, run_folder

    if not cfg.hub.repo_id:
        raise ConfigError("hub.repo_id: which Hub repo? set hub.repo_id=<owner>/<name> (made, private, when missing)")
    run = run_folder(cfg)
    rcfg = run_config(run, cfg)
    files = artifact_files(run, str(cfg.hub.what))   # a run without what hub.what names: one line, nothing sent
    tok = token()
    ui.info(f"pushing {cfg.hub.what} of {run} to {cfg.hub.repo_id}")
    pushed = push(run, rcfg, cfg.hub, files, tok, warn=ui.print_warning)
    ui.files_table(f"{pushed.repo_id}@{pushed.revision}", pushed.files)
    ui.info(f"{'created' if pushed.created else 'updated'} {pushed.url} (commit {pushed.commit[:12]} on "
            f"{pushed.revision})")
    return pushed
