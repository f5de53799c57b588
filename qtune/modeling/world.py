"""Where this process stands (rank and world size, from the variables torch's launchers set) and what one GPU offers
training: facts the dry run's plan (qtune.modeling.plan) and the training processes (qtune.training.distributed)
both read."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from qtune.config.schema import Distributed


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


# What one GPU offers training, of its memory: the allocator's slack and fragmentation take the rest
USABLE_SHARE = 0.9


def gpu_bytes() -> float:
    """What this machine's GPU offers training (USABLE_SHARE of its memory)."""
    import torch

    total = torch.cuda.get_device_properties(world().local_rank).total_memory if torch.cuda.is_available() \
        else ASSUMED_GPU_BYTES
    return USABLE_SHARE * total


def gpu_budget(max_gpu_memory: float | None) -> float:
    """What one GPU offers training under train.max_gpu_memory (GiB): the cap where set, never more than gpu_bytes();
    else gpu_bytes(). (A machine without a GPU plans for the cap, or for an 80 GiB one.)"""
    import torch

    usable = gpu_bytes()
    if not max_gpu_memory:
        return usable
    cap = max_gpu_memory * 2**30
    return min(cap, usable) if torch.cuda.is_available() else cap


def cap_gpu(max_gpu_memory: float | None, device: str) -> None:
    """train.max_gpu_memory: the caching allocator of this process may hold at most that many GiB of `device`
    (torch.cuda.set_per_process_memory_fraction), set before the model loads; a cap above the GPU is refused."""
    if not max_gpu_memory or not device.startswith("cuda"):
        return
    import torch

    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    total = check_cap(max_gpu_memory, index)
    torch.cuda.set_per_process_memory_fraction(max_gpu_memory * 2**30 / total, index)


def check_cap(max_gpu_memory: float | None, index: int | None = None) -> float | None:
    """train.max_gpu_memory against this machine's GPU (`index`, by default this process's): a cap above its memory is
    a one-line ConfigError. Returns the GPU's bytes (None without a GPU: nothing to check against)."""
    import torch

    if not torch.cuda.is_available():
        return None
    total = torch.cuda.get_device_properties(world().local_rank if index is None else index).total_memory
    if max_gpu_memory and max_gpu_memory * 2**30 > total:
        from qtune.errors import ConfigError

        raise ConfigError(f"train.max_gpu_memory={max_gpu_memory:g}: this GPU has {total / 2**30:.2f} GiB; valid: up "
                          "to that, or 0 for all of it")
    return total


# Of the host memory available when the dry run looks, the share the offloaded layer inputs may pin: the training
# process itself (the dataset, the libraries, loading's buffers) needs the rest
HOST_USABLE_SHARE = 0.9


def host_bytes_available() -> float | None:
    """Host memory available now (/proc/meminfo's MemAvailable) x HOST_USABLE_SHARE; None where it cannot be read."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return HOST_USABLE_SHARE * int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
