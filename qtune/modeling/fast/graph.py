"""A training micro-step (forward, loss and backward) as one CUDA graph (`train.cuda_graphs`).

Why: a QLoRA step of an 8B model at 2048 tokens is bound by the host. Python issues ~20k kernels a step, slower
than an H100 runs them (docs/benchmarks.md: 700 ms a step against 330 ms of kernels). Replaying a captured graph
issues the same kernels with no Python, so the step takes as long as its kernels.

What it takes, and what this module does about it:
  - static shapes: qtune packs rows (data.packing) and TRL's padding-free collator makes one row of at most
    batch_size x max_length tokens; each batch is copied into fixed buffers, and the rest of the row is padding
    that is its own sequence (position ids from 0) with no labels;
  - no host syncs inside the step: TRL's fused output head selects the labelled positions with a boolean index
    (a sync); during capture it scores every position instead, the unlabelled ones masked to zero, which is the
    same loss. transformers skips its own mask checks while a stream is captured;
  - the same dropout masks in the checkpoint's recompute: qtune's seeded dropout (qtune.modeling.fast.dropout)
    reads the step's seed from device memory, refreshed before every replay;
  - gradients: the graph writes them into its own buffers; after a replay they become the parameters' `.grad`
    (one accumulation step) or are added to them (gradient accumulation), as autograd would have.
  - attention: with varlen attention (qtune.modeling.fast.attention) the batch's sequence boundaries go into a buffer
    of the graph's, sized for the most sequences a prepared row holds, padded with empty sequences;
  - MoE: the grouped-matmul experts (qtune.modeling.fast.experts) route without a host sync and grouped matmuls capture,
    so an MoE step is captured the same way; the router's load-balancing loss is added as TRL adds it.
What stays outside the graph: the data loader, the optimizer step, gradient clipping, the scheduler and logging,
all once a step rather than once a layer. TRL's per-step metrics (entropy, token accuracy) are computed in the
graph and read when the trainer logs, not with a sync every micro-step.
"""
from __future__ import annotations

import contextlib

import torch

# What a padding-free SFT batch holds: the model's inputs, and hints for varlen attention kernels that sdpa does not read
INPUTS = {"input_ids", "labels", "position_ids"}
HINTS = {"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx", "use_cache"}
WARMUPS = 2  # eager steps on a side stream before capture (cuBLAS workspaces, Triton compiles, allocator pools)


@contextlib.contextmanager
def _every_position():
    """TRL's fused head scores every position (no boolean indexing) while the graph is captured."""
    import trl.trainer.utils as trl_utils

    before = trl_utils._use_triton
    trl_utils._use_triton = lambda device: False
    try:
        yield
    finally:
        trl_utils._use_triton = before


class GraphedStep:
    """One micro-step of `model` (a PEFT causal LM with TRL's fused head) on rows of at most `tokens` tokens, captured
    at the first `step()` and replayed after."""

    def __init__(self, model, tokens: int, seed, pad_id: int, dtype=torch.bfloat16, sequences: int = 0,
                 aux: bool = False):
        """sequences: with varlen attention (qtune.modeling.fast.attention), the most sequences a row may hold, the
        padding included (the graph's boundary buffer has room for that many); 0: the model attends through sdpa.
        aux: an MoE model's load-balancing loss is added, as TRL adds it (its weight is given to each step())."""
        device = next(model.parameters()).device
        self.model, self.tokens, self.seed, self.pad_id, self.dtype = model, tokens, seed, pad_id, dtype
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.ids = torch.full((1, tokens), pad_id, dtype=torch.long, device=device)
        self.labels = torch.full((1, tokens), -100, dtype=torch.long, device=device)
        self.pos = torch.arange(tokens, device=device).unsqueeze(0)
        self.arange = torch.arange(tokens, device=device)
        self.count = torch.zeros((), dtype=torch.float32, device=device)   # num_items_in_batch; 0: this row's labels
        self.scale = torch.ones((), dtype=torch.float32, device=device)    # 1 / accumulation steps, or 1
        self.aux = torch.zeros((), dtype=torch.float32, device=device) if aux else None  # the balancing loss's weight
        # sequence boundaries for varlen attention: the batch's, then the padding's end repeated (empty sequences)
        self.cu = torch.full((sequences + 1,), tokens, dtype=torch.int32, device=device) if sequences else None
        self.graph = None
        self.out = None        # (scaled loss, entropy sum, top-1 hits, labelled positions), written by every replay
        self.grads = None      # the graph's gradient buffers, one per trainable parameter (None: no gradient)
        self.acc = None        # accumulation buffers (gradient accumulation only)

    def fits(self, inputs) -> str | None:
        """Why this batch cannot replay the graph, or None."""
        keys = set(inputs) - HINTS
        if keys != INPUTS:
            return f"a batch with {', '.join(sorted(keys))} (the graph takes {', '.join(sorted(INPUTS))})"
        ids = inputs["input_ids"]
        if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] > self.tokens:
            return f"a batch of shape {tuple(ids.shape)} (the graph holds one row of up to {self.tokens} tokens)"
        if self.cu is not None:
            cu = inputs.get("cu_seq_lens_q")
            if cu is None:
                return "a batch without sequence boundaries (cu_seq_lens_q)"
            held = cu.numel() - 1 + (ids.shape[1] < self.tokens)
            if held > self.cu.numel() - 1:
                return f"a row of {held} sequences (the graph holds up to {self.cu.numel() - 1})"
        return None

    def _load(self, inputs, count, scale: float, aux: float = 0.0) -> None:
        n = inputs["input_ids"].shape[1]
        self.ids[:, :n].copy_(inputs["input_ids"], non_blocking=True)
        self.labels[:, :n].copy_(inputs["labels"], non_blocking=True)
        self.pos[:, :n].copy_(inputs["position_ids"], non_blocking=True)
        if n < self.tokens:  # the rest of the row: padding, a sequence of its own without labels
            self.ids[:, n:].fill_(self.pad_id)
            self.labels[:, n:].fill_(-100)
            self.pos[0, n:].copy_(self.arange[:self.tokens - n])
        if self.cu is not None:
            cu = inputs["cu_seq_lens_q"]
            self.cu[:cu.numel()].copy_(cu, non_blocking=True)
            self.cu[cu.numel():].fill_(self.tokens)
        if count is None:
            self.count.zero_()
        else:
            self.count.copy_(torch.as_tensor(count, dtype=torch.float32), non_blocking=True)
        self.scale.fill_(scale)
        if self.aux is not None:
            self.aux.fill_(aux)

    def _body(self):
        """The micro-step as TRL's SFT loss computes it (qtune.modeling.fast.graph's notes for the differences)."""
        with torch.autocast("cuda", dtype=self.dtype, cache_enabled=False), _every_position():
            extra = {} if self.cu is None else dict(cu_seq_lens_q=self.cu, cu_seq_lens_k=self.cu,
                                                    max_length_q=self.tokens, max_length_k=self.tokens)
            if self.aux is not None:
                extra["output_router_logits"] = True
            out = self.model(input_ids=self.ids, position_ids=self.pos, labels=self.labels, fused_lm_head=True,
                             use_cache=False, **extra)
        valid = out.label_mask.sum()
        count = torch.where(self.count > 0, self.count, valid.float()).clamp(min=1)
        loss = -out.log_probs.sum() / count
        balance = None
        if self.aux is not None:
            aux_loss = out.aux_loss.float()
            balance = aux_loss.detach()
            loss = loss + self.aux * aux_loss
        loss = loss * self.scale
        loss.backward()
        entropy = out.entropy.detach().sum() if out.entropy is not None else torch.zeros_like(count)
        top1 = out.is_top1.sum() if out.is_top1 is not None else torch.zeros_like(valid)
        return loss.detach(), entropy, top1, valid, balance

    def capture(self, inputs, count, scale: float, aux: float = 0.0) -> None:
        """WARMUPS eager steps on a side stream, then the capture; their gradients are dropped and the ones the
        trainer held before are kept."""
        held = [p.grad for p in self.params]
        self._load(inputs, count, scale, aux)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):
                for _ in range(WARMUPS):
                    for p in self.params:
                        p.grad = None
                    self._body()
            torch.cuda.current_stream().wait_stream(side)
            for p in self.params:
                p.grad = None
            # the warm-up steps' blocks, cached by the allocator, go back to the GPU so that the graph's own pool can
            # take that memory (else a step holds both)
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            graph = torch.cuda.CUDAGraph()
            self.seed.frozen = True  # a refresh now would bake one seed into every replay
            try:
                with torch.cuda.graph(graph):
                    self.out = self._body()
            finally:
                self.seed.frozen = False
            self.graph = graph
            self.grads = [p.grad for p in self.params]
        finally:
            for p, g in zip(self.params, held):
                p.grad = g

    def step(self, inputs, count, scale: float, accumulating: bool, aux: float = 0.0) -> torch.Tensor:
        """Replay on this batch (capturing first if needed); returns the scaled loss as the trainer's step does.
        `accumulating`: gradient accumulation is on, so the gradients are added to buffers of their own. `aux`: the
        weight of an MoE model's balancing loss in this step's loss (as TRL weighs it)."""
        if self.graph is None:
            self.capture(inputs, count, scale, aux)
        self._load(inputs, count, scale, aux)
        self.seed.refresh()
        held = [p.grad for p in self.params]
        if any(h is not None and h is g for h, g in zip(held, self.grads)):
            raise RuntimeError("qtune bug: the trainer kept the CUDA graph's gradient buffers across steps")
        self.graph.replay()
        pairs = [(p, h, g) for p, h, g in zip(self.params, held, self.grads) if g is not None]
        if all(h is None for _, h, _ in pairs):
            if accumulating:
                if self.acc is None:
                    self.acc = [torch.empty_like(g) for _, _, g in pairs]
                torch._foreach_copy_(self.acc, [g for _, _, g in pairs])
                for (p, _, _), a in zip(pairs, self.acc):
                    p.grad = a
            else:  # one micro-step a step: the optimizer reads the graph's buffers, the next replay rewrites them
                for p, _, g in pairs:
                    p.grad = g
        else:
            for p, h, g in pairs:
                if h is None:
                    p.grad = g.clone()
            torch._foreach_add_([h for _, h, _ in pairs if h is not None], [g for _, h, g in pairs if h is not None])
        return self.out[0].clone()

    def metrics(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """This replay's mean entropy and top-1 accuracy over the labelled positions, and the MoE balancing loss (device
        tensors, no sync)."""
        _, entropy, top1, valid, balance = self.out
        n = valid.clamp(min=1).float()
        return entropy / n, top1.float() / n, balance


def trainer_class(base):
    """`base` (TRL's SFTTrainer) replaying a GraphedStep for every batch it fits; the others run as `base` runs them.
    The trainer's `qtune_graph` is set after construction (qtune.training.trainers.build_trainer)."""

    class Graphed(base):
        qtune_graph: GraphedStep | None = None

        def training_step(self, model, inputs, num_items_in_batch=None):
            graph = self.qtune_graph
            why = graph.fits(inputs) if graph is not None else "off"
            if why is not None:
                if graph is not None and why not in self.qtune_notes:
                    self.qtune_notes.add(why)
                    self.qtune_note(f"train.cuda_graphs: {why} runs without the graph")
                return super().training_step(model, inputs, num_items_in_batch)
            model.train()
            if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
                self.optimizer.train()
            inputs = self._prepare_inputs(inputs)
            if graph.graph is None:
                graph.model = model  # the model as the trainer calls it (accelerate's wrapper, if any)
            scaled = self.loss_is_scaled_for_ga
            if scaled is None:  # as Trainer.training_step decides whether to divide by the accumulation steps
                scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) \
                    or self.compute_loss_func is not None
            steps = self.current_gradient_accumulation_steps
            # TRL's weight of the MoE balancing loss: its coefficient, over the accumulation steps when the loss is
            # divided by num_items_in_batch (then Trainer leaves the accumulation to the loss)
            aux = self.router_aux_loss_coef / (steps if num_items_in_batch is not None else 1) \
                if graph.aux is not None else 0.0
            try:
                loss = graph.step(inputs, num_items_in_batch, 1.0 if scaled else 1.0 / steps,
                                  accumulating=self.args.gradient_accumulation_steps > 1, aux=aux)
            except torch.OutOfMemoryError:
                raise
            except Exception as e:  # noqa: BLE001 (a step torch cannot capture: the run goes on eagerly)
                if graph.graph is not None:
                    raise               # a failing replay is not a capture problem
                self.qtune_graph = None
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                self.qtune_note(f"train.cuda_graphs: the capture failed ({type(e).__name__}: {first[:200]}); "
                                "training goes on without the graph")
                return super().training_step(model, inputs, num_items_in_batch)
            entropy, accuracy, balance = graph.metrics()
            self._metrics["train"]["entropy"].append(entropy.clone())
            self._metrics["train"]["mean_token_accuracy"].append(accuracy.clone())
            if balance is not None:
                self._metrics["train"]["aux_loss"].append(balance.clone())
            self._total_train_tokens += inputs["position_ids"].size(1)
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            return loss

        def log(self, logs, *args, **kwargs):
            for values in self._metrics.values():  # the graph's metrics are device tensors until now: one sync a log
                for key, v in values.items():
                    values[key] = [float(x) if isinstance(x, torch.Tensor) else x for x in v]
            return super().log(logs, *args, **kwargs)

    Graphed.__name__ = base.__name__
    return Graphed


def attach(trainer, rows: int, row_length: int, tokenizer, note) -> None:
    """Give a trainer_class() trainer its GraphedStep (captured at the first batch it fits) for batches of `rows` packed
    rows of `row_length` tokens; `note(line)` tells, once per reason, why a batch ran without it."""
    from qtune.modeling.fast import attention, attention_of
    from qtune.modeling.fast.lora import seed_of

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    trainer.qtune_notes, trainer.qtune_note = set(), note
    model = trainer.model
    varlen = attention_of(model) == attention.NAME
    sequences = rows * most_sequences(trainer.train_dataset) + 1 if varlen else 0  # + 1: the padding
    trainer.qtune_graph = GraphedStep(model, rows * row_length, seed_of(model), pad,  # bf16: decide_graphs
                                      sequences=sequences, aux=bool(getattr(trainer, "aux_loss_enabled", False)))


def most_sequences(dataset) -> int:
    """The most sequences one packed row of `dataset` holds (TRL's packing keeps each row's lengths in seq_lengths;
    rows without it hold one)."""
    if dataset is None or "seq_lengths" not in (dataset.column_names or []):
        return 1
    import pyarrow.compute as pc

    most = pc.max(pc.list_value_length(dataset.data.column("seq_lengths"))).as_py()
    return max(int(most or 1), 1)
