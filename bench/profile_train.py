"""Where a training step's time goes: qtune's reference path vs its fast path, on the Qwen3-8B-shaped random
checkpoint (bench/seed/randckpt.py), batch 1 x SEQ tokens, LoRA r16 on the 7 projections, checkpointing.

Run on a GPU machine:  python3 bench/profile_train.py [nf4|none] [SEQ]
The model is built as `qtune train` builds it (qtune.modeling.builder), the loss is
TRL's fused head as in training; the optimizer step is left out. Per path: the median step (synchronized),
the host time to issue a step's work (wall time until backward() returns, when the GPU is not waited on),
the GPU's busy time per step (sum of kernel times in torch.profiler) and the top kernels. Writes
$OUT/profile_<quant>_<seq>.txt.
"""
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "seed"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
OUT = Path(os.environ.get("OUT", "/tmp/out"))


# name: the settings that make it (train.* and data.packing overrides to `qtune train`'s own), torch.compile of each
# decoder layer
FAST = ["train.fast=true", "train.liger=false", "train.cuda_graphs=false", "data.packing=false"]
VARIANTS = {
    "ref": (["train.fast=false"], False),
    "fast": (FAST + ["train.offload_activations=true"], False),   # train.fast=auto on CUDA before graphs
    "fast_keep": (FAST + ["train.offload_activations=false"], False),  # without offloading the layer inputs
    "fast_linear": (FAST + ["train.offload_activations=false"], False),  # per-projection functions only (no SwiGLU block)
    "fast_liger": (FAST[:1] + ["train.liger=true", "train.cuda_graphs=false", "data.packing=false",
                               "train.offload_activations=true"], False),  # + train.liger=true
    "fast_compile": (FAST + ["train.offload_activations=true"], True),  # + torch.compile of each decoder layer (tried)
    # train.cuda_graphs with varlen attention for packed rows: what train.fast=auto does
    "graph": (["train.fast=true", "train.liger=false", "train.cuda_graphs=true", "train.offload_activations=false"],
              False),
    "graph_liger": (["train.fast=true", "train.liger=true", "train.cuda_graphs=true",
                     "train.offload_activations=false"], False),  # + train.liger=true (patches the process: last)
    # graph_liger's model stepped eagerly on a row of two sequences (so varlen attention runs outside a graph), with a
    # second table of the operators (and their shapes) that launched the kernels: the graph's replay hides them
    "eager_liger": (["train.fast=true", "train.liger=true", "train.cuda_graphs=true",
                     "train.offload_activations=false"], False),
}


def build(quant: str, variant: str, seq: int = 2048, model: str = "qwen3_8b", folder=None, device: str = "cuda"):
    """The variant's model as `qtune train` builds it (qtune.modeling.builder), with TRL's fused head; the random
    checkpoint unless `folder` names another (the CPU check builds the tiny Qwen3 so)."""
    import torch
    from trl.trainer.utils import add_fused_lm_head

    from qtune.config import compose, to_object
    from qtune.modeling import builder

    overrides, compiled = VARIANTS[variant]
    cfg = to_object(compose([f"model={model}", f"quant={quant}", f"data.max_length={seq}", *overrides]))
    if folder is None:
        from randckpt import PATH

        folder = PATH
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    built = builder.build(cfg, Path(folder), device, dtype, between=add_fused_lm_head)
    model = built.model
    if variant == "fast_linear":
        for module in model.modules():
            if type(module).__name__.endswith("MLP") and "forward" in vars(module):
                del module.forward
    if compiled:
        for layer in model.get_base_model().model.layers:
            layer.compile()
    return model, built.fast


def graph_step(model, seq: int, vocab: int = 151936):
    """The same step as common.fused_head_step, captured once as a CUDA graph (qtune.modeling.fast.graph) and
    replayed: what `qtune train` runs with train.cuda_graphs on."""
    import torch

    from qtune.modeling.fast.graph import GraphedStep
    from qtune.modeling.fast.lora import seed_of

    model.train()
    ids = torch.randint(0, vocab, (1, seq), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    batch = dict(input_ids=ids, labels=ids, position_ids=torch.arange(seq, device="cuda").unsqueeze(0),
                 cu_seq_lens_q=torch.tensor([0, seq], dtype=torch.int32, device="cuda"))
    batch["cu_seq_lens_k"] = batch["cu_seq_lens_q"]
    varlen = model.config._attn_implementation != "sdpa"
    graph = GraphedStep(model, seq, seed_of(model), pad_id=0, sequences=2 if varlen else 0)
    return lambda: graph.step(batch, None, 1.0, accumulating=False)


def varlen_step(model, seq: int, vocab: int = 151936):
    """fused_head_step on a packed row of two sequences (seq - 1 and 1 tokens) with their boundaries, as TRL's
    padding-free collator gives them."""
    import torch

    model.train()
    ids = torch.randint(0, vocab, (1, seq), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    cu = torch.tensor([0, seq - 1, seq], dtype=torch.int32, device="cuda")
    pos = torch.cat([torch.arange(seq - 1, device="cuda"), torch.zeros(1, dtype=torch.long, device="cuda")])[None]

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(input_ids=ids, labels=ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                        max_length_q=seq - 1, max_length_k=seq - 1, fused_lm_head=True)
        loss = -out.log_probs.sum() / out.label_mask.sum()
        loss.backward()
        return loss
    return step


def main(quant="nf4", seq=2048, variants=("ref", "fast")):
    import torch

    from common import fused_head_step, report, time_and_profile
    from randckpt import make_checkpoint

    make_checkpoint()
    OUT.mkdir(parents=True, exist_ok=True)
    lines = []
    for setting in variants:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        model, fp = build(quant, setting, seq)
        step = graph_step(model, seq) if fp.graphs else varlen_step(model, seq) if setting == "eager_liger" \
            else fused_head_step(model, seq)
        t0 = time.time()
        try:
            step()
        except Exception as e:  # noqa: BLE001 (a variant that fails is reported, the others still run)
            print(f"{setting}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            model = step = None
            continue
        model.zero_grad(set_to_none=True)
        first = time.time() - t0
        m = time_and_profile(step, model, timed=8, skip=3, ops=setting.startswith("eager"))
        report(lines, f"{quant} seq {seq} {setting} [{fp.describe()}]", m, 10, first=f"first step {first:.1f} s, ")
        model = step = None  # the step holds the model (and a graph its memory pool): the next variant's peak is its own
    (OUT / f"profile_{quant}_{seq}.txt").write_text("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "nf4", int(sys.argv[2]) if len(sys.argv) > 2 else 2048,
         sys.argv[3].split(",") if len(sys.argv) > 3 else ("ref", "fast"))
