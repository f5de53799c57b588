"""Grouped matmuls that read bitsandbytes 4-bit experts in their loads (kernel: qtune.modeling.fast._triton_nf4_gmm).

Dequantizing a layer's experts before `grouped_mm` writes 1.2 GB of 16 bits for Qwen3-30B-A3B and reads it back, in
the forward, the checkpoint's recompute and the backward; with ~128 routed rows an expert those matmuls are bound by
that weight traffic. Here the weights cross memory in 4 bits and no 16-bit copy exists. Exact against bitsandbytes'
`dequantize_4bit` followed by `grouped_mm` up to the order of fp32 sums (tests/test_nf4_gmm.py).
"""
from __future__ import annotations

import functools

import torch

# (BM, BN, BK, warps, stages) for the forward (x·W_eᵀ) and the transposed product (dY·W_e); measured on the H100
# over bench/nf4_gmm_microbench.py's configurations at Qwen3-30B-A3B's shapes
FORWARD = (128, 128, 128, 8, 3)
TRANSPOSED = (128, 128, 64, 4, 3)


@functools.cache
def available() -> bool:
    try:
        import triton.language as tl
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except Exception:  # noqa: BLE001 (no Triton for this machine: dequantize + grouped_mm instead)
        return False
    return hasattr(tl, "interleave") and hasattr(tl, "gather")


@functools.cache
def _hopper_or_later(index: int) -> bool:
    """The kernel's loads go through the tensor-memory accelerator, and it was built and measured on Hopper (sm_90)."""
    return torch.cuda.get_device_capability(index) >= (9, 0)


def expected(method: str, capability: tuple[int, int] | None = None) -> bool:
    """Whether a training run would read its `quant.method` experts in 4 bits (the dry run's estimate): NF4, with
    Triton and a Hopper-or-later GPU. capability: that GPU's (CUDA builds of torch bring Triton); None: this machine's
    GPU, or, on a machine without one, an H100 (the 80 GiB GPU qtune.training.distributed assumes there)."""
    if method != "nf4":
        return False
    if capability is not None:
        return capability >= (9, 0)
    if not torch.cuda.is_available():
        return True
    return available() and _hopper_or_later(torch.cuda.current_device())


def supports(x: torch.Tensor, state) -> bool:
    """Whether the kernel can take these weights: NF4 on a Hopper-or-later GPU, blocks of 64 that never cross a row
    (C % 64 == 0) and double-quantized absmax, as qtune.modeling.fast.experts.quantize_experts keeps them, and rows of
    16-byte multiples for the tensor-memory accelerator (R % 8 == 0). Anything else is dequantized instead."""
    return (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and getattr(state, "quant_type", None) == "nf4"
            and getattr(state, "nested", False) and state.blocksize == 64 and len(state.shape) == 3
            and state.shape[2] % 64 == 0 and state.shape[1] % 8 == 0 and available()
            and _hopper_or_later(x.device.index if x.device.index is not None else torch.cuda.current_device()))


def _offset(state) -> float:
    """The double-quantized absmax's offset as a Python number: read once (a host sync) at the first call, which runs
    eagerly before any graph is captured."""
    cached = getattr(state, "_qtune_offset", None)
    if cached is None:
        cached = state._qtune_offset = float(state.offset)
    return cached


def _fit(bn: int, bk: int, c: int, transposed: bool) -> tuple[int, int]:
    """The tile's extent along C (BN transposed, else BK): at least 64 (one absmax block), halved until it divides C."""
    along = max(bn if transposed else bk, 64)
    while along > 64 and c % along:
        along //= 2
    return (along, bk) if transposed else (bn, along)


def nf4_gmm(x: torch.Tensor, packed: torch.Tensor, state, ends: torch.Tensor, transposed: bool = False,
            config: tuple[int, int, int, int, int] | None = None) -> torch.Tensor:
    """x (M, C) in rows sorted by expert ending at `ends` (E,), W (E, R, C) in bitsandbytes 4-bit (packed, state):
    x·W_eᵀ -> (M, R); transposed: x (M, R) -> x·W_e (M, C)."""
    import triton
    from triton.tools.tensor_descriptor import TensorDescriptor

    from qtune.modeling.fast._triton_nf4_gmm import nf4_gmm_kernel

    e, r, c = state.shape
    bm, bn, bk, warps, stages = config or (TRANSPOSED if transposed else FORWARD)
    bn, bk = _fit(bn, bk, c, transposed)
    x = x.contiguous()
    if x.data_ptr() % 16:  # a view at an odd offset: the tensor-memory accelerator reads from 16-byte boundaries
        x = x.clone()
    width = c if transposed else r
    out = torch.empty(x.shape[0], width, dtype=x.dtype, device=x.device)
    # the weight tile: (BK rows r, BN columns c) transposed, else (BN rows, BK columns), as packed bytes
    tile = (bk, bn // 2) if transposed else (bn, bk // 2)
    s2 = state.state2
    grid = ((triton.cdiv(x.shape[0], bm) + e) * triton.cdiv(width, bn),)
    nf4_gmm_kernel[grid](TensorDescriptor.from_tensor(x, [bm, bk]), out,
                         TensorDescriptor.from_tensor(packed.view(e * r, c // 2), list(tile)), state.absmax, s2.code,
                         s2.absmax, _offset(state), state.code, ends.to(torch.int32), e, r, c,
                         r if transposed else c, width, out.stride(0), TRANS=transposed,
                         EP=triton.next_power_of_2(e), BM=bm, BN=bn, BK=bk, num_warps=warps, num_stages=stages)
    return out
