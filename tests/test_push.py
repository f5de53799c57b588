"""`qtune push` against a real local HTTP server that speaks the Hub's upload API (tests/hubserver.py, HF_ENDPOINT):
the bytes that arrive on the server are the run's, the card describes the run, a push that stopped is resumed without
sending its large files again, and a repo of other content is refused unless hub.overwrite=true."""
from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from conftest import only_line, qtune
from hubserver import FakeHub

TOKEN = "hf_write_token"


@pytest.fixture()
def hub():
    with FakeHub(writers={TOKEN: {"me", "test-org"}}) as h:
        yield h


@pytest.fixture()
def run(tiny_run, tmp_path):
    shutil.copytree(tiny_run, tmp_path / "run")
    return tmp_path / "run"


def push(hub, tmp_path, run, *extra, token=TOKEN):
    return qtune("push", f"run={run}", *extra, cwd=tmp_path,
                 env={"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": token,
                      "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_PROGRESS_BARS": "1"})


def served(hub, repo_id, ref="main") -> dict[str, bytes]:
    repo = hub.repos[repo_id]
    return repo.commits[repo.resolve(ref)]


def lfs_puts(hub) -> list[dict]:
    return [r for r in hub.log if r["method"] == "PUT"]


def test_an_adapter_arrives_whole_with_its_card_loss_plot_and_eval_table(hub, tmp_path, run):
    (run / "eval").mkdir()   # what `qtune eval` leaves (qtune.evaluation.report.write_report), lm-eval scores included
    (run / "eval" / "summary.json").write_text(json.dumps({
        "run": str(run), "date": "2026-01-01T00:00:00+00:00", "heldout_rows": 3, "unscored": [],
        "models": {"base": {"heldout_loss": 11.5, "lm_eval/tiny_qa/acc": 0.25},
                   "adapter": {"heldout_loss": 9.25, "lm_eval/tiny_qa/acc": 0.5}}}))
    p = push(hub, tmp_path, run, "hub.repo_id=me/tiny-adapter")
    assert p.returncode == 0, p.stderr
    files = served(hub, "me/tiny-adapter")
    adapter = run / "adapter"
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert files[name] == (adapter / name).read_bytes(), name          # byte for byte, as the server holds them
    assert files["loss.png"] == (run / "loss.png").read_bytes()
    assert hub.repos["me/tiny-adapter"].private                          # made private by default
    # the weights went through the LFS batch API and one PUT of their own
    sha = hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert any(r["path"] == f"/lfs-upload/{sha}" for r in lfs_puts(hub))
    assert all(r["auth"] == f"Bearer {TOKEN}" for r in hub.log if r["method"] == "POST")
    card = files["README.md"].decode()
    summary = json.loads((run / "summary.json").read_text())
    data = json.loads((run / "data.json").read_text())
    assert card.startswith("---\n") and "library_name: peft" in card and "- qtune" in card
    assert "captains_log.jsonl" in card and f"| {data['train']['kept']:,} |" in card   # sources and counts
    assert f"{summary['train_loss']:.4g}" in card and "![training and held-out loss](loss.png)" in card
    assert "r=16, alpha=32" in card and "AutoPeftModelForCausalLM" in card
    assert "| metric | base | adapter |" in card and "| held-out loss | 11.5000 | 9.2500 |" in card, card
    assert "| tiny_qa acc (lm-eval) | 0.2500 | 0.5000 |" in card, card
    assert "me/tiny-adapter" in p.stdout and "created" in p.stdout
    # pushed again (after more training, say): the repo holds only what a push of this kind writes, so it is updated
    assert push(hub, tmp_path, run, "hub.repo_id=me/tiny-adapter").returncode == 0


def test_a_push_that_stopped_is_resumed_without_sending_the_weights_again(hub, tmp_path, run):
    hub.fail_commits = 1   # every file reaches the server, then the commit fails
    p = push(hub, tmp_path, run, "hub.repo_id=me/resumed")
    line = only_line(p)
    assert line.startswith("error: push to me/resumed failed (500)") and "run the same command again" in line, line
    assert set(served(hub, "me/resumed")) == {".gitattributes"}           # nothing of the push shows meanwhile
    sent = {r["path"] for r in lfs_puts(hub)}
    hub.log.clear()
    p = push(hub, tmp_path, run, "hub.repo_id=me/resumed")
    assert p.returncode == 0, p.stderr
    assert lfs_puts(hub) == [], "the LFS objects the server holds are not sent twice"
    assert sent and served(hub, "me/resumed")["adapter_model.safetensors"] == \
        (run / "adapter" / "adapter_model.safetensors").read_bytes()


def _from_the_hub(run):
    """The run as if its base had come from the Hub (model.source=hub): its config.yaml names test-org/tiny-qwen3."""
    import yaml

    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["model"].update(source="hub", repo_id="test-org/tiny-qwen3", revision="abc123")
    (run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))


def test_a_repo_of_other_content_is_refused_unless_overwrite(hub, tmp_path, run):
    _from_the_hub(run)
    hub.repo("test-org/busy").add_commit({".gitattributes": b"", "notes.txt": b"mine", "model.safetensors": b"other"})
    line = only_line(push(hub, tmp_path, run, "hub.repo_id=test-org/busy"))
    assert line == ("error: hub.repo_id=test-org/busy already holds other files (model.safetensors, notes.txt); push to "
                    "a new repo, or set hub.overwrite=true to replace its contents (the Hub keeps them in the repo's "
                    "history)"), line
    p = push(hub, tmp_path, run, "hub.repo_id=test-org/busy", "hub.overwrite=true", "hub.revision=v1")
    assert p.returncode == 0, p.stderr
    files = served(hub, "test-org/busy", "v1")                             # on the branch it made
    assert "notes.txt" not in files and "model.safetensors" not in files and "adapter_model.safetensors" in files
    assert served(hub, "test-org/busy", "main")["notes.txt"] == b"mine"
    # the adapter names its base by its Hub id, not by the folder it was loaded from here; the card does too
    config = json.loads(files["adapter_config.json"])
    local = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config == {**local, "base_model_name_or_path": "test-org/tiny-qwen3", "revision": "abc123"}
    assert "base_model: test-org/tiny-qwen3\n" in files["README.md"].decode()


def test_merged_and_gguf_files_with_a_card_for_each(hub, tmp_path, run, tiny_qwen3):
    merged = run / "merged"
    shutil.copytree(tiny_qwen3, merged)   # a complete model folder, as `qtune merge` leaves one
    p = push(hub, tmp_path, run, "hub.repo_id=me/tiny-merged", "hub.what=merged", "hub.private=false")
    assert p.returncode == 0, p.stderr
    files = served(hub, "me/tiny-merged")
    assert files["model.safetensors"] == (merged / "model.safetensors").read_bytes()
    assert "library_name: transformers" in files["README.md"].decode() and not hub.repos["me/tiny-merged"].private
    (run / "gguf").mkdir()
    (run / "gguf" / "merged-q8_0.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 64)
    (run / "gguf" / "merged-q8_0.Modelfile").write_text("FROM ./merged-q8_0.gguf\n")
    p = push(hub, tmp_path, run, "hub.repo_id=me/tiny-gguf", "hub.what=gguf")
    assert p.returncode == 0, p.stderr
    files = served(hub, "me/tiny-gguf")
    assert files["merged-q8_0.gguf"] == (run / "gguf" / "merged-q8_0.gguf").read_bytes()
    assert "ollama create tiny-gguf -f merged-q8_0.Modelfile" in files["README.md"].decode()
