"""Batched decoding: B sequences at once on one static KV cache, each one-token step of the whole batch one CUDA graph
replay — GRPO's rollouts (qtune.stages.grpo) and the building block of batched serving.

Why: a GRPO step samples 64 completions of hundreds of tokens. transformers' `generate` launches every kernel of
every layer from Python for each token; with PEFT's LoRA layers on a 4-bit base that is a few thousand launches a
token, and the GPU waits on them. Here the step — the forward of B tokens on the static cache, temperature, top-k,
top-p and the draw — is captured once per (batch, cache length, top-k, top-p on/off) and replayed.

It runs the model as it is: a training model with its unmerged LoRA adapter on a 4-bit or 16-bit base, qtune's fused
LoRA and grouped-expert functions included. A replay reads the adapter's parameters where they live, so the graph
stays valid across optimizer steps (which update them in place): no merge, no re-capture. No torch.compile: PEFT and
bitsandbytes do not compile whole, and the graph alone removes the launches.

Layout: prompts are left-padded to one length P, so every row writes its next key/value at the same cache position
(transformers' StaticCache writes all rows at one position). The attention mask is qtune's own additive 4-D tensor
(B, 1, 1, L) — transformers takes a 4-D mask as it is — with each row's padding masked, and each row's positions
count its own tokens only, so a left-padded row computes what it would alone. A row that ends (an end-of-text token)
keeps stepping, masked out of the output; the host looks at whether all rows ended every CHECK_EVERY steps only.

`graph=False` runs the same step eagerly: what the CPU tests compare against one-at-a-time greedy decoding.
"""
from __future__ import annotations

import inspect
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch

CHECK_EVERY = 16        # steps between the host's looks at whether every row has ended (each look is one sync)
LENGTH_STEP = 128       # cache lengths are rounded up to a multiple of this
KEEP = 2                # captured steps (each with its cache) kept for reuse


def cache_length(needed: int) -> int:
    return -(-needed // LENGTH_STEP) * LENGTH_STEP


def batch_bucket(n: int) -> int:
    """Batches are padded up to a power of two up to 8, then to a multiple of 8 (fewer graphs to capture)."""
    if n <= 8:
        b = 1
        while b < n:
            b *= 2
        return b
    return -(-n // 8) * 8


def cache_bytes(config, batch: int, length: int, dtype_bytes: int = 2) -> int:
    """The static cache's size: keys and values of every layer for batch x length tokens."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * dim * batch * length * dtype_bytes


@dataclass
class Sampling:
    """One batch's sampling settings: temperature 0 is greedy; top_k 0 and top_p 1 filter nothing."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


def _base(model):
    """The transformers model under PEFT's wrapper (its forward's signature names the cache keyword)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _cache_keyword(model) -> str:
    """transformers 5.2x renamed `past_key_values` to `cache` (the old name warns)."""
    params = inspect.signature(_base(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class _Batch:
    """One static cache of (B, L) and the step that decodes the whole batch into it."""

    def __init__(self, model, batch: int, length: int, top_k: int, nucleus: bool, eos: list[int], pad: int,
                 graph: bool):
        from transformers import StaticCache

        param = next(model.parameters())
        dev = param.device
        self.model, self.batch, self.length, self.top_k, self.nucleus = model, batch, length, top_k, nucleus
        self.dtype = _compute_dtype(model)
        self.keyword = _cache_keyword(model)
        self.cache = StaticCache(config=_base(model).config, max_cache_len=length)
        self.token = torch.zeros((batch, 1), dtype=torch.long, device=dev)
        self.position = torch.zeros((batch, 1), dtype=torch.long, device=dev)
        self.mask = torch.zeros((batch, 1, 1, length), dtype=self.dtype, device=dev)
        self.done = torch.zeros(batch, dtype=torch.bool, device=dev)
        self.clock = torch.zeros(1, dtype=torch.long, device=dev)    # the next cache position every row writes
        self.column = torch.zeros(1, dtype=torch.long, device=dev)   # the output column of the next token
        self.out = torch.zeros((batch, 1), dtype=torch.long, device=dev)
        self.eos = torch.tensor(eos or [-1], dtype=torch.long, device=dev)
        self.pad = pad
        self.temperature = torch.ones((batch, 1), device=dev)
        self.greedy = torch.zeros((batch, 1), dtype=torch.bool, device=dev)
        self.top_p = torch.ones((batch, 1), device=dev)
        self.use_graph, self.graph = graph, None
        self.width = 0          # the output buffer's width (max new tokens); the graph is captured for one width
        self.masked = torch.finfo(self.dtype).min

    # -- the step ------------------------------------------------------------------------------------------------
    def body(self) -> None:
        # the current token's own column becomes visible to every row, then one forward of B tokens
        self.mask.index_fill_(3, self.clock, 0.0)
        logits = self.model(input_ids=self.token, attention_mask=self.mask, position_ids=self.position,
                            use_cache=True, **{self.keyword: self.cache}).logits[:, -1]
        self.clock.add_(1)
        self.position.add_(1)
        self.emit(self.pick(logits))

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        best = logits.argmax(-1, keepdim=True)
        scaled = logits / self.temperature
        if self.top_k:
            scaled, index = scaled.topk(self.top_k, dim=-1)
        elif self.nucleus:
            scaled, index = scaled.sort(dim=-1, descending=True)
        else:
            index = None
        probs = scaled.softmax(-1)
        if self.nucleus:   # top-p: keep the smallest head whose mass reaches top_p (always the first token)
            probs = probs.masked_fill(probs.cumsum(-1) - probs > self.top_p, 0.0)
        # a draw by the exponential race: argmax(p / E), E ~ Exp(1), is a sample from p (no sync, graph-safe)
        drawn = (probs / torch.empty_like(probs).exponential_()).argmax(-1, keepdim=True)
        if index is not None:
            drawn = index.gather(-1, drawn)
        return torch.where(self.greedy, best, drawn)

    def emit(self, nxt: torch.Tensor) -> None:
        nxt = nxt.masked_fill(self.done.unsqueeze(1), self.pad)
        self.out.index_copy_(1, self.column, nxt)
        self.column.add_(1)
        self.done |= (nxt == self.eos).any(-1)
        self.token.copy_(nxt)

    # -- a batch's decoding ------------------------------------------------------------------------------------------
    def start(self, prompts: list[list[int]], width: int, sampling: list[Sampling]) -> None:
        """Prefill the left-padded prompts eagerly and pick each row's first token."""
        b, dev = self.batch, self.token.device
        rows = prompts + [prompts[0]] * (b - len(prompts))   # bucket padding: copies of the first prompt, dropped
        p = max(len(r) for r in rows)
        ids = torch.full((b, p), self.pad, dtype=torch.long)
        real = torch.zeros((b, p), dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, p - len(r):] = torch.tensor(r, dtype=torch.long)
            real[i, p - len(r):] = True
        ids, real = ids.to(dev), real.to(dev)
        for layer in self.cache.layers:
            if layer.is_initialized:
                layer.cumulative_length.zero_()
        # the cache's mask: each row's prompt tokens; the decode steps open one column each
        self.mask.fill_(self.masked)
        self.mask[:, 0, 0, :p].masked_fill_(real, 0.0)
        positions = (real.long().cumsum(-1) - 1).clamp(min=0)
        causal = torch.ones((p, p), dtype=torch.bool, device=dev).tril()
        prefill = torch.full((b, 1, p, self.length), self.masked, dtype=self.dtype, device=dev)
        prefill[:, :, :, :p].masked_fill_(causal & real[:, None, None, :], 0.0)
        rows_s = [sampling[i] if i < len(sampling) else sampling[0] for i in range(b)]
        self.temperature.copy_(torch.tensor([[max(s.temperature, 1e-5)] for s in rows_s]))
        self.greedy.copy_(torch.tensor([[s.temperature <= 0] for s in rows_s]))
        self.top_p.copy_(torch.tensor([[s.top_p] for s in rows_s]))
        if self.width != width or self.out.shape[1] != width:
            self.out = torch.zeros((b, width), dtype=torch.long, device=dev)
            self.graph, self.width = None, width     # the graph wrote into the old buffer
        self.out.fill_(self.pad)
        self.done.zero_()
        self.column.zero_()
        self.clock.fill_(p)
        self.position.copy_(positions[:, -1:] + 1)
        logits = self.model(input_ids=ids, attention_mask=prefill, position_ids=positions, use_cache=True,
                            logits_to_keep=1, **{self.keyword: self.cache}).logits[:, -1]
        self.emit(self.pick(logits))

    def step(self) -> None:
        if self.use_graph and self.graph is None:
            self._capture()
        if self.graph is not None:
            self.graph.replay()
        else:
            self.body()

    def _capture(self) -> None:
        # warm up on a side stream, capture, then put every piece of state back as it was
        state = [self.token, self.position, self.mask, self.done, self.clock, self.column, self.out]
        saved = [t.clone() for t in state]
        lengths = [layer.cumulative_length.clone() for layer in self.cache.layers]
        graph = torch.cuda.CUDAGraph()
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self.body()
                    self.column.sub_(1)   # (stay inside the output buffer however short it is)
            torch.cuda.current_stream().wait_stream(stream)
            with torch.cuda.graph(graph):
                self.body()
            self.graph = graph
        except Exception as e:  # decode on without the graph: slower, still right
            self.use_graph = False
            warnings.warn(f"qtune: batched decoding without a CUDA graph, capturing the step failed: {str(e)[:300]}")
        finally:
            for t, s in zip(state, saved):
                t.copy_(s)
            for layer, n in zip(self.cache.layers, lengths):
                layer.cumulative_length.copy_(n)


def _compute_dtype(model) -> torch.dtype:
    """The dtype activations run in: the embedding's (a 4-bit base keeps its embeddings in 16 bits)."""
    emb = model.get_input_embeddings()
    return emb.weight.dtype if emb is not None and emb.weight.dtype.is_floating_point else torch.float32


class BatchDecoder:
    """Decodes batches of prompts; see the module doc. One per model; captured steps are kept for reuse."""

    def __init__(self, model, graph: bool = True, eos: list[int] | None = None, pad: int | None = None):
        self.model = model
        self.graph = graph and torch.cuda.is_available() and next(model.parameters()).is_cuda
        if eos is None:
            e = getattr(model, "generation_config", None) and model.generation_config.eos_token_id
            eos = [e] if isinstance(e, int) else list(e or [])
        self.eos = sorted(set(eos))
        self.pad = pad if pad is not None else (self.eos[0] if self.eos else 0)
        self.steps: OrderedDict[tuple, _Batch] = OrderedDict()

    def _batch_for(self, batch: int, length: int, top_k: int, nucleus: bool) -> _Batch:
        key = (batch, length, top_k, nucleus)
        if key not in self.steps:
            while len(self.steps) >= KEEP:
                self.steps.popitem(last=False)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            self.steps[key] = _Batch(self.model, batch, length, top_k, nucleus, self.eos, self.pad, self.graph)
        self.steps.move_to_end(key)
        return self.steps[key]

    def release(self) -> None:
        """Free every cache and graph (their memory goes back to the allocator)."""
        self.steps.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int,
                 sampling: Sampling | list[Sampling] = Sampling(temperature=0.0)) -> list[list[int]]:
        """Each prompt's new tokens, up to and including its first end-of-text token (or max_new_tokens of them).
        sampling: one setting for all, or one per prompt (top_k must then be the same for all)."""
        if not prompts:
            return []
        rows = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        top_k = rows[0].top_k
        if any(s.top_k != top_k for s in rows):
            raise ValueError("one top_k per batch")
        nucleus = any(s.top_p < 1.0 and s.temperature > 0 for s in rows)
        length = cache_length(max(len(p) for p in prompts) + max_new_tokens)
        step = self._batch_for(batch_bucket(len(prompts)), length, top_k, nucleus)
        was_training = self.model.training
        self.model.eval()
        try:
            step.start(prompts, max_new_tokens, rows)
            for i in range(1, max_new_tokens):
                if i % CHECK_EVERY == 0 and bool(step.done[:len(prompts)].all()):
                    break
                step.step()
            out = step.out[:len(prompts)].tolist()
        finally:
            self.model.train(was_training)
        eos = set(self.eos)
        result = []
        for row in out:
            end = next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
            result.append(row[:end])
        return result
