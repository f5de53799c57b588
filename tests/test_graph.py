"""train.cuda_graphs: a micro-step captured as one CUDA graph (qtune.modeling.fast.graph) computes what the eager
fast path computes, and the seeded LoRA dropout it needs (qtune.modeling.fast.dropout) draws one mask per (seed,
salt) in the forward, the checkpoint's recompute, the backward and a replay. The `gpu` tests need a GPU
(`pytest -m gpu`); the CPU tests check where graphs are refused and why."""
from __future__ import annotations

import pytest
import torch

from conftest import REPO, qtune
from test_fast import _cos, _fifty_step_finals


def _decide(**over):
    from qtune.modeling import fast as fastpath

    kw = dict(stage="sft", moe=False, processes=1, packing=True, offload=False, liger=False, dtype=torch.bfloat16,
              dropout=0.0, attention="sdpa")
    device = over.pop("device", "cuda")
    setting = over.pop("setting", "auto")
    kw.update(over)
    fp = fastpath.decide("true", device)
    fastpath.decide_graphs(fp, setting, device, **kw)
    return fp


def test_graphs_apply_only_where_a_step_has_one_shape_and_no_host_syncs():
    from qtune.errors import ConfigError

    assert _decide().graphs and "CUDA graph per micro-step" in _decide().pieces
    for over, why in [({"stage": "dpo"}, "pt and sft only"), ({"moe": True}, "grouped matmuls"),
                      ({"processes": 2}, "one process"), ({"packing": False}, "data.packing=true"),
                      ({"offload": True}, "offload_activations"), ({"liger": True}, "liger"),
                      ({"dtype": torch.float16}, "bf16 only"), ({"attention": "flash_attention_2"}, "sdpa or eager")]:
        fp = _decide(**over)
        assert not fp.graphs and any(why in n for n in fp.notes), (over, fp.notes)
        with pytest.raises(ConfigError, match=f"train.cuda_graphs=true: .*{why.split()[0]}"):
            _decide(setting="true", **over)
    assert not _decide(device="cpu").graphs and not _decide(device="cpu").notes  # nothing to say on a CPU run
    assert not _decide(setting="false").graphs
    from qtune.modeling import fast as fastpath

    with pytest.raises(ConfigError, match="needs the fast path"):
        fastpath.decide_graphs(fastpath.decide("false", "cuda"), "true", "cuda", stage="sft", moe=False, processes=1,
                               packing=True, offload=False, liger=False, dtype=torch.bfloat16, dropout=0.0,
                               attention="sdpa")


def test_cuda_graphs_setting_is_checked_in_one_line(tmp_path):
    p = qtune("train", "model=tiny_qwen3", "train.cuda_graphs=sometimes", "--dry-run")
    assert p.returncode != 0 and "train.cuda_graphs=sometimes: valid: auto, true, false" in p.stdout + p.stderr
    p = qtune("train", "model=tiny_qwen3", "train.cuda_graphs=true", f"data.path={REPO}/data/demo/captains_log.jsonl",
              "train.device=cpu", "train.max_steps=1", "train.report_to=[]", f"train.output_dir={tmp_path / 'run'}")
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
        graph = None

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


def _fast_model(model_dir, dropout: float, tied: bool = True):
    """The tiny Qwen3 in bf16 on CUDA as `qtune train` builds it with graphs on: fused LoRA (non-zero B), reentrant
    checkpointing without RNG state, TRL's fused head."""
    import zlib

    from peft import get_peft_model
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from qtune.config import compose, to_object
    from qtune.modeling import fast as fastpath
    from qtune.modeling.load import prepare_for_training
    from qtune.modeling.targets import apply_dropout, match, peft_config

    cfg = to_object(compose(["model=tiny_qwen3", f"lora.dropout={dropout}"]))
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa",
                                             **({} if tied else {"tie_word_embeddings": False})).to("cuda")
    m.config.use_cache = False
    prepare_for_training(m, gradient_checkpointing=True)
    fp = fastpath.decide("true", "cuda")
    fastpath.decide_graphs(fp, "true", "cuda", stage="sft", moe=False, processes=1, packing=True, offload=False,
                           liger=False, dtype=torch.bfloat16, dropout=dropout, attention="sdpa")
    fastpath.apply_base(fp, m, "cuda", gradient_checkpointing=True, liger=False)
    add_fused_lm_head(m, outputs=("log_probs", "entropy", "is_top1"))
    matched = match(m, cfg.lora, cfg.moe)
    m = get_peft_model(m, peft_config(matched, cfg.lora, False))
    if dropout:
        apply_dropout(m, dropout)
    for n, p in m.named_parameters():
        if "lora_B" in n:
            p.data.normal_(std=0.02, generator=torch.Generator(p.device).manual_seed(zlib.crc32(n.encode())))
    fastpath.apply_lora(fp, m)
    m.train()
    return m


def _batch(n: int):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 1000, (1, n), generator=g)
    pos = torch.cat([torch.arange(n * 5 // 12), torch.arange(n - n * 5 // 12)]).unsqueeze(0)
    labels = ids.clone()
    labels[0, :5] = -100
    labels[0, n * 5 // 12] = -100  # TRL's collator: no label on a packed sequence's first token
    return {k: v.cuda() for k, v in dict(input_ids=ids, position_ids=pos, labels=labels).items()}


def _eager(model, batch, seed: int):
    """TRL's SFT loss on the unpadded batch, eagerly; the dropout seed drawn after torch.manual_seed(seed)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(**batch, fused_lm_head=True)
    loss = -out.log_probs.sum() / out.label_mask.sum()
    loss.backward()
    return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.gpu
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gpu_graph_step_equals_the_eager_step(tiny_qwen3, dropout):
    """A replay on a batch padded to the graph's row equals the eager step on the batch itself (loss, every LoRA
    gradient), for each step's seed; gradient accumulation adds replays up as autograd adds backwards."""
    from qtune.modeling.fast.graph import GraphedStep
    from qtune.modeling.fast.lora import seed_of

    model = _fast_model(tiny_qwen3, dropout)
    batch = _batch(100)
    step = GraphedStep(model, 128, seed_of(model), pad_id=0)
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


@pytest.mark.gpu
def test_gpu_input_embeddings_read_from_host_memory(tiny_qwen3):
    """An untied embedding table moved to pinned host memory: the same loss and gradients bit for bit, eagerly and in
    a replayed graph, with the table's bytes off the GPU's allocator; a tied one stays where it is."""
    from qtune.modeling.fast.graph import GraphedStep, embeddings_to_host
    from qtune.modeling.fast.lora import seed_of

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
@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_gpu_fifty_steps_with_and_without_graphs_end_at_the_same_loss(tmp_path, tiny_qwen3, quant):
    """The real CLI, LoRA dropout on (seeded, so the masks differ between the runs but not in distribution),
    gradient accumulation 2: with the graph and without, the last losses agree within 2 %."""
    rows = {}
    finals = _fifty_step_finals(tmp_path, f"quant={quant}", "train.device=cuda", key="train.cuda_graphs",
                                settings=("false", "auto"), marker="CUDA graph per micro-step", grad_accum=2,
                                rows_of=rows)
    assert abs(finals["auto"] - finals["false"]) <= 0.02 * finals["false"], finals
    train = [r for r in rows["auto"] if "loss" in r]  # the graph's in-graph metrics reach the log as TRL's do
    assert all(0 <= r["accuracy"] <= 1 and r["tokens"] > 0 for r in train), train[:2]
    assert train[-1]["tokens"] > train[0]["tokens"]
