"""qtune train vs the seed recipe on Qwen3-30B-A3B-shaped random checkpoints, in one GPU run.

Run on a GPU machine from the repository root:  python3 bench/train_moe_gpu.py LAYERS [LAYERS ...] [-- ROW ...]
e.g. `python3 bench/train_moe_gpu.py 6 12`. Checkpoints come from the seed benchmark's `make()` (bench/seed is a
copy of ../shared/bench): 128 experts of 2048 x 768, top-8, full vocabulary, LAYERS of the real 48.
Rows (all nf4, LoRA r16/alpha 32 on attention + the fused experts, router frozen, gradient checkpointing):
  all      qtune, moe=expert_only, batch 1 x 2048 (the defaults: CUDA graph, varlen attention, liger)
  eager    the same without the graph (train.cuda_graphs=false)
  noliger  the same with the graph but without liger's kernels (train.liger=false)
  top32    the same with moe.max_experts=32 moe.expert_selection=load
  top32host  top32 with the output head in host memory (train.head_on_host=true)
  all8192  the first row at batch 1 x 8192 (train.offload_activations=auto offloads there, so no CUDA graph)
  all8192g  all8192 without the offload (train.offload_activations=false), so with the graph
  ref      qtune with train.fast=false (PEFT's ParamWrapper path, the reference)
  seed     the seed recipe's MoE baseline (LORA_DROPOUT=0: it crashes at its default 0.05)
MODEL=qwen3_235b_a22b runs the `all` rows on Qwen3-235B-A22B-shaped checkpoints (hidden 4096, 128 experts of
4096 x 1536, 94 layers to extrapolate to; made here from qtune's model config) for the "235B on paper" rows;
the seed recipe has no such baseline.
qtune trains through its real CLI: median tokens/s of the logged steps after the third (metrics.jsonl), the
training peak and the whole process's peak (loading included) from summary.json. Each quantity is extrapolated
linearly in layers to the full depth (48; 94 for 235B) from the first and last layer counts. Writes $OUT/train_moe_gpu.json; PREV=<that file from an
earlier call> adds its rows (so rows from several runs end up in one file).
"""
import json
import os
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "seed"))
sys.path.insert(0, str(HERE))
OUT = Path(os.environ.get("OUT", "/tmp/out"))
WORK = Path("/tmp/qtune-bench-moe")
ROWS = ["all", "eager", "noliger", "top32", "top32host", "all8192", "all8192g", "ref", "seed"]

from common import environment, random_checkpoint, words  # noqa: E402 (bench/ is on the path from here)


def write_data():
    WORK.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for name, count, n in (("long", 48, 1400), ("xl", 16, 6000)):  # one full row per step
        text = "".join(json.dumps({"text": words(rng, n)}) + "\n" for _ in range(count))
        (WORK / f"{name}.jsonl").write_text(text)


MODEL = os.environ.get("MODEL", "qwen3_30b_a3b")
FULL_LAYERS = {"qwen3_30b_a3b": 48, "qwen3_235b_a22b": 94}[MODEL]


def qtune_train(name, path, data, *overrides, steps=16, length=2048):
    from common import qtune_train as run

    r = run(name, WORK / name, [f"model={MODEL}", "model.source=local", f"model.local_dir={path}"], data, length, steps,
            WORK / "home", "quant=nf4", "moe=expert_only", "lora.dropout=0", *overrides)
    if "train_peak_gib" in r:  # this table's peak is training's; loading's is process_peak_gib
        r["peak_gib"] = r["train_peak_gib"]
    return r


def extrapolate(results, layers):
    """Per row: each quantity at the model's full depth, linear in layers through the first and last layer counts."""
    lo, hi = min(layers), max(layers)
    table = {}
    for row in ROWS:
        a, b = results.get(f"{row}_L{lo}"), results.get(f"{row}_L{hi}")
        if not (a and b and "tok_s" in a and "tok_s" in b) or lo == hi:
            continue
        est = {}
        for key in ("peak_gib", "train_reserved_gib", "process_peak_gib"):
            if key in a and key in b:
                est[key] = round(b[key] + (b[key] - a[key]) / (hi - lo) * (FULL_LAYERS - hi), 1)
        tokens = 8192 if row.startswith("all8192") else 2048
        sa, sb = tokens / a["tok_s"], tokens / b["tok_s"]  # seconds a step are linear in layers
        est["tok_s"] = round(tokens / (sb + (sb - sa) / (hi - lo) * (FULL_LAYERS - hi)))
        table[row] = est
    return table


def main(nums, which):
    layers = list(nums)
    import torch

    import seed_recipe_moe

    OUT.mkdir(parents=True, exist_ok=True)
    info = environment(model=MODEL)
    write_data()
    results = {}
    if os.environ.get("PREV"):  # rows from an earlier call (one call holds a few rows): extrapolate over both
        results.update(json.loads(Path(os.environ["PREV"]).read_text())["results"])
        layers = sorted({*layers, *(int(k.rsplit("_L", 1)[1]) for k in results)})
    path = OUT / f"train_moe_gpu-{MODEL}.json"

    def keep(r):
        results[r["name"]] = r
        print(json.dumps(r), flush=True)
        path.write_text(json.dumps(dict(info=info, results=results, at_full_depth=extrapolate(results, layers)), indent=1))

    long, xl = WORK / "long.jsonl", WORK / "xl.jsonl"
    for n in nums:
        ckpt = seed_recipe_moe.make(n) if MODEL == "qwen3_30b_a3b" else random_checkpoint(MODEL, n)
        if "all" in which:
            keep(qtune_train(f"all_L{n}", ckpt, long))
        if "eager" in which:
            keep(qtune_train(f"eager_L{n}", ckpt, long, "train.cuda_graphs=false"))
        if "noliger" in which:
            keep(qtune_train(f"noliger_L{n}", ckpt, long, "train.liger=false"))
        if "top32" in which:
            keep(qtune_train(f"top32_L{n}", ckpt, long, "moe.max_experts=32", "moe.expert_selection=load"))
        if "top32host" in which:
            keep(qtune_train(f"top32host_L{n}", ckpt, long, "moe.max_experts=32", "moe.expert_selection=load",
                             "train.head_on_host=true"))
        if "all8192" in which:
            keep(qtune_train(f"all8192_L{n}", ckpt, xl, steps=7, length=8192))
        if "all8192g" in which:
            keep(qtune_train(f"all8192g_L{n}", ckpt, xl, "train.offload_activations=false", steps=7, length=8192))
        if "ref" in which:
            keep(qtune_train(f"ref_L{n}", ckpt, long, "train.fast=false", steps=6))
        if "seed" in which and MODEL == "qwen3_30b_a3b":
            os.environ["LORA_DROPOUT"] = "0"
            r = seed_recipe_moe.bench("seed", n)
            r["name"] = f"seed_L{n}"
            keep(r)
    at48 = extrapolate(results, layers)
    seed48 = at48.get("seed", {})
    print(f"\n| row ({FULL_LAYERS} layers, extrapolated) | tok/s | vs seed | training peak GiB | training reserved GiB "
          "| process peak GiB |")
    print("|---|---|---|---|---|---|")
    for row, est in at48.items():
        ratio = f"{est['tok_s'] / seed48['tok_s']:.2f}x" if seed48.get("tok_s") else "-"
        print(f"| {row} | {est['tok_s']} | {ratio} | {est.get('peak_gib', '-')} | {est.get('train_reserved_gib', '-')} "
              f"| {est.get('process_peak_gib', '-')} |")


if __name__ == "__main__":
    args = sys.argv[1:]
    rows = args[args.index("--") + 1:] if "--" in args else ROWS
    nums = [int(x) for x in (args[:args.index("--")] if "--" in args else args)] or [6, 12]
    main(nums, rows)
