"""One autograd function per LoRA linear layer, and one per SwiGLU MLP block whose three projections carry LoRA:
y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ, with hand-written backwards.

Why: PEFT's LoRA forward on a bitsandbytes layer is a dozen small operations and a few hundred lines of Python
per projection (input casts, a defensive clone, the 4-bit matmul's own autograd node, two adapter linears, a
scale, an add), repeated for 7 projections x 36 layers x (forward, recompute, backward). At 2048 tokens a step
that Python, not the GPU, sets the pace (docs/benchmarks.md). Here a projection is: dequantize W (bitsandbytes'
own kernel), one matmul, one small matmul and one fused add-matmul (addmm) for the adapter; the backward computes
dX, dA and dB with four matmuls. A 4-bit W dequantized in a checkpoint's recompute is kept for the backward that
follows at once (one layer's 16-bit weights held for a moment); dequantized in a plain forward, or under `lean`
(patch), it is not kept, and the backward dequantizes it again. The MLP function does
gate, up, SiLU(gate)·up and down in one autograd node and keeps only gate's and up's outputs for the backward.

The modules stay PEFT's (same parameters, names, save/load, merge); only forwards are replaced, and they fall
back to PEFT's own forward whenever a call is not plain LoRA (adapters disabled or merged, several adapters,
DoRA or another variant, per-call adapter names).

Dropout is seeded (qtune.modeling.fast.dropout): each projection has its own salt, the step its seed, and the mask is
regenerated from the two in the checkpoint's recompute and in the backward instead of being saved.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from qtune.modeling.fast import dropout

N_SAVED = 5  # tensors a projection saves: xd, xa, A, B, W (or None)


def _weight(base, dtype: torch.dtype) -> torch.Tensor:
    """The base layer's weight (out, in) in `dtype`: 4-bit weights dequantized by bitsandbytes."""
    w = base.weight
    state = getattr(w, "quant_state", None)
    if state is not None:
        import bitsandbytes.functional as bnbf

        w = bnbf.dequantize_4bit(w.data, state)
    return w if w.dtype == dtype else w.to(dtype)


class _OneGroup:
    """A dense layer's bitsandbytes 4-bit state seen as one expert's, (1, out, in): the shape the grouped 4-bit
    kernel (qtune.modeling.fast.nf4_gmm) reads; the layout is the same (the weight flattened row by row)."""

    def __init__(self, state):
        self.state, self.shape = state, (1, *state.shape)

    def __getattr__(self, name):
        return getattr(self.state, name)


# The grouped kernel's tiles for a forward without gradients (decoding: tens of rows): 64-row tiles, and 64 outputs a
# program so that a projection's weight streams through as many programs as there are SMs' worth of it
DECODE_TILES = (64, 64, 128, 4, 3)
DECODE_ROWS = 256        # up to this many rows a call reads W in 4 bits; more (a scoring forward) dequantizes it


def _four_bit_product(base, x2):
    """x·Wᵀ with a 4-bit W read in 4 bits by the grouped kernel (no 16-bit copy of W written), or None where it cannot
    run (not NF4 with double quantization, no Triton/Hopper, a shape it does not take, many rows)."""
    state = getattr(base.weight, "quant_state", None)
    if state is None or x2.shape[0] > DECODE_ROWS or not x2.is_cuda:
        return None
    view = getattr(base, "_qtune_one_group", None)
    if view is None:
        from qtune.modeling.fast import nf4_gmm

        view = _OneGroup(state) if len(state.shape) == 2 else False
        base._qtune_one_group = view = view if view and nf4_gmm.supports(x2, view) else False
    if view is False:
        return None
    from qtune.modeling.fast.nf4_gmm import nf4_gmm

    ends = torch.full((1,), x2.shape[0], dtype=torch.int32, device=x2.device)
    return nf4_gmm(x2, base.weight.data, view, ends, config=DECODE_TILES)


class _Proj:
    """One LoRA projection's forward and backward math on 2-D inputs (N, in); the autograd functions below
    call it so a single projection and a whole MLP block share the same arithmetic. `infer`: a forward without
    gradients (no autograd node follows), where a 4-bit W is read in 4 bits when the kernel can."""

    __slots__ = ("base", "a", "b", "s", "drop", "lean", "redraw", "dtypes", "xd", "xa", "w", "infer")

    def __init__(self, base, A, B, scaling: float, drop, dtype, lean: bool, infer: bool = False):
        self.base, self.s, self.drop, self.lean = base, scaling, drop, lean    # drop: (Seed, salt, p) or None
        self.redraw = lean and drop is not None   # keep dropout's input (xd holds x), draw its output again
        self.a, self.b = A.to(dtype), B.to(dtype)
        self.dtypes = (A.dtype, B.dtype)
        self.infer = infer

    def forward(self, x2):
        y = _four_bit_product(self.base, x2) if self.infer else None
        if y is not None:
            self.w = None
        else:
            w = _weight(self.base, x2.dtype)
            # Inside a backward (reentrant checkpointing's recompute) this layer's backward comes next: keep W. A
            # 16-bit W is the parameter itself and always kept.
            self.w = w if (w is self.base.weight or not self.lean and torch._C._current_graph_task_id() != -1) else None
            y = x2 @ w.t()
        if self.base.bias is not None:
            y += self.base.bias.to(y.dtype)
        xd = dropout.apply(x2, *self.drop) if self.drop else x2
        self.xa = xd @ self.a.t()
        self.xd = x2 if self.redraw else xd
        return y.addmm_(self.xa, self.b.t(), alpha=self.s)

    def tensors(self):
        return [self.xd, self.xa, self.a, self.b, self.w]

    def restore(self, tensors):
        self.xd, self.xa, self.a, self.b, self.w = tensors

    def backward(self, dy2, need_x: bool, need_a: bool, need_b: bool):
        s = self.s
        dyb = dy2 @ self.b                                                   # (N, r)
        dB = (dy2.t() @ self.xa).mul_(s).to(self.dtypes[1]) if need_b else None
        dA = None
        if need_a:
            xd = dropout.apply(self.xd, *self.drop) if self.redraw else self.xd
            dA = (dyb.t() @ xd).mul_(s).to(self.dtypes[0])
            del xd
        dx = None
        if need_x:
            dx = dy2 @ (self.w if self.w is not None else _weight(self.base, self.xd.dtype))
            if self.drop is None:
                dx.addmm_(dyb, self.a, alpha=s)
            else:                                                            # the same mask, drawn again
                dx.add_(dropout.apply(dyb @ self.a, *self.drop), alpha=s)
        return dx, dA, dB


class LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, A, B, base, scaling: float, drop, lean: bool):
        proj = _Proj(base, A, B, scaling, drop, x.dtype, lean)
        y = proj.forward(x.reshape(-1, x.shape[-1]))
        ctx.save_for_backward(*proj.tensors())
        proj.restore([None] * N_SAVED)
        ctx.proj, ctx.shape = proj, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        proj = ctx.proj
        proj.restore(ctx.saved_tensors)
        dy2 = dy.reshape(-1, dy.shape[-1]).to(proj.xd.dtype)
        dx, dA, dB = proj.backward(dy2, *ctx.needs_input_grad[:3])
        return (dx.view(ctx.shape) if dx is not None else None), dA, dB, None, None, None, None


class LoraSwiGLU(torch.autograd.Function):
    """down(SiLU(gate(x)) · up(x)) with LoRA on all three projections, as one autograd node."""

    @staticmethod
    def forward(ctx, x, Ag, Bg, Au, Bu, Ad, Bd, bases, scalings, drops, lean: bool):
        dtype = x.dtype
        projs = [_Proj(base, A, B, s, d, dtype, lean) for base, A, B, s, d in
                 zip(bases, (Ag, Au, Ad), (Bg, Bu, Bd), scalings, drops)]
        x2 = x.reshape(-1, x.shape[-1])
        g = projs[0].forward(x2)
        u = projs[1].forward(x2)
        y = projs[2].forward(F.silu(g) * u)
        saved = [g, u]
        for proj in projs:
            saved += proj.tensors()
            proj.restore([None] * N_SAVED)
        ctx.save_for_backward(*saved)
        ctx.projs, ctx.shape = projs, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        g, u, *rest = ctx.saved_tensors
        projs = ctx.projs
        for i, proj in enumerate(projs):
            proj.restore(rest[N_SAVED * i:N_SAVED * (i + 1)])
        need = ctx.needs_input_grad
        dy2 = dy.reshape(-1, dy.shape[-1]).to(g.dtype)
        dh, dAd, dBd = projs[2].backward(dy2, True, need[5], need[6])
        du = dh * F.silu(g)
        dg = torch.ops.aten.silu_backward(dh.mul_(u), g)                     # dh·u·SiLU'(g) in one kernel
        dxg, dAg, dBg = projs[0].backward(dg, need[0], need[1], need[2])
        dxu, dAu, dBu = projs[1].backward(du, need[0], need[3], need[4])
        dx = dxg.add_(dxu).view(ctx.shape) if need[0] else None
        return dx, dAg, dBg, dAu, dBu, dAd, dBd, None, None, None, None


def supported(module) -> bool:
    """A PEFT LoRA linear layer over a 16-bit nn.Linear or a bitsandbytes 4-bit layer (int8 stays on PEFT's path)."""
    base = getattr(module, "base_layer", None)
    if base is None or not hasattr(module, "lora_A") or not isinstance(getattr(base, "weight", None), torch.Tensor):
        return False
    if type(module).__name__ not in ("Linear", "Linear4bit") or not isinstance(base, torch.nn.Linear):
        return False
    w = base.weight
    return w.dim() == 2 and (w.dtype.is_floating_point or getattr(w, "quant_state", None) is not None)


def _plain(module, args, kwargs):
    """(adapter name, dropout p) when this call is plain LoRA on one adapter, else None."""
    adapters = module.active_adapters
    if (args or kwargs or module.disable_adapters or module.merged or len(adapters) != 1
            or adapters[0] not in module.lora_A or adapters[0] in module.lora_variant):
        return None
    name = adapters[0]
    drop = module.lora_dropout[name]
    return name, (drop.p if isinstance(drop, torch.nn.Dropout) and module.training else 0.0)


def _dtype(x):
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def _drop(module, p: float):
    """The seeded dropout of a patched module's call: (seed, salt, p), or None without dropout."""
    return (module._qtune_seed, module._qtune_salt, p) if p > 0 else None


def _forward(self, x, *args, **kwargs):
    plain = _plain(self, args, kwargs)
    if plain is None:
        return type(self).forward(self, x, *args, **kwargs)
    name, p = plain
    dtype = _dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        if not torch.is_grad_enabled():   # no backward to come: the math alone, no autograd node
            x = x.to(dtype)
            proj = _Proj(self.base_layer, self.lora_A[name].weight, self.lora_B[name].weight, float(self.scaling[name]),
                         _drop(self, p), dtype, True, infer=True)
            y = proj.forward(x.reshape(-1, x.shape[-1]))
            return y.view(*x.shape[:-1], y.shape[-1])
        return LoraLinear.apply(x.to(dtype), self.lora_A[name].weight, self.lora_B[name].weight, self.base_layer,
                                float(self.scaling[name]), _drop(self, p), self._qtune_lean)


def _mlp_forward(self, x):
    mods = (self.gate_proj, self.up_proj, self.down_proj)
    plains = [_plain(m, (), {}) for m in mods]
    if any(pl is None for pl in plains) or len({pl[0] for pl in plains}) != 1:
        return type(self).forward(self, x)
    name = plains[0][0]
    dtype = _dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        if not torch.is_grad_enabled():   # no backward to come: the math alone, no autograd node
            x = x.to(dtype)
            g, u, d = (_Proj(m.base_layer, m.lora_A[name].weight, m.lora_B[name].weight, float(m.scaling[name]),
                             _drop(m, pl[1]), dtype, True, infer=True) for m, pl in zip(mods, plains))
            x2 = x.reshape(-1, x.shape[-1])
            y = d.forward(F.silu(g.forward(x2)) * u.forward(x2))
            return y.view(*x.shape[:-1], y.shape[-1])
        return LoraSwiGLU.apply(x.to(dtype), *[t for m in mods for t in (m.lora_A[name].weight, m.lora_B[name].weight)],
                                tuple(m.base_layer for m in mods), tuple(float(m.scaling[name]) for m in mods),
                                tuple(_drop(m, pl[1]) for m, pl in zip(mods, plains)), self.down_proj._qtune_lean)


def _swiglu_mlp(module) -> bool:
    """An MLP block computing down(SiLU(gate(x)) · up(x)) (Qwen3, Llama) whose three projections we support."""
    act = getattr(module, "act_fn", None)
    return (all(supported(getattr(module, n, None)) for n in ("gate_proj", "up_proj", "down_proj"))
            and type(act).__name__ in ("SiLU", "SiLUActivation") and type(module).__name__.endswith("MLP")
            and "forward" not in vars(module))  # a forward patched already (liger's SwiGLU) is left alone


def patch(peft_model, lean: bool = False) -> tuple[int, int]:
    """Give every supported LoRA linear layer the fused forward, and every SwiGLU MLP whose projections all carry
    LoRA the fused block; returns (linear layers, MLP blocks) patched. Each patched layer gets a dropout salt, and the
    model one dropout seed, refreshed at the start of every training forward that keeps gradients (`seed_of`).
    By default a 4-bit W dequantized in a checkpoint's recompute is kept for the backward (a third of the dequantizing
    gone, one layer's 16-bit weights held for a moment: 0.36 GiB for Qwen3-8B), and dropout's output is kept for dA.
    lean (where memory is what counts: offloaded activations): the backward dequantizes W again, and each projection
    keeps dropout's input instead of its output (one tensor shared by the projections reading the same input, where
    each kept its own output) and draws the mask again."""
    layers = blocks = 0
    seed = seed_of(peft_model)
    for module in peft_model.modules():
        if supported(module):
            module.forward = types.MethodType(_forward, module)
            module._qtune_seed, module._qtune_salt, module._qtune_lean = seed, layers, lean
            layers += 1
        elif _swiglu_mlp(module):
            module.forward = types.MethodType(_mlp_forward, module)
            blocks += 1
    return layers, blocks


def seed_of(peft_model) -> dropout.Seed:
    """The model's dropout seed (made, with the hook that refreshes it, on first use). The hook sits on the backbone
    (the decoder stack), which every training forward calls once and a checkpoint's recompute never calls, so the
    recompute and the backward see the forward's seed."""
    seed = getattr(peft_model, "_qtune_dropout_seed", None)
    if seed is None:
        device = next(peft_model.parameters()).device
        seed = dropout.Seed(device)
        base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
        backbone = getattr(base, getattr(base, "base_model_prefix", ""), None)
        target = backbone if isinstance(backbone, torch.nn.Module) else base

        def refresh(module, args):
            if module.training and torch.is_grad_enabled():
                seed.refresh()

        target.register_forward_pre_hook(refresh)
        peft_model._qtune_dropout_seed = seed
    return seed


def unpatch(peft_model) -> None:
    for module in peft_model.modules():
        if "forward" in vars(module) and getattr(module.forward, "__func__", None) in (_forward, _mlp_forward):
            del module.forward
