"""Which modules and parameters get adapters: the one matching function that `train --dry-run`,
`inspect-moe`, `train` and `merge` all call.

It walks a model (real, quantized or on the meta device; bitsandbytes' Linear4bit/Linear8bitLt are
nn.Linear subclasses, so all three match alike) and returns every target with its shape and LoRA
parameter count in closed form. `train` hands PEFT the full names it found, never the patterns, so PEFT
adapts exactly this list: no suffix rule or PEFT-side name mapping can widen it.

- Linear layers (attention, dense MLP): `lora.target_modules` by PEFT's rule (a name equal to the entry
  or ending in `.entry`; `all-linear` = every linear but the output head) or `lora.target_regex`.
- Fused MoE experts (`mlp.experts.gate_up_proj` (E, 2I, H), `mlp.experts.down_proj` (E, H, I)):
  `moe.expert_patterns` on the parameter path when `moe.scope` is expert_only or all; PEFT adapts them
  through `target_parameters`, rank r per expert.
- The router (`mlp.gate`, weight (E, H)): `moe.router_patterns` when the scope is router_only or all;
  LoRA through `target_parameters` (router_mode=lora) or fully trained (router_mode=full).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from qtune.config.schema import LoraConfig, MoeConfig, MoeScope, RouterMode
from qtune.errors import ConfigError

ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class Target:
    name: str                 # module path (lora, full) or parameter path (lora_param)
    kind: str                 # param_kind(): attention | expert | router | mlp | other
    how: str                  # lora (a linear module) | lora_param (PEFT target_parameters) | full (trained whole)
    shape: tuple[int, ...]    # (out, in), (E, out, in) or (E, H)
    params: int               # trainable parameters this target adds (experts beyond moe.max_experts: none)
    allocated: int = -1       # parameters PEFT allocates for it (a capped fused tensor gets all E experts' worth)

    def __post_init__(self):
        if self.allocated < 0:
            object.__setattr__(self, "allocated", self.params)

    @property
    def layer(self) -> int | None:
        m = re.search(r"\.layers\.(\d+)\.", self.name)
        return int(m.group(1)) if m else None


@dataclass
class Matched:
    targets: list[Target]
    unmatched: list[str] = field(default_factory=list)  # patterns / names that matched nothing
    is_moe: bool = False
    asked: list[str] = field(default_factory=list)      # every pattern / name the settings asked for
    # dense-MLP names (gate_proj, up_proj, down_proj) an MoE model has no linear layer for, its experts being fused
    # tensors that the fused-expert path adapts instead (moe.expert_patterns): covered, not missed
    covered: list[str] = field(default_factory=list)

    @property
    def trainable(self) -> int:
        return sum(t.params for t in self.targets)

    @property
    def allocated(self) -> int:
        return sum(t.allocated for t in self.targets)

    def names(self, how: str) -> list[str]:
        return [t.name for t in self.targets if t.how == how]


def param_kind(name: str) -> str:
    """The part of the model a parameter or module path belongs to, in the one vocabulary qtune uses: attention,
    expert, router, mlp, or other (embeddings, norms, the output head)."""
    if ".self_attn." in name or ".attn." in name:
        return "attention"
    if ".experts." in name:
        return "expert"
    if re.search(r"\.mlp\.gate(\.|$)", name):  # the MoE router (mlp.gate), not a dense MLP's gate_proj
        return "router"
    if ".mlp." in name:
        return "mlp"
    return "other"


def _is_linear(module) -> bool:
    import torch.nn as nn

    return isinstance(module, nn.Linear)


def _output_head_names(model) -> set[str]:
    """The language-model head, or a reward model's score head (trained whole, never given LoRA)."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    heads = [m for m in (out, getattr(model, "score", None)) if m is not None]
    return {n for n, m in model.named_modules() if any(m is h for h in heads)}


def _suffix_match(name: str, entry: str) -> bool:
    return name == entry or name.endswith("." + entry)


def lora_params(shape: tuple[int, ...], r: int, dora: bool = False) -> int:
    """Closed form of what PEFT adds: r·(in+out) for a linear (+ out for DoRA's magnitude); r per expert."""
    if len(shape) == 3:
        e, a, b = shape
        return r * e * (a + b)
    out, inp = shape
    return r * (inp + out) + (out if dora else 0)


def lora_settings(cfg) -> LoraConfig:
    """The LoRA settings as the run's stage applies them: modules the stage trains whole beside the adapter (a reward
    model's new score head) added to lora.modules_to_save."""
    import dataclasses

    from qtune.stages import get

    extra = [m for m in get(cfg.train.stage).keeps if m not in cfg.lora.modules_to_save]
    return dataclasses.replace(cfg.lora, modules_to_save=[*cfg.lora.modules_to_save, *extra]) if extra else cfg.lora


def match(model, lora: LoraConfig, moe: MoeConfig) -> Matched:
    """Every module/parameter that `lora` + `moe` reach in `model`; patterns that reach nothing are listed."""
    heads = _output_head_names(model)
    entries = list(lora.target_modules)
    regex = re.compile(lora.target_regex) if lora.target_regex else None
    used: set[str] = set()
    targets: list[Target] = []
    modules = dict(model.named_modules())

    # 1. Linear layers
    for name, module in modules.items():
        if not _is_linear(module) or name in heads:
            continue
        hit = None
        if regex is not None:
            hit = regex.pattern if regex.fullmatch(name) else None
        elif ALL_LINEAR in entries:
            hit = ALL_LINEAR
        else:
            hit = next((e for e in entries if _suffix_match(name, e)), None)
        if hit is None:
            continue
        used.add(hit)
        shape = (module.out_features, module.in_features)
        extra = 0
        if lora.bias == "lora_only" and getattr(module, "bias", None) is not None:
            extra = module.out_features
        targets.append(Target(name, param_kind(name), "lora", shape, lora_params(shape, lora.r, lora.use_dora) + extra))

    # 2. Fused experts and routers (MoE models)
    experts = _fused_expert_params(model)
    routers = _router_params(model)
    is_moe = bool(experts)
    if is_moe and moe.scope is not MoeScope.none:
        want_experts = moe.scope in (MoeScope.expert_only, MoeScope.all)
        want_router = moe.scope in (MoeScope.router_only, MoeScope.all)
        if want_experts:
            for pat in moe.expert_patterns:
                hits = [(n, s) for n, s in experts if re.search(pat, n)]
                if hits:
                    used.add(pat)
                for n, s in hits:
                    if any(t.name == n for t in targets):
                        continue
                    full = lora_params(s, lora.r)
                    kept = min(moe.max_experts or s[0], s[0])
                    targets.append(Target(n, "expert", "lora_param", s, full * kept // s[0], full))
        if want_router:
            for pat in moe.router_patterns:  # matched on the module path: model.layers.N.mlp.gate
                hits = [(n, s) for n, s in routers if re.search(pat, n.removesuffix(".weight"))]
                if hits:
                    used.add(pat)
                for n, s in hits:
                    if moe.router_mode is RouterMode.full:  # PEFT trains a copy of the whole gate module
                        targets.append(Target(n.removesuffix(".weight"), "router", "full", s, math.prod(s)))
                    else:
                        targets.append(Target(n, "router", "lora_param", s, lora_params(s, lora.r)))

    # 3. modules_to_save: trained whole (PEFT keeps a trainable copy)
    for entry in lora.modules_to_save:
        hits = [n for n in modules if _suffix_match(n, entry)]
        if hits:
            used.add(f"modules_to_save:{entry}")
        for n in hits:
            count = sum(p.numel() for p in modules[n].parameters())
            shape = tuple(next(modules[n].parameters()).shape) if count else ()
            targets.append(Target(n, param_kind(n), "full", shape, count))

    if lora.bias == "all":
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                targets.append(Target(n, param_kind(n), "full", tuple(p.shape), p.numel()))

    asked = ([regex.pattern] if regex is not None else entries)
    asked += [f"modules_to_save:{e}" for e in lora.modules_to_save]
    if is_moe and moe.scope in (MoeScope.expert_only, MoeScope.all):
        asked += list(moe.expert_patterns)
    if is_moe and moe.scope in (MoeScope.router_only, MoeScope.all):
        asked += list(moe.router_patterns)
    unmatched = [a for a in asked if a not in used]
    experts_adapted = any(t.kind == "expert" and t.how == "lora_param" for t in targets)
    covered = [a for a in unmatched if is_moe and experts_adapted and a in DENSE_MLP]
    return Matched(targets, [a for a in unmatched if a not in covered], is_moe, asked, covered)


DENSE_MLP = ("gate_proj", "up_proj", "down_proj")  # a dense MLP's linears (lora.target_modules' defaults name them)


def covered_message(patterns: list[str], model_name: str, moe: MoeConfig) -> str:
    """One line of information for Matched.covered (not a warning: those experts are adapted)."""
    return (f"{', '.join(patterns)}: {model_name} has no such linear layers, its experts are fused tensors; "
            f"moe.scope={moe.scope} adapts them through moe.expert_patterns ({', '.join(moe.expert_patterns)})")


def unmatched_message(pattern: str, model_name: str, is_moe: bool) -> str:
    hint = ""
    if is_moe and pattern in ("gate_proj", "up_proj", "down_proj"):
        hint = " (its experts are fused tensors: moe.scope and moe.expert_patterns reach them)"
    return f"'{pattern}' matches nothing in {model_name}{hint}"


def _fused_expert_params(model) -> list[tuple[str, tuple[int, ...]]]:
    """3-D expert parameters (transformers 5 fuses each layer's experts into (E, out, in) tensors)."""
    return [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.dim() == 3 and ".experts." in n]


def _router_params(model) -> list[tuple[str, tuple[int, ...]]]:
    """Router weights (E, H): the `weight` of an MoE block's gate module."""
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()
            if n.endswith(".gate.weight") and p.dim() == 2 and ".experts." not in n]


def check(matched: Matched, lora: LoraConfig) -> None:
    """Settings that cannot work on these targets, refused up front in one line."""
    if not matched.targets:
        raise ConfigError("lora: the settings match no module or parameter of this model "
                          f"(lora.target_modules={list(lora.target_modules)}); see `qtune train --dry-run`")
    if lora.use_dora and any(t.how == "lora_param" for t in matched.targets):
        raise ConfigError("lora.use_dora=true: PEFT has no DoRA for fused expert/router parameters; "
                          "set lora.use_dora=false or moe=none")


def peft_config(matched: Matched, lora: LoraConfig, quantized: bool, task_type: str = "CAUSAL_LM"):
    """The PEFT LoraConfig that adapts exactly `matched` (full names, not patterns)."""
    from peft import LoraConfig as PeftLoraConfig

    init = {"default": True, "true": True, "false": False}.get(lora.init, lora.init)
    kw = {}
    if lora.init == "loftq":
        if quantized:
            raise ConfigError("lora.init=loftq quantizes the base itself: use quant=none with it")
        from peft import LoftQConfig

        kw["loftq_config"] = LoftQConfig(loftq_bits=4)
    params = matched.names("lora_param")
    # PEFT's ParamWrapper (fused experts, router) refuses dropout; the linear adapters get theirs back in
    # apply_dropout() after the model is wrapped.
    dropout = 0.0 if params else lora.dropout
    return PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=dropout,
        target_modules=matched.names("lora") or None, target_parameters=params or None,
        use_rslora=lora.use_rslora, use_dora=lora.use_dora, init_lora_weights=init, bias=lora.bias,
        modules_to_save=[t.name for t in matched.targets if t.how == "full" and not t.name.endswith(".bias")] or None,
        task_type=task_type, **kw)


def apply_dropout(peft_model, p: float) -> int:
    """Give every linear LoRA layer dropout p (PEFT was built with 0 because fused parameters refuse it)."""
    import torch.nn as nn

    n = 0
    for module in peft_model.modules():
        drop = getattr(module, "lora_dropout", None)
        if isinstance(drop, nn.ModuleDict) and hasattr(module, "base_layer") and type(module).__name__ != "ParamWrapper":
            for key in list(drop.keys()):
                drop[key] = nn.Dropout(p)
                n += 1
    return n


# ---------------------------------------------------------------- full and freeze training (no adapters)


def layer_prefixes(model) -> list[str]:
    """The decoder layers' module paths, in order (model.layers.0, ...; under a score head too)."""
    import torch.nn as nn

    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] == "layers" and len(module):
            return [f"{name}.{i}" for i in range(len(module))]
    return []


def layer_module_names(model) -> list[str]:
    """What train.freeze.trainable_modules can name inside a decoder layer: its modules two levels deep
    (self_attn, self_attn.q_proj, mlp, mlp.experts, mlp.gate, input_layernorm, ...)."""
    prefixes = layer_prefixes(model)
    if not prefixes:
        return []
    layer = dict(model.named_modules())[prefixes[0]]
    return [n for n, _ in layer.named_modules() if n and n.count(".") <= 1]


def outer_module_names(model) -> list[str]:
    """What train.freeze.extra_modules can name: the modules outside the decoder layers that hold weights."""
    prefixes = layer_prefixes(model)
    stem = prefixes[0].rsplit(".", 1)[0] if prefixes else None
    names = []
    for n, m in model.named_modules():
        if not n or n == stem or (stem and n.startswith(stem + ".")) or not list(m.parameters(recurse=False)):
            continue
        names.append(n)
    return names


def match_weights(model, method: str, freeze, keeps: tuple[str, ...] = ()) -> Matched:
    """train.method=full|freeze: every parameter that trains, as targets trained whole ("full"), in the one
    vocabulary the LoRA table uses. full: all of them. freeze: in the layers train.freeze.trainable_layers picks
    (N > 0 the last N, N < 0 the first |N|), the modules trainable_modules names (a module path inside the layer, e.g.
    mlp or mlp.experts; `all`: the whole layer), and extra_modules outside the layers (embed_tokens, lm_head, norm:
    matched on the module path, a name equal to it or ending in `.name`). `keeps`: modules the stage trains whole
    (rm: the new score head). A tied weight is one parameter (trained once, listed under its first name)."""
    modules = dict(model.named_modules())
    is_moe = bool(_fused_expert_params(model))
    chosen: set[int] = set()
    asked: list[str] = []
    unmatched: list[str] = []
    if method == "full":
        chosen = {id(p) for p in model.parameters()}
    else:
        prefixes = layer_prefixes(model)
        n = freeze.trainable_layers
        depth = len(prefixes)
        if n == 0 or abs(n) > depth:
            raise ConfigError(f"train.freeze.trainable_layers={n}: the model has {depth} decoder layers; valid: 1 to "
                              f"{depth} (the last N) or -1 to -{depth} (the first |N|)")
        layers = prefixes[depth - n:] if n > 0 else prefixes[:-n]
        wanted = list(freeze.trainable_modules)
        asked += wanted
        for entry in wanted:
            hit = False
            for prefix in layers:
                path = prefix if entry == "all" else f"{prefix}.{entry}"
                if path in modules:
                    chosen.update(id(p) for p in modules[path].parameters())
                    hit = True
            if not hit:
                raise ConfigError(f"train.freeze.trainable_modules: '{entry}' matches nothing in a decoder layer; "
                                  f"valid: all, {', '.join(layer_module_names(model))}")
        for entry in freeze.extra_modules:
            asked.append(f"extra_modules:{entry}")
            hits = [m for name, m in modules.items() if name and _suffix_match(name, entry)
                    and not any(name.startswith(p + ".") or name == p for p in prefixes)]
            if not hits:
                raise ConfigError(f"train.freeze.extra_modules: '{entry}' matches nothing outside the decoder layers; "
                                  f"valid: {', '.join(n.rsplit('.', 1)[-1] for n in outer_module_names(model))}")
            for m in hits:
                chosen.update(id(p) for p in m.parameters())
    for entry in keeps:
        for name, m in modules.items():
            if name and _suffix_match(name, entry):
                chosen.update(id(p) for p in m.parameters())
    targets = [Target(n, param_kind(n), "full", tuple(p.shape), p.numel())
               for n, p in model.named_parameters() if id(p) in chosen]
    return Matched(targets, unmatched, is_moe, asked)


def trained(model, cfg) -> Matched:
    """What the run trains, by train.method: LoRA's targets (match) or the weights trained whole (match_weights)."""
    from qtune.stages import get

    method = str(cfg.train.method)
    if method == "lora":
        return match(model, lora_settings(cfg), cfg.moe)
    return match_weights(model, method, cfg.train.freeze, get(cfg.train.stage).keeps)


def set_trainable(model, matched: Matched) -> int:
    """requires_grad on exactly the parameters `matched` names, off everywhere else; returns the trained count."""
    names = {t.name for t in matched.targets}
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
        n += p.numel() if name in names else 0
    return n
