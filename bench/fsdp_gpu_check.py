"""FSDP2 on one GPU through the real CLI: the run that used to fail, then a resume. PASS/FAIL per case.

Run on a GPU machine from the repository root:  python3 bench/fsdp_gpu_check.py [--without-fix] [bf16] [nf4]
For each case (bf16: quant=none in the model's bf16; nf4: QLoRA, 4-bit weights stored in bf16 for FSDP), on the tiny
Qwen3 (tied embeddings, built locally into a temporary QTUNE_HOME):
  fresh   torchrun --nproc_per_node 1 -m qtune train ... train.distributed=fsdp, 4 steps, an evaluation at steps 2 and
          4 with a checkpoint right after each (the step after the first is the one that failed: "aten.embedding.default
          got mixed torch.Tensor and DTensor"), then the final adapter gathered and a sample generated under FSDP
  resume  the same command after adapter/, summary.json and checkpoint-4 are removed: it resumes from checkpoint-2
          (saved right after an evaluation) and must give the fresh run's losses at steps 3 and 4
--without-fix launches qtune with qtune.training.distributed.unshard_skipped_units turned into a no-op (the code before the
fix, less its refusal): on torch before pytorch#180426/#180428 (2.11) the fresh case must fail with that error, which
this script then reports as REPRODUCED. NVLink multicast stays off (NO_MULTICAST). Exit status 1 when a
case fails.
"""
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
CASES = {"bf16": "quant=none", "nf4": "quant=nf4"}
ARGS = [f"data.path={REPO}/data/demo/captains_log.jsonl", f"data.eval_path={REPO}/data/demo/held_out.jsonl",
        "data.max_length=128", "data.max_samples=33",  # 12 packed rows
        "train.max_steps=4", "train.save_steps=2", "train.eval_steps=2", "train.logging_steps=1",
        "train.warmup_ratio=0", "train.report_to=[]", "train.grad_accum=1", "train.lr=5e-3", "lora.dropout=0",
        "train.sample_prompts=[Hello]", "train.sample_max_new_tokens=3", "train.distributed=fsdp"]
WITHOUT_FIX = """import runpy, sys
import qtune.training.distributed as d
d.unshard_skipped_units = lambda *a, **k: 0  # the code before the fix (its CUDA refusal aside)
sys.argv[0] = "qtune"
runpy.run_module("qtune", run_name="__main__")
"""
ERROR = "got mixed torch.Tensor and DTensor"


def versions() -> dict:
    from importlib.metadata import version

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA"
    out = {"device": gpu, "torch": torch.__version__}
    for name in ("accelerate", "transformers", "trl", "peft", "bitsandbytes"):
        try:
            out[name] = version(name)
        except Exception as e:  # noqa: BLE001
            out[name] = f"missing ({type(e).__name__})"
    return out


def build_model(home: Path) -> None:
    from qtune.config import compose, to_object
    from qtune.modeling.assets import build_random_model

    m = to_object(compose(["model=tiny_qwen3"])).model
    build_random_model(m.arch, Path(m.local_dir), home)


def train(run: Path, quant: str, launcher: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", *launcher,
           "train", "model=tiny_qwen3", quant, *ARGS, f"train.output_dir={run}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO,
                          env={**os.environ, **NO_MULTICAST})


def rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def by_step(run: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in rows(run) if key in r}


def tail(p: subprocess.CompletedProcess, n: int = 25) -> str:
    return "\n".join((p.stdout + p.stderr).strip().splitlines()[-n:])


def check_fresh(run: Path, p: subprocess.CompletedProcess) -> list[str]:
    """What a fresh run must show; the list of what it did not."""
    if p.returncode != 0:
        return [f"exit status {p.returncode}" + (f" ({ERROR})" if ERROR in p.stdout + p.stderr else "")]
    bad = []
    loss, ev = by_step(run, "loss"), by_step(run, "eval_loss")
    if sorted(loss) != [1, 2, 3, 4] or not all(math.isfinite(v) for v in loss.values()):
        bad.append(f"losses {loss}")
    if sorted(ev) != [2, 4] or not all(math.isfinite(v) for v in ev.values()):
        bad.append(f"eval losses {ev}")
    ck = run / "checkpoints" / "checkpoint-2"
    for name in ("pytorch_model_fsdp.bin", "optimizer.bin", "adapter_model.safetensors"):
        if not (ck / name).is_file():
            bad.append(f"no {ck / name}")
    s = json.loads((run / "summary.json").read_text())
    if s["distributed"]["strategy"] != "fsdp" or s["steps"] != 4:
        bad.append(f"summary {s['distributed']}, {s['steps']} steps")
    if not (s.get("samples") or {}).get("after"):
        bad.append("no sample generated after training")
    if "1 process (fsdp, nccl)" not in p.stdout:
        bad.append("the run did not say '1 process (fsdp, nccl)'")
    return bad


def check_resume(run: Path, p: subprocess.CompletedProcess, fresh: dict[int, float]) -> list[str]:
    if p.returncode != 0:
        return [f"exit status {p.returncode}" + (f" ({ERROR})" if ERROR in p.stdout + p.stderr else "")]
    bad = []
    if "resuming from" not in p.stdout or "checkpoint-2" not in p.stdout:
        bad.append("did not resume from checkpoint-2")
    s = json.loads((run / "summary.json").read_text())
    if s["resumed_from"] != 2 or s["steps"] != 4:
        bad.append(f"resumed_from {s['resumed_from']}, {s['steps']} steps")
    loss = by_step(run, "loss")
    for step in (3, 4):
        a, b = loss.get(step), fresh[step]
        if a is None or not math.isfinite(a) or abs(a - b) > 1e-2 * abs(b):
            bad.append(f"step {step}: loss {a} after the resume, {b} in the fresh run")
    return bad


def main(argv: list[str]) -> int:
    without_fix = "--without-fix" in argv
    cases = [a for a in argv if a in CASES] or list(CASES)
    work = Path(tempfile.mkdtemp(prefix="qtune-fsdp-gpu-"))
    os.environ["QTUNE_HOME"] = str(work / "home")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    sys.path.insert(0, str(REPO))
    print(json.dumps(versions()), flush=True)
    build_model(work / "home")
    launcher = ["-m", "qtune"]
    if without_fix:
        (work / "without_fix.py").write_text(WITHOUT_FIX)
        launcher = [str(work / "without_fix.py")]
    failed = 0
    for case in cases:
        run = work / case / "run"
        p = train(run, CASES[case], launcher)
        bad = check_fresh(run, p)
        if without_fix:
            if p.returncode != 0 and ERROR in p.stdout + p.stderr:
                print(f"REPRODUCED {case} fresh without the fix: {ERROR} (step after eval + checkpoint)", flush=True)
            else:
                failed += 1
                print(f"NOT REPRODUCED {case} fresh without the fix ({'; '.join(bad) or 'it trained'}): this torch "
                      "may complete partial FSDP groups itself (pytorch#180428)\n" + tail(p), flush=True)
            continue
        print(f"{'PASS' if not bad else 'FAIL'} {case} fresh" + (": " + "; ".join(bad) if bad else
              f": losses {by_step(run, 'loss')}, eval {by_step(run, 'eval_loss')}"), flush=True)
        if bad:
            failed += 1
            print(tail(p), flush=True)
            continue
        fresh = by_step(run, "loss")
        shutil.rmtree(run / "adapter")
        shutil.rmtree(run / "checkpoints" / "checkpoint-4")
        (run / "summary.json").unlink()
        p = train(run, CASES[case], launcher)
        bad = check_resume(run, p, fresh)
        print(f"{'PASS' if not bad else 'FAIL'} {case} resume" + (": " + "; ".join(bad) if bad else
              f" from checkpoint-2: losses {by_step(run, 'loss')}"), flush=True)
        if bad:
            failed += 1
            print(tail(p), flush=True)
    print(f"{'ALL PASS' if not failed else f'{failed} FAILED'} (work folder {work})", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
