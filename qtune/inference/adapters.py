"""One forward of a batch whose rows each use their own LoRA adapter, or the bare base (S-LoRA / Punica style).

Why: serving batches requests continuously, and the requests of one running batch name different adapters.
PEFT applies one active adapter to a whole forward (`set_adapter`), so a mixed batch would take one forward per
adapter. `RowAdapters` installs itself on every LoRA layer of a PeftModel that holds the adapters, and each
forward then computes, for every row b of the batch, base(x_b) + s_i·(x_b·A_iᵀ)·B_iᵀ with i the adapter that
`select()` gave row b (none for a base row):

    rows = RowAdapters(peft_model, ["sql", "chat"])     # slot 0 = "sql", slot 1 = "chat", BASE (-1) = no adapter
    rows.select([0, BASE, 1, 0])                        # the rows of the next forwards
    logits = peft_model(input_ids=ids).logits           # ids (4, T): row 1 is the base's, rows 0 and 3 "sql"'s
    rows.remove()                                       # the layers as they were (PEFT's forwards again)

CUDA graphs. Everything a forward reads lives in persistent device tensors made once: each layer's adapters stacked
(A zero-padded to one rank R, the scale s_i folded into B), and the batch's slots, written in place by `select()`.
So a captured forward replays correctly after `select()` changes the slots (or `refresh()` the weights), with no
re-capture. The forward has no host sync, no shape that depends on tensor values and no Python branch on them:
its only choices are made from shapes (the batch size), which a captured graph fixes. `select()` copies into those
tensors: between replays it takes a list; given a device tensor it syncs nothing and may be captured itself.

The math, and why two ways. Gathering each row's A_i, B_i (a (B, R, in) tensor, then torch.bmm) reads one adapter
per row: at B = 64 on Qwen3-8B with r = 64 on every projection (0.35 GB an adapter in bf16) that is ~22 GB a decode
step by arithmetic, more than the 16 GB of the base itself (and the gathered copies are written and read again).
So decode batches use one wide LoRA instead: x·[A_0; …; A_N-1]ᵀ gives every row its product with every adapter
(B, T, N·R); a 0/1 mask keeps the row's own adapter's R columns; one product with [B_0 … B_N-1]ᵀ gives the delta.
That reads each loaded adapter once a step whatever B is (N·R ≤ a few hundred: dense matmuls the GPU runs near peak
for B ≤ 64), and it is exact: the masked columns add exact zeros. Its FLOPs grow with N, which matters only when
many tokens run at once, so a lone row (B = 1: the prefill of one request, T = C tokens, or batch-1 decode) and
batches of fewer rows than N/3 gather instead (`strategy`). Mixed-adapter segmented kernels (Punica's SGMV/BGMV)
read only the adapters in use and do neither extra work; torch has none, and for the N ≤ 8 adapters a server
holds the wide LoRA costs a few percent of a step (by arithmetic, each adapter adds ~2 % of the base's bytes read in
decode, or of its FLOPs in a prefill, at r = 64 on Qwen3-8B; not measured yet). The stacks are copies of the adapters
(in `dtype`): the adapters' memory is held twice while installed.

Layers covered: PEFT's lora.Linear over nn.Linear (16- or 32-bit) and over bitsandbytes Linear4bit (nf4/fp4 QLoRA
bases) or Linear8bitLt (its base matmul is bitsandbytes', which may not capture), and Qwen3-MoE's sparse blocks
whose fused experts (gate_up_proj (E, 2I, H), down_proj (E, H, I)) and router (gate.weight (E, H)) carry PEFT's
`target_parameters` LoRA (ParamWrapper; qtune.modeling.moe has the layout). PEFT adapts those by adding the full
delta B_e·A_e of all E experts to the weights on every forward, which cannot differ per row; here the block runs as
qtune's grouped-expert path does (qtune.modeling.fast.experts: tokens sorted by expert, grouped matmuls, no host
sync) with the LoRA term split, (x·A_eᵀ)·B_eᵀ, per (row, expert) through the same mask, and the router's logits
get the row's router LoRA before its top-k. The base term is the base layer's own forward (bitsandbytes' 4-bit
matmul for a QLoRA base) and, in MoE blocks, qtune's grouped matmuls (which read qtune's 4-bit experts too).

Limits, refused in one line at install: DoRA and PEFT's other LoRA variants (their magnitude vectors and extra
terms are not a low-rank product), adapters with lora_bias, modules_to_save or trainable tokens (whole modules per
adapter), LoRA on embeddings or convolutions, merged adapters, qtune's training fast path patched on the model
(qtune.modeling.fast.lora/experts `unpatch` it first: its fused MLP block reads one adapter's weights itself), and MoE
adapters compacted to moe.max_experts experts (a training-time layout; the saved adapter loads full). Dropout never
applies, and no gradient reaches the adapters (the stacks are copies): this is for inference.

Also: while installed, PEFT's `set_adapter` and `disable_adapter()` change nothing (`select()` decides). PEFT itself
refuses to load MoE adapters that target different sets of expert/router parameters side by side. A block whose
router carries LoRA computes its logits here, so transformers' router-logit recording (output_router_logits, for
training's auxiliary loss) does not see them. Inputs are (B, T, features) with B ≤ max_batch; a tensor index on the
GPU is not range-checked (that would sync).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from qtune.errors import QtuneError

BASE = -1                       # the slot of a row that uses no adapter
LINEAR_LAYERS = ("Linear", "Linear4bit", "Linear8bitLt")   # PEFT's LoRA classes over an nn.Linear
RANK_MULTIPLE = 8               # ranks pad to this: grouped matmuls on CUDA want 16-byte rows


class RowAdapters:
    """Per-row LoRA for `model` (a PeftModel holding every adapter in `names`); slot i is names[i], BASE no adapter.

    max_batch: the most rows a forward may have. dtype: what the adapters compute in (default: the model's, bf16 on a
    bf16 or 4-bit base). strategy: "auto" (gather the rows' own adapters for a lone row or fewer rows than N/3,
    else the masked wide LoRA), "gather" or "mask" (for tests and benchmarks; MoE blocks gather for a lone row only).
    """

    def __init__(self, model, names: list[str], max_batch: int = 64, dtype: torch.dtype | None = None,
                 strategy: str = "auto"):
        if strategy not in ("auto", "gather", "mask"):
            raise ValueError(f"strategy={strategy!r}: auto, gather or mask")
        names = list(names)
        loaded = list(getattr(model, "peft_config", None) or {})
        if not names or len(set(names)) != len(names):
            raise QtuneError(f"per-row adapters: give each adapter once (got {names})")
        missing = [n for n in names if n not in loaded]
        if missing:
            raise QtuneError(f"per-row adapters: {', '.join(missing)} not loaded in this model "
                             f"(loaded: {', '.join(loaded) or 'none'})")
        for name in names:
            _check_config(name, model.peft_config[name])
        self.model, self.names, self.max_batch, self.strategy = model, names, max_batch, strategy
        self.dtype = dtype or _model_dtype(model)
        self.device = next(model.parameters()).device
        linears, blocks = _find_layers(model, names)
        ranks = [r for layer in linears for r in _linear_ranks(layer, names)]
        ranks += [r for block in blocks for w in block[1:] if w is not None for r in _wrapper_ranks(w, names)]
        if not ranks:
            raise QtuneError(f"per-row adapters: {', '.join(names)} adapt no layer of this model")
        self.rank = -(-max(ranks) // RANK_MULTIPLE) * RANK_MULTIPLE
        n, r, dev = len(names), self.rank, self.device
        # the batch's slots and what every layer derives from them, written in place by select()
        self.slots = torch.full((max_batch,), BASE, dtype=torch.long, device=dev)
        self.gather_slots = torch.zeros(max_batch, dtype=torch.long, device=dev)       # BASE rows read slot 0 ...
        self.keep = torch.zeros(max_batch, dtype=self.dtype, device=dev)               # ... times 0
        self.mask = torch.zeros(max_batch, n * r, dtype=self.dtype, device=dev)       # row b's adapter's R columns
        self.owner = torch.arange(n, device=dev).repeat_interleave(r)                  # the adapter of each column
        self._layers = [_Linear(self, layer) for layer in linears]
        self._layers += [_MoeBlock(self, *block) for block in blocks]
        self.refresh()
        self.select([BASE])
        for layer in self._layers:
            layer.install()

    # -- the batch's rows --------------------------------------------------------------------------------------------
    def index_of(self, name: str | None) -> int:
        """The slot of adapter `name` (BASE for None)."""
        if name is not None and name not in self.names:
            raise QtuneError(f"per-row adapters: no adapter {name} among {', '.join(self.names)}")
        return BASE if name is None else self.names.index(name)

    def select(self, index) -> None:
        """Row b of the next forwards uses adapter slot index[b] (BASE: none); rows past len(index) use none. A list
        may name the adapters instead (None: the base); a device tensor of slots copies without a sync."""
        if isinstance(index, torch.Tensor):
            index = index.reshape(-1)
            if index.device.type == "cpu":
                index = index.tolist()
        if not isinstance(index, torch.Tensor):
            index = [self.index_of(i) if i is None or isinstance(i, str) else int(i) for i in index]
            bad = [i for i in index if not BASE <= i < len(self.names)]
            if bad:
                raise QtuneError(f"per-row adapters: slot {bad[0]} is none of -1 (the base) .. {len(self.names) - 1}")
        count = len(index) if isinstance(index, list) else index.numel()
        if not 1 <= count <= self.max_batch:
            raise QtuneError(f"per-row adapters: {count} rows; 1 to max_batch={self.max_batch} can be selected")
        index = torch.as_tensor(index, dtype=torch.long).to(self.device)
        self.slots.fill_(BASE)
        self.slots[:count].copy_(index)
        self.gather_slots.copy_(self.slots.clamp(min=0))
        self.keep.copy_(self.slots >= 0)
        self.mask.copy_(self.slots[:, None] == self.owner[None, :])

    def refresh(self) -> None:
        """Copy the adapters' weights into the stacks again (in place: captured graphs stay valid), for adapters whose
        weights changed since install (an optimizer step, a load)."""
        with torch.no_grad():
            for layer in self._layers:
                layer.fill()

    def remove(self) -> None:
        """Give every layer its own forward back (PEFT's, with its active adapter as it was)."""
        for layer in self._layers:
            layer.uninstall()
        self._layers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    # -- the per-row delta -------------------------------------------------------------------------------------------
    def gathers(self, rows: int) -> bool:
        """Whether a forward of `rows` rows gathers each row's adapter (else: the masked wide LoRA); a shape decides."""
        if self.strategy != "auto":
            return self.strategy == "gather"
        return rows == 1 or 3 * rows <= len(self.names)

    def delta(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Each row's s·(x·Aᵀ)·Bᵀ: x (B, T, in), a layer's stacks a (N, R, in), b (out, N, R) -> (B, T, out)."""
        if x.dim() != 3:
            raise ValueError(f"per-row adapters take inputs (batch, tokens, features), got {tuple(x.shape)}")
        rows = x.shape[0]
        if rows > self.max_batch:
            raise ValueError(f"per-row adapters: a batch of {rows} rows, max_batch={self.max_batch}")
        x = x.to(self.dtype)
        if self.gathers(rows):
            slots = self.gather_slots[:rows]
            xa = torch.bmm(x, a.index_select(0, slots).transpose(1, 2))                 # (B, T, R)
            xa = xa * self.keep[:rows, None, None]
            return torch.bmm(xa, b.index_select(1, slots).permute(1, 2, 0))            # (B, R, out)
        xa = x @ a.view(-1, a.shape[-1]).t()                                            # (B, T, N·R)
        return (xa * self.mask[:rows, None, :]) @ b.view(b.shape[0], -1).t()


# ------------------------------------------------------------------------------------------------------ checks


def _check_config(name: str, cfg) -> None:
    why = None
    if str(getattr(cfg, "peft_type", "")).split(".")[-1] != "LORA":
        why = f"is a {cfg.peft_type} adapter, not LoRA"
    elif getattr(cfg, "use_dora", False):
        why = "uses DoRA, whose magnitude vectors are no low-rank product"
    elif getattr(cfg, "lora_bias", False):
        why = "trains lora_bias"
    elif getattr(cfg, "modules_to_save", None):
        why = f"trains whole modules ({', '.join(cfg.modules_to_save)})"
    elif getattr(cfg, "trainable_token_indices", None):
        why = "trains token embeddings"
    elif getattr(cfg, "fan_in_fan_out", False):
        why = "is fan_in_fan_out (Conv1D layers)"
    if why:
        raise QtuneError(f"per-row adapters: adapter {name} {why}; serve it merged (`qtune merge`) or on its own")


def _model_dtype(model) -> torch.dtype:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    dtype = getattr(base, "dtype", None)   # a transformers model's (its embeddings' on a 4-bit base)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    return next((p.dtype for n, p in base.named_parameters() if p.is_floating_point() and "lora_" not in n),
                torch.float32)


def _holds(module, names) -> list[str]:
    """The adapters of `names` that a PEFT layer or wrapper holds weights of."""
    held = set(getattr(module, "_adapters", ()) or ())
    for attr in getattr(module, "adapter_layer_names", ()):
        held |= set(getattr(module, attr, None) or ())
    return [n for n in names if n in held]


def _find_layers(model, names):
    """(LoRA linear layers, MoE blocks as (block, experts wrapper or None, router wrapper or None)); refuses what the
    per-row forward cannot compute."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    modules = dict(model.named_modules())
    linears, blocks, wrapped = [], {}, set()
    for name, module in modules.items():
        kind = type(module).__name__
        own = vars(module).get("forward")
        if isinstance(own, (_Linear, _MoeBlock)):
            raise QtuneError(f"per-row adapters: {name} has them installed already; remove() those first")
        if own is not None and getattr(own, "__module__", "").startswith("qtune.modeling.fast"):
            raise QtuneError(f"per-row adapters: {name} runs qtune's training fast path; call "
                             "qtune.modeling.fast.lora.unpatch / experts.unpatch on the model first")
        wrapper = hasattr(module, "_adapters") and hasattr(module, "original_module")   # modules_to_save, tokens
        is_peft = isinstance(module, BaseTunerLayer) or wrapper
        if not is_peft or id(module) in wrapped:
            continue
        if kind == "ParamWrapper":
            outer, chain = module, []
            while type(outer).__name__ == "ParamWrapper":
                chain.append(outer)
                wrapped.add(id(outer))
                outer = outer.base_layer
            _refuse_merged(name, chain)
            parent = modules.get(name.rpartition(".")[0])
            role = name.rpartition(".")[2]
            if role not in ("experts", "gate") or parent is None or type(parent).__name__ != "Qwen3MoeSparseMoeBlock":
                raise QtuneError(f"per-row adapters: {name} adapts a parameter outside a Qwen3-MoE block's experts or "
                                 "router; serve that adapter merged or on its own")
            if any("_qtune_chosen" in vars(w) for w in chain):
                raise QtuneError(f"per-row adapters: {name}'s adapters are compacted to moe.max_experts experts "
                                 "(training layout); load the saved adapter instead")
            entry = blocks.setdefault(id(parent), [parent, None, None])
            entry[1 if role == "experts" else 2] = module
            continue
        held = _holds(module, names)
        if (kind in LINEAR_LAYERS and hasattr(module, "lora_A")
                and isinstance(getattr(module, "base_layer", None), torch.nn.Linear)):
            _refuse_merged(name, [module])
            variant = [n for n in held if n in getattr(module, "lora_variant", {})]
            embedding = [n for n in names if n in getattr(module, "lora_embedding_A", {})]
            if variant or embedding:
                raise QtuneError(f"per-row adapters: adapter {(variant or embedding)[0]} is a LoRA variant (DoRA …) "
                                 f"at {name}; serve it merged or on its own")
            if getattr(module, "fan_in_fan_out", False):
                raise QtuneError(f"per-row adapters: {name} is fan_in_fan_out (Conv1D); not supported")
            linears.append(module)
        elif held:
            what = "a whole copy of the module" if hasattr(module, "original_module") else f"a {kind} LoRA layer"
            raise QtuneError(f"per-row adapters: adapter {held[0]} has {what} at {name}; per-row adapters cover "
                             "LoRA on linear layers and on Qwen3-MoE experts and routers")
    for block, experts, router in blocks.values():
        if experts is not None:
            from qtune.modeling.fast.experts import supported

            if not supported(experts):
                raise QtuneError("per-row adapters: the experts of a Qwen3-MoE block are not the fused SwiGLU "
                                 "(E, 2I, H) / (E, H, I) tensors they know")
        if router is not None and type(router.get_base_layer()).__name__ != "Qwen3MoeTopKRouter":
            raise QtuneError("per-row adapters: a Qwen3-MoE block's router is not the top-k router they know")
    return linears, [tuple(b) for b in blocks.values()]


def _refuse_merged(name: str, layers) -> None:
    if any(getattr(layer, "merged", False) for layer in layers):
        raise QtuneError(f"per-row adapters: {name} has an adapter merged into its weights; unmerge it first")


def _linear_ranks(layer, names):
    return [layer.lora_A[n].weight.shape[0] for n in names if n in layer.lora_A]


def _wrapper_ranks(outer, names):
    ranks = []
    while type(outer).__name__ == "ParamWrapper":
        ranks += [outer.lora_A[n].weight.shape[0] // outer.num_experts for n in names if n in outer.lora_A]
        outer = outer.base_layer
    return ranks


# ------------------------------------------------------------------------------------------------------ layers


class _Linear:
    """A LoRA linear layer's stacks: a (N, R, in), b (out, N, R) with s_i folded in; zeros where adapter i does not
    target this layer (or its rank is below R)."""

    def __init__(self, rows: RowAdapters, layer):
        self.rows, self.layer = rows, layer
        base = layer.get_base_layer()
        n, r = len(rows.names), rows.rank
        self.a = self.b = None          # a layer none of the served adapters targets runs its base alone
        if _holds(layer, rows.names):
            self.a = torch.zeros(n, r, base.in_features, dtype=rows.dtype, device=rows.device)
            self.b = torch.zeros(base.out_features, n, r, dtype=rows.dtype, device=rows.device)
        self.saved = None

    def fill(self) -> None:
        if self.a is None:
            return
        self.a.zero_()
        self.b.zero_()
        for i, name in enumerate(self.rows.names):
            if name in self.layer.lora_A:
                a, b = self.layer.lora_A[name].weight, self.layer.lora_B[name].weight
                self.a[i, :a.shape[0]] = a
                self.b[:, i, :b.shape[1]] = b * self.layer.scaling[name]

    def __call__(self, x, *args, **kwargs):
        kwargs.pop("adapter_names", None)   # PEFT's own per-call choice: select() decides here
        y = self.layer.get_base_layer()(x, *args, **kwargs)
        if self.a is None:
            return y
        return y + self.rows.delta(x, self.a, self.b).to(y.dtype)

    def install(self) -> None:
        self.saved = vars(self.layer).get("forward")
        self.layer.forward = self

    def uninstall(self) -> None:
        if self.saved is None:
            vars(self.layer).pop("forward", None)
        else:
            self.layer.forward = self.saved


class _MoeBlock:
    """A Qwen3-MoE sparse block with per-row LoRA on its fused experts and/or router.

    Experts' stacks per parameter: a (E, N, R, in), b (E, out, N, R) with s_i folded in, from PEFT's layout
    (lora_A (E·r, in): expert e owns rows e·r … e·r+r-1; lora_B (out, r·E): the columns c with c mod E = e).
    The router's are a linear layer's."""

    def __init__(self, rows: RowAdapters, block, experts_wrapper, router_wrapper):
        from qtune.modeling.fast.experts import _chain

        self.rows, self.block = rows, block
        self.wrappers = _chain(experts_wrapper)[1] if experts_wrapper is not None else {}
        self.experts = _chain(experts_wrapper)[0] if experts_wrapper is not None else block.experts
        self.router_wrapper = router_wrapper
        self.router = router_wrapper.get_base_layer() if router_wrapper is not None else block.gate
        n, r, dev, dt = len(rows.names), rows.rank, rows.device, rows.dtype
        self.stacks = {}
        for pname, w in self.wrappers.items():
            if not _holds(w, rows.names):
                continue
            e, out, inp = getattr(self.experts, pname).shape
            self.stacks[pname] = (torch.zeros(e, n, r, inp, dtype=dt, device=dev),
                                  torch.zeros(e, out, n, r, dtype=dt, device=dev))
        self.router_stacks = None
        if router_wrapper is not None and _holds(router_wrapper, rows.names):
            e, h = self.router.weight.shape
            self.router_stacks = (torch.zeros(n, r, h, dtype=dt, device=dev),
                                  torch.zeros(e, n, r, dtype=dt, device=dev))
        self.saved = None

    def fill(self) -> None:
        names = self.rows.names
        for pname, (sa, sb) in self.stacks.items():
            w = self.wrappers[pname]
            sa.zero_()
            sb.zero_()
            experts = w.num_experts
            for i, name in enumerate(names):
                if name not in w.lora_A:
                    continue
                a, b = w.lora_A[name].weight, w.lora_B[name].weight
                r = a.shape[0] // experts
                sa[:, i, :r] = a.view(experts, r, a.shape[1])
                sb[:, :, i, :r] = b.view(b.shape[0], r, experts).permute(2, 0, 1) * w.scaling[name]
        if self.router_stacks is not None:
            sa, sb = self.router_stacks
            sa.zero_()
            sb.zero_()
            for i, name in enumerate(names):
                if name in self.router_wrapper.lora_A:
                    a, b = self.router_wrapper.lora_A[name].weight, self.router_wrapper.lora_B[name].weight
                    sa[i, :a.shape[0]] = a
                    sb[:, i, :b.shape[1]] = b * self.router_wrapper.scaling[name]

    def __call__(self, hidden_states):
        rows, tokens, hidden = hidden_states.shape
        x = hidden_states.reshape(-1, hidden)
        weights, chosen = self._route(hidden_states)
        return self._experts(x, chosen, weights, rows, tokens).reshape(rows, tokens, hidden)

    def _route(self, hidden_states):
        """(top-k weights, top-k experts) per token: Qwen3MoeTopKRouter's forward, its logits with the row's LoRA."""
        if self.router_stacks is None:
            _, weights, chosen = self.router(hidden_states.reshape(-1, hidden_states.shape[-1]))
            return weights, chosen
        g = self.router
        logits = F.linear(hidden_states, g.weight)
        logits = logits + self.rows.delta(hidden_states, *self.router_stacks).to(logits.dtype)
        logits = logits.reshape(-1, logits.shape[-1])
        probs = torch.softmax(logits, dtype=torch.float, dim=-1)
        top, chosen = torch.topk(probs, g.top_k, dim=-1)
        if g.norm_topk_prob:
            top = top / top.sum(dim=-1, keepdim=True)
        return top.to(logits.dtype), chosen

    def _experts(self, x, chosen, weights, rows: int, tokens: int):
        """The experts' SwiGLU with each (row, expert)'s LoRA, over the tokens sorted by expert (grouped matmuls)."""
        from qtune.modeling.fast.experts import base_mm, route

        if rows > self.rows.max_batch:
            raise ValueError(f"per-row adapters: a batch of {rows} rows, max_batch={self.rows.max_batch}")
        k = chosen.shape[-1]
        order, inverse, offs = route(chosen, self.experts.gate_up_proj.shape[0])
        pair_rows = order // (k * tokens)                # the batch row of each (token, choice) in expert order
        xs = x.index_select(0, order // k)
        h, _ = base_mm(self.experts, "gate_up_proj", xs, offs)
        if "gate_up_proj" in self.stacks:
            h = h + self._delta(xs, *self.stacks["gate_up_proj"], offs, pair_rows, rows).to(h.dtype)
        g, u = h.chunk(2, dim=-1)
        act = self.experts.act_fn(g) * u
        y, _ = base_mm(self.experts, "down_proj", act, offs)
        if "down_proj" in self.stacks:
            y = y + self._delta(act, *self.stacks["down_proj"], offs, pair_rows, rows).to(y.dtype)
        y = y.index_select(0, inverse).view(-1, k, y.shape[-1])
        # each token's k expert outputs, weighted and summed (as qtune's grouped path does)
        return torch.bmm(weights.reshape(-1, 1, k).to(y.dtype), y).view(-1, y.shape[-1]).to(x.dtype)

    def _delta(self, xs, a, b, offs, pair_rows, rows: int):
        """s·(x·A_(i,e)ᵀ)·B_(i,e)ᵀ per sorted (token, choice) of row-adapter i and expert e."""
        from qtune.modeling.fast.experts import gmm

        xs = xs.to(self.rows.dtype)
        e = a.shape[0]
        if rows == 1 and self.rows.strategy != "mask":   # one row, one adapter: its own (E, R, ·) slices
            slot = self.rows.gather_slots[:1]
            a1 = a.index_select(1, slot).view(e, -1, a.shape[-1])
            b1 = b.index_select(2, slot).view(e, b.shape[1], -1)
            xa = gmm(xs, a1.transpose(1, 2), offs) * self.rows.keep[:1]
            return gmm(xa, b1.transpose(1, 2), offs)
        xa = gmm(xs, a.view(e, -1, a.shape[-1]).transpose(1, 2), offs)                  # (P, N·R)
        xa = xa * self.rows.mask.index_select(0, pair_rows)
        return gmm(xa, b.view(e, b.shape[1], -1).transpose(1, 2), offs)

    def install(self) -> None:
        self.saved = vars(self.block).get("forward")
        self.block.forward = self

    def uninstall(self) -> None:
        if self.saved is None:
            vars(self.block).pop("forward", None)
        else:
            self.block.forward = self.saved


class MixedRows:
    """What Scheduler asks of per-row adapters, over RowAdapters: a request's adapter (a
    name, or the base's name) as a row slot, and the rows' slots for the next forward."""

    def __init__(self, rows, base_name: str):
        self.rows, self.base_name = rows, base_name

    def key(self, name) -> int:
        return BASE if name is None or name == self.base_name else self.rows.index_of(name)

    def select(self, slots) -> None:
        self.rows.select(slots)
