"""qtune train on several GPUs of one machine: DDP scaling, FSDP2-QLoRA of a 32B shape, a parallel sweep.

Run on a machine of several GPUs from the repository root:  python3 bench/train_multi_gpu.py [ROW ...]
Rows (random checkpoints shaped as qtune's model configs; speed and memory do not depend on weight values):
  ddp      Qwen3-8B shape, nf4, LoRA r16 on q,k,v,o,gate,up,down, gradient checkpointing, batch 1 x 2048 tokens per
           GPU, through `qtune train train.nproc=N` for N = 1, 2, 4, ... up to the visible GPUs (ddp:1,2,8 picks):
           global tokens/s (the count is over all processes), scaling efficiency against N x one GPU, rank 0's peak
  fsdp32   Qwen3-32B shape (LAYERS of the real 64, default all), nf4, the same LoRA, on every visible GPU:
           train.distributed=fsdp (FSDP2 over the 4-bit weights stored in bf16) against ddp: tokens/s and the
           per-GPU peak (FSDP's should be about the 4-bit weights / N plus two layers, ddp's the whole model)
  sweep    four 8B nf4 jobs (lora=r8,r16,r32,r64) through hydra/launcher=joblib with n_jobs=4: each job must take a
           GPU of its own (qtune.training.launch.claim_gpus); a sampler reads nvidia-smi every 2 s for the GPUs that ran
           qtune processes; reports the sweep's wall time against the sum of its jobs' times
qtune trains through its real CLI (bench/common.py's qtune_train: median tokens/s of the logged steps after the
third, from metrics.jsonl; peaks from summary.json, which rank 0 writes). NVLink multicast stays off
(NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1, set here for every
process qtune starts). Writes $OUT/train_multi_gpu.json after every row.
"""
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

for key in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
    os.environ[key] = "0" if key == "NCCL_NVLS_ENABLE" else "1"  # inherited by every process started below
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "seed"))
sys.path.insert(0, str(HERE))
OUT = Path(os.environ.get("OUT", "/tmp/out"))
WORK = Path("/tmp/qtune-bench-multi")
LAYERS_32B = int(os.environ.get("LAYERS", "64"))
LORA = ["quant=nf4", "lora.dropout=0"]

from common import environment, qtune_train, random_checkpoint, words  # noqa: E402 (bench/ is on the path from here)


def write_data():
    WORK.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    text = "".join(json.dumps({"text": words(rng, 1400)}) + "\n" for _ in range(512))  # one full 2048 row a record
    (WORK / "long.jsonl").write_text(text)


def train(name, model, path, *overrides, steps=12):
    r = qtune_train(name, WORK / name, [f"model={model}", "model.source=local", f"model.local_dir={path}",
                                        *(["model.arch.num_hidden_layers=%d" % LAYERS_32B] if model == "qwen3_32b" else [])],
                    WORK / "long.jsonl", 2048, steps, WORK / "home", *LORA, *overrides)
    if "train_peak_gib" in r:
        summary = json.loads((WORK / name / "summary.json").read_text())
        r["distributed"] = summary.get("distributed")
    return r


def ddp_rows(worlds, keep):
    path = random_checkpoint("qwen3_8b", 36)
    one = None
    for n in worlds:
        r = train(f"ddp_8b_x{n}", "qwen3_8b", path, f"train.nproc={n}", "train.distributed=ddp")
        if "tok_s" in r:
            one = r["tok_s"] if n == 1 else one
            if one:
                r["scaling_efficiency"] = round(r["tok_s"] / (n * one), 3)
        keep(r)


def fsdp_rows(n, keep):
    path = random_checkpoint("qwen3_32b", LAYERS_32B)
    for how in ("fsdp", "ddp"):
        keep(train(f"{how}_32b_x{n}", "qwen3_32b", path, f"train.nproc={n}", f"train.distributed={how}", steps=8))


def sweep_row(keep):
    """Four jobs, joblib, one GPU each; which GPUs ran qtune processes, from nvidia-smi."""
    path = random_checkpoint("qwen3_8b", 36)
    seen, stop = set(), threading.Event()

    def sample():
        while not stop.is_set():
            q = subprocess.run(["nvidia-smi", "--query-compute-apps=gpu_uuid", "--format=csv,noheader"],
                               capture_output=True, text=True)
            seen.update(x.strip() for x in q.stdout.splitlines() if x.strip())
            stop.wait(2)

    folder = WORK / "sweep"
    cmd = [sys.executable, "-m", "qtune", "train", "-m", "model=qwen3_8b", "model.source=local", f"model.local_dir={path}",
           f"data.path={WORK / 'long.jsonl'}", "data.format=text", "data.max_length=2048", "data.val_size=0",
           "train.max_steps=12", "train.logging_steps=1", "train.grad_accum=1", "train.save_steps=1000",
           "train.warmup_ratio=0", "train.report_to=[]", f"paths.home={WORK / 'home'}", *LORA, "lora=r8,r16,r32,r64",
           "hydra/launcher=joblib", "hydra.launcher.n_jobs=4", f"hydra.sweep.dir={folder}"]
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t
    stop.set()
    if p.returncode != 0:
        keep(dict(name="sweep_joblib_4", error=(p.stderr or p.stdout).strip().splitlines()[-1][:400], rc=p.returncode))
        return
    rows = [json.loads(f.read_text()) for f in sorted(folder.glob("*/job.json"))]
    jobs_s = sum(r["seconds"] or 0 for r in rows)
    keep(dict(name="sweep_joblib_4", wall_s=round(wall, 1), jobs_train_s=round(jobs_s, 1), gpus_used=len(seen),
              visible=_gpus(), errors=[r["error"] for r in rows if r["error"]],
              rows=[{k: r[k] for k in ("overrides", "train_loss", "seconds", "peak_memory_bytes")} for r in rows]))


def _gpus() -> int:
    import torch

    return torch.cuda.device_count()


def main(which):
    OUT.mkdir(parents=True, exist_ok=True)
    info = environment(gpus=_gpus())
    write_data()
    results = []
    path = OUT / "train_multi_gpu.json"

    def keep(r):
        results.append(r)
        print(json.dumps(r), flush=True)
        path.write_text(json.dumps(dict(info=info, results=results), indent=1))

    n = _gpus()
    for row in which:
        name, _, arg = row.partition(":")
        if name == "ddp":
            worlds = [int(x) for x in arg.split(",")] if arg else [w for w in (1, 2, 4, 8, 16) if w <= n]
            ddp_rows(worlds, keep)
        elif name == "fsdp32":
            fsdp_rows(int(arg) if arg else n, keep)
        elif name == "sweep":
            sweep_row(keep)
        else:
            raise SystemExit(f"unknown row {row}: ddp[:N,M,..], fsdp32[:N], sweep")
    print("\n| row | GPUs | strategy | tokens/s (all GPUs) | scaling | rank-0 training peak GiB |")
    print("|---|---|---|---|---|---|")
    for r in results:
        if "tok_s" in r:
            d = r.get("distributed") or {}
            print(f"| {r['name']} | {d.get('world_size')} | {d.get('strategy')} | {r['tok_s']} | "
                  f"{r.get('scaling_efficiency', '-')} | {r['train_peak_gib']} |")


if __name__ == "__main__":
    main(sys.argv[1:] or ["ddp", "fsdp32", "sweep"])
