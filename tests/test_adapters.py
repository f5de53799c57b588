"""Per-row adapters (qtune.inference.adapters): in one forward of a mixed batch, each row computes what it computes
alone with its adapter set in PEFT (or with adapters disabled, for a base row), on the tiny Qwen3 and Qwen3-MoE
loaded as serve loads them, with adapters of different ranks, alphas and targets; a row does not depend on what
the other rows use; remove() gives PEFT's outputs back exactly. The `gpu` tests repeat it in bf16 on CUDA, on an nf4
base, and under CUDA-graph capture with the slots changed between replays (run them with `pytest -m gpu`)."""
from __future__ import annotations

import contextlib
import inspect

import pytest
import torch

from qtune.errors import QtuneError

BASE = -1
LAYERS = ("model.layers.0", "model.layers.1")
# three adapters: ranks 4 / 8 / 2, alphas 8 / 4 / 16 (c with rsLoRA), each with a module no other one targets
DENSE = {"a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"]),
         "b": dict(r=8, lora_alpha=4, target_modules=["q_proj", "o_proj", "down_proj"]),
         "c": dict(r=2, lora_alpha=16, target_modules=["k_proj", "up_proj", "v_proj"], use_rslora=True)}
EXPERTS = [f"{layer}.mlp.experts.{p}" for layer in LAYERS for p in ("gate_up_proj", "down_proj")]
ROUTERS = [f"{layer}.mlp.gate.weight" for layer in LAYERS]


def _moe(params):
    """PEFT loads MoE adapters side by side only when they target the same expert/router parameters."""
    return {"a": dict(r=4, lora_alpha=8, target_modules=["q_proj"], target_parameters=params),
            "b": dict(r=8, lora_alpha=4, target_modules=["o_proj", "v_proj"], target_parameters=params),
            "c": dict(r=2, lora_alpha=16, target_modules=["q_proj", "k_proj"], target_parameters=params)}


def _make_adapters(folder, tmp_path, specs, device="cpu", dtype=torch.float32) -> dict:
    """Save one random adapter per spec (non-zero A and B, large enough to move the logits) over `folder`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = {}
    for seed, (name, spec) in enumerate(specs.items()):
        base = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map={"": device})
        model = get_peft_model(base, LoraConfig(init_lora_weights=False, **spec))
        torch.manual_seed(100 + seed)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.normal_(0, 0.3)
        model.save_pretrained(tmp_path / name)
        out[name] = tmp_path / name
    return out


def _served(model_name, adapters, device="cpu", dtype=torch.float32, quant=None):
    """The base and its adapters as `qtune serve` loads them (qtune.inference.load.load_with_adapters)."""
    from qtune.config import compose, to_object
    from qtune.inference.load import load_with_adapters

    rcfg = to_object(compose([f"model={model_name}"] + ([f"quant={quant}"] if quant else [])))
    return load_with_adapters(rcfg, adapters, device, dtype)


def _alone(model, name, ids, **kwargs):
    """PEFT's own output for `ids` with adapter `name` (None: adapters disabled)."""
    ctx = model.disable_adapter() if name is None else contextlib.nullcontext()
    if name is not None:
        model.set_adapter(name)
    with ctx, torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def _rows_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _check_mixed(model, names, index, ids, atol, strategy="auto"):
    """Every row of one mixed forward equals that row alone in PEFT; returns the mixed logits."""
    from qtune.inference.adapters import RowAdapters

    want = [_alone(model, None if i == BASE else names[i], ids[b:b + 1]) for b, i in enumerate(index)]
    with RowAdapters(model, names, strategy=strategy) as rows:
        rows.select(index)
        got = _rows_logits(model, ids)
    for b, w in enumerate(want):
        assert torch.allclose(got[b:b + 1], w, rtol=0, atol=atol), (b, index[b], (got[b:b + 1] - w).abs().max())
    return got


@pytest.fixture(scope="module")
def dense_adapters(tiny_qwen3, tmp_path_factory):
    return _make_adapters(tiny_qwen3, tmp_path_factory.mktemp("dense"), DENSE)


@pytest.fixture(scope="module")
def dense(dense_adapters):
    return _served("tiny_qwen3", dense_adapters)


@pytest.fixture(scope="module", params=["experts", "experts+router"])
def moe(request, tiny_qwen3_moe, tmp_path_factory):
    params = EXPERTS + (ROUTERS if request.param == "experts+router" else [])
    return _served("tiny_qwen3_moe", _make_adapters(tiny_qwen3_moe, tmp_path_factory.mktemp("moe"), _moe(params)))


def _ids(rows, tokens, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 5000, (rows, tokens), generator=g)


def test_the_adapters_differ_from_each_other_and_from_the_base(dense):
    """What the other tests compare would be vacuous if the adapters moved nothing."""
    ids = _ids(1, 6)
    outs = [_alone(dense, n, ids) for n in (None, "a", "b", "c")]
    for i in range(4):
        for j in range(i):
            assert (outs[i] - outs[j]).abs().max() > 1e-2, (i, j)


@pytest.mark.parametrize("strategy", ["auto", "mask", "gather"])
def test_a_mixed_batch_computes_each_row_as_alone(dense, strategy):
    names = ["a", "b", "c"]
    ids = _ids(5, 7)
    _check_mixed(dense, names, [0, 1, BASE, 2, 1], ids, 1e-5, strategy)
    # a lone row (the prefill of one request: B = 1, T = C) and one-token rows (decode's shape)
    for i in (0, 1, 2, BASE):
        _check_mixed(dense, names, [i], _ids(1, 9, seed=i + 2), 1e-5, strategy)
    _check_mixed(dense, names, [2, 2, 0, BASE], _ids(4, 1, seed=7), 1e-5, strategy)


def test_decoding_with_the_cache_steps_each_row_as_alone(dense):
    """Rows prefilled one at a time (B = 1, T = C), then decoded together one token a step on one KV cache."""
    from transformers import DynamicCache

    from qtune.inference.adapters import RowAdapters

    names, index = ["a", "b", "c"], [1, BASE, 0, 2]
    prompts, steps = _ids(4, 5, seed=3), _ids(4, 3, seed=4)
    # transformers 5.2x renamed past_key_values to cache
    key = "cache" if "cache" in inspect.signature(dense.get_base_model().forward).parameters else "past_key_values"
    want = []
    for b, i in enumerate(index):
        full = torch.cat([prompts[b:b + 1], steps[b:b + 1]], dim=1)
        want.append(_alone(dense, None if i == BASE else names[i], full)[:, -3:])
    with RowAdapters(dense, names) as rows, torch.no_grad():
        caches = []
        for b, i in enumerate(index):
            rows.select([i])
            cache = DynamicCache(config=dense.get_base_model().config)
            dense(input_ids=prompts[b:b + 1], use_cache=True, **{key: cache})
            caches.append(cache)
        cache = caches[0]
        for layer in range(len(cache.layers)):     # the rows' caches side by side (all prompts have one length)
            cache.layers[layer].keys = torch.cat([c.layers[layer].keys for c in caches])
            cache.layers[layer].values = torch.cat([c.layers[layer].values for c in caches])
        rows.select(index)
        got = [dense(input_ids=steps[:, t:t + 1], use_cache=True, **{key: cache}).logits for t in range(3)]
    got = torch.cat(got, dim=1)
    for b in range(4):
        assert torch.allclose(got[b:b + 1], want[b], rtol=0, atol=1e-5), b


def test_a_mixed_batch_on_a_4bit_base(dense_adapters):
    """quant=nf4: PEFT's Linear4bit over bitsandbytes' layers (which run on the CPU too), as serve loads a QLoRA run."""
    model = _served("tiny_qwen3", dense_adapters, quant="nf4")
    assert sum(type(m.get_base_layer()).__name__ == "Linear4bit" for m in model.modules() if hasattr(m, "lora_A")) > 4
    # bitsandbytes computes the 4-bit layers in bf16: an fp32 difference of 1e-6 in a layer's input (the mixed rows'
    # LoRA sum in another order) can round one activation to its neighbouring bf16 value, ~2e-3 in the logits on
    # some CPUs. An adapter moves these logits by more than 1, so 1e-2 still tells a wrong adapter from the right one.
    _check_mixed(model, ["a", "b", "c"], [2, BASE, 0, 1], _ids(4, 5, seed=15), 1e-2)
    _check_mixed(model, ["a", "b", "c"], [1], _ids(1, 8, seed=16), 1e-5)


def test_a_row_does_not_depend_on_the_other_rows(dense):
    from qtune.inference.adapters import RowAdapters

    ids = _ids(4, 6, seed=5)
    with RowAdapters(dense, ["a", "b", "c"]) as rows:
        outs = []
        for others in ([0, 0, 0], [1, 2, BASE], [BASE, BASE, BASE], [2, 1, 1]):
            rows.select([1, *others])
            outs.append(_rows_logits(dense, ids)[0])
    assert all(torch.equal(o, outs[0]) for o in outs[1:])


def test_remove_gives_peft_outputs_back_exactly(dense):
    from qtune.inference.adapters import RowAdapters

    ids = _ids(2, 6, seed=6)
    before = {n: _alone(dense, n, ids) for n in ("b", None)}
    rows = RowAdapters(dense, ["b", "a"])
    rows.select([1, 0])
    _rows_logits(dense, ids)
    rows.remove()
    assert all(torch.equal(_alone(dense, n, ids), before[n]) for n in before)
    assert not any("forward" in vars(m) for m in dense.modules())


def test_a_subset_of_the_loaded_adapters_and_refresh(dense):
    """Slots count the names given (here c then a; b is loaded but not served); refresh() reads changed weights."""
    from qtune.inference.adapters import RowAdapters

    ids = _ids(3, 4, seed=8)
    _check_mixed(dense, ["c", "a"], [1, 0, BASE], ids, atol=1e-5)
    layer = dense.base_model.model.model.layers[0].self_attn.q_proj
    with RowAdapters(dense, ["a"]) as rows:
        rows.select([0])
        old = _rows_logits(dense, ids[:1])
        with torch.no_grad():
            layer.lora_B["a"].weight.mul_(2)
        assert torch.equal(_rows_logits(dense, ids[:1]), old)   # the stacks are copies ...
        rows.refresh()                                           # ... until refreshed
        new = _rows_logits(dense, ids[:1])
    try:
        assert torch.allclose(new, _alone(dense, "a", ids[:1]), rtol=0, atol=1e-5)
        assert (new - old).abs().max() > 1e-3
    finally:
        with torch.no_grad():
            layer.lora_B["a"].weight.div_(2)


@pytest.mark.parametrize("strategy", ["auto", "mask"])
def test_moe_mixed_batch_computes_each_row_as_alone(moe, strategy):
    names = ["a", "b", "c"]
    ids = _ids(5, 6, seed=9)
    alone = [_alone(moe, n, ids[:1]) for n in (None, "a", "b", "c")]
    assert all((alone[i] - alone[j]).abs().max() > 1e-2 for i in range(4) for j in range(i))
    _check_mixed(moe, names, [0, 1, BASE, 2, 0], ids, 1e-4, strategy)
    for i in (0, 2, BASE):
        _check_mixed(moe, names, [i], _ids(1, 8, seed=10 + i), 1e-4, strategy)
    _check_mixed(moe, names, [1, 0, 2, BASE], _ids(4, 1, seed=11), 1e-4, strategy)


def test_moe_row_independence_and_remove(moe):
    from qtune.inference.adapters import RowAdapters

    ids = _ids(3, 5, seed=12)
    before = _alone(moe, "b", ids)
    with RowAdapters(moe, ["a", "b", "c"]) as rows:
        outs = []
        for others in ([0, 0], [2, BASE], [1, 1]):
            rows.select([2, *others])
            outs.append(_rows_logits(moe, ids)[0])
    # the experts' grouped matmuls see the other rows' tokens in their groups: equal to float rounding
    assert all(torch.allclose(o, outs[0], rtol=0, atol=1e-5) for o in outs[1:])
    assert torch.equal(_alone(moe, "b", ids), before)


def test_refusals_are_one_line(dense, tiny_qwen3, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qtune.inference.adapters import RowAdapters

    with pytest.raises(QtuneError, match=r"per-row adapters: zz not loaded in this model \(loaded: a, b, c\)"):
        RowAdapters(dense, ["a", "zz"])
    with RowAdapters(dense, ["a", "b"], max_batch=4) as rows:
        with pytest.raises(QtuneError, match="slot 2 is none of -1"):
            rows.select([0, 2])
        with pytest.raises(QtuneError, match="5 rows; 1 to max_batch=4"):
            rows.select([0] * 5)
        with pytest.raises(QtuneError, match="installed already"):
            RowAdapters(dense, ["a"])
        assert (rows.index_of("b"), rows.index_of(None)) == (1, BASE)
        rows.select(["b", None, "a"])
        assert rows.slots[:4].tolist() == [1, BASE, 0, BASE]
        with pytest.raises(QtuneError, match="no adapter c among a, b"):
            rows.index_of("c")
    base = AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32)
    dora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(QtuneError, match="adapter default uses DoRA.*serve it merged"):
        RowAdapters(dora, ["default"])
    base = AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32)
    emb = get_peft_model(base, LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    with pytest.raises(QtuneError, match="adapter default has a Embedding LoRA layer at .*embed_tokens"):
        RowAdapters(emb, ["default"])
    from qtune.modeling.fast import lora

    base = AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32)
    fast = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"]))
    lora.patch(fast)
    with pytest.raises(QtuneError, match="training fast path; call qtune.modeling.fast.lora.unpatch"):
        RowAdapters(fast, ["default"])
    lora.unpatch(fast)
    RowAdapters(fast, ["default"]).remove()


def test_the_microbench_check_runs():
    """bench/multilora_microbench.py --check: the benchmark's own code on the CPU, each way checked against PEFT."""
    import subprocess
    import sys

    from conftest import REPO

    p = subprocess.run([sys.executable, str(REPO / "bench" / "multilora_microbench.py"), "--check"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and "check: every way equals PEFT row by row" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]


# ------------------------------------------------------------------------------------------------------------ GPU

CUDA = torch.cuda.is_available()


def _gpu_model(model_name, folder, tmp_path, specs, quant=None):
    return _served(model_name, _make_adapters(folder, tmp_path, specs, "cuda", torch.bfloat16), "cuda",
                   torch.bfloat16, quant)


def _close_bf16(got, want, share: float = 1.0):
    """bf16 logits, token by token: PEFT computes the adapters in fp32 (it keeps their weights in fp32), the rows in
    bf16. In an MoE a bf16 rounding can flip a token's top-k experts, and that token's logits differ (by as much as
    two adapters' do), so `share` of the tokens must agree there. Returns (ok, what was measured)."""
    err = (got.float() - want.float()).abs().amax(-1).flatten()
    tol = 0.03 * want.float().abs().max().item() + 0.02
    agree = (err <= tol).float().mean().item()
    return agree >= share, (agree, err.max().item(), tol)


@pytest.mark.gpu
@pytest.mark.parametrize("model_name,quant", [("tiny_qwen3", None), ("tiny_qwen3", "nf4"), ("tiny_qwen3_moe", None),
                                              ("tiny_qwen3_moe", "nf4")])
def test_gpu_mixed_batch_in_bf16(model_name, quant, tiny_qwen3, tiny_qwen3_moe, tmp_path):
    """bf16 on CUDA, a 16-bit or nf4 (bitsandbytes Linear4bit) base; each row against PEFT alone."""
    if quant == "nf4":
        pytest.importorskip("bitsandbytes")
    from qtune.inference.adapters import RowAdapters

    folder = tiny_qwen3 if model_name == "tiny_qwen3" else tiny_qwen3_moe
    specs = DENSE if model_name == "tiny_qwen3" else _moe(EXPERTS + ROUTERS)
    model = _gpu_model(model_name, folder, tmp_path, specs, quant)
    if quant == "nf4":
        assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    share = 1.0 if model_name == "tiny_qwen3" else 0.5
    names, index = ["a", "b", "c"], [0, 1, BASE, 2, 1, 0]
    ids = _ids(len(index), 7, seed=13).cuda()
    want = [_alone(model, None if i == BASE else names[i], ids[b:b + 1]) for b, i in enumerate(index)]
    # the tolerance is far below what tells the adapters apart
    assert not _close_bf16(want[0], _alone(model, "b", ids[:1]), 0.3)[0]
    with RowAdapters(model, names) as rows:
        rows.select(index)
        got = _rows_logits(model, ids)
        for b, w in enumerate(want):
            ok, why = _close_bf16(got[b:b + 1], w, share)
            assert ok, (b, why)
        rows.select([1])                            # a lone row: the gathered path
        ok, why = _close_bf16(_rows_logits(model, ids[:1]), _alone(model, "b", ids[:1]), share)
        assert ok, why


@pytest.mark.gpu
@pytest.mark.parametrize("model_name,quant", [("tiny_qwen3", None), ("tiny_qwen3", "nf4"), ("tiny_qwen3_moe", None)])
def test_gpu_cuda_graph_replays_follow_select(model_name, quant, tiny_qwen3, tiny_qwen3_moe, tmp_path):
    """A forward captured once as a CUDA graph, replayed after select() changed the rows' slots (a list between
    replays, then a device tensor): each replay equals the eager forward with those slots, and the slots change it."""
    if quant == "nf4":
        pytest.importorskip("bitsandbytes")
    from qtune.inference.adapters import RowAdapters

    folder = tiny_qwen3 if model_name == "tiny_qwen3" else tiny_qwen3_moe
    specs = DENSE if model_name == "tiny_qwen3" else _moe(EXPERTS)
    model = _gpu_model(model_name, folder, tmp_path, specs, quant)
    names = ["a", "b", "c"]
    for tokens in (1, 6):                          # decode's shape (the wide LoRA), and a lone row's prefill (gather)
        rows_n = 4 if tokens == 1 else 1
        ids = _ids(rows_n, tokens, seed=14).cuda()
        # as the engine does: the model's own 4-D additive mask (transformers takes it as it is), no cache to grow
        mask = torch.full((tokens, tokens), float("-inf"), device="cuda").triu(1).to(torch.bfloat16)
        kwargs = dict(input_ids=ids, attention_mask=mask[None, None].expand(rows_n, 1, tokens, tokens),
                      use_cache=False)
        with RowAdapters(model, names, max_batch=8) as rows, torch.no_grad():
            first = [0, 1, BASE, 2][:rows_n]
            rows.select(first)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):                 # warm-up outside the capture (lazy inits, kernel choices)
                    model(**kwargs)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = model(**kwargs).logits
            seen = []
            for index in (first, [2, 0, 1, 1][:rows_n], [BASE, BASE, 0, 1][:rows_n]):
                rows.select(index)
                graph.replay()
                torch.cuda.synchronize()
                eager = model(**kwargs).logits
                assert torch.allclose(out, eager, rtol=1e-2, atol=1e-2), (tokens, index)
                seen.append(out.clone())
            rows.select(torch.tensor(first, device="cuda"))
            graph.replay()
            assert torch.allclose(out, seen[0], rtol=1e-2, atol=1e-2)
        assert not torch.allclose(seen[0], seen[1], rtol=1e-2, atol=1e-2)
