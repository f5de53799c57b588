"""Uploads (the library part of `qtune push`): a run's adapter, merged model or GGUF files, with a generated model card
(qtune.export.card) and the loss plot, to a Hugging Face Hub repo through huggingface_hub (HF_TOKEN, HF_ENDPOINT).

  1. what to send: <run>/adapter (less PEFT's own README.md), <run>/merged (checked whole), or <run>/gguf's files
  2. the token (HF_TOKEN, or the one `hf auth login` saved): none is one line before any request
  3. create_repo (private unless hub.private=false; an existing repo keeps its visibility), the branch hub.revision
  4. a repo that holds files this push would not write is refused unless hub.overwrite=true (then they are deleted in
     the same commit): two models in one repo mix their weights and cards. A repo holding only files of the names this
     push writes (an earlier push of this kind, or one that stopped) is updated; the Hub keeps every earlier version
     in the repo's history
  5. one commit (HfApi.create_commit): preupload tells regular from LFS files, the LFS batch API says which objects
     the Hub lacks and only those are sent (over Xet where hf_xet is installed, which deduplicates the same way by
     chunk). A push that stopped (network, Ctrl-C, a failed commit) is resumed by running it again: what reached the
     Hub is not sent twice, and the repo shows nothing of a push until its commit lands.
upload_large_folder would resume too, but it commits in many steps (a repo shows half a model meanwhile) and keeps
its progress in a .cache/ folder inside the folder it uploads: a run's adapter/ or merged/, which qtune writes
atomically and checks as a whole.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qtune.config.schema import Config, HubConfig
from qtune.errors import ConfigError, QtuneError, exception_chain


class PushError(QtuneError):
    """The Hub refused or could not be reached; the message names the repo and what to do."""


@dataclass
class Pushed:
    repo_id: str
    revision: str
    commit: str
    url: str
    files: list[tuple[str, int]]   # path in the repo, bytes
    created: bool


def artifact_files(run: Path, what: str) -> list[tuple[str, Path]]:
    """(path in the repo, local file) of what hub.what names in the run; one line when the run has none of it."""
    from qtune import integrity

    if what == "adapter":
        folder = run / "adapter"
    elif what == "merged":
        folder = run / "merged"
        if not (folder / "config.json").is_file():
            raise ConfigError(f"hub.what=merged: {folder} does not exist; run `qtune merge run={run}` first")
        integrity.check_model(folder, f"run `qtune merge run={run}` again to replace it")
    else:
        folder = run / "gguf"
        ggufs = sorted(folder.glob("*.gguf")) if folder.is_dir() else []
        if not ggufs:
            raise ConfigError(f"hub.what=gguf: no GGUF files in {folder}; make them with `qtune merge run={run} "
                              "merge.gguf=[q8_0]` (or f16)")
        return [(f.name, f) for f in sorted([*ggufs, *folder.glob("*.Modelfile")])]
    files = [f for f in sorted(folder.rglob("*")) if f.is_file()
             and not any(part.startswith(".") for part in f.relative_to(folder).parts)]
    return [(f.relative_to(folder).as_posix(), f) for f in files if f.relative_to(folder).as_posix() != "README.md"]


def token() -> str:
    from huggingface_hub import get_token

    t = get_token()
    if not t:
        raise PushError("no Hugging Face token: set HF_TOKEN to a write token (https://huggingface.co/settings/tokens) "
                        "or run `hf auth login`")
    return t


def push(run: Path, rcfg: Config, hub: HubConfig, files: list[tuple[str, Path]], tok: str, warn=None) -> Pushed:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants

    from qtune.export.card import model_card

    what = str(hub.what)
    api = HfApi(token=tok)
    revision = hub.revision or "main"
    extra = [("loss.png", run / "loss.png")] if (run / "loss.png").is_file() else []
    card = model_card(run, rcfg, what, hub.repo_id, [name for name, _ in files]).encode()
    names = {name for name, _ in files + extra} | {"README.md"}
    try:
        from huggingface_hub.errors import RevisionNotFoundError

        created = _create(api, hub)
        try:
            info, branch = api.repo_info(hub.repo_id, revision=revision), False
        except RevisionNotFoundError:  # a new branch, made from main once the push is known to go ahead
            info, branch = api.repo_info(hub.repo_id), True
        remote = {s.rfilename for s in info.siblings or []} - {".gitattributes"}
        foreign = sorted(remote - names)
        if foreign and not hub.overwrite:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise PushError(f"hub.repo_id={hub.repo_id} already holds other files ({shown}); push to a new repo, or set "
                            "hub.overwrite=true to replace its contents (the Hub keeps them in the repo's history)")
        if not created and hub.private and not info.private and warn:
            warn(f"hub.repo_id={hub.repo_id} exists and is public; hub.private applies to repos a push creates")
        ops = [CommitOperationAdd(name, _content(name, path, rcfg, what)) for name, path in files + extra]
        ops += [CommitOperationAdd("README.md", card)]
        ops += [CommitOperationDelete(name) for name in foreign]
        if branch:
            api.create_branch(hub.repo_id, branch=revision, exist_ok=True)
        message = hub.commit_message or f"qtune push: {what} of {run.name}"
        commit = api.create_commit(hub.repo_id, ops, commit_message=message, revision=revision)
    except QtuneError:
        raise
    except Exception as e:
        raise PushError(explain(e, hub, constants.ENDPOINT)) from None
    sizes = [(op.path_in_repo, op.upload_info.size) for op in ops if isinstance(op, CommitOperationAdd)]
    return Pushed(hub.repo_id, revision, commit.oid, f"{constants.ENDPOINT}/{hub.repo_id}", sizes, created)


def _content(name: str, path: Path, rcfg: Config, what: str):
    """What goes up for a file: the file itself, but for an adapter's config, which names its base by the folder it was
    loaded from on this machine, the base's Hub id (and revision) instead, so that PEFT finds the base anywhere."""
    from qtune.export.card import hub_base

    base = hub_base(rcfg)
    if what != "adapter" or name != "adapter_config.json" or not base:
        return str(path)
    import json

    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = base
    if rcfg.model.revision not in (None, "", "main"):
        config["revision"] = rcfg.model.revision
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


def _create(api, hub: HubConfig) -> bool:
    """create_repo; True when this push made the repo (409: it was there)."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        api.create_repo(hub.repo_id, private=hub.private)
        return True
    except HfHubHTTPError as e:
        if e.response is not None and e.response.status_code == 409:
            return False
        if e.response is not None and e.response.status_code in (401, 403):  # a repo one may write, but not create
            try:
                api.repo_info(hub.repo_id)
            except Exception:
                raise e from None
            return False
        raise


def explain(e: Exception, hub: HubConfig, endpoint: str) -> str:
    """One line for what the Hub (or the way to it) said."""
    chain = exception_chain(e)
    names = {type(c).__name__ for c in chain}
    status = next((c.response.status_code for c in chain if getattr(c, "response", None) is not None), None)
    said = next((c.response.headers.get("X-Error-Message") for c in chain if getattr(c, "response", None) is not None
                 and c.response.headers.get("X-Error-Message")), None)
    owner = hub.repo_id.split("/")[0]
    if "OfflineModeIsEnabled" in names:
        return "HF_HUB_OFFLINE=1: qtune push needs the Hub; unset HF_HUB_OFFLINE (or set it to 0)"
    if status == 401:
        return f"{endpoint} refused the token (401 Unauthorized); set HF_TOKEN to a valid write token"
    if status == 403:
        return (f"hub.repo_id={hub.repo_id}: the token may not write there (403 Forbidden"
                + (f": {said}" if said else "") + f"); use a write token of {owner} (or of a member with write "
                "access), or push to a repo of your own")
    if "RevisionNotFoundError" in names:
        return f"hub.revision={hub.revision}: no such branch in {hub.repo_id}, and it could not be made"
    if names & {"ConnectError", "ConnectTimeout", "TimeoutException", "ReadTimeout", "ConnectionError"}:
        return f"cannot reach {endpoint}; check the network or HF_ENDPOINT, then run the same command again (it resumes)"
    first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
    return (f"push to {hub.repo_id} failed" + (f" ({status})" if status else "") + f": {first}; run the same command "
            "again to resume (what reached the Hub is not sent twice)")
