"""qtune's fast training path (`train.fast=auto|true|false`).

What limits a QLoRA step of an 8B model at 2048 tokens on an H100 is the host, not the GPU: the profile
(bench/profile_train.py, docs/benchmarks.md) shows the GPU busy for a third of the step while Python issues
~10 ms of work per decoder layer and pass. So the pieces cut host work, each checked against the reference
path (plain transformers + PEFT) by parity tests:
  - lora: qtune's own autograd functions (qtune.modeling.fast.lora), after PEFT wraps the model: one per LoRA
    linear layer, and one per SwiGLU MLP block whose gate, up and down projections all carry LoRA;
  - checkpointing: reentrant activation checkpointing (one autograd node per layer; the non-reentrant kind
    runs Python hooks for every saved tensor), with the same RNG state replayed for dropout;
  - offload (`train.offload_activations`, auto: with checkpointing on CUDA from 8192 tokens a micro-batch on):
    the checkpointed layer inputs go to pinned host memory on a side stream during the forward and come back
    for the backward (qtune.modeling.fast.offload);
  - moe: every MoE expert block as one autograd function of grouped matmuls over the routed tokens, with the
    LoRA term split (x·Aᵀ)·Bᵀ instead of PEFT's full-size delta, and (quant=nf4|fp4 on CUDA) the fused expert
    tensors kept in 4 bits, which bitsandbytes leaves in 16 (qtune.modeling.fast.experts);
  - attention: packed rows (data.packing) through flash attention's varlen kernel, each example attending to itself
    without a mask (qtune.modeling.fast.attention);
  - graphs (`train.cuda_graphs`, auto: on where it applies): a micro-step's forward, loss and backward captured
    once as a CUDA graph and replayed for every batch (qtune.modeling.fast.graph), which takes the host out of the
    step; LoRA dropout is seeded for it (qtune.modeling.fast.dropout);
  - kernels (`train.liger`, auto: where the GPU sets the pace): liger-kernel's Triton RMSNorm, RoPE and SwiGLU (CUDA
    only). They cut GPU time (a quarter of a graphed 8B QLoRA step) but add launch work on the host, so they pay in a
    CUDA graph or a long eager step, not in a short eager step that Python bounds (`gpu_bound`).
The loss is TRL's fused output head either way (no full logits). `auto` turns the path on for CUDA; `true`
also on CPU (the LoRA function runs there; liger needs CUDA); `false` is the reference path.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

# train.offload_activations=auto offloads from this many tokens per micro-batch on: at 2048 tokens the copies cost
# ~15 % of the step for ~0.3 GiB (bench/profile_train.py on an H100), at 8192 they save 2.25 GiB of an 8B model.
OFFLOAD_FROM_TOKENS = 8192

# liger-kernel's patch function for each model type qtune trains; MoE experts are fused tensors, not an MLP
# module, so SwiGLU is patched on dense models only.
LIGER = {"qwen3": ("apply_liger_kernel_to_qwen3", True), "qwen3_moe": ("apply_liger_kernel_to_qwen3_moe", False),
         "llama": ("apply_liger_kernel_to_llama", True)}


@dataclass
class FastPath:
    on: bool
    pieces: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)   # why a piece is not used
    offloader: object = None
    graphs: bool = False                              # train.cuda_graphs applies (qtune.modeling.fast.graph)
    offload: bool = False                             # checkpointed layer inputs go to host memory

    def describe(self) -> str:
        if not self.on:
            return "train.fast: reference path (" + "; ".join(self.notes) + ")"
        text = "train.fast: " + ", ".join(self.pieces)
        return text + (" (" + "; ".join(self.notes) + ")" if self.notes else "")


def offloads(fast: str, offload: str, gradient_checkpointing: bool, tokens: int, moe: bool = False) -> bool:
    """Whether a CUDA run with these settings offloads its checkpointed layer inputs (the dry run's estimate too).
    auto leaves MoE models' inputs on the GPU: their layer inputs are small beside the experts, and without the
    offload the step runs in a CUDA graph (Qwen3-30B-A3B at 8192 tokens: 6,147 against 5,521 tok/s, and 19.8 against
    22.5 GiB, docs/benchmarks.md)."""
    if fast == "false" or not gradient_checkpointing:
        return False
    return offload == "true" or (offload == "auto" and tokens >= OFFLOAD_FROM_TOKENS and not moe)


def decide(setting: str, device: str, fsdp: bool = False) -> FastPath:
    if setting == "false":
        return FastPath(False, notes=["train.fast=false"])
    if fsdp:  # its functions read whole (and 4-bit) weights that FSDP2 holds as shards between its all-gathers
        return FastPath(False, notes=["FSDP2 takes the reference path"])
    if setting == "auto" and not device.startswith("cuda"):
        return FastPath(False, notes=["train.fast=auto uses it on CUDA only; train.fast=true forces it"])
    return FastPath(True)


def decide_graphs(fast: FastPath, setting: str, device: str, *, stage, processes: int,
                  packing: bool, offload: bool, dtype, dropout: float, attention: str, method: str = "lora") -> None:
    """train.cuda_graphs: sets fast.graphs, with the piece or (auto) the reason it is off; `true` where it cannot
    apply is a one-line ConfigError naming why."""
    import torch

    if setting == "false" or (setting == "auto" and not fast.on):
        return
    why = None
    if not device.startswith("cuda"):
        why = "it needs CUDA"
    elif not fast.on:
        why = "it needs the fast path (" + "; ".join(fast.notes) + ")"
    elif method != "lora":
        why = (f"train.method={method}: the graph keeps a gradient buffer of its own for every trained parameter, a "
               "second copy of the trained weights' gradients (cheap for adapters only)")
    elif not stage.graphs:
        why = f"train.stage={stage.name} runs several forwards a step (pt and sft only)"
    elif processes > 1:
        why = "one process only"
    elif not packing:
        why = "it needs data.packing=true (rows of one fixed size)"
    elif offload:
        why = "train.offload_activations copies layer inputs to the host"
    elif dtype != torch.bfloat16:
        why = f"bf16 only (the model is {str(dtype).replace('torch.', '')})"
    elif attention not in ("sdpa", "eager"):
        why = f"attention {attention} (sdpa or eager only)"
    elif dropout > 0:
        from qtune.modeling.fast.dropout import triton_ok

        if not triton_ok():
            why = "LoRA dropout in a graph needs Triton (or lora.dropout=0)"
    if why is None:
        fast.graphs = True
        fast.pieces.append("CUDA graph per micro-step")
    elif setting == "true":
        from qtune.errors import ConfigError

        raise ConfigError(f"train.cuda_graphs=true: {why}; use train.cuda_graphs=auto or false")
    elif device.startswith("cuda"):
        fast.notes.append(f"no CUDA graph: {why}")


def apply_base(fast: FastPath, model, device: str, gradient_checkpointing: bool, liger: str,
               offload: str = "false", tokens: int = 0, mixed_weights: bool = False) -> None:
    """The base model's part (before PEFT): reentrant checkpointing, offloaded layer inputs, liger-kernel.
    mixed_weights: trained weights in fp32 beside 16-bit activations (train.method=full|freeze with
    train.trainable_dtype=fp32), which liger's kernels, written for one dtype, are not used with."""
    if not fast.on:
        return
    if gradient_checkpointing:
        model.gradient_checkpointing_disable()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs(fast))
        fast.pieces.append("reentrant checkpointing")
    if offload == "true" and not gradient_checkpointing:
        fast.notes.append("train.offload_activations needs train.gradient_checkpointing=true")
    if offloads("true", offload, gradient_checkpointing, tokens, bool(getattr(model.config, "num_experts", 0))):
        if not device.startswith("cuda"):
            if offload == "true":
                fast.notes.append("activation offload is for CUDA")
        else:
            from qtune.modeling.fast.offload import install

            fast.offloader = install(getattr(model, model.base_model_prefix))
            fast.offload = True
            fast.pieces.append("layer inputs offloaded to pinned host memory")
    if mixed_weights and device.startswith("cuda") and (liger == "true" or (liger == "auto" and gpu_bound(fast, model, device, tokens))):
        fast.notes.append("no liger kernels: they take weights and inputs in one dtype, and train.trainable_dtype=fp32 "
                          "keeps fp32 master weights (train.trainable_dtype=bf16 allows them)")
    elif liger == "true" or (liger == "auto" and gpu_bound(fast, model, device, tokens)):
        _liger(fast, model, device)


def gpu_bound(fast: FastPath, model, device: str, tokens: int) -> bool:
    """Whether the GPU, not Python, sets the pace of a step (train.liger=auto turns the kernels on then): a step
    replayed as a CUDA graph, or a dense model's eager one of at least OFFLOAD_FROM_TOKENS tokens a micro-batch (an
    eager MoE step is bound by the host even then: docs/benchmarks.md)."""
    dense = not getattr(model.config, "num_experts", 0)
    return device.startswith("cuda") and (fast.graphs or (dense and tokens >= OFFLOAD_FROM_TOKENS))


def attention_of(model) -> str:
    """The attention implementation the model runs (transformers' default: sdpa)."""
    return getattr(model.config, "_attn_implementation", None) or "sdpa"


def packed_attention(fast: FastPath, model, device: str, dtype, packing: bool) -> None:
    """Packed rows (data.packing) attend through flash attention's varlen kernel (qtune.modeling.fast.attention)."""
    if not fast.on or not packing:
        return
    from qtune.modeling.fast import attention

    why = attention.unavailable(device, dtype, attention_of(model))
    if why is None:
        attention.install(model)
        fast.pieces.append("varlen flash attention for packed rows")
    elif device.startswith("cuda"):
        fast.notes.append(f"packed rows attend through sdpa: {why}")


def checkpoint_kwargs(fast: FastPath) -> dict:
    """Reentrant checkpointing; in a CUDA graph without saving the RNG's state around each layer (a replay could not
    restore it, and the seeded dropout does not need it: nothing else in a layer draws random numbers then)."""
    return {"use_reentrant": True, "preserve_rng_state": False} if fast.graphs else {"use_reentrant": True}


def _liger(fast: FastPath, model, device: str) -> None:
    """liger-kernel on the base model: RMSNorm, RoPE and, on dense models, SwiGLU."""
    model_type = getattr(model.config, "model_type", "")
    if not device.startswith("cuda"):
        fast.notes.append("liger kernels need CUDA")
        return
    if model_type not in LIGER:
        fast.notes.append(f"no liger kernels for model type {model_type}")
        return
    try:
        import liger_kernel.transformers as liger
    except Exception as e:  # not installed, or no Triton for this machine
        fast.notes.append(f"liger-kernel unavailable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        return
    name, swiglu = LIGER[model_type]
    getattr(liger, name)(rope=True, rms_norm=True, swiglu=swiglu, cross_entropy=False,
                         fused_linear_cross_entropy=False, model=model)
    fast.pieces.append("liger RMSNorm/RoPE" + ("/SwiGLU" if swiglu else ""))


_EAGER_ROPE: dict = {}     # transformers module name -> its own apply_rotary_pos_emb, as first seen


def _modeling_module(model):
    """The transformers module whose apply_rotary_pos_emb a model's attention calls (None when there is none)."""
    import sys

    module = sys.modules.get(type(model).__module__)
    return module if hasattr(module, "apply_rotary_pos_emb") else None


def _from_liger(fn) -> bool:
    return getattr(fn, "__module__", "").startswith("liger_kernel") or hasattr(fn, "qtune_single_row")


def _rope_by_length(single, eager):
    """RoPE through liger's kernel for a forward of one token a row (a decode step), transformers' own otherwise.
    liger's kernel takes the batch as a compile-time constant: a prefill of k rows would compile it anew for each k
    (0.2-0.6 s on an H200 the first time a k is seen), where a prefill is matmul-bound and transformers' few
    elementwise kernels cost nothing that shows. The decode steps' batch sizes are the engine's buckets, compiled
    once when serve captures them."""
    def rope(q, k, cos, sin, *args, **kwargs):
        return (single if q.shape[-2] == 1 else eager)(q, k, cos, sin, *args, **kwargs)
    rope.qtune_single_row = True
    return rope


def liger_for_decoding(model, setting: str) -> str:
    """serve.liger: liger-kernel's RMSNorm/RoPE(/SwiGLU) on a model that decodes (the engine's steps run a few
    hundred tiny elementwise kernels a layer otherwise). The start line's piece ('' on a CPU with auto); raises
    QtuneError for serve.liger=true when the kernels cannot be used."""
    if setting == "false":
        return ""
    device = str(next(model.parameters()).device)
    if setting == "auto" and not device.startswith("cuda"):
        return ""
    fast = FastPath(on=True)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    module = _modeling_module(base)
    eager = _EAGER_ROPE.setdefault(module.__name__, module.apply_rotary_pos_emb) if module else None
    _liger(fast, base, device)
    if fast.pieces:
        if module is not None and not _from_liger(eager):
            module.apply_rotary_pos_emb = _rope_by_length(module.apply_rotary_pos_emb, eager)
        return fast.pieces[0]
    if setting == "true":
        from qtune.errors import QtuneError

        raise QtuneError("serve.liger=true: " + "; ".join(fast.notes) + " (serve.liger=auto serves without them)")
    return "no liger kernels: " + "; ".join(fast.notes)


def apply_lora(fast: FastPath, peft_model, quant: str = "none") -> None:
    """qtune's fused LoRA functions on every supported LoRA linear layer and SwiGLU MLP block, and the grouped
    expert function on every MoE expert block (after PEFT); `quant` nf4|fp4 on CUDA keeps experts in 4 bits."""
    if not fast.on:
        return
    from qtune.modeling.fast import experts as grouped, lora

    layers, blocks = lora.patch(peft_model, lean=fast.offloader is not None)
    if layers:
        fast.pieces.append(f"fused LoRA on {layers} linear layers" + (f" and {blocks} SwiGLU MLP blocks" if blocks else ""))
    else:
        fast.notes.append("no LoRA linear layer the fused function supports")
    experts = grouped.patch(peft_model)
    if experts:
        fast.pieces.append(f"grouped-matmul experts with split LoRA in {experts} MoE blocks")
        if quant in ("nf4", "fp4"):
            _, kept = grouped.quantize_experts(peft_model, quant)
            if kept:
                fast.pieces.append(f"experts kept in {quant} ({kept / 2**30:.2f} GiB)")
            else:
                fast.notes.append("4-bit experts need CUDA; experts stay 16-bit")


def embeddings_to_host(fast: FastPath, peft_model) -> None:
    """With CUDA graphs (where the host is idle during the step): the input embedding table in pinned host memory,
    looked up over the bus (qtune.modeling.fast.graph.embeddings_to_host)."""
    if not fast.graphs:
        return
    from qtune.modeling.fast.host import embeddings_to_host as move

    freed = move(peft_model)
    if freed:
        fast.pieces.append(f"input embeddings in host memory ({freed / 2**30:.2f} GiB off the GPU)")


def head_on_host(setting: str, fast_on: bool, need: Callable[[], float], have: Callable[[], float]) -> bool:
    """train.head_on_host on a CUDA GPU: whether the output head goes to host memory
    (qtune.modeling.fast.host.head_to_host). auto: where the estimate with it on the GPU (`need()`, bytes) exceeds what
    the GPU offers (`have()`)."""
    if setting == "false" or not fast_on:
        return False
    return setting == "true" or need() > have()


def head_to_host(fast: FastPath, peft_model, setting: str, on: bool) -> None:
    """The output head in pinned host memory, copied to the GPU for each forward's loss (train.head_on_host; `on`:
    head_on_host's decision)."""
    if not on:
        return
    from qtune.modeling.fast.host import head_to_host as move

    freed, why = move(peft_model)
    if freed:
        fast.pieces.append(f"output head in host memory ({freed / 2**30:.2f} GiB off the GPU between losses)")
    else:
        fast.notes.append(f"train.head_on_host={setting}: the head stays on the GPU ({why})")


def expected(cfg, processes: int = 1, fsdp: bool = False) -> FastPath:
    """The decisions a CUDA run of this config would make, from the config alone (the dry run's plan counts them): what
    before_peft decides on a GPU that finds bf16 (or the asked fp16), sdpa attention and Triton; `offload` set as
    apply_base would set it. (qtune.modeling.builder makes the same decisions on the real device and model.)"""
    import torch

    from qtune.errors import ConfigError

    t = cfg.train
    fast = decide(str(t.fast), "cuda", fsdp=fsdp)
    try:
        decide_graphs(fast, str(t.cuda_graphs), "cuda", **graph_settings(cfg, processes),
                      dtype=torch.bfloat16 if str(t.dtype) in ("auto", "bf16") else torch.float16,
                      dropout=0.0, attention="sdpa")
    except ConfigError:  # train.cuda_graphs=true where graphs cannot run: the run itself says so in one line
        fast.graphs = False
    if fast.on and str(t.method) != "lora":
        fast.notes += weights_notes(str(t.method))
    fast.offload = fast.on and offloads("true", str(t.offload_activations), t.gradient_checkpointing,
                                        micro_batch_tokens(cfg), bool(cfg.model.arch.num_experts))
    return fast


def weights_notes(method: str) -> list[str]:
    """What the fast path leaves off for train.method=full|freeze, and why (what applies stays: reentrant
    checkpointing, offloaded layer inputs, varlen attention, liger kernels with one dtype, TRL's fused head)."""
    return [f"train.method={method}: no fused LoRA or split-LoRA experts (there are no adapters); the output head "
            "and embeddings stay on the GPU (they may train)"]


def micro_batch_tokens(cfg) -> int:
    """The tokens one micro-batch puts through the model: data.max_length x train.batch_size."""
    return cfg.data.max_length * cfg.train.batch_size


def graph_settings(cfg, processes: int) -> dict:
    """decide_graphs' inputs that the config fixes (a run adds its device, dtype, dropout and attention)."""
    from qtune.stages import get

    t = cfg.train
    tokens = micro_batch_tokens(cfg)
    return dict(stage=get(t.stage), processes=processes, packing=cfg.data.packing, method=str(t.method),
                offload=offloads("true", str(t.offload_activations), t.gradient_checkpointing, tokens,
                                 bool(cfg.model.arch.num_experts)))


def compact_experts(fast: FastPath, peft_model, selection: dict[str, list[int]]) -> list[str]:
    """moe.max_experts on the fast path: adapters (and their gradients and optimizer state) for the chosen experts
    only, in every expert block the grouped function runs; returns those blocks (the rest keep gradient masks)."""
    if not fast.on or not selection:
        return []
    from qtune.modeling.fast import experts

    blocks = experts.compact(peft_model, selection)
    if blocks:
        n = len(next(iter(selection.values())))
        fast.pieces.append(f"adapters for the {n} chosen experts only in {len(blocks)} MoE blocks")
    return blocks
