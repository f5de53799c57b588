"""Merged model -> GGUF (f16, q8_0, and the k-quant mixes q4_k_m, q5_k_m, q6_k) for llama.cpp and Ollama, written
with the `gguf` package and verified by loading the file back with transformers' GGUF loader; an Ollama Modelfile
beside each file. The gguf package has no quantizer for k-quants: qtune.export.kquants has them and llama.cpp's rule
for which tensor gets which type; the other k-quant mixes (q3_k_m, q4_k_s, ...) are left to llama.cpp's llama-quantize.

Dense Llama (the embedded SmolLM2) and Qwen3 are supported. Llama's q/k projections are permuted into
GGML's rotary layout, as llama.cpp's converter does (transformers undoes it on load); Qwen3 needs none.
Norm weights stay f32; q8_0 quantizes every 2-D weight whose rows divide into 32-value blocks; a k-quant mix picks a
type per tensor (kquants.tensor_type), falling back as llama.cpp does where rows do not divide into 256-value blocks.
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
TYPES = ("f16", "q8_0", "q4_k_m", "q5_k_m", "q6_k")
# llama.cpp's other k-quant mixes: made from the f16 file with llama.cpp's own quantizer
K_QUANTS = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q5_k_s", "q4_k", "q5_k")
FILE_TYPES = {"f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q4_k_m": "MOSTLY_Q4_K_M", "q5_k_m": "MOSTLY_Q5_K_M",
              "q6_k": "MOSTLY_Q6_K"}


def unknown_type(qtype: str) -> str:
    """The one line for a merge.gguf type qtune does not write."""
    if qtype.lower() in TYPES:
        return f"merge.gguf={qtype}: write it in lower case ({qtype.lower()}); valid: {', '.join(TYPES)}"
    if qtype.lower() in K_QUANTS:
        return (f"merge.gguf={qtype}: qtune writes the k-quant mixes q4_k_m, q5_k_m and q6_k; for this one export "
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
    writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[qtype]))
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
    n_expert = getattr(cfg, "num_experts", 0) if cfg.model_type == "qwen3_moe" else 0

    def kind(name: str, arr) -> str:
        """The GGML type of one tensor in this file."""
        if arr.ndim == 1:
            return "F32"
        if qtype == "f16":
            return "F16"
        if qtype == "q8_0":
            return "Q8_0" if arr.shape[-1] % 32 == 0 else "F16"
        from qtune.export.kquants import tensor_type

        return tensor_type(name, arr.shape[-1], qtype, cfg.num_hidden_layers, n_expert, tied)

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
                arr = part.contiguous().numpy()
                _add(writer, name, arr, kind(name, arr))
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ConfigError(f"merge.gguf: no GGUF name for tensor {hf_name}")
        if cfg.model_type == "llama" and hf_name.endswith("q_proj.weight"):
            data = _permute(data, cfg.num_attention_heads)
        elif cfg.model_type == "llama" and hf_name.endswith("k_proj.weight"):
            data = _permute(data, cfg.num_key_value_heads)
        arr = data.numpy()
        _add(writer, name, arr, "F32" if ".ffn_gate_inp." in name else kind(name, arr))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _add(writer, name: str, arr, ggml_type: str) -> None:
    """One tensor in `ggml_type` (a GGMLQuantizationType name): F32, F16, the gguf package's Q8_0 / Q5_0 / Q5_1, or
    qtune's k-quants."""
    import gguf
    import numpy as np

    if ggml_type == "F32":
        writer.add_tensor(name, arr.astype(np.float32))
    elif ggml_type == "F16":
        writer.add_tensor(name, arr.astype(np.float16))
    else:
        t = getattr(gguf.GGMLQuantizationType, ggml_type)
        if ggml_type in ("Q4_K", "Q5_K", "Q6_K"):
            from qtune.export.kquants import quantize

            q = quantize(arr, ggml_type)
        else:
            q = gguf.quants.quantize(arr.astype(np.float32), t)
        writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=t)


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
