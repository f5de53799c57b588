"""What the GPU benchmarks share: filler text, one real `qtune train` run and what its files say, a step timer."""
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


WORDS = ["the", "model", "fine", "tune", "lora", "token", "quant", "expert", "router", "layer"]


def words(rng, n: int) -> str:
    """n numbered filler words (speed and memory do not depend on token values)."""
    return " ".join(rng.choice(WORDS) + str(rng.randint(0, 99)) for _ in range(n))


def environment(*modules: str, **extra) -> dict:
    """The device, date and versions a benchmark's numbers belong to (printed and kept with its results)."""
    import torch

    info = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                gpu_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1), **extra)
    for mod in ("transformers", "peft", "trl", "bitsandbytes", "accelerate", *modules):
        try:
            from importlib.metadata import version

            info[mod] = version(mod.replace("_", "-"))
        except Exception as e:  # noqa: BLE001 (record what is missing)
            info[mod] = f"missing ({type(e).__name__})"
    print(json.dumps(info), flush=True)
    return info


def random_checkpoint(model: str, layers: int) -> str:
    """A random checkpoint shaped as qtune's `model=` config with `layers` layers (bf16, built on the GPU; speed and
    memory do not depend on weight values), with the seed benchmark's small tokenizer; made once under /tmp."""
    import gc
    import os

    import torch
    from transformers import AutoModelForCausalLM

    from qtune.config import compose, to_object
    from qtune.modeling.arch import hf_config
    from randckpt import make_tokenizer

    path = f"/tmp/{model}-L{layers}"
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    arch = to_object(compose([f"model={model}", f"model.arch.num_hidden_layers={layers}"])).model.arch
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = AutoModelForCausalLM.from_config(hf_config(arch), dtype=torch.bfloat16)
    m.save_pretrained(path, max_shard_size="5GB")
    make_tokenizer(path)
    del m
    gc.collect()
    torch.cuda.empty_cache()
    return path


def fused_head_step(model, seq: int, vocab: int | None = None):
    """One forward and backward as training does it (train mode, bf16 autocast on a GPU, TRL's fused output head: no
    full logits) on a fixed random row of `seq` tokens (below `vocab`: the model's vocabulary)."""
    import torch

    model.train()
    device = next(model.parameters()).device
    vocab = vocab or model.config.vocab_size
    ids = torch.randint(0, vocab, (1, seq), device=device, generator=torch.Generator(device).manual_seed(0))

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(input_ids=ids, labels=ids, fused_lm_head=True)
        loss = -out.log_probs.sum() / out.label_mask.sum()
        loss.backward()
        return loss
    return step


def qtune_train(name: str, out: Path, model_args: list, data, length: int, steps: int, home: Path, *overrides,
                fmt: str = "text", log_every: int = 1, env: dict | None = None) -> dict:
    """Run `qtune train` (a bench-sized run: one log row a step, no eval, no saving) and read back tokens/s (the median
    of the logged steps after the third, and their spread), the training and whole-process peak memory, the first and
    last loss, the wall time and the fast path's line. A failed run is its last line of output. `fmt`: data.format
    (auto for preference pairs). `log_every`: train.logging_steps (a log reads the step's results back from the GPU,
    so logging every step makes the host wait for it each step; users log every 10). `env`: added to the run's
    environment (bench/trace's step trace)."""
    cmd = [sys.executable, "-m", "qtune", "train", *model_args, f"data.path={data}", f"data.format={fmt}",
           f"data.max_length={length}", "data.val_size=0", f"train.max_steps={steps}", f"train.logging_steps={log_every}",
           "train.grad_accum=1", "train.save_steps=1000", "train.warmup_ratio=0", "train.report_to=[]",
           f"train.output_dir={out}", "train.overwrite=true", f"paths.home={home}", *overrides]
    t = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    wall = time.time() - t
    if p.returncode != 0:
        return dict(name=name, error=(p.stderr or p.stdout).strip().splitlines()[-1][:400], rc=p.returncode)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    tps = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["step"] > max(3, log_every)]
    summary = json.loads((out / "summary.json").read_text())
    losses = [r["loss"] for r in rows if "loss" in r]
    fast = next((x for x in p.stdout.splitlines() if "train.fast" in x), "")
    train_peak = summary.get("train_peak_memory_bytes") or summary["peak_memory_bytes"]
    reserved = summary.get("train_reserved_peak_bytes")
    return dict(name=name, tok_s=round(statistics.median(tps)), tok_s_spread=[round(min(tps)), round(max(tps))],
                train_peak_gib=round(train_peak / 2**30, 2),
                **({"train_reserved_gib": round(reserved / 2**30, 2)} if reserved else {}), process_peak_gib=round(summary["peak_memory_bytes"] / 2**30, 2),
                loss_first=round(losses[0], 3), loss_last=round(losses[-1], 3), wall_s=round(wall, 1), fast=fast.strip())


def time_and_profile(step, model, timed: int, skip: int, ops: bool = False) -> dict:
    """`timed` synchronized calls of step() (a forward and backward) after one untimed: the median step and the median
    host time to issue one (until step() returns, the GPU not waited on), over the calls after the first `skip`; then
    two steps under torch.profiler: the GPU's kernel time per step and the top kernels' table (ops: then the operators
    that launched them, by input shapes, CUDA time including their children); `line` sums them up with the
    allocator's peak."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    times, issue = [], []
    for _ in range(timed):
        torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        issue.append(time.perf_counter() - t)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=ops) as prof:
        for _ in range(2):
            step()
            model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    events = prof.key_averages()
    gpu_ms = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") / 1e3 / 2
    m = dict(step_ms=statistics.median(times[skip:]) * 1e3, issue_ms=statistics.median(issue[skip:]) * 1e3,
             gpu_ms=gpu_ms, table=events.table(sort_by="self_device_time_total", row_limit=30))
    if ops:
        cpu = prof.key_averages(group_by_input_shape=True)
        m["table"] += "\n" + cpu.table(sort_by="device_time_total", row_limit=70, max_name_column_width=40,
                                       max_shapes_column_width=90)
    m["line"] = (f"step {m['step_ms']:.0f} ms, host issue {m['issue_ms']:.0f} ms, GPU kernels {m['gpu_ms']:.0f} ms/step, "
                 f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    return m


def report(lines: list, label: str, m: dict, table_rows: int, first: str = "") -> None:
    """Print one variant's line (`first`, e.g. the first step's time, ahead of the timings) and the head of its kernel
    table; keep both for the report file."""
    line = f"{label}: {first}{m['line']}"
    print(line, flush=True)
    print("\n".join(m["table"].splitlines()[:table_rows]), flush=True)
    lines += [line, m["table"], ""]
