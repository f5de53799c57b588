"""The 4-bit grouped matmul (qtune.modeling.fast.nf4_gmm) against bitsandbytes' dequantize + torch's grouped_mm, at
Qwen3-30B-A3B's expert shapes: 128 experts, 2048 tokens x top-8 = 16,384 routed rows, gate_up (1536 x 2048) and down
(2048 x 768), forward (x·W_eᵀ) and transposed (dY·W_e). Every tile configuration below is timed (CUDA events, the
median of 20 after 3 warm-ups); the relative error of each against the reference is printed with it.

Run on a GPU machine:  python3 bench/nf4_gmm_microbench.py [ROWS]   (writes $OUT/nf4_gmm_microbench.json)
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIGS = [(128, 128, 128, 8, 3), (128, 128, 64, 4, 3), (128, 128, 256, 8, 2), (128, 128, 128, 8, 4),
           (64, 128, 128, 4, 4), (128, 128, 64, 4, 4), (128, 128, 128, 8, 2), (128, 128, 64, 4, 2)]


def timeit(fn, n=20):
    import torch

    for _ in range(3):
        fn()
    times = []
    for _ in range(n):
        s, e = torch.cuda.Event(True), torch.cuda.Event(True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return sorted(times)[n // 2]


def main(rows=16384):
    import bitsandbytes.functional as bnbf
    import torch
    import torch.nn.functional as F

    from qtune.modeling.fast.nf4_gmm import nf4_gmm

    torch.manual_seed(0)
    dev, E = "cuda", 128
    # routed like a softmax top-8 over uneven experts: some far above the mean, a few empty
    load = torch.distributions.Dirichlet(torch.full((E,), 2.0)).sample()
    ids = torch.multinomial(load, rows, replacement=True).sort().values.to(dev)
    ends = torch.cumsum(torch.bincount(ids, minlength=E), 0).to(torch.int32)
    results = []
    for (R, C) in ((1536, 2048), (2048, 768)):
        w = torch.randn(E, R, C, device=dev, dtype=torch.bfloat16) * 0.02
        q, st = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        del w
        for trans in (False, True):
            x = torch.randn(rows, R if trans else C, device=dev, dtype=torch.bfloat16)

            def ref():
                wd = bnbf.dequantize_4bit(q, st)
                return F.grouped_mm(x, wd if trans else wd.transpose(1, 2), offs=ends)
            want = ref().float()
            dq = bnbf.dequantize_4bit(q, st)
            alone = timeit(lambda: F.grouped_mm(x, dq if trans else dq.transpose(1, 2), offs=ends))
            dq = None
            row = {"R": R, "C": C, "transposed": trans, "dequantize+grouped_mm_ms": timeit(ref),
                   "grouped_mm_alone_ms": alone,
                   "dequantize_alone_ms": timeit(lambda: bnbf.dequantize_4bit(q, st)), "configs": []}
            for cfg in CONFIGS:
                try:
                    got = nf4_gmm(x, q, st, ends, transposed=trans, config=cfg).float()
                    err = ((got - want).norm() / want.norm()).item()
                    t = timeit(lambda: nf4_gmm(x, q, st, ends, transposed=trans, config=cfg))
                except Exception as ex:  # noqa: BLE001 (a configuration the GPU cannot hold: shared memory)
                    row["configs"].append({"config": cfg, "error": f"{type(ex).__name__}: {str(ex)[:120]}"})
                    continue
                row["configs"].append({"config": cfg, "ms": t, "rel_err": err})
            ok = [c for c in row["configs"] if "ms" in c]
            best = min(ok, key=lambda c: c["ms"]) if ok else None
            print(f"R={R} C={C} transposed={trans}: dequantize+grouped_mm {row['dequantize+grouped_mm_ms']:.3f} ms "
                  f"(grouped_mm {row['grouped_mm_alone_ms']:.3f}, dequantize {row['dequantize_alone_ms']:.3f}); "
                  f"nf4_gmm best {best}", flush=True)
            for c in row["configs"]:
                print("   ", c)
            results.append(row)
    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    best = {}
    for trans in (False, True):  # the configuration with the least time over both shapes, per direction
        totals = {}
        for row in results:
            for c in row["configs"]:
                if row["transposed"] == trans and "ms" in c:
                    totals.setdefault(tuple(c["config"]), []).append(c["ms"])
        best["transposed" if trans else "forward"] = min((sum(v), k) for k, v in totals.items() if len(v) == 2)[1]
    print("best:", best)
    (out / "nf4_gmm_microbench.json").write_text(json.dumps({"best": best,
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": __import__("triton").__version__, "bitsandbytes": __import__("bitsandbytes").__version__,
        "rows": rows, "results": results}, indent=1))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 16384)
