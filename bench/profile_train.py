"""Where a training step's time goes: qtune's reference path vs its fast path, on the Qwen3-8B-shaped random
checkpoint (bench/seed/randckpt.py), batch 1 x SEQ tokens, LoRA r16 on the 7 projections, checkpointing.

Run on a GPU machine:  python3 bench/profile_train.py [nf4|none] [SEQ]
The model is built as `qtune train` builds it (qtune.modeling.load + qtune.modeling.fast + PEFT), the loss is
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


VARIANTS = {  # name: (train.fast, liger, reentrant checkpointing, torch.compile of each decoder layer, offload, CUDA graph,
    #               varlen attention for packed rows)
    "ref": ("false", False, False, False, "false", False, False),
    "fast": ("true", False, True, False, "true", False, False),            # train.fast=auto on CUDA before graphs
    "fast_keep": ("true", False, True, False, "false", False, False),      # without offloading the layer inputs
    "fast_linear": ("true", False, True, False, "false", False, False),    # per-projection functions only (no SwiGLU block)
    "fast_liger": ("true", True, True, False, "true", False, False),       # + train.liger=true
    "lora_only": ("true", False, False, False, "false", False, False),     # the fused LoRA functions alone (non-reentrant)
    "fast_compile": ("true", False, True, True, "true", False, False),     # + torch.compile of each decoder layer (tried)
    "graph_sdpa": ("true", False, True, False, "false", True, False),      # train.cuda_graphs, attention through sdpa
    "graph": ("true", False, True, False, "false", True, True),            # + varlen attention: what train.fast=auto does
    "graph_liger": ("true", True, True, False, "false", True, True),       # + train.liger=true (patches the process: last)
    # graph_liger's model stepped eagerly on a row of two sequences (so varlen attention runs outside a graph), with a
    # second table of the operators (and their shapes) that launched the kernels: the graph's replay hides them
    "eager_liger": ("true", True, True, False, "false", False, True),
}


def build(quant: str, variant: str):
    import torch
    from peft import get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    from qtune.config import compose, to_object
    from qtune.modeling import fast as fastpath
    from qtune.modeling.load import load_model
    from qtune.modeling.targets import match, peft_config
    from randckpt import PATH

    fast_setting, liger, reentrant, compiled, offload, graphs, varlen = VARIANTS[variant]
    cfg = to_object(compose(["model=qwen3_8b", f"quant={quant}"]))
    torch.manual_seed(0)
    model = load_model(Path(PATH), cfg.model, cfg.quant, "cuda", torch.bfloat16, True)
    fp = fastpath.decide(fast_setting, "cuda")
    if graphs:
        fastpath.decide_graphs(fp, "true", "cuda", stage="sft", processes=1, packing=True, offload=False,
                               dtype=torch.bfloat16, dropout=cfg.lora.dropout, attention="sdpa")
    fastpath.apply_base(fp, model, "cuda", reentrant, str(liger).lower(), offload)
    if varlen:
        fastpath.packed_attention(fp, model, "cuda", torch.bfloat16, True)
    add_fused_lm_head(model)
    matched = match(model, cfg.lora, cfg.moe)
    model = get_peft_model(model, peft_config(matched, cfg.lora, quant != "none"))
    fastpath.apply_lora(fp, model)
    fastpath.embeddings_to_host(fp, model)
    if variant == "fast_linear":
        for module in model.modules():
            if type(module).__name__.endswith("MLP") and "forward" in vars(module):
                del module.forward
    if compiled:
        for layer in model.get_base_model().model.layers:
            layer.compile()
    return model, fp


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
        model, fp = build(quant, setting)
        step = graph_step(model, seq) if fp.graphs else varlen_step(model, seq) if setting == "eager_liger" \
            else fused_head_step(model, seq)
        t0 = time.time()
        try:
            step()
        except Exception as e:  # noqa: BLE001 (a variant that fails is reported, the others still run)
            print(f"{setting}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            del model
            continue
        model.zero_grad(set_to_none=True)
        first = time.time() - t0
        m = time_and_profile(step, model, timed=8, skip=3, ops=setting.startswith("eager"))
        report(lines, f"{quant} seq {seq} {setting} [{fp.describe()}]", m, 10, first=f"first step {first:.1f} s, ")
        del model, step  # the step holds the model (and a graph its memory pool): the next variant's peak is its own
    (OUT / f"profile_{quant}_{seq}.txt").write_text("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "nf4", int(sys.argv[2]) if len(sys.argv) > 2 else 2048,
         sys.argv[3].split(",") if len(sys.argv) > 3 else ("ref", "fast"))
