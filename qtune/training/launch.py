"""Starting the processes of a run: `train.nproc=N` as `torchrun --standalone --nproc_per_node N` starts them (torch's
elastic launcher: a rendezvous on a free local port, the environment, failure handling), and GPUs of their own for the
jobs of a parallel sweep. What the processes then ask of the engines is qtune.training.distributed's.
"""
from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from qtune.config.schema import TrainConfig
from qtune.modeling.world import world
from qtune.runs import launched
from qtune.errors import ConfigError, QtuneError

# After SIGINT/SIGTERM the launcher waits this long for the processes to save a checkpoint before it kills them.
SHUTDOWN_S = 900


def needed(train: TrainConfig) -> bool:
    """train.nproc > 1 and not already one of a launcher's processes."""
    return train.nproc > 1 and not launched()


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


def start(fn: Callable, cfg, nproc: int, **flags):
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
            elastic_launch(config, sys.executable)("-m", "qtune.training.launch", str(job))
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
