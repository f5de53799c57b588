"""The failure in pure torch on one CPU process (gloo): a tied embedding and head sharded as one unit, as accelerate
1.15 does (fully_shard([embed, head], reshard_after_forward=False)), a forward that reads head.weight without calling
head (as TRL's fused LM head), two training steps, an evaluation (no_grad forwards), a state dict (a checkpoint), then
a training step.   python3 bench/fsdp_cpu_emulation/partial_group.py native|old|old+fix
  native   this torch as it is (2.13: passes)
  old      grouped hooks as in torch 2.11 (old_torch.py): "aten.embedding.default got mixed torch.Tensor and DTensor"
  old+fix  the same with qtune.training.distributed.unshard_skipped_units on the unit's modules: passes"""
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import fully_shard

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]
mode = sys.argv[1] if len(sys.argv) > 1 else "old"
if mode.startswith("old"):
    import old_torch

    old_torch.install()
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", "29611")
dist.init_process_group("gloo", rank=0, world_size=1)
torch.manual_seed(0)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 8)
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        self.head = nn.Linear(8, 32, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h)
        return torch.log_softmax(h @ self.head.weight.t(), -1)  # head's weight read, head() never called


m = Tied()
m.embed.weight.requires_grad_(False)
for layer in m.layers:
    fully_shard(layer)
fully_shard([m.embed, m.head], reshard_after_forward=False)
fully_shard(m)
if mode == "old+fix":
    from qtune.training.distributed import unshard_skipped_units

    unshard_skipped_units(m, [m.embed, m.head])
opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
ids = torch.randint(0, 32, (2, 5))


def step() -> float:
    m.train()
    loss = -m(ids).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


losses = [step(), step()]
m.eval()
with torch.no_grad():
    m(ids), m(ids)
m.state_dict()
try:
    losses.append(step())
    print(f"{mode}: PASS, losses {losses}")
except RuntimeError as e:
    print(f"{mode}: FAIL, {str(e).splitlines()[0]}")
dist.destroy_process_group()
