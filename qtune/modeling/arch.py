"""Architecture facts (conf/model/*.yaml `arch:`) -> a transformers config, and models on the meta device."""
from __future__ import annotations

from qtune.config.schema import ArchConfig

QWEN3_SPECIAL_IDS = {"bos_token_id": 151643, "eos_token_id": 151645, "pad_token_id": 151643}


def hf_config(arch: ArchConfig):
    """A transformers PretrainedConfig with exactly the shapes that `arch` records."""
    from transformers import AutoConfig

    kw = dict(
        vocab_size=arch.vocab_size, hidden_size=arch.hidden_size, intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_hidden_layers, num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads, head_dim=arch.head_dim,
        max_position_embeddings=arch.max_position_embeddings, rms_norm_eps=arch.rms_norm_eps,
        tie_word_embeddings=arch.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": arch.rope_theta},
    )
    if arch.model_type.startswith("qwen"):
        kw.update(QWEN3_SPECIAL_IDS)
    if arch.num_experts:
        kw.update(num_experts=arch.num_experts, num_experts_per_tok=arch.num_experts_per_tok,
                  moe_intermediate_size=arch.moe_intermediate_size, decoder_sparse_step=arch.decoder_sparse_step,
                  mlp_only_layers=list(arch.mlp_only_layers), norm_topk_prob=arch.norm_topk_prob,
                  router_aux_loss_coef=arch.router_aux_loss_coef)
    return AutoConfig.for_model(arch.model_type, **kw)


def meta_model(arch: ArchConfig, head: str = "lm"):
    """The full model built on the meta device: every module and shape, no memory, no weights. head="score": under a
    one-output sequence-classification head (a reward model) instead of the language-model head."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = hf_config(arch)
    with torch.device("meta"):
        if head == "score":
            config.num_labels = 1
            return AutoModelForSequenceClassification.from_config(config)
        return AutoModelForCausalLM.from_config(config)
