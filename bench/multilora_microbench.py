"""Per-row adapters (qtune.inference.adapters.RowAdapters) on one LoRA projection of Qwen3-8B's shapes: what a mixed
batch's forward costs against the base alone and against PEFT with one adapter for the whole batch, for each way
RowAdapters computes the delta (the masked wide LoRA, the gathered per-row adapters), over batch sizes, numbers of
adapters and a lone row's prefill. Each forward is captured as a CUDA graph and its replays timed (CUDA events,
median of 50), as serving runs it.

Run on a GPU machine from the repository root:  python3 bench/multilora_microbench.py
`--check` runs the same code on the CPU at toy sizes (eagerly, no timing that means anything) and checks each way's
output against PEFT's, row by row: what CI can run.
"""
import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (12288, 4096), "down": (4096, 12288)}
RANK = 64


def timed(fn, graph: bool, n=50):
    import torch

    if not graph:
        return float("nan")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    times = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)


def projection(out_f, in_f, adapters: int, rank: int, device, dtype):
    """A PeftModel over one nn.Linear with `adapters` random LoRA adapters named a0, a1, ..."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(in_f, out_f, bias=False)).to(device, dtype)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["0"], init_lora_weights=False)
    model = get_peft_model(net, cfg, adapter_name="a0")
    for i in range(1, adapters):
        model.add_adapter(f"a{i}", cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.02)
    return model.eval()


def main():
    import torch

    from qtune.inference.adapters import BASE, RowAdapters

    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true", help="toy sizes on the CPU, outputs checked, nothing timed")
    args = ap.parse_args()
    check = args.check
    device, dtype = ("cpu", torch.float32) if check else ("cuda", torch.bfloat16)
    shapes = {"toy": (48, 32)} if check else SHAPES
    rank = 8 if check else RANK
    batches = (1, 4) if check else (1, 8, 32, 64)
    counts = (1, 3) if check else (1, 4, 8)
    prefill = 16 if check else 2048
    g = torch.Generator().manual_seed(1)
    for shape, (out_f, in_f) in shapes.items():
        for n in counts:
            model = projection(out_f, in_f, n, rank, device, dtype)
            names = [f"a{i}" for i in range(n)]
            runs = [(b, 1) for b in batches] + [(1, prefill)]
            for rows, tokens in runs:
                x = torch.randn(rows, tokens, in_f, device=device, dtype=dtype)
                index = torch.randint(-1, n, (rows,), generator=g).tolist()
                with torch.no_grad():
                    base = model.get_base_model()[0].base_layer
                    line = [f"{shape} {out_f}x{in_f} N={n} B={rows} T={tokens}: base "
                            f"{timed(lambda: base(x), not check):.1f} us",
                            f"PEFT one adapter {timed(lambda: model(x), not check):.1f} us"]
                    for strategy in ("mask", "gather"):
                        with RowAdapters(model, names, max_batch=max(batches), strategy=strategy) as rows_:
                            rows_.select(index)
                            got = model(x)
                            line.append(f"{strategy} {timed(lambda: model(x), not check):.1f} us")
                        if check:  # each row against PEFT with that row's adapter (or none)
                            for b, i in enumerate(index):
                                if i == BASE:
                                    with model.disable_adapter():
                                        want = model(x[b:b + 1])
                                else:
                                    model.set_adapter(names[i])
                                    want = model(x[b:b + 1])
                                assert torch.allclose(got[b:b + 1], want, atol=1e-5), (shape, n, rows, strategy, b)
                print("; ".join(line), flush=True)
    if check:
        print("check: every way equals PEFT row by row")


if __name__ == "__main__":
    main()
