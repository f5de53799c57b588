"""MoE experts on the fast path: grouped matmuls over the routed tokens, LoRA split, and 4-bit expert weights.

PEFT adapts a fused expert tensor W (E, out, in) with a ParamWrapper that forms the whole delta B_e·A_e for all
E experts on every forward (E x out x in, as large as the experts themselves) and runs transformers' eager
loop over experts. Here one autograd function computes a whole expert block on the tokens routed to it:

    h  = x·W_guᵀ + s·(x·A_guᵀ)·B_guᵀ          gate and up, as grouped matmuls over the tokens sorted by expert
    y  = a·W_dᵀ  + s·(a·A_dᵀ)·B_dᵀ            a = SiLU(gate)·up

with a hand-written backward that recomputes SiLU·up from h and the weights rather than keeping them. The
adapter is PEFT's own parameters, read in PEFT's layout (lora_A (E·r, in) grouped by expert: expert e owns rows
e·r … e·r+r-1; lora_B (out, r·E) grouped by rank: expert e owns the columns c with c mod E = e), so saving,
loading, `PeftModel.from_pretrained` and merging stay PEFT's.

4-bit experts (`quant=nf4|fp4` on CUDA): bitsandbytes leaves fused 3-D expert tensors in 16 bits (its layers are
nn.Linear only), which is most of an MoE model. `quantize_experts` keeps them as bitsandbytes blockwise 4-bit
(blocks of 64 along each expert's rows). Where Triton runs, the base products x·W_eᵀ and dY·W_e are grouped matmuls
that read the 4-bit weights in their loads (qtune.modeling.fast.nf4_gmm): no 16-bit copy of an expert is written.
Elsewhere the function dequantizes one tensor just before its grouped matmul (and again, or from the recompute's
copy, in the backward).
"""
from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F

from qtune.modeling.moe import selected_block

PARAMS = ("gate_up_proj", "down_proj")

# 4-bit experts: grouped matmuls that read the 4-bit weights in their loads (qtune.modeling.fast.nf4_gmm) where Triton
# runs, so no 16-bit copy is written. Off, or without Triton: dequantize a tensor, then grouped_mm.
FUSED_4BIT = True
# Dequantizing: keep a layer's dequantized experts from its checkpoint recompute for its backward, which follows at
# once (one layer's 16-bit experts held for a moment; saves a third of the dequantizing). Off: dequantize again.
KEEP_RECOMPUTED = True


def gmm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Grouped matmul: (M, K) x (E, K, N) -> (M, N), rows [offs[e-1], offs[e]) with b[e]; or, both 2-D,
    (N1, M) x (M, N2) -> (E, N1, N2) summing over each group's slice of M."""
    fn = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return fn(a, b, offs=offs)


def _b3(b: torch.Tensor, experts: int) -> torch.Tensor:
    """PEFT's lora_B (out, r·E) -> (E, out, r), contiguous."""
    return b.view(b.shape[0], -1, experts).permute(2, 0, 1).contiguous()


def _grad_b(db3: torch.Tensor) -> torch.Tensor:
    """(E, out, r) -> lora_B's layout (out, r·E)."""
    e, out, r = db3.shape
    return db3.permute(1, 2, 0).reshape(out, r * e)


def _four_bit(experts, name: str):
    """(packed, state) of an expert tensor kept in 4 bits (quantize_experts), else None."""
    return vars(experts).get("_qtune_4bit", {}).get(name)


def fused(experts, name: str, x: torch.Tensor):
    """(packed, state) of a 4-bit expert tensor when the grouped matmul can read it directly, else None."""
    q = _four_bit(experts, name)
    if q is None or not FUSED_4BIT:
        return None
    from qtune.modeling.fast import nf4_gmm

    return q if nf4_gmm.supports(x, q[1]) else None


def base_mm(experts, name: str, x: torch.Tensor, offs: torch.Tensor, transposed: bool = False, kept=None):
    """x·W_eᵀ (x·W_e transposed) over the groups, W = experts.<name>: straight from its 4-bit copy where the fused
    kernel runs, else from `kept` or a dequantized copy. Returns (product, the 16-bit W it used or None)."""
    q = None if kept is not None else fused(experts, name, x)
    if q is not None:
        from qtune.modeling.fast.nf4_gmm import nf4_gmm

        return nf4_gmm(x, *q, offs, transposed=transposed), None
    w = kept if kept is not None else base_weight(experts, name, x.dtype)
    return gmm(x, w if transposed else w.transpose(1, 2), offs), w


def base_weight(experts, name: str, dtype: torch.dtype) -> torch.Tensor:
    """An expert tensor (E, out, in) in `dtype`: dequantized when it is kept in 4 bits."""
    q = _four_bit(experts, name)
    if q is not None:
        import bitsandbytes.functional as bnbf

        w = bnbf.dequantize_4bit(q[0], q[1])
    else:
        w = getattr(experts, name)
    return w if w.dtype == dtype else w.to(dtype)


class ExpertsLoRA(torch.autograd.Function):
    """Rows x (M, H) sorted by expert with group ends `offs` -> expert outputs (M, H) before the routing weights."""

    @staticmethod
    def forward(ctx, x, offs, a1, b1, a2, b2, experts, s1: float, s2: float):
        n = offs.shape[0]
        dt = x.dtype
        # Inside a backward (reentrant checkpointing's recompute) this layer's backward comes next: keep the weights.
        keep = KEEP_RECOMPUTED and torch._C._current_graph_task_id() != -1
        h, w1 = base_mm(experts, "gate_up_proj", x, offs)
        ctx.w = [w1 if keep else None, None]
        del w1
        A1 = B1 = xa1 = A2 = B2 = xa2 = None
        if a1 is not None:
            A1, B1 = a1.to(dt).view(n, -1, a1.shape[-1]), _b3(b1.to(dt), n)
            xa1 = gmm(x, A1.transpose(1, 2), offs)
            h.add_(gmm(xa1, B1.transpose(1, 2), offs), alpha=s1)
        g, u = h.chunk(2, dim=-1)
        act = F.silu(g).mul_(u)
        y, w2 = base_mm(experts, "down_proj", act, offs)
        ctx.w[1] = w2 if keep else None
        del w2
        if a2 is not None:
            A2, B2 = a2.to(dt).view(n, -1, a2.shape[-1]), _b3(b2.to(dt), n)
            xa2 = gmm(act, A2.transpose(1, 2), offs)
            y.add_(gmm(xa2, B2.transpose(1, 2), offs), alpha=s2)
        ctx.save_for_backward(x, offs, h, xa1, A1, B1, xa2, A2, B2)
        ctx.experts, ctx.s = experts, (s1, s2)
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (a1, b1, a2, b2))
        return y

    @staticmethod
    def backward(ctx, dy):
        x, offs, h, xa1, A1, B1, xa2, A2, B2 = ctx.saved_tensors
        s1, s2 = ctx.s
        dt = x.dtype
        dy = dy.contiguous().to(dt)
        g, u = h.chunk(2, dim=-1)
        sg = torch.sigmoid(g)
        silu = g * sg
        grads = [None] * 4
        if A2 is not None:
            act = silu * u
            grads[3] = _grad_b(gmm(dy.t(), xa2, offs)).mul_(s2)
            dxa2 = gmm(dy, B2, offs).mul_(s2)
            grads[2] = gmm(dxa2.t(), act, offs).flatten(0, 1)
            del act
        da, _ = base_mm(ctx.experts, "down_proj", dy, offs, transposed=True, kept=ctx.w[1])
        ctx.w[1] = None
        if A2 is not None:
            da.add_(gmm(dxa2, A2, offs))
        # d/dg SiLU(g)·u = u·σ(g)·(1 + g·(1 − σ(g)))
        dh = torch.cat([da * u * sg * (1 + g * (1 - sg)), da * silu], dim=-1)
        del da, silu, sg
        if A1 is not None:
            grads[1] = _grad_b(gmm(dh.t(), xa1, offs)).mul_(s1)
            dxa1 = gmm(dh, B1, offs).mul_(s1)
            grads[0] = gmm(dxa1.t(), x, offs).flatten(0, 1)
        dx = None
        if ctx.needs_input_grad[0]:
            dx, _ = base_mm(ctx.experts, "gate_up_proj", dh, offs, transposed=True, kept=ctx.w[0])
            if A1 is not None:
                dx.add_(gmm(dxa1, A1, offs))
        ctx.w = None
        grads = [None if gr is None else gr.to(d) for gr, d in zip(grads, ctx.dtypes)]
        return dx, None, *grads, None, None, None


def _chain(wrapper) -> tuple[object, dict]:
    """(the experts module, {parameter name: its ParamWrapper}) for the outermost of PEFT's nested wrappers."""
    wrappers, module = {}, wrapper
    while type(module).__name__ == "ParamWrapper":
        wrappers[module.parameter_name] = module
        module = module.base_layer
    return module, wrappers


def supported(module) -> bool:
    """The outermost ParamWrapper over a SwiGLU experts module with fused (E, 2I, H) / (E, H, I) tensors."""
    if type(module).__name__ != "ParamWrapper":
        return False
    experts, wrappers = _chain(module)
    if not wrappers or any(n not in PARAMS for n in wrappers):
        return False
    gu, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not (isinstance(gu, torch.Tensor) and isinstance(down, torch.Tensor) and gu.dim() == down.dim() == 3):
        return False
    act = type(getattr(experts, "act_fn", None)).__name__
    return (act in ("SiLU", "SiLUActivation") and not getattr(experts, "is_transposed", False)
            and getattr(experts, "has_bias", False) is False and gu.shape[1] == 2 * down.shape[2])


def _plain(wrappers: dict) -> str | None:
    """The one adapter every wrapper runs plainly, or None (disabled, merged, several adapters: PEFT's path)."""
    names = set()
    for w in wrappers.values():
        adapters = w.active_adapters
        if w.disable_adapters or w.merged or len(adapters) != 1 or adapters[0] not in w.lora_A:
            return None
        names.add(adapters[0])
    return names.pop() if len(names) == 1 else None


def route(top_k_index: torch.Tensor, experts: int):
    """(the (token, choice) pair at each row in expert order, that order's inverse permutation, group ends per expert)
    without a host sync."""
    flat = top_k_index.reshape(-1)
    if experts <= torch.iinfo(torch.int16).max:  # a radix sort of 16-bit keys makes a quarter of int64's passes
        flat = flat.to(torch.int16)
    ids, order = torch.sort(flat, stable=True)
    ends = torch.searchsorted(ids, torch.arange(experts, device=ids.device, dtype=ids.dtype), right=True)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return order, inverse, ends.to(torch.int32)


class _Dispatch(torch.autograd.Function):
    """Each token's row once per choice, in expert order: x (T, H) -> (T·k, H). The backward gathers the rows back to
    (token, choice) order with the inverse permutation and sums each token's k rows, where autograd's indexing would
    scatter-add them with atomics (slower, and summed in another order each run)."""

    @staticmethod
    def forward(ctx, x, order, inverse, k: int):
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x.index_select(0, order // k)

    @staticmethod
    def backward(ctx, g):
        (inverse,) = ctx.saved_tensors
        return g.index_select(0, inverse).view(-1, ctx.k, g.shape[-1]).sum(1), None, None, None


class _Unsort(torch.autograd.Function):
    """Rows in expert order back to (token, choice) order: a permutation, so the backward is the opposite gather."""

    @staticmethod
    def forward(ctx, y, order, inverse):
        ctx.save_for_backward(order)
        return y.index_select(0, inverse)

    @staticmethod
    def backward(ctx, g):
        (order,) = ctx.saved_tensors
        return g.index_select(0, order), None, None


def _compute(experts, hidden_states, top_k_index, top_k_weights, lora=(None,) * 4, scales=(0.0, 0.0)):
    order, inverse, offs = route(top_k_index, experts.gate_up_proj.shape[0])  # the 4-bit stub keeps the shape
    k = top_k_index.shape[-1]
    dtype = (torch.get_autocast_dtype(hidden_states.device.type)
             if torch.is_autocast_enabled(hidden_states.device.type) else hidden_states.dtype)
    with torch.autocast(hidden_states.device.type, enabled=False):
        y = ExpertsLoRA.apply(_Dispatch.apply(hidden_states.to(dtype), order, inverse, k), offs, *lora, experts,
                              *scales)
        y = _Unsort.apply(y, order, inverse).view(-1, k, y.shape[-1])
        # each token's k expert outputs, weighted and summed: one batched (1 x k) x (k x H) product a token (no atomics,
        # no (T·k, H) product of the weights written and summed after)
        w = top_k_weights.reshape(-1, 1, k).to(y.dtype)
        return torch.bmm(w, y).view(-1, y.shape[-1]).to(hidden_states.dtype)


def forward(self, hidden_states, top_k_index, top_k_weights):
    """The outermost ParamWrapper's forward: the experts with their adapters, as one function."""
    experts, wrappers = _chain(self)
    name = _plain(wrappers)
    if name is None:
        compacted = any("_qtune_chosen" in vars(w) for w in wrappers.values())
        if ("_qtune_4bit" in vars(experts) or compacted) and not all(w.disable_adapters for w in wrappers.values()):
            from qtune.errors import QtuneError

            raise QtuneError("experts kept in 4 bits, or adapters on moe.max_experts experts only, run one plain LoRA "
                             "adapter at a time; several adapters at once, or merged ones, need train.fast=false")
        return type(self).forward(self, hidden_states, top_k_index, top_k_weights)
    gu, dn = wrappers.get("gate_up_proj"), wrappers.get("down_proj")
    lora = [t for w in (gu, dn) for t in (_full_factors(w, name) if w else (None, None))]
    scales = (float(gu.scaling[name]) if gu else 0.0, float(dn.scaling[name]) if dn else 0.0)
    return _compute(experts, hidden_states, top_k_index, top_k_weights, lora, scales)


def _full_factors(wrapper, name: str):
    """(lora_A, lora_B) in PEFT's layout for all E experts: the parameters themselves, or, when only the chosen
    experts' adapters exist (`compact`), those scattered into zeros (differentiably: gradients reach the compact ones)."""
    a, b = wrapper.lora_A[name].weight, wrapper.lora_B[name].weight
    chosen = vars(wrapper).get("_qtune_chosen")
    if chosen is None:
        return a, b
    return _expand_a(a, chosen, wrapper.num_experts), _expand_b(b, chosen, wrapper.num_experts)


# PEFT's layout and the chosen experts' compact one: lora_A (E·r, in) <-> (N·r, in) by expert rows, lora_B
# (out, r·E) <-> (out, r·N) by the columns c with c mod E = e (c mod N for the compact one).

def _expand_a(a, chosen, experts: int):
    n = chosen.numel()
    r = a.shape[0] // n
    return a.new_zeros(experts, r, a.shape[1]).index_copy(0, chosen, a.view(n, r, -1)).view(experts * r, -1)


def _expand_b(b, chosen, experts: int):
    n = chosen.numel()
    r = b.shape[1] // n
    return b.new_zeros(b.shape[0], r, experts).index_copy(2, chosen, b.view(b.shape[0], r, n)).view(b.shape[0], -1)


def _cut_a(a, chosen, experts: int):
    r = a.shape[0] // experts
    return a.view(experts, r, -1)[chosen].reshape(chosen.numel() * r, -1)


def _cut_b(b, chosen, experts: int):
    r = b.shape[1] // experts
    return b.view(b.shape[0], r, experts)[:, :, chosen].reshape(b.shape[0], -1)


def compact(peft_model, selection: dict[str, list[int]]) -> list[str]:
    """moe.max_experts on the fast path: every patched block keeps adapter parameters (and so gradients and optimizer
    state) for its chosen experts only, A as (N·r, in) and B as (out, r·N) over the chosen experts in order. The
    adapter written to disk is still PEFT's (E·r, in) / (out, r·E) with zeros elsewhere, and a full one read back
    (resuming) is cut to the chosen experts again. Returns the blocks (as named in `selection`) it compacted."""
    done = []
    for name, wrapper in peft_model.named_modules():
        if type(wrapper).__name__ != "ParamWrapper" or getattr(wrapper.forward, "__func__", None) is not forward:
            continue
        block = selected_block(name, selection)
        if block is None:
            continue
        for w in _chain(wrapper)[1].values():
            chosen = torch.tensor(sorted(selection[block]), device=w.lora_A[next(iter(w.lora_A))].weight.device)
            for adapter in w.lora_A:
                _compact_adapter(w, adapter, chosen)
            w._qtune_chosen = chosen
        done.append(block)
    return done


def _compact_adapter(w, adapter: str, chosen: torch.Tensor) -> None:
    experts = w.num_experts
    for module, expand, cut in ((w.lora_A[adapter], _expand_a, _cut_a), (w.lora_B[adapter], _expand_b, _cut_b)):
        full = module.weight
        with torch.no_grad():
            module.weight = torch.nn.Parameter(cut(full, chosen, experts).clone(), requires_grad=full.requires_grad)
        full_shape = full.shape  # what PEFT's file holds for this tensor

        def to_full(module, state_dict, prefix, local_metadata, expand=expand):
            state_dict[prefix + "weight"] = expand(module.weight.detach(), chosen, experts)

        def from_full(state_dict, prefix, *args, cut=cut, full_shape=full_shape):
            t = state_dict.get(prefix + "weight")
            if t is not None and t.shape == full_shape:
                state_dict[prefix + "weight"] = cut(t, chosen.to(t.device), experts)

        module._register_state_dict_hook(to_full)
        module._register_load_state_dict_pre_hook(from_full)


def _base_forward(self, hidden_states, top_k_index, top_k_weights):
    """The experts module's own forward once its weights are 4-bit (no adapter: routing statistics, disabled adapters)."""
    return _compute(self, hidden_states, top_k_index, top_k_weights)


def patch(peft_model) -> int:
    """Give every supported expert block the grouped forward; returns how many."""
    n = 0
    for module in _outermost(peft_model):
        if supported(module):
            module.forward = types.MethodType(forward, module)
            n += 1
    return n


def _outermost(peft_model):
    inner = {id(m.base_layer) for m in peft_model.modules() if type(m).__name__ == "ParamWrapper"}
    return [m for m in peft_model.modules() if type(m).__name__ == "ParamWrapper" and id(m) not in inner]


def unpatch(peft_model) -> None:
    for module in peft_model.modules():
        if "forward" in vars(module) and getattr(module.forward, "__func__", None) is forward:
            del module.forward


def _to_4bit(experts, name: str, p: torch.Tensor, quant_type: str) -> torch.nn.Parameter:
    """Keep `experts.<name>` in bitsandbytes 4-bit; returns the parameter that stays in its place: same name, shape and
    dtype, zero strides over one element, so PEFT's wrappers, parameter counts and state dicts see what they saw.
    Only qtune's functions read the weights, from the 4-bit copy."""
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(p.data, blocksize=64, quant_type=quant_type, compress_statistics=True)
    vars(experts).setdefault("_qtune_4bit", {})[name] = (packed, state)
    if "forward" not in vars(experts):
        experts.forward = types.MethodType(_base_forward, experts)
    stub = torch.nn.Parameter(torch.empty(1, dtype=p.dtype, device=p.device).as_strided(p.shape, (0,) * p.dim()),
                              requires_grad=False)
    stub._is_hf_initialized = True  # transformers must not initialize it again
    return stub


def _expert_tensor(module, name: str, param) -> bool:
    return (name in PARAMS and isinstance(param, torch.Tensor) and param.dim() == 3 and param.is_cuda
            and hasattr(module, "act_fn") and not getattr(module, "is_transposed", False))


@contextlib.contextmanager
def four_bit_while_loading(quant_type: str = "nf4"):
    """While a model loads, every fused expert tensor becomes 4-bit as transformers sets it on its module, so the 16-bit
    experts (most of an MoE model) never sit on the GPU together: the peak is the 4-bit model plus one tensor."""
    from torch.nn.modules.module import register_module_parameter_registration_hook

    def hook(module, name, param):
        if _expert_tensor(module, name, param):
            return _to_4bit(module, name, param, quant_type)
        return None

    import transformers.modeling_utils as modeling_utils

    # transformers reserves the model's 16-bit size on the GPU before loading (capped at the GPU's size less 1.2 GiB)
    # to speed up allocations; it cannot know the experts turn 4-bit, so it would claim ~all of a small GPU.
    warmup = getattr(modeling_utils, "caching_allocator_warmup", None)
    if warmup is not None:
        modeling_utils.caching_allocator_warmup = lambda *args, **kwargs: None
    handle = register_module_parameter_registration_hook(hook)
    try:
        yield
    finally:
        handle.remove()
        if warmup is not None:
            modeling_utils.caching_allocator_warmup = warmup


def quantize_experts(peft_model, quant_type: str = "nf4") -> tuple[int, int]:
    """Keep every patched block's expert tensors in 4 bits (those loaded in 16 bits); returns (bytes freed now,
    bytes the 4-bit experts take)."""
    freed = 0
    for wrapper in _outermost(peft_model):
        if getattr(wrapper.forward, "__func__", None) is not forward:
            continue
        experts, _ = _chain(wrapper)
        for name in PARAMS:
            p = getattr(experts, name)
            if _four_bit(experts, name) is not None or not _expert_tensor(experts, name, p):
                continue
            nbytes = p.numel() * p.element_size()
            setattr(experts, name, _to_4bit(experts, name, p, quant_type))
            freed += nbytes - experts._qtune_4bit[name][0].numel()
    return freed, four_bit_bytes(peft_model)


def four_bit_bytes(model) -> int:
    return sum(packed.numel() * packed.element_size() for m in model.modules()
               for packed, _ in vars(m).get("_qtune_4bit", {}).values())
