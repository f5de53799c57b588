"""Several processes on CPU (gloo), through the real CLI: `train.nproc=2` against one process with the same global batch
(DDP, and FSDP2 where accelerate is let to run it on CPU), kill -9 of a two-process run resumed by one process, a
two-process run folder read by `chat`; the GPU runs behind the `gpu` marker.

Tolerance: two processes all-reduce their gradients and gather their losses, one process accumulates the same rows in
another order, so sums may differ in the last bits of fp32; each logged loss must match to 1e-5 relative (measured
with torch 2.13 on CPU: DDP's losses equal one process's to the last bit). The data (128-token packs of the demo set)
is packed unevenly on purpose: a step's two rows hold between 22 and 78 tokens that count, so the loss per token is
right only if tokens are counted over all processes; with each process normalizing by its own count (transformers'
average_tokens_across_devices=False) the two-process losses move by up to 2.2e-4 relative, and these tests fail.

The commands run through conftest's qtune_warm (forked from a process that has imported the libraries; the processes
that a two-process run launches start fresh), except those given another environment, killed mid-run or on a GPU.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import QTUNE, REPO, qtune, qtune_warm

TOL = 1e-5
SHIM = REPO / "tests" / "fsdp_on_cpu"  # lets accelerate run FSDP2 on CPU processes (see its docstring)
ARGS = [f"data.path={REPO}/data/demo/captains_log.jsonl", f"data.eval_path={REPO}/data/demo/held_out.jsonl",
        "data.max_length=128", "data.max_samples=33",  # 12 packed rows: global batches of 2 fill every step
        "train.logging_steps=1", "train.warmup_ratio=0", "train.report_to=[]", "train.gradient_checkpointing=false",
        "train.max_steps=8", "train.save_steps=2", "train.lr=5e-3",
        "lora.dropout=0"]  # dropout draws masks per process: one process cannot draw two processes' masks


def tiny(out: Path, *extra: str) -> list[str]:
    return ["train", "model=tiny_qwen3", *ARGS, f"train.output_dir={out}", *extra]


def rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def by_step(run: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in rows(run) if key in r}


def assert_same_curve(one: Path, other: Path, tokens_to: int = 8) -> None:
    """The same loss at every step; the same token counts up to step tokens_to (TRL's count of tokens starts again
    from zero after a resume, with one process as with several)."""
    a, b = by_step(one, "loss"), by_step(other, "loss")
    assert sorted(a) == sorted(b) == list(range(1, 9)), (a, b)  # every step once: none lost or repeated
    for step in a:
        assert abs(a[step] - b[step]) <= TOL * a[step], (step, a[step], b[step])
    ta, tb = by_step(one, "tokens"), by_step(other, "tokens")
    assert all(ta[k] == tb[k] for k in range(1, tokens_to + 1)), (ta, tb)  # tokens counted over all processes


def assert_same_adapter(one: Path, other: Path) -> None:
    from safetensors.torch import load_file

    ta, tb = (load_file(str(r / "adapter" / "adapter_model.safetensors")) for r in (one, other))
    assert ta.keys() == tb.keys()
    # 4e-4 of a tensor's largest value: DDP averages the two processes' gradients where one process accumulates them,
    # the same sums in another order; eight AdamW steps (which divide by the root of tiny second moments) carry those
    # last-bit differences to ~1e-4 of the weights on some CPUs (2.3e-6 of a 0.023 lora_B here)
    for k in ta:
        assert (ta[k] - tb[k]).abs().max() <= 4e-4 * max(ta[k].abs().max(), 1e-3), k


@pytest.fixture(scope="module")
def reference(tiny_qwen3, tmp_path_factory) -> Path:
    """One process, global batch 2 (train.batch_size 1 × train.grad_accum 2)."""
    run = tmp_path_factory.mktemp("one") / "run"
    qtune_warm(*tiny(run, "train.grad_accum=2"), check=True)
    return run


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_the_plan_gives_memory_per_gpu_for_the_world_and_strategy(tmp_path):
    """train --dry-run with train.nproc: DDP keeps a replica per GPU, FSDP2 a quarter of the weights and adapter states
    (plus the two layers being gathered); auto picks DDP while one GPU holds the run (a 32B in nf4), FSDP2 when it
    cannot (a 32B in 16-bit needs ~66 GiB, over 90 % of the 80 GiB assumed without a GPU: here, DDP; 235B: FSDP2)."""
    from qtune.config import compose, to_object
    from qtune.commands.train import plan

    def mem(*overrides):
        return plan(to_object(compose(["model=qwen3_32b", "quant=nf4", *overrides])))["memory"]

    # one process without CUDA graphs (with them the untied input embedding table lives in host memory, one
    # process only): what each of several processes holds a replica or a shard of
    one, ddp, fsdp = (mem("train.cuda_graphs=false"), mem("train.nproc=4", "train.distributed=ddp"),
                      mem("train.nproc=4", "train.distributed=fsdp"))
    arch = to_object(compose(["model=qwen3_32b"])).model.arch
    assert one["base_bytes"] - mem()["base_bytes"] == arch.vocab_size * arch.hidden_size * 2
    assert (one["strategy"], ddp["strategy"], fsdp["strategy"]) == ("single", "ddp", "fsdp")
    assert ddp["base_bytes"] == one["base_bytes"] and ddp["lora_bytes"] > one["lora_bytes"]
    assert fsdp["base_bytes"] == pytest.approx(one["base_bytes"] / 4 + 2 * one["base_bytes"] / 64)
    assert fsdp["lora_bytes"] == pytest.approx(one["lora_bytes"] / 4) and fsdp["total_bytes"] < one["total_bytes"] / 2
    assert mem("train.nproc=4")["strategy"] == "ddp"
    # adapters per parameter: bf16 weights, gradients and AdamW moments under quantization (TRL's cast), and under FSDP2
    # of a 16-bit model fp32 for the fused experts' too (accelerate's master weights); sharded over the four
    params = plan(to_object(compose(["model=qwen3_30b_a3b"])))["trainable_params"]
    for quant, per_param in (("quant=nf4", 8), ("quant=none", 16)):
        moe = plan(to_object(compose(["model=qwen3_30b_a3b", quant, "train.nproc=4", "train.distributed=fsdp"])))
        assert moe["memory"]["lora_bytes"] == pytest.approx(params * per_param / 4)
    big = plan(to_object(compose(["model=qwen3_235b_a22b", "quant=nf4", "train.nproc=8"])))["memory"]
    assert big["strategy"] == "fsdp" and big["world_size"] == 8
    p = qtune_warm("train", "--dry-run", "model=qwen3_32b", "quant=nf4", "train.nproc=4", "train.distributed=fsdp",
                   env={"QTUNE_HOME": str(tmp_path)})
    assert p.returncode == 0 and "estimated memory per GPU (fsdp, 4 processes" in p.stdout, p.stdout + p.stderr


@pytest.mark.slow
def test_two_processes_give_the_losses_of_one_with_the_same_global_batch(tmp_path, reference):
    import yaml

    run = tmp_path / "two"
    p = qtune_warm(*tiny(run, "train.nproc=2", "train.grad_accum=1"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "2 processes (ddp, gloo); global batch 2 = train.batch_size 1 × train.grad_accum 1 × 2 processes" in p.stdout
    assert p.stdout.count("done: 8 steps") == 1 and p.stdout.count("training tiny_qwen3") == 1  # rank 0 speaks
    assert_same_curve(reference, run)
    assert abs(summary(run)["eval_loss"] - summary(reference)["eval_loss"]) <= TOL * summary(reference)["eval_loss"]
    assert_same_adapter(reference, run)
    world = {"world_size": 2, "strategy": "ddp", "backend": "gloo", "batch_size": 1, "grad_accum": 1, "global_batch": 2}
    assert summary(run)["distributed"] == world
    assert yaml.safe_load((run / "config.yaml").read_text())["distributed"] == world
    assert summary(reference)["distributed"]["global_batch"] == 2
    ck = run / "checkpoints" / "checkpoint-8"
    assert (ck / "rng_state_0.pth").is_file() and (ck / "rng_state_1.pth").is_file()  # each process's RNG, one writer
    assert len([r for r in rows(run) if "loss" in r]) == 8  # one metrics row a step: rank 0 alone writes

    # the run folder reads like any other
    c = qtune_warm("chat", f"run={run}", "--prompt", "Hello", "chat.max_new_tokens=2", "chat.temperature=0")
    assert c.returncode == 0, c.stderr


@pytest.mark.slow
def test_fsdp2_on_two_cpu_processes_gives_the_losses_of_one(tmp_path, reference):
    """accelerate refuses FSDP on CPU (qtune says so in one line: test_errors); with the one switch that accelerate sets
    for GPUs set for CPU too (tests/fsdp_on_cpu), qtune's FSDP2 path runs for real on gloo: sharded LoRA model,
    FSDP checkpoints, the adapter gathered from the shards, sample generation on both processes in lockstep."""
    run = tmp_path / "fsdp"
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(SHIM), os.environ.get("PYTHONPATH")) if p)}
    p = qtune(*tiny(run, "train.nproc=2", "train.grad_accum=1", "train.distributed=fsdp",
                    "train.sample_prompts=[Hello]", "train.sample_max_new_tokens=3"), env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "2 processes (fsdp, gloo)" in p.stdout and "FSDP2 takes the reference path" in p.stdout
    assert_same_curve(reference, run)
    assert_same_adapter(reference, run)
    ck = run / "checkpoints" / "checkpoint-8"
    assert (ck / "optimizer.bin").is_file() and (ck / "pytorch_model_fsdp.bin").is_file()  # accelerate's FSDP format
    assert (ck / "adapter_model.safetensors").is_file()  # and a plain adapter beside it (full state dict)
    s = summary(run)
    assert s["distributed"]["strategy"] == "fsdp" and len(s["samples"]["after"]) == 1


@pytest.mark.slow
def test_moe_on_the_fast_path_under_ddp_gives_the_losses_of_one_process(tmp_path, tiny_qwen3_moe):
    """DDP over what the GPU path uses: reentrant activation checkpointing, qtune's fused LoRA functions, MoE experts as
    grouped matmuls with their adapters (one tensor each, so every adapter takes part in every step and DDP need not
    search for unused parameters), all run on CPU with train.fast=true."""
    fast = ["train.fast=true", "train.gradient_checkpointing=true", "train.max_steps=4", "train.save_steps=4"]
    one, two = tmp_path / "one", tmp_path / "two"
    qtune_warm("train", "model=tiny_qwen3_moe", *ARGS, *fast, f"train.output_dir={one}", "train.grad_accum=2",
               check=True)
    p = qtune_warm("train", "model=tiny_qwen3_moe", *ARGS, *fast, f"train.output_dir={two}", "train.grad_accum=1",
                   "train.nproc=2")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "grouped-matmul experts" in p.stdout and "2 processes (ddp, gloo)" in p.stdout
    a, b = by_step(one, "loss"), by_step(two, "loss")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert abs(a[step] - b[step]) <= TOL * a[step], (step, a[step], b[step])


def _tree(pid: int) -> list[int]:
    """pid and its descendants, from /proc (the launched processes run in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


@pytest.mark.slow
def test_kill_9_of_two_processes_then_one_process_continues_the_curve(tmp_path, reference):
    run = tmp_path / "run"
    proc = subprocess.Popen([*QTUNE, *tiny(run, "train.nproc=2", "train.grad_accum=1")], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
    first = run / "checkpoints" / "checkpoint-2" / "trainer_state.json"
    deadline = time.time() + 300
    while not first.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "no checkpoint in 300 s"
        time.sleep(0.05)
    assert json.loads((run / ".lock").read_text())["pid"] == proc.pid  # the launcher holds the folder for its processes
    for pid in _tree(proc.pid):  # the whole run at once, as a machine that loses power
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    assert not (run / "adapter").exists()

    # resumed by one process: the checkpoint's global batch of 2 is kept with train.grad_accum=2, or refused
    line = [x for x in qtune_warm(*tiny(run, "train.grad_accum=1")).stderr.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and "was trained with a global batch of 2 (1 × 1 × 2 processes), this run's is 1" in line[0]
    assert "train.grad_accum=2 with 1 process" in line[0]
    p = qtune_warm(*tiny(run, "train.grad_accum=2"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert not (run / ".lock").exists()
    s = summary(run)
    assert s["resumed_from"] in (2, 4, 6) and f"resuming from {run / 'checkpoints'}" in p.stdout
    assert s["distributed"]["world_size"] == 1 and s["distributed"]["global_batch"] == 2
    assert_same_curve(reference, run, tokens_to=s["resumed_from"])
    assert_same_adapter(reference, run)


# ---------------------------------------------------------------- on a GPU (the device machine: pytest -m gpu)

# the device machine's rule for every process: NVLink multicast stays off (it can take a shared host's GPUs down)
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
GPU = ["train", "model=tiny_qwen3", "quant=nf4", *ARGS[:4], "train.max_steps=4", "train.save_steps=2",
       "train.logging_steps=1", "train.report_to=[]", "train.grad_accum=1"]


@pytest.mark.gpu
def test_torchrun_one_gpu_nf4(tmp_path, tiny_qwen3):
    """The launcher's path on one GPU: torchrun with one process (LOCAL_RANK set, NCCL), QLoRA (nf4), then chat on
    the run it wrote."""
    import sys

    run = tmp_path / "ddp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m", "qtune"]
    p = subprocess.run([*torchrun, *GPU, f"train.output_dir={run}", "train.distributed=ddp"], capture_output=True,
                       text=True, timeout=900, env={**os.environ, **NO_MULTICAST})
    assert p.returncode == 0, p.stdout + p.stderr
    s = summary(run)
    assert s["steps"] == 4 and s["distributed"]["strategy"] == "single"
    lo = by_step(run, "loss")
    assert sorted(lo) == [1, 2, 3, 4] and all(v == v for v in lo.values())
    c = qtune("chat", f"run={run}", "--prompt", "Hello", "chat.max_new_tokens=2", "chat.temperature=0")
    assert c.returncode == 0, c.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_fsdp2_on_one_gpu_trains_through_a_checkpoint_after_an_evaluation_and_resumes(tmp_path, tiny_qwen3, quant):
    """FSDP2 under torchrun with one process, 16-bit and 4-bit: an evaluation then a checkpoint at step 2, and the step
    after them (it failed with "aten.embedding.default got mixed torch.Tensor and DTensor" before
    qtune.training.distributed.unshard_skipped_units, on torch 2.11); the adapter gathered and a sample generated after the last
    evaluation; then a resume from that checkpoint gives the same losses. bench/fsdp_gpu_check.py runs the same by
    hand (and, with --without-fix, shows the failure)."""
    import math
    import shutil
    import sys

    run = tmp_path / "f"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m", "qtune"]
    cmd = [*torchrun, *(a for a in GPU if not a.startswith("quant=")), f"quant={quant}", "train.eval_steps=2",
           "lora.dropout=0", "train.sample_prompts=[Hello]", "train.sample_max_new_tokens=3",
           f"train.output_dir={run}", "train.distributed=fsdp"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, **NO_MULTICAST})
    assert p.returncode == 0, p.stdout + p.stderr
    assert "1 process (fsdp, nccl)" in p.stdout, p.stdout
    lo, ev = by_step(run, "loss"), by_step(run, "eval_loss")
    assert sorted(lo) == [1, 2, 3, 4] and all(math.isfinite(v) for v in lo.values()), lo
    assert sorted(ev) == [2, 4] and all(math.isfinite(v) for v in ev.values()), ev
    ck = run / "checkpoints" / "checkpoint-2"
    assert (ck / "pytorch_model_fsdp.bin").is_file() and (ck / "adapter_model.safetensors").is_file()
    s = summary(run)
    assert s["steps"] == 4 and s["distributed"]["strategy"] == "fsdp" and len(s["samples"]["after"]) == 1

    # resumed from the checkpoint written right after the evaluation at step 2
    shutil.rmtree(run / "adapter")
    shutil.rmtree(run / "checkpoints" / "checkpoint-4")
    (run / "summary.json").unlink()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, **NO_MULTICAST})
    assert r.returncode == 0, r.stdout + r.stderr
    s = summary(run)
    assert s["resumed_from"] == 2 and s["steps"] == 4
    again = by_step(run, "loss")
    for step in (3, 4):
        assert math.isfinite(again[step]) and abs(again[step] - lo[step]) <= 1e-2 * lo[step], (step, again, lo)


@pytest.mark.gpu
def test_nproc_uses_every_visible_gpu_or_says_why_not(tmp_path, tiny_qwen3):
    """train.nproc=2: on a machine of one GPU, one line (each process needs its own GPU); with two or more, DDP."""
    import torch

    run = tmp_path / "two"
    p = qtune(*GPU, f"train.output_dir={run}", "train.nproc=2", timeout=900, env=NO_MULTICAST)
    if torch.cuda.device_count() < 2:
        assert p.returncode != 0 and "train.nproc=2: 1 CUDA GPU is visible" in p.stderr, p.stderr
        return
    assert p.returncode == 0, p.stdout + p.stderr
    assert "2 processes (ddp, nccl)" in p.stdout and summary(run)["distributed"]["world_size"] == 2
