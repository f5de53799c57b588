"""The training model, built in two stages (axolotl's ModelLoader.load is the pattern): `before_peft` loads the base as
`quant=` asks and puts the fast path's base pieces on it; `after_peft` wraps it in PEFT on exactly the targets
qtune.modeling.targets.match() names and puts the fast path's LoRA pieces on it. `train`, the dry run's plan and the
benchmarks all build through here, and the decisions on the way (`decide`) are the ones the plan counts.

The sequence, top to bottom:
  1. the fast path's decision (qtune.modeling.fast.decide): on for CUDA, off under FSDP2 or train.fast=false
  2. the base model, quantized, frozen, with activation checkpointing (rm: under a new score head); MoE experts in 4
     bits where the fast path runs them
  3. train.cuda_graphs (on the model's attention), reentrant checkpointing, offloaded layer inputs, liger kernels,
     varlen attention for packed rows
  4. LoRA targets, moe.max_experts' choice of experts (measured on the first training rows, kept in experts.json),
     PEFT, train.init_adapter's weights, LoRA dropout
  5. fused LoRA and grouped-expert functions, embeddings and output head in host memory, compact expert adapters
train.method=full|freeze replaces 4-5 (_weights): no PEFT; requires_grad on exactly what
qtune.modeling.targets.trained() names, those weights in train.trainable_dtype; the fast path keeps its base pieces
(checkpointing, offload, varlen attention, liger where one dtype) and says why the adapter pieces are off.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from qtune.config.schema import Config, QuantMethod
from qtune.modeling import fast as fastpath
from qtune.modeling.targets import Matched


def _quiet(line: str) -> None:
    pass


@dataclass
class Built:
    model: object                              # the PEFT model (full/freeze: the model), ready for the stage's trainer
    matched: Matched                           # what LoRA reaches (what the dry run lists)
    fast: fastpath.FastPath                    # the fast path's decisions and the pieces it put on
    selection: dict = field(default_factory=dict)  # moe.max_experts: the chosen experts per MoE block
    compacted: set = field(default_factory=set)    # blocks whose expert adapters hold the chosen experts only


def decide(cfg: Config, device: str, *, fsdp: bool = False) -> fastpath.FastPath:
    """train.fast's decision for this device (the graphs follow in before_peft, once the model's attention is known)."""
    return fastpath.decide(str(cfg.train.fast), device, fsdp=fsdp)


def before_peft(cfg: Config, folder: Path, device: str, dtype, *, fsdp: bool = False, processes: int = 1):
    """Steps 1-3: (base model, FastPath). Under FSDP2 the sharding checkpoints activations
    (qtune.training.distributed.trainer_args) and the 4-bit weights are stored in the model's dtype so that they shard."""
    from qtune.modeling.load import load_model
    from qtune.stages import get

    t = cfg.train
    fast = decide(cfg, device, fsdp=fsdp)
    model = load_model(folder, cfg.model, cfg.quant, device, dtype, t.gradient_checkpointing and not fsdp,
                       experts_4bit=fast.on, quant_storage=dtype if fsdp else None, head=get(t.stage).head)
    fastpath.decide_graphs(fast, str(t.cuda_graphs), device, **fastpath.graph_settings(cfg, processes),
                           dtype=dtype, dropout=cfg.lora.dropout, attention=fastpath.attention_of(model))
    from qtune.config.schema import TrainableDtype, TrainMethod

    mixed = t.method is not TrainMethod.lora and t.trainable_dtype is TrainableDtype.fp32
    fastpath.apply_base(fast, model, device, t.gradient_checkpointing, str(t.liger), str(t.offload_activations),
                        fastpath.micro_batch_tokens(cfg), mixed_weights=mixed)
    fastpath.packed_attention(fast, model, device, dtype, cfg.data.packing)
    return model, fast


def after_peft(cfg: Config, model, fast: fastpath.FastPath, device: str, *, out: Path | None = None, train_ds=None,
               coordinate: Callable = nullcontext, say: Callable[[str], None] = _quiet,
               warn: Callable[[str], None] = _quiet) -> Built:
    """Steps 4-5. `out` and `train_ds`: where moe.max_experts keeps its choice and the rows it measures routing on;
    `coordinate()`: a context in which one process of several measures it while the others wait (then read it);
    `say` and `warn` take what a terminal would show."""
    from qtune.modeling import weights

    if weights.full(cfg):
        return _weights(cfg, model, fast, say)
    from peft import get_peft_model

    from qtune.modeling.targets import (apply_dropout, check, covered_message, lora_settings, match, peft_config,
                                        unmatched_message)
    from qtune.stages import get

    stage = get(cfg.train.stage)
    lora = lora_settings(cfg)
    matched = match(model, lora, cfg.moe)
    check(matched, lora)
    for pattern in matched.unmatched:
        warn(unmatched_message(pattern, cfg.model.name, matched.is_moe))
    if matched.covered:
        say(covered_message(matched.covered, cfg.model.name, cfg.moe))
    with coordinate():
        selection = _expert_selection(cfg, model, matched, out, train_ds, say)
    task = "SEQ_CLS" if stage.head == "score" else "CAUSAL_LM"
    model = get_peft_model(model, peft_config(matched, lora, cfg.quant.method is not QuantMethod.none, task))
    if cfg.train.init_adapter:
        from qtune.modeling.adapters import load_into
        from qtune.runs import adapter_folder

        n = load_into(model, adapter_folder(cfg.train.init_adapter, "train.init_adapter"))
        say(f"train.init_adapter: {n} tensors loaded from {cfg.train.init_adapter}")
    if cfg.lora.dropout and matched.names("lora_param"):
        n = apply_dropout(model, cfg.lora.dropout)
        say(f"lora.dropout={cfg.lora.dropout:g} on {n} linear adapters; fused expert/router adapters train "
            "without dropout (PEFT's ParamWrapper has none)")
    fastpath.apply_lora(fast, model, str(cfg.quant.method))
    fastpath.embeddings_to_host(fast, model)
    setting = str(cfg.train.head_on_host)
    if fast.on and device.startswith("cuda") and stage.head == "lm" and setting != "false":
        from qtune.modeling.plan import plan

        fastpath.head_to_host(fast, model, setting, setting == "true" or plan(cfg).head_on_host)
    # dpo and kto keep full-size expert adapters (masked to the chosen experts): TRL copies the adapter it starts from
    # as the reference, a copy that compacted tensors would not fit
    compacted = set(fastpath.compact_experts(fast, model, selection)) if stage.compacts else set()
    if selection:
        from qtune.modeling.moe import restrict

        restrict(model, selection)  # blocks the fast path did not compact keep all experts' adapters, masked
    _check_count(model, matched, compacted)
    return Built(model, matched, fast, selection, compacted)


def build(cfg: Config, folder: Path, device: str, dtype, *, fsdp: bool = False, processes: int = 1,
          between: Callable | None = None, **after) -> Built:
    """Both stages; `between(model)`: what a caller puts on the base before PEFT wraps it (a benchmark's fused head)."""
    model, fast = before_peft(cfg, folder, device, dtype, fsdp=fsdp, processes=processes)
    if between is not None:
        between(model)
    return after_peft(cfg, model, fast, device, **after)


def _weights(cfg: Config, model, fast: fastpath.FastPath, say) -> Built:
    """train.method=full|freeze: no PEFT wrap; requires_grad on exactly what qtune.modeling.targets.trained() names (the
    dry run's table), those weights in train.trainable_dtype. The fast path's adapter pieces do not apply
    (fastpath.weights_notes says which and why)."""
    from qtune.modeling import weights
    from qtune.modeling.targets import set_trainable, trained

    matched = trained(model, cfg)
    n = set_trainable(model, matched)
    if n != matched.trainable:
        raise RuntimeError(f"{n} parameters set to train, the plan counted {matched.trainable}")
    say(f"train.method={cfg.train.method}: {weights.cast_trainable(model, cfg)}")
    if fast.on:
        fast.notes += fastpath.weights_notes(str(cfg.train.method))
    return Built(model, matched, fast)


def _expert_selection(cfg: Config, model, matched, out: Path | None, train_ds, say) -> dict:
    """moe.max_experts: which experts of each MoE block get adapters (kept in experts.json for resumes)."""
    from qtune.modeling import moe

    if not moe.capped(matched, cfg.moe):
        return {}
    selection = moe.load_selection(out) if out is not None else None
    if selection is None:
        from qtune.data.preference import token_row
        from qtune.data.prepare import row_tensors

        rows = [] if train_ds is None else [train_ds[i] for i in range(min(len(train_ds), 16))]
        batches = [row_tensors(token_row(row), model.device) for row in rows]
        selection = moe.select_experts(model, matched, cfg.moe, batches)
        if out is not None:
            moe.save_selection(out, selection, cfg.moe)
    some = next(iter(selection.items()))
    say(f"moe.max_experts={cfg.moe.max_experts} ({cfg.moe.expert_selection}): adapters on experts "
        f"{some[1]} of {some[0]}, … (all in {out / 'experts.json' if out else 'memory'})")
    return selection


def _check_count(model, matched: Matched, compacted: set) -> None:
    """The plan and PEFT must agree on the trainable parameters; a mismatch is a qtune bug."""
    from qtune.modeling.moe import block_of

    trainable, _ = model.get_nb_trainable_parameters()
    expected = sum(t.params if t.how == "lora_param" and block_of(t.name) in compacted else t.allocated
                   for t in matched.targets)
    if trainable != expected:
        raise RuntimeError(f"PEFT made {trainable} trainable parameters, the plan counted {expected}")
