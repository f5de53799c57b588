"""One autograd function per LoRA linear layer: y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ, with a hand-written backward.

Why: PEFT's LoRA forward on a bitsandbytes layer is a dozen small operations and a few hundred lines of Python
per projection (input casts, a defensive clone, the 4-bit matmul's own autograd node, two adapter linears, a
scale, an add), repeated for 7 projections x 36 layers x (forward, recompute, backward). At 2048 tokens a step
that Python, not the GPU, sets the pace. Here a layer is: dequantize W (bitsandbytes' own kernel), one matmul,
one small matmul and one fused add-matmul (addmm) for the adapter; the backward dequantizes W again instead
of keeping it, and computes dX, dA and dB with four matmuls. Nothing is kept that the reference does not keep.

The module stays PEFT's (same parameters, names, save/load, merge); only its forward is replaced, and it falls
back to PEFT's own forward whenever the call is not plain LoRA (adapters disabled or merged, several adapters,
DoRA or another variant, per-call adapter names).
"""
from __future__ import annotations

import types

import torch


def _weight(base, dtype: torch.dtype) -> torch.Tensor:
    """The base layer's weight (out, in) in `dtype`: 4-bit weights dequantized by bitsandbytes."""
    w = base.weight
    state = getattr(w, "quant_state", None)
    if state is not None:
        import bitsandbytes.functional as bnbf

        w = bnbf.dequantize_4bit(w.data, state)
    return w if w.dtype == dtype else w.to(dtype)


class LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, A, B, base, scaling: float, p: float):
        dtype = x.dtype
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        y = x2 @ _weight(base, dtype).t()
        if base.bias is not None:
            y += base.bias.to(dtype)
        a, b = A.to(dtype), B.to(dtype)
        mask = None
        if p > 0:
            mask = torch.empty_like(x2).bernoulli_(1 - p).div_(1 - p)
            xd = x2 * mask
        else:
            xd = x2
        xa = xd @ a.t()
        y.addmm_(xa, b.t(), alpha=scaling)
        ctx.save_for_backward(xd, xa, a, b, mask)
        ctx.base, ctx.scaling, ctx.shape = base, scaling, shape
        ctx.dtypes = (A.dtype, B.dtype)
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        xd, xa, a, b, mask = ctx.saved_tensors
        s = ctx.scaling
        dy2 = dy.reshape(-1, dy.shape[-1]).to(xd.dtype)
        dyb = dy2 @ b                                                   # (N, r)
        dx = dA = dB = None
        if ctx.needs_input_grad[2]:
            dB = (dy2.t() @ xa).mul_(s).to(ctx.dtypes[1])
        if ctx.needs_input_grad[1]:
            dA = (dyb.t() @ xd).mul_(s).to(ctx.dtypes[0])
        if ctx.needs_input_grad[0]:
            dx = dy2 @ _weight(ctx.base, xd.dtype)
            if mask is None:
                dx.addmm_(dyb, a, alpha=s)
            else:
                dx.add_((dyb @ a).mul_(mask), alpha=s)
            dx = dx.view(ctx.shape)
        return dx, dA, dB, None, None, None


def supported(module) -> bool:
    """A PEFT LoRA linear layer over a 16-bit nn.Linear or a bitsandbytes 4-bit layer (int8 stays on PEFT's path)."""
    base = getattr(module, "base_layer", None)
    if base is None or not hasattr(module, "lora_A") or not isinstance(getattr(base, "weight", None), torch.Tensor):
        return False
    if type(module).__name__ not in ("Linear", "Linear4bit") or not isinstance(base, torch.nn.Linear):
        return False
    w = base.weight
    return w.dim() == 2 and (w.dtype.is_floating_point or getattr(w, "quant_state", None) is not None)


def _forward(self, x, *args, **kwargs):
    adapters = self.active_adapters
    if (args or kwargs or self.disable_adapters or self.merged or len(adapters) != 1
            or adapters[0] not in self.lora_A or adapters[0] in self.lora_variant):
        return type(self).forward(self, x, *args, **kwargs)
    name = adapters[0]
    drop = self.lora_dropout[name]
    p = drop.p if isinstance(drop, torch.nn.Dropout) and self.training else 0.0
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    with torch.autocast(x.device.type, enabled=False):
        y = LoraLinear.apply(x.to(dtype), self.lora_A[name].weight, self.lora_B[name].weight, self.base_layer,
                             float(self.scaling[name]), float(p))
    return y


def patch(peft_model) -> int:
    """Give every supported LoRA linear layer the fused forward; returns how many were patched."""
    n = 0
    for module in peft_model.modules():
        if supported(module):
            module.forward = types.MethodType(_forward, module)
            n += 1
    return n


def unpatch(peft_model) -> None:
    for module in peft_model.modules():
        if "forward" in vars(module) and getattr(module.forward, "__func__", None) is _forward:
            del module.forward
