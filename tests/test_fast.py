"""The fast training path (qtune.modeling.fast) computes what the reference path (transformers + PEFT)
computes: the fused LoRA function layer by layer (16-bit and real bitsandbytes 4-bit layers, with and
without dropout), a whole tiny Qwen3 (loss within 1 %, LoRA gradients at cosine >= 0.99), and a 50-step
training run through the real CLI (final loss within 2 %). The `gpu` tests repeat the checks in bf16 on
CUDA with liger-kernel's RMSNorm/RoPE/SwiGLU in the path; run them on a GPU machine with `pytest -m gpu`."""
from __future__ import annotations

import json
import zlib

import pytest
import torch

from conftest import REPO, qtune_warm

CUDA = torch.cuda.is_available()


def _cos(a, b) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def _tiny_lora_model(base: str, dropout: float, device: str, dtype):
    """A two-layer MLP whose linears carry LoRA (random, non-zero B): 16-bit or bitsandbytes nf4."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 128, bias=True), torch.nn.SiLU(), torch.nn.Linear(128, 32, bias=False))
    if base == "nf4":
        import bitsandbytes as bnb

        q = torch.nn.Sequential()
        for i, layer in enumerate(net):
            if isinstance(layer, torch.nn.Linear):
                l4 = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                       compute_dtype=dtype, quant_type="nf4")
                l4.weight = bnb.nn.Params4bit(layer.weight.data.to(dtype), requires_grad=False, quant_type="nf4")
                if layer.bias is not None:
                    l4.bias = torch.nn.Parameter(layer.bias.data.to(dtype), requires_grad=False)
                q.add_module(str(i), l4)
            else:
                q.add_module(str(i), layer)
        net = q.to(device)
    else:
        net = net.to(device, dtype)
    model = get_peft_model(net, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=["0", "2"],
                                           init_lora_weights=False))
    return model


def _grads(model, x):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = model(x)
    (out.float() * torch.linspace(-1, 1, out.shape[-1], device=out.device)).sum().backward()
    g = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), x.grad.detach(), g


def _patched_equals_peft(model, x, patched: tuple[int, int], n_grads: int, atol: float, grad_atol: float):
    """PEFT's output, input gradient and LoRA gradients, then qtune's after lora.patch (which must patch `patched`
    (layers, MLP blocks)): the same within the tolerances, and exactly `n_grads` gradients on each side. Returns
    PEFT's output."""
    from qtune.modeling.fast import lora

    ref_out, ref_dx, ref_g = _grads(model, x)
    assert lora.patch(model) == patched
    out, dx, g = _grads(model, x)
    assert torch.allclose(out, ref_out, rtol=1e-4, atol=atol)
    assert torch.allclose(dx, ref_dx, rtol=1e-4, atol=atol)
    assert ref_g.keys() == g.keys() and len(g) == n_grads
    for name in g:
        assert torch.allclose(g[name], ref_g[name], rtol=1e-4, atol=grad_atol), name
    return ref_out


@pytest.mark.parametrize("base", ["linear", "nf4"])
def test_fused_lora_equals_peft_layer_by_layer(base):
    from qtune.modeling.fast import lora

    model = _tiny_lora_model(base, 0.0, "cpu", torch.float32)
    x = torch.randn(3, 5, 64)
    ref_out = _patched_equals_peft(model, x, (2, 0), 4, atol=1e-4, grad_atol=1e-5)  # lora_A/B of both layers only
    lora.unpatch(model)
    assert torch.equal(model(x), ref_out)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fused_lora_keeps_the_recomputed_4bit_weights_unless_lean(device, monkeypatch):
    """Under reentrant checkpointing a 4-bit W dequantized in the recompute serves the backward that follows: two
    dequantizations per projection a step instead of three. `lean` (offloaded activations) dequantizes again and keeps
    dropout's input instead of its output, drawing the mask again; the gradients are the same bit for bit."""
    if device == "cuda" and not CUDA:
        pytest.skip("no GPU")
    from torch.utils.checkpoint import checkpoint

    from qtune.modeling.fast import lora

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = _tiny_lora_model("nf4", 0.1, device, dtype)
    model.train()
    calls = []
    weight = lora._weight
    monkeypatch.setattr(lora, "_weight", lambda base, dt: calls.append(base) or weight(base, dt))
    x = torch.randn(4, 16, 64, device=device, dtype=dtype)
    results = {}
    for lean in (True, False):
        lora.unpatch(model)
        lora.patch(model, lean=lean)
        calls.clear()
        model.zero_grad(set_to_none=True)
        xr = x.clone().requires_grad_(True)
        out = checkpoint(model, xr, use_reentrant=True)
        (out.float() * torch.linspace(-1, 1, out.shape[-1], device=device)).sum().backward()
        results[lean] = [xr.grad] + [p.grad for p in model.parameters() if p.grad is not None]
        assert len(calls) == (6 if lean else 4), len(calls)  # 2 projections x (forward, recompute[, backward])
        # what the first projection keeps for dA: its input itself when lean, else the dropped-out copy
        first = model.base_model.model[0]
        y = first(xr)
        kept = y.grad_fn.saved_tensors[0]
        assert (kept.data_ptr() == xr.data_ptr()) == lean
    assert len(results[True]) == 5
    for a, b in zip(results[False], results[True]):
        assert torch.equal(a, b)


def test_fused_lora_dropout_gradients_follow_the_mask():
    """With dropout the adapter sees x·mask; dA, dB and dX must be those of exactly that mask, which the seed and the
    projection's salt fix (the backward draws it again instead of saving it)."""
    from qtune.modeling.fast import dropout
    from qtune.modeling.fast.lora import LoraLinear

    torch.manual_seed(1)
    base = torch.nn.Linear(16, 12)
    A = torch.randn(4, 16, requires_grad=True)
    B = torch.randn(12, 4, requires_grad=True)
    x = torch.randn(2, 7, 16, requires_grad=True)
    seed = dropout.Seed(torch.device("cpu"))
    seed.refresh()
    y = LoraLinear.apply(x, A, B, base, 0.5, (seed, 3, 0.3), True)
    w = torch.randn_like(y)
    gx, gA, gB = torch.autograd.grad((y * w).sum(), (x, A, B))

    mask = dropout.apply(torch.ones(14, 16), seed, 3, 0.3).view(2, 7, 16)
    assert torch.allclose(mask[mask != 0], torch.tensor(1 / 0.7)) and abs((mask == 0).float().mean().item() - 0.3) < 0.2
    ref = base(x) + 0.5 * ((x * mask) @ A.t()) @ B.t()
    rx, rA, rB = torch.autograd.grad((ref * w).sum(), (x, A, B))
    assert torch.allclose(y, ref, atol=1e-5)
    for got, want in ((gx, rx), (gA, rA), (gB, rB)):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.equal(dropout.apply(torch.ones(14, 16), seed, 4, 0.3), mask.view(14, 16))   # another salt
    old = seed.value
    seed.refresh()
    assert seed.value != old and not torch.equal(dropout.apply(torch.ones(14, 16), seed, 3, 0.3), mask.view(14, 16))


def test_dropout_seed_is_refreshed_once_per_training_forward(tiny_qwen3):
    """The backbone's hook draws a new seed for each training forward that keeps gradients, never for the checkpoint's
    recompute (the layers, not the backbone) nor for no-grad or eval forwards."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qtune.modeling.fast import lora

    m = AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32)
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model = get_peft_model(m, LoraConfig(r=4, lora_dropout=0.1, target_modules=["q_proj", "down_proj"]))
    lora.patch(model)
    seed = lora.seed_of(model)
    seen = []
    refresh = seed.refresh
    seed.refresh = lambda: seen.append(1) or refresh()
    ids = torch.randint(0, 100, (1, 12))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()      # forward + recompute in the backward: one refresh
    assert len(seen) == 1
    with torch.no_grad():
        model(input_ids=ids)
    model.eval()
    model(input_ids=ids)
    assert len(seen) == 1


class _MLP(torch.nn.Module):
    """Qwen3's MLP shape: down(SiLU(gate(x)) · up(x))."""

    def __init__(self, h=32, i=80):
        super().__init__()
        from transformers.activations import ACT2FN

        self.gate_proj = torch.nn.Linear(h, i, bias=False)
        self.up_proj = torch.nn.Linear(h, i, bias=False)
        self.down_proj = torch.nn.Linear(i, h, bias=False)
        self.act_fn = ACT2FN["silu"]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _mlp_model(device, dtype, dropout=0.0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    net = torch.nn.Sequential()
    net.add_module("mlp", _MLP())
    return get_peft_model(net.to(device, dtype), LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False,
                                                            target_modules=["gate_proj", "up_proj", "down_proj"]))


def test_fused_swiglu_block_equals_peft():
    model = _mlp_model("cpu", torch.float32)
    _patched_equals_peft(model, torch.randn(2, 9, 32), (3, 1), 6, atol=1e-5, grad_atol=1e-6)


def test_fused_swiglu_block_dropout_is_each_projections_own():
    """With dropout the block equals three fused projections drawing their masks in the same order."""
    from qtune.modeling.fast import lora

    model = _mlp_model("cpu", torch.float32, dropout=0.25)
    x = torch.randn(2, 9, 32)
    lora.patch(model)
    torch.manual_seed(7)
    out, dx, g = _grads(model, x)
    mlp = model.get_base_model().mlp
    del mlp.forward                          # the block steps aside: three fused projections, same RNG order
    torch.manual_seed(7)
    ref_out, ref_dx, ref_g = _grads(model, x)
    assert torch.allclose(out, ref_out, rtol=1e-4, atol=1e-5)
    assert torch.allclose(dx, ref_dx, rtol=1e-4, atol=1e-5)
    for name in g:
        assert torch.allclose(g[name], ref_g[name], rtol=1e-4, atol=1e-6), name


def test_fused_lora_steps_aside_when_the_call_is_not_plain_lora():
    """Adapters switched off (eval's base, DPO's reference) or DoRA: PEFT's own forward runs."""
    from peft import LoraConfig, get_peft_model

    from qtune.modeling.fast import lora

    model = _tiny_lora_model("linear", 0.0, "cpu", torch.float32)
    lora.patch(model)
    x = torch.randn(2, 64)
    with model.disable_adapter():
        plain = model(x)
    base = model.get_base_model()
    with torch.no_grad():
        want = base[2].base_layer(base[1](base[0].base_layer(x)))
    assert torch.allclose(plain, want)

    torch.manual_seed(0)
    dora = get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 8)),
                          LoraConfig(r=2, target_modules=["0"], use_dora=True, init_lora_weights=False))
    y = dora(torch.ones(1, 8))
    lora.patch(dora)
    assert torch.equal(dora(torch.ones(1, 8)), y)


def _qwen3_parity(model_dir, device: str, dtype, kernels: bool, offload: str = "false", overrides=("model=tiny_qwen3",),
                  seq: int = 96, experts_4bit: bool = False):
    """Loss and LoRA gradients of one packed batch, reference path vs fast path, on the same model. `model_dir` is a
    folder or a function (dtype, device) -> model. experts_4bit: the fast path keeps the experts in nf4 and the
    reference gets the same rounded weights (dequantized back to 16 bits), so both compute the same function."""
    from peft import get_peft_model

    from qtune.config import compose, to_object
    from qtune.modeling import fast as fastpath
    from qtune.modeling.load import prepare_for_training
    from qtune.modeling.targets import match, peft_config
    from transformers import AutoModelForCausalLM

    cfg = to_object(compose([*overrides, "lora.dropout=0"]))

    def build(fast_on: bool):
        torch.manual_seed(0)
        if callable(model_dir):
            m = model_dir(dtype, device)
        else:
            m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").to(device)
        if experts_4bit and not fast_on:
            import bitsandbytes.functional as bnbf

            for name, p in m.named_parameters():
                if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                    p.data = bnbf.dequantize_4bit(*bnbf.quantize_4bit(p.data, blocksize=64, quant_type="nf4"))
        m.config.use_cache = False
        prepare_for_training(m, gradient_checkpointing=True)
        fp = fastpath.decide("true" if fast_on else "false", device)
        fastpath.apply_base(fp, m, device, gradient_checkpointing=True, liger=str(kernels).lower(), offload=offload)
        matched = match(m, cfg.lora, cfg.moe)
        m = get_peft_model(m, peft_config(matched, cfg.lora, False))
        for n, p in m.named_parameters():  # B starts at zero: give it values so dA is not zero either
            if "lora_B" in n:  # seeded by the name's CRC (str's hash() changes from process to process)
                p.data.normal_(std=0.02, generator=torch.Generator(p.device).manual_seed(zlib.crc32(n.encode())))
        fastpath.apply_lora(fp, m, "nf4" if experts_4bit else "none")
        return m, fp

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 1000, (1, seq), generator=g).to(device)
    pos = torch.cat([torch.arange(seq * 5 // 12), torch.arange(seq - seq * 5 // 12)]).unsqueeze(0).to(device)  # two packed rows
    labels = ids.clone()
    labels[0, :5] = -100
    results = []
    torch.manual_seed(0)
    for fast_on in (False, True):
        m, fp = build(fast_on)
        m.train()
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            loss = m(input_ids=ids, position_ids=pos, labels=labels).loss
        loss.backward()
        grads = {n: p.grad.detach().float().cpu() for n, p in m.named_parameters() if p.requires_grad}
        results.append((loss.item(), grads, fp))
        del m
    return results


def test_tiny_qwen3_loss_and_gradients_match_the_reference(tiny_qwen3):
    (ref_loss, ref_g, _), (loss, g, fp) = _qwen3_parity(tiny_qwen3, "cpu", torch.float32, kernels=False)
    assert any("fused LoRA on 14 linear layers and 2 SwiGLU MLP blocks" in p for p in fp.pieces), fp.pieces
    assert "reentrant checkpointing" in fp.pieces
    assert abs(loss - ref_loss) <= 0.01 * abs(ref_loss)
    assert g.keys() == ref_g.keys()
    for name in g:
        assert _cos(g[name], ref_g[name]) >= 0.99, name


@pytest.mark.parametrize("moe", ["expert_only", "all"])
def test_tiny_qwen3_moe_grouped_experts_match_the_reference(tiny_qwen3_moe, moe, monkeypatch):
    """Grouped expert matmuls with split LoRA against PEFT's full-delta ParamWrapper: experts, router and attention."""
    from qtune.modeling.fast import experts as fast_moe

    calls = []
    monkeypatch.setattr(fast_moe.ExpertsLoRA, "forward", staticmethod(
        lambda ctx, *a, f=fast_moe.ExpertsLoRA.forward: calls.append(1) or f(ctx, *a)))
    (ref_loss, ref_g, _), (loss, g, fp) = _qwen3_parity(tiny_qwen3_moe, "cpu", torch.float32, kernels=False,
                                                        overrides=("model=tiny_qwen3_moe", f"moe={moe}"))
    assert "grouped-matmul experts with split LoRA in 2 MoE blocks" in fp.pieces, fp.describe()
    assert len(calls) == 4  # both blocks, forward and checkpoint recompute: not PEFT's fallback
    assert abs(loss - ref_loss) <= 1e-4 * abs(ref_loss), (loss, ref_loss)
    assert g.keys() == ref_g.keys() and any("experts" in n for n in g)
    for name in g:
        assert _cos(g[name], ref_g[name]) >= 0.9999, name
        assert torch.allclose(g[name], ref_g[name], rtol=1e-3, atol=1e-6), name


def _fifty_step_finals(tmp_path, *extra: str, key: str = "train.fast", settings=("false", "true"),
                       marker: str = "fused LoRA on", grad_accum: int = 1, rows_of: dict | None = None,
                       model: str = "tiny_qwen3") -> dict:
    """The real CLI, 50 steps with `key` at each of `settings` on the same data (the last setting's run must print
    `marker`, the first's must not): the mean of each run's last 5 losses. `rows_of`: filled with each run's
    metrics.jsonl rows."""
    finals = {}
    for setting in settings:
        out = tmp_path / setting
        p = qtune_warm("train", f"model={model}", f"data.path={REPO}/data/demo/captains_log.jsonl", "data.val_size=0",
                       "data.max_length=256", f"train.grad_accum={grad_accum}", "train.logging_steps=1",
                       "train.warmup_ratio=0", "train.report_to=[]", f"train.output_dir={out}", "train.max_steps=50",
                       "train.save_steps=50", "train.lr=2e-3", f"{key}={setting}", *extra)
        assert p.returncode == 0, p.stdout + p.stderr
        assert (marker in p.stdout) == (setting == settings[-1]), p.stdout
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in rows if "loss" in r]
        assert len(losses) == 50
        finals[setting] = sum(losses[-5:]) / 5
        if rows_of is not None:
            rows_of[setting] = rows
    return finals


@pytest.mark.slow
def test_fifty_steps_fast_and_reference_end_at_the_same_loss(tmp_path, tiny_qwen3):
    """On CPU with dropout on (different masks, same distribution)."""
    finals = _fifty_step_finals(tmp_path)
    assert abs(finals["true"] - finals["false"]) <= 0.02 * finals["false"], finals


# ---------------------------------------------------------------- on the GPU (pytest -m gpu)


@pytest.mark.gpu
@pytest.mark.parametrize("base", ["bf16", "nf4"])
def test_gpu_fused_lora_equals_peft_layer_by_layer(base):
    from qtune.modeling.fast import lora

    model = _tiny_lora_model("nf4" if base == "nf4" else "linear", 0.0, "cuda", torch.bfloat16)
    x = torch.randn(4, 256, 64, device="cuda", dtype=torch.bfloat16)
    ref_out, ref_dx, ref_g = _grads(model, x)
    lora.patch(model)
    out, dx, g = _grads(model, x)
    assert out.dtype == ref_out.dtype == torch.bfloat16
    assert (out.float() - ref_out.float()).norm() / ref_out.float().norm() < 1e-2
    assert _cos(dx, ref_dx) >= 0.999
    for name in g:
        assert g[name].dtype == ref_g[name].dtype, name
        assert _cos(g[name], ref_g[name]) >= 0.99, name


@pytest.mark.gpu
def test_gpu_fused_swiglu_block_equals_peft_in_bf16():
    from qtune.modeling.fast import lora

    model = _mlp_model("cuda", torch.bfloat16)
    x = torch.randn(4, 256, 32, device="cuda", dtype=torch.bfloat16)
    ref_out, ref_dx, ref_g = _grads(model, x)
    lora.patch(model)
    out, dx, g = _grads(model, x)
    assert (out.float() - ref_out.float()).norm() / ref_out.float().norm() < 1e-2
    assert _cos(dx, ref_dx) >= 0.999
    for name in g:
        assert _cos(g[name], ref_g[name]) >= 0.99, name


@pytest.mark.gpu
@pytest.mark.parametrize("liger,offload,piece", [
    (False, "false", "SwiGLU MLP blocks"),                           # the default fast path
    (False, "true", "layer inputs offloaded to pinned host memory"),
    (True, "false", "liger"),
], ids=["fast", "offload", "liger"])
def test_gpu_tiny_qwen3_matches_the_reference_in_bf16(tiny_qwen3, monkeypatch, liger, offload, piece):
    from qtune.modeling.fast import offload as offload_module

    monkeypatch.setattr(offload_module, "MIN_BYTES", 0)  # the tiny model's tensors are all small: offload every one
    (ref_loss, ref_g, _), (loss, g, fp) = _qwen3_parity(tiny_qwen3, "cuda", torch.bfloat16, kernels=liger,
                                                        offload=offload)
    assert any(piece in p for p in fp.pieces), fp.describe()
    if offload == "true":
        assert fp.offloader.bytes > 0
    assert abs(loss - ref_loss) <= 0.01 * abs(ref_loss), (loss, ref_loss)
    for name in g:
        assert _cos(g[name], ref_g[name]) >= 0.99, name


@pytest.mark.gpu
def test_gpu_offload_gives_back_each_tensor_its_own_copy():
    """A tensor saved again is copied once; a new tensor the allocator put in a freed one's block (same address, shape
    and version: a later layer's input where an earlier layer's was) gets a copy of its own. Matched by address, the
    backward would recompute that layer from the earlier layer's input (seen at 8192 tokens: the loss stopped falling)."""
    from qtune.modeling.fast.offload import Offloader

    off = Offloader(torch.device("cuda"))
    a = torch.full((1024, 1024), 1.0, device="cuda")
    packed_a = off.pack(a)
    assert off.pack(a) is packed_a                                    # the same tensor saved twice: one copy
    where = a.data_ptr()
    torch.cuda.synchronize()
    del a
    b = torch.full((1024, 1024), 2.0, device="cuda")
    assert b.data_ptr() == where                                      # the allocator reused the block
    assert torch.equal(Offloader.unpack(off.pack(b)), b)
    assert torch.equal(Offloader.unpack(packed_a), torch.full((1024, 1024), 1.0, device="cuda"))


@pytest.mark.gpu
def test_gpu_fifty_steps_fast_and_reference_end_at_the_same_loss(tmp_path, tiny_qwen3):
    finals = _fifty_step_finals(tmp_path, "quant=nf4", "train.device=cuda", "lora.dropout=0")
    assert abs(finals["true"] - finals["false"]) <= 0.02 * finals["false"], finals


def _a3b(layers: int):
    """A random Qwen3-30B-A3B-shaped model of `layers` layers built on the device (full-size experts and vocabulary)."""
    def make(dtype, device):
        from transformers import AutoModelForCausalLM

        from qtune.config import compose, to_object
        from qtune.modeling.arch import hf_config

        arch = to_object(compose(["model=qwen3_30b_a3b", f"model.arch.num_hidden_layers={layers}"])).model.arch
        with torch.device(device):
            m = AutoModelForCausalLM.from_config(hf_config(arch), dtype=dtype, attn_implementation="sdpa")
        return m
    return make


@pytest.mark.gpu
@pytest.mark.parametrize("what", ["tiny", "a3b", "a3b_nf4"])
def test_gpu_grouped_experts_match_the_reference_in_bf16(tiny_qwen3_moe, monkeypatch, what):
    """Tiny Qwen3-MoE and a 2-layer Qwen3-30B-A3B shape (128 experts of 2048 x 768, top-8) in bf16: grouped matmuls
    with split LoRA (and experts kept in nf4) against PEFT's full-delta path on the same weights."""
    model = tiny_qwen3_moe if what == "tiny" else _a3b(2)
    (ref_loss, ref_g, _), (loss, g, fp) = _qwen3_parity(
        model, "cuda", torch.bfloat16, kernels=False, seq=96 if what == "tiny" else 1024,
        overrides=("model=tiny_qwen3_moe" if what == "tiny" else "model=qwen3_30b_a3b", "moe=expert_only"),
        experts_4bit=what == "a3b_nf4")
    assert any("grouped-matmul experts" in p for p in fp.pieces), fp.describe()
    if what == "a3b_nf4":
        assert any("experts kept in nf4" in p for p in fp.pieces), fp.describe()
    assert abs(loss - ref_loss) <= 0.01 * abs(ref_loss), (loss, ref_loss)
    assert g.keys() == ref_g.keys() and any("experts" in n for n in g)
    for name in g:
        assert _cos(g[name], ref_g[name]) >= 0.99, (name, _cos(g[name], ref_g[name]))


def _a3b_block():
    """A 1-layer A3B-shaped bf16 model on the GPU with LoRA on its experts (frozen base, moe.patch applied): the
    PEFT model and its expert block (mlp), 16-bit experts."""
    from peft import get_peft_model

    from qtune.config import compose, to_object
    from qtune.modeling.fast import experts as moe
    from qtune.modeling.targets import match, peft_config

    cfg = to_object(compose(["model=qwen3_30b_a3b", "moe=expert_only", "lora.dropout=0"]))
    m = _a3b(1)(torch.bfloat16, "cuda")
    for p in m.parameters():
        p.requires_grad_(False)
    m = get_peft_model(m, peft_config(match(m, cfg.lora, cfg.moe), cfg.lora, False))
    assert moe.patch(m) == 1
    return m, m.base_model.model.model.layers[0].mlp


@pytest.mark.gpu
def test_gpu_nf4_experts_stay_close_to_16_bit():
    """A full-size A3B expert block with its experts in nf4: the same output as the 16-bit function on the rounded
    weights (dequantized back), an output within nf4's rounding of the 16-bit block's, and most expert memory freed."""
    import bitsandbytes.functional as bnbf

    from qtune.modeling.fast import experts as moe

    m, block = _a3b_block()
    experts = block.experts.base_layer.base_layer
    x = torch.randn(1, 2048, 2048, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        y16 = block(x)
        w16 = {n: getattr(experts, n).data.clone() for n in moe.PARAMS}
        for n in moe.PARAMS:  # the 16-bit function on the weights nf4 rounds to
            getattr(experts, n).data = bnbf.dequantize_4bit(*bnbf.quantize_4bit(w16[n], blocksize=64, quant_type="nf4"))
        y_rounded = block(x)
        for n in moe.PARAMS:
            getattr(experts, n).data = w16[n]
        del w16
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        freed, kept = moe.quantize_experts(m, "nf4")
        after = torch.cuda.memory_allocated()
        y4 = block(x)

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    experts_bytes = 128 * 3 * 2048 * 768 * 2
    assert freed > 0.7 * experts_bytes and before - after > 0.7 * experts_bytes, (freed, before - after, experts_bytes)
    assert kept < 0.3 * experts_bytes, kept
    assert rel(y4, y_rounded) < 1e-2, rel(y4, y_rounded)
    assert 0 < rel(y4, y16) < 0.25, rel(y4, y16)


@pytest.mark.gpu
def test_gpu_experts_become_4bit_while_loading(tmp_path):
    """quant=nf4 on an MoE model (fast path): each fused expert tensor turns 4-bit as it loads, so loading never holds
    more than a layer's 16-bit experts beyond the resident model, and the result equals quantizing after loading."""
    from peft import get_peft_model

    from qtune.config import compose, to_object
    from qtune.modeling.fast import experts as moe
    from qtune.modeling.load import load_model
    from qtune.modeling.targets import match, peft_config

    _a3b(4)(torch.bfloat16, "cuda").save_pretrained(tmp_path)
    torch.cuda.empty_cache()
    cfg = to_object(compose(["model=qwen3_30b_a3b", "quant=nf4", "moe=expert_only", "lora.dropout=0"]))
    ids = torch.randint(0, 151936, (1, 256), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    logits, weights = {}, {}
    for streaming in (True, False):
        torch.cuda.reset_peak_memory_stats()
        model = load_model(tmp_path, cfg.model, cfg.quant, "cuda", torch.bfloat16, False, experts_4bit=streaming)
        resident, peak = torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
        if streaming:  # a layer's conversion at a time (transformers stacks the stored experts), not all the experts
            assert peak - resident < 0.6 * 4 * 128 * 3 * 2048 * 768 * 2, (peak, resident)
        model = get_peft_model(model, peft_config(match(model, cfg.lora, cfg.moe), cfg.lora, True))
        assert moe.patch(model) == 4
        freed, kept = moe.quantize_experts(model, "nf4")
        assert (freed == 0) == streaming and kept > 0
        with torch.no_grad():
            logits[streaming] = model(input_ids=ids).logits.float()
            weights[streaming] = [moe.base_weight(m, n, torch.bfloat16).cpu() for m in model.modules()
                                  if "_qtune_4bit" in vars(m) for n in moe.PARAMS]
        del model
        torch.cuda.empty_cache()
    assert len(weights[True]) == 8 and all(torch.equal(a, b) for a, b in zip(weights[True], weights[False]))
    # the same weights; the logits differ only by the order of CUDA's atomic bf16 adds summing routed outputs (~1 % over 4 layers)
    assert (logits[True] - logits[False]).norm() / logits[False].norm() < 3e-2
