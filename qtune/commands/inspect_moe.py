"""`qtune inspect-moe`: what the current `lora=` and `moe=` settings reach in a (Qwen3-)MoE model, per
layer, with counts and memory — from the config alone (the model is built on the meta device).

It calls the same qtune.modeling.targets.match() that `train` uses to build PEFT's config, so what it
shows is what trains.
"""
from __future__ import annotations

import json as _json
import re

from qtune.config.schema import Config


def inspect(cfg: Config) -> dict:
    """The whole report as plain data (what `--json` prints)."""
    from qtune.modeling.plan import fits, plan
    from qtune.modeling.targets import param_kind

    arch = cfg.model.arch
    planned = plan(cfg)
    model, matched, total, mem = planned.model, planned.matched, planned.total, planned.memory
    by_name = {t.name: t for t in matched.targets}
    layers = [_layer(model, i, by_name, cfg) for i in range(arch.num_hidden_layers)]
    kinds: dict[str, dict] = {}
    for n, p in model.named_parameters():
        kinds.setdefault(param_kind(n), {"params": 0, "lora_params": 0, "targets": 0})["params"] += p.numel()
    for t in matched.targets:
        k = kinds.setdefault(t.kind, {"params": 0, "lora_params": 0, "targets": 0})
        k["lora_params"] += t.params
        k["targets"] += 1
    return {
        "model": cfg.model.name, "is_moe": matched.is_moe,
        "settings": {"lora_r": cfg.lora.r, "lora_alpha": cfg.lora.alpha, "target_modules": list(cfg.lora.target_modules),
                     "target_regex": cfg.lora.target_regex, "scope": str(cfg.moe.scope),
                     "router_mode": str(cfg.moe.router_mode), "max_experts": cfg.moe.max_experts,
                     "expert_selection": str(cfg.moe.expert_selection), "quant": str(cfg.quant.method)},
        "experts_per_layer": arch.num_experts, "experts_per_token": arch.num_experts_per_tok,
        "layers": layers,
        "patterns": {p: (p not in matched.unmatched) for p in matched.asked},
        "unmatched": matched.unmatched,
        "covered": matched.covered,   # dense-MLP names the fused-expert path stands for (targets.Matched.covered)
        "params": {"total": total, "trainable": matched.trainable, "allocated": matched.allocated, "by_kind": kinds},
        "memory": mem.as_dict(),
        "fits": fits(cfg, _gpus(), model),
    }


def _gpus() -> tuple:
    """The GPUs the report weighs the settings against: common ones, and this machine's first where it has one."""
    import torch

    from qtune.modeling.plan import GPUS

    if not torch.cuda.is_available():
        return GPUS
    props = torch.cuda.get_device_properties(0)
    # capability None: this machine's own test (its Triton too), as `train --dry-run` here makes it
    return ((f"this machine's {props.name}", props.total_memory, None), *GPUS)


def run(cfg: Config, json: bool = False, dry_run: bool = True) -> dict:
    report = inspect(cfg)
    if json:
        print(_json.dumps(report, indent=1))
    else:
        from qtune import ui

        ui.show_moe_report(report, cfg.moe)
    return report


def _layer(model, i: int, by_name: dict, cfg: Config) -> dict:
    """One decoder layer: attention projections, router, experts (or a dense MLP), what is adapted, LoRA params."""
    prefix = f"model.layers.{i}."
    params = {n[len(prefix):]: tuple(p.shape) for n, p in model.named_parameters() if n.startswith(prefix)}
    row: dict = {"layer": i, "attention": {}, "router": None, "experts": None, "shared_experts": None,
                 "dense_mlp": None, "lora_params": 0}
    for n, shape in params.items():
        m = re.fullmatch(r"self_attn\.(\w+_proj)\.weight", n)
        if m:
            t = by_name.get(prefix + n.removesuffix(".weight"))
            row["attention"][m.group(1)] = {"shape": list(shape), "adapted": t is not None}
    gate = params.get("mlp.gate.weight")
    if gate is not None:
        t = by_name.get(prefix + "mlp.gate.weight") or by_name.get(prefix + "mlp.gate")
        row["router"] = {"shape": list(gate), "adapted": ("full" if t.how == "full" else "lora") if t else "frozen"}
    fused = {n.split(".")[-1]: s for n, s in params.items() if n.startswith("mlp.experts.") and len(s) == 3}
    if fused:
        count = next(iter(fused.values()))[0]
        adapted = [k for k in fused if prefix + "mlp.experts." + k in by_name]
        kept = min(cfg.moe.max_experts or count, count) if adapted else 0
        row["experts"] = {"count": count, "tensors": {k: list(s) for k, s in fused.items()}, "adapted": adapted,
                          "experts_adapted": kept,
                          "chosen_by": (str(cfg.moe.expert_selection) if cfg.moe.max_experts and kept < count else None)}
    shared = {n: s for n, s in params.items() if "shared_expert" in n}
    if shared:
        row["shared_experts"] = {n: list(s) for n, s in shared.items()}
    dense = {m.group(1): s for n, s in params.items() if (m := re.fullmatch(r"mlp\.(\w+_proj)\.weight", n))}
    if dense:
        row["dense_mlp"] = {k: {"shape": list(s), "adapted": prefix + f"mlp.{k}" in by_name} for k, s in dense.items()}
    row["lora_params"] = sum(t.params for name, t in by_name.items() if name.startswith(prefix))
    return row
