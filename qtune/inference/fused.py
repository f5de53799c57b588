"""Sibling projections that read the same input (q/k/v, gate/up) computed by one matmul when a forward has a single
token row: a batch-1 decode step then reads one wider weight per group instead of two or three narrow ones, which
the GPU streams faster and with fewer kernels. Other forwards (prefill, batched decode) keep one matmul per layer.

The layers' weights become views of one concatenated tensor (no memory added); each layer keeps its own module, its
own weight (a view) and its PEFT wrapper, so adapters, per-row adapters and state dicts see what they saw before.
"""
import torch
from torch import nn

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _base(layer):
    return layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer


class _Siblings:
    """The layers of one group: the first call of a single-row forward computes every layer's output at once; the
    others take their slices of it when given the same input tensor (else they compute their own)."""

    def __init__(self, layers: list[nn.Linear]):
        self.layers = layers
        with torch.no_grad():
            weight = torch.cat([layer.weight for layer in layers])
            bias = torch.cat([layer.bias for layer in layers]) if layers[0].bias is not None else None
        self.weight, self.bias = weight, bias
        self.spans, start = [], 0
        for layer in layers:
            end = start + layer.out_features
            self.spans.append((start, end))
            layer.weight = nn.Parameter(weight[start:end], requires_grad=False)
            if bias is not None:
                layer.bias = nn.Parameter(bias[start:end], requires_grad=False)
            start = end
        self.x = self.y = None
        for i, layer in enumerate(layers):
            layer.forward = (lambda x, i=i: self.forward(i, x))

    def forward(self, i: int, x: torch.Tensor) -> torch.Tensor:
        layer = self.layers[i]
        if x.shape[:-1].numel() != 1:
            return nn.functional.linear(x, layer.weight, layer.bias)
        if self.x is not x:
            self.x, self.y = x, nn.functional.linear(x, self.weight, self.bias)
        a, b = self.spans[i]
        out = self.y[..., a:b]
        if i == len(self.layers) - 1:      # the group's last layer: let the activations go
            self.x = self.y = None
        return out


def fuse_siblings(model) -> int:
    """Fuse every q/k/v and gate/up group of plain 16-bit linear layers (under PEFT's wrappers too) in `model`, for
    inference only (the fused weights train no more); the number of groups fused. Groups with a quantized layer,
    mixed dtypes or devices, or partial biases are left as they are."""
    fused = 0
    for module in list(model.modules()):
        for names in GROUPS:
            if not all(isinstance(getattr(module, n, None), nn.Module) for n in names):
                continue
            layers = [_base(getattr(module, n)) for n in names]
            if any(type(layer) is not nn.Linear or "forward" in vars(layer) for layer in layers):
                continue
            w = layers[0].weight
            if (any(layer.weight.dtype != w.dtype or layer.weight.device != w.device
                    or layer.in_features != layers[0].in_features for layer in layers)
                    or len({layer.bias is None for layer in layers}) != 1 or not w.dtype.is_floating_point):
                continue
            _Siblings(layers)
            fused += 1
    return fused
