"""qtune.inference.engine: batched decoding, eagerly on CPU against one-at-a-time `generate`; on a GPU (pytest -m gpu)
its captured steps against its eager ones, on a 4-bit base with an unmerged adapter and on a 16-bit one."""
from __future__ import annotations

import pytest
import torch

PROMPTS = [[1, 504, 3575, 282, 4649, 314, 216], [5, 9, 2], [77, 78, 79, 80, 81, 82, 83, 84, 85, 86, 87], [42]]


@pytest.fixture(scope="module")
def model(tiny_qwen3):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32)
    m.eval()
    return m


@pytest.fixture(scope="module")
def adapted(tiny_qwen3):
    """The tiny Qwen3 with a LoRA adapter whose B is not zero (so the adapter changes what it says)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(3)
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    peft.train()   # as GRPO hands it over: in training mode
    return peft


def one_at_a_time(model, prompt, n, eos):
    ids = torch.tensor([prompt])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=eos or None, pad_token_id=0)[0, len(prompt):].tolist()
    if eos:
        end = next((j + 1 for j, t in enumerate(out) if t in eos), len(out))
        out = out[:end]
    return out


@pytest.mark.parametrize("which", ["model", "adapted"])
def test_batched_greedy_equals_each_prompt_alone(which, request):
    from qtune.inference.engine import BatchDecoder

    m = request.getfixturevalue(which)
    engine = BatchDecoder(m, graph=False, eos=[])
    got = engine.generate(PROMPTS, 12)
    was = m.training
    m.eval()
    want = [one_at_a_time(m, p, 12, []) for p in PROMPTS]
    m.train(was)
    assert got == want
    assert m.training == was                        # the engine gives the model back in the mode it found it
    # a row ends at its first end-of-text token (kept, as TRL keeps it), the others go on
    stop = want[1][5]
    ended = BatchDecoder(m, graph=False, eos=[stop]).generate(PROMPTS, 12)
    for g, w in zip(ended, want):
        assert g == (w[:w.index(stop) + 1] if stop in w else w)
    assert len(ended[1]) <= 6


def test_a_batch_reuses_its_cache_and_pads_to_its_bucket(model):
    from qtune.inference.engine import BatchDecoder, batch_bucket, cache_length

    assert [batch_bucket(n) for n in (1, 2, 3, 5, 8, 9, 64, 65)] == [1, 2, 4, 8, 8, 16, 64, 72]
    assert (cache_length(1), cache_length(128), cache_length(129)) == (128, 128, 256)
    engine = BatchDecoder(model, graph=False, eos=[])
    first = engine.generate(PROMPTS[:3], 8)          # 3 rows in a batch of 4
    again = engine.generate(PROMPTS[:3], 8)
    assert first == again and len(engine.steps) == 1 and next(iter(engine.steps)) == (4, 128, 0, False)
    assert engine.generate([PROMPTS[0]], 8)[0] == first[0]
    engine.release()                                 # train.grpo.rollout_cache=free: nothing kept between rounds
    assert not engine.steps and engine.generate(PROMPTS[:3], 8) == first


@pytest.mark.parametrize("top_k", [4, 0])
def test_draws_follow_temperature_and_top_p(model, top_k):
    from qtune.inference.engine import Sampling, _Batch

    step = _Batch(model, 256, 128, top_k, nucleus=True, eos=[], pad=0, graph=False)
    # pick() reads only the logits it is given: 64 of them stand for a vocabulary (a full one's sort is slow on CPU)
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0] + [-30.0] * 59).expand(256, -1)
    n, tolerance = 256 * 6, 3 * (0.25 / (256 * 6)) ** 0.5

    def draws(temperature, top_p):
        step.temperature.fill_(temperature)
        step.top_p.fill_(top_p)
        step.greedy.fill_(False)
        torch.manual_seed(0)
        return torch.cat([step.pick(logits)[:, 0] for _ in range(6)])

    want = logits[0].softmax(-1)[:5]
    got = torch.bincount(draws(1.0, 1.0), minlength=5)[:5].float() / n
    if top_k:
        want = logits[0, :top_k].softmax(-1)
        got = got[:top_k]
    assert (got - want).abs().max() < tolerance, (got, want)
    # top-p 0.8: the two most likely tokens hold 0.83 of the mass, the first alone 0.61
    d = draws(1.0, 0.8)
    assert set(d.tolist()) == {0, 1}
    p = logits[0].softmax(-1)
    assert abs((d == 0).float().mean() - p[0] / (p[0] + p[1])) < tolerance
    # temperature 2 flattens: token 1's share over token 0's is exp((1 - 2) / 2)
    d = draws(2.0, 1.0)
    ratio = (d == 1).float().sum() / (d == 0).float().sum()
    assert abs(ratio - torch.exp(torch.tensor(-0.5))) < 0.1
    # a greedy row in a sampled batch takes the argmax
    step.greedy[:128] = True
    assert (step.pick(logits)[:128] == 0).all()
    assert Sampling().temperature == 1.0


# the GPU scripts' start: the tiny Qwen3 on CUDA, its base in nf4 or bf16
_GPU_BASE = """
import json, sys, threading, torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
from peft import LoraConfig, get_peft_model
path, kind = sys.argv[1:]
if kind == "nf4":
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map={"": 0}, quantization_config=
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                           bnb_4bit_use_double_quant=True))
else:
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda()
"""

_GPU = _GPU_BASE + """
from qtune.inference.engine import BatchDecoder, Sampling
m = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                       "gate_proj", "up_proj", "down_proj"]))
torch.manual_seed(0)
for n, p in m.named_parameters():
    if "lora_B" in n:
        p.data.normal_(0, 0.05)
if kind == "nf4-fast":
    pass
prompts = [[11 + i + j for j in range(5 + 3 * i)] for i in range(12)]
graphed = BatchDecoder(m, graph=True, eos=[])
eager = BatchDecoder(m, graph=False, eos=[])
g = graphed.generate(prompts, 40)
e = eager.generate(prompts, 40)
# after an optimizer-like in-place update of the adapter, the same graph reads the new weights
with torch.no_grad():
    for n, p in m.named_parameters():
        if "lora_B" in n:
            p.add_(0.05)
g2 = graphed.generate(prompts, 40)
e2 = eager.generate(prompts, 40)
s = graphed.generate(prompts, 40, Sampling(temperature=0.9, top_p=0.9))
print(json.dumps({"same": g == e, "same_after_update": g2 == e2, "changed": g2 != g,
                  "captured": all(b.graph is not None for b in graphed.steps.values()),
                  "keys": [list(k) for k in graphed.steps], "sampled_lengths": [len(x) for x in s],
                  "agree": sum(a == b for x, y in zip(g, e) for a, b in zip(x, y)) / sum(len(x) for x in g)}))
"""


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["nf4", "bf16"])
def test_gpu_captured_batched_steps_equal_eager_ones_on_an_adapter(tiny_qwen3, kind):
    """The captured step is the eager one, token for token (bf16 both ways: the same kernels), on an nf4 or bf16
    base with an unmerged adapter, and still after the adapter's weights change in place."""
    import json
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", _GPU, str(tiny_qwen3), kind], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["captured"] and got["same"] and got["same_after_update"] and got["changed"], got
    assert got["sampled_lengths"] == [40] * 12, got


@pytest.mark.gpu
def test_gpu_a_dense_nf4_projection_read_in_4_bits_equals_its_dequantized_product():
    """Decoding's forward (no gradients, up to DECODE_ROWS rows) reads a dense nf4 W through the grouped 4-bit kernel
    as one group: the same product as bitsandbytes' dequantize + matmul, up to the order of fp32 sums."""
    import bitsandbytes as bnb

    from qtune.modeling.fast import lora

    torch.manual_seed(0)
    for out_f, in_f in ((4096, 4096), (1024, 4096), (4096, 12288), (128, 256)):
        layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                                  compress_statistics=True).cuda()
        for rows in (1, 7, 64, 256):
            x = torch.randn(rows, in_f, device="cuda", dtype=torch.bfloat16)
            got = lora._four_bit_product(layer, x)
            assert got is not None, (out_f, in_f)
            want = (x.float() @ lora._weight(layer, torch.float32).t())
            err = (got.float() - want).abs().max() / want.abs().max()
            assert err < 1e-2, (out_f, in_f, rows, float(err))
        assert lora._four_bit_product(layer, torch.randn(257, in_f, device="cuda", dtype=torch.bfloat16)) is None


# -- continuous batching (Scheduler) ---------------------------------------------------------------------------------

def run_jobs(model, jobs, slots=3, length=64, chunk=4, eos=(), **kw):
    """Submit every job at once to a Scheduler of `slots` slots (so some wait and join as others leave) and wait
    for them all; returns each job's (tokens, finish reason)."""
    import threading

    from qtune.inference.engine import Job, Scheduler

    sched = Scheduler(model, slots=slots, length=length, eos=list(eos), graph=False, chunk=chunk, **kw)
    out, ended = [], []
    try:
        for spec in jobs:
            tokens, done = [], threading.Event()
            box = {}
            job = Job(on_token=lambda t, lp, tokens=tokens: tokens.append(t),
                      on_end=lambda r, box=box, done=done: (box.setdefault("reason", r), done.set()), **spec)
            out.append((tokens, box, done, job))
            assert sched.submit(job)
        for tokens, box, done, _ in out:
            assert done.wait(120), "a job never ended"
            ended.append((tokens, box["reason"]))
    finally:
        sched.close()
    return ended


@pytest.mark.parametrize("which,overlap,chunk", [("model", False, 4), ("adapted", False, 4), ("model", True, 4),
                                                 ("model", False, 40), ("adapted", True, 40)])
def test_continuous_batching_greedy_equals_each_prompt_alone(which, overlap, chunk, request):
    """Seven requests of different lengths and budgets through 3 slots: requests join as others leave, and each
    decodes token for token what it decodes alone. chunk 4: one 4-token piece of one prompt a turn; chunk 40:
    several prompts side by side in one forward, padded to the longest piece, and the 45-token prompt in two
    pieces, its second beside other rows' first. overlap: each step's tokens are read after the next step is
    launched (a GPU's default), so rows that end take one step more, dropped."""
    m = request.getfixturevalue(which)
    m.eval()
    prompts = [list(range(400, 445))] + PROMPTS + [[7] * 13, list(range(300, 318))]
    budgets = [8, 12, 3, 9, 15, 6, 10]
    got = run_jobs(m, [dict(prompt=p, max_new_tokens=n) for p, n in zip(prompts, budgets)], overlap=overlap,
                   chunk=chunk)
    want = [one_at_a_time(m, p, n, []) for p, n in zip(prompts, budgets)]
    assert [g[0] for g in got] == want
    assert all(g[1] == "length" for g in got)
    # an end-of-text token ends its row (kept), the others go on
    stop = want[1][4]
    got = run_jobs(m, [dict(prompt=p, max_new_tokens=n) for p, n in zip(prompts, budgets)], eos=[stop],
                   overlap=overlap, chunk=chunk)
    want = [one_at_a_time(m, p, n, [stop]) for p, n in zip(prompts, budgets)]
    assert [g[0] for g in got] == want
    assert got[1][1] == "stop"


def test_a_warm_up_prefill_leaves_the_engine_as_it_found_it(model):
    """Scheduler.capture's warm-up prefills (serve's start on a GPU) run throwaway prompts through the first slots:
    the jobs after them, in those slots, decode what they decode alone."""
    import threading

    from qtune.inference.engine import Job, Scheduler

    sched = Scheduler(model, slots=2, length=64, eos=[], graph=False, chunk=8)
    try:
        with sched.lock:
            sched._warm_prefill()
            assert not sched.running and not sched.filling and sched.columns.tolist() == [64, 64]
        got = []
        for prompt in PROMPTS[:2]:
            tokens, done = [], threading.Event()
            got.append((tokens, done))
            assert sched.submit(Job(prompt=prompt, max_new_tokens=6, on_token=lambda t, lp, tokens=tokens:
                                    tokens.append(t), on_end=lambda r, done=done: done.set()))
        assert all(done.wait(120) for _, done in got)
        assert [t for t, _ in got] == [one_at_a_time(model, p, 6, []) for p in PROMPTS[:2]]
    finally:
        sched.close()


def test_a_seeded_request_draws_the_same_alone_and_in_company(model):
    """Draws hash the request's seed, position and token: the same seed gives the same text whatever else runs."""
    sampled = dict(prompt=PROMPTS[0], max_new_tokens=10, temperature=1.0, top_p=0.9, seed=1234)
    alone = run_jobs(model, [sampled], slots=1)[0][0]
    crowd = run_jobs(model, [dict(prompt=PROMPTS[2], max_new_tokens=7, temperature=0.7, seed=5),
                             dict(prompt=PROMPTS[1], max_new_tokens=12), sampled,
                             dict(prompt=PROMPTS[3], max_new_tokens=4, temperature=1.3, top_k=5)], slots=4)
    assert crowd[2][0] == alone
    other = run_jobs(model, [{**sampled, "seed": 4321}], slots=1)[0][0]
    assert other != alone      # (10 draws at temperature 1 from a random model: equal only by a fluke)


def test_logit_bias_and_penalties_shape_the_rows_that_ask_for_them(model):
    biased = run_jobs(model, [dict(prompt=PROMPTS[0], max_new_tokens=6, logit_bias={321: 100.0}),
                              dict(prompt=PROMPTS[0], max_new_tokens=6)], slots=2)
    assert biased[0][0] == [321] * 6
    assert biased[1][0] == one_at_a_time(model, PROMPTS[0], 6, [])
    # a frequency penalty this large forbids any token twice
    fresh = run_jobs(model, [dict(prompt=PROMPTS[3], max_new_tokens=20, frequency_penalty=100.0)], slots=1)[0][0]
    assert len(set(fresh)) == len(fresh)


def test_a_cancelled_request_frees_its_slot_for_the_next(model):
    import threading

    from qtune.inference.engine import Job, Scheduler

    sched = Scheduler(model, slots=1, length=512, eos=[], graph=False)
    try:
        first_token = threading.Event()
        reasons = {}
        long = Job(prompt=PROMPTS[0], max_new_tokens=400, on_token=lambda t, lp: first_token.set(),
                   on_end=lambda r: reasons.setdefault("long", r))
        ended = threading.Event()
        tokens = []
        short = Job(prompt=PROMPTS[1], max_new_tokens=5, on_token=lambda t, lp: tokens.append(t),
                    on_end=lambda r: (reasons.setdefault("short", r), ended.set()))
        assert sched.submit(long) and sched.submit(short)
        assert first_token.wait(60)
        long.cancel()
        assert ended.wait(60)
        assert reasons == {"long": "cancelled", "short": "length"}
        assert tokens == one_at_a_time(model, PROMPTS[1], 5, [])
    finally:
        sched.close()


@pytest.mark.parametrize("overlap", [False, True])
def test_log_probabilities_are_the_model_s(model, overlap):
    got = []
    from qtune.inference.engine import Job, Scheduler
    import threading

    sched = Scheduler(model, slots=2, length=64, eos=[], graph=False, top_logprobs=5, overlap=overlap)
    done = threading.Event()
    try:
        sched.submit(Job(prompt=PROMPTS[0], max_new_tokens=3, top_logprobs=3,
                         on_token=lambda t, lp: got.append((t, lp)), on_end=lambda r: done.set()))
        assert done.wait(60)
    finally:
        sched.close()
    ids = torch.tensor([PROMPTS[0] + [t for t, _ in got[:-1]]])
    with torch.no_grad():
        lp = model(input_ids=ids).logits[0, len(PROMPTS[0]) - 1:].float().log_softmax(-1)
    for i, (t, (chosen, top)) in enumerate(got):
        assert chosen == pytest.approx(lp[i, t].item(), abs=1e-4)
        assert [x for x, _ in top] == lp[i].topk(3).indices.tolist()
        assert top[0][0] == t     # greedy: the most likely


_GPU_SCHED = _GPU_BASE + """
from qtune.inference.engine import Job, Scheduler
parity = None
if kind == "served":   # what serve adds on a GPU (liger kernels, fused siblings): logits beside the reference's
    from qtune.inference.fused import fuse_siblings
    from qtune.modeling.fast import liger_for_decoding
    ids = torch.tensor([[11 + j for j in range(40)], [50 + j for j in range(40)]], device="cuda")
    with torch.no_grad():
        ref = [base(input_ids=ids).logits.float(), base(input_ids=ids[:1, :1]).logits.float()]
        assert liger_for_decoding(base, "true").startswith("liger")
        from transformers.models.qwen3 import modeling_qwen3
        assert hasattr(modeling_qwen3.apply_rotary_pos_emb, "qtune_single_row")   # liger's RoPE for one token a row
        assert fuse_siblings(base) == 2 * base.config.num_hidden_layers
        got = [base(input_ids=ids).logits.float(), base(input_ids=ids[:1, :1]).logits.float()]
    parity = max(float((g - r).abs().max() / r.abs().max()) for g, r in zip(got, ref))
if kind == "mixed":    # per-row adapters over fused siblings, as serve runs them
    from qtune.inference.fused import fuse_siblings
    assert fuse_siblings(base) == 2 * base.config.num_hidden_layers
m = base if kind in ("plain", "served") else get_peft_model(
    base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"]),
    adapter_name="sql")
mixed = None
if kind == "mixed":
    from qtune.inference.adapters import RowAdapters
    from qtune.inference.adapters import MixedRows
    m.add_adapter("chat", LoraConfig(r=4, lora_alpha=16, target_modules=["k_proj", "o_proj", "up_proj"]))
torch.manual_seed(0)
for n, p in m.named_parameters():
    if "lora_B" in n:
        p.data.normal_(0, 0.05)
m.eval()
if kind == "mixed":
    mixed = MixedRows(RowAdapters(m, ["sql", "chat"], max_batch=4), "base")

def run(graph):
    s = Scheduler(m, slots=4, length=128, eos=[], graph=graph, chunk=24, adapters=mixed, overlap=graph)
    if graph:
        s.capture()    # as serve starts it: a warm-up prefill, the greedy buckets captured
    out, done = [], []
    with s.lock:   # all queued before the first turn: the same schedule both ways
        for i in range(12):
            toks, ev = [], threading.Event()
            out.append(toks); done.append(ev)
            s.submit(Job(prompt=[11 + i + j for j in range(5 + 3 * i)], max_new_tokens=10 + 3 * (i % 4),
                         temperature=0.8 if i % 3 == 0 else 0.0, top_p=0.9, seed=i,
                         adapter=["sql", "chat", "base"][i % 3] if mixed else None,
                         on_token=lambda t, lp, toks=toks: toks.append(t), on_end=lambda r, ev=ev: ev.set()))
    assert all(ev.wait(300) for ev in done)
    graphs = [k for k, g in s.graphs.items() if g is not None]
    s.close()
    return out, graphs

g, keys = run(True)
e, _ = run(False)
print(json.dumps({"same": g == e, "captured": len(keys), "keys": keys, "parity": parity,
                  "agree": sum(a == b for x, y in zip(g, e) for a, b in zip(x, y)) / sum(len(x) for x in g)}))
"""


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["nf4", "bf16", "mixed", "plain", "served"])
def test_gpu_continuous_batching_captured_equals_eager(tiny_qwen3, kind):
    """serve's Scheduler on CUDA: twelve jobs (greedy and seeded sampled) joining four slots, prompts prefilled
    side by side up to 24 tokens a turn; its captured steps, each read while the next runs, decode what its eager
    steps read one by one do, token for token, on an nf4 or bf16 base with an unmerged adapter, on a bf16 base with two adapters and the
    base mixed row by row (over fused siblings, inference.fused), on a plain bf16 model (no PEFT: a merged run, or a
    base served without adapters), and on that model as serve runs it on a GPU (liger-kernel's RMSNorm/RoPE/SwiGLU,
    fused siblings), whose logits stay within bf16 rounding of the reference's."""
    import json
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", _GPU_SCHED, str(tiny_qwen3), kind], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["captured"] >= 2 and got["same"], got
    if kind == "served":
        assert got["parity"] < 2e-2, got


@pytest.mark.parametrize("chunk", [4, 16])
def test_continuous_batching_mixes_adapters_row_by_row(tiny_qwen3, chunk):
    """Rows of one running batch each with their own adapter or none (inference.adapters through serve's MixedRows):
    each decodes what it decodes alone with that adapter set (or the adapters off); chunk 16 prefills rows of
    different adapters side by side in one forward."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qtune.inference.adapters import RowAdapters
    from qtune.inference.adapters import MixedRows

    base = AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32)
    m = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), adapter_name="sql")
    m.add_adapter("chat", LoraConfig(r=2, lora_alpha=8, target_modules=["down_proj", "o_proj"]))
    torch.manual_seed(5)
    for name, p in m.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    m.eval()
    names = ["sql", "chat", None, "chat", "sql", None]
    budgets = [7, 5, 9, 4, 6, 8]
    prompts = PROMPTS + [[7] * 9, [300, 301, 302]]
    want = []
    for who, p, n in zip(names, prompts, budgets):
        if who is None:
            with m.disable_adapter():
                want.append(one_at_a_time(m, p, n, []))
        else:
            m.set_adapter(who)
            want.append(one_at_a_time(m, p, n, []))
    assert len({tuple(w) for w in want[:3]}) == 3
    rows = RowAdapters(m, ["sql", "chat"], max_batch=4)
    try:
        got = run_jobs(m, [dict(prompt=p, max_new_tokens=n, adapter=who or "base")
                           for who, p, n in zip(names, prompts, budgets)], slots=4,
                       adapters=MixedRows(rows, "base"), chunk=chunk)
    finally:
        rows.remove()
    assert [g[0] for g in got] == want
