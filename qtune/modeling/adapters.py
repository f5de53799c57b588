"""train.init_adapter: a run that starts from an existing adapter (the usual recipe: SFT, then DPO from its adapter).

The adapter's weights are loaded into the run's own adapter, which PEFT built from this run's settings, so the fast
path, the MoE expert selection and the plan's parameter count apply as to a fresh adapter. Its settings must be the
run's: a different rank, alpha or set of targets is refused in one line naming the key to change. Weights the old
adapter lacks keep their initial values (a reward model's score head, starting from an SFT adapter).
"""
from __future__ import annotations

import json
from pathlib import Path

from qtune.errors import ConfigError

# adapter_config.json fields -> the qtune setting that decides them
SETTINGS = (("r", "lora.r"), ("lora_alpha", "lora.alpha"), ("target_modules", "lora.target_modules"),
            ("target_parameters", "moe.scope / moe.expert_patterns"), ("use_dora", "lora.use_dora"),
            ("use_rslora", "lora.use_rslora"))


def load_into(model, folder: Path, key: str = "train.init_adapter") -> int:
    """Load the adapter in `folder` into `model`'s "default" adapter; returns how many tensors were loaded."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    saved = json.loads((folder / "adapter_config.json").read_text())
    want = model.peft_config["default"]
    for field, setting in SETTINGS:
        theirs, ours = _plain(saved.get(field)), _plain(getattr(want, field, None))
        if theirs != ours:
            raise ConfigError(f"{key}={folder}: that adapter has {field}={theirs}, this run would make "
                              f"{field}={ours}; set {setting} as it was trained (its run's config.yaml has them)")
    state = load_file(str(folder / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, state, adapter_name="default")
    if result.unexpected_keys:
        raise ConfigError(f"{key}={folder}: {len(result.unexpected_keys)} of its tensors have no place in this run's "
                          f"adapter (e.g. {result.unexpected_keys[0]}); was it trained on {model.config.name_or_path}?")
    return len(state)


def _plain(value):
    """Lists and sets compare as sets (PEFT writes target_modules as either); absent and empty are the same."""
    if isinstance(value, (list, set, tuple)):
        return sorted(value) or None
    return None if value in (None, False, "") else value
