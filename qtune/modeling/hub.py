"""Models on disk: a model's files in `model.local_dir`, fetched, converted or built, complete and verified; and
hub errors explained in one line. The library part of `qtune download`, used by every verb that loads a model.

Hub models go through huggingface_hub (revision, allow/ignore patterns, resumable transfers, token from
HF_TOKEN or a saved login, HF_ENDPOINT for mirrors, offline use of a complete local copy). The embedded
SmolLM2 converts from the GGUF file its package ships; tiny test models are built from config. Nothing here
prints: a warning goes to the `warn` callable a verb passes (else to the `qtune` logger).
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Callable, Optional

from qtune.config.schema import DownloadConfig, ModelConfig, ModelSource, PathsConfig
from qtune.errors import DownloadError, exception_chain

PICKLED = ["*.bin", "*.pth", "*.pt", "*.ckpt", "*.pkl", "*.msgpack", "*.h5"]
Warn = Optional[Callable[[str], None]]


def ensure_model(model: ModelConfig, download: DownloadConfig | None = None, paths: PathsConfig | None = None,
                 warn: Warn = None, repair: bool = False) -> Path:
    """The local folder of `model`, fetched, converted or built first when it is missing. A folder that lost files
    (its weights deleted) is refused in one line saying how to fetch it again, which `qtune download` does (repair=True;
    a hub model is fetched again whenever the hub is reachable)."""
    from qtune import integrity
    from qtune.modeling import assets

    local = Path(model.local_dir).expanduser()
    home = Path(paths.home if paths else local.parent.parent)
    if model.source is ModelSource.local:
        if not (local / "config.json").is_file():
            raise DownloadError(f"model.local_dir={local}: no config.json there (model.source=local expects a model folder)")
        integrity.check_model(local, "model.source=local: copy the model's files into it again")
        return local
    if model.source is ModelSource.hub:
        return fetch(model, download or DownloadConfig(), warn, paths)
    broken = (local / "config.json").is_file() and integrity.model_problem(local)
    if broken and not repair:
        raise DownloadError(f"{broken}; make it again with `{download_command(model, paths)}`")
    if model.source is ModelSource.package:
        return assets.convert_gguf(assets.package_file(model.package, model.gguf_file), local, replace=bool(broken))
    return assets.build_random_model(model.arch, local, home, replace=bool(broken))


def check_available(model: ModelConfig, paths: PathsConfig | None = None) -> None:
    """Cheap, with no network and no model load (what a sweep checks once for all its jobs): a model folder that is
    not there (model.source=local), lost files, a package that is not installed (model.source=package), or a hub model
    with no local copy while the hub is offline."""
    from qtune import integrity

    local = Path(model.local_dir).expanduser()
    if model.source is ModelSource.local:
        if not (local / "config.json").is_file():
            raise DownloadError(f"model.local_dir={local}: no config.json there (model.source=local expects a model folder)")
        integrity.check_model(local, "model.source=local: copy the model's files into it again")
        return
    if model.source is ModelSource.hub:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE and not _complete(local):
            raise DownloadError(f"model.repo_id={model.repo_id}: no complete copy in {local} and the hub is offline "
                                f"(HF_HUB_OFFLINE=1); fetch it first with `{download_command(model, paths)}`")
        return
    broken = (local / "config.json").is_file() and integrity.model_problem(local)
    if broken:
        raise DownloadError(f"{broken}; make it again with `{download_command(model, paths)}`")
    if model.source is ModelSource.package and not (local / "config.json").is_file():
        from qtune.modeling import assets

        assets.package_file(model.package, model.gguf_file)  # the file it converts from is installed


def download_command(model: ModelConfig, paths: PathsConfig | None = None) -> str:
    """The `qtune download` that fetches (or builds) this model into its folder again: model=<name>, with the settings
    that make it differ from that option (variant, repo_id, revision, local_dir)."""
    words = [f"model={model.name}"]
    if model.source is ModelSource.hub:
        if str(model.variant) != "instruct":
            words.append(f"model.variant={model.variant}")
        if model.repo_id not in (model.instruct_repo_id, model.base_repo_id):
            words.append(f"model.repo_id={model.repo_id}")
        if model.revision != "main":
            words.append(f"model.revision={model.revision}")
    local = Path(model.local_dir).expanduser().resolve()
    if paths is None or local != (Path(paths.models).expanduser() / model.name).resolve():
        words.append(f"model.local_dir={model.local_dir}")
    return "qtune download " + " ".join(words)


def _patterns(download: DownloadConfig) -> tuple[list[str], list[str]]:
    allow = list(download.allow_patterns) + (PICKLED if download.allow_pickle else [])
    ignore = list(download.ignore_patterns) + ([] if download.allow_pickle else PICKLED)
    return allow, ignore


def _plan(model: ModelConfig, download: DownloadConfig) -> list:
    """huggingface_hub's dry-run plan: what a download would fetch, with sizes."""
    from huggingface_hub import snapshot_download

    allow, ignore = _patterns(download)
    return snapshot_download(model.repo_id, revision=model.revision, local_dir=Path(model.local_dir).expanduser(),
                             allow_patterns=allow, ignore_patterns=ignore, dry_run=True)


def plan_download(model: ModelConfig, download: DownloadConfig) -> list[tuple[str, int]]:
    """(file, size) for each file a download would fetch."""
    try:
        infos = _plan(model, download)
    except Exception as e:
        raise DownloadError(explain_hub_error(e, model)) from None
    return [(i.filename, i.file_size) for i in infos]


def fetch(model: ModelConfig, download: DownloadConfig, warn: Warn = None, paths: PathsConfig | None = None) -> Path:
    from huggingface_hub import snapshot_download

    local = Path(model.local_dir).expanduser()
    allow, ignore = _patterns(download)
    try:
        plan = _plan(model, download)
        need = sum(i.file_size for i in plan if i.will_download)
        _check_disk(local, need, download.min_free_gib)
        snapshot_download(model.repo_id, revision=model.revision, local_dir=local, allow_patterns=allow,
                          ignore_patterns=ignore, max_workers=download.max_workers)
    except DownloadError:
        raise
    except Exception as e:
        if _offline_error(e) and _complete(local):
            (warn or logging.getLogger("qtune").warning)(f"hub unreachable; using the complete local copy in {local}")
            return local
        if _offline_error(e) and (local / "config.json").is_file():
            from huggingface_hub import constants

            from qtune import integrity

            raise DownloadError(f"{integrity.model_problem(local) or f'{local} is incomplete'} and "
                                f"{constants.ENDPOINT} cannot be reached to fetch it again; once it can: "
                                f"`{download_command(model, paths)}`") from None
        raise DownloadError(explain_hub_error(e, model)) from None
    verify(local, {i.filename: i.file_size for i in plan})
    return local


def _check_disk(local: Path, need: int, min_free_gib: float) -> None:
    probe = local
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need + min_free_gib * 2**30 > free:
        raise DownloadError(f"not enough disk space in {probe}: need {need / 2**30:.1f} GiB (+{min_free_gib:g} GiB "
                            f"head-room), {free / 2**30:.1f} GiB free; free space or set model.local_dir elsewhere")


def verify(local: Path, expected_sizes: dict[str, int] | None = None) -> None:
    """Every file present at its size, every shard of a safetensors index present."""
    if not (local / "config.json").is_file():
        raise DownloadError(f"{local}: config.json missing after download")
    for name, size in (expected_sizes or {}).items():
        f = local / name
        if not f.is_file():
            raise DownloadError(f"{local}: {name} missing after download")
        if size is not None and f.stat().st_size != size:
            raise DownloadError(f"{local}: {name} is {f.stat().st_size} bytes, expected {size}; run the download again")
    for index in local.glob("*.safetensors.index.json"):
        shards = set(json.loads(index.read_text())["weight_map"].values())
        missing = sorted(s for s in shards if not (local / s).is_file())
        if missing:
            raise DownloadError(f"{local}: {len(missing)} shard(s) listed in {index.name} missing, e.g. {missing[0]}")


def _complete(local: Path) -> bool:
    from qtune import integrity

    try:
        verify(local)
    except DownloadError:
        return False
    return integrity.missing(local) is None and any(local.glob("*.safetensors"))


def _offline_error(e: Exception) -> bool:
    names = {type(c).__name__ for c in exception_chain(e)}
    return bool(names & {"ConnectError", "ConnectTimeout", "OfflineModeIsEnabled", "LocalEntryNotFoundError",
                         "DryRunError", "TimeoutException", "ReadTimeout"})


def explain_hub_error(e: Exception, model: ModelConfig) -> str:
    names = {type(c).__name__ for c in exception_chain(e)}
    repo = f"{model.repo_id}@{model.revision}"
    if "RepositoryNotFoundError" in names:
        return f"model.repo_id={model.repo_id}: repository not found (or private: set HF_TOKEN or run `hf auth login`)"
    if "RevisionNotFoundError" in names:
        return f"model.revision={model.revision}: no such revision in {model.repo_id}"
    if "GatedRepoError" in names:
        return f"{model.repo_id} is gated: accept its license on the Hub and set HF_TOKEN"
    if _offline_error(e):
        from huggingface_hub import constants

        return (f"cannot reach {constants.ENDPOINT} to fetch {repo} and no complete local copy is in {model.local_dir}; "
                "check the network or HF_ENDPOINT")
    return f"download of {repo} failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
