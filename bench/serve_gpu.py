"""`qtune serve` under concurrent clients, over HTTP, beside plain transformers `generate`, in one GPU run.

Run on a GPU machine from the repository root:  python3 bench/serve_gpu.py [ROW ...] [--layers N]
A random Qwen3-8B-shaped checkpoint (bench/common.random_checkpoint; speed does not depend on weight values), 128-token
prompts, 256 new tokens, greedy. Each row starts the real `qtune serve` (its own process, serve.max_batch=32,
serve.max_model_len=512) and drives it with C concurrent streaming clients (http.client, SSE, include_usage):
  bf16_1        the 16-bit base, 1 client (3 requests one after another)
  bf16_32       the 16-bit base, 32 clients at once
  adapters4_32  the 16-bit base with 4 LoRA adapters (r 16, the 7 projections, random), 32 clients spread over them
  nf4_1         the base loaded in nf4 with one adapter, 1 client
  hf_1          plain transformers generate on the 16-bit base (bf16, sdpa, dynamic cache), 1 prompt, in process
Reports per row the aggregate completion tokens/s (all tokens over the wall time of the whole burst), the per-client
tokens/s, and p50/p90 time to the first token. Writes $OUT/serve_gpu.json. `--check` drives a real qtune serve of
the tiny random Qwen3 on the CPU with 3 concurrent clients (CI's tests/test_bench.py).
"""
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "seed"))
sys.path.insert(0, str(HERE))
OUT = Path(os.environ.get("OUT", "/tmp/out"))
ROWS = ["bf16_1", "bf16_32", "adapters4_32", "nf4_1", "hf_1"]
PROMPT, NEW = 128, 256


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list, timeout: float = 420):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "qtune", "serve", *args, f"serve.port={port}", "chat.temperature=0",
                             "serve.log_requests=false"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    deadline = time.time() + timeout
    while True:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return proc, port, lines
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError("qtune serve did not start: " + "".join(lines)[-1500:])
        time.sleep(0.5)


def stream(port: int, model: str, prompt: str, new: int) -> dict:
    """One streamed completion: time to the first token, wall time, completion tokens (usage)."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": new, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    t = time.perf_counter()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    c.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    r = c.getresponse()
    first, usage = None, None
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        obj = json.loads(line[6:])
        if obj.get("usage"):
            usage = obj["usage"]
        elif first is None and obj.get("choices") and obj["choices"][0].get("text"):
            first = time.perf_counter() - t
    wall = time.perf_counter() - t
    c.close()
    return dict(ttft=first, wall=wall, tokens=(usage or {}).get("completion_tokens", 0))


def burst(port: int, models: list, prompts: list, new: int) -> dict:
    got: list = [None] * len(prompts)

    def one(i):
        got[i] = stream(port, models[i % len(models)], prompts[i], new)
    t = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    tokens = sum(g["tokens"] for g in got)
    ttfts = sorted(g["ttft"] for g in got if g["ttft"] is not None)
    return dict(clients=len(prompts), tokens=tokens, aggregate_tok_s=round(tokens / wall, 1),
                per_client_tok_s=round(statistics.median(g["tokens"] / g["wall"] for g in got), 1),
                ttft_p50_ms=round(1e3 * statistics.median(ttfts), 1) if ttfts else None,
                ttft_p90_ms=round(1e3 * ttfts[int(0.9 * (len(ttfts) - 1))], 1) if ttfts else None)


def prompts_of(tokenizer_path: str, n: int, length: int) -> list:
    """n distinct prompts of `length` tokens each (decoded from random ids, re-encoded to check the length)."""
    import random

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    rng = random.Random(0)
    out = []
    while len(out) < n:
        ids = [rng.randrange(100, min(tok.vocab_size, 30000)) for _ in range(length)]
        text = tok.decode(ids)
        if abs(len(tok(text, add_special_tokens=False)["input_ids"]) - length) <= 8:
            out.append(text)
    return out


def random_adapters(ckpt: str, names: list, rank: int = 16) -> dict:
    """LoRA adapters for the checkpoint with random A and B (B nonzero, so they change what the model says)."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(ckpt)
    h, inter, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    shapes = {"self_attn.q_proj": (h, cfg.num_attention_heads * d), "self_attn.k_proj": (h, cfg.num_key_value_heads * d),
              "self_attn.v_proj": (h, cfg.num_key_value_heads * d), "self_attn.o_proj": (cfg.num_attention_heads * d, h),
              "mlp.gate_proj": (h, inter), "mlp.up_proj": (h, inter), "mlp.down_proj": (inter, h)}
    out = {}
    for k, name in enumerate(names):
        path = Path(f"/tmp/serve-adapters/{name}")
        if not (path / "adapter_model.safetensors").is_file():
            path.mkdir(parents=True, exist_ok=True)
            g = torch.Generator().manual_seed(k)
            tensors = {}
            for i in range(cfg.num_hidden_layers):
                for mod, (fin, fout) in shapes.items():
                    pre = f"base_model.model.model.layers.{i}.{mod}"
                    tensors[f"{pre}.lora_A.weight"] = (torch.randn(rank, fin, generator=g) / fin ** 0.5).bfloat16()
                    tensors[f"{pre}.lora_B.weight"] = (torch.randn(fout, rank, generator=g) * 0.01).bfloat16()
            save_file(tensors, str(path / "adapter_model.safetensors"))
            LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=[m.split(".")[1] for m in shapes],
                       base_model_name_or_path=ckpt, task_type="CAUSAL_LM").save_pretrained(str(path))
        out[name] = str(path)
    return out


def hf_generate(ckpt: str, prompt: str, new: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    m = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval()
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).to("cuda")
    m.generate(**ids, max_new_tokens=8, do_sample=False)
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = m.generate(**ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t
    n = out.shape[1] - ids["input_ids"].shape[1]
    del m
    torch.cuda.empty_cache()
    return dict(clients=1, tokens=n, aggregate_tok_s=round(n / wall, 1), per_client_tok_s=round(n / wall, 1))


def main(rows: list, layers: int = 36) -> None:
    from common import environment, random_checkpoint

    OUT.mkdir(parents=True, exist_ok=True)
    info = environment()
    ckpt = random_checkpoint("qwen3_8b", layers)
    base = ["model=qwen3_8b", "model.source=local", f"model.local_dir={ckpt}", "serve.max_batch=32",
            "serve.max_model_len=512"]
    prompts = prompts_of(ckpt, 32, PROMPT)
    results = {}

    def keep(name, r):
        results[name] = r
        print(json.dumps({name: r}), flush=True)
        (OUT / "serve_gpu.json").write_text(json.dumps(dict(info=info, results=results), indent=1))

    groups = [("bf16", [], ["bf16_1", "bf16_32"]), ("hf", [], ["hf_1"]), ("adapters", ["adapters4"], ["adapters4_32"]),
              ("nf4", ["quant=nf4", "one"], ["nf4_1"])]
    for label, extra, names in groups:
        names = [n for n in names if n in rows]
        if not names:
            continue
        if label == "hf":
            try:
                keep("hf_1", hf_generate(ckpt, prompts[0], NEW))
            except Exception as e:
                keep("hf_1", dict(error=repr(e)[-600:]))
            continue
        args, models = list(base), ["qwen3_8b"]
        if "adapters4" in extra:
            ads = random_adapters(ckpt, ["a0", "a1", "a2", "a3"])
            args.append("serve.adapters={" + ",".join(f"{k}:{v}" for k, v in ads.items()) + "}")
            models = list(ads)
        if "one" in extra:
            ads = random_adapters(ckpt, ["a0"])
            args += ["quant=nf4", "serve.adapters={a0:" + ads["a0"] + "}"]
            models = ["a0"]
        try:
            t = time.time()
            proc, port, lines = start(args)
            print(f"[{label}] serving after {time.time() - t:.0f}s: " + "".join(lines).strip()[-400:], flush=True)
            burst(port, models, prompts[:8], 16)     # warm: captures the batch buckets' graphs
            for name in names:
                if name.endswith("_1"):
                    runs = [burst(port, models, [prompts[i]], NEW) for i in range(3)]
                    keep(name, sorted(runs, key=lambda r: r["aggregate_tok_s"])[1])
                else:
                    keep(name, burst(port, models, prompts, NEW))
            proc.terminate()
            proc.wait(timeout=60)
        except Exception as e:  # keep the other rows
            keep(label, dict(error=repr(e)[-600:]))
    one = results.get("bf16_1", {}).get("aggregate_tok_s")
    print("\n| row | aggregate tok/s | per client tok/s | TTFT p50 ms | vs bf16_1 |\n|---|---|---|---|---|")
    for name, r in results.items():
        if "aggregate_tok_s" in r:
            ratio = f"{r['aggregate_tok_s'] / one:.1f}x" if one else "-"
            print(f"| {name} | {r['aggregate_tok_s']} | {r['per_client_tok_s']} | {r.get('ttft_p50_ms', '-')} | {ratio} |")


def check() -> None:
    """The client side against a real qtune serve of the tiny Qwen3 on the CPU."""
    proc, port, lines = start(["model=tiny_qwen3"], timeout=240)
    try:
        r = burst(port, ["tiny_qwen3"], ["one two three", "four five", "six"], 4)
        assert r["tokens"] == 12 and r["ttft_p50_ms"] is not None, r
        print(json.dumps(r))
    finally:
        proc.terminate()
        proc.wait(timeout=60)


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        check()
    else:
        argv = sys.argv[1:]
        layers = 36
        if "--layers" in argv:     # fewer layers of the same shape: a quicker run (the figures scale with depth)
            i = argv.index("--layers")
            layers = int(argv[i + 1])
            del argv[i:i + 2]
        main(argv or ROWS, layers)
