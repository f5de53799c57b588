"""Training on several processes, through the engines made for it.

- `train.nproc=N` starts N processes with torch's elastic launcher, the engine behind `torchrun --standalone` (and
  `accelerate launch`); each runs the same `qtune.train.run(cfg)`. Under torchrun or `accelerate launch` nothing is
  started: qtune reads the world from the variables every torch launcher sets (RANK, LOCAL_RANK, WORLD_SIZE).
- transformers' Trainer, through accelerate, wraps the model (DDP, or FSDP2), gives each process its own shard of the
  batches, and counts the loss's tokens over all processes (average_tokens_across_devices), so the loss per token is
  the same whatever the world size and however unevenly the packed rows fill each process's batch.
- This module decides what to ask them for (strategy, backend, the Trainer's arguments), says in one line what they
  cannot do, and reads a checkpoint's world back so that a resume keeps its meaning.
"""
from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from qtune.config.schema import Backend, Distributed, QuantMethod, TrainConfig
from qtune.errors import ConfigError, DataError, QtuneError

# How long a process waits for the others at a collective: rank 0 prepares the data while the others wait at a
# barrier, which can take long on a big data set (torch's default, 30 minutes, would cut it short).
TIMEOUT_S = 3 * 3600
# After SIGINT/SIGTERM the launcher waits this long for the processes to save a checkpoint before it kills them.
SHUTDOWN_S = 900
RECORD = "WorldRecord"  # the callback (qtune.callbacks) whose state each checkpoint's trainer_state.json keeps


@dataclass(frozen=True)
class World:
    """Where this process stands, from the variables torch's launchers set (one process without them)."""
    rank: int = 0
    local_rank: int = 0
    size: int = 1
    local_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def world() -> World:
    env = os.environ
    size = int(env.get("WORLD_SIZE", 1))
    return World(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), size, int(env.get("LOCAL_WORLD_SIZE", size)))


def launched() -> bool:
    """Started by a launcher (torchrun, accelerate launch, train.nproc): never start processes again."""
    return "LOCAL_RANK" in os.environ


def needs_launch(train: TrainConfig) -> bool:
    return train.nproc > 1 and not launched()


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


def strategy(choice: Distributed, device: str, size: int, need_bytes: Callable[[], float] | None = None) -> str:
    """auto: DDP when the model fits one GPU, else FSDP2 (CPU processes: DDP, the only one accelerate runs there)."""
    if size == 1:
        return "single"
    if choice is not Distributed.auto:
        return str(choice)
    if not device.startswith("cuda") or need_bytes is None:
        return "ddp"
    return "fsdp" if need_bytes() > gpu_bytes() else "ddp"


# A dry run on a machine without a GPU judges "fits one GPU" against an 80 GiB one (H100, A100-80G).
ASSUMED_GPU_BYTES = 80 * 2**30


def gpu_bytes() -> float:
    """What one GPU offers training: 90 % of its memory (the allocator's slack and fragmentation take the rest)."""
    import torch

    total = torch.cuda.get_device_properties(world().local_rank).total_memory if torch.cuda.is_available() \
        else ASSUMED_GPU_BYTES
    return 0.9 * total


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


# ---------------------------------------------------------------- GPUs for jobs that run side by side


@contextmanager
def claim_gpus(n: int, folder: Path, poll_s: float = 2.0):
    """For a job of a parallel sweep (hydra/launcher=joblib) on a machine of several GPUs: wait for n GPUs no other job
    holds, set CUDA_VISIBLE_DEVICES to them while the job runs and yield their ids (None, and nothing claimed, with
    n=0 or fewer than two GPUs). A GPU is held by an exclusive lock on <folder>/.gpus/<index>.lock, which the system
    releases when the job ends, however it ends."""
    import fcntl
    import time

    import torch

    total = torch.cuda.device_count() if n else 0
    if total < 2:
        yield None
        return
    if n > total:
        raise ConfigError(f"train.nproc={n}: a job cannot have {n} GPUs, {total} are visible")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(total)]
    (folder / ".gpus").mkdir(parents=True, exist_ok=True)
    held: list = []
    while len(held) < n:
        for i in range(total):
            f = open(folder / ".gpus" / f"{i}.lock", "w")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                continue
            held.append((ids[i], f))
            if len(held) == n:
                break
        if len(held) < n:  # give back a partial claim, so that two jobs never wait on each other's halves
            for _, f in held:
                f.close()
            held = []
            time.sleep(poll_s)
    gpus = ",".join(i for i, _ in held)
    os.environ["CUDA_VISIBLE_DEVICES"] = gpus
    try:
        yield gpus
    finally:
        if visible is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible
        for _, f in held:
            f.close()


# ---------------------------------------------------------------- starting the processes (train.nproc)


class LaunchError(QtuneError):
    """A process of a launched run stopped on a QtuneError: its message and its exit code."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def launch(fn: Callable, cfg, nproc: int, **flags):
    """fn(cfg, **flags) in nproc processes on this machine, started as `torchrun --standalone --nproc_per_node nproc`
    starts them (torch's elastic_launch: a rendezvous on a free local port, the environment, failure handling; each
    process in its own session, so a signal reaches them once, through the launcher, which then waits for them to
    save a checkpoint). Returns rank 0's result. A QtuneError in a process comes back as one line and its exit code."""
    import logging
    import pickle
    import tempfile
    import uuid

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # torchrun's own default for several processes on one machine: do not let each take every core
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    for name in list(logging.root.manager.loggerDict):  # the launcher's notes and failure reports: ours replace them
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    later = {"shutdown_timeout": SHUTDOWN_S} if "shutdown_timeout" in LaunchConfig.__dataclass_fields__ else {}
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.5,
                          **later)  # (torch < 2.8 has no shutdown_timeout: its launcher waits 30 s)
    with tempfile.TemporaryDirectory(prefix="qtune-launch-") as tmp:
        job = Path(tmp) / "job.pkl"
        job.write_bytes(pickle.dumps((fn, cfg, flags)))  # fn by reference: the processes import it
        try:
            elastic_launch(config, sys.executable)("-m", "qtune.distributed", str(job))
        except ChildFailedError as e:
            raise _failure(Path(tmp), e) from None
        except SignalException as e:  # the processes got the signal too and saved what they could
            raise SystemExit(128 + int(e.sigval)) from None
        result = Path(tmp) / "result.pkl"
        return pickle.loads(result.read_bytes()) if result.is_file() else None


def _failure(tmp: Path, e) -> BaseException:
    errors = sorted(tmp.glob("error-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    if errors:
        first = json.loads(errors[0].read_text())
        return LaunchError(first["message"], first["exit_code"])
    codes = {rank: f.exitcode for rank, f in e.failures.items()}
    signalled = [c for c in codes.values() if c in (130, 143)]
    if signalled:  # stopped by SIGINT/SIGTERM after saving a checkpoint (rank 0 said so)
        return SystemExit(signalled[0])
    rank, code = min(codes.items())
    how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
    return QtuneError(f"training process {rank} of {len(codes)} failed ({how}); its output above says why")


def _die_with_parent() -> None:
    """When the launcher dies (kill -9), take this process with it rather than train on as an orphan (Linux)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # it died before prctl
        raise SystemExit(137)


def _work(job: Path) -> None:
    """One launched process: run the pickled fn; leave rank 0's result, or this process's error, beside the job."""
    import pickle

    _die_with_parent()
    fn, cfg, flags = pickle.loads(job.read_bytes())
    rank = world().rank
    try:
        result = fn(cfg, **flags)
    except QtuneError as e:
        (job.parent / f"error-{rank}.json").write_text(json.dumps({"message": str(e), "exit_code": e.exit_code}))
        raise SystemExit(e.exit_code) from None
    if rank == 0:
        (job.parent / "result.pkl").write_bytes(pickle.dumps(result))


if __name__ == "__main__":
    _work(Path(sys.argv[1]))
