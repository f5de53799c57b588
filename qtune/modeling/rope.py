"""Rotary positions past a model's context (model.rope_scaling=yarn): the transformers config every verb loads the
model with, and the check that data.max_length stays within the positions the model reaches.

Qwen3 reaches 32,768 tokens natively (its config says 40,960) and documents YaRN for longer: rope_type yarn,
factor 4.0, original_max_position_embeddings 32768, i.e. up to 131,072 tokens. transformers 5 reads this from the
config's `rope_parameters` (the older `rope_scaling` is a deprecated alias) and builds the rotary table from it when
the model is built, so it must be set before the weights load.
"""
from __future__ import annotations

from qtune.config.schema import Config, ModelConfig, RopeScaling
from qtune.errors import ConfigError


def check(model: ModelConfig) -> None:
    """The YaRN settings themselves, in one line naming the key."""
    if model.rope_scaling is not RopeScaling.yarn:
        return
    if not model.rope_factor > 1:
        raise ConfigError(f"model.rope_factor={model.rope_factor:g}: valid: > 1 (how far YaRN stretches the positions; "
                          "4.0 is Qwen3's)")
    native = model.arch.max_position_embeddings
    if not 0 < model.rope_original_max_position_embeddings <= native:
        raise ConfigError(f"model.rope_original_max_position_embeddings={model.rope_original_max_position_embeddings}: "
                          f"valid: 1 to {native:,} (model.arch.max_position_embeddings of {model.name}): the context "
                          "the model was trained at, which YaRN stretches")


def check_context(cfg: Config) -> None:
    """data.max_length within the positions the model reaches (model.rope_scaling=yarn reaches further)."""
    check(cfg.model)
    m, length = cfg.model, cfg.data.max_length
    if length <= m.context:
        return
    if m.rope_scaling is RopeScaling.yarn:
        raise ConfigError(f"data.max_length={length:,} exceeds the {m.context:,} positions {m.name} reaches with YaRN "
                          f"(model.rope_factor={m.rope_factor:g} x model.rope_original_max_position_embeddings="
                          f"{m.rope_original_max_position_embeddings:,}); lower data.max_length or raise "
                          "model.rope_factor")
    raise ConfigError(f"data.max_length={length:,} exceeds {m.name}'s context of {m.context:,} tokens "
                      "(model.arch.max_position_embeddings); lower data.max_length, or set model.rope_scaling=yarn "
                      f"to reach {int(m.rope_factor * m.rope_original_max_position_embeddings):,}")


def apply(config, model: ModelConfig) -> None:
    """Set YaRN on a transformers config (no change for model.rope_scaling=none). The rope base stays the model's."""
    if model.rope_scaling is not RopeScaling.yarn:
        return
    params = dict(getattr(config, "rope_parameters", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", None) or model.arch.rope_theta)
    config.rope_parameters = {"rope_type": "yarn", "rope_theta": theta, "factor": float(model.rope_factor),
                              "original_max_position_embeddings": int(model.rope_original_max_position_embeddings)}
    # transformers checks factor against max_position_embeddings / original_max_position_embeddings
    config.max_position_embeddings = model.context


def load_kwargs(folder, model: ModelConfig, **config_kwargs) -> dict:
    """What from_pretrained takes to load `folder` with these rope settings: {} for none, else its config with YaRN
    set (config_kwargs, such as num_labels, set on that config too, since from_pretrained passes its own keyword
    arguments to the model once it is given a config)."""
    check(model)
    if model.rope_scaling is not RopeScaling.yarn:
        return dict(config_kwargs)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, trust_remote_code=model.trust_remote_code)
    apply(config, model)
    for key, value in config_kwargs.items():
        setattr(config, key, value)
    return {"config": config}
