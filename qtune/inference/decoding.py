"""Batch-1 decoding with the whole one-token step captured as one CUDA graph.

At batch 1 a GPU waits on Python: on an H100 a merged Qwen3-8B's kernels for one token take ~7 ms, while plain
`generate` spends ~47 ms a token launching them one by one (docs/benchmarks.md). Here a step — the forward on a
static KV cache, the repetition penalty, temperature, top-k/top-p and the draw (or argmax) — is compiled (inductor
fuses the small ops, coordinate-descent tuned) and captured once as a CUDA graph; each token is then one
`graph.replay()`. The CPU reads token k only after step k+1 is queued, so the GPU never waits for Python.

Graphs are kept per (cache length, greedy or sampled, top-k); cache lengths are powers of two, so a chat
whose history grows recompiles a handful of times at most. Temperature, top-p, the penalties, the logit bias and
the end-of-text ban (for min_new_tokens) are tensors the graph reads, so changing them costs nothing. A draw with a
generation's own torch.Generator (a seeded request) runs the step eagerly, outside the graph, which reads the
default generator.

`graph=False` runs the same step eagerly — what the tests compare against `generate` on CPU.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict, deque
from typing import Callable

import torch

MIN_CACHE = 1024
KEEP_STEPS = 2         # graphs (each with its KV cache) kept for reuse


def supported(model) -> str | None:
    """Why this decoder cannot run `model` (None when it can; off a GPU it runs eagerly, without graphs)."""
    if getattr(model, "peft_config", None):
        return "an unmerged adapter (merge it for graph decoding)"
    if getattr(model, "is_quantized", False) or getattr(model, "quantization_method", None):
        return "a quantized model"
    if not getattr(model, "_supports_static_cache", True) or getattr(model, "_can_compile_fullgraph", True) is False:
        return "an architecture without a compilable static cache"
    return None


def cache_length(needed: int) -> int:
    n = MIN_CACHE
    while n < needed:
        n *= 2
    return n


class _Step:
    """One static cache and the compiled/captured step that decodes into it."""

    def __init__(self, model, length: int, sample: bool, top_k: int, eos: list[int], graph: bool, forward=None):
        from transformers import StaticCache

        dev = next(model.parameters()).device
        self.model, self.length, self.sample, self.top_k = model, length, sample, top_k
        self.cache = StaticCache(config=model.config, max_cache_len=length)
        vocab = model.get_output_embeddings().weight.shape[0]
        self.token = torch.zeros((1, 1), dtype=torch.long, device=dev)
        self.seen = torch.zeros(vocab, dtype=torch.bool, device=dev)
        self.counts = torch.zeros(vocab, device=dev)                   # each token's count in the generated text
        self.bias = torch.zeros(vocab, device=dev)                     # logit_bias
        self.presence = torch.zeros((), device=dev)
        self.frequency = torch.zeros((), device=dev)
        self.one = torch.ones(1, device=dev)
        self.generator = None                                          # set: draws with it, eagerly
        self.has_eos = bool(eos)
        self.eos = torch.tensor(eos or [0], dtype=torch.long, device=dev)
        self.eos_ban = torch.zeros(len(eos or [0]), device=dev)        # -inf while min_new_tokens is not reached
        self.temperature = torch.ones((), device=dev)
        self.top_p = torch.ones((), device=dev)
        self.penalty = torch.ones((), device=dev)
        self.use_graph = graph
        self.forward = model if forward is None else forward
        self.graph = None

    # the step: forward one token, pick the next, remember it
    def body(self) -> None:
        logits = self.forward(input_ids=self.token, past_key_values=self.cache, use_cache=True).logits[0, -1]
        self.token.copy_(self.pick(logits).view(1, 1))

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        # eager, not compiled: a few small kernels, inside the captured graph all the same
        # tensors index tensors through gather/index_fill: indexing with a 0-d tensor would read it on the CPU
        logits = logits.float()
        # repetition penalty as transformers applies it: divide positive logits, multiply negative ones
        penalised = torch.where(logits > 0, logits / self.penalty, logits * self.penalty)
        logits = torch.where(self.seen, penalised, logits)
        # OpenAI's logit_bias, presence and frequency penalties (over the generated tokens)
        logits = logits + self.bias - self.counts * self.frequency - (self.counts > 0).float() * self.presence
        logits = logits.index_add(0, self.eos, self.eos_ban)
        if not self.sample:
            nxt = logits.argmax().view(1)
        else:
            logits = logits / self.temperature
            if self.top_k:
                logits, index = logits.topk(self.top_k)
            else:
                logits, index = logits.sort(descending=True)
            probs = logits.softmax(-1)
            # top-p: keep the smallest head whose mass reaches top_p (always the first token)
            drop = probs.cumsum(-1) - probs > self.top_p
            probs = probs.masked_fill(drop, 0.0)
            # a draw by the exponential race: argmax(p / E), E ~ Exp(1), is a sample from p (graph-safe, no sync)
            noise = torch.empty_like(probs).exponential_(generator=self.generator)
            nxt = index.gather(0, (probs / noise).argmax().view(1))
        self.seen.index_fill_(0, nxt, True)
        self.counts.index_add_(0, nxt, self.one)
        return nxt

    def start(self, input_ids: torch.Tensor, temperature: float, top_p: float, penalty: float,
              logit_bias: dict | None = None, presence: float = 0.0, frequency: float = 0.0, generator=None) -> int:
        """Prefill the prompt (eagerly) and pick the first token; returns it."""
        for layer in self.cache.layers:
            if layer.is_initialized:
                layer.cumulative_length.zero_()
        self.temperature.fill_(max(temperature, 1e-5))
        self.top_p.fill_(top_p)
        self.penalty.fill_(penalty)
        self.seen.zero_()
        self.seen[input_ids[0]] = True
        self.counts.zero_()
        self.bias.zero_()
        for token, value in (logit_bias or {}).items():
            self.bias[int(token)] = value
        self.presence.fill_(presence)
        self.frequency.fill_(frequency)
        self.generator = generator if self.sample else None
        logits = self.model(input_ids=input_ids, past_key_values=self.cache, use_cache=True).logits[0, -1]
        first = self.pick(logits)
        self.token.copy_(first.view(1, 1))
        return int(first)

    def ban_eos(self, ban: bool) -> None:
        self.eos_ban.fill_(float("-inf") if ban and self.has_eos else 0.0)

    def step(self) -> None:
        if self.generator is not None:   # the graph draws from the default generator
            self.body()
            return
        if self.use_graph and self.graph is None:
            self._capture()
        if self.graph is not None:
            self.graph.replay()
        else:
            self.body()

    def _capture(self) -> None:
        # warm up (compiles) on a side stream, capture, then put the cache, the token and `seen` back as they were
        saved = [layer.cumulative_length.clone() for layer in self.cache.layers]
        token, seen, counts = self.token.clone(), self.seen.clone(), self.counts.clone()
        graph = torch.cuda.CUDAGraph()
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self.body()
            torch.cuda.current_stream().wait_stream(stream)
            with torch.cuda.graph(graph):
                self.body()
            self.graph = graph
        except Exception as e:  # decode on without the graph: slower, still right
            self.use_graph = False
            warnings.warn(f"qtune: decoding without a CUDA graph, capturing the step failed: {str(e)[:200]}")
        finally:
            for layer, length in zip(self.cache.layers, saved):
                layer.cumulative_length.copy_(length)
            self.token.copy_(token)
            self.seen.copy_(seen)
            self.counts.copy_(counts)


class GraphDecoder:
    """Decodes one sequence at a time on a GPU with graph-captured steps (see the module doc)."""

    def __init__(self, model, graph: bool = True, compile: bool = True, lookahead: int = 1,
                 notice: Callable[[str], None] | None = None):
        self.model, self.graph, self.lookahead = model, graph, lookahead
        self.notice = notice if graph and notice else (lambda message: None)
        self.steps: OrderedDict[tuple, _Step] = OrderedDict()
        # One compiled forward for every step; it recompiles per cache length (shapes are static). Coordinate-descent
        # tuning of inductor's fused kernels took a replayed step from 127 to 149 tokens/s on an H100.
        self.forward = (torch.compile(model, dynamic=False, options={"coordinate_descent_tuning": True})
                        if compile else model)
        eos = model.generation_config.eos_token_id
        self.eos = sorted({eos} if isinstance(eos, int) else set(eos or []))

    def _step_for(self, length: int, sample: bool, top_k: int) -> _Step:
        key = (length, sample, top_k if sample else 0)
        if key not in self.steps:
            while len(self.steps) >= KEEP_STEPS:
                self.steps.popitem(last=False)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            if not any(k[0] == length for k in self.steps):
                self.notice(f"compiling the decoding step for a context of up to {length} tokens "
                            "(once per context size; a minute or two for an 8B model)")
            self.steps[key] = _Step(self.model, length, sample, key[2], self.eos, self.graph, self.forward)
        self.steps.move_to_end(key)
        return self.steps[key]

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, on_token: Callable[[int], None],
                 should_stop: Callable[[], bool] = lambda: False, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, repetition_penalty: float = 1.0, min_new_tokens: int = 0,
                 logit_bias: dict | None = None, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                 generator: torch.Generator | None = None) -> tuple[int, str]:
        """Decode up to max_new_tokens after input_ids [1, n]; on_token(id) for each. -> (count, finish reason).
        logit_bias (token id -> added to its logit) and the presence/frequency penalties are OpenAI's; a generator
        (on the model's device) makes the draws its own, repeatable by its seed."""
        sample = temperature > 0
        step = self._step_for(cache_length(input_ids.shape[1] + max_new_tokens), sample, top_k)
        step.ban_eos(min_new_tokens > 0)
        token = step.start(input_ids, temperature, top_p if sample else 1.0, repetition_penalty, logit_bias,
                           presence_penalty, frequency_penalty, generator)
        host = torch.empty(max_new_tokens, dtype=torch.long, pin_memory=step.token.is_cuda)
        pending: deque[tuple[int, torch.cuda.Event | None]] = deque()
        count, launched = 0, 1
        host[0] = token
        pending.append((0, None))
        while pending:
            # keep `lookahead` steps queued on the GPU ahead of the token being read
            while launched < max_new_tokens and len(pending) <= self.lookahead and not should_stop():
                if launched == min_new_tokens:
                    step.ban_eos(False)
                step.step()
                host[launched].copy_(step.token[0, 0], non_blocking=True)
                event = None
                if step.token.is_cuda:
                    event = torch.cuda.Event()
                    event.record()
                pending.append((launched, event))
                launched += 1
            i, event = pending.popleft()
            if event is not None:
                event.synchronize()
            token = int(host[i])
            count += 1
            if token in self.eos and count > min_new_tokens:
                return count, "stop"
            on_token(token)
            if should_stop():
                return count, "stop"
        return count, "length"
