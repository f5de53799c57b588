"""Only for tests/test_distributed.py: lets accelerate run FSDP2 on CPU processes, which it does not do by itself.

accelerate 1.15 (AcceleratorState.__init__) turns an FSDP plugin into DistributedType.FSDP for multi-accelerator
types only; for CPU processes (MULTI_CPU) it drops the plugin and wraps the model in DDP, and qtune refuses that
(train.distributed=fsdp on CPU is an error). PyTorch itself runs FSDP2 (fully_shard) on CPU with gloo, so with this
one switch set as accelerate sets it for GPUs, qtune's whole FSDP2 path (accelerate's fsdp2_prepare_model, FSDP
checkpoints, the adapter gathered from shards, generation in lockstep) runs on two CPU processes. Python imports this
module at start-up when its folder is on PYTHONPATH.
"""
import accelerate.state as _state

_init = _state.AcceleratorState.__init__


def _fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == _state.DistributedType.MULTI_CPU:
        self.distributed_type = _state.DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        _state.PartialState._shared_state["distributed_type"] = self.distributed_type


_state.AcceleratorState.__init__ = _fsdp_on_cpu
