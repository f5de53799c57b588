"""train.method=full|freeze: the weights themselves trained, no adapters. What differs from LoRA is read here: the checks
of the settings that cannot go with it, the optimizer's package, the precision of the trained weights and the bytes a
trained parameter costs (qtune.modeling.estimate), and the checkpoint's size on disk.

Precision (train.trainable_dtype): fp32, the default, keeps fp32 master copies of the trained weights, with fp32
gradients and optimizer states, while the compute runs autocast in the model's bf16/fp16 (transformers Trainer's usual
mixed precision, `bf16=True` over an fp32 parameter); frozen weights (freeze) stay in the model's 16-bit dtype. bf16
keeps the trained weights, their gradients and the optimizer's states in bf16: 2 + 2 + 4 bytes a parameter with AdamW,
2 + 2 + 2 with an 8-bit optimizer, at the cost of rounding each update to bf16 (8 bits of mantissa: an update below
~1/256 of the weight it changes is lost). On a CPU the model is fp32 and both settings are the same.
"""
from __future__ import annotations

from qtune.config.schema import Config, LoraConfig, QuantMethod, TrainableDtype, TrainMethod
from qtune.errors import ConfigError

# transformers' OptimizerNames (5.24), written out: importing transformers.training_args for them takes seconds and
# brings bitsandbytes' notices along, before a line that should come at once (tests/test_full.py compares the two)
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused", "adafactor",
              "adamw_anyprecision", "adamw_torch_4bit", "adamw_torch_8bit", "ademamix", "sgd", "adagrad",
              "adamw_bnb_8bit", "adamw_8bit", "ademamix_8bit", "lion_8bit", "lion_32bit", "paged_adamw_32bit",
              "paged_adamw_8bit", "paged_ademamix_32bit", "paged_ademamix_8bit", "paged_lion_32bit", "paged_lion_8bit",
              "rmsprop", "rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit", "galore_adamw", "galore_adamw_8bit",
              "galore_adafactor", "galore_adamw_layerwise", "galore_adamw_8bit_layerwise", "galore_adafactor_layerwise",
              "lomo", "adalomo", "grokadamw", "schedule_free_radam", "schedule_free_adamw", "schedule_free_sgd",
              "apollo_adamw", "apollo_adamw_layerwise", "stable_adamw")
# train.optim names that need a package beside torch: transformers' OptimizerNames prefix -> (module, how to get it)
OPTIM_PACKAGES = (("paged_", "bitsandbytes"), ("adamw_bnb", "bitsandbytes"), ("adamw_8bit", "bitsandbytes"),
                  ("ademamix", "bitsandbytes"), ("lion_", "bitsandbytes"), ("rmsprop_bnb", "bitsandbytes"),
                  ("galore_", "galore_torch"), ("apollo_", "apollo_torch"), ("lomo", "lomo_optim"),
                  ("adalomo", "lomo_optim"), ("schedule_free_", "schedulefree"), ("grokadamw", "grokadamw"),
                  ("adamw_torch_4bit", "torchao"), ("adamw_torch_8bit", "torchao"), ("adamw_anyprecision", "torchdistx"))
PIP = {"bitsandbytes": "bitsandbytes>=0.45", "galore_torch": "galore-torch", "apollo_torch": "apollo-torch",
       "lomo_optim": "lomo-optim", "torchdistx": "torchdistx"}


def full(cfg: Config) -> bool:
    """Whether the run trains weights rather than adapters (train.method=full|freeze)."""
    return cfg.train.method is not TrainMethod.lora


def check_optim(optim: str) -> None:
    """train.optim is one of transformers' optimizer names and its package is installed: one line each, before the
    model loads."""
    import importlib.util

    names = OPTIMIZERS
    if optim not in names:
        raise ConfigError(f"train.optim={optim}: not an optimizer transformers knows; valid: {', '.join(names)}")
    module = next((m for prefix, m in OPTIM_PACKAGES if optim.startswith(prefix)), None)
    if optim == "adamw_8bit" or optim.startswith("paged_"):
        module = "bitsandbytes"
    if module and importlib.util.find_spec(module) is None:
        raise ConfigError(f"train.optim={optim} needs {module}, which is not installed here (pip install "
                          f"{PIP.get(module, module)}); or use train.optim=adamw_torch_fused")


def check(cfg: Config) -> None:
    """What train.method=full|freeze cannot go with, refused in one line (the dry run's checks too)."""
    check_optim(cfg.train.optim)
    if not full(cfg):
        return
    method = cfg.train.method
    if cfg.quant.method is not QuantMethod.none:
        raise ConfigError(f"train.method={method} with quant={cfg.quant.method}: a quantized base trains adapters only "
                          "(its 4/8-bit weights take no gradient); use quant=none, or train.method=lora (QLoRA)")
    # Refused, not ignored: a lora.* setting given with full/freeze says the user expects an adapter, and a run that
    # silently trains without one would not be what was asked (nor could `qtune merge` fold it).
    changed = _changed(cfg.lora, LoraConfig())
    if changed:
        raise ConfigError(f"train.method={method} trains the weights themselves, so {', '.join(changed)} would change "
                          f"nothing; leave the lora.* settings out, or use train.method=lora")


def _changed(now, default) -> list[str]:
    import dataclasses

    out = []
    for f in dataclasses.fields(default):
        a, b = getattr(now, f.name), getattr(default, f.name)
        if list(a) != list(b) if isinstance(b, list) else a != b:
            out.append(f"lora.{f.name}={a}")
    return out


def cast_trainable(model, cfg: Config) -> str:
    """The trained parameters in train.trainable_dtype (fp32: master copies, the compute autocast to the model's dtype);
    returns what was done, for the run's log."""
    import torch

    if cfg.train.trainable_dtype is TrainableDtype.bf16:
        dtype = model.dtype if model.dtype in (torch.bfloat16, torch.float16) else torch.float32
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(dtype)
        return f"trained weights, gradients and optimizer states in {str(dtype).replace('torch.', '')}"
    n = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
            n += p.numel()
    return "trained weights in fp32" + (f" (master copies of {n:,} 16-bit parameters, compute autocast)" if n else "")


def state_bytes(optim: str, weight_bytes: int) -> float:
    """The optimizer's state a trained parameter costs: two moments in the weight's dtype for Adam-likes, one for Lion,
    SGD and RMSprop; an 8-bit optimizer's moments a byte each (bitsandbytes' blockwise 8-bit states); none for SGD
    without momentum is not assumed (transformers' sgd keeps a momentum buffer when asked, so one is counted)."""
    if "8bit" in optim:
        return 2 if "lion" not in optim else 1
    if "4bit" in optim:
        return 1
    if optim.startswith(("lion", "paged_lion", "sgd", "rmsprop", "adagrad")):
        return weight_bytes
    if optim == "adafactor":
        return 0.1 * weight_bytes  # factored second moments: rows + columns, a small share of the weight
    return 2 * weight_bytes


def bytes_per_param(cfg: Config, dtype_bytes: int) -> tuple[float, float]:
    """(bytes a trained parameter adds beyond its 16-bit copy in the base count, checkpoint bytes a trained parameter
    takes on disk beyond the base's) for train.method=full|freeze: the fp32 master copy's extra bytes, the gradient, the
    optimizer's states; on disk the weight as trained and the states."""
    master = cfg.train.trainable_dtype is TrainableDtype.fp32
    weight = 4 if master else dtype_bytes
    states = state_bytes(cfg.train.optim, weight)
    memory = (weight - dtype_bytes) + weight + states
    return memory, states + (weight - dtype_bytes)


def checkpoint_bytes(cfg: Config, total: int, trainable: int) -> float:
    """One checkpoint of a full/freeze run on disk: every weight (the trained ones as trained, the rest in 16 bits)
    and the optimizer's states (the scheduler, RNG and trainer state are small)."""
    weight = 4 if cfg.train.trainable_dtype is TrainableDtype.fp32 else 2
    return 2 * (total - trainable) + trainable * (weight + state_bytes(cfg.train.optim, weight))

