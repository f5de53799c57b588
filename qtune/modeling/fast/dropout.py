"""Seeded LoRA dropout for the fast path: each projection's mask is a function of the step's seed and the
projection's own salt, so nothing is saved and nothing depends on the RNG's position.

Why: PEFT draws each mask from the global generator, and reentrant checkpointing saves and restores that
generator's state around every layer so the recompute draws the same masks. Inside a CUDA graph
(qtune.modeling.fast.graph) that does not hold: a replay cannot restore a host-side generator state, so the
recompute would silently draw other masks than the forward. Here the forward, the checkpoint's recompute and the
backward (which needs the mask again for dX) all regenerate the same mask from (seed, salt), and a replayed graph
reads the seed from device memory, which is refreshed before every step.

On CUDA the mask is drawn by a Triton kernel (Philox, four numbers a call) that applies it in the same pass; elsewhere, and
when Triton is missing, by torch's generator seeded from (seed, salt). The two give different masks with the same
distribution; a CUDA graph needs the Triton kernel (it reads the seed on the device).
"""
from __future__ import annotations

import functools

import torch


class Seed:
    """The dropout seed of the current training forward, on the host and (on CUDA) in device memory. `refresh()` draws
    a new one from torch's CPU generator (so `set_seed` and a resumed run's restored RNG state reproduce it); it runs
    at the start of every training forward that keeps gradients (qtune.modeling.fast.lora.patch hooks the backbone)
    and, in a CUDA graph, before every replay. While a graph is captured it is `frozen`: a refresh then would bake one
    seed into every replay."""

    def __init__(self, device: torch.device):
        self.value = 0
        self.frozen = False
        self.tensor = torch.zeros((), dtype=torch.int64, device=device) if device.type == "cuda" else None

    def refresh(self) -> None:
        if self.frozen:
            return
        self.value = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        if self.tensor is not None:
            self.tensor.fill_(self.value)


def apply(x: torch.Tensor, seed: Seed, salt: int, p: float) -> torch.Tensor:
    """x · mask / (1 − p), the mask keeping each element with probability 1 − p; the same (seed, salt) gives the same
    mask for every tensor of x's shape (the forward's input and the backward's gradient alike)."""
    if x.is_cuda and seed.tensor is not None and triton_ok():
        return _triton_apply(x, seed.tensor, salt, p)
    g = torch.Generator(x.device).manual_seed((seed.value * 1_000_003 + salt) % 2**63)
    keep = torch.rand(x.shape, generator=g, device=x.device) >= p
    return x * keep.to(x.dtype) * (1.0 / (1.0 - p))


@functools.cache
def triton_ok() -> bool:
    """Whether the Triton kernel can run (a CUDA graph with dropout needs it)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001 (no Triton for this machine: torch's generator instead)
        return False
    return True


BLOCK = 1024


def _triton_apply(x: torch.Tensor, seed: torch.Tensor, salt: int, p: float) -> torch.Tensor:
    if x.numel() >= 2**33:  # Philox's counter is an int32 index of a group of four elements
        raise ValueError(f"seeded dropout takes fewer than 2^33 elements a call, got {x.numel()}")
    x = x.contiguous()
    out = torch.empty_like(x)
    n = x.numel()
    from qtune.modeling.fast._triton_dropout import dropout_kernel  # imports Triton: only on CUDA

    with torch.cuda.device(x.device):
        dropout_kernel[((n + 4 * BLOCK - 1) // (4 * BLOCK),)](x, out, seed, salt, n, p, 1.0 / (1.0 - p), BLOCK=BLOCK)
    return out
