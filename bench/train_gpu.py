"""qtune train vs the seed recipe on a Qwen3-8B-shaped random checkpoint, in one GPU run.

Run on a GPU machine from the repository root:  python3 bench/train_gpu.py [ROW ...]
Rows (the dense train tables of docs/benchmarks.md):
  nf4_2048   qtune (train.fast=false; true without and with CUDA graphs) and the seed recipe, nf4, 1 x 2048 tokens
  bf16_2048  the same in bf16 (quant=none)
  nf4_8192   nf4 at 8192 tokens a step (layer inputs offloaded; the same with liger; CUDA graphs without offloading)
  nf4_8192_default   the default nf4 8192 row alone, beside the seed recipe
  chat       real chat-length data (a log-normal length mix, median ~200 tokens): qtune trains packed 2048-token
             rows; the seed recipe trains one example a step, as its users do. Only real tokens are counted.
  oom        a deliberate CUDA out-of-memory: qtune must answer with one line and remedies
All: LoRA r16/alpha 32 on q,k,v,o,gate,up,down, gradient checkpointing. qtune trains through its real CLI
(median tokens/s of the logged steps after the third, from metrics.jsonl; peak from summary.json); the seed
recipe is bench/seed/ (a copy of ../shared/bench). Speed and memory do not depend on weight or token values.
Prints a table of ratios; writes $OUT/train_gpu.json.
"""
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "seed"))
sys.path.insert(0, str(HERE))
OUT = Path(os.environ.get("OUT", "/tmp/out"))
WORK = Path("/tmp/qtune-bench")
from common import environment, words  # noqa: E402 (bench/ is on the path from here)


def chat_lengths(n=4000, seed=0):
    """Token counts of chat examples: log-normal, median 200, 16..2048 (Alpaca/ShareGPT-like)."""
    rng = random.Random(seed)
    return [min(2048, max(16, int(math.exp(rng.gauss(math.log(200), 0.8))))) for _ in range(n)]


def write_data():
    from transformers import AutoTokenizer

    from randckpt import PATH

    WORK.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    files = {"long": (WORK / "long.jsonl", 64, 1400), "xl": (WORK / "xl.jsonl", 24, 6000),
             "huge": (WORK / "huge.jsonl", 4, 24000)}
    for path, count, n in files.values():  # each record tokenizes past the row length: one full row per step
        path.write_text("".join(json.dumps({"text": words(rng, n)}) + "\n" for _ in range(count)))
    tok = AutoTokenizer.from_pretrained(PATH)
    per_word = len(tok(words(rng, 1000))["input_ids"]) / 1000
    with open(WORK / "chat.jsonl", "w") as f:
        for n in chat_lengths():
            f.write(json.dumps({"text": words(rng, max(4, int(n / per_word)))}) + "\n")


def qtune_train(name, data, *overrides, steps=12, length=2048, log_every=1, env=None):
    from common import qtune_train as run
    from randckpt import PATH

    r = run(name, WORK / name, ["model=qwen3_8b", "model.source=local", f"model.local_dir={PATH}"], data, length, steps,
            WORK / "home", *overrides, log_every=log_every, env=env)
    if "process_peak_gib" in r:  # this table's peak is the whole process's, loading included
        r["peak_gib"] = r["process_peak_gib"]
    return r


def seed_chat(name, steps=40, warm=4):
    """The seed recipe on chat-length data: one example a step (its batch of 1 needs no padding)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from randckpt import PATH, QWEN3_8B, TARGETS

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(PATH, quantization_config=qc, dtype=torch.bfloat16,
                                                 device_map={"": 0}, attn_implementation="sdpa")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, fused=True)
    g = torch.Generator(device="cuda").manual_seed(1)
    model.train()
    lengths = chat_lengths(seed=1)[:warm + steps]
    tokens, seconds = 0, 0.0
    for i, n in enumerate(lengths):
        ids = torch.randint(0, QWEN3_8B["vocab_size"], (1, n), device="cuda", generator=g)
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= warm:
            tokens += n
            seconds += time.perf_counter() - t
    res = dict(name=name, tok_s=round(tokens / seconds), peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
               median_len=statistics.median(lengths[warm:]))
    del model, opt
    return res


def main(which):
    import torch

    import seed_recipe
    from randckpt import make_checkpoint

    OUT.mkdir(parents=True, exist_ok=True)
    info = environment("liger_kernel", "triton")
    make_checkpoint()
    write_data()
    results = []
    path = OUT / f"train_gpu-{'-'.join(which)}.json"

    def keep(r):
        results.append(r)
        print(json.dumps(r), flush=True)
        path.write_text(json.dumps(dict(info=info, results=results), indent=1))

    def seed(name, **kw):
        try:
            return dict(seed_recipe.bench(name, **kw))
        except Exception as e:  # keep the other rows
            return dict(name=name, error=repr(e)[:300])

    long, xl = WORK / "long.jsonl", WORK / "xl.jsonl"
    if "nf4_2048" in which:
        keep(qtune_train("ref_nf4_2048", long, "quant=nf4", "train.fast=false"))
        keep(qtune_train("eager_nf4_2048", long, "quant=nf4", "train.fast=true", "train.cuda_graphs=false"))
        keep(qtune_train("qtune_nf4_2048", long, "quant=nf4", "train.fast=true"))
        keep(seed("seed_nf4_2048", quant="nf4", seq=2048))
    if "nf4_2048_log4" in which:  # as users run it: a log (which waits for the GPU) every few steps, not every step
        keep(qtune_train("log4_nf4_2048", long, "quant=nf4", "train.fast=true", steps=24, log_every=4))
        keep(seed("seed_nf4_2048", quant="nf4", seq=2048))
    if "trace" in which:  # nf4_2048_log4 with steps 13-16 traced (bench/trace): where a step's wall time goes
        trace = dict(PYTHONPATH=f"{Path(__file__).resolve().parent / 'trace'}:{os.environ.get('PYTHONPATH', '')}",
                     QTUNE_TRACE_STEPS="13:16", QTUNE_TRACE_OUT=str(OUT / "trace_nf4_2048.txt"))
        keep(qtune_train("trace_nf4_2048", long, "quant=nf4", "train.fast=true", steps=20, log_every=4, env=trace))
    if "bf16_2048" in which:
        keep(qtune_train("ref_bf16_2048", long, "quant=none", "train.fast=false"))
        keep(qtune_train("qtune_bf16_2048", long, "quant=none", "train.fast=true"))
        keep(seed("seed_bf16_2048", quant="none", seq=2048))
    if "nf4_8192" in which and "nf4_8192_default" not in which:
        keep(qtune_train("qtune_nf4_8192", xl, "quant=nf4", "train.fast=true", steps=8, length=8192))
        keep(qtune_train("graph_nf4_8192", xl, "quant=nf4", "train.fast=true", "train.offload_activations=false",
                         steps=8, length=8192))
        keep(qtune_train("liger_nf4_8192", xl, "quant=nf4", "train.fast=true", "train.liger=true", steps=8,
                         length=8192))
        keep(seed("seed_nf4_8192", quant="nf4", seq=8192, steps=4, warm=2))
    if "nf4_8192_default" in which:  # the default row alone, beside the seed recipe
        keep(qtune_train("qtune_nf4_8192", xl, "quant=nf4", "train.fast=true", steps=8, length=8192))
        keep(seed("seed_nf4_8192", quant="nf4", seq=8192, steps=4, warm=2))
    if "chat" in which:
        keep(qtune_train("qtune_chat", WORK / "chat.jsonl", "quant=nf4", "train.fast=true", steps=16))
        keep(seed_chat("seed_chat"))
    if "oom" in which:
        keep(qtune_train("qtune_oom", WORK / "huge.jsonl", "quant=none", "train.gradient_checkpointing=false",
                         steps=2, length=32768))
    by = {r["name"]: r for r in results}
    print("\n| row | qtune tok/s | seed tok/s | speed ratio | qtune peak GiB | seed peak GiB | memory ratio |")
    print("|---|---|---|---|---|---|---|")
    for row in ("nf4_2048", "bf16_2048", "nf4_8192", "chat"):
        for side in ("ref", "eager", "qtune", "graph", "liger", "log4"):
            a, b = by.get(f"{side}_{row}"), by.get(f"seed_{row}")
            if a and b and "tok_s" in a and "tok_s" in b:
                print(f"| {side} {row} | {a['tok_s']} | {b['tok_s']} | {a['tok_s'] / b['tok_s']:.2f} | {a['peak_gib']} | "
                      f"{b['peak_gib']} | {a['peak_gib'] / b['peak_gib']:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1:] or ["nf4_2048", "bf16_2048", "nf4_8192", "chat", "oom"])
