"""Training on several processes, through the engines made for it.

- The processes: `train.nproc=N` starts them (qtune.training.launch, through torch's elastic launcher, the engine behind
  `torchrun`); under torchrun or `accelerate launch` they are the launcher's. Each runs the same `qtune.commands.train.run(cfg)`
  and reads where it stands from the variables every torch launcher sets (RANK, LOCAL_RANK, WORLD_SIZE).
- transformers' Trainer, through accelerate, wraps the model (DDP, or FSDP2), gives each process its own shard of the
  batches, and counts the loss's tokens over all processes (average_tokens_across_devices), so the loss per token is
  the same whatever the world size and however unevenly the packed rows fill each process's batch.
- This module decides what to ask them for (strategy, backend, the Trainer's arguments), says in one line what they
  cannot do, and reads a checkpoint's world back so that a resume keeps its meaning.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from qtune.config.schema import Backend, Distributed, QuantMethod, TrainConfig
from qtune.errors import ConfigError, DataError
from qtune.modeling.world import strategy, world
from qtune.runs import launched

# How long a process waits for the others at a collective: rank 0 prepares the data while the others wait at a
# barrier, which can take long on a big data set (torch's default, 30 minutes, would cut it short).
TIMEOUT_S = 3 * 3600
RECORD = "WorldRecord"  # the callback (qtune.training.callbacks) whose state each checkpoint's trainer_state.json keeps


@dataclass(frozen=True)
class Setup:
    """What one run asks of the engines, recorded in config.yaml, summary.json and every checkpoint."""
    world_size: int = 1
    strategy: str = "single"   # single | ddp | fsdp
    backend: str | None = None  # nccl | gloo with several processes
    batch_size: int = 1        # per process
    grad_accum: int = 1

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    def describe(self) -> str:
        where = f"{self.world_size} process{'es' if self.world_size > 1 else ''}" + \
            (f" ({self.strategy}, {self.backend})" if self.strategy != "single" else "")
        return (f"{where}; global batch {self.global_batch} = train.batch_size {self.batch_size} × "
                f"train.grad_accum {self.grad_accum} × {self.world_size} process{'es' if self.world_size > 1 else ''}")

    def record(self) -> dict:
        return {**asdict(self), "global_batch": self.global_batch}


def setup(train: TrainConfig, quant: QuantMethod, device: str, need_bytes: Callable[[], float] | None = None) -> Setup:
    """This process's world, strategy and backend. need_bytes: the one-GPU memory estimate, read only when
    train.distributed=auto must choose on CUDA."""
    size = world().size
    # one process under a launcher may still ask for FSDP2 (`torchrun --nproc_per_node 1`: the FSDP-QLoRA path on one
    # GPU, as the GPU tests run it)
    if size == 1 and not (launched() and train.distributed is Distributed.fsdp):
        return Setup(1, "single", None, train.batch_size, train.grad_accum)
    how = strategy(train.distributed, device, size, need_bytes) if size > 1 else "fsdp"
    if how == "fsdp" and quant is QuantMethod.int8:
        raise ConfigError("quant=int8: FSDP2 shards floating-point weights only and bitsandbytes keeps int8 weights as "
                          "int8; use quant=nf4 (stored in the model's dtype for FSDP) or train.distributed=ddp")
    return Setup(size, how, backend(train.backend, device), train.batch_size, train.grad_accum)


def backend(choice: Backend, device: str) -> str:
    import torch.distributed as td

    on_gpu = device.startswith("cuda")
    name = ("nccl" if on_gpu else "gloo") if choice is Backend.auto else str(choice)
    if name == "nccl" and not (on_gpu and td.is_nccl_available()):
        why = "this run is on the CPU" if not on_gpu else "this torch build has no NCCL"
        raise ConfigError(f"train.backend=nccl: NCCL is unavailable ({why}); use train.backend=gloo (or auto) for CPU "
                          "processes, or run on CUDA GPUs")
    return name


def check_devices(device: str, nproc: int, choice: Backend) -> None:
    """Before processes start: a backend that can run here, and one GPU per process (NCCL refuses two on one)."""
    if nproc < 2:
        return
    backend(choice, device)
    if device.startswith("cuda"):
        import torch

        n = torch.cuda.device_count()
        if nproc > n:
            raise ConfigError(f"train.nproc={nproc}: {n} CUDA GPU{'s are' if n != 1 else ' is'} visible and each "
                              f"process needs its own; set train.nproc={n} (or CUDA_VISIBLE_DEVICES)")


def local_device(device: str) -> str:
    """This process's device: cuda:<local rank> when several processes share a machine."""
    w = world()
    return f"cuda:{w.local_rank}" if w.size > 1 and device == "cuda" else device


def init(s: Setup, device: str) -> None:
    """Join the process group now rather than when the Trainer is built, so that rank 0 can decide what the run folder
    means and prepare the data while the others wait (main_first)."""
    if s.strategy == "single":
        return
    from datetime import timedelta

    from accelerate import PartialState

    PartialState(cpu=not device.startswith("cuda"), backend=s.backend, timeout=timedelta(seconds=TIMEOUT_S))


@contextmanager
def main_first(s: Setup):
    """Rank 0 runs the block first (it may write: delete a stale run, prepare the data); the others wait at a barrier,
    then run it too and find its work done (accelerate's main_process_first)."""
    if s.strategy == "single":
        yield
        return
    from accelerate import PartialState

    with PartialState().main_process_first():
        yield


def trainer_args(s: Setup, gradient_checkpointing: bool) -> dict:
    """TrainingArguments for the strategy. FSDP2 shards each decoder layer (accelerate's default wrap: the model's
    _no_split_modules), checkpoints activations itself (the Trainer warns that its own would all-gather twice) and saves
    full state dicts, so checkpoints hold a plain adapter and resume on any number of processes."""
    if s.strategy == "single":
        return {}
    args = {"ddp_backend": s.backend, "ddp_timeout": TIMEOUT_S, "average_tokens_across_devices": True,
            # every adapter takes part in every step (fused experts' adapters are one tensor each), so DDP need not
            # walk the graph for unused parameters after each backward
            "ddp_find_unused_parameters": False}
    if s.strategy == "fsdp":
        args["fsdp"] = "full_shard"
        args["fsdp_config"] = {"version": 2, "reshard_after_forward": True, "state_dict_type": "FULL_STATE_DICT",
                               "activation_checkpointing": gradient_checkpointing, "cpu_ram_efficient_loading": False}
    return args


def unshard_skipped_units(model, modules=None) -> int:
    """Under FSDP2: before each forward of the input embeddings, the output head and the final norm, gather their
    weights when FSDP has left them sharded. Returns how many modules got the hook.

    Why (found on an H100 with torch 2.11, accelerate 1.15, TRL 1.16: "aten.embedding.default got mixed torch.Tensor
    and DTensor" at the first step after a checkpoint that follows an evaluation). accelerate shards a tied input
    embedding and output head as one unit, fully_shard([embed_tokens, lm_head]) with reshard_after_forward=False
    (accelerate/utils/fsdp_utils.py, fsdp2_prepare_model). TRL's fused LM head reads lm_head.weight and never calls
    lm_head, so the unit's forward never completes: torch before pytorch#180426/#180428 (in 2.13, not in 2.11) gathers
    a grouped unit only in the pre-hook of the first of its modules to run while its set of modules still to run is
    empty, and empties that set only when all of them ran or in the last backward's final callback. A training step
    has a backward, which empties it; an evaluation has none, so the set stays {lm_head} with the weights gathered.
    A checkpoint's state dict then puts the sharded weights back (FSDP2's state-dict pre-hook, _to_sharded), and the
    next forward skips the gather: embed_tokens looks up a sharded DTensor. Generation after the final evaluation and
    the adapter's gather would hit the same. This hook runs after FSDP's own (which it prepends), and gathers through
    the public FSDPModule.unshard() only when FSDP did not; resharding stays FSDP's (after the next backward, or at the
    next state dict). Where torch completes such units itself, the weights are gathered already and it does nothing."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    def unshard_if_skipped(module, args):
        if isinstance(module, FSDPModule) and any(isinstance(p, DTensor) for p in module.parameters(recurse=False)):
            module.unshard()

    if modules is None:
        modules = _edge_modules(model)
    seen = []
    for m in modules:
        if m is not None and not any(m is s for s in seen):
            m.register_forward_pre_hook(unshard_if_skipped)
            seen.append(m)
    return len(seen)


def _edge_modules(model) -> list:
    """The modules accelerate may shard together outside the decoder layers: the input embeddings, the output head
    and the final norm (a child of the backbone whose class name holds "Norm", as accelerate finds it)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    out = []
    for name in ("get_input_embeddings", "get_output_embeddings"):  # (a reward model has no output head: None)
        try:
            out.append(getattr(base, name)())
        except (AttributeError, NotImplementedError):
            pass
    backbone = getattr(base, getattr(base, "base_model_prefix", ""), None)
    if backbone is not None and hasattr(backbone, "named_children"):
        norms = [m for _, m in backbone.named_children() if "Norm" in type(m).__name__]
        out.append(norms[-1] if norms else None)
    return out


def check_wrapped(s: Setup, trainer) -> None:
    """accelerate runs FSDP on accelerators only: for CPU processes it keeps DDP and drops the FSDP plugin without a
    word (accelerate 1.15, AcceleratorState: DistributedType.FSDP is set for multi-GPU types, not MULTI_CPU)."""
    if s.strategy == "fsdp" and not trainer.is_fsdp_enabled:
        raise ConfigError(f"train.distributed=fsdp: accelerate runs FSDP on GPUs only (here it would fall back to DDP "
                          f"on {trainer.args.device.type}); use train.distributed=ddp for CPU processes")


def check_rows(rows: int, s: Setup) -> None:
    """Each process needs at least one batch of its own; below that accelerate would feed some processes nothing but
    rows repeated from other processes' shards."""
    if rows < s.world_size * s.batch_size:
        raise DataError(f"data: {rows} packed training row{'s' if rows != 1 else ''} cannot give each of "
                        f"{s.world_size} processes a batch of train.batch_size={s.batch_size}; use fewer processes "
                        f"(train.nproc), a smaller train.batch_size, or more data")


def any_rank(flag: bool, device) -> bool:
    """True on every process when it is true on one (so that all stop at the same step)."""
    import torch
    import torch.distributed as td

    if not (td.is_available() and td.is_initialized()) or td.get_world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    td.all_reduce(t, op=td.ReduceOp.MAX)
    return bool(t.item())


def adapter_state(trainer) -> dict | None:
    """The trainable weights gathered whole for saving (every process must call it under FSDP, where each holds a
    shard); None when the model's own state dict is whole already."""
    if not getattr(trainer, "is_fsdp_enabled", False):
        return None
    return trainer.accelerator.get_state_dict(trainer.model)


# ---------------------------------------------------------------- resumes


def recorded(checkpoint: Path) -> dict | None:
    """The Setup a checkpoint was written under (None for checkpoints older than the record)."""
    try:
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return None
    entry = (state.get("stateful_callbacks") or {}).get(RECORD)
    return entry.get("args") if isinstance(entry, dict) else None


def check_resume(checkpoint: Path, s: Setup) -> None:
    """A checkpoint resumes on any number of processes when its meaning is kept: FSDP's checkpoints (the optimizer in
    accelerate's optimizer.bin) need FSDP and the others need DDP or one process; and the global batch must stay, or a
    step, the schedule and the position in the data would mean something else."""
    then = recorded(checkpoint)
    if then is None:
        return
    if (then["strategy"] == "fsdp") != (s.strategy == "fsdp"):
        if then["strategy"] == "fsdp":
            fix = "resume it with train.distributed=fsdp (any number of GPUs)"
        else:
            fix = "resume it with train.distributed=ddp or one process"
        now = "fsdp" if s.strategy == "fsdp" else ("ddp" if s.strategy == "ddp" else "one process")
        raise ConfigError(f"train.distributed: {checkpoint} was saved by {then['strategy']} and this run would resume "
                          f"it with {now}; {fix}, or start over with train.overwrite=true")
    if then["global_batch"] != s.global_batch:
        per = s.batch_size * s.world_size
        keep = (f"train.grad_accum={then['global_batch'] // per} with {s.world_size} process"
                f"{'es' if s.world_size > 1 else ''}" if then["global_batch"] % per == 0 else "the same global batch")
        raise ConfigError(
            f"train.grad_accum={s.grad_accum}: {checkpoint} was trained with a global batch of {then['global_batch']} "
            f"({then['batch_size']} × {then['grad_accum']} × {then['world_size']} process"
            f"{'es' if then['world_size'] > 1 else ''}), this run's is {s.global_batch}; keep it ({keep}) so that "
            "steps, the schedule and the data position mean the same, or start over with train.overwrite=true")
