"""What holds GPU memory at an MoE training run's peak: `qtune train` on a Qwen3-30B-A3B-shaped random checkpoint
(bench/seed/seed_recipe_moe.py's make()), run in this process with the CUDA allocator's history recorded.

Run on a GPU machine from the repository root:  python3 bench/memory_moe.py LAYERS [LAYERS ...] [-- OVERRIDE ...]
e.g. `python3 bench/memory_moe.py 6 12 -- moe.max_experts=32 moe.expert_selection=load` (the settings of
bench/train_moe_gpu.py's rows: nf4, moe=expert_only, LoRA r16, dropout 0, batch 1 x 2048, CUDA graph).

Per layer count it replays the allocator's trace (alloc / free_completed, every allocation of the run, the graph's
private pool included) to find the largest total of live allocations after training began, and lists what was live
then, grouped by the innermost frames of qtune, TRL, transformers, PEFT, bitsandbytes, liger and torch.optim that
allocated it. The peak it finds is the one `qtune train` reports (torch.cuda.max_memory_allocated, after setup).
Writes $OUT/memory_moe_L<layers>.txt.
"""
import collections
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "seed"))
sys.path.insert(0, str(HERE))
OUT = Path(os.environ.get("OUT", "/tmp/out"))
WORK = Path("/tmp/qtune-bench-moe")
MARK = 7919 * 512  # an allocation of this size marks where training begins in the trace
OURS = ("/qtune/", "/trl/", "/transformers/", "/peft/", "/bitsandbytes/", "/liger_kernel/", "/torch/optim/",
        "/torch/utils/checkpoint", "/accelerate/")


def where(frames) -> str:
    """The two innermost frames of the libraries above (the trace lists frames innermost first)."""
    picked = []
    for f in frames or []:
        name = f.get("filename", "")
        if any(o in name for o in OURS):
            short = name.split("/site-packages/")[-1].split("/main/")[-1]
            picked.append(f"{short}:{f.get('line')} {f.get('name')}")
            if len(picked) == 2:
                break
    return " < ".join(picked) or "(no Python frame of ours)"


def analyse(trace, baseline: int) -> tuple[list[str], int]:
    """Replay the trace: the peak after the mark, and what was live at it."""
    live, total, start = {}, baseline, None
    best, best_live = -1, None
    for i, e in enumerate(trace):
        action, addr, size = e["action"], e["addr"], e["size"]
        if action == "alloc":
            live[addr] = (size, e.get("frames"))
            total += size
            if size == MARK and start is None:
                start = i
        elif action == "free_completed":
            if addr in live:
                total -= live.pop(addr)[0]
        if start is not None and total > best:
            best, best_live = total, dict(live)
    lines = [f"trace: {len(trace)} events, training began at event {start}; peak of live allocations after it: "
             f"{best / 2**30:.3f} GiB (the baseline before the trace: {baseline / 2**30:.3f} GiB, not itemised)"]
    groups = collections.defaultdict(lambda: [0, 0])
    for size, frames in (best_live or {}).values():
        g = groups[where(frames)]
        g[0] += size
        g[1] += 1
    lines.append(f"{'GiB':>8} {'blocks':>7}  allocated at")
    for key, (size, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:40]:
        lines.append(f"{size / 2**30:8.3f} {n:7d}  {key}")
    return lines, best


def run(layers: int, overrides: list[str]) -> None:
    import torch

    import seed_recipe_moe
    from train_moe_gpu import write_data

    write_data()
    ckpt = seed_recipe_moe.make(layers)
    out = WORK / f"memory_L{layers}"
    from qtune.modeling.fast import graph

    capture = graph.GraphedStep.capture

    def marked(self, *a, **k):
        torch.empty(MARK, dtype=torch.uint8, device="cuda")  # freed at once: the trace's mark
        return capture(self, *a, **k)

    graph.GraphedStep.capture = marked
    torch.cuda.memory._record_memory_history(max_entries=4_000_000, stacks="python")
    baseline = torch.cuda.memory_allocated()
    sys.argv = ["qtune", "train", "model=qwen3_30b_a3b", "model.source=local", f"model.local_dir={ckpt}",
                f"data.path={WORK / 'long.jsonl'}", "data.format=text", "data.max_length=2048", "data.val_size=0",
                "train.max_steps=5", "train.logging_steps=1", "train.grad_accum=1", "train.save_steps=1000",
                "train.warmup_ratio=0", "train.report_to=[]", f"train.output_dir={out}", "train.overwrite=true",
                f"paths.home={WORK / 'home'}", "quant=nf4", "moe=expert_only", "lora.dropout=0", *overrides]
    from qtune.cli import main

    t = time.time()
    try:
        main()
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    graph.GraphedStep.capture = capture
    summary = json.loads((out / "summary.json").read_text())
    lines = [f"L{layers} {' '.join(overrides)}: {time.time() - t:.0f} s; summary.json training peak "
             f"{summary.get('train_peak_memory_bytes', 0) / 2**30:.3f} GiB, process peak "
             f"{summary['peak_memory_bytes'] / 2**30:.3f} GiB; max_memory_reserved "
             f"{torch.cuda.max_memory_reserved() / 2**30:.3f} GiB"]
    trace = snap["device_traces"][torch.cuda.current_device()]
    more, _ = analyse(trace, baseline)
    lines += more
    text = "\n".join(lines)
    print(text, flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"memory_moe_L{layers}.txt").write_text(text + "\n")


if __name__ == "__main__":
    args = sys.argv[1:]
    extra = args[args.index("--") + 1:] if "--" in args else []
    counts = [int(a) for a in (args[:args.index("--")] if "--" in args else args)]
    if len(counts) > 1:  # one process a layer count: each starts with an empty allocator and trace
        import subprocess

        for n in counts:
            subprocess.run([sys.executable, __file__, str(n), "--", *extra], check=False)
    else:
        run(counts[0], extra)
