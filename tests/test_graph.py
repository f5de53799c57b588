"""train.cuda_graphs: a micro-step captured as one CUDA graph (qtune.modeling.fast.graph) computes what the eager
fast path computes, and the seeded LoRA dropout it needs (qtune.modeling.fast.dropout) draws one mask per (seed,
salt) in the forward, the checkpoint's recompute, the backward and a replay. The `gpu` tests need a GPU
(`pytest -m gpu`); the CPU tests check where graphs are refused and why."""
from __future__ import annotations

import pytest
import torch

from conftest import REPO, qtune_warm
from test_fast import _cos, _fifty_step_finals


def _decide(**over):
    from qtune.modeling import fast as fastpath

    from qtune.stages import get

    kw = dict(stage="sft", processes=1, packing=True, offload=False, dtype=torch.bfloat16,
              dropout=0.0, attention="sdpa")
    device = over.pop("device", "cuda")
    setting = over.pop("setting", "auto")
    kw.update(over)
    kw["stage"] = get(kw["stage"])
    fp = fastpath.decide("true", device)
    fastpath.decide_graphs(fp, setting, device, **kw)
    return fp


def test_graphs_apply_only_where_a_step_has_one_shape_and_no_host_syncs():
    from qtune.errors import ConfigError

    assert _decide().graphs and "CUDA graph per micro-step" in _decide().pieces
    for over, why in [({"stage": "dpo"}, "pt and sft only"),
                      ({"processes": 2}, "one process"), ({"packing": False}, "data.packing=true"),
                      ({"offload": True}, "offload_activations"),
                      ({"dtype": torch.float16}, "bf16 only"), ({"attention": "flash_attention_2"}, "sdpa or eager")]:
        fp = _decide(**over)
        assert not fp.graphs and any(why in n for n in fp.notes), (over, fp.notes)
        with pytest.raises(ConfigError, match=f"train.cuda_graphs=true: .*{why.split()[0]}"):
            _decide(setting="true", **over)
    assert not _decide(device="cpu").graphs and not _decide(device="cpu").notes  # nothing to say on a CPU run
    assert not _decide(setting="false").graphs
    from qtune.modeling import fast as fastpath
    from qtune.stages import get

    with pytest.raises(ConfigError, match="needs the fast path"):
        fastpath.decide_graphs(fastpath.decide("false", "cuda"), "true", "cuda", stage=get("sft"), processes=1,
                               packing=True, offload=False, dtype=torch.bfloat16, dropout=0.0,
                               attention="sdpa")


def test_liger_auto_is_on_where_the_gpu_sets_the_pace():
    """train.liger=auto: a step in a CUDA graph, or a dense model's eager one from 8192 tokens a micro-batch
    (bench/profile_train.py: a graphed 8B step 340 -> 262 ms of GPU time; eager at 8192 tokens 6,027 -> 7,729 tok/s);
    not short eager steps, which Python bounds, nor eager MoE steps (host-bound), nor CPU."""
    from types import SimpleNamespace

    from qtune.modeling.fast import FastPath, gpu_bound

    dense, moe = SimpleNamespace(config=SimpleNamespace()), SimpleNamespace(config=SimpleNamespace(num_experts=128))
    graphed, eager = FastPath(True, graphs=True), FastPath(True)
    assert gpu_bound(graphed, dense, "cuda", 2048) and gpu_bound(eager, dense, "cuda", 8192)
    assert not gpu_bound(eager, dense, "cuda", 2048) and not gpu_bound(eager, moe, "cuda", 8192)
    assert gpu_bound(graphed, moe, "cuda", 2048)
    assert not gpu_bound(graphed, dense, "cpu", 2048)


def test_cuda_graphs_setting_is_checked_in_one_line(tmp_path):
    for key in ("cuda_graphs", "liger", "head_on_host"):
        p = qtune_warm("train", "model=tiny_qwen3", f"train.{key}=sometimes", "--dry-run")
        assert p.returncode != 0 and f"train.{key}=sometimes: valid: auto, true, false" in p.stdout + p.stderr
    p = qtune_warm("train", "model=tiny_qwen3", "train.cuda_graphs=true",
                   f"data.path={REPO}/data/demo/captains_log.jsonl", "train.device=cpu", "train.max_steps=1",
                   "train.report_to=[]", f"train.output_dir={tmp_path / 'run'}")
    assert p.returncode != 0 and "train.cuda_graphs=true: it needs CUDA" in p.stdout + p.stderr
    assert "Traceback" not in p.stdout + p.stderr


def test_a_failed_capture_goes_on_eagerly_with_one_line():
    """A step torch cannot capture: the trainer says so once and trains that batch and the rest without the graph."""
    from types import SimpleNamespace

    from qtune.modeling.fast import graph

    class Base:  # the trainer's own step, as TRL's would run it
        calls = 0

        def training_step(self, model, inputs, num_items_in_batch=None):
            self.calls += 1
            return torch.tensor(1.0)

    class Uncapturable:
        graph = aux = None

        def fits(self, inputs):
            return None

        def step(self, *args, **kwargs):
            raise RuntimeError("operation not permitted when stream is capturing\n(the rest of torch's message)")

    trainer = graph.trainer_class(Base)()
    notes = []
    trainer.qtune_graph, trainer.qtune_notes, trainer.qtune_note = Uncapturable(), set(), notes.append
    trainer.optimizer, trainer.loss_is_scaled_for_ga, trainer.compute_loss_func = None, None, None
    trainer.model_accepts_loss_kwargs, trainer.current_gradient_accumulation_steps = True, 1
    trainer.args = SimpleNamespace(gradient_accumulation_steps=1)
    trainer._prepare_inputs = lambda inputs: inputs
    model = torch.nn.Linear(2, 2)
    assert trainer.training_step(model, {"input_ids": torch.zeros(1, 4)}).item() == 1.0
    assert trainer.training_step(model, {"input_ids": torch.zeros(1, 4)}).item() == 1.0
    assert trainer.calls == 2 and trainer.qtune_graph is None
    assert notes == ["train.cuda_graphs: the capture failed (RuntimeError: operation not permitted when stream is "
                     "capturing); training goes on without the graph"]


# ---------------------------------------------------------------- on the GPU (pytest -m gpu)


def test_packed_attention_is_sdpa_wherever_the_varlen_kernel_cannot_run(tiny_qwen3):
    """Where the varlen kernel does not run (here: CPU) the registered implementation is sdpa with sdpa's masks: a
    packed row, with and without its boundaries, gives sdpa's logits; and the reasons it is not used are named."""
    from transformers import AutoModelForCausalLM

    from qtune.modeling.fast import attention

    assert "CUDA" in attention.unavailable("cpu", torch.bfloat16, "sdpa")
    assert "16-bit" in attention.unavailable("cuda", torch.float32, "sdpa")
    assert "flash_attention_2" in attention.unavailable("cuda", torch.bfloat16, "flash_attention_2")
    m = AutoModelForCausalLM.from_pretrained(tiny_qwen3, attn_implementation="sdpa")
    m.config.use_cache = False  # as in training (a cache turns transformers' packed-row masks off)
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]])
    cu = torch.tensor([0, 5, 8, 12], dtype=torch.int32)
    with torch.no_grad():
        want = m(input_ids=ids, position_ids=pos).logits
        attention.install(m)
        assert m.config._attn_implementation == attention.NAME
        got = m(input_ids=ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=5, max_length_k=5)
        assert torch.equal(got.logits, want) and torch.equal(m(input_ids=ids, position_ids=pos).logits, want)
        alone = m(input_ids=ids[:, 5:8]).logits      # the second sequence by itself: packing kept it apart
    assert torch.allclose(want[:, 5:8], alone, atol=1e-5)


def test_the_graph_holds_as_many_sequences_as_the_packed_rows_do():
    """With varlen attention the graph's boundary buffer is sized from the prepared rows (TRL's seq_lengths), and a
    batch with more sequences (the padding counts as one) runs without the graph, with the reason."""
    from datasets import Dataset

    from qtune.modeling.fast.graph import GraphedStep, most_sequences

    assert most_sequences(Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5]], "seq_lengths": [[1, 2], [1, 1]]})) == 2
    assert most_sequences(Dataset.from_dict({"input_ids": [[1, 2, 3]]})) == 1 and most_sequences(None) == 1
    step = GraphedStep(torch.nn.Linear(2, 2), 10, seed=None, pad_id=0, sequences=3)

    def batch(cu):
        n = cu[-1]
        return dict(input_ids=torch.zeros(1, n, dtype=torch.long), labels=torch.zeros(1, n, dtype=torch.long),
                    position_ids=torch.zeros(1, n, dtype=torch.long), cu_seq_lens_q=torch.tensor(cu, dtype=torch.int32))

    assert step.fits(batch([0, 4, 7])) is None                    # two sequences and the padding's
    assert step.fits(batch([0, 4, 7, 10])) is None                # three filling the row: no padding
    assert "4 sequences (the graph holds up to 3)" in step.fits(batch([0, 4, 7, 9]))
    no_bounds = batch([0, 10])
    del no_bounds["cu_seq_lens_q"]
    assert "without sequence boundaries" in step.fits(no_bounds)
    step._load(batch([0, 4, 7]), None, 1.0)
    assert step.cu.tolist() == [0, 4, 7, 10]                       # the padding [7, 10) is a sequence of its own


@pytest.mark.gpu
def test_gpu_triton_dropout_is_one_mask_per_seed_and_salt_also_in_a_graph():
    from qtune.modeling.fast import dropout

    assert dropout.triton_ok()
    seed = dropout.Seed(torch.device("cuda"))
    seed.refresh()
    ones = torch.ones(2048, 1000, device="cuda", dtype=torch.bfloat16)
    a = dropout.apply(ones, seed, 5, 0.1)
    b = dropout.apply(ones * 3, seed, 5, 0.1)
    assert torch.equal(a == 0, b == 0) and abs((a == 0).float().mean().item() - 0.1) < 0.005
    assert torch.allclose(a[a != 0].float(), torch.tensor(1 / 0.9, device="cuda"), rtol=1e-2)
    assert not torch.equal(dropout.apply(ones, seed, 6, 0.1) == 0, a == 0)               # another salt
    graph = torch.cuda.CUDAGraph()
    dropout.apply(ones, seed, 5, 0.1)                                                      # compiled before capture
    with torch.cuda.graph(graph):
        captured = dropout.apply(ones, seed, 5, 0.1)
    for _ in range(2):
        seed.refresh()                                                                     # a new seed each replay
        graph.replay()
        assert torch.equal(captured, dropout.apply(ones, seed, 5, 0.1))
    assert not torch.equal(captured == 0, a == 0)


def _fast_model(model_dir, dropout: float, tied: bool = True, varlen: bool = False, liger: bool = False,
                model: str = "tiny_qwen3", moe: str = "expert_only", quant: str = "none"):
    """The tiny Qwen3 in bf16 on CUDA as `qtune train` builds it with graphs on: fused LoRA (non-zero B), reentrant
    checkpointing without RNG state, TRL's fused head; `varlen`: packed rows attend through the varlen kernel;
    `liger`: liger-kernel's RMSNorm/RoPE/SwiGLU (which patch transformers' Qwen3 module for the process).
    `model_dir` may also be a function (dtype, device) -> model; `model` names its config (LoRA targets, moe scope);
    `quant=nf4` keeps MoE experts in 4 bits."""
    import zlib

    from peft import get_peft_model
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from qtune.config import compose, to_object
    from qtune.modeling import fast as fastpath
    from qtune.stages import get
    from qtune.modeling.load import prepare_for_training
    from qtune.modeling.targets import apply_dropout, match, peft_config

    cfg = to_object(compose([f"model={model}", f"moe={moe}", f"lora.dropout={dropout}"]))
    torch.manual_seed(0)
    if callable(model_dir):
        m = model_dir(torch.bfloat16, "cuda")
    else:
        m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa",
                                                 **({} if tied else {"tie_word_embeddings": False})).to("cuda")
    m.config.use_cache = False
    prepare_for_training(m, gradient_checkpointing=True)
    fp = fastpath.decide("true", "cuda")
    fastpath.decide_graphs(fp, "true", "cuda", stage=get("sft"), processes=1, packing=True, offload=False,
                           dtype=torch.bfloat16, dropout=dropout, attention="sdpa")
    fastpath.apply_base(fp, m, "cuda", gradient_checkpointing=True, liger="auto" if liger else "false")
    assert ("liger RMSNorm/RoPE/SwiGLU" in fp.pieces) == liger, fp.describe()
    if varlen:
        fastpath.packed_attention(fp, m, "cuda", torch.bfloat16, packing=True)
        assert "varlen flash attention for packed rows" in fp.pieces, fp.notes
    add_fused_lm_head(m, outputs=("log_probs", "entropy", "is_top1"))
    matched = match(m, cfg.lora, cfg.moe)
    m = get_peft_model(m, peft_config(matched, cfg.lora, False))
    if dropout:
        apply_dropout(m, dropout)
    for n, p in m.named_parameters():
        if "lora_B" in n:
            p.data.normal_(std=0.02, generator=torch.Generator(p.device).manual_seed(zlib.crc32(n.encode())))
    fastpath.apply_lora(fp, m, quant)
    m.train()
    return m


def _batch(n: int, bounds: bool = False):
    """A packed row of two sequences as TRL's padding-free collator gives it (`bounds`: with cu_seq_lens and
    max_length, as it always does; False: the row as the graph takes it without varlen attention)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 1000, (1, n), generator=g)
    cut = n * 5 // 12
    pos = torch.cat([torch.arange(cut), torch.arange(n - cut)]).unsqueeze(0)
    labels = ids.clone()
    labels[0, :5] = -100
    labels[0, cut] = -100  # TRL's collator: no label on a packed sequence's first token
    batch = {k: v.cuda() for k, v in dict(input_ids=ids, position_ids=pos, labels=labels).items()}
    if bounds:
        batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = torch.tensor([0, cut, n], dtype=torch.int32, device="cuda")
        batch["max_length_q"] = batch["max_length_k"] = max(cut, n - cut)
    return batch


def _eager(model, batch, seed: int, aux: float = 0.0):
    """TRL's SFT loss on the unpadded batch, eagerly; the dropout seed drawn after torch.manual_seed(seed). `aux`: an
    MoE model's load-balancing loss with this weight, as TRL adds it."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(**batch, fused_lm_head=True, **({"output_router_logits": True} if aux else {}))
    loss = -out.log_probs.sum() / out.label_mask.sum()
    if aux:
        loss = loss + aux * out.aux_loss.float()
    loss.backward()
    return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.gpu
@pytest.mark.parametrize("dropout,varlen,liger", [(0.0, False, False), (0.1, False, False), (0.1, True, False),
                                                  (0.1, True, True)], ids=["plain", "dropout", "varlen", "liger"])
def test_gpu_graph_step_equals_the_eager_step(tiny_qwen3, monkeypatch, dropout, varlen, liger):
    """A replay on a batch padded to the graph's row equals the eager step on the batch itself (loss, every LoRA
    gradient), for each step's seed; gradient accumulation adds replays up as autograd adds backwards. With varlen
    attention the graph's boundary buffer holds the batch's sequences, the padding's and empty ones after them; with
    varlen attention and liger's kernels (train.liger=auto with graphs) the step also equals the reference: sdpa with
    the packed row's mask and transformers' own RMSNorm, RoPE and SiLU."""
    from transformers.models.qwen3 import modeling_qwen3

    from qtune.modeling.fast.graph import GraphedStep
    from qtune.modeling.fast.lora import seed_of

    for name in ("Qwen3RMSNorm", "Qwen3MLP", "apply_rotary_pos_emb"):  # liger patches them: undone after the test
        monkeypatch.setattr(modeling_qwen3, name, getattr(modeling_qwen3, name))
    reference = _fast_model(tiny_qwen3, dropout) if varlen else None     # built before liger patches the module
    model = _fast_model(tiny_qwen3, dropout, varlen=varlen, liger=liger)
    batch = _batch(100, bounds=varlen)
    step = GraphedStep(model, 128, seed_of(model), pad_id=0, sequences=5 if varlen else 0)
    assert step.fits(batch) is None and step.fits(_batch(129)) and step.fits({**batch, "attention_mask": batch["labels"]})
    step.step(batch, None, 1.0, accumulating=False)                                 # capture
    model.zero_grad(set_to_none=True)
    results = {}
    for k in (11, 12):
        want_loss, want = _eager(model, batch, k)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(k)
        loss = step.step(batch, None, 1.0, accumulating=False).item()
        got = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
        assert abs(loss - want_loss) <= 2e-3 * abs(want_loss), (k, loss, want_loss)
        assert got.keys() == want.keys() and len(got) == 14 * 2
        for name in got:
            assert _cos(got[name], want[name]) >= 0.999, (k, name)
        results[k] = (loss, want)
        model.zero_grad(set_to_none=True)
    assert (results[11][0] != results[12][0]) == (dropout > 0)                      # masks change with the seed

    # two micro-steps, accumulated, each scaled by 1/2 as Trainer does without num_items_in_batch
    for k in (11, 12):
        torch.manual_seed(k)
        step.step(batch, None, 0.5, accumulating=True)
    for name, p in model.named_parameters():
        if p.requires_grad:
            want = (results[11][1][name] + results[12][1][name]) / 2
            assert _cos(p.grad.float(), want) >= 0.999, name
    # num_items_in_batch: the loss divides by it instead of the row's labelled count
    model.zero_grad(set_to_none=True)
    torch.manual_seed(11)
    half = step.step(batch, torch.tensor(2.0 * (batch["labels"][0, 1:] != -100).sum().item(), device="cuda"), 1.0,
                     accumulating=False).item()
    assert abs(half - results[11][0] / 2) <= 2e-3 * abs(results[11][0])
    if reference is not None:  # the fast pieces compute what the reference computes
        ref_loss, ref = _eager(reference, _batch(100), 11)
        assert abs(results[11][0] - ref_loss) <= 0.01 * abs(ref_loss)
        assert all(_cos(results[11][1][n], ref[n]) >= 0.99 for n in ref)


@pytest.mark.gpu
@pytest.mark.parametrize("what", ["tiny", "a3b_nf4"])
def test_gpu_moe_graph_step_equals_the_eager_step(tiny_qwen3_moe, what):
    """An MoE micro-step captured as a graph — grouped-matmul experts with split LoRA (on a 2-layer Qwen3-30B-A3B shape
    with the experts in nf4), varlen attention, and the load-balancing loss TRL adds — equals the eager step: loss
    within 0.2 %, every LoRA gradient at cosine >= 0.995; the balancing loss reaches the trainer's metrics."""
    from qtune.modeling.fast import experts as fast_moe
    from qtune.modeling.fast.graph import GraphedStep
    from qtune.modeling.fast.lora import seed_of
    from test_fast import _a3b

    m = _fast_model(tiny_qwen3_moe if what == "tiny" else _a3b(2), 0.0, varlen=True,
                    model="tiny_qwen3_moe" if what == "tiny" else "qwen3_30b_a3b",
                    quant="nf4" if what == "a3b_nf4" else "none")
    assert any(getattr(mod.forward, "__func__", None) is fast_moe.forward for mod in m.modules())  # grouped experts
    coef = 0.01
    batch = _batch(100, bounds=True)
    want_loss, want = _eager(m, batch, 11, aux=coef)
    step = GraphedStep(m, 128, seed_of(m), pad_id=0, sequences=5, aux=True)
    m.zero_grad(set_to_none=True)
    step.step(batch, None, 1.0, accumulating=False, aux=coef)                           # capture
    m.zero_grad(set_to_none=True)
    loss = step.step(batch, None, 1.0, accumulating=False, aux=coef).item()
    assert abs(loss - want_loss) <= 2e-3 * abs(want_loss), (loss, want_loss)
    got = {n: p.grad.float() for n, p in m.named_parameters() if p.requires_grad}
    assert any("experts" in n for n in got) and got.keys() == want.keys()
    for n in want:  # 0.995, not 0.999: room for bf16 sums taken in another order (attention's backward; with the
        assert _cos(got[n], want[n]) >= 0.995, n  # experts' outputs once summed by atomics, an expert's B gave 0.9988)
    assert step.metrics()[2].item() > 0                                                 # the balancing loss


@pytest.mark.gpu
@pytest.mark.parametrize("native_gqa", [False, True], ids=["repeated_heads", "native_gqa"])
def test_gpu_varlen_attention_equals_sdpa_with_the_block_mask(monkeypatch, native_gqa):
    """The varlen kernel on a packed row (grouped-query heads, sequences of 100, 150 and 50 tokens, then empty ones as
    a CUDA graph's buffer pads them) against sdpa with the block-diagonal causal mask: outputs and dq, dk, dv; with
    the key/value heads repeated, and given as they are where this torch's kernel takes grouped-query heads."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from qtune.modeling.fast import attention

    assert attention.unavailable("cuda", torch.bfloat16, "sdpa") is None
    device = str(torch.device("cuda", torch.cuda.current_device()))
    if native_gqa and not attention._probe_gqa(torch.device(device)):
        pytest.skip(f"torch {torch.__version__}'s varlen_attn does not take grouped-query heads")
    monkeypatch.setitem(attention._NATIVE_GQA, device, native_gqa)
    g = torch.Generator("cuda").manual_seed(0)
    n, d = 300, 64
    q = torch.randn(1, 8, n, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    k, v = (torch.randn(1, 2, n, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_() for _ in range(2))
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups, module.training = True, 4, True
    doc = torch.tensor([0] * 100 + [1] * 150 + [2] * 50, device="cuda")
    mask = (doc[:, None] == doc[None, :]) & torch.ones(n, n, dtype=torch.bool, device="cuda").tril()
    want, _ = sdpa_attention_forward(module, q, k, v, mask[None, None], scaling=d ** -0.5)
    dy = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, (q, k, v), dy)
    for cu in ([0, 100, 250, 300], [0, 100, 250, 300, 300, 300]):
        cu = torch.tensor(cu, dtype=torch.int32, device="cuda")
        got, _ = attention.attention(module, q, k, v, None, scaling=d ** -0.5, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                     max_length_q=150, max_length_k=150)
        assert got.shape == want.shape
        assert (got.float() - want.float()).abs().max() <= 2e-2, cu
        for a, b in zip(torch.autograd.grad(got, (q, k, v), dy), want_grads):
            assert _cos(a.float(), b.float()) >= 0.999


def _replay_matches(model, batch, want_loss: float, want: dict) -> None:
    """A GraphedStep captured on `batch` and replayed with dropout seed 11 gives the eager step's loss and gradients."""
    from qtune.modeling.fast.graph import GraphedStep
    from qtune.modeling.fast.lora import seed_of

    step = GraphedStep(model, 128, seed_of(model), pad_id=0)
    step.step(batch, None, 1.0, accumulating=False)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(11)
    loss = step.step(batch, None, 1.0, accumulating=False).item()
    assert abs(loss - want_loss) <= 2e-3 * abs(want_loss)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert _cos(p.grad.float(), want[n]) >= 0.999, n


@pytest.mark.gpu
def test_gpu_input_embeddings_read_from_host_memory(tiny_qwen3):
    """An untied embedding table moved to pinned host memory: the same loss and gradients bit for bit, eagerly and in
    a replayed graph, with the table's bytes off the GPU's allocator; a tied one stays where it is."""
    from qtune.modeling.fast.host import embeddings_to_host

    assert embeddings_to_host(_fast_model(tiny_qwen3, 0.0)) == 0                   # tied: the head needs it
    model = _fast_model(tiny_qwen3, 0.0, tied=False)
    batch = _batch(100)
    want_loss, want = _eager(model, batch, 11)
    model.zero_grad(set_to_none=True)
    emb = model.get_input_embeddings()
    table = emb.weight.numel() * emb.weight.element_size()
    before = torch.cuda.memory_allocated()
    assert embeddings_to_host(model) == table
    assert emb.weight.is_cuda and before - torch.cuda.memory_allocated() >= table
    loss, got = _eager(model, batch, 11)
    assert loss == want_loss and all(torch.equal(got[n], want[n]) for n in want)
    model.zero_grad(set_to_none=True)
    _replay_matches(model, batch, want_loss, want)


@pytest.mark.gpu
def test_gpu_output_head_in_host_memory_is_copied_for_the_loss_and_freed_after_its_backward(tiny_qwen3):
    """train.head_on_host: an untied output head moved to pinned host memory (with the input embeddings, as training
    does it). The same loss and gradients bit for bit eagerly and in a replayed graph; the head's bytes are off the GPU
    after a step; a step's peak grows by at most the head's size; the module called outside a
    forward gives what the GPU weight gave; a tied head stays."""
    from trl.trainer.utils import add_fused_lm_head

    from qtune.modeling.fast.host import HostedHead, embeddings_to_host, head_to_host

    assert head_to_host(_fast_model(tiny_qwen3, 0.0)) == (0, "the output head is tied to the input embeddings")
    model = _fast_model(tiny_qwen3, 0.0, tied=False)
    embeddings_to_host(model)
    batch = _batch(100)
    _eager(model, batch, 11)  # warm: allocator and kernels
    model.zero_grad(set_to_none=True)
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    want_loss, want = _eager(model, batch, 11)
    peak_before = torch.cuda.max_memory_allocated() - start
    model.zero_grad(set_to_none=True)
    head = model.get_base_model().get_output_embeddings()
    x = torch.randn(3, head.in_features, device="cuda", dtype=torch.bfloat16)
    want_out = head(x)
    table = head.weight.numel() * head.weight.element_size()
    before = torch.cuda.memory_allocated()
    assert head_to_host(model) == (table, "")
    # as in training: TRL's trainer puts its fused head's forward on the model after qtune built it
    add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "is_top1"))
    assert isinstance(head, HostedHead) and head.weight.is_cuda
    assert before - torch.cuda.memory_allocated() >= table
    assert torch.equal(head(x), want_out)
    assert set(model.state_dict()) >= {"base_model.model.lm_head.weight"}
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    copies = head.__dict__["_qtune_copies"]
    loss, got = _eager(model, batch, 11)
    peak_after = torch.cuda.max_memory_allocated() - start
    assert head.__dict__["_qtune_copies"] == copies + 1  # one copy a forward, read by the loss and its backward
    assert loss == want_loss and all(torch.equal(got[n], want[n]) for n in want)
    assert head.__dict__["_qtune_copy"] is None and not head.__dict__["_qtune_armed"]
    del got
    model.zero_grad(set_to_none=True)
    assert torch.cuda.memory_allocated() == start  # the copy went with the head's backward
    # the copy is live from the loss's first read to the head's backward: the step's own peak grows by at most the
    # table, and the resident memory drops by all of it
    assert peak_after <= peak_before + table, (peak_before, peak_after, table)
    _replay_matches(model, batch, want_loss, want)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):  # evaluation: no backward releases the copy
        model(**batch, fused_lm_head=True)
    assert head.__dict__["_qtune_copy"] is not None
    model.zero_grad(set_to_none=True)
    _eager(model, batch, 11)                                # the next forward replaces it, its backward releases it
    assert head.__dict__["_qtune_copy"] is None


@pytest.mark.gpu
@pytest.mark.parametrize("model,quant", [("tiny_qwen3", "none"), ("tiny_qwen3", "nf4"), ("tiny_qwen3_moe", "nf4")])
def test_gpu_fifty_steps_with_and_without_graphs_end_at_the_same_loss(tmp_path, tiny_qwen3, tiny_qwen3_moe, model,
                                                                      quant):
    """The real CLI, LoRA dropout on (seeded, so the masks differ between the runs but not in distribution),
    gradient accumulation 2: with the graph and without, the last losses agree within 2 %. The MoE model trains LoRA
    on its experts (in nf4) with the load-balancing loss, which the graph's run logs too."""
    rows = {}
    moe = ("moe=expert_only",) if model.endswith("moe") else ()
    finals = _fifty_step_finals(tmp_path, f"quant={quant}", "train.device=cuda", *moe, key="train.cuda_graphs",
                                settings=("false", "auto"), marker="CUDA graph per micro-step", grad_accum=2,
                                rows_of=rows, model=model)
    assert abs(finals["auto"] - finals["false"]) <= 0.02 * finals["false"], finals
    train = [r for r in rows["auto"] if "loss" in r]  # the graph's in-graph metrics reach the log as TRL's do
    assert all(0 <= r["accuracy"] <= 1 and r["tokens"] > 0 for r in train), train[:2]
    assert train[-1]["tokens"] > train[0]["tokens"]
    if moe:
        assert all(r.get("aux_loss", 0) > 0 for r in train), train[:2]
