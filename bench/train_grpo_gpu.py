"""GRPO on one GPU: qtune's batched rollout engine against TRL's own generation, the same trainer around both.

Run on a GPU machine from the repository root:  python3 bench/train_grpo_gpu.py [ROW ...] [--layers N] [--steps N]
Rows:
  dense   Qwen3-8B shape (36 layers unless --layers), nf4, LoRA r16 on the 7 projections, 8 prompts x 8 completions a
          step (train.batch_size=1 x train.grad_accum=8: one generation round of 64 completions an optimizer step),
          prompts of ~128 tokens, completions of up to 512, gradient checkpointing
  moe     the same on the Qwen3-30B-A3B shape with 6 and 12 layers (extrapolate to 48)
Each row runs `qtune train train.stage=grpo` through the real CLI twice, train.grpo.generation=qtune and =transformers
(TRL's GRPOTrainer with its default generation: transformers' generate), and reads metrics.jsonl: the rollout
tokens/s (new tokens over a generation round's time), the whole step's seconds (step_s) and the peak. A random
checkpoint never ends a completion, so every round makes 64 x 512 tokens either way. The first step (it captures the
engine's graph) is left out of the medians.
Prints the ratios; writes $OUT/train_grpo_gpu.json.
`--check` runs one small pair on the CPU with the tiny Qwen3 (what CI runs: the benchmark's commands still work).
"""
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "seed"))
sys.path.insert(0, str(HERE))
OUT = Path(os.environ.get("OUT", "/tmp/out"))
WORK = Path("/tmp/qtune-bench-grpo")
from common import environment, random_checkpoint, words  # noqa: E402 (bench/ is on the path from here)

PROMPT_WORDS = 40            # ~128 tokens with the benchmark's tokenizer
COMPLETION = 512


def write_prompts(path: Path, n: int = 96) -> Path:
    rng = random.Random(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": words(rng, PROMPT_WORDS), "answer": "0"}) + "\n" for _ in range(n)))
    return path


def grpo_run(name: str, model_args: list, generation: str, steps: int, *extra: str, completion: int = COMPLETION,
             generations: int = 8, quant: str = "nf4", home: Path | None = WORK / "home") -> dict:
    out = WORK / name
    data = write_prompts(WORK / "prompts.jsonl")
    cmd = [sys.executable, "-m", "qtune", "train", *model_args, "train.stage=grpo", f"quant={quant}", "lora=r16",
           f"data.path={data}", "data.max_length=192", "data.val_size=0", "train.batch_size=1",
           f"train.grad_accum={generations}", f"train.grpo.num_generations={generations}",
           f"train.grpo.max_completion_length={completion}",
           "train.grpo.rewards=[{fn: length}]", f"train.grpo.generation={generation}", f"train.max_steps={steps}",
           "train.logging_steps=1", "train.save_steps=1000", "train.warmup_ratio=0", "train.report_to=[]",
           "train.gradient_checkpointing=true", f"train.output_dir={out}", "train.overwrite=true",
           *([f"paths.home={home}"] if home else []), *extra]
    t = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()
        return dict(name=name, error=" | ".join(tail[-6:])[-1500:], rc=p.returncode)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "loss" in r]
    later = [r for r in rows if r["step"] > 1] or rows
    summary = json.loads((out / "summary.json").read_text())
    peak = summary.get("train_peak_memory_bytes") or summary["peak_memory_bytes"]
    fallback = [x.strip() for x in p.stderr.splitlines() if "without a CUDA graph" in x]
    return dict(name=name, generation=generation, graph_fallback=fallback[:1],
                rollout_tok_s=round(statistics.median(r["rollout_tokens_per_s"] for r in later)),
                rollout_tok_s_first=round(rows[0]["rollout_tokens_per_s"]),
                step_s=round(statistics.median(r["step_s"] for r in later if "step_s" in r), 2) if any(
                    "step_s" in r for r in later) else None,
                completion_length=rows[-1].get("completion_length"), peak_gib=round(peak / 2**30, 2),
                process_peak_gib=round(summary["peak_memory_bytes"] / 2**30, 2), wall_s=round(wall, 1),
                fast=next((x.strip() for x in p.stdout.splitlines() if "train.fast" in x), ""))


def local(checkpoint: str, model: str) -> list[str]:
    return [f"model={model}", "model.source=local", f"model.local_dir={checkpoint}"]


def pair(label: str, model_args: list, steps: int, *extra: str, only=(), **settings) -> list[dict]:
    got = []
    for generation in only or ("qtune", "transformers"):
        r = grpo_run(f"{label}-{generation}", model_args, generation, steps, *extra, **settings)
        print(json.dumps(r), flush=True)
        got.append(r)
    ours, theirs = (got * 2)[:2]
    if len(got) == 2 and "error" not in ours and "error" not in theirs:
        line = (f"{label}: rollouts {ours['rollout_tok_s']} vs {theirs['rollout_tok_s']} tok/s "
                f"({ours['rollout_tok_s'] / theirs['rollout_tok_s']:.2f}x); step {ours['step_s']} vs "
                f"{theirs['step_s']} s ({theirs['step_s'] / ours['step_s']:.2f}x); peak {ours['peak_gib']} vs "
                f"{theirs['peak_gib']} GiB")
        print(line, flush=True)
        got.append({"name": label, "summary": line})
    return got


def main(argv: list[str]) -> None:
    if "--check" in argv:   # CPU, tiny Qwen3: both engines through the real CLI, a couple of short rounds
        got = pair("check", ["model=tiny_qwen3"], 2, "train.fast=false", completion=8, generations=2, quant="none",
                   home=None)
        assert all("error" not in r for r in got) and got[-1]["name"] == "check", got
        return
    layers = int(argv[argv.index("--layers") + 1]) if "--layers" in argv else None
    steps = int(argv[argv.index("--steps") + 1]) if "--steps" in argv else 3
    rows = [a for a in argv if a in ("dense", "moe")] or ["dense"]
    only = [g for g in ("qtune", "transformers") if f"--only-{g}" in argv]
    info = environment()
    results = []
    if "dense" in rows:
        n = layers or 36
        results += pair(f"qwen3_8b-L{n}", local(random_checkpoint("qwen3_8b", n), "qwen3_8b"), steps, only=only)
    if "moe" in rows:
        for n in ([layers] if layers else [6, 12]):
            results += pair(f"qwen3_30b_a3b-L{n}", local(random_checkpoint("qwen3_30b_a3b", n), "qwen3_30b_a3b"), steps,
                            only=only)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "train_grpo_gpu.json").write_text(json.dumps({"environment": info, "results": results}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
