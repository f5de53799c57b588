"""Batch-1 decoding speed on a merged 16-bit Qwen3-8B-shaped model, qtune's paths vs plain generate.

Run on a GPU machine from the repository root:  python3 bench/decode_gpu.py
Variants (32-token prompt, NEW new tokens, min_new_tokens so generate's variants produce the same count, qtune's counted
as they come; each warmed up once at the same length, so compilation and cache sizing stay outside the clock):
  plain            model.generate(), dynamic cache (what a transformers user gets)
  static           generate with cache_implementation="static" (transformers compiles the step)
  qtune_graph      qtune.inference.load.Generation, greedy: qtune.inference.decoding, one CUDA graph a token (chat/serve default)
  qtune_graph_chat the same with chat's sampling defaults (temperature 0.7, top-p 0.9, top-k 20, penalty 1.05)
  qtune_static     qtune.inference.load.Generation with chat.cache=static (the path before qtune.inference.decoding)
  graph_replay     the captured step alone, replayed back to back: the GPU's time a token, no Python at all
  seed_nf4_adapter the seed recipe's chat: nf4 base + unmerged LoRA adapter, plain generate
Correctness: the tokens greedy graph decoding chose, and those plain and static generate chose, are checked
against the eager model run over the whole sequence at once (teacher forcing): how often each is its argmax,
and how far below the best logit a chosen token is (random weights give near-flat logits, so plain generate's
own figures are the yardstick for kernel rounding).
Each group (generate, graph, seed) runs in its own process, so a crash is reported and the rest still runs;
BENCH_GROUPS=graph (say) runs only those named.
Writes $OUT/decode_gpu.json.
"""
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "seed"))
sys.path.insert(0, str(HERE.parent))
OUT = Path(os.environ.get("OUT", "/tmp/out"))
NEW = int(os.environ.get("NEW", 256))
T0 = time.time()


def timed(fn, n=NEW):
    """Tokens a second of fn(n), which returns how many tokens it made (None: n)."""
    fn(n)
    torch.cuda.synchronize()
    t = time.perf_counter()
    made = fn(n)
    torch.cuda.synchronize()
    return (n if made is None else made) / (time.perf_counter() - t)


def run_group(group):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from randckpt import PATH

    info = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__,
                transformers=__import__("transformers").__version__, new_tokens=NEW)
    print(json.dumps(info), f"checkpoint ready at {time.time() - T0:.0f}s", flush=True)
    results, checks = {}, {}

    def save():
        (OUT / f"decode_gpu-{group}.json").write_text(json.dumps(dict(info=info, results=results, checks=checks), indent=1))

    def keep(name, value, note=""):
        results[name] = dict(tok_s=round(value, 1) if value else None, note=note)
        print(f"[{time.time() - T0:.0f}s]", json.dumps({name: results[name]}), flush=True)
        save()

    def attempt(name, fn, n=NEW):
        try:
            keep(name, timed(fn, n))
        except Exception:
            keep(name, None, traceback.format_exc(limit=-4)[-700:])

    tok = AutoTokenizer.from_pretrained(PATH)
    if group == "seed":
        return seed(PATH, attempt)
    model = AutoModelForCausalLM.from_pretrained(PATH, dtype=torch.bfloat16, device_map={"": 0})
    model.eval()
    ids = torch.randint(0, 500, (1, 32), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))

    def gen(**kw):
        def run(n):
            with torch.no_grad():
                return model.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)
        return run

    # correctness: teacher-forced eager logits over prompt + decoded tokens
    def check(name, tokens):
        t = torch.tensor(tokens, device="cuda")
        with torch.no_grad():
            logits = model(torch.cat([ids, t[None, :-1]], 1)).logits[0, ids.shape[1] - 1:].float()
        best = logits.max(-1).values
        gap = best - logits.gather(1, t[:, None])[:, 0]
        top2 = logits.topk(2, -1).values
        checks[name] = dict(tokens=len(tokens), argmax_equal=round(float((gap == 0).float().mean()), 4),
                            max_gap=round(float(gap.max()), 4), mean_gap=round(float(gap.mean()), 5),
                            median_top2_margin=round(float((top2[:, 0] - top2[:, 1]).median()), 4),
                            logit_std=round(float(logits.std()), 4))
        print(f"[{time.time() - T0:.0f}s] check", name, json.dumps(checks[name]), flush=True)
        save()

    def guarded(name, fn):
        try:
            fn()
        except Exception:
            checks[name] = traceback.format_exc(limit=-4)[-700:]
            print(checks[name], flush=True)
            save()

    import dataclasses

    from qtune.config.schema import ChatConfig
    from qtune.inference.load import Generation, Loaded

    loaded = Loaded(model, tok, tok.chat_template, "bench")
    prompt = tok.decode(ids[0])

    def q(cache, **sampling):
        def run(n):
            generation = Generation(loaded, prompt, dataclasses.replace(ChatConfig(), max_new_tokens=n, cache=cache,
                                                                        **sampling))
            for _ in generation:
                pass
            return generation.completion_tokens  # an end-of-text token may come first
        return run

    greedy = dict(temperature=0, repetition_penalty=1.0)
    if group == "generate":
        attempt("plain", gen(), n=128)
        attempt("static", gen(cache_implementation="static"))
        attempt("qtune_static", q("static", **greedy))
        guarded("plain_generate", lambda: check("plain_generate", gen()(128)[0, ids.shape[1]:].tolist()))
        guarded("static_generate", lambda: check("static_generate",
                                                 gen(cache_implementation="static")(128)[0, ids.shape[1]:].tolist()))
        return
    attempt("qtune_graph", q("graph", **greedy))
    attempt("qtune_graph_chat", q("graph", temperature=0.7, top_p=0.9, top_k=20, repetition_penalty=1.05))

    def graph_tokens():
        out = []
        loaded.decoder.generate(ids, 128, out.append, min_new_tokens=128)
        check("qtune_graph", out)
    guarded("qtune_graph", graph_tokens)

    def replay_rate(steps=200):     # the captured step alone: the GPU's time a token
        step = loaded.decoder.steps[(1024, False, 0)]
        step.start(ids, 0.0, 1.0, 1.0)
        step.step()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            step.graph.replay()
        torch.cuda.synchronize()
        keep("graph_replay", steps / (time.perf_counter() - t))
    guarded("graph_replay", replay_rate)


def seed(path, attempt):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=qc, dtype=torch.bfloat16, device_map={"": 0})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    model.eval()
    ids = torch.randint(0, 500, (1, 32), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))

    def run(n):
        with torch.no_grad():
            model.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    attempt("seed_nf4_adapter", run, n=32)


def check() -> None:
    """What CI runs (no GPU): the names this script takes from qtune exist and take what it passes."""
    import dataclasses

    from qtune.config.schema import ChatConfig
    from qtune.inference.decoding import GraphDecoder
    from qtune.inference.load import Generation, Loaded

    dataclasses.replace(ChatConfig(), max_new_tokens=8, cache="graph", temperature=0, repetition_penalty=1.0)
    import inspect

    assert Loaded and Generation and "min_new_tokens" in inspect.signature(GraphDecoder.generate).parameters


def main():
    """Each group in its own process, so that a crash in one is reported and the others still run."""
    from randckpt import make_checkpoint

    OUT.mkdir(parents=True, exist_ok=True)
    make_checkpoint()
    merged = dict(results={}, checks={}, runs={})
    for group in os.environ.get("BENCH_GROUPS", "generate,graph,seed").split(","):
        t = time.time()
        proc = subprocess.run([sys.executable, "-X", "faulthandler", __file__, group], capture_output=True, text=True)
        tail = "\n".join(line for line in (proc.stdout + proc.stderr).splitlines()
                         if "Warning" not in line and "warn(" not in line and "Loading weights" not in line)[-3000:]
        merged["runs"][group] = dict(exit=proc.returncode, seconds=round(time.time() - t))
        print(f"== {group}: exit {proc.returncode} in {time.time() - t:.0f}s\n{tail}", flush=True)
        part = OUT / f"decode_gpu-{group}.json"
        if part.exists():
            d = json.loads(part.read_text())
            merged["info"] = d["info"]
            merged["results"].update(d["results"])
            merged["checks"].update(d["checks"])
            part.unlink()
        (OUT / "decode_gpu.json").write_text(json.dumps(merged, indent=1))
    results = merged["results"]
    base = (results.get("plain") or {}).get("tok_s")
    print("\n| variant | tok/s | vs plain | note |\n|---|---|---|---|")
    for k, v in results.items():
        ratio = f"{v['tok_s'] / base:.2f}" if v["tok_s"] and base else "-"
        print(f"| {k} | {v['tok_s']} | {ratio} | {v['note'][-200:]!r} |")


if __name__ == "__main__":
    check() if sys.argv[1:] == ["--check"] else run_group(sys.argv[1]) if len(sys.argv) > 1 else main()
