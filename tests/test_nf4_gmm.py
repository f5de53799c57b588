"""The grouped matmul that reads bitsandbytes 4-bit experts directly (qtune.modeling.fast.nf4_gmm) against the
reference: dequantize_4bit, then each expert's rows times its 16-bit weights."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO


def _case(device, dtype, E, R, C, counts, seed=0):
    import bitsandbytes.functional as bnbf

    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(E, R, C, generator=g) * 0.02).to(device, dtype)
    q, st = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    wd = bnbf.dequantize_4bit(q, st).float()
    counts = torch.tensor(counts)
    ends = torch.cumsum(counts, 0).to(torch.int32).to(device)
    return q, st, wd, ends, int(counts.sum())


def _reference(x, wd, ends, transposed):
    starts = torch.cat([ends.new_zeros(1), ends[:-1]]).tolist()
    return torch.cat([x[a:b].float() @ (wd[e] if transposed else wd[e].t())
                      for e, (a, b) in enumerate(zip(starts, ends.tolist()))])


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


CPU_CHECK = """
import torch
from test_nf4_gmm import _case, _reference
from qtune.modeling.fast.nf4_gmm import nf4_gmm
# rows not a multiple of the tile, an empty expert, R not a multiple of BN, one and two absmax blocks a tile
for C in (192, 256):
    q, st, wd, ends, m = _case("cpu", torch.float32, 4, 96, C, [5, 0, 70, 3])
    for transposed in (False, True):
        for config in ((16, 32, 64, 4, 1), (32, 64, 128, 4, 1), (16, 128, 128, 4, 1)):
            x = torch.randn(m, 96 if transposed else C, generator=torch.Generator().manual_seed(1))
            got = nf4_gmm(x, q, st, ends, transposed=transposed, config=config)
            want = _reference(x, wd, ends, transposed)
            err = (got - want).abs().max().item()
            assert got.shape == want.shape and err < 1e-4 * want.abs().max().item(), (C, transposed, config, err)
print("ok")
"""


def test_nf4_gmm_kernel_in_tritons_interpreter():
    """The kernel's arithmetic on the CPU, in Triton's interpreter (fp32, exact up to the order of sums): runs where
    Triton is importable (not in CI, whose CPU torch carries no Triton; the GPU tests below run it compiled)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.skip("Triton is not installed here (the GPU tests run the kernel)")
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", CPU_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("shape", ["gate_up", "down", "small"])
def test_gpu_nf4_gmm_equals_dequantize_then_grouped_mm(transposed, shape):
    """bf16 on the GPU at Qwen3-30B-A3B's expert shapes (uneven routing, empty experts) and a small odd one: the same
    products as dequantizing and multiplying in fp32, within bf16's rounding of the output."""
    from qtune.modeling.fast.nf4_gmm import nf4_gmm

    E, R, C = {"gate_up": (128, 1536, 2048), "down": (128, 2048, 768), "small": (4, 96, 192)}[shape]
    g = torch.Generator().manual_seed(2)
    counts = [0, 3, 300, 1] + torch.randint(0, 200, (E - 4,), generator=g).tolist() if E > 4 else [5, 0, 70, 3]
    q, st, wd, ends, m = _case("cuda", torch.bfloat16, E, R, C, counts)
    x = torch.randn(m, R if transposed else C, generator=g).to("cuda", torch.bfloat16)
    got, want = nf4_gmm(x, q, st, ends, transposed=transposed), _reference(x, wd, ends, transposed)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert _rel(got, want) < 4e-3, _rel(got, want)


@pytest.mark.gpu
def test_gpu_nf4_gmm_replays_in_a_cuda_graph_with_new_routing():
    """Captured once, replayed with other group ends (each tile finds its expert on the device): each replay equals an
    eager call on the same routing."""
    from qtune.modeling.fast.nf4_gmm import nf4_gmm

    q, st, wd, ends, m = _case("cuda", torch.bfloat16, 8, 256, 512, [100, 0, 40, 200, 7, 1, 0, 164])
    x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
    nf4_gmm(x, q, st, ends)  # the first call compiles and reads the absmax offset, outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = nf4_gmm(x, q, st, ends)
    for seed in range(3):
        counts = torch.bincount(torch.randint(0, 8, (m,), generator=torch.Generator().manual_seed(seed)), minlength=8)
        ends.copy_(torch.cumsum(counts, 0).to(torch.int32))
        x.normal_()
        graph.replay()
        assert torch.equal(out, nf4_gmm(x, q, st, ends)), seed


@pytest.mark.gpu
def test_gpu_fused_4bit_experts_equal_the_dequantizing_path(monkeypatch):
    """The expert function on 4-bit experts through the fused kernel and through dequantize + grouped_mm (the path
    without Triton): same output and same input and LoRA gradients up to the order of bf16 sums, on A3B shapes."""
    from test_fast import _a3b_block, _cos

    from qtune.modeling.fast import experts as moe

    m, block = _a3b_block()
    moe.quantize_experts(m, "nf4")
    for n, p in m.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02, generator=torch.Generator("cuda").manual_seed(3))
    g = torch.Generator("cuda").manual_seed(4)
    x0 = torch.randn(1, 1024, 2048, device="cuda", dtype=torch.bfloat16, generator=g)
    experts = block.experts.base_layer.base_layer
    assert all(moe.fused(experts, n, x0) is not None for n in moe.PARAMS)  # the kernel takes both expert tensors
    results = {}
    for fused in (True, False):
        monkeypatch.setattr(moe, "FUSED_4BIT", fused)
        m.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        y = block(x)
        (y.float() * torch.linspace(-1, 1, y.shape[-1], device="cuda")).sum().backward()
        results[fused] = (y.detach(), x.grad, {n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    (y1, dx1, g1), (y0, dx0, g0) = results[True], results[False]
    assert _rel(y1, y0) < 1e-2, _rel(y1, y0)
    assert _cos(dx1, dx0) > 0.999, _cos(dx1, dx0)
    assert g1.keys() == g0.keys() and any("experts" in n for n in g1)
    for n in g1:
        assert _cos(g1[n], g0[n]) > 0.995, (n, _cos(g1[n], g0[n]))
