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
    memory: Memory         # the estimate per GPU for one micro-batch of this config, its world size and strategy
    single: Memory         # the same on one GPU (what train.distributed=auto compares with a GPU's memory)
    offload: bool = False  # the layer inputs go to host memory (train.offload_activations, as a CUDA run decides)

    @property
    def head_on_host(self) -> bool:
        """train.head_on_host's decision for one GPU of this machine (auto: on this estimate)."""
        return self.single.host_head > 0


def plan(cfg: Config, usable: float | None = None, capability: tuple[int, int] | None = None, model=None) -> Plan:
    """For one GPU that offers training `usable` bytes (which train.head_on_host=auto weighs) and has this compute
    capability (whether the 4-bit expert kernel runs); by default this machine's GPU (train.max_gpu_memory of it where
    set), or an 80 GiB H100 without one
    (qtune.modeling.world.gpu_bytes, qtune.modeling.fast.nf4_gmm.expected). model: this config's meta-device model, if
    already built (fits() plans many variants of one model)."""
    from qtune.config.schema import QuantMethod
    from qtune.modeling.arch import meta_model
    from qtune.modeling.fast import expected
    from qtune.modeling.estimate import estimate, experts_4bit, per_process
    from qtune.modeling.fast import head_on_host
    from qtune.modeling.fast.nf4_gmm import expected as direct_expected
    from qtune.modeling import weights
    from qtune.modeling.targets import trained
    from qtune.modeling.world import strategy, world
    from qtune.stages import get

    t, stage = cfg.train, get(cfg.train.stage)
    if usable is None:  # train.max_gpu_memory's budget where set
        from qtune.modeling.world import gpu_budget

        usable = gpu_budget(t.max_gpu_memory)
    model = model if model is not None else meta_model(cfg.model.arch, stage.head)
    matched = trained(model, cfg)
    # train.method=full|freeze: bytes a trained parameter adds (on a GPU: 16-bit base copies); the reference model of
    # dpo/kto is a whole frozen copy (no adapter to switch off)
    trained_bytes = weights.bytes_per_param(cfg, 2)[0] if weights.full(cfg) else None
    reference = weights.full(cfg) and stage.reference
    # the tokens one micro-batch puts through a forward that keeps activations (dpo and rm: chosen and rejected; grpo:
    # each prompt's completions)
    tokens = stage.tokens(cfg)
    size = max(t.nproc, world().size)  # train.nproc, or the launcher's world under torchrun
    generation, kept = stage.generation_memory(cfg)  # grpo: the rollouts' KV cache, and whether training holds it too

    def one_gpu(fast, hosted: bool | None = None, fsdp: bool = False):
        """fast: the builder's decisions for a CUDA run (qtune.modeling.builder.expected)."""
        if hosted is None and weights.full(cfg):  # full/freeze: the head may train, it stays on the GPU
            hosted = False
        if hosted is None:  # train.head_on_host: auto decides on this estimate with the head on the GPU
            hosted = head_on_host(str(t.head_on_host), fast.on, lambda: one_gpu(fast, False).total,
                                  lambda: usable)
        experts4 = experts_4bit(fast.on, cfg.quant)
        m = estimate(model, cfg.model.arch, matched, cfg.quant, tokens, t.gradient_checkpointing, on_gpu=True,
                        offload_inputs=fast.offload, experts4=experts4,
                        experts_direct=experts4 and direct_expected(str(cfg.quant.method), capability),
                        compact=fast.on and stage.compacts, lm_head=stage.head == "lm",
                        # with graphs, the untied input embeddings are in host memory
                        embed_on_host=fast.on and fast.graphs, keep_dequantized=fast.on and not fast.offload,
                        head_on_host=hosted, grouped_experts=fast.on,
                        # accelerate's FSDP2 preparation turns a model without 4-bit weights' trainable parameters to
                        # fp32 master weights (fsdp2_prepare_model, mixed precision on)
                        adapters_fp32=fsdp and cfg.quant.method is QuantMethod.none,
                        trained_bytes=trained_bytes, reference=reference, method=str(t.method))
        m.generation, m.generation_kept = float(generation), kept
        return m

    decided = expected(cfg, size)
    single = one_gpu(decided)
    how = strategy(t.distributed, "cuda", size, lambda: single.total)
    # under FSDP2 training takes the reference path (qtune.modeling.fast.decide): no 4-bit experts, no compaction
    memory = per_process(one_gpu(expected(cfg, size, fsdp=True), False, fsdp=True) if how == "fsdp" else single, how,
                         size, cfg.model.arch.num_hidden_layers)
    return Plan(model, matched, sum(p.numel() for p in model.parameters()), memory, single,
                offload=decided.offload and how != "fsdp")


@dataclass
class Capacity:
    """The longest data.max_length these settings train with (capacity())."""
    tokens: int              # the longest data.max_length that fits both budgets (0: not even CAPACITY_STEP)
    gpu_tokens: int          # ... GPU memory alone
    budget: float            # the GPU bytes it fits in
    host_budget: float | None  # the host bytes the offloaded layer inputs may pin (None: not known)
    host_per_token: float    # pinned host bytes a token of data.max_length takes at that length (0: no offload)

    @property
    def host_limits(self) -> bool:
        return self.tokens < self.gpu_tokens


CAPACITY_STEP = 128          # capacity() answers in multiples of this many tokens
CAPACITY_MOST = 1 << 24      # ... and looks no further than this


def capacity(cfg: Config, budget: float, host_budget: float | None = None, model=None) -> Capacity:
    """The longest data.max_length (a multiple of CAPACITY_STEP) whose estimate for one GPU (the plan of these settings
    at that length, its decisions included: offloading from 8192 tokens, CUDA graphs below) fits `budget` bytes, and
    whose offloaded layer inputs fit `host_budget` bytes of pinned host memory. The estimate grows with the length
    within each range of lengths where those decisions hold, so each range is searched by bisection, the longest
    first."""
    from dataclasses import replace

    from qtune.modeling.arch import meta_model
    from qtune.modeling.estimate import host_bytes
    from qtune.modeling.fast import OFFLOAD_FROM_TOKENS
    from qtune.stages import get

    if model is None:
        model = meta_model(cfg.model.arch, get(cfg.train.stage).head)
    batch, arch = cfg.train.batch_size, cfg.model.arch

    def need(length: int) -> tuple[float, float]:
        """(GPU bytes, pinned host bytes) at this length."""
        at = replace(cfg, data=replace(cfg.data, max_length=length))
        p = plan(at, budget, model=model)
        host = host_bytes(arch, get(at.train.stage).tokens(at)) if p.offload else 0.0
        return p.memory.total, host + p.memory.host_embedding + p.memory.host_head

    def longest(host: bool) -> int:
        def fits(k: int) -> bool:
            gpu, pinned = need(k * CAPACITY_STEP)
            return gpu <= budget and (not host or host_budget is None or pinned <= host_budget)

        # the ranges, longest first: from where offloading starts (auto), and below it
        start = -(-OFFLOAD_FROM_TOKENS // (batch * CAPACITY_STEP))
        for lo, hi in ((start, CAPACITY_MOST // CAPACITY_STEP), (1, start - 1)):
            if lo > hi or not fits(lo):
                continue
            while lo < hi:  # the longest that fits lies in [lo, hi]
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
            return lo * CAPACITY_STEP
        return 0

    gpu_tokens = longest(False)
    tokens = longest(True) if host_budget is not None else gpu_tokens
    length = max(tokens, CAPACITY_STEP)
    at = replace(cfg, data=replace(cfg.data, max_length=length))
    # (the tokens of a micro-batch: batch x length, twice that for pairs)
    offloaded = plan(at, budget, model=model).offload
    per_token = host_bytes(arch, get(at.train.stage).tokens(at)) / length if offloaded else 0.0
    return Capacity(tokens, gpu_tokens, budget, host_budget, per_token)


# GPUs `inspect-moe` says a config fits or not: (name, memory as torch reports it — the "total capacity" of CUDA's
# out-of-memory messages, ~0.5 GiB under nvidia-smi's figure —, compute capability)
GPUS = (("RTX 4090 (24 GB)", 23.64 * 2**30, (8, 9)), ("L40S (48 GB)", 44.39 * 2**30, (8, 9)),
        ("H100 (80 GB)", 79.15 * 2**30, (9, 0)), ("H200 (141 GB)", 139.80 * 2**30, (9, 0)))
WORLD_SIZES = (2, 4, 8)   # the processes (GPUs of one host) tried under FSDP2 when one GPU is too small


def fits(cfg: Config, gpus=GPUS, model=None) -> list[dict]:
    """For each (name, bytes, compute capability or None for this machine's GPU) GPU, with the share of it usable that
    train.distributed=auto counts (qtune.modeling.world.USABLE_SHARE): whether these settings train on one; if not, the fewest GPUs of that kind that hold
    them under FSDP2 (WORLD_SIZES; never for quant=int8, which FSDP2 cannot shard), and what would fit on one instead:
    the most experts per layer (moe.max_experts, where the fast path cuts the adapters to them) or, failing that, LoRA
    on attention only (moe=none). model: this config's meta-device model, if already built; the variants share it
    (they differ in settings only)."""
    from dataclasses import replace

    from qtune.config.schema import Distributed, QuantMethod
    from qtune.modeling.world import USABLE_SHARE
    from qtune.modeling.arch import meta_model
    from qtune.stages import get

    if model is None:
        model = meta_model(cfg.model.arch, get(cfg.train.stage).head)

    def with_(n: int, moe=None) -> Config:
        train = replace(cfg.train, nproc=n, distributed=Distributed.fsdp if n > 1 else Distributed.auto)
        return replace(cfg, train=train, moe=moe or cfg.moe)

    rows = []
    for name, total, capability in gpus:
        usable = USABLE_SHARE * total

        def need(n: int, moe=None) -> float:
            return plan(with_(n, moe), usable, capability, model).memory.total

        single = plan(with_(1), usable, capability, model).memory
        one = single.total
        row = {"gpu": name, "memory_bytes": total, "usable_bytes": usable, "one_gpu_bytes": one,
               # train.head_on_host=auto moved the output head to host memory on this GPU (an estimate apart)
               "one_gpu_head_on_host": bool(single.as_dict().get("host_head_bytes")),
               "fits_one": one <= usable, "fsdp_gpus": None, "fsdp_bytes_per_gpu": None, "fsdp_refused": None,
               "on_one_instead": None, "on_one_instead_bytes": None}
        if not row["fits_one"]:
            if cfg.quant.method is QuantMethod.int8:
                row["fsdp_refused"] = "FSDP2 cannot shard int8 weights (quant=nf4 can)"
            for n in WORLD_SIZES if row["fsdp_refused"] is None else ():
                row["fsdp_bytes_per_gpu"] = need(n)
                if row["fsdp_bytes_per_gpu"] <= usable:
                    row["fsdp_gpus"] = n
                    break
            row["on_one_instead"], row["on_one_instead_bytes"] = _on_one(cfg, usable, lambda moe: need(1, moe))
        rows.append({k: int(v) if isinstance(v, float) else v for k, v in row.items()})
    return rows


def _on_one(cfg: Config, usable: float, need) -> tuple[str | None, float | None]:
    """The largest moe.max_experts whose estimate (`need(moe)`, one GPU) fits `usable`, else moe=none where that
    fits."""
    from dataclasses import replace

    from qtune.config.schema import MoeScope, RouterMode

    experts = cfg.model.arch.num_experts or 0
    if not experts or cfg.moe.scope is MoeScope.none:
        return None, None
    attention_only = need(replace(cfg.moe, scope=MoeScope.none, router_mode=RouterMode.frozen, max_experts=None))
    if attention_only > usable:  # the least an MoE adapter can be
        return None, None
    if cfg.moe.scope in (MoeScope.expert_only, MoeScope.all):
        low, high = 0, min(cfg.moe.max_experts or experts, experts) - 1  # the most that fit lies in [low, high]
        while low < high:
            mid = (low + high + 1) // 2
            if need(replace(cfg.moe, max_experts=mid)) <= usable:
                low = mid
            else:
                high = mid - 1
        if low:
            return f"moe.max_experts={low}", need(replace(cfg.moe, max_experts=low))
    return "moe=none", attention_only


def lighter(cfg: Config, usable: float | None = None) -> list[str]:
    """What would fit one GPU instead of this full/freeze config (the OOM and too-big lines name them): each variant
    with its estimate, those that fit `usable` bytes (by default what train.distributed=auto counts usable on this
    machine's GPU, or an 80 GiB H100) marked so; a smaller model is always among them."""
    from dataclasses import replace

    from qtune.config.schema import FreezeConfig, TrainableDtype, TrainMethod
    from qtune.modeling.world import gpu_budget

    usable = usable if usable is not None else gpu_budget(cfg.train.max_gpu_memory)  # (its usable share, or the cap)
    t = cfg.train
    variants = []
    if t.trainable_dtype is not TrainableDtype.bf16 or "8bit" not in t.optim:
        variants.append(("train.trainable_dtype=bf16 train.optim=paged_adamw_8bit",
                         replace(t, trainable_dtype=TrainableDtype.bf16, optim="paged_adamw_8bit")))
    if t.method is TrainMethod.full:
        variants.append(("train.method=freeze (the last 2 layers)",
                         replace(t, method=TrainMethod.freeze, freeze=FreezeConfig())))
    variants.append(("train.method=lora", replace(t, method=TrainMethod.lora)))
    out = []
    for label, train in variants:
        need = plan(replace(cfg, train=train), usable).memory.total
        out.append(f"{label} ({need / 2**30:.1f} GiB{', fits' if need <= usable else ''})")
    return out + ["a smaller model"]
