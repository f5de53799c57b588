"""qtune train vs the seed recipe on a Qwen3-8B-shaped random checkpoint, in one GPU run.

Run on a GPU machine from the repository root:  python3 bench/train_gpu.py [nf4] [bf16] [oom]
Both sides train LoRA r16/alpha 32 on q,k,v,o,gate,up,down at 2048 tokens per step (batch 1) with
gradient checkpointing. The seed recipe (bench/seed/, a copy of ../shared/bench) feeds random ids;
qtune trains through its real CLI on prepared, packed data whose rows are 2048 tokens. Speed and memory
do not depend on weight or token values. Prints a table of ratios; writes $OUT/train_gpu.json.
"""
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "seed"))
OUT = Path(os.environ.get("OUT", "/tmp/out"))
DATA = Path("/tmp/qtune-bench/data.jsonl")
LONG = Path("/tmp/qtune-bench/long.jsonl")


def write_data():
    import random

    rng = random.Random(0)
    words = ["the", "model", "fine", "tune", "lora", "token", "quant", "expert", "router", "layer"]
    DATA.parent.mkdir(parents=True, exist_ok=True)
    with open(DATA, "w") as f:  # each record tokenizes past 2048 tokens: one full packed row per step
        for _ in range(64):
            f.write(json.dumps({"text": " ".join(rng.choice(words) + str(rng.randint(0, 99)) for _ in range(1400))}) + "\n")
    with open(LONG, "w") as f:
        for _ in range(4):
            f.write(json.dumps({"text": " ".join(rng.choice(words) + str(rng.randint(0, 99)) for _ in range(24000))}) + "\n")


def qtune_train(name, *overrides, steps=12):
    from randckpt import PATH

    out = Path(f"/tmp/qtune-bench/{name}")
    cmd = [sys.executable, "-m", "qtune", "train", "model=qwen3_8b", "model.source=local", f"model.local_dir={PATH}",
           f"data.path={DATA}", "data.format=text", "data.max_length=2048", "data.val_size=0",
           f"train.max_steps={steps}", "train.logging_steps=1", "train.grad_accum=1", "train.save_steps=1000",
           "train.warmup_ratio=0", "train.report_to=[]", f"train.output_dir={out}", "train.overwrite=true",
           "paths.home=/tmp/qtune-bench/home", *overrides]
    t = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t
    if p.returncode != 0:
        return dict(name=name, error=(p.stderr or p.stdout).strip().splitlines()[-1][:400], rc=p.returncode)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    tps = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["step"] > 3]
    summary = json.loads((out / "summary.json").read_text())
    losses = [r["loss"] for r in rows if "loss" in r]
    return dict(name=name, tok_s=round(statistics.median(tps)), peak_gib=round(summary["peak_memory_bytes"] / 2**30, 2),
                loss_first=round(losses[0], 3), loss_last=round(losses[-1], 3), wall_s=round(wall, 1))


def main(which):
    import torch

    import seed_recipe
    from randckpt import make_checkpoint

    OUT.mkdir(parents=True, exist_ok=True)
    info = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__)
    for mod in ("transformers", "peft", "trl", "bitsandbytes", "accelerate"):
        info[mod] = __import__(mod).__version__
    print(json.dumps(info), flush=True)
    make_checkpoint()
    write_data()
    results = []

    def keep(r):
        results.append(r)
        print(json.dumps(r), flush=True)
        (OUT / "train_gpu.json").write_text(json.dumps(dict(info=info, results=results), indent=1))

    if "nf4" in which:
        keep(qtune_train("qtune_nf4_2048", "quant=nf4"))
        keep(dict(seed_recipe.bench("seed_nf4_2048", quant="nf4", seq=2048)))
    if "bf16" in which:
        keep(qtune_train("qtune_bf16_2048", "quant=none"))
        keep(dict(seed_recipe.bench("seed_bf16_2048", quant="none", seq=2048)))
    if "oom" in which:  # a deliberate CUDA OOM: qtune must answer with one line and remedies
        r = qtune_train("qtune_oom", "quant=none", "train.gradient_checkpointing=false", f"data.path={LONG}",
                        "data.max_length=32768", steps=2)
        keep(r)
    by = {r["name"]: r for r in results}
    print("\n| pair | qtune tok/s | seed tok/s | speed ratio | qtune peak GiB | seed peak GiB | memory ratio |")
    print("|---|---|---|---|---|---|---|")
    for q in ("nf4_2048", "bf16_2048"):
        a, b = by.get(f"qtune_{q}"), by.get(f"seed_{q}")
        if a and b and "tok_s" in a and "tok_s" in b:
            print(f"| {q} | {a['tok_s']} | {b['tok_s']} | {a['tok_s'] / b['tok_s']:.2f} | {a['peak_gib']} | "
                  f"{b['peak_gib']} | {a['peak_gib'] / b['peak_gib']:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1:] or ["nf4", "bf16", "oom"])
