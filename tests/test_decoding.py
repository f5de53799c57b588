"""qtune.inference.decoding's step, run eagerly on CPU, against transformers' generate (the GPU graph path is benchmarked
and checked token by token against eager logits in bench/decode_gpu.py)."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def model(tiny_qwen3):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32)
    m.eval()
    m.generation_config.eos_token_id = [7, 11]
    return m


def decode(model, ids, n, **kw):
    from qtune.inference.decoding import GraphDecoder

    out: list[int] = []
    count, reason = GraphDecoder(model, graph=False, compile=False).generate(ids, n, out.append, **kw)
    return out, count, reason


@pytest.fixture(scope="module")
def smol(smollm2):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    m.eval()
    return m


@pytest.mark.parametrize("which,penalty", [("model", 1.0), ("model", 3.0), ("smol", 1.3)])
def test_greedy_tokens_equal_generate(which, penalty, request):
    model = request.getfixturevalue(which)
    ids = torch.tensor([[1, 504, 3575, 282, 4649, 314, 216]])
    ref = model.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False, repetition_penalty=penalty,
                         pad_token_id=0)[0, ids.shape[1]:].tolist()
    out, count, reason = decode(model, ids, 24, repetition_penalty=penalty, min_new_tokens=24)
    assert out == ref and count == 24 and reason == "length"


def test_stops_at_end_of_text_and_when_asked(model):
    ids = torch.tensor([[5, 9, 2, 14]])
    free, _, _ = decode(model, ids, 40, min_new_tokens=40, repetition_penalty=3.0)
    k = next(i for i in range(3, 40) if free[i] not in free[:i])
    model.generation_config.eos_token_id = [free[k]]       # a token first produced at k becomes end-of-text
    try:
        out, count, reason = decode(model, ids, 40, repetition_penalty=3.0)
        assert (out, count, reason) == (free[:k], k + 1, "stop")
        banned, count, _ = decode(model, ids, k + 4, min_new_tokens=k + 4, repetition_penalty=3.0)
        assert free[k] not in banned and count == k + 4
    finally:
        model.generation_config.eos_token_id = [7, 11]
    seen: list[int] = []
    from qtune.inference.decoding import GraphDecoder

    count, reason = GraphDecoder(model, graph=False, compile=False).generate(
        ids, 40, seen.append, should_stop=lambda: len(seen) >= 3, min_new_tokens=40)
    assert (len(seen), reason) == (3, "stop")


@pytest.mark.parametrize("top_k", [5, 0])
def test_sampling_follows_the_filtered_distribution(model, top_k):
    from qtune.inference.decoding import _Step

    step = _Step(model, 64, sample=True, top_k=top_k, eos=[], graph=False)
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0] + [-30.0] * (step.seen.numel() - 5))
    n = 1500 if top_k else 200          # a full-vocabulary sort a draw is slow on CPU
    torch.manual_seed(0)
    draws = torch.cat([step.pick(logits) for _ in range(n)])
    want = logits.softmax(-1)[:5]
    got = torch.bincount(draws, minlength=5)[:5].float() / n
    assert (got - want).abs().max() < 3 * (0.25 / n) ** 0.5, (got, want)
    # top-p 0.8: the two most likely tokens hold 0.83 of the mass, the first alone 0.61
    step.top_p.fill_(0.8)
    draws = torch.cat([step.pick(logits) for _ in range(n)])
    assert set(draws.tolist()) == {0, 1}
    assert abs((draws == 0).float().mean() - want[0] / (want[0] + want[1])) < 3 * (0.25 / n) ** 0.5
    step.top_p.fill_(1.0)
    step.temperature.fill_(0.05)         # sharpened: always the most likely token
    assert all(int(step.pick(logits)) == 0 for _ in range(20))


def test_chat_streams_the_same_text_through_the_decoder(smol, smollm2):
    from transformers import AutoTokenizer

    from qtune.config.schema import ChatConfig
    from qtune.inference.load import Generation, Loaded

    tok = AutoTokenizer.from_pretrained(smollm2)
    loaded = Loaded(smol, tok, tok.chat_template, "smol")
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    runs = {}
    for cache in ("dynamic", "graph"):
        g = Generation(loaded, prompt, ChatConfig(max_new_tokens=30, temperature=0, repetition_penalty=1.1, cache=cache))
        runs[cache] = ("".join(g), g.completion_tokens, g.finish_reason)
    assert runs["graph"] == runs["dynamic"] and "Paris" in runs["graph"][0]
    assert loaded.decoder is not None and loaded.decoder.steps


def test_graph_decoding_is_refused_for_unmerged_adapters(model):
    from peft import LoraConfig, get_peft_model

    from qtune.inference.decoding import cache_length, supported

    assert supported(model) is None
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    try:
        assert "unmerged adapter" in supported(peft)
        from transformers import AutoTokenizer

        from qtune.errors import ConfigError
        from qtune.config.schema import ChatConfig
        from qtune.inference.load import Generation, Loaded

        tok = AutoTokenizer.from_pretrained(model.name_or_path)
        with pytest.raises(ConfigError, match="chat.cache=graph: cannot decode an unmerged adapter"):
            Generation(Loaded(peft, tok, "", "tiny"), "hello", ChatConfig(max_new_tokens=4, cache="graph"))
    finally:
        peft.unload()
    assert (cache_length(10), cache_length(1024), cache_length(1025)) == (1024, 1024, 2048)


# One chat or serve process decodes one way; a process per way, as users run them (several compiled decoders of
# different kinds in one process crashed at its exit, in garbage collection, with torch 2.11).
_GENERATE = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from qtune.config.schema import ChatConfig
from qtune.inference.load import Generation, Loaded
path, cache = sys.argv[1:]
tok = AutoTokenizer.from_pretrained(path)
if cache == "nf4+adapter":
    from peft import LoraConfig, get_peft_model
    q = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map={"": 0}, quantization_config=
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16))
    loaded = Loaded(get_peft_model(q, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).eval(), tok, "", "tiny",
                    {"a": None})
    cache = "auto"
else:  # fp32 keeps compiled logits within rounding of eager ones, so greedy choices agree token for token
    loaded = Loaded(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval(), tok, "", "tiny")
loaded.model.generation_config.eos_token_id = None
g = Generation(loaded, "hello there, how are you today?", ChatConfig(cache=cache, max_new_tokens=24, temperature=0,
                                                                      repetition_penalty=1.1))
text = "".join(g)
print(json.dumps({"text": text, "tokens": g.completion_tokens, "finish": g.finish_reason,
                  "graph": bool(g.decoder is not None and g.decoder.steps),
                  "static": g.kwargs.get("cache_implementation") == "static"}))
"""


@pytest.mark.gpu
def test_gpu_chat_generation_through_every_cache(tiny_qwen3):
    """What chat and serve run on a GPU, through inference.Generation: the CUDA-graph decoder (a model without
    adapters), generate's static cache (what `auto` picks for a 4-bit base with its adapter) and the dynamic cache."""
    import json
    import subprocess
    import sys

    got = {}
    for cache in ("dynamic", "static", "graph", "nf4+adapter"):
        p = subprocess.run([sys.executable, "-c", _GENERATE, str(tiny_qwen3), cache], capture_output=True, text=True,
                           timeout=600)
        assert p.returncode == 0, (cache, p.stderr[-3000:])
        got[cache] = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["graph"]["graph"] and not got["dynamic"]["graph"] and got["nf4+adapter"]["static"]
    same = [{k: got[c][k] for k in ("text", "tokens", "finish")} for c in ("dynamic", "static", "graph")]
    assert same[0] == same[1] == same[2] and same[0]["tokens"] == 24 and same[0]["finish"] == "length", got
    assert (got["nf4+adapter"]["tokens"], got["nf4+adapter"]["finish"]) == (24, "length"), got


_CONTROLS = """
import json, sys, torch
from transformers import AutoModelForCausalLM
from qtune.inference.decoding import GraphDecoder
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).cuda().eval()
model.generation_config.eos_token_id = None
ids = torch.tensor([[11, 12, 13, 14, 15]], device="cuda")
kw = dict(logit_bias={7: 4.0, 9: -100.0}, presence_penalty=1.5, frequency_penalty=0.5)
graphed = GraphDecoder(model, graph=True, compile=True)

def run(decoder, **extra):
    out = []
    decoder.generate(ids, 24, out.append, **kw, **extra)
    return out

seeded = lambda s: torch.Generator("cuda").manual_seed(s)
print(json.dumps({"graph": run(graphed), "eager": run(GraphDecoder(model, graph=False, compile=False)),
                  "captured": bool(graphed.steps) and all(s.graph is not None for s in graphed.steps.values()),
                  "seed1": run(graphed, temperature=0.8, generator=seeded(1)),
                  "seed1_again": run(graphed, temperature=0.8, generator=seeded(1)),
                  "seed2": run(graphed, temperature=0.8, generator=seeded(2))}))
"""


@pytest.mark.gpu
def test_gpu_graph_decoding_reads_logit_bias_and_penalties_and_seeded_draws_repeat(tiny_qwen3):
    """serve's logit_bias and presence/frequency penalties are tensors the captured step reads: its greedy tokens equal
    the eager step's; a seeded request (its own generator, drawn eagerly) repeats exactly and differs by seed."""
    import json
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", _CONTROLS, str(tiny_qwen3)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["captured"] and got["graph"] == got["eager"] and 9 not in got["graph"], got
    assert got["seed1"] == got["seed1_again"] != got["seed2"], got
