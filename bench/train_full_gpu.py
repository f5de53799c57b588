"""qtune train at train.method=full|freeze against plain transformers Trainer with the same optimizer, in one GPU run.

Run on a GPU machine from the repository root:  python3 bench/train_full_gpu.py [ROW ...]
Rows (random checkpoints shaped as qtune's model configs, built once under /tmp by bench/common.random_checkpoint;
speed and memory do not depend on weight or token values; 1 x 2048 tokens a step, gradient checkpointing,
adamw_torch_fused, bf16 compute):
  full_1_7b        Qwen3-1.7B-shaped, train.method=full: qtune's default (fp32 master weights, bf16 autocast) against
                   transformers Trainer on the model loaded in fp32 with bf16=True (the same mixed precision)
  full_1_7b_bf16   the same with train.trainable_dtype=bf16 against Trainer on the model loaded in bf16 (pure bf16)
  freeze_8b        Qwen3-8B-shaped, train.method=freeze train.freeze.trainable_layers=4 (the last 4 decoder layers in
                   fp32 master copies, the rest frozen in bf16) against Trainer on the same model with requires_grad
                   on those layers only (cast to fp32) and bf16=True
  full_8b_paged    Qwen3-8B-shaped, train.method=full train.trainable_dtype=bf16 train.optim=paged_adamw_8bit: whether
                   it fits one 80 GiB GPU (qtune's two paths only: its speed and peak are the measure, not a ratio)
`--steps N` (default 50) sets the steps of every side; the table also compares the last loss of train.fast=auto
against train.fast=false (the same data, the same seed), which should end within 2 %.
qtune trains through its real CLI (bench/common.qtune_train: median tokens/s of the logged steps after the third,
training peak from summary.json), with train.fast=auto and train.fast=false; the plain side times each optimizer step
of Trainer.train() with a callback (median after the third) and reads torch's peak. Prints one JSON line a row and a
ratio table; writes $OUT/train_full_gpu.json. `--check` runs the plain side for two steps on a CPU model (CI's
tests/test_bench.py calls plain() on the tiny Qwen3).
"""
import json
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "seed"))
sys.path.insert(0, str(HERE))
OUT = Path(os.environ.get("OUT", "/tmp/out"))
WORK = Path("/tmp/qtune-bench-full")
ROWS = ["full_1_7b", "full_1_7b_bf16", "freeze_8b", "full_8b_paged"]
SHAPES = {"full_1_7b": ("qwen3_1_7b", 28), "full_1_7b_bf16": ("qwen3_1_7b", 28), "freeze_8b": ("qwen3_8b", 36),
          "full_8b_paged": ("qwen3_8b", 36)}
SEQ, STEPS = 2048, 50

from common import environment, qtune_train, words  # noqa: E402 (bench/ is on the path from here)


def write_data(path: Path, count: int = 64, words_each: int = 2400) -> None:
    """Records that each tokenize past SEQ tokens (one full packed row a step)."""
    rng = random.Random(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": words(rng, words_each)}) + "\n" for _ in range(count)))


def plain(path, seq: int = SEQ, steps: int = STEPS, trainable_layers: int | None = None, fp32_master: bool = True,
          optim: str = "adamw_torch_fused", device: str = "cuda", out: Path | None = None) -> dict:
    """transformers Trainer on the checkpoint at `path`: random rows of `seq` tokens, batch 1, gradient checkpointing,
    `optim`. trainable_layers: only the last N decoder layers train (the rest frozen in the load dtype), None: every
    weight. fp32_master: the model (or its trained layers) in fp32 with bf16 autocast, else everything in bf16.
    Returns the median step time after the third as tokens/s, the peak and the losses."""
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    cuda = device.startswith("cuda")
    load = torch.float32 if (fp32_master and trainable_layers is None) or not cuda else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(path, dtype=load, device_map={"": device},
                                                 attn_implementation="sdpa")
    model.config.use_cache = False
    if trainable_layers is not None:
        layers = model.model.layers
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in layers[len(layers) - trainable_layers:]:
            for p in layer.parameters():
                p.requires_grad_(True)
                if fp32_master:
                    p.data = p.data.float()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, vocab, (seq,), generator=g) for _ in range(steps)]

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return {"input_ids": rows[i], "labels": rows[i].clone()}

    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    args = TrainingArguments(output_dir=str(out or WORK / "plain"), per_device_train_batch_size=1,
                             gradient_accumulation_steps=1, max_steps=steps, learning_rate=1e-5, warmup_steps=0,
                             optim=optim, bf16=cuda, use_cpu=not cuda, gradient_checkpointing=True,
                             gradient_checkpointing_kwargs={"use_reentrant": False}, logging_steps=1,
                             save_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0,
                             remove_unused_columns=False, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[Timer()])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    timed = times[3:] or times
    res = dict(tok_s=round(seq / statistics.median(timed)), losses=losses,
               peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
               trainable=sum(p.numel() for p in model.parameters() if p.requires_grad))
    del trainer, model
    if cuda:
        torch.cuda.empty_cache()
    return res


def main(which, steps: int = STEPS):
    from common import random_checkpoint

    OUT.mkdir(parents=True, exist_ok=True)
    info = environment()
    data = WORK / "long.jsonl"
    results = []
    path = OUT / "train_full_gpu.json"

    def keep(r):
        results.append(r)
        print(json.dumps(r), flush=True)
        path.write_text(json.dumps(dict(info=info, results=results), indent=1))

    for row in which:
        model, layers = SHAPES[row]
        ckpt = random_checkpoint(model, layers)
        if not data.is_file():
            write_data(data)
        args = ["model=" + model, "model.source=local", f"model.local_dir={ckpt}"]
        method = ["train.method=full"] if row.startswith("full") else \
            ["train.method=freeze", "train.freeze.trainable_layers=4"]
        bf16 = ["train.trainable_dtype=bf16"] if row.endswith(("_bf16", "_paged")) else []
        optim = "paged_adamw_8bit" if row.endswith("_paged") else "adamw_torch_fused"
        # run folders go once read: a full 8B run's last checkpoint with its optimizer states is ~32 GB (the machine's
        # disk is 64 GB, so the paged row writes to memory-backed /dev/shm where there is one)
        runs = Path("/dev/shm/qtune-bench-full") if row.endswith("_paged") and Path("/dev/shm").is_dir() else WORK
        for side, fast in (("qtune", "auto"), ("ref", "false")):
            r = qtune_train(f"{side}_{row}", runs / f"{side}_{row}", args, data, SEQ, steps, WORK / "home", *method,
                            *bf16, f"train.optim={optim}", f"train.fast={fast}", "train.lr=1e-5")
            shutil.rmtree(runs / f"{side}_{row}", ignore_errors=True)
            keep(r)
        if row.endswith("_paged"):
            continue
        try:
            r = plain(ckpt, steps=steps, trainable_layers=4 if row == "freeze_8b" else None, fp32_master=not bf16,
                      out=WORK / f"plain_{row}")
            keep(dict(name=f"plain_{row}", **{k: v for k, v in r.items() if k != "losses"},
                      loss_first=round(r["losses"][0], 3), loss_last=round(r["losses"][-1], 3)))
        except Exception as e:  # keep the other rows (an out-of-memory plain side is a result too)
            keep(dict(name=f"plain_{row}", error=repr(e)[:300]))
    by = {r["name"]: r for r in results}
    print(f"\n| row | qtune tok/s | ref tok/s | plain tok/s | qtune/plain | qtune train peak GiB | plain peak GiB | "
          f"last loss after {steps} steps, auto / false |")
    print("|---|---|---|---|---|---|---|---|")
    for row in which:
        q, f, p = by.get(f"qtune_{row}", {}), by.get(f"ref_{row}", {}), by.get(f"plain_{row}", {})
        if "tok_s" not in q:
            continue
        ratio = f"{q['tok_s'] / p['tok_s']:.2f}" if "tok_s" in p else "-"
        loss = f"{q['loss_last']} / {f['loss_last']} ({q['loss_last'] / f['loss_last'] - 1:+.1%})" if "loss_last" in f \
            else "-"
        print(f"| {row} | {q['tok_s']} | {f.get('tok_s', '-')} | {p.get('tok_s', '-')} | {ratio} | "
              f"{q['train_peak_gib']} | {p.get('peak_gib', '-')} | {loss} |")


def check() -> None:
    """The plain side, two steps on a small random model on the CPU."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    with tempfile.TemporaryDirectory() as tmp:
        cfg = Qwen3Config(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp)
        r = plain(tmp, seq=16, steps=2, trainable_layers=1, optim="adamw_torch", device="cpu", out=Path(tmp) / "o")
        assert len(r["losses"]) == 2 and all(x == x for x in r["losses"]), r
        print(json.dumps({k: v for k, v in r.items()}))


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        check()
    else:
        argv = sys.argv[1:]
        n = STEPS
        if "--steps" in argv:
            i = argv.index("--steps")
            n = int(argv[i + 1])
            del argv[i:i + 2]
        main(argv or ROWS, n)
