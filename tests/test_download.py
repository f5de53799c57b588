"""`qtune download` against a real local HTTP server that speaks the Hub's API (HF_ENDPOINT)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import only_line, qtune, qtune_warm
from hubserver import FakeHub, folder_files

REPO_ID = "test-org/tiny-qwen3"


@pytest.fixture()
def hub(tiny_qwen3):
    files = folder_files(tiny_qwen3)
    files["README.md"] = b"# tiny\n"
    files["pytorch_model.bin"] = b"pickled weights must not be fetched by default"
    with FakeHub() as h:
        h.repo(REPO_ID).add_commit(files)
        yield h


def run_download(hub, tmp_path, *extra, env=None):
    return qtune("download", "model=tiny_qwen3", "model.source=hub", f"model.repo_id={REPO_ID}",
                 f"model.local_dir={tmp_path / 'model'}", *extra, cwd=tmp_path,
                 env={"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1",
                      "HF_HOME": str(tmp_path / "hf"), **(env or {})})


def test_full_download_is_verified_and_skips_pickles(hub, tmp_path, tiny_qwen3):
    p = run_download(hub, tmp_path, env={"HF_TOKEN": "hf_test_token"})
    assert p.returncode == 0, p.stderr
    local = tmp_path / "model"
    assert (local / "model.safetensors").read_bytes() == (tiny_qwen3 / "model.safetensors").read_bytes()
    assert (local / "tokenizer.json").is_file() and (local / "README.md").is_file()
    assert not (local / "pytorch_model.bin").exists()
    assert "files" in p.stdout and str(local) in p.stdout.replace("\n", "")
    assert any(r["auth"] == "Bearer hf_test_token" for r in hub.log), "token from the environment is sent"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(local)


def test_allow_pickle_fetches_bin(hub, tmp_path):
    p = run_download(hub, tmp_path, "download.allow_pickle=true")
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "model" / "pytorch_model.bin").is_file()


def test_resume_after_a_transfer_cut_mid_file(hub, tmp_path, tiny_qwen3):
    size = (tiny_qwen3 / "model.safetensors").stat().st_size
    hub.cut_after["model.safetensors"] = size // 3
    p = run_download(hub, tmp_path)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == (tiny_qwen3 / "model.safetensors").read_bytes()
    ranges = [r["range"] for r in hub.log if r["method"] == "GET" and r["path"].endswith("model.safetensors")]
    assert ranges[0] is None and len(ranges) == 2, ranges
    resumed_at = int(ranges[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= size // 3, ranges  # the retry asked only for what was missing


def test_pinned_revision(hub, tmp_path, tiny_qwen3):
    files = folder_files(tiny_qwen3)
    old = hub.repo(REPO_ID).add_commit({**files, "README.md": b"old revision\n"}, ref="v1")
    hub.repo(REPO_ID).add_commit({**files, "README.md": b"# newer\n"}, ref="main")
    p = run_download(hub, tmp_path, f"model.revision={old}")
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "model" / "README.md").read_bytes() == b"old revision\n"


def test_dry_run_lists_files_and_fetches_nothing(hub, tmp_path):
    p = run_download(hub, tmp_path, "--dry-run")
    assert p.returncode == 0, p.stderr
    assert "model.safetensors" in p.stdout and "pytorch_model.bin" not in p.stdout
    assert not (tmp_path / "model" / "model.safetensors").exists()


def test_offline_uses_complete_local_copy(hub, tmp_path):
    assert run_download(hub, tmp_path).returncode == 0
    p = qtune("download", "model=tiny_qwen3", "model.source=hub", f"model.repo_id={REPO_ID}",
              f"model.local_dir={tmp_path / 'model'}", cwd=tmp_path,
              env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")})
    assert p.returncode == 0, p.stderr
    assert "local copy" in p.stderr


@pytest.mark.parametrize("overrides, endpoint, fragment", [
    ([f"model.repo_id=test-org/missing"], None, "model.repo_id=test-org/missing: repository not found"),
    (["model.revision=nope"], None, "model.revision=nope: no such revision"),
    ([], "http://127.0.0.1:9", "cannot reach http://127.0.0.1:9"),
])
def test_errors_are_one_line(hub, tmp_path, overrides, endpoint, fragment):
    args = ["download", "model=tiny_qwen3", "model.source=hub", f"model.repo_id={REPO_ID}",
            f"model.local_dir={tmp_path / 'model'}", *overrides]
    p = qtune(*args, cwd=tmp_path, env={"HF_ENDPOINT": endpoint or hub.url, "HF_HUB_OFFLINE": "0",
                                        "HF_HOME": str(tmp_path / "hf")})
    assert p.returncode == 1, p.stdout + p.stderr
    assert fragment in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_missing_shard_is_caught(tmp_path, tiny_qwen3):
    from qtune.modeling.hub import verify
    from qtune.errors import DownloadError

    local = tmp_path / "m"
    shutil.copytree(tiny_qwen3, local)
    (local / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(DownloadError, match="2 shard"):
        verify(local)


def test_embedded_model_resolves_from_its_package(smollm2, tmp_path):
    p = qtune_warm("download", cwd=tmp_path, check=True)
    assert "smollm2_135m" in p.stdout and "model.safetensors" in p.stdout


def test_disk_space_is_checked_before_fetching(hub, tmp_path):
    p = run_download(hub, tmp_path, "download.min_free_gib=1000000")
    assert p.returncode == 1 and "not enough disk space" in p.stderr
    assert not (tmp_path / "model" / "model.safetensors").exists()


def test_a_copy_that_lost_its_weights_is_one_line_offline_and_fetched_again_online(hub, tmp_path, tiny_qwen3):
    assert run_download(hub, tmp_path).returncode == 0
    (tmp_path / "model" / "model.safetensors").unlink()
    p = qtune("chat", "model=tiny_qwen3", "model.source=hub", f"model.repo_id={REPO_ID}",
              f"model.local_dir={tmp_path / 'model'}", "--prompt", "hi", cwd=tmp_path,
              env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")})
    assert only_line(p) == (f"error: {tmp_path / 'model'} is incomplete (no weights: model.safetensors is missing) and "
                            "http://127.0.0.1:9 cannot be reached to fetch it again; once it can: `qtune download "
                            f"model=tiny_qwen3 model.repo_id={REPO_ID} model.local_dir={tmp_path / 'model'}`")
    assert run_download(hub, tmp_path).returncode == 0
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == (tiny_qwen3 / "model.safetensors").read_bytes()


def test_download_makes_a_built_model_that_lost_its_weights_again(tmp_path, tiny_qwen3):
    """A tiny model (model.source=random) is built again; the verbs that use it refuse it meanwhile
    (tests/test_errors.py)."""
    local = tmp_path / "m"
    shutil.copytree(tiny_qwen3, local)
    (local / "model.safetensors").unlink()
    qtune_warm("download", "model=tiny_qwen3", f"model.local_dir={local}", cwd=tmp_path, check=True)
    assert (local / "model.safetensors").read_bytes() == (tiny_qwen3 / "model.safetensors").read_bytes()  # seeded
