"""Checkpointed layer inputs kept in pinned host memory instead of on the GPU (`train.offload_activations`).

With activation checkpointing, what stays on the GPU between the forward and the backward is each decoder
layer's input: layers x tokens x hidden x 2 bytes (2.25 GiB for Qwen3-8B at 8192 tokens). While the decoder
stack runs forward, saved tensors above a size go to pinned host memory on a side stream (the GPU keeps
computing; the caching allocator keeps each source alive until its copy is done), and come back on the compute
stream when the backward needs them, just before that layer is recomputed. Small tensors, parameters and tensors
already on the host stay where they are; the same tensor saved again (RoPE's cos/sin, passed to every layer) is copied once.
"""
from __future__ import annotations

import weakref

import torch

MIN_BYTES = 1 << 20   # below 1 MiB the copy costs more than the memory is worth


class Offloader:
    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device)
        # (data_ptr, shape, strides, version) -> (the tensor, weakly; its packed copy), within one forward. The weak
        # reference tells the same tensor saved again from a new one that the allocator put where a freed one was
        # (same address, shape and version 0): a layer's input is freed once the next layer has it, and a later
        # layer's input of the same shape lands in its block. Matched by the key alone, that later layer would get
        # the earlier one's copy back and be recomputed from the wrong input.
        self.copies: dict = {}
        self.bytes = 0

    def pack(self, t: torch.Tensor):
        if not t.is_cuda or t.numel() * t.element_size() < MIN_BYTES or isinstance(t, torch.nn.Parameter):
            return t                             # (a weight saved for the backward stays where it lives)
        key = (t.data_ptr(), tuple(t.shape), t.stride(), t._version)
        seen = self.copies.get(key)
        if seen is not None and seen[0]() is t:
            return seen[1]
        host = torch.empty(t.shape, dtype=t.dtype, layout=t.layout, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(self.stream):
            host.copy_(t, non_blocking=True)
        t.record_stream(self.stream)             # the allocator keeps t until the copy is done
        done = torch.cuda.Event()
        done.record(self.stream)
        packed = (host, done, t.device)
        self.copies[key] = (weakref.ref(t), packed)
        self.bytes += host.numel() * host.element_size()
        return packed

    @staticmethod
    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        host, done, device = packed
        torch.cuda.current_stream(device).wait_event(done)
        return host.to(device, non_blocking=True)


def install(decoder) -> Offloader:
    """Offload what `decoder` (the model's layer stack, e.g. Qwen3Model) saves during training forwards."""
    offloader = Offloader(next(decoder.parameters()).device)

    def enter(module, args, kwargs):
        if module.training and torch.is_grad_enabled():
            offloader.copies = {}
            hooks = torch.autograd.graph.saved_tensors_hooks(offloader.pack, offloader.unpack)
            hooks.__enter__()
            module._qtune_offload_hooks = hooks

    def leave(module, args, kwargs, output):
        hooks = module.__dict__.pop("_qtune_offload_hooks", None)
        if hooks is not None:
            hooks.__exit__(None, None, None)
            offloader.copies = {}

    decoder.register_forward_pre_hook(enter, with_kwargs=True)
    decoder.register_forward_hook(leave, with_kwargs=True, always_call=True)  # also when the forward raises
    return offloader
