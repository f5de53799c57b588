"""MoE specifics beyond matching: which experts get adapters when `moe.max_experts` caps them, and the
gradient masks that keep every other expert's adapter at exactly zero.

PEFT adapts a fused expert tensor (E, out, in) as one ParamWrapper with lora_A (r·E, in) and lora_B
(out, r·E); expert e owns rows e·r … e·r+r-1 of A and the columns c of B with c mod E = e. lora_B starts
at zero, so masking both gradients for the unselected experts leaves their delta B_e·A_e at exactly zero:
after training (and after a merge) those experts are bit for bit the base weights.
"""
from __future__ import annotations

import json
from pathlib import Path

from qtune.config.schema import ExpertSelection, MoeConfig
from qtune.modeling.targets import Matched


def capped(matched: Matched, moe: MoeConfig) -> list[str]:
    """The fused expert parameters whose adapters are limited to moe.max_experts experts."""
    if not moe.max_experts:
        return []
    return [t.name for t in matched.targets if t.kind == "expert" and t.how == "lora_param"
            and t.shape[0] > moe.max_experts]


def block_of(param_name: str) -> str:
    """model.layers.3.mlp.experts.gate_up_proj -> model.layers.3.mlp (the MoE block both tensors share)."""
    return param_name.split(".experts.")[0]


def select_experts(model, matched: Matched, moe: MoeConfig, batches=()) -> dict[str, list[int]]:
    """{MoE block: expert ids} for every capped block: the first N, or the N most routed-to on `batches`."""
    names = capped(matched, moe)
    blocks = sorted({block_of(n) for n in names})
    if not blocks:
        return {}
    n_experts = {block_of(t.name): t.shape[0] for t in matched.targets if t.name in names}
    if moe.expert_selection is ExpertSelection.first:
        return {b: list(range(moe.max_experts)) for b in blocks}
    counts = routing_counts(model, blocks, n_experts, batches)
    return {b: sorted(sorted(range(n_experts[b]), key=lambda e: (-counts[b][e], e))[:moe.max_experts]) for b in blocks}


def routing_counts(model, blocks: list[str], n_experts: dict[str, int], batches) -> dict[str, list[int]]:
    """How many tokens each block's router sends to each expert (top-k choices) over `batches`."""
    import torch

    modules = dict(model.named_modules())
    counts = {b: [0] * n_experts[b] for b in blocks}
    hooks = []
    for b in blocks:
        def hook(module, args, output, b=b):
            indices = output[2] if isinstance(output, tuple) and len(output) > 2 else None
            if indices is None:  # a router that returns logits only: take its top-k ourselves
                logits = output[0] if isinstance(output, tuple) else output
                indices = logits.topk(getattr(module, "top_k", 1), dim=-1).indices
            hist = torch.bincount(indices.flatten().cpu(), minlength=n_experts[b])
            for e, c in enumerate(hist.tolist()):
                counts[b][e] += c
        hooks.append(modules[b + ".gate"].register_forward_hook(hook))
    try:
        with torch.no_grad():
            for batch in batches:
                model(**batch)
    finally:
        for h in hooks:
            h.remove()
    return counts


def selected_block(module_name: str, selection: dict[str, list[int]]) -> str | None:
    """The MoE block of `selection` whose experts a (PEFT-wrapped) module path belongs to, or None."""
    name = module_name.removeprefix("base_model.model.")
    return next((b for b in selection if name.startswith(b + ".experts")), None)


def restrict(peft_model, selection: dict[str, list[int]]) -> int:
    """Mask the LoRA gradients of every unselected expert; returns how many fused adapters were restricted."""
    import torch

    n = 0
    for name, module in peft_model.named_modules():
        if type(module).__name__ != "ParamWrapper" or "_qtune_chosen" in vars(module):
            continue  # adapters of the chosen experts only (the fast path's compact()) need no masks
        block = selected_block(name, selection)
        if block is None:
            continue
        experts = module.num_experts
        keep = torch.zeros(experts, dtype=torch.bool)
        keep[selection[block]] = True
        for adapter in module.lora_A:
            a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
            r = a.shape[0] // experts
            # Boolean masks: `g * mask` keeps the gradient's own dtype. Float masks of the parameter's dtype at
            # this moment broke on the GPU, where the gradients arrive in bf16 (hooks must not change a dtype).
            mask_a = keep.repeat_interleave(r).to(a.device)[:, None]      # rows e·r … e·r+r-1
            mask_b = keep.repeat(r).to(b.device)[None, :]                 # columns c with c mod E = e
            with torch.no_grad():  # a non-zero init (gaussian, pissa) must not leak into unselected experts
                b.mul_(mask_b)
            a.register_hook(lambda g, m=mask_a: g * m)
            b.register_hook(lambda g, m=mask_b: g * m)
            n += 1
    return n


def save_selection(folder: Path, selection: dict[str, list[int]], moe: MoeConfig) -> None:
    from qtune.io import atomic_write_json

    atomic_write_json(Path(folder) / "experts.json", {"max_experts": moe.max_experts,
                                                       "selection": str(moe.expert_selection), "experts": selection})


def load_selection(folder: Path) -> dict[str, list[int]] | None:
    path = Path(folder) / "experts.json"
    return json.loads(path.read_text())["experts"] if path.is_file() else None
