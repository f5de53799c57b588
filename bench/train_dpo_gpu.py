"""qtune train at train.stage=dpo on a Qwen3-8B-shaped random checkpoint in nf4, in one GPU run.

Run on a GPU machine from the repository root:  python3 bench/train_dpo_gpu.py [ROW ...]
Rows (all nf4, LoRA r16/alpha 32 on q,k,v,o,gate,up,down, gradient checkpointing, batch 1 pair a step):
  dpo       train.fast=auto (on CUDA: qtune's fast path)
  dpo_ref   train.fast=false (plain transformers + PEFT)
Each pair: a prompt of ~512 tokens and two answers of ~512, so a step runs 2 x 1024 tokens with gradients (chosen and
rejected side by side) and the same 2 x 1024 again without, for the reference (the base: the adapter switched off,
no second copy of the weights). The checkpoint is the seed benchmark's maker (bench/seed is a copy of
../shared/bench); speed and memory do not depend on weight or token values. qtune trains through its real CLI:
tokens/s is the median of the logged steps after the third (metrics.jsonl; TRL counts both answers' sequences), the
training and whole-process peaks come from summary.json. Prints one JSON line a row; writes $OUT/train_dpo_gpu.json.
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
WORK = Path("/tmp/qtune-bench-dpo")
ROWS = ["dpo", "dpo_ref"]

from common import environment, qtune_train, words  # noqa: E402 (bench/ is on the path from here)


def write_pairs(path: Path, count: int = 48, prompt_tokens: int = 512, answer_tokens: int = 512) -> None:
    """Preference pairs of filler words, sized in this checkpoint's tokens (its small BPE vocabulary)."""
    from transformers import AutoTokenizer

    from randckpt import PATH

    tok = AutoTokenizer.from_pretrained(PATH)
    rng = random.Random(0)
    per_word = len(tok(words(rng, 1000))["input_ids"]) / 1000
    n_prompt, n_answer = int(prompt_tokens / per_word), int(answer_tokens / per_word)
    with open(path, "w") as f:
        for _ in range(count):
            f.write(json.dumps({"prompt": words(rng, n_prompt), "chosen": words(rng, n_answer),
                                "rejected": words(rng, n_answer)}) + "\n")


def main(which):
    from randckpt import PATH, make_checkpoint

    OUT.mkdir(parents=True, exist_ok=True)
    info = environment()
    make_checkpoint()
    WORK.mkdir(parents=True, exist_ok=True)
    pairs = WORK / "pairs.jsonl"
    write_pairs(pairs)
    results = []
    for row in which:
        fast = "train.fast=false" if row == "dpo_ref" else "train.fast=auto"
        r = qtune_train(row, WORK / row, ["model=qwen3_8b", "model.source=local", f"model.local_dir={PATH}"], pairs,
                        1024, 12, WORK / "home", "quant=nf4", "train.stage=dpo", fast, fmt="auto")
        results.append(r)
        print(json.dumps(r), flush=True)
        (OUT / "train_dpo_gpu.json").write_text(json.dumps(dict(info=info, results=results), indent=1))
    print("\n| row | tok/s (both answers) | training peak GiB | process peak GiB | loss first -> last |")
    print("|---|---|---|---|---|")
    for r in results:
        if "tok_s" in r:
            print(f"| {r['name']} | {r['tok_s']} | {r['train_peak_gib']} | {r['process_peak_gib']} | "
                  f"{r['loss_first']} -> {r['loss_last']} |")
        else:
            print(f"| {r['name']} | failed: {r.get('error')} | | | |")


if __name__ == "__main__":
    rows = sys.argv[1:] or ROWS
    bad = [r for r in rows if r not in ROWS]
    if bad:
        sys.exit(f"unknown row {bad[0]}; rows: {', '.join(ROWS)}")
    main(rows)
