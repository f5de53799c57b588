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
