"""Attention over packed rows as variable-length flash attention (torch.nn.attention.varlen) on the fast path.

Why: qtune trains packed rows (data.packing): several examples in one row, each attending to itself only. With sdpa,
transformers gives such a row a block-diagonal mask and sdpa runs its masked kernel over the whole row (S² work,
the mask read from memory); in a CUDA graph it always does, because whether a row holds one sequence cannot be
checked while a graph is captured. Flash attention's varlen kernel takes the examples' boundaries instead
(`cu_seq_lens_q`, which TRL's padding-free collator computes on the host, and which a CUDA graph keeps in a buffer of
its own) and computes each example's causal attention alone: Σ len² work and no mask.

It is registered with transformers as its own attention implementation (`NAME`) whose masks are sdpa's, so every call
it does not take — no boundaries (generation, unpacked batches), one sequence in the row outside a graph (sdpa's
causal kernel is as fast), dropout, a sliding window, CPU — goes to transformers' sdpa with the mask sdpa expects.
"""
from __future__ import annotations

import functools
import inspect

import torch

NAME = "qtune_varlen"


@functools.cache
def _varlen():
    """(torch's varlen_attn, the keywords this torch's version takes), or None without it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:  # noqa: BLE001 (older torch)
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def _causal(params) -> dict:
    """varlen_attn's keywords for causal attention in this torch's signature."""
    return {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}


_NATIVE_GQA: dict[str, bool] = {}  # device -> whether varlen_attn takes fewer key/value heads than query heads


def _probe_gqa(device: torch.device) -> bool:
    """Whether this torch's varlen_attn computes grouped-query attention itself (FlashAttention-2's varlen kernel does,
    given fewer key/value heads) with the same output and gradients as with each key/value head repeated. Run once, at
    install, outside any CUDA graph capture."""
    varlen_attn, params = _varlen()
    g = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(24, h, 64, device=device, dtype=torch.bfloat16, generator=g).requires_grad_()
               for h in (4, 2, 2))
    cu = torch.tensor([0, 10, 24], dtype=torch.int32, device=device)
    extra = _causal(params)
    try:
        out = varlen_attn(q, k, v, cu, cu, 14, 14, **extra)
        out.float().square().sum().backward()
    except Exception:  # noqa: BLE001 (refused: repeat the heads)
        return False
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref = varlen_attn(q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), cu, cu, 14, 14, **extra)
    ref.float().square().sum().backward()
    close = [torch.allclose(a.float(), b.float(), atol=2e-2, rtol=2e-2) for a, b in zip(grads, (q.grad, k.grad, v.grad))]
    return out.shape == ref.shape and torch.allclose(out.float(), ref.float(), atol=2e-2, rtol=2e-2) and all(close)


def unavailable(device: str, dtype, attention: str) -> str | None:
    """Why packed rows cannot use the varlen kernel on this run, or None."""
    if not device.startswith("cuda"):
        return "it needs CUDA"
    if _varlen() is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"flash attention needs 16-bit activations (the model is {str(dtype).replace('torch.', '')})"
    if attention != "sdpa":
        return f"the model runs {attention} attention"
    return None


def install(model) -> None:
    """Register the implementation (once) and switch `model` (the base model, before PEFT) to it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    if NAME not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionInterface.register(NAME, attention)
        AttentionMaskInterface.register(NAME, sdpa_mask)
    device = next(model.parameters()).device
    if device.type == "cuda" and str(device) not in _NATIVE_GQA and "enable_gqa" not in _varlen()[1]:
        _NATIVE_GQA[str(device)] = _probe_gqa(device)
    model.set_attn_implementation(NAME)


def attention(module, query, key, value, attention_mask, scaling=None, dropout: float = 0.0, sliding_window=None,
              cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, max_length_k=None, **kwargs):
    """transformers' attention interface: query (1, Hq, S, D), key and value (1, Hkv, S, D) -> ((1, S, Hq, D), None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    found = _varlen()
    b, heads, s, d = query.shape
    takes = (found is not None and cu_seq_lens_q is not None and query.is_cuda and b == 1 and key.shape[2] == s
             and not dropout and sliding_window is None and heads % key.shape[1] == 0
             and (scaling is None or "scale" in found[1] or abs(scaling - d ** -0.5) < 1e-12)
             and (cu_seq_lens_q.numel() > 2 or torch.cuda.is_current_stream_capturing()))
    if not takes:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      sliding_window=sliding_window, **kwargs)
    varlen_attn, params = found
    if query.dtype == torch.float32 and torch.is_autocast_enabled("cuda"):
        # fp32 master weights (train.method=full|freeze) make a trained q/k norm's output fp32 under autocast; the
        # kernel takes the autocast's 16-bit dtype, as transformers' own flash-attention path casts
        half = torch.get_autocast_dtype("cuda")
        query, key, value = (t.to(half) for t in (query, key, value))
    extra = _causal(params)
    if "scale" in params and scaling is not None:
        extra["scale"] = scaling
    if key.shape[1] != heads:
        if "enable_gqa" in params:
            extra["enable_gqa"] = True
        elif not _NATIVE_GQA.get(str(query.device)):  # each key/value head repeated for its group of query heads
            key = key.repeat_interleave(heads // key.shape[1], dim=1)
            value = value.repeat_interleave(heads // value.shape[1], dim=1)
    # (S, H, D): transformers' (1, H, S, D) are transposed views of (1, S, H, D) projections, so this copies nothing;
    # squeeze, not [0], whose backward would write a zero-filled copy of each gradient
    q, k, v = (t.squeeze(0).transpose(0, 1).contiguous() for t in (query, key, value))
    cu = cu_seq_lens_q.to(device=q.device, dtype=torch.int32)
    longest = int(max_length_q) if max_length_q is not None else s
    out = varlen_attn(q, k, v, cu, cu, longest, longest, **extra)
    return out.unsqueeze(0), None
