"""Merged model -> GGUF (f16, q8_0) for llama.cpp and Ollama, written with the `gguf` package and verified
by loading the file back with transformers' GGUF loader; an Ollama Modelfile beside each file. (k-quants such as
q4_k_m are not written: the gguf package has no quantizer for them; llama.cpp's llama-quantize makes them from f16.)

Dense Llama (the embedded SmolLM2) and Qwen3 are supported. Llama's q/k projections are permuted into
GGML's rotary layout, as llama.cpp's converter does (transformers undoes it on load); Qwen3 needs none.
Norm weights stay f32; q8_0 quantizes every 2-D weight whose rows divide into 32-value blocks.
Qwen3-MoE is written in llama.cpp's `qwen3moe` layout: transformers' fused gate_up_proj (E, 2·I, H) is split into
ffn_gate_exps and ffn_up_exps (E, I, H), down_proj is ffn_down_exps (E, H, I), the router is ffn_gate_inp (kept in
f32: the routing must not move), with expert_count, expert_used_count and expert_feed_forward_length; q8_0 quantizes
the 3-D expert tensors in the same 32-value row blocks. Layers without experts (mlp_only_layers) are refused.
"""
from __future__ import annotations

import json
from pathlib import Path

from qtune.errors import ConfigError

import re

ARCHS = {"llama": "LLAMA", "qwen3": "QWEN3", "qwen3_moe": "QWEN3MOE"}
EXPERTS = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")
TYPES = ("f16", "q8_0")
# llama.cpp's k-quants: the gguf package only reads them (gguf.quants has no quantizer for Q4_K, Q5_K, Q6_K), so they
# are made from the f16 file with llama.cpp's own quantizer
K_QUANTS = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k", "q4_k", "q5_k")


def unknown_type(qtype: str) -> str:
    """The one line for a merge.gguf type qtune does not write."""
    if qtype.lower() in K_QUANTS:
        return (f"merge.gguf={qtype}: llama.cpp's k-quants are made by its own quantizer, not the gguf package; export "
                f"merge.gguf=[f16] and run `llama-quantize <run>/gguf/merged-f16.gguf merged-{qtype.lower()}.gguf "
                f"{qtype.upper()}`; qtune writes: {', '.join(TYPES)}")
    return f"merge.gguf={qtype}: valid: {', '.join(TYPES)}"


# Ollama's Go-template form of ChatML (Qwen3, SmolLM2): the system prompt, then each user and assistant turn, then
# the opening of the assistant's answer (Qwen3 thinks in it first, as its own template has it)
OLLAMA_CHATML = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range .Messages }}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ .Content }}<|im_end|>
{{ end }}
{{- end }}<|im_start|>assistant
"""


def modelfile(gguf_name: str, tokenizer) -> str:
    """An Ollama Modelfile for the GGUF file `gguf_name` beside it (`ollama create <name> -f <this file>`): FROM it, the
    chat template in Ollama's syntax where the model's is ChatML, and its stop tokens."""
    template = tokenizer.chat_template or ""
    lines = [f"# ollama create {Path(gguf_name).stem} -f <this file>", f"FROM ./{gguf_name}"]
    stops = []
    if "<|im_start|>" in template:
        lines.append(f'TEMPLATE """{OLLAMA_CHATML}"""')
        stops = ["<|im_start|>", "<|im_end|>"]
    else:  # another template: Ollama reads the one the GGUF file holds (tokenizer.chat_template)
        lines.append("# TEMPLATE: not ChatML; Ollama uses the chat template stored in the GGUF file")
    eos = tokenizer.eos_token
    if eos and eos not in stops:
        stops.append(eos)
    lines += [f'PARAMETER stop "{t}"' for t in stops]
    return "\n".join(lines) + "\n"


def export(model, tokenizer, out: Path, qtype: str) -> Path:
    """Write <out> (a .gguf file) from a loaded HF model and its tokenizer."""
    import gguf

    if qtype not in TYPES:
        raise ConfigError(unknown_type(qtype))
    cfg = model.config
    if cfg.model_type not in ARCHS:
        raise ConfigError(f"merge.gguf: {cfg.model_type} models cannot be exported to GGUF here "
                          f"(supported: {', '.join(ARCHS)}); drop merge.gguf")
    arch = getattr(gguf.MODEL_ARCH, ARCHS[cfg.model_type])
    arch_name = gguf.MODEL_ARCH_NAMES[arch]
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    writer = gguf.GGUFWriter(str(out), arch_name)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_name(Path(str(cfg.name_or_path or "qtune-merged")).name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta") or getattr(cfg, "rope_theta", 10000.0)
    writer.add_rope_freq_base(float(rope))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if qtype == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    if cfg.model_type == "qwen3_moe":
        if getattr(cfg, "mlp_only_layers", None) or getattr(cfg, "decoder_sparse_step", 1) != 1:
            raise ConfigError("merge.gguf: llama.cpp's qwen3moe layout has experts in every layer; this model has "
                              "dense layers too (mlp_only_layers / decoder_sparse_step); drop merge.gguf")
        writer.add_expert_count(cfg.num_experts)
        writer.add_expert_used_count(cfg.num_experts_per_tok)
        writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    _add_tokenizer(writer, tokenizer, cfg.vocab_size, cfg.model_type)

    state = model.state_dict()
    tied = getattr(cfg, "tie_word_embeddings", False)
    for hf_name, tensor in state.items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when output.weight is absent
        data = tensor.detach().float().cpu()
        if m := EXPERTS.fullmatch(hf_name):  # fused experts: llama.cpp keeps gate and up apart
            if m[2] == "down_proj":
                parts = [(f"blk.{m[1]}.ffn_down_exps.weight", data)]
            else:
                gate, up = data.chunk(2, dim=1)
                parts = [(f"blk.{m[1]}.ffn_gate_exps.weight", gate), (f"blk.{m[1]}.ffn_up_exps.weight", up)]
            for name, part in parts:
                _add(writer, name, part.contiguous().numpy(), qtype)
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ConfigError(f"merge.gguf: no GGUF name for tensor {hf_name}")
        if cfg.model_type == "llama" and hf_name.endswith("q_proj.weight"):
            data = _permute(data, cfg.num_attention_heads)
        elif cfg.model_type == "llama" and hf_name.endswith("k_proj.weight"):
            data = _permute(data, cfg.num_key_value_heads)
        _add(writer, name, data.numpy(), "f32" if ".ffn_gate_inp." in name else qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _add(writer, name: str, arr, qtype: str) -> None:
    """One tensor: 1-D (and f32 ones) in f32, q8_0 where its rows divide into 32-value blocks, else f16."""
    import gguf
    import numpy as np

    if arr.ndim == 1 or qtype == "f32":
        writer.add_tensor(name, arr.astype(np.float32))
    elif qtype == "q8_0" and arr.shape[-1] % 32 == 0:
        q = gguf.quants.quantize(arr.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
        writer.add_tensor(name, arr.astype(np.float16))


def _permute(w, n_head: int):
    """HF's rotary halves -> GGML's interleaved pairs (llama.cpp's convert_hf_to_gguf LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _add_tokenizer(writer, tokenizer, vocab_size: int, model_type: str) -> None:
    """Byte-level BPE ("gpt2" in GGUF): tokens in id order, their types, merges, special ids, chat template."""
    import gguf

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend["model"]
    if model.get("type") != "BPE":
        raise ConfigError(f"merge.gguf: only byte-level BPE tokenizers are exported (this one is {model.get('type')})")
    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    added = {a["id"]: a for a in backend.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            a = added.get(i)
            types.append(gguf.TokenType.NORMAL if a is None else
                         gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED)
        else:  # the model's embedding is larger than the tokenizer (Qwen3: 151,936 rows)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre({"qwen3": "qwen2"}.get(model_type, "smollm" if "smol" in str(tokenizer.name_or_path).lower() else "default"))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_add_bos_token(False)
    if tokenizer.eos_token_id is not None:
        writer.add_eos_token_id(tokenizer.eos_token_id)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def verify(path: Path, reference_model, tokenizer, inputs: list[dict]) -> dict:
    """Load the GGUF file back with transformers and compare next-token choices with the merged model."""
    import torch
    from transformers import AutoModelForCausalLM

    # Both sides in fp32, so the comparison sees the file's rounding, not bf16 arithmetic (bf16 -> fp32 -> bf16
    # round-trips exactly, so the merged model is left as it was).
    dtype = next(reference_model.parameters()).dtype
    extra = {}
    if reference_model.config.model_type == "qwen3_moe":
        # transformers' GGUF reader does not map expert_feed_forward_length to moe_intermediate_size (it would take
        # the class default); the tensors still come from the file alone
        extra["config"] = reference_model.config
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32, **extra)
    loaded.eval()
    agree, worst = [], 0.0
    reference_model.float()
    try:
        with torch.no_grad():
            for x in inputs:
                a = reference_model(**x).logits.float()
                b = loaded(**x).logits.float()
                agree.append((a.argmax(-1) == b.argmax(-1)).float().mean().item())
                worst = max(worst, (a - b).abs().max().item())
    finally:
        reference_model.to(dtype)
    return {"file": str(path), "bytes": path.stat().st_size, "top1_agreement": sum(agree) / len(agree),
            "max_abs_diff": worst}
