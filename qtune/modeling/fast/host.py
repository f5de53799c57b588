"""Frozen weights kept in pinned host memory between their uses, off the GPU's allocator (the fast path on CUDA).

- The input embedding table (with CUDA graphs): a step looks up one row per token, which the GPU reads over the bus
  where the table lies (`embeddings_to_host`).
- The output head (`train.head_on_host`): a step needs all of it, once, at the end of the forward, for the loss and
  its backward. It is copied to the GPU right before that and the copy is freed after the head's backward, so during
  the backward of the layers, where the peak is, it takes no GPU memory (`head_to_host`). Qwen3-30B-A3B's head is
  0.58 GiB, Qwen3-8B's 1.16 GiB; the copy costs one transfer over the bus a forward (~9 ms for 0.58 GiB on an H100),
  made when the loss first reads the head: started earlier, during the last layer's forward, it overlapped little
  of itself and raised the peak by that layer's activations (docs/benchmarks.md).
The weights stay CUDA tensors to every other reader (state_dict, `.device`, a module call): their storage is host
memory mapped into the GPU's address space (unified addressing).
"""
from __future__ import annotations

import torch


def embeddings_to_host(model) -> int:
    """Keep the input embedding's weight in pinned host memory, read by the GPU over the bus; returns the GPU bytes
    freed (0: left as it was). A step looks up one row per token (16 MB at 2048 tokens of Qwen3-8B, ~1 ms over
    PCIe) of a table of 1.16 GiB, so the table need not take GPU memory. Left alone: tied embeddings (the output head
    needs the same weights every step), trainable ones, anything but a plain nn.Embedding, and any machine where a
    probe lookup does not match the GPU copy."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if (type(emb) is not torch.nn.Embedding or emb.weight.device.type != "cuda" or emb.weight.requires_grad
            or (head is not None and head.weight is emb.weight)):
        return 0
    weight = emb.weight
    try:
        view = _mapped(weight.detach().to("cpu").pin_memory(), weight.device)
        probe = torch.randint(0, weight.shape[0], (256,), device=weight.device)
        same = torch.equal(torch.nn.functional.embedding(probe, view), torch.nn.functional.embedding(probe, weight))
    except Exception:  # noqa: BLE001 (no unified addressing here: the table stays on the GPU)
        return 0
    if not same:
        return 0
    emb.weight = torch.nn.Parameter(view, requires_grad=False)
    return weight.numel() * weight.element_size()


def head_to_host(model) -> tuple[int, str]:
    """Keep the output head's weight in pinned host memory (HostedHead), copied to the GPU by every forward of the
    backbone of `model` (a PEFT model or a transformers one); returns the GPU bytes freed and, when 0, why the head
    stays."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    emb, head = base.get_input_embeddings(), base.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return 0, "the output head is not a plain linear layer (LoRA on it, or no vocabulary head)"
    if head.weight.device.type != "cuda":
        return 0, "the output head is not on a CUDA GPU"
    if head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad):
        return 0, "the output head trains"
    if emb is not None and emb.weight is head.weight:
        return 0, "the output head is tied to the input embeddings"
    backbone = base.base_model
    if backbone is base:
        return 0, "the model has no separate backbone to time the copy by"
    weight = head.weight
    host = weight.detach().to("cpu").pin_memory()
    view = _mapped(host, weight.device)
    head.__class__ = HostedHead
    head.__dict__.update(_qtune_host=host, _qtune_copy=None, _qtune_armed=False, _qtune_copies=0)
    head.weight = torch.nn.Parameter(view, requires_grad=False)
    # Hooks on the backbone rather than a wrapper of the model's forward: TRL's trainers put their fused head's forward
    # on the model after qtune has built it, and that forward calls the backbone, then reads `lm_head.weight`
    backbone.register_forward_pre_hook(lambda module, args: head.arm())
    backbone.register_forward_hook(lambda module, args, out: head.release_after_backward(out))
    return weight.numel() * weight.element_size(), ""


class HostedHead(torch.nn.Linear):
    """A frozen output head whose weight is in pinned host memory (head_to_host). `weight` reads as that memory mapped
    into the GPU's address space, except from the start of a backbone's forward to the backward through its output
    (`arm`, `release_after_backward`): there the first read, after the backbone's layers, copies it into a GPU buffer
    and every read returns the buffer. Once the gradient of the backbone's output exists, the head's
    backward has run and the buffer goes back to the allocator, or to the CUDA graph's pool, for the layers' backward.
    A forward without a backward (evaluation) keeps its copy until the next forward starts. A call of the module
    outside that window copies the weight for the call."""

    @property
    def weight(self):
        d = self.__dict__
        if not d["_qtune_armed"]:
            return self._parameters["weight"]
        if d["_qtune_copy"] is None:
            d["_qtune_copy"] = self._copy()
        return d["_qtune_copy"]

    def _copy(self) -> torch.Tensor:
        d = self.__dict__
        d["_qtune_copies"] += 1
        copy = torch.empty(d["_qtune_host"].shape, dtype=d["_qtune_host"].dtype,
                           device=self._parameters["weight"].device)
        return copy.copy_(d["_qtune_host"], non_blocking=True)

    def arm(self) -> None:
        """A backbone's forward starts: the previous copy (if a forward without backward left one) goes."""
        self.__dict__.update(_qtune_armed=True, _qtune_copy=None)

    def _drop(self) -> None:
        self.__dict__.update(_qtune_armed=False, _qtune_copy=None)

    def release_after_backward(self, out) -> None:
        """A backbone's forward returned `out`: drop the copy once the gradient of its hidden states exists."""
        hidden = out[0] if isinstance(out, (tuple, list)) or hasattr(out, "to_tuple") else out
        if torch.is_grad_enabled() and isinstance(hidden, torch.Tensor) and hidden.requires_grad:
            hidden.register_hook(lambda grad: self._drop())

    def forward(self, x):
        if self.__dict__["_qtune_armed"]:
            return torch.nn.functional.linear(x, self.weight, self.bias)
        return torch.nn.functional.linear(x, self._copy(), self.bias)


class _HostArray:
    """A pinned host tensor presented through the CUDA array interface (the pointer is valid on the GPU too)."""

    INT = {1: (torch.int8, "|i1"), 2: (torch.int16, "<i2"), 4: (torch.int32, "<i4"), 8: (torch.int64, "<i8")}

    def __init__(self, host: torch.Tensor):
        self.host = host  # kept alive as long as the CUDA view
        raw_dtype, typestr = self.INT[host.element_size()]
        raw = host.view(raw_dtype)
        self.__cuda_array_interface__ = {"shape": tuple(raw.shape), "typestr": typestr, "data": (raw.data_ptr(), False),
                                         "version": 3, "strides": None}


def _mapped(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    with torch.cuda.device(device):
        return torch.as_tensor(_HostArray(host), device=device).view(host.dtype)
