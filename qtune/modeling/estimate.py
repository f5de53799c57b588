"""Memory estimates from shapes alone (a meta-device model is enough): what `train --dry-run` and
`inspect-moe` print before a byte of weights is loaded.

They are estimates, stated as such: base weights by how they are stored, LoRA weights with their
gradients and AdamW states, and activations for one micro-batch at data.max_length.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from qtune.config.schema import ArchConfig, QuantConfig, QuantMethod
from qtune.modeling.targets import Matched

# bitsandbytes NF4/FP4: 4 bits per weight + one absmax per 64 weights (fp32, or 8-bit with a fp32 per
# 256 absmax when double-quantized). LLM.int8(): 1 byte per weight + one fp32 scale per output row.
NF4_BYTES = {True: 0.5 + 1 / 64 + 4 / (64 * 256), False: 0.5 + 4 / 64}
LORA_BYTES_PER_PARAM = 4 + 4 + 8   # fp32 weight + fp32 gradient + AdamW's two fp32 moments
# TRL's trainers cast a quantized model's trainable weights to bf16 (QLoRA's recipe; trl.SFTTrainer and the other
# stages, `_is_quantized_model`), and AdamW keeps its moments in the weight's dtype: four bf16 copies
QLORA_BYTES_PER_PARAM = 2 + 2 + 4
# PEFT keeps adapters of fused tensors (experts, router) in the parameter's own dtype, and so do their gradient and
# AdamW moments: four copies of the 16-bit parameter
PARAM_DTYPE_COPIES = 4
EXPERT_TENSORS = ("experts.gate_up_proj", "experts.down_proj")
# PEFT's ParamWrapper (the reference path for adapters on fused expert and router tensors) builds a layer's full-size
# delta and the sum W + delta on every forward, and the sum's gradient in the backward: at most 2.39 copies of the
# layer's adapted tensors live at once, measured on a Qwen3-MoE block (tests/test_moe.py)
PARAM_WRAPPER_COPIES = 2.5
CUDA_OVERHEAD = 0.6 * 2**30        # CUDA context, cuBLAS workspaces, allocator slack


@dataclass
class Memory:
    base: float
    base_quantized_params: int
    base_16bit_params: int
    lora: float
    activations: float
    overhead: float
    experts_4bit: bool = False
    dequantized: float = 0.0   # one layer's 4-bit weights in 16 bits, held from its recompute through its backward
    delta: float = 0.0         # the reference path's full-size deltas of one layer's fused tensors (PEFT's ParamWrapper)
    host_embedding: float = 0.0  # bytes of the input embedding table kept in host memory (CUDA graphs), not counted
    host_head: float = 0.0     # bytes of the output head kept in host memory (train.head_on_host), in the activations
    generation: float = 0.0    # a generation phase's own memory (GRPO's rollout KV cache)
    generation_kept: bool = False  # ... held while training runs too (else only while generating)
    world_size: int = 1        # per_process(): what each of this many GPUs holds
    strategy: str = "single"
    method: str = "lora"       # train.method: what `lora` counts (adapters, or the weights trained whole)
    reference: float = 0.0     # full/freeze dpo and kto: TRL's frozen copy of the starting model (its ref_model)

    @property
    def total(self) -> float:
        training = self.activations + self.dequantized + self.delta
        phases = training + self.generation if self.generation_kept else max(training, self.generation)
        return self.base + self.lora + phases + self.overhead + self.reference

    @property
    def allocated(self) -> float:
        """The allocator's part of the total: what torch.cuda.max_memory_allocated() reports for the step (the total
        adds CUDA_OVERHEAD, which the allocator does not count)."""
        return self.total - self.overhead

    def as_dict(self) -> dict:
        return {"base_bytes": int(self.base), "lora_bytes": int(self.lora), "activation_bytes": int(self.activations),
                "dequantized_bytes": int(self.dequantized), "delta_bytes": int(self.delta),
                "overhead_bytes": int(self.overhead), "generation_bytes": int(self.generation),
                "generation_kept": self.generation_kept,
                "total_bytes": int(self.total),
                "quantized_params": self.base_quantized_params, "unquantized_params": self.base_16bit_params,
                "experts_4bit": self.experts_4bit, "host_embedding_bytes": int(self.host_embedding),
                "host_head_bytes": int(self.host_head),
                "world_size": self.world_size, "strategy": self.strategy, "method": self.method,
                "reference_bytes": int(self.reference)}


def per_process(m: Memory, strategy: str, world_size: int, layers: int) -> Memory:
    """What each GPU holds when `world_size` processes train. DDP: a full replica, plus its buckets' copy of the
    trainable gradients (fp32). FSDP2: 1/world_size of the base and of the adapter's weights, gradients and AdamW
    states, plus whole copies of the layers being gathered (the one computing and the one prefetched); activations
    are each process's own micro-batch either way."""
    if world_size == 1 or strategy == "single":
        return m
    if strategy == "ddp":
        return replace(m, lora=m.lora * (1 + 4 / LORA_BYTES_PER_PARAM), world_size=world_size, strategy=strategy)
    gathered = 2 * m.base / max(layers, 1)
    return replace(m, base=m.base / world_size + gathered, lora=m.lora / world_size, world_size=world_size,
                   strategy=strategy, reference=m.reference / world_size)


def quantizable(name: str, module, quant: QuantConfig) -> bool:
    """What bitsandbytes quantizes: linear layers outside quant.skip_modules (fused 3-D experts never)."""
    import torch.nn as nn

    return isinstance(module, nn.Linear) and not any(s == name or name.endswith("." + s) or name.startswith(s + ".")
                                                     for s in quant.skip_modules)


def experts_4bit(fast_on: bool, quant: QuantConfig) -> bool:
    """Whether a CUDA run keeps fused MoE experts in 4 bits (the fast path does, under quant=nf4|fp4)."""
    return fast_on and quant.method in (QuantMethod.nf4, QuantMethod.fp4)


def base_bytes(model, quant: QuantConfig, dtype_bytes: int, experts4: bool = False) -> tuple[float, int, int]:
    """(bytes, quantized params, 16-bit params) of the frozen base as it will sit in memory. experts4: fused expert
    tensors in bitsandbytes 4-bit blocks of 64 with double-quantized absmax (qtune.modeling.fast.experts)."""
    seen: set[int] = set()
    q_bytes, q_params, other = 0.0, 0, 0
    if experts4:
        for name, p in model.named_parameters():
            if p.dim() == 3 and name.endswith(EXPERT_TENSORS):
                seen.add(id(p))
                q_params += p.numel()
                q_bytes += p.numel() * NF4_BYTES[True]
    if quant.method is not QuantMethod.none:
        for name, module in model.named_modules():
            if quantizable(name, module, quant):
                w = module.weight
                seen.add(id(w))
                n = module.in_features * module.out_features
                q_params += n
                if quant.method is QuantMethod.int8:
                    q_bytes += n + 4 * module.out_features
                else:
                    q_bytes += n * NF4_BYTES[bool(quant.double_quant)]
    for p in model.parameters():  # parameters() yields tied weights once
        if id(p) not in seen:
            other += p.numel()
    return q_bytes + other * dtype_bytes, q_params, other


# TRL's fused output head (every stage with a vocabulary head: pt, sft, dpo, kto) projects at most this many tokens
# onto this many vocabulary rows at a time (trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE and
# trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE in TRL 1.16)
FUSED_HEAD_TILE = (4096, 32768)


@dataclass(frozen=True)
class Widths:
    """A count of 16-bit values a token holds, by width: hidden (hidden_size), q (heads x head_dim), kv (key-value
    heads x head_dim), ffn (the MLP's intermediate size; an MoE layer's routed experts' together)."""
    hidden: float = 0
    q: float = 0
    kv: float = 0
    ffn: float = 0

    def values(self, arch: ArchConfig) -> float:
        q, kv = arch.num_attention_heads * arch.head_dim, arch.num_key_value_heads * arch.head_dim
        ffn = (arch.moe_intermediate_size * arch.num_experts_per_tok) if arch.num_experts else arch.intermediate_size
        return self.hidden * arch.hidden_size + self.q * q + self.kv * kv + self.ffn * ffn


# What a token costs in activation memory: every per-token coefficient of the estimate is here. Counted from the
# tensors the training path holds (qtune.modeling.fast.lora's autograd functions, reentrant checkpointing,
# flash/SDPA attention, TRL's fused head), then calibrated against measured peaks
# (torch.cuda.max_memory_allocated) of Qwen3-8B nf4, LoRA r16 on the 7 projections, batch 1, on an H200:
# 6.11 GiB at 2048 tokens (CUDA graph, layer inputs on the GPU), 7.85 GiB at 8192 and 13.27 GiB at 32768 (layer
# inputs offloaded); tests/test_estimate.py holds these points, so a change here that leaves them fails there.
# One layer's tensors saved for its backward: its input, its input norm's output, the residual after attention and
# the MLP norm's output; the query after its norm and RoPE and the attention output; key and value; the MLP's gate
# and up outputs and SiLU(gate)·up (the down projection's input).
LAYER_SAVED = Widths(hidden=4, q=2, kv=2, ffn=3)
# What that layer's backward adds at its peak, the MLP's (LoraSwiGLU.backward): the gradient arriving and the
# gradients of the gate's and up's inputs; the gradients of SiLU(gate)·up, of up and of gate.
LAYER_BACKWARD = Widths(hidden=3, ffn=3)
# A checkpointed layer's input, held from the forward to that layer's backward (all layers', or two with
# train.offload_activations: the one computing and the one coming back)
LAYER_INPUT = Widths(hidden=1)
# The loss (TRL's fused head), from the forward's end to its backward: the final norm's input and output, the
# hidden states' gradient in fp32 (two 16-bit values) and in 16 bits; besides one tile of logits (FUSED_HEAD_TILE)
HEAD_LIVE = Widths(hidden=5)
# Router logits of an MoE layer: fp32 for each expert (bytes a token and expert)
ROUTER_BYTES = 4


def activation_bytes(arch: ArchConfig, tokens: int, gradient_checkpointing: bool, dtype_bytes: int,
                     offload_inputs: bool = False, lm_head: bool = True, head_copy: float = 0.0) -> float:
    """The activations' peak for `tokens` tokens (flash/SDPA attention: no seq² term). Two phases never overlap: a
    layer's recompute and backward, and the loss with its backward (lm_head: TRL's fused vocabulary head, which keeps
    one tile of logits, never all of them; False: a reward model's one-output head). What both see is the layers'
    inputs (gradient_checkpointing), or every layer's saved tensors (without). offload_inputs: the checkpointed layer
    inputs sit in host memory (train.offload_activations), two of them on the GPU at a time. head_copy: the bytes of
    the output head's GPU copy (train.head_on_host), live in the loss's phase."""
    saved = tokens * LAYER_SAVED.values(arch) * dtype_bytes
    if arch.num_experts:
        saved += tokens * arch.num_experts * ROUTER_BYTES
    layer = tokens * LAYER_BACKWARD.values(arch) * dtype_bytes
    head = head_copy
    if lm_head:
        rows, cols = FUSED_HEAD_TILE
        head += (min(tokens, rows) * min(cols, arch.vocab_size) + tokens * HEAD_LIVE.values(arch)) * dtype_bytes
    if gradient_checkpointing:
        kept = (2 if offload_inputs else arch.num_hidden_layers) * tokens * LAYER_INPUT.values(arch) * dtype_bytes
        return kept + max(saved + layer, head)
    return arch.num_hidden_layers * saved + max(layer, head)


def host_bytes(arch: ArchConfig, tokens: int, dtype_bytes: int = 2) -> float:
    """Pinned host memory the offloaded layer inputs take (train.offload_activations): every layer's, 16-bit."""
    return arch.num_hidden_layers * tokens * LAYER_INPUT.values(arch) * dtype_bytes


def estimate(model, arch: ArchConfig, matched: Matched, quant: QuantConfig, tokens: int,
             gradient_checkpointing: bool, on_gpu: bool = True, offload_inputs: bool = False,
             experts4: bool = False, compact: bool = False, lm_head: bool = True,
             embed_on_host: bool = False, keep_dequantized: bool = False, experts_direct: bool = False,
             head_on_host: bool = False, grouped_experts: bool = False, adapters_fp32: bool = False,
             trained_bytes: float | None = None, reference: bool = False, method: str = "lora") -> Memory:
    """experts4: fused experts kept in 4 bits; compact: capped experts' adapters exist for the chosen ones only (both
    what the fast path does on CUDA); experts_direct: the 4-bit experts' grouped matmuls read the 4 bits directly, so
    no layer of them is dequantized (qtune.modeling.fast.nf4_gmm, with Triton on CUDA); embed_on_host: an untied input
    embedding table in host memory (with CUDA graphs); keep_dequantized: a 4-bit layer's linear weights, dequantized in its checkpoint's recompute, are kept for
    its backward (the fast path's LoRA functions); head_on_host: an untied output head in host memory, copied to the
    GPU for the loss (train.head_on_host); grouped_experts: fused expert and router adapters run split, as grouped
    matmuls (the fast path), never as PEFT's full-size deltas; adapters_fp32: every trainable parameter in fp32, fused
    ones too (FSDP2 of a model without 4-bit weights). trained_bytes (train.method=full|freeze): what each trained
    parameter adds beyond its copy in the base (qtune.modeling.weights.bytes_per_param: an fp32 master copy's extra
    bytes, the gradient, the optimizer's states) in place of LoRA's; reference: a frozen copy of the starting model
    beside it (TRL's ref_model for dpo and kto without adapters to switch off)."""
    dtype_bytes = 2 if on_gpu else 4
    experts4 = experts4 and on_gpu and bool(arch.num_experts)
    base, q_params, other = base_bytes(model, quant, dtype_bytes, experts4)
    host = arch.vocab_size * arch.hidden_size * dtype_bytes if embed_on_host and on_gpu and not arch.tie_word_embeddings \
        else 0
    base -= host
    head = arch.vocab_size * arch.hidden_size * dtype_bytes \
        if head_on_host and on_gpu and lm_head and not arch.tie_word_embeddings else 0
    base -= head
    linear = LORA_BYTES_PER_PARAM if quant.method is QuantMethod.none else QLORA_BYTES_PER_PARAM
    fused = PARAM_DTYPE_COPIES * (4 if adapters_fp32 else dtype_bytes)
    if trained_bytes is not None:
        lora = matched.trainable * trained_bytes
    else:
        lora = sum((t.params if compact and t.how == "lora_param" else t.allocated)
                   * (fused if t.how in ("lora_param", "full") else linear)
                   for t in matched.targets)
    activations = activation_bytes(arch, tokens, gradient_checkpointing, dtype_bytes, offload_inputs, lm_head, head)
    dequantized = 0
    if keep_dequantized and gradient_checkpointing and on_gpu and quant.method in (QuantMethod.nf4, QuantMethod.fp4):
        q, kv = arch.num_attention_heads * arch.head_dim, arch.num_key_value_heads * arch.head_dim
        dense_ffn = 0 if arch.num_experts else 3 * arch.hidden_size * arch.intermediate_size
        dequantized += (2 * arch.hidden_size * q + 2 * arch.hidden_size * kv + dense_ffn) * dtype_bytes
    if experts4 and not experts_direct:  # a layer's experts dequantized for its matmuls (recompute to backward)
        dequantized += arch.num_experts * 3 * arch.hidden_size * arch.moe_intermediate_size * dtype_bytes
    delta = 0.0 if grouped_experts else PARAM_WRAPPER_COPIES * dtype_bytes * delta_params(matched)
    return Memory(base=base, base_quantized_params=q_params, base_16bit_params=other, lora=lora,
                  activations=activations, overhead=CUDA_OVERHEAD if on_gpu else 0.0, experts_4bit=experts4,
                  host_embedding=host, host_head=head, dequantized=dequantized, delta=delta, method=method,
                  reference=(base + host + head) if reference else 0.0)


def delta_params(matched: Matched) -> int:
    """The most elements of fused (3-D expert, router) tensors with adapters in one layer: what PEFT's ParamWrapper
    materializes as a full-size delta while that layer runs."""
    import math

    per_layer: dict = {}
    for t in matched.targets:
        if t.how == "lora_param":
            per_layer[t.layer] = per_layer.get(t.layer, 0) + math.prod(t.shape)
    return max(per_layer.values(), default=0)
