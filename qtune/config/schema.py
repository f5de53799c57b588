"""Typed schema of qtune's config tree.

One dataclass per config group. `store()` registers the whole tree in Hydra's ConfigStore as
`qtune_schema`; `conf/config.yaml` lists it first in its defaults, so every group file is merged
onto its typed node: a wrong key, a wrong type or an invalid choice fails at compose time.
Choices are Enums (OmegaConf 2.3 has no Literal support); their values are what users type.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from omegaconf import MISSING


class _Choice(str, Enum):
    def __str__(self) -> str:  # print "nf4", not "QuantMethod.nf4"
        return self.value


def _check_range(section: str, key: str, value, low=None, high=None, low_open=False, whole=False) -> None:
    """One line naming the key and what is valid, for numbers out of range (values still interpolations are skipped)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and value > high
    if below or above or (whole and value != int(value)):
        lo = "" if low is None else (f"> {low:g}" if low_open else f">= {low:g}")
        hi = "" if high is None else f"<= {high:g}"
        valid = " and ".join(x for x in (lo, hi) if x) + (" (a whole number)" if whole else "")
        raise ValueError(f"{section}.{key}={value:g}: valid: {valid}")


class RopeScaling(_Choice):
    none = "none"   # the model's own rotary positions
    yarn = "yarn"   # YaRN: rotary positions stretched by model.rope_factor (Qwen3's documented way past 32,768)


class ModelSource(_Choice):
    hub = "hub"          # a Hugging Face Hub repo (or mirror via HF_ENDPOINT)
    package = "package"  # a GGUF file shipped inside a Python package (the embedded SmolLM2)
    random = "random"    # random weights built from `arch` + the Qwen3 tokenizer (tiny test models)
    local = "local"      # an existing folder at model.local_dir


class Variant(_Choice):
    instruct = "instruct"
    base = "base"


class QuantMethod(_Choice):
    nf4 = "nf4"
    fp4 = "fp4"
    int8 = "int8"
    none = "none"


class DType(_Choice):
    auto = "auto"
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class MoeScope(_Choice):
    none = "none"
    expert_only = "expert_only"
    router_only = "router_only"
    all = "all"


class RouterMode(_Choice):
    frozen = "frozen"
    lora = "lora"
    full = "full"


class ExpertSelection(_Choice):
    first = "first"  # experts 0..max_experts-1
    load = "load"    # the most-routed experts, measured on a sample of the training data


class Distributed(_Choice):
    auto = "auto"  # DDP when the model fits one GPU (the plan's estimate), else FSDP2; DDP on CPU
    ddp = "ddp"    # a full replica per process, gradients all-reduced
    fsdp = "fsdp"  # FSDP2: weights, gradients and optimizer states sharded across the processes


class Backend(_Choice):
    auto = "auto"  # nccl on CUDA, gloo on CPU
    nccl = "nccl"
    gloo = "gloo"


class MultiTurnThinking(_Choice):
    split = "split"  # one example per round, its history as inference renders it: every turn's reasoning trained once
    last = "last"    # the whole conversation as the template renders it: earlier turns lose their reasoning
    keep = "keep"    # every turn's reasoning rendered, earlier ones too (histories inference never shows)


class TrainMethod(_Choice):
    lora = "lora"      # adapters on a frozen base (lora.*, moe.*; quant=nf4 is QLoRA)
    full = "full"      # every weight of the model trained
    freeze = "freeze"  # the weights train.freeze names trained, the rest frozen (no adapters)


class TrainableDtype(_Choice):
    fp32 = "fp32"  # fp32 master copies of the trained weights (and fp32 gradients), bf16/fp16 autocast for the compute
    bf16 = "bf16"  # the trained weights, their gradients and the optimizer's states in the model's 16-bit dtype


class TrainOn(_Choice):
    assistant = "assistant"            # every assistant turn (default)
    last_assistant = "last_assistant"  # only the final assistant turn
    all = "all"                        # every token


# TRL 1.16's DPOTrainer loss_type values (one at a time here)
class DpoLoss(_Choice):
    sigmoid = "sigmoid"
    hinge = "hinge"
    ipo = "ipo"
    exo_pair = "exo_pair"
    nca_pair = "nca_pair"
    robust = "robust"
    bco_pair = "bco_pair"
    sppo_hard = "sppo_hard"
    aot = "aot"
    aot_unpaired = "aot_unpaired"
    apo_zero = "apo_zero"
    apo_down = "apo_down"
    discopop = "discopop"
    sft = "sft"
    sigmoid_norm = "sigmoid_norm"


class KtoLoss(_Choice):
    kto = "kto"
    apo_zero_unpaired = "apo_zero_unpaired"


# TRL 1.16's GRPOTrainer loss_type values
class GrpoLoss(_Choice):
    grpo = "grpo"
    dr_grpo = "dr_grpo"
    dapo = "dapo"
    bnpo = "bnpo"
    cispo = "cispo"
    sapo = "sapo"
    luspo = "luspo"
    vespo = "vespo"


class ImportanceLevel(_Choice):
    token = "token"
    sequence = "sequence"  # GSPO


class RolloutCache(_Choice):
    keep = "keep"   # the engine's KV cache and captured step stay between rounds (no re-capture; the cache's memory held)
    free = "free"   # freed after each round, captured again at the next (training's peak without the cache)


class Generation(_Choice):
    auto = "auto"                  # qtune on a GPU (not with quant=int8), transformers elsewhere
    qtune = "qtune"                # qtune's batched rollout engine (qtune.inference.engine), CUDA graphs on a GPU
    transformers = "transformers"  # TRL's own generation (model.generate)


# `raise` is a keyword, so the functional form: members are named as users type them (data.on_error=raise).
OnError = _Choice("OnError", [("raise", "raise"), ("skip", "skip")])


@dataclass
class ArchConfig:
    """Architecture facts, enough to build the model on the meta device without weights."""
    model_type: str = MISSING  # transformers model_type: qwen3, qwen3_moe, llama
    vocab_size: int = MISSING
    hidden_size: int = MISSING
    intermediate_size: int = MISSING
    num_hidden_layers: int = MISSING
    num_attention_heads: int = MISSING
    num_key_value_heads: int = MISSING
    head_dim: int = MISSING
    max_position_embeddings: int = 40960
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    # Mixture of experts (0 experts = dense)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: List[int] = field(default_factory=list)
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.001


@dataclass
class ModelConfig:
    """Which weights, from where, and the architecture facts."""
    name: str = MISSING
    source: ModelSource = ModelSource.hub
    repo_id: str = "${qtune.repo:${model.variant},${model.instruct_repo_id},${model.base_repo_id}}"
    instruct_repo_id: Optional[str] = None
    base_repo_id: Optional[str] = None
    variant: Variant = Variant.instruct
    revision: str = "main"
    local_dir: str = "${paths.models}/${model.name}"
    trust_remote_code: bool = False
    package: Optional[str] = None        # source=package: the Python package holding the GGUF file
    gguf_file: Optional[str] = None
    chat_template: Optional[str] = None  # a template name (chatml, qwen3) or a .jinja path; null = the tokenizer's
    # none: the model's own RoPE, up to model.arch.max_position_embeddings tokens. yarn: YaRN scaling (Qwen3's way
    # past its context): positions up to rope_factor x rope_original_max_position_embeddings (131,072 for Qwen3); set
    # whenever the model loads (train, chat, serve, merge, eval) and kept in the run's config.yaml and merged model
    rope_scaling: RopeScaling = RopeScaling.none
    rope_factor: float = 4.0             # yarn: how far the positions stretch (Qwen3's model cards: 4.0)
    rope_original_max_position_embeddings: int = 32768  # yarn: the context the model was trained at (Qwen3: 32,768)
    arch: ArchConfig = field(default_factory=ArchConfig)

    @property
    def context(self) -> int:
        """The longest sequence the model's positions reach with these settings."""
        if self.rope_scaling is RopeScaling.yarn:
            return int(self.rope_factor * self.rope_original_max_position_embeddings)
        return self.arch.max_position_embeddings


@dataclass
class DownloadConfig:
    """What `qtune download` fetches (safetensors, tokenizer and config by default)."""
    allow_patterns: List[str] = field(default_factory=lambda: [
        "*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja", "*.md", "LICENSE*"])
    ignore_patterns: List[str] = field(default_factory=list)
    allow_pickle: bool = False         # also fetch pickled weights (*.bin, *.pth, *.pt, *.ckpt, *.pkl)
    max_workers: int = 8
    min_free_gib: float = 1.0          # head-room left on disk after the download


@dataclass
class QuantConfig:
    """How the frozen base weights sit in memory (QLoRA is quant=nf4)."""
    method: QuantMethod = QuantMethod.none
    double_quant: bool = True
    compute_dtype: DType = DType.bf16
    skip_modules: List[str] = field(default_factory=lambda: ["lm_head"])


@dataclass
class LoraConfig:
    """The adapter."""
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: List[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    target_regex: Optional[str] = None   # a full-name regex instead of target_modules
    use_rslora: bool = False
    use_dora: bool = False
    init: str = "default"                # PEFT init_lora_weights: default, gaussian, pissa, pissa_niter_N, olora, loftq
    bias: str = "none"
    modules_to_save: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.r, int) and self.r <= 0:
            raise ValueError(f"lora.r must be a positive integer, got {self.r}")
        if isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool) and self.alpha <= 0:
            raise ValueError(f"lora.alpha={self.alpha:g}: valid: > 0 (the adapter's output is scaled by "
                             "lora.alpha / lora.r, so 0 leaves it without effect; 2 x lora.r is usual)")
        if isinstance(self.dropout, float) and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        import re

        if isinstance(self.init, str) and not re.fullmatch(r"default|gaussian|pissa(_niter_\d+)?|olora|loftq", self.init):
            raise ValueError(f"lora.init={self.init}: valid: default, gaussian, pissa, pissa_niter_N, olora, loftq")
        if isinstance(self.bias, str) and self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"lora.bias={self.bias}: valid: none, all, lora_only")


@dataclass
class MoeConfig:
    """Which expert and router parameters of an MoE model get adapters (unused on dense models)."""
    scope: MoeScope = MoeScope.expert_only
    expert_patterns: List[str] = field(default_factory=lambda: [r"mlp\.experts\.(gate_up_proj|down_proj)$"])
    router_patterns: List[str] = field(default_factory=lambda: [r"mlp\.gate$"])
    max_experts: Optional[int] = None    # adapters on at most this many experts per layer
    expert_selection: ExpertSelection = ExpertSelection.first
    router_mode: RouterMode = RouterMode.frozen
    aux_loss_coef: Optional[float] = None  # null = the model's router_aux_loss_coef

    def __post_init__(self) -> None:
        if self.max_experts is not None:
            _check_range("moe", "max_experts", self.max_experts, low=1)
        router = self.scope in (MoeScope.router_only, MoeScope.all)
        if router and self.router_mode is RouterMode.frozen:
            raise ValueError(f"moe.scope={self.scope} adapts the router, but moe.router_mode=frozen; "
                             "set moe.router_mode=lora or full")
        if not router and self.router_mode is not RouterMode.frozen:
            raise ValueError(f"moe.router_mode={self.router_mode} needs moe.scope=router_only or all "
                             f"(moe.scope={self.scope} leaves the router frozen)")


@dataclass
class SourceConfig:
    """One input of a data mix."""
    path: str = MISSING
    format: str = "auto"
    weight: Optional[float] = None   # share of the mix (weights are normalized)
    count: Optional[int] = None      # or an absolute number of examples
    split: str = "train"             # for Hub datasets
    info: Optional[Dict[str, Any]] = None  # a dataset_info.json entry (LLaMA-Factory's) that reads it; data.dataset sets it


@dataclass
class DataConfig:
    """Inputs and how they become training examples."""
    path: Optional[str] = None       # a file, glob, folder or hub dataset; or use data.sources
    sources: List[SourceConfig] = field(default_factory=list)
    format: str = "auto"             # auto: each record's layout detected; or name one (README: Dataset layouts)
    dataset_info: Optional[str] = None  # a LLaMA-Factory dataset_info.json: file_name, formatting, columns, tags, ranking
    dataset: Optional[str] = None    # with dataset_info: the names of its datasets to train on (a,b)
    eval_path: Optional[str] = None
    max_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    max_length: int = 2048
    val_size: float = 0.05
    train_on: TrainOn = TrainOn.assistant
    packing: bool = True
    enable_thinking: Optional[bool] = None  # null = as each record has it
    # Qwen3's template drops the reasoning of turns before the last user message, as inference never shows it. split
    # (default): each round is an example with the history inference shows, so every turn's reasoning is trained
    # once and no turn learns to answer without thinking; records without earlier reasoning stay one example
    multi_turn_thinking: MultiTurnThinking = MultiTurnThinking.split
    ignore_empty_think: bool = False        # an empty <think></think> in a trained turn is context, not trained
    system_prompt: Optional[str] = None     # added to records without a system turn
    on_error: OnError = OnError["raise"]
    seed: int = 42
    num_proc: int = 0                        # 0 = one worker per core, up to 8
    cache_dir: str = "${paths.data}"
    rebuild_cache: bool = False              # prepare again even when the cache holds this data (not in its key)

    def __post_init__(self) -> None:
        _check_range("data", "max_length", self.max_length, low=1)
        for key in ("max_samples", "max_eval_samples"):
            if getattr(self, key) is not None:
                _check_range("data", key, getattr(self, key), low=1)
        # a fraction of the data (0 <= x < 1) or a whole number of examples (>= 1): 2.5 is neither
        v = self.val_size
        if isinstance(v, (int, float)) and not isinstance(v, bool) and (v < 0 or (v >= 1 and v != int(v))):
            raise ValueError(f"data.val_size={v:g}: valid: a fraction 0 <= x < 1 of the examples, or a whole number "
                             "of examples (e.g. 200)")
        _check_range("data", "num_proc", self.num_proc, low=0)


@dataclass
class DpoConfig:
    """train.stage=dpo: TRL's DPOTrainer on preference pairs; the reference is the model the run starts from."""
    beta: float = 0.1                   # how far the policy may move from the reference (higher: less)
    loss_type: DpoLoss = DpoLoss.sigmoid
    label_smoothing: float = 0.0        # robust and exo_pair losses: the share of pairs assumed flipped

    def __post_init__(self) -> None:
        _check_range("train.dpo", "beta", self.beta, low=0, low_open=True)
        if isinstance(self.label_smoothing, float) and not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"train.dpo.label_smoothing={self.label_smoothing:g}: valid: >= 0 and < 0.5")
        if self.loss_type is DpoLoss.exo_pair and self.label_smoothing == 0:
            raise ValueError("train.dpo.loss_type=exo_pair needs train.dpo.label_smoothing > 0 (its paper uses 1e-3)")


@dataclass
class KtoConfig:
    """train.stage=kto: TRL's KTOTrainer on answers marked desirable or not (pairs are split into two such answers)."""
    beta: float = 0.1
    loss_type: KtoLoss = KtoLoss.kto
    desirable_weight: float = 1.0       # weights that balance unequal numbers of desirable and undesirable answers
    undesirable_weight: float = 1.0

    def __post_init__(self) -> None:
        _check_range("train.kto", "beta", self.beta, low=0, low_open=True)
        _check_range("train.kto", "desirable_weight", self.desirable_weight, low=0, low_open=True)
        _check_range("train.kto", "undesirable_weight", self.undesirable_weight, low=0, low_open=True)


@dataclass
class RmConfig:
    """train.stage=rm: TRL's RewardTrainer; a one-output sequence-classification head on the base, with LoRA."""
    center_rewards_coefficient: Optional[float] = None  # pulls rewards towards zero mean (TRL's option; 1e-2 is usual)

    def __post_init__(self) -> None:
        if self.center_rewards_coefficient is not None:
            _check_range("train.rm", "center_rewards_coefficient", self.center_rewards_coefficient, low=0)


@dataclass
class RewardSpec:
    """One reward function of train.stage=grpo: a built-in name (qtune.stages.rewards.BUILTIN), `module:function` or
    `path/to/file.py:function` (the user's own code, imported as it is), and its weight in the total reward."""
    fn: str = MISSING
    weight: float = 1.0
    run: Optional[str] = None   # fn=reward_model: a train.stage=rm run folder whose score rates each prompt + completion


@dataclass
class GrpoConfig:
    """train.stage=grpo: TRL's GRPOTrainer, online RL on prompts with verifiable rewards. train.batch_size counts
    prompts a micro-batch: each brings num_generations completions."""
    num_generations: int = 4             # completions per prompt; the advantage is each one's reward against its group's
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    beta: float = 0.0                    # KL penalty against the model the run starts from; 0: no reference forwards
    loss_type: GrpoLoss = GrpoLoss.dapo
    importance_sampling_level: ImportanceLevel = ImportanceLevel.token  # sequence: GSPO
    epsilon: float = 0.2                 # the ratio's clip range
    epsilon_high: Optional[float] = None  # null = epsilon (DAPO's clip-higher uses 0.28)
    enable_thinking: Optional[bool] = None  # the chat template's enable_thinking (Qwen3); null = the template's default
    generation_batch_size: Optional[int] = None  # completions a generation round makes; null = one round a step
    steps_per_generation: Optional[int] = None   # or: micro-steps a generation round feeds (not with the above)
    rewards: List[RewardSpec] = field(default_factory=lambda: [RewardSpec(fn="exact_answer")])
    sample_every: int = 10               # steps between samples.jsonl entries (a few prompts, completions, rewards)
    generation: Generation = Generation.auto  # rollouts: qtune's batched engine (auto: on a GPU) or TRL's generate
    rollout_cache: RolloutCache = RolloutCache.keep  # qtune's engine: keep its cache between rounds, or free it

    def __post_init__(self) -> None:
        if isinstance(self.num_generations, int) and self.num_generations < 2:
            raise ValueError(f"train.grpo.num_generations={self.num_generations}: valid: >= 2 (the advantage compares "
                             "each completion with the others of its prompt)")
        _check_range("train.grpo", "max_completion_length", self.max_completion_length, low=1)
        _check_range("train.grpo", "temperature", self.temperature, low=0, low_open=True)
        _check_range("train.grpo", "top_p", self.top_p, low=0, high=1, low_open=True)
        _check_range("train.grpo", "beta", self.beta, low=0)
        _check_range("train.grpo", "epsilon", self.epsilon, low=0, low_open=True)
        if self.epsilon_high is not None:
            _check_range("train.grpo", "epsilon_high", self.epsilon_high, low=0, low_open=True)
        _check_range("train.grpo", "sample_every", self.sample_every, low=1)
        for key in ("generation_batch_size", "steps_per_generation"):
            if getattr(self, key) is not None:
                _check_range("train.grpo", key, getattr(self, key), low=1)
        if self.generation_batch_size is not None and self.steps_per_generation is not None:
            raise ValueError("train.grpo.generation_batch_size and train.grpo.steps_per_generation: set one of them")
        if self.loss_type is GrpoLoss.luspo and self.importance_sampling_level is not ImportanceLevel.sequence:
            raise ValueError("train.grpo.loss_type=luspo needs train.grpo.importance_sampling_level=sequence")
        if self.loss_type is GrpoLoss.vespo and self.importance_sampling_level is not ImportanceLevel.token:
            raise ValueError("train.grpo.loss_type=vespo needs train.grpo.importance_sampling_level=token")
        if isinstance(self.rewards, list) and not self.rewards:
            raise ValueError("train.grpo.rewards: name at least one reward function, e.g. [{fn: exact_answer}]")


@dataclass
class FreezeConfig:
    """train.method=freeze: which weights train (LLaMA-Factory's freeze tuning); everything else stays frozen."""
    # N > 0: the last N decoder layers; N < 0: the first |N|
    trainable_layers: int = 2
    # in those layers: `all`, or module names inside a decoder layer (self_attn, mlp, mlp.experts, mlp.gate, ...)
    trainable_modules: List[str] = field(default_factory=lambda: ["all"])
    # modules outside the decoder layers trained too (embed_tokens, lm_head, norm)
    extra_modules: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.trainable_layers, int) and self.trainable_layers == 0:
            raise ValueError("train.freeze.trainable_layers=0: valid: N > 0 (the last N decoder layers) or N < 0 (the "
                             "first |N|)")
        if isinstance(self.trainable_modules, list) and not self.trainable_modules:
            raise ValueError("train.freeze.trainable_modules: name at least one module (all, self_attn, mlp, ...)")


@dataclass
class TrainConfig:
    """The optimization run."""
    # pt | sft | dpo | kto | rm | grpo: the stages qtune.stages registers, each on TRL's stable trainer for it. A str, not an
    # Enum, so that a retired stage (ppo) gets a line of its own
    stage: str = "sft"
    # lora: adapters on the frozen base (lora.*, moe.*); full: every weight trains; freeze: the weights train.freeze
    # names train. full and freeze write <run>/model/ (a whole transformers checkpoint) instead of <run>/adapter/, need
    # quant=none (a quantized base trains adapters only) and refuse lora.* settings (they would change nothing)
    method: TrainMethod = TrainMethod.lora
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    # full and freeze: the dtype of the trained weights. fp32 (default): fp32 master copies, fp32 gradients and
    # optimizer states, the compute autocast to the model's bf16/fp16 (transformers Trainer's mixed precision; 4 + 4 +
    # 8 bytes a trained parameter with AdamW). bf16: weights, gradients and optimizer states in bf16 (2 + 2 + 4 bytes
    # with AdamW, 2 + 2 + 2 with paged_adamw_8bit: what Qwen3-8B full needs to fit 80 GiB); each update is rounded to
    # bf16's 8-bit mantissa, so one smaller than ~1/256 of a weight is lost (use a higher lr or fp32 where it matters)
    trainable_dtype: TrainableDtype = TrainableDtype.fp32
    init_adapter: Optional[str] = None # start from this adapter (a run folder or an adapter folder), e.g. SFT -> DPO
    dpo: DpoConfig = field(default_factory=DpoConfig)
    kto: KtoConfig = field(default_factory=KtoConfig)
    rm: RmConfig = field(default_factory=RmConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    output_dir: str = "runs/${run_name}"
    seed: int = 42
    batch_size: int = 1
    grad_accum: int = 16
    lr: float = 2e-4
    epochs: float = 3.0
    max_steps: int = -1
    warmup_ratio: float = 0.05
    scheduler: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    logging_steps: int = 10
    eval_steps: Optional[int] = None   # null = at every save
    save_steps: int = 100
    save_total_limit: int = 2
    gradient_checkpointing: bool = True
    # qtune.modeling.fast: liger kernels + fused LoRA. auto: on CUDA; true: wherever its pieces run (the LoRA
    # function runs on CPU too); false: the reference path (plain transformers + PEFT). A str, not an Enum:
    # Hydra reads `true`/`false` as booleans.
    fast: str = "auto"
    # with the fast path: liger-kernel's RMSNorm/RoPE/SwiGLU (CUDA). They cut GPU time, which pays where the GPU sets the
    # pace. auto: steps in a CUDA graph (train.cuda_graphs), or dense models' eager steps from 8192 tokens a
    # micro-batch | true | false
    liger: str = "auto"
    # with the fast path and checkpointing: checkpointed layer inputs in pinned host memory.
    # auto: on CUDA from 8192 tokens a micro-batch (data.max_length x train.batch_size) on, for dense models | true | false
    offload_activations: str = "auto"
    # with the fast path: each micro-step's forward, loss and backward as one CUDA graph (qtune.modeling.fast.graph).
    # auto: on CUDA for pt/sft runs (dense and MoE) with packed rows in one process, without offloading | true | false
    cuda_graphs: str = "auto"
    # with the fast path on CUDA: the frozen output head in pinned host memory, copied to the GPU for each forward's
    # loss and freed after its backward (one transfer over the bus a forward). auto: where the dry run's estimate
    # with it on the GPU exceeds 90 % of the GPU's memory | true | false
    head_on_host: str = "auto"
    # GiB of GPU memory this run may take (torch.cuda.set_per_process_memory_fraction before the model loads); the dry
    # run's longest data.max_length is for this budget. null or 0: the whole GPU
    max_gpu_memory: Optional[float] = None
    # transformers' optimizer names: adamw_torch_fused, adamw_torch, paged_adamw_8bit and adamw_8bit (bitsandbytes), ...
    optim: str = "adamw_torch_fused"
    resume: str = "auto"               # auto | never | continue (a finished run too, to more steps) | a checkpoint path
    overwrite: bool = False
    merge_after: bool = False
    device: str = "auto"               # auto | cpu | cuda
    # Several processes (qtune.training.distributed): nproc > 1 starts them through torch's elastic launcher (torchrun's
    # engine), one per GPU; under torchrun or `accelerate launch` the launcher's world size applies instead.
    nproc: int = 1
    distributed: Distributed = Distributed.auto
    backend: Backend = Backend.auto
    dtype: DType = DType.auto          # auto: bf16 where supported, fp32 on CPU
    report_to: List[str] = field(default_factory=lambda: ["tensorboard"])
    sample_prompts: List[str] = field(default_factory=list)  # answered greedily before and after training
    sample_max_new_tokens: int = 48

    def __post_init__(self) -> None:
        from qtune import stages

        stages.check(self)  # the name, and what the stage asks of train.*
        if self.method is not TrainMethod.lora and self.init_adapter:
            raise ValueError(f"train.init_adapter: train.method={self.method} trains the weights themselves, not an "
                             "adapter; start from a full/freeze run's model with model.source=local "
                             "model.local_dir=<run>/model, or use train.method=lora")
        if isinstance(self.max_steps, int) and self.max_steps == 0:
            raise ValueError("train.max_steps must be -1 (use train.epochs) or a positive number of steps")
        _check_range("train", "lr", self.lr, low=0, low_open=True)
        _check_range("train", "epochs", self.epochs, low=0, low_open=True)
        _check_range("train", "weight_decay", self.weight_decay, low=0)
        _check_range("train", "max_grad_norm", self.max_grad_norm, low=0)
        for key in ("batch_size", "grad_accum", "logging_steps", "save_steps", "save_total_limit", "nproc"):
            value = getattr(self, key)
            if isinstance(value, int) and value <= 0:
                raise ValueError(f"train.{key} must be a positive integer, got {value}")
        for key in ("fast", "liger", "offload_activations", "cuda_graphs", "head_on_host"):  # str, not Enum: Hydra reads true/false as booleans
            value = getattr(self, key)
            if isinstance(value, str):
                setattr(self, key, value.lower())
                if value.lower() not in ("auto", "true", "false"):
                    raise ValueError(f"train.{key}={value}: valid: auto, true, false")
        if isinstance(self.warmup_ratio, float) and not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        _check_range("train", "max_gpu_memory", self.max_gpu_memory, low=0)
        if self.max_gpu_memory == 0:
            self.max_gpu_memory = None


@dataclass
class ChatConfig:
    use: str = "auto"                 # auto (merged if the run has one, else base + adapter) | merged | adapter | base
    system_prompt: Optional[str] = None
    max_new_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 20
    repetition_penalty: float = 1.05
    enable_thinking: bool = False
    # auto: on a GPU, CUDA-graph decoding (qtune.inference.decoding) for 16-bit models without unmerged adapters, else a
    # static cache that transformers compiles; dynamic on CPU | dynamic | static | graph
    cache: str = "auto"

    def __post_init__(self) -> None:
        _check_range("chat", "max_new_tokens", self.max_new_tokens, low=1)
        _check_range("chat", "temperature", self.temperature, low=0)
        _check_range("chat", "top_p", self.top_p, low=0, high=1, low_open=True)
        _check_range("chat", "top_k", self.top_k, low=0)
        _check_range("chat", "repetition_penalty", self.repetition_penalty, low=0, low_open=True)
        if self.cache not in ("auto", "dynamic", "static", "graph"):
            raise ValueError(f"chat.cache={self.cache}: valid: auto, dynamic, static, graph")


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: Optional[str] = None
    engine: str = "builtin"           # builtin | vllm | auto (vLLM where it is installed and serves the run as trained)
    vllm_bin: Optional[str] = None    # engine=vllm|auto: the vllm executable, or the environment holding it; null = PATH's
    vllm_args: List[str] = field(default_factory=list)  # more vLLM server arguments, e.g. [--max-model-len,4096]
    adapters: Dict[str, str] = field(default_factory=dict)  # name -> adapter folder or run folder
    max_tokens_limit: int = 4096
    max_body_bytes: int = 1_048_576
    max_prompt_tokens: Optional[int] = None   # null = the model's context less max_tokens
    log_requests: bool = True                # a line per /v1 request on stdout (time, model, tokens, latency, status)
    # continuous batching: requests decode together in max_batch cache slots of max_model_len tokens each (prompt and
    # completion); null = 32 slots on a GPU (fewer when the cache would not fit in 90 % of its free memory; the
    # start line says what was chosen), 4 on a CPU, and the model's context capped at 4096 (2048 on a CPU)
    max_batch: Optional[int] = None
    max_model_len: Optional[int] = None
    max_queue: int = 256                     # requests waiting for a slot; beyond it: 429 with Retry-After
    prefill_chunk: int = 2048                # prompt tokens prefilled per turn in one forward; a long prompt stalls no one
    max_n: int = 8                           # completions one request may ask for (OpenAI's n)
    # liger-kernel's fused RMSNorm/RoPE/SwiGLU in the decode steps (fewer kernels a step). auto: on CUDA where
    # liger-kernel is installed | true (one line saying why not, if it cannot) | false
    liger: str = "auto"

    def __post_init__(self) -> None:
        _check_range("serve", "port", self.port, low=1, high=65535)
        _check_range("serve", "max_tokens_limit", self.max_tokens_limit, low=1)
        _check_range("serve", "max_body_bytes", self.max_body_bytes, low=1)
        if self.max_prompt_tokens is not None:
            _check_range("serve", "max_prompt_tokens", self.max_prompt_tokens, low=1)
        if self.engine not in ("builtin", "vllm", "auto"):
            raise ValueError(f"serve.engine={self.engine}: valid: builtin, vllm, auto")
        for key in ("max_batch", "max_model_len"):
            if getattr(self, key) is not None:
                _check_range("serve", key, getattr(self, key), low=1 if key == "max_batch" else 16)
        _check_range("serve", "max_queue", self.max_queue, low=0)
        _check_range("serve", "prefill_chunk", self.prefill_chunk, low=1)
        _check_range("serve", "max_n", self.max_n, low=1)
        self.liger = str(self.liger).lower()
        if self.liger not in ("auto", "true", "false"):
            raise ValueError(f"serve.liger={self.liger}: valid: auto, true, false")
        for name, path in self.adapters.items():
            if not isinstance(path, str):
                raise ValueError(f"serve.adapters.{name}: expected a run or adapter folder, e.g. "
                                 f"'serve.adapters={{{name}: runs/{name}}}'")


@dataclass
class MergeConfig:
    dtype: DType = DType.bf16             # what the merged model is saved in
    parity_dtype: DType = DType.fp32      # what the merge is checked in (fp32: the merge math, not bf16 rounding)
    tolerance: float = 1e-2               # max |logits(merged) - logits(base+adapter)| in parity_dtype
    save_4bit: bool = False
    gguf: List[str] = field(default_factory=list)  # f16, q8_0, q4_k_m, q5_k_m, q6_k
    output_dir: Optional[str] = None
    overwrite: bool = False               # replace a non-empty merge.output_dir that no qtune merge wrote


@dataclass
class LmEvalConfig:
    """`qtune eval` with EleutherAI's lm-evaluation-harness (pip install 'qtune[eval]'): its tasks, run in process on
    each compared model as loaded for qtune's own figures; the scores join the same report."""
    tasks: List[str] = field(default_factory=list)  # task or group names, e.g. [gsm8k, hellaswag]; empty: none
    include_path: Optional[str] = None   # a folder of your own task yamls (read offline), beside lm-eval's own
    limit: Optional[float] = None        # examples per task: a whole number, or a fraction (< 1) of each task
    num_fewshot: Optional[int] = None    # null = each task's own setting
    batch_size: int = 1                  # requests lm-eval puts in one forward
    max_length: Optional[int] = None     # context window lm-eval assumes; null = the model's

    def __post_init__(self) -> None:
        if self.limit is not None:
            _check_range("eval.lm_eval", "limit", self.limit, low=0, low_open=True)
            if isinstance(self.limit, float) and self.limit >= 1 and self.limit != int(self.limit):
                raise ValueError(f"eval.lm_eval.limit={self.limit:g}: valid: a fraction 0 < x < 1 of each task, or "
                                 "a whole number of examples")
        if self.num_fewshot is not None:
            _check_range("eval.lm_eval", "num_fewshot", self.num_fewshot, low=0, whole=True)
        _check_range("eval.lm_eval", "batch_size", self.batch_size, low=1, whole=True)


@dataclass
class EvalConfig:
    """`qtune eval`: held-out loss and a prompt set, per model."""
    prompts: Optional[str] = None     # JSONL: {"prompt": ..., "system"?: ..., "reference"?: ...} per line
    repeats: int = 1                  # >1: each prompt answered that many times with sampling (consistency)
    max_new_tokens: int = 256
    judge_url: Optional[str] = None   # an OpenAI-compatible base URL (e.g. http://127.0.0.1:8000/v1)
    judge_model: Optional[str] = None # null = the first model the judge lists
    judge_api_key_env: str = "QTUNE_JUDGE_API_KEY"  # the judge's key is read from this variable
    models: List[str] = field(default_factory=list)  # base, adapter, merged, run folders, model folders
    data: Optional[str] = None        # held-out data other than the run's eval split (prepared like the run's)
    max_eval_rows: Optional[int] = None
    output_dir: Optional[str] = None  # default: <run>/eval

    lm_eval: LmEvalConfig = field(default_factory=LmEvalConfig)

    def __post_init__(self) -> None:
        if isinstance(self.repeats, int) and self.repeats < 1:
            raise ValueError(f"eval.repeats must be at least 1, got {self.repeats}")


class HubWhat(_Choice):
    adapter = "adapter"  # <run>/adapter: the LoRA adapter (PEFT), small; loads over the base model
    merged = "merged"    # <run>/merged: the standalone 16-bit model `qtune merge` wrote
    gguf = "gguf"        # <run>/gguf/*.gguf and their Ollama Modelfiles (`qtune merge merge.gguf=[...]`)


@dataclass
class HubConfig:
    """`qtune push`: a run's adapter, merged model or GGUF files to a Hugging Face Hub repo, with a model card. The token
    is HF_TOKEN's (or the one `hf auth login` saved); HF_ENDPOINT names another Hub."""
    repo_id: Optional[str] = None     # owner/name; created when missing
    what: HubWhat = HubWhat.adapter   # adapter (<run>/adapter) | merged (<run>/merged) | gguf (<run>/gguf/*.gguf)
    private: bool = True              # for a repo this push creates (an existing repo keeps its visibility)
    revision: Optional[str] = None    # a branch to commit to (made from main when missing); null = main
    # a repo that holds files this push would not write (another model's, someone's notes) is refused unless true;
    # then the commit replaces the repo's contents with this upload
    overwrite: bool = False
    commit_message: Optional[str] = None  # null = "qtune push: <what> of <run>"

    def __post_init__(self) -> None:
        import re

        if isinstance(self.repo_id, str) and not re.fullmatch(r"[\w.-]+/[\w.-]+", self.repo_id):
            raise ValueError(f"hub.repo_id={self.repo_id}: valid: owner/name (letters, digits, '-', '_', '.')")


@dataclass
class PathsConfig:
    home: str = "${oc.env:QTUNE_HOME,${oc.env:HOME,.}/.cache/qtune}"
    models: str = "${paths.home}/models"
    data: str = "${paths.home}/data"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    moe: MoeConfig = field(default_factory=MoeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    chat: ChatConfig = field(default_factory=ChatConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    # the data's name too (qtune.config.compose.data_name: a file's stem, "mix", "demo"), so another data set on the same
    # model is a new run folder, not a refused resume; the last part is the LoRA rank (r16), or full / freeze
    run_name: str = ("${model.name}-${qtune.data_name:${data.path},${data.sources}}-${quant.method}-"
                     "${qtune.method_tag:${train.method},${lora.r}}")
    run: Optional[str] = None   # a run folder that merge/chat/serve/eval read from


def store() -> None:
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    node = OmegaConf.structured(Config)
    # Hydra merges `serve.adapters={b: runs/b}` into the existing dict, which struct mode (every other node, so that
    # typos fail) would refuse as unknown keys; a name -> folder map has no fixed keys to check.
    node.serve.adapters._set_flag("struct", False)
    ConfigStore.instance().store(name="qtune_schema", node=node)
