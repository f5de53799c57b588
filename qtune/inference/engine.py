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


# -- continuous batching: requests join and leave a running batch between steps ---------------------------------------

HASH_A = -7046029254386353131     # 0x9E3779B97F4A7C15 as int64: splitmix64's constants
HASH_B = -4658895280553007687     # 0xBF58476D1CE4E5B9
HASH_C = -7723592293110705685     # 0x94D049BB133111EB


def _uniform(seed: torch.Tensor, step: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """A uniform number in (0, 1) for each (row's seed, row's position, token id): splitmix64 over int64, on the
    device, graph-safe. A request's draws then depend on its seed and its own tokens only, never on the other rows
    of the batch or on the order requests arrived in (a seeded request answers the same alone and in company)."""
    x = seed * HASH_A + step * HASH_B + token
    x = x ^ (x >> 30)
    x = x * HASH_B
    x = x ^ (x >> 27)
    x = x * HASH_C
    x = x ^ (x >> 31)
    return (((x >> 40) & 0xFFFFFF).float() + 0.5) / 16777216.0


@dataclass
class Job:
    """One sequence to decode. The engine thread calls on_token(token, logprobs) for each new token (logprobs: None,
    or (the token's log-probability, [(id, log-probability)] of the top ones) when top_logprobs >= 0) and
    on_end(finish_reason) once: "stop" (an end-of-text token), "length" (max_new_tokens, or the cache is full),
    "cancelled" (cancel() was called: a client gone, a stop string seen) or "error: ...". `adapter`: a key that
    Scheduler.adapters understands (None: the model as loaded)."""
    prompt: list
    max_new_tokens: int
    on_token: object
    on_end: object
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict = None
    seed: int | None = None
    top_logprobs: int = -1        # -1: no log-probabilities; 0: the chosen token's; k: and the k most likely
    adapter: object = None
    score_prompt: bool = False    # also the prompt's own log-probabilities (OpenAI's echo): prompt_scores, filled
    #                               before the first on_token, one (log-probability, top) per prompt token after the first

    def __post_init__(self):
        import threading

        self.cancelled = threading.Event()
        self.generated = 0
        self.prompt_scores: list = []

    def cancel(self) -> None:
        self.cancelled.set()


class _Where:
    """Where the next forward writes into the slot cache: every decoding row at its own column (decode), or
    several rows' pieces of prompt, each row at its own columns (prefill). Read by the cache layers; a captured
    graph keeps the mode it was captured in."""
    mode = "decode"
    batch = 1
    slots = columns = None   # prefill: the rows' slots (k,) and each token's column (k, width)
    end = 0                  # prefill: the columns the rows' queries may see


class _SlotLayer:
    """One layer's keys and values for every slot: (slots, heads, length, dim), written per row at the row's own
    column (an index_put the graph replays with the columns it reads from a device tensor)."""
    is_initialized = True
    is_sliding = False
    is_compileable = False

    def __init__(self, slots, heads, length, dim, dtype, device, where: _Where, rows, columns):
        self.keys = torch.zeros((slots, heads, length, dim), dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.where, self.rows, self.columns, self.max_cache_len = where, rows, columns, length

    def update(self, key_states, value_states, *args, **kwargs):
        w = self.where
        if w.mode == "prefill":    # rows' pieces: row i's token j at column w.columns[i, j] of slot w.slots[i]
            at = (w.slots[:, None], slice(None), w.columns)
            self.keys[at] = key_states.transpose(1, 2)
            self.values[at] = value_states.transpose(1, 2)
            return self.keys[w.slots, :, :w.end], self.values[w.slots, :, :w.end]
        b = w.batch
        rows, cols = self.rows[:b], self.columns[:b]
        self.keys[rows, :, cols] = key_states[:, :, 0]
        self.values[rows, :, cols] = value_states[:, :, 0]
        return self.keys[:b], self.values[:b]

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def get_mask_sizes(self, query_length: int):
        return self.max_cache_len, 0


def _slot_cache(config, slots: int, length: int, dtype, device, where, rows, columns):
    from transformers.cache_utils import Cache

    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    layers = [_SlotLayer(slots, heads, length, dim, dtype, device, where, rows, columns)
              for _ in range(config.num_hidden_layers)]
    return Cache(layers=layers)


class Scheduler:
    """Continuous batching over `slots` fixed cache slots of `length` tokens each (serve's engine).

    A thread of its own owns the model. Each turn it (1) gives waiting jobs the lowest free slots, (2) prefills at
    most `chunk` prompt tokens in one forward, the admitted jobs' prompts side by side (several short ones, or one
    chunk of a long one), so prompts never hold the running rows for more than a chunk's worth, and a prompt's last
    chunk picks the job's first token, then (3) decodes one token for every running row: one forward of the first b
    slots (b the batch bucket of the highest running slot), replayed from a CUDA graph captured per (b, variant) on a
    GPU. Rows leave the moment they end or are cancelled; their slot is free for the next job at the next turn.
    Each row has its own position (its own column in its slot), sampling settings, penalties, logit bias and seed
    (draws are a hash of seed, position and token: see _uniform), so a row decodes what it would decode alone.

    `adapters`: an object with `key(job.adapter)` (an int row index, or None when the adapter is not mixable) and
    `select(tensor)` (set each row's adapter for the next forward), or None: then all running rows use the same
    `job.adapter`, and `switch(adapter)` is called while no row runs before a job of another adapter is admitted.
    `overlap` (default: on a GPU): the host reads each step's tokens while the next step runs (_decode).
    """

    def __init__(self, model, slots: int, length: int, eos: list[int], graph: bool | None = None, chunk: int = 512,
                 queue: int = 256, top_logprobs: int = 20, switch=None, adapters=None, notice=None,
                 overlap: bool | None = None):
        import threading
        from collections import deque

        dev = next(model.parameters()).device
        self.model, self.slots, self.length, self.chunk = model, slots, length, chunk
        self.graph = (dev.type == "cuda") if graph is None else graph
        self.dtype = _compute_dtype(model)
        self.keyword = _cache_keyword(model)
        config = _base(model).config
        self.layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
        vocab = model.get_output_embeddings().weight.shape[0]
        self.vocab = vocab
        self.where = _Where()
        z = dict(device=dev)
        self.rows = torch.arange(slots, **z)
        # each row's next write (= its position); a row that runs nothing is parked at column `length`, a scratch
        # column past every real one, so the decode steps it still takes write where no prompt lies
        self.columns = torch.full((slots,), length, dtype=torch.long, **z)
        self.cache = _slot_cache(config, slots, length + 1, self.dtype, dev, self.where, self.rows, self.columns)
        self.masked = torch.finfo(self.dtype).min
        self.mask = torch.full((slots, 1, 1, length + 1), self.masked, dtype=self.dtype, **z)
        self.zero = torch.zeros((), dtype=self.dtype, **z)
        self.token = torch.zeros((slots, 1), dtype=torch.long, **z)
        self.temperature = torch.ones((slots, 1), **z)
        self.greedy = torch.ones((slots, 1), dtype=torch.bool, **z)
        self.top_p = torch.ones((slots, 1), **z)
        self.top_k = torch.full((slots, 1), vocab, dtype=torch.long, **z)
        self.penalty = torch.ones((slots, 1), **z)
        self.presence = torch.zeros((slots, 1), **z)
        self.frequency = torch.zeros((slots, 1), **z)
        self.seed = torch.zeros((slots, 1), dtype=torch.long, **z)
        self.counts = torch.zeros((slots, vocab), **z)
        self.seen = torch.zeros((slots, vocab), dtype=torch.bool, **z)
        self.bias = torch.zeros((slots, vocab), **z)
        self.k = top_logprobs
        self.chosen = torch.zeros((slots, 1), **z)
        self.top_lp = torch.zeros((slots, max(top_logprobs, 1)), **z)
        self.top_id = torch.zeros((slots, max(top_logprobs, 1)), dtype=torch.long, **z)
        self.vocab_ids = torch.arange(vocab, **z)    # token ids, and the ranks of a sorted row's entries
        self.eos = set(eos)
        self.switch, self.adapters, self.notice = switch, adapters, notice or (lambda line: None)
        self.adapter_rows = torch.full((slots,), -1, dtype=torch.long, **z)
        self.current = None                      # the adapter every row uses (no mixing)
        self.running: dict[int, Job] = {}        # slot -> job decoding
        self.filling: dict[int, list] = {}       # slot -> [job, tokens prefilled]
        self.waiting = deque()
        self.max_waiting = queue
        self.graphs: dict[tuple, object] = {}
        self.pool = None
        # On a GPU the host reads a step's tokens while the next step runs (see _decode): two sets of pinned buffers
        # take turns holding what a step picked, so the step after cannot overwrite what the host has not read yet.
        self.overlap = (dev.type == "cuda") if overlap is None else overlap
        self.cuda = dev.type == "cuda"
        k = max(top_logprobs, 1)
        pin = dict(pin_memory=self.cuda)
        self.outbox = [(torch.zeros(slots, dtype=torch.long, **pin), torch.zeros(slots, **pin),
                        torch.zeros((slots, k), **pin), torch.zeros((slots, k), dtype=torch.long, **pin))
                       for _ in range(2)]
        self.turn = 0
        self.pending = None                      # the step launched and not read yet: (jobs, b, logprobs, box, event)
        self.lock = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._loop, name="qtune-scheduler", daemon=True)
        self.thread.start()

    # -- the host's side ------------------------------------------------------------------------------------------
    def submit(self, job: Job) -> bool:
        """Queue a job; False when the queue is full (the caller answers 429) or the scheduler is closed."""
        if len(job.prompt) + 1 > self.length:
            raise ValueError(f"the prompt is {len(job.prompt)} tokens; a slot holds {self.length}")
        with self.lock:
            if self.closed or len(self.waiting) >= self.max_waiting:
                return False
            self.waiting.append(job)
            self.lock.notify()
        return True

    def capture(self) -> int:
        """One warm-up prefill, then capture the greedy decode step of every batch bucket now (serve does so before
        it listens), so that no request waits for either; the buckets captured. Other variants (sampling,
        log-probabilities) are captured when first needed. Call it before any job runs."""
        if not self.graph:
            return 0
        with self.lock, torch.no_grad():
            self._warm_prefill()
            sizes = sorted({min(batch_bucket(n), self.slots) for n in range(1, self.slots + 1)})
            for b in sizes:
                key = (b, False, False, False)
                if key in self.graphs:
                    continue
                self.where.mode, self.where.batch = "decode", b
                if self.adapters is not None:
                    self.adapters.select(self.adapter_rows[:b])
                self.graphs[key] = self._capture(*key)
                if self.graphs[key] is None:
                    return len([g for g in self.graphs.values() if g is not None])
            torch.cuda.synchronize()
        return len(sizes)

    def _warm_prefill(self) -> None:
        """Two prefills through the engine's own path, their slots free again after: a short prompt alone, then
        up to 8 prompts side by side filling a chunk. What a first forward pays once (library handles, kernels
        loaded or compiled: over a second on an H200), and a first prefill of many tokens (0.4 s more with
        liger-kernel), is paid before serve listens, not by its first requests."""
        rows = max(1, min(8, self.slots))
        width = max(1, min(self.chunk // rows, self.length - 1))
        for k, n in ((1, min(16, self.length - 1)), (rows, width)):
            for slot in range(k):
                self.filling[slot] = [Job(prompt=[0] * n, max_new_tokens=1, on_token=lambda t, lp: None,
                                          on_end=lambda reason: None), 0]
            while self.filling:
                self._prefill_chunk(self.chunk)

    def load(self) -> dict:
        with self.lock:
            return dict(running=len(self.running) + len(self.filling), waiting=len(self.waiting), slots=self.slots)

    def close(self, timeout: float = 5.0) -> None:
        """Cancel everything and stop the thread."""
        with self.lock:
            self.closed = True
            for job in list(self.waiting) + list(self.running.values()) + [f[0] for f in self.filling.values()]:
                job.cancel()
            self.lock.notify()
        self.thread.join(timeout)

    # -- the engine thread ------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            with torch.no_grad():
                while True:
                    with self.lock:
                        while not (self.closed or self.waiting or self.running or self.filling):
                            self.lock.wait()
                        if self.closed and not (self.running or self.filling):
                            for job in self.waiting:
                                job.on_end("cancelled")
                            self.waiting.clear()
                            return
                        self._admit()
                    self._drop_cancelled()
                    budget = self.chunk      # prompt tokens prefilled this turn, over as many admitted jobs
                    while self.filling and budget > 0:
                        budget -= self._prefill_chunk(budget)
                    if self.running:
                        self._decode()
                    elif self.pending is not None:
                        self._read(self.pending)     # every row it ran has ended: its tokens go nowhere
                        self.pending = None
        except BaseException as e:   # every job learns of it; the server answers 500 for them
            import traceback

            self.notice("qtune: the decoding engine stopped: " + "".join(traceback.format_exception_only(e)).strip())
            with self.lock:
                self.closed = True
                jobs = list(self.waiting) + list(self.running.values()) + [f[0] for f in self.filling.values()]
                self.waiting.clear()
                self.running.clear()
                self.filling.clear()
            for job in jobs:
                job.on_end(f"error: {type(e).__name__}: {e}")

    def _admit(self) -> None:
        used = set(self.running) | set(self.filling)
        free = [s for s in range(self.slots) if s not in used]
        while self.waiting and free:
            job = self.waiting[0]
            if job.cancelled.is_set():
                self.waiting.popleft()
                job.on_end("cancelled")
                continue
            if self.adapters is None or self.adapters.key(job.adapter) is None:
                if used and job.adapter != self.current:
                    return        # its adapter is another: it waits until the running rows are done
                if job.adapter != self.current or not used:
                    if self.switch is not None:
                        self.switch(job.adapter)
                    self.current = job.adapter
            self.waiting.popleft()
            slot = free.pop(0)
            used.add(slot)
            self.filling[slot] = [job, 0]

    def _drop_cancelled(self) -> None:
        for slot, job in list(self.running.items()):
            if job.cancelled.is_set():
                self._end(slot, job, "cancelled")
        for slot, (job, _) in list(self.filling.items()):
            if job.cancelled.is_set():
                del self.filling[slot]
                job.on_end("cancelled")

    def _end(self, slot: int, job: Job, reason: str) -> None:
        self.running.pop(slot, None)
        self.columns[slot] = self.length
        job.on_end(reason)

    def _start_row(self, slot: int, job: Job) -> None:
        s = slot
        self.mask[s].fill_(self.masked)
        self.temperature[s] = max(job.temperature, 1e-5)
        self.greedy[s] = job.temperature <= 0
        self.top_p[s] = job.top_p
        self.top_k[s] = job.top_k if job.top_k and job.top_k > 0 else self.vocab
        self.penalty[s] = job.repetition_penalty
        self.presence[s] = job.presence_penalty
        self.frequency[s] = job.frequency_penalty
        seed = job.seed
        if seed is None:
            import random

            seed = random.getrandbits(62)
        self.seed[s] = int(seed) % (2 ** 63)
        self.counts[s].zero_()
        self.seen[s].zero_()
        self.seen[s, torch.tensor(job.prompt, dtype=torch.long, device=self.seen.device)] = True
        self.bias[s].zero_()
        for token, value in (job.logit_bias or {}).items():
            self.bias[s, int(token)] = value
        if self.adapters is not None:
            key = self.adapters.key(job.adapter)
            self.adapter_rows[s] = -1 if key is None else key

    def _prefill_chunk(self, budget: int) -> int:
        """Prefill the filling jobs, lowest slots first, in one forward of up to `budget` prompt tokens (the rows
        padded to the longest piece count in full); the number of tokens taken. A job that scores its prompt
        (echo) goes alone: it keeps every position's logits."""
        picks, width = [], 0               # (slot, job, start, n); the longest piece
        for slot in sorted(self.filling):
            job, done = self.filling[slot]
            if job.score_prompt and picks:
                break
            n = min(len(job.prompt) - done, self.chunk, budget)
            if picks and (len(picks) + 1) * max(width, n) > budget:
                break
            picks.append((slot, job, done, n))
            width = max(width, n)
            if job.score_prompt:
                break
        dev = self.token.device
        for slot, job, done, _ in picks:
            if done == 0:
                self._start_row(slot, job)
        k = len(picks)
        slots = torch.tensor([p[0] for p in picks], dtype=torch.long, device=dev)
        starts = torch.tensor([p[2] for p in picks], dtype=torch.long, device=dev)
        ids = torch.tensor([p[1].prompt[p[2]:p[2] + p[3]] + [0] * (width - p[3]) for p in picks], dtype=torch.long,
                           device=dev)
        # a row's padding writes past its piece, at columns no query sees before the row's own writes replace them
        # (the scratch column `length` takes what would fall past the cache)
        positions = starts[:, None] + torch.arange(width, device=dev)
        end = min(max(p[2] for p in picks) + width, self.length + 1)
        # query j of a row sees every column up to its own: the row's earlier chunks, then its piece causally
        visible = torch.arange(end, device=dev)[None, None, :] <= positions[:, :, None]
        mask = torch.full((k, 1, width, end), self.masked, dtype=self.dtype, device=dev)
        mask.masked_fill_(visible[:, None], 0.0)
        columns = positions.clamp(max=self.length)
        w = self.where
        w.mode, w.slots, w.columns, w.end = "prefill", slots, columns, end
        if self.adapters is not None:
            self.adapters.select(self.adapter_rows[slots])
        lasts = sorted({p[3] - 1 for p in picks})
        keep = 0 if picks[0][1].score_prompt else torch.tensor(lasts, dtype=torch.long, device=dev)
        try:
            with self._prefill_attention():
                logits = self.model(input_ids=ids, attention_mask=self._masks(mask),
                                    position_ids=columns, use_cache=True,
                                    logits_to_keep=keep, **{self.keyword: self.cache}).logits
        finally:
            w.mode = "decode"
        picked, ended = [], {}
        for i, (slot, job, done, n) in enumerate(picks):
            self.mask[slot, 0, 0, done:done + n] = 0.0
            if job.score_prompt:
                self._score(job, logits[i], done)
                row = logits[i, n - 1:n]
            else:
                row = logits[i, lasts.index(n - 1)].unsqueeze(0)
            if done + n < len(job.prompt):
                self.filling[slot][1] = done + n
                continue
            del self.filling[slot]
            self.columns[slot] = done + n
            nxt = self._pick(row, slice(slot, slot + 1), logprobs=job.top_logprobs >= 0)
            self.token[slot] = nxt[0]
            self.running[slot] = job
            picked.append(nxt.view(-1))
            ended[slot] = job
        if ended:
            tokens = torch.cat(picked).tolist()
            for (slot, job), t in zip(ended.items(), tokens):
                self._emit({slot: job}, [t], slot)
        return k * width

    def _prefill_attention(self):
        """A prefill's attention without cuDNN's kernel on a GPU: cuDNN plans its kernel for each new shape (rows,
        width, columns), 60-90 ms on an H200, and a prefill's shape is new nearly every time, where PyTorch's
        memory-efficient kernel takes any shape as it comes. The decode steps keep cuDNN's: their shapes are the
        captured buckets."""
        import contextlib

        if not self.cuda:
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])

    def _score(self, job: Job, logits: torch.Tensor, done: int) -> None:
        """The log-probability of each next prompt token under this chunk's logits, and the top ones."""
        ahead = job.prompt[done + 1:done + 1 + logits.shape[0]]
        if not ahead:
            return
        lp = logits[:len(ahead)].float().log_softmax(-1)
        chosen = lp.gather(-1, torch.tensor(ahead, device=lp.device).unsqueeze(1))[:, 0].tolist()
        k = max(job.top_logprobs, 0)
        top = lp.topk(k, dim=-1) if k else None
        values, ids = (top.values.tolist(), top.indices.tolist()) if top is not None else ([[]] * len(ahead),) * 2
        job.prompt_scores += [(c, list(zip(i, v))) for c, i, v in zip(chosen, ids, values)]

    def _masks(self, mask):
        return {kind: mask for kind in self.layer_types} if len(self.layer_types) > 1 else mask

    def _pick(self, logits: torch.Tensor, rows: slice, logprobs: bool, sample: bool = True,
              sort: bool = True) -> torch.Tensor:
        """The next token of each row in `rows` from its logits, as generate's processors would: the repetition
        penalty, OpenAI's bias and penalties, then greedy, or temperature, top-k, top-p and a draw."""
        x = logits.float()
        seen = self.seen[rows]
        x = torch.where(seen, torch.where(x > 0, x / self.penalty[rows], x * self.penalty[rows]), x)
        counts = self.counts[rows]
        x = x + self.bias[rows] - counts * self.frequency[rows] - (counts > 0).float() * self.presence[rows]
        nxt = x.argmax(-1, keepdim=True)
        if sample:
            scaled = x / self.temperature[rows]
            if sort:
                scaled, index = scaled.sort(dim=-1, descending=True)
                probs = scaled.softmax(-1)
                probs = probs.masked_fill(self.vocab_ids >= self.top_k[rows], 0.0)
                probs = probs.masked_fill(probs.cumsum(-1) - probs > self.top_p[rows], 0.0)
            else:
                index = None
                probs = scaled.softmax(-1)
            tokens = self.vocab_ids if index is None else index
            # the exponential race: argmax(p / E), E = -log(U) ~ Exp(1), is a draw from p
            e = -torch.log(_uniform(self.seed[rows], self.columns[rows].unsqueeze(1), tokens))
            drawn = (probs / e).argmax(-1, keepdim=True)
            if index is not None:
                drawn = index.gather(-1, drawn)
            nxt = torch.where(self.greedy[rows], nxt, drawn)
        if logprobs:
            lp = x.log_softmax(-1)
            self.chosen[rows] = lp.gather(-1, nxt)
            if self.k:
                top = lp.topk(self.k, dim=-1)
                self.top_lp[rows] = top.values
                self.top_id[rows] = top.indices
        self.counts[rows].scatter_add_(1, nxt, torch.ones_like(nxt, dtype=self.counts.dtype))
        self.seen[rows].scatter_(1, nxt, True)
        return nxt

    def _variant(self, b: int) -> tuple:
        jobs = [j for s, j in self.running.items() if s < b]
        sample = any(j.temperature > 0 for j in jobs)
        sort = sample and any(j.temperature > 0 and (j.top_p < 1 or (j.top_k or 0) > 0) for j in jobs)
        logprobs = any(j.top_logprobs >= 0 for j in jobs)
        return b, sample, sort, logprobs

    def _body(self, b: int, sample: bool, sort: bool, logprobs: bool) -> None:
        rows, cols = self.rows[:b], self.columns[:b]
        # each row's own column becomes visible to it, then one forward of b tokens
        self.mask[rows, 0, 0, cols] = self.zero
        self.mask[:b, :, :, self.length:] = self.masked     # the scratch column stays hidden from every row
        logits = self.model(input_ids=self.token[:b], attention_mask=self._masks(self.mask[:b]),
                            position_ids=cols.unsqueeze(1), use_cache=True,
                            **{self.keyword: self.cache}).logits[:, -1]
        self.columns[:b] = (cols + 1).clamp(max=self.length)
        nxt = self._pick(logits, slice(0, b), logprobs, sample, sort)
        self.token[:b] = nxt

    def _decode(self) -> None:
        b = batch_bucket(max(self.running) + 1)
        b = min(b, self.slots)
        key = self._variant(b)
        self.where.mode, self.where.batch = "decode", b
        if self.adapters is not None:
            self.adapters.select(self.adapter_rows[:b])
        g = self.graphs.get(key)
        if g is None and self.graph and key not in self.graphs:
            g = self.graphs[key] = self._capture(*key)
        if g is not None:
            g.replay()
        else:
            self._body(*key)
        # What the step picked goes to pinned host memory behind it, in stream order. On a GPU the host then reads
        # the step before this one, whose copy is done or nearly, while this one runs: the host's share of a step
        # (emitting tokens, streaming, admitting) overlaps the GPU's instead of following it. The rows that ended at
        # that earlier step took one more step here; its tokens are dropped (a row's slot, counts and mask are reset
        # when a job takes it, and an ended row is parked at the scratch column).
        box = self.outbox[self.turn]
        self.turn ^= 1
        box[0][:b].copy_(self.token[:b, 0], non_blocking=True)
        if key[3]:
            box[1][:b].copy_(self.chosen[:b, 0], non_blocking=True)
            box[2][:b].copy_(self.top_lp[:b], non_blocking=True)
            box[3][:b].copy_(self.top_id[:b], non_blocking=True)
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
        step = (dict(self.running), b, key[3], box, event)
        if self.overlap:
            step, self.pending = self.pending, step
        if step is not None:
            self._read(step)

    def _read(self, step) -> None:
        """Hand the rows of a launched step that still run the tokens it picked."""
        jobs, b, logprobs, box, event = step
        if event is not None:
            event.synchronize()
        jobs = {slot: job for slot, job in jobs.items() if self.running.get(slot) is job}
        if jobs:
            lps = (box[1][:b].tolist(), box[2][:b].tolist(), box[3][:b].tolist()) if logprobs else None
            self._emit(jobs, box[0][:b].tolist(), 0, lps)

    def _emit(self, jobs: dict, tokens: list, first: int, lps=None) -> None:
        """Hand each running row its new token; end the rows that are done."""
        if lps is None and any(j.top_logprobs >= 0 for j in jobs.values()):
            lps = (self.chosen[:, 0].tolist(), self.top_lp.tolist(), self.top_id.tolist())
        for slot, job in jobs.items():
            t = tokens[slot - first]
            job.generated += 1
            lp = None
            if lps is not None and job.top_logprobs >= 0:
                k = job.top_logprobs
                lp = (lps[0][slot], list(zip(lps[2][slot][:k], lps[1][slot][:k])))
            job.on_token(t, lp)
            if t in self.eos:
                self._end(slot, job, "stop")
            elif job.generated >= job.max_new_tokens or len(job.prompt) + job.generated >= self.length:
                self._end(slot, job, "length")

    def _capture(self, b, sample, sort, logprobs):
        """Capture one decode step of the first b slots; None (and eager steps from then on) when it cannot be."""
        state = [self.mask, self.columns, self.token, self.counts, self.seen, self.chosen, self.top_lp, self.top_id]
        saved = [t.clone() for t in state]
        layers = [(layer.keys[:b].clone(), layer.values[:b].clone()) for layer in self.cache.layers]
        try:
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._body(b, sample, sort, logprobs)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self._body(b, sample, sort, logprobs)
            return graph
        except Exception as e:  # decode on without graphs: slower, still right
            self.graph = False
            self.notice(f"qtune serve: decoding without CUDA graphs, capturing the step failed: {str(e)[:300]}")
            return None
        finally:
            for t, s in zip(state, saved):
                t.copy_(s)
            for layer, (k, v) in zip(self.cache.layers, layers):
                layer.keys[:b].copy_(k)
                layer.values[:b].copy_(v)
