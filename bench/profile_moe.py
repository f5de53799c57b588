"""Where an MoE training step's time goes: qtune's fast path on a Qwen3-30B-A3B-shaped random checkpoint of
LAYERS layers (bench/seed/seed_recipe_moe.py's make()), nf4, moe=expert_only, LoRA r16, batch 1 x SEQ, checkpointing.

Run on a GPU machine:  python3 bench/profile_moe.py [LAYERS] [SEQ] [VARIANT,...]
Variants: graph (what train.fast=auto does: a CUDA graph per micro-step, liger's RMSNorm/RoPE, varlen attention),
eager (the same model stepped eagerly on a row of two sequences, with a second table of the operators, by input
shapes, that launched the kernels: a graph's replay hides them), graph_dequant (graph, the 4-bit experts dequantized
before torch's grouped_mm instead of read by qtune's 4-bit grouped matmul), fast (eager, no liger, sdpa,
dequantizing), redequant (fast, the backward dequantizing the experts again instead of keeping the recompute's copy).
The model is built as `qtune train` builds it; the loss is TRL's fused head; the optimizer step is left out. Per
variant: the median step (synchronized), the host time to issue a step, the GPU's kernel time per step and the top
kernels. Writes $OUT/profile_moe_<layers>_<seq>.txt.
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "seed"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
OUT = Path(os.environ.get("OUT", "/tmp/out"))


def build(path: str, variant: str, seq: int = 2048, model: str = "qwen3_30b_a3b", device: str = "cuda"):
    """The variant's model as `qtune train` builds it (qtune.modeling.builder), with TRL's fused head."""
    import torch
    from trl.trainer.utils import add_fused_lm_head

    from qtune.config import compose, to_object
    from qtune.modeling import builder
    from qtune.modeling.fast import experts as moe

    moe.KEEP_RECOMPUTED = variant != "redequant"
    moe.FUSED_4BIT = variant not in ("graph_dequant", "fast", "redequant")
    tuned = OUT / "nf4_gmm_microbench.json"  # the microbenchmark's best tiles, when it ran first in this call
    if tuned.exists():
        from qtune.modeling.fast import nf4_gmm

        best = json.loads(tuned.read_text())["best"]
        nf4_gmm.FORWARD, nf4_gmm.TRANSPOSED = tuple(best["forward"]), tuple(best["transposed"])
    graphs = variant in ("graph", "graph_dequant", "eager")
    cfg = to_object(compose([f"model={model}", "quant=nf4", "moe=expert_only", "lora.dropout=0", "train.fast=true",
                             f"data.max_length={seq}", "train.offload_activations=false",
                             f"train.cuda_graphs={str(graphs).lower()}", f"data.packing={str(graphs).lower()}",
                             f"train.liger={str(graphs).lower()}"]))
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    built = builder.build(cfg, Path(path), device, dtype, between=add_fused_lm_head)
    if variant == "eager":
        built.fast.graphs = False
    return built.model, built.fast


def main(layers=6, seq=2048, variants=("graph", "eager")):
    import torch

    import seed_recipe_moe
    from common import fused_head_step, report, time_and_profile
    from profile_train import graph_step, varlen_step

    path = seed_recipe_moe.make(layers)
    OUT.mkdir(parents=True, exist_ok=True)
    lines = []
    for setting in variants:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        model, fp = build(path, setting, seq)
        step = graph_step(model, seq) if fp.graphs else varlen_step(model, seq) if setting == "eager" \
            else fused_head_step(model, seq)
        step()
        model.zero_grad(set_to_none=True)
        torch.cuda.reset_peak_memory_stats()
        m = time_and_profile(step, model, timed=6, skip=2, ops=setting == "eager")
        report(lines, f"L{layers} seq {seq} {setting} [{fp.describe()}]", m, 22)
        del model
    (OUT / f"profile_moe_{layers}_{seq}.txt").write_text("\n".join(lines))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 6, int(sys.argv[2]) if len(sys.argv) > 2 else 2048,
         sys.argv[3].split(",") if len(sys.argv) > 3 else ("graph", "eager"))
