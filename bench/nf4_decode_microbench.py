"""A dense nf4 projection at decoding's row counts: bitsandbytes' dequantize + matmul (what training's forward does)
against the grouped 4-bit kernel read as one group (qtune.modeling.fast.lora._four_bit_product), per tile choice.

Run on a GPU machine from the repository root:  python3 bench/nf4_decode_microbench.py
Qwen3-8B's projection shapes, 16/64/256 rows; prints microseconds per call (CUDA-event timed, median of 50) and the
largest relative difference to the dequantized product.
"""
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (12288, 4096), "down": (4096, 12288)}
TILES = {"decode (64,64,128,4,3)": (64, 64, 128, 4, 3), "training (128,128,128,8,3)": (128, 128, 128, 8, 3),
         "(64,128,128,4,3)": (64, 128, 128, 4, 3), "(64,32,128,4,4)": (64, 32, 128, 4, 4)}


def timed(fn, n=50):
    import torch

    for _ in range(5):
        fn()
    times = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)


def main():
    import bitsandbytes as bnb
    import torch

    from qtune.modeling.fast import lora
    from qtune.modeling.fast.nf4_gmm import nf4_gmm

    torch.manual_seed(0)
    for name, (out_f, in_f) in SHAPES.items():
        layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                                  compress_statistics=True).cuda()
        view = lora._OneGroup(layer.weight.quant_state)
        for rows in (16, 64, 256):
            x = torch.randn(rows, in_f, device="cuda", dtype=torch.bfloat16)
            ref = x @ lora._weight(layer, torch.bfloat16).t()
            line = [f"{name} {out_f}x{in_f} rows {rows}: dequantize+matmul "
                    f"{timed(lambda: x @ lora._weight(layer, torch.bfloat16).t()):.1f} us"]
            ends = torch.full((1,), rows, dtype=torch.int32, device="cuda")
            for label, tiles in TILES.items():
                try:
                    got = nf4_gmm(x, layer.weight.data, view, ends, config=tiles)
                    err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                    us = timed(lambda: nf4_gmm(x, layer.weight.data, view, ends, config=tiles))
                    line.append(f"{label} {us:.1f} us (max rel diff {err:.1e})")
                except Exception as e:  # noqa: BLE001 (a tile the kernel refuses: say so)
                    line.append(f"{label} failed: {type(e).__name__}: {str(e)[:80]}")
            print("; ".join(line), flush=True)


if __name__ == "__main__":
    main()
