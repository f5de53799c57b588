"""What qtune prints, as a newcomer reads it: plain text into a pipe or a file (no escape codes, the trained spans
of `prepare --dry-run` still marked), the preference stages' figures beside the loss, train=cpu's log at every step,
serve's request lines, inspect-moe's fused experts, the GGUF conversion without progress bars, and W&B offline."""
from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from conftest import QTUNE, REPO, only_line, qtune

PAIRS = [f"data.path={REPO}/data/demo/preferences.jsonl",
         f"data.eval_path={REPO}/data/demo/preferences_held_out.jsonl", "data.max_length=128"]
ESC = "\x1b["
PLAIN = {"FORCE_COLOR": "", "TTY_COMPATIBLE": "", "NO_COLOR": ""}  # what the user's shell may set, unset here


def test_prepare_dry_run_into_a_pipe_is_plain_text_with_the_trained_spans_bracketed(tiny_qwen3):
    p = qtune("prepare", "--dry-run", "model=tiny_qwen3", "data=demo",
              f"data.path={REPO}/data/demo/captains_log.jsonl", env={**PLAIN, "TERM": "xterm-256color"})
    assert p.returncode == 0, p.stderr
    assert ESC not in p.stdout + p.stderr
    assert "⟦ ⟧ = trained on" in p.stdout
    # the answer is marked, the question is not
    assert re.search(r"⟦<think>.*?Captain's log: Paris is the capital of France\..*?⟧", p.stdout, re.S), p.stdout
    assert "⟦What is the capital of France" not in p.stdout


def test_prepare_dry_run_forced_colour_keeps_colour(tiny_qwen3):
    """FORCE_COLOR is the user's explicit choice: escape codes then, and colour instead of brackets."""
    p = qtune("prepare", "--dry-run", "model=tiny_qwen3", "data=demo",
              f"data.path={REPO}/data/demo/captains_log.jsonl", env={**PLAIN, "FORCE_COLOR": "1"})
    assert p.returncode == 0, p.stderr
    assert ESC in p.stdout and "⟦" not in p.stdout


def test_train_cpu_preset_composes():
    from qtune.config import compose, to_object

    t = to_object(compose(["train=cpu"])).train
    d = to_object(compose([])).train
    assert (t.grad_accum, t.logging_steps, t.gradient_checkpointing) == (1, 1, False)
    assert (t.save_steps, t.eval_steps) == (20, 20)
    assert t.lr == d.lr and t.report_to == d.report_to  # the rest is the default's


def test_no_gpu_suggests_the_cpu_preset_once_unless_chosen():
    from qtune.commands.train import _suggest_cpu_preset
    from qtune.config import compose, to_object

    said = []
    _suggest_cpu_preset(to_object(compose([])), said.append)
    assert len(said) == 1 and "train=cpu" in said[0] and "train.grad_accum=16" in said[0]
    said.clear()
    _suggest_cpu_preset(to_object(compose(["train=cpu"])), said.append)
    assert said == []


def test_dpo_on_train_cpu_into_a_file_logs_every_step_with_reward_figures(tmp_path, tiny_qwen3):
    """`qtune train ... > log`: plain text, a line per step (train=cpu) showing the reward accuracy and margin, and
    the summary line with the eval figures."""
    run = tmp_path / "dpo"
    p = qtune("train", "model=tiny_qwen3", "train=cpu", "train.stage=dpo", *PAIRS, "data.max_eval_samples=2",
              "train.max_steps=3", "train.warmup_ratio=0", "train.report_to=[]", f"train.output_dir={run}", env=PLAIN)
    assert p.returncode == 0, p.stderr
    assert ESC not in p.stdout + p.stderr
    steps = [x for x in p.stdout.splitlines() if x.startswith("step ")]
    assert [x.split()[1] for x in steps if " eval " not in x] == ["1/3", "2/3", "3/3"], p.stdout
    assert all("reward_accuracy " in x and "reward_margin " in x for x in steps), p.stdout
    assert any("eval_reward_accuracy " in x for x in steps), p.stdout
    done = next(x for x in p.stdout.splitlines() if x.startswith("done:"))
    summary = json.loads((run / "summary.json").read_text())
    assert f"eval reward_accuracy {summary['eval_reward_accuracy']:.4f}" in done, done
    assert f"eval reward_margin {summary['eval_reward_margin']:.4f}" in done, done
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert "train=cpu" not in p.stderr  # chosen: no suggestion


def test_moe_dense_mlp_names_are_information_while_the_fused_experts_train_and_a_warning_when_not(tmp_path):
    """lora.target_modules' defaults name gate_proj/up_proj/down_proj; an MoE model has none (fused experts)."""
    home = {"QTUNE_HOME": str(tmp_path), **PLAIN}
    p = qtune("train", "--dry-run", "model=qwen3_30b_a3b", env=home)
    assert p.returncode == 0, p.stderr
    assert "warning" not in p.stderr, p.stderr
    assert sum("has no such linear layers" in x for x in p.stdout.splitlines()) == 1, p.stdout
    p = qtune("inspect-moe", "model=qwen3_30b_a3b", "moe=none", env=home)     # nothing adapts the experts now
    assert p.returncode == 0, p.stderr
    assert [x.split("'")[1] for x in p.stderr.splitlines() if x.startswith("warning:")] == \
        ["gate_proj", "up_proj", "down_proj"], p.stderr
    assert "has no such linear layers" not in p.stdout


def test_converting_the_embedded_smollm2_draws_no_progress_bars(tmp_path):
    """The first use of model=smollm2_135m converts its GGUF file (in a fresh home here): no tqdm bar leaks into the
    verb's output (transformers' GGUF reader, its weight loading and its shard writer each draw one)."""
    p = qtune("download", "model=smollm2_135m", env={"QTUNE_HOME": str(tmp_path), **PLAIN})
    assert p.returncode == 0, p.stderr
    out = p.stdout + p.stderr
    assert "it/s" not in out and "%|" not in out and "\r" not in out, out
    assert "Converting and de-quantizing" not in out and "Loading weights" not in out, out
    assert (tmp_path / "models" / "smollm2_135m" / "config.json").is_file()  # converted here, not found in a cache


def _wandb_history(run_file) -> list[dict]:
    """The history rows an offline W&B run logged. Its .wandb file is a LevelDB-style log (a 7-byte ":W&B" header,
    then 32 KiB blocks of records, each a crc32, a length and a type: full, first, middle, last) of wandb's protobuf
    Records; wandb itself no longer ships a Python reader for it."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    block, head, i, buf, rows = 32768, 7, 7, b"", []
    while i + head <= len(data):
        if block - i % block < head:            # a block's tail too short for a record header is padding
            i += block - i % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[i:i + head])
        chunk, i = data[i + head:i + head + length], i + head + length
        if kind == 0:
            break
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            if record.WhichOneof("record_type") == "history":
                rows.append({(x.key or "/".join(x.nested_key)): json.loads(x.value_json) for x in record.history.item})
    return rows


def test_wandb_offline_run_keeps_the_logged_loss(tmp_path, tiny_qwen3):
    pytest.importorskip("wandb", reason="wandb is an optional extra (pip install 'qtune[wandb]')")
    run, wb = tmp_path / "run", tmp_path / "wandb-dir"
    wb.mkdir()
    p = qtune("train", "model=tiny_qwen3", "train=cpu", "data=demo", f"data.path={REPO}/data/demo/captains_log.jsonl",
              "train.max_steps=2", "train.report_to=[wandb]", f"train.output_dir={run}",
              env={**PLAIN, "WANDB_MODE": "offline", "WANDB_DIR": str(wb), "WANDB_SILENT": "false"})
    assert p.returncode == 0, p.stderr
    assert ESC not in p.stdout + p.stderr                               # wandb's closing lines too
    folders = list((wb / "wandb").glob("offline-run-*"))
    assert len(folders) == 1, list(wb.rglob("*"))
    logged = [r["train/loss"] for r in _wandb_history(next(folders[0].glob("run-*.wandb"))) if "train/loss" in r]
    ours = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert logged and logged == pytest.approx(ours), (logged, ours)


def test_a_reporter_that_is_not_installed_is_one_line_before_loading(tmp_path):
    import importlib.util

    if importlib.util.find_spec("comet_ml") is not None:
        pytest.skip("comet_ml is installed here")
    p = qtune("train", "model=tiny_qwen3", f"data.path={REPO}/data/demo/captains_log.jsonl",
              "train.report_to=[tensorboard,comet_ml]",
              f"train.output_dir={tmp_path / 'run'}", env=PLAIN)
    line = only_line(p)
    assert line.startswith("error: train.report_to=[comet_ml]: comet_ml is not installed here (pip install comet_ml)")
    assert "train.report_to=[tensorboard]" in line and not (tmp_path / "run").exists()


def test_chat_with_its_input_and_output_piped_writes_no_escape_codes(tiny_run):
    """`printf 'hello\\n' | qtune chat run=... | cat`: the REPL's prompt and the dimmed thinking are plain text."""
    p = subprocess.run([*QTUNE, "chat", f"run={tiny_run}", "chat.use=adapter", "chat.max_new_tokens=6",
                        "chat.temperature=0"], input="hello\n/think on\nhi\n", capture_output=True, text=True,
                       timeout=300, env={**os.environ, **PLAIN})
    assert p.returncode == 0, p.stderr
    assert ESC not in p.stdout + p.stderr
    assert p.stdout.count(">>> ") == 4 and "(thinking on)" in p.stdout, p.stdout
