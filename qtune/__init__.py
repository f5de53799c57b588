"""qtune: fine-tune Qwen3 models (dense and MoE) with LoRA and QLoRA."""

__version__ = "0.1.0"
