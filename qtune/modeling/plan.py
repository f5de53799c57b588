"""The plan: what the settings adapt and what memory they need, from the config alone (the model is built on the meta
device, no weights). `train --dry-run`, the OOM message and `inspect-moe` all read it, so they never disagree."""
from __future__ import annotations

from dataclasses import dataclass

from qtune.config.schema import Config
from qtune.modeling.estimate import Memory
from qtune.modeling.targets import Matched


@dataclass
class Plan:
    model: object          # the meta-device model
    matched: Matched       # what LoRA (and full training) reaches
    total: int             # the model's parameters
    memory: Memory         # the estimate for one micro-batch of this config


def plan(cfg: Config) -> Plan:
    from qtune.modeling.arch import meta_model
    from qtune.modeling.estimate import estimate, experts_4bit
    from qtune.modeling.fast import offloads
    from qtune.modeling.targets import match
    from qtune.stages import compacts, head, lora_settings, sequences

    t = cfg.train
    model = meta_model(cfg.model.arch, head(t.stage))
    matched = match(model, lora_settings(cfg), cfg.moe)
    # the tokens one micro-batch puts through a forward that keeps activations (dpo and rm: chosen and rejected)
    tokens = cfg.data.max_length * t.batch_size * sequences(t.stage)
    memory = estimate(model, cfg.model.arch, matched, cfg.quant, tokens, t.gradient_checkpointing, on_gpu=True,
                      offload_inputs=offloads(t.fast, t.offload_activations, t.gradient_checkpointing, tokens),
                      experts4=experts_4bit(t.fast, cfg.quant), compact=str(t.fast) != "false" and compacts(t.stage),
                      lm_head=head(t.stage) == "lm")
    return Plan(model, matched, sum(p.numel() for p in model.parameters()), memory)
