"""The memory estimate at long context: against measured GPU peaks, the longest data.max_length the dry run states,
train.max_gpu_memory and the out-of-memory message. Qwen3-8B is built on the meta device: shapes, no weights."""
from __future__ import annotations

from dataclasses import replace

import pytest

from conftest import one_line_error, qtune_warm

GIB = 2**30


def cfg_of(*over):
    from qtune.config import compose, to_object

    return to_object(compose(["model=qwen3_8b", "quant=nf4", *over]))


@pytest.fixture(scope="module")
def qwen3_8b():
    from qtune.modeling.arch import meta_model

    return meta_model(cfg_of().model.arch)


# Qwen3-8B nf4, LoRA r16 on the 7 projections, batch 1, gradient checkpointing, through qtune's CLI on an H200
# (torch.cuda.max_memory_allocated, docs/benchmarks.md): (data.max_length, GiB, whether the layer inputs were offloaded)
MEASURED = ((2048, 6.11, False), (8192, 7.85, True), (32768, 13.27, True))


@pytest.mark.parametrize("length,gib,offloaded", MEASURED)
def test_the_estimate_is_within_ten_percent_of_measured_peaks(qwen3_8b, length, gib, offloaded):
    """The allocator's part of the estimate (what max_memory_allocated counts: the total less the CUDA context) within
    10 % of what the GPU measured, at the decisions that run made (a CUDA graph at 2048, offloading from 8192)."""
    from qtune.modeling.plan import plan

    p = plan(cfg_of("lora.r=16", f"data.max_length={length}"), model=qwen3_8b)
    assert p.offload is offloaded
    assert p.single.allocated / GIB == pytest.approx(gib, rel=0.10)


def test_at_long_context_one_layers_working_set_dominates(qwen3_8b):
    """With offloading, the estimate grows by one layer's recompute-and-backward working set a token plus the two layer
    inputs on the GPU (not by all 36 inputs), and the loss's phase is not added on top of it."""
    from qtune.modeling.estimate import LAYER_BACKWARD, LAYER_INPUT, LAYER_SAVED
    from qtune.modeling.plan import plan

    arch = cfg_of().model.arch
    a, b = (plan(cfg_of(f"data.max_length={n}"), model=qwen3_8b).single.activations for n in (32768, 65536))
    per_token = 2 * (LAYER_SAVED.values(arch) + LAYER_BACKWARD.values(arch) + 2 * LAYER_INPUT.values(arch))
    assert (b - a) / 32768 == pytest.approx(per_token)
    # the MLP's 12,288-wide intermediates are most of it
    assert LAYER_SAVED.ffn * arch.intermediate_size > LAYER_SAVED.values(arch) / 2
    kept = plan(cfg_of("data.max_length=32768", "train.offload_activations=false"), model=qwen3_8b).single.activations
    assert kept - a == pytest.approx((36 - 2) * 32768 * 4096 * 2)


def test_the_longest_length_is_where_the_estimate_stops_fitting(qwen3_8b):
    """capacity(): the estimate at the longest length fits the budget and one step (128 tokens) more does not; a higher
    LoRA rank fits less, more memory fits more."""
    from qtune.modeling.plan import CAPACITY_STEP, capacity, plan

    def total(cfg, n):
        return plan(replace(cfg, data=replace(cfg.data, max_length=n)), model=qwen3_8b).memory.total

    # (capped at 24 GiB, the plan weighs train.head_on_host=auto against 24 GiB, as capacity() does)
    r16, r32 = cfg_of("lora.r=16", "train.max_gpu_memory=24"), cfg_of("lora.r=32")
    c = capacity(r16, 24 * GIB, model=qwen3_8b)
    assert c.tokens % CAPACITY_STEP == 0 and c.tokens > 8192 and not c.host_limits
    assert total(r16, c.tokens) <= 24 * GIB < total(r16, c.tokens + CAPACITY_STEP)
    assert capacity(r32, 24 * GIB, model=qwen3_8b).tokens < c.tokens < capacity(r16, 80 * GIB, model=qwen3_8b).tokens
    # every layer input on the GPU (no offload): just above what 4096 tokens need fits 4096 and no more (with the head
    # on the GPU: train.head_on_host=auto would move it to host memory for a budget so tight, and fit more)
    kept = cfg_of("lora.r=16", "train.offload_activations=false", "train.head_on_host=false")
    small = capacity(kept, total(kept, 4096) + 1, model=qwen3_8b)
    assert small.tokens == 4096 and small.host_per_token == 0
    # train.head_on_host=auto and train.offload_activations=auto: the tight budget moves the output head to host memory,
    # and past 8192 tokens the layer inputs too (the estimate drops where those switch), so the same budget fits more
    longer = capacity(cfg_of("lora.r=16"), total(kept, 4096) + 1, model=qwen3_8b)
    assert longer.tokens > 8192 and longer.host_per_token == 36 * 4096 * 2
    assert capacity(r16, 2 * GIB, model=qwen3_8b).tokens == 0  # the 4-bit weights alone take more


def test_host_memory_limits_the_length_when_it_is_shorter(qwen3_8b):
    """The offloaded inputs take 36 layers x 4096 x 2 bytes a token of pinned host memory: with 20 GiB of it, that is
    what limits an 80 GiB GPU."""
    from qtune.modeling.plan import CAPACITY_STEP, capacity

    c = capacity(cfg_of(), 80 * GIB, host_budget=20 * GIB, model=qwen3_8b)
    assert c.host_per_token == 36 * 4096 * 2 and c.host_limits
    assert c.tokens == (20 * GIB // c.host_per_token) // CAPACITY_STEP * CAPACITY_STEP
    assert c.gpu_tokens == capacity(cfg_of(), 80 * GIB, model=qwen3_8b).tokens > c.tokens


def test_the_dry_run_states_the_longest_length_for_the_cap(tmp_path, qwen3_8b):
    """train.max_gpu_memory=24: the dry run's line names the cap and the longest data.max_length for it (the figure
    capacity() finds, less any host-memory limit), and the JSON result holds it."""
    import re

    from qtune.commands.train import plan as dry_plan
    from qtune.modeling.plan import capacity

    p = qtune_warm("train", "--dry-run", "model=qwen3_8b", "quant=nf4", "lora.r=32", "train.max_gpu_memory=24",
                   check=True)
    line = next(x for x in p.stdout.splitlines() if x.startswith("longest data.max_length that fits"))
    assert "24.00 GiB of GPU memory: train.max_gpu_memory=24" in line
    stated = int(re.search(r"fits: ([\d,]+) tokens", line).group(1).replace(",", ""))
    gpu_alone = capacity(cfg_of("lora.r=32", "train.max_gpu_memory=24"), 24 * GIB, model=qwen3_8b).tokens
    assert stated == gpu_alone or ("host memory limits it" in line and stated < gpu_alone)
    assert "131,072 with model.rope_scaling=yarn" in line or stated <= 40960
    result = dry_plan(cfg_of("lora.r=32", "train.max_gpu_memory=24"))
    assert result["capacity"]["gpu_max_length"] == gpu_alone and result["capacity"]["budget_bytes"] == 24 * GIB


def test_max_gpu_memory_is_checked(monkeypatch):
    """A negative cap is refused at compose time, a cap above the GPU before anything loads; 0 means the whole GPU;
    on a GPU the cap becomes the process's memory fraction."""
    import torch

    from qtune.errors import ConfigError
    from qtune.modeling import world

    p = qtune_warm("train", "--dry-run", "model=qwen3_8b", "train.max_gpu_memory=-1")
    assert "train.max_gpu_memory=-1" in one_line_error(p)
    assert cfg_of("train.max_gpu_memory=0").train.max_gpu_memory is None

    class Props:
        total_memory = 24 * GIB

    fractions = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: Props())
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, i: fractions.append((f, i)))
    with pytest.raises(ConfigError, match=r"train.max_gpu_memory=30: this GPU has 24.00 GiB"):
        world.cap_gpu(30, "cuda:0")
    world.cap_gpu(12, "cuda:0")
    assert fractions == [(0.5, 0)]
    assert world.gpu_budget(12) == 12 * GIB and world.gpu_budget(None) == world.USABLE_SHARE * 24 * GIB
    assert world.gpu_budget(23.9) == world.USABLE_SHARE * 24 * GIB  # never past the usable share


def test_the_out_of_memory_message_names_the_longest_length(monkeypatch):
    """The OOM line's data.max_length is the longest the estimate fits in the budget, where that is shorter; where the
    estimate said the length fits (and the GPU still ran out), half of it."""
    from qtune.commands import train
    from qtune.modeling import world
    from qtune.modeling.plan import capacity

    monkeypatch.setattr(world, "host_bytes_available", lambda: None)
    cfg = cfg_of("data.max_length=32768", "train.max_gpu_memory=12")
    longest = capacity(cfg, 12 * GIB).tokens
    assert 8192 < longest < 32768
    assert f"data.max_length={longest} (the longest the estimate fits)" in train._oom_message(cfg)
    assert "data.max_length=1024," in train._oom_message(cfg_of("data.max_length=2048"))
