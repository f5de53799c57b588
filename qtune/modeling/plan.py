"""The plan: what the settings adapt and what memory they need, from the config alone (the model is built on the meta
device, no weights). `train --dry-run`, the OOM message and `inspect-moe` all read it, so they never disagree."""
from __future__ import annotations

from dataclasses import dataclass

from qtune.config.schema import Config
from qtune.modeling.estimate import Memory
from qtune.modeling.targets import Matched


@dataclass
class Plan:
    model: object          # the meta-device model
    matched: Matched       # what LoRA (and full training) reaches
    total: int             # the model's parameters
    memory: Memory         # the estimate per GPU for one micro-batch of this config, its world size and strategy
    single: Memory         # the same on one GPU (what train.distributed=auto compares with a GPU's memory)

    @property
    def head_on_host(self) -> bool:
        """train.head_on_host's decision for one GPU of this machine (auto: on this estimate)."""
        return self.single.host_head > 0


def plan(cfg: Config) -> Plan:
    from qtune.distributed import gpu_bytes, strategy, world
    from qtune.modeling.arch import meta_model
    from qtune.modeling.estimate import estimate, experts_4bit, per_process
    from qtune.modeling.fast import graphs_expected, head_on_host, offloads
    from qtune.modeling.targets import match
    from qtune.stages import compacts, head, lora_settings, sequences

    t = cfg.train
    model = meta_model(cfg.model.arch, head(t.stage))
    matched = match(model, lora_settings(cfg), cfg.moe)
    # the tokens one micro-batch puts through a forward that keeps activations (dpo and rm: chosen and rejected)
    tokens = cfg.data.max_length * t.batch_size * sequences(t.stage)
    graphs = graphs_expected(cfg)  # with them, the untied input embeddings are in host memory

    def one_gpu(fast: str, hosted: bool | None = None):
        if hosted is None:  # train.head_on_host: auto decides on this estimate with the head on the GPU
            hosted = head_on_host(str(t.head_on_host), fast != "false", lambda: one_gpu(fast, False).total, gpu_bytes)
        offload = offloads(fast, t.offload_activations, t.gradient_checkpointing, tokens, bool(cfg.model.arch.num_experts))
        experts4 = experts_4bit(fast, cfg.quant)
        return estimate(model, cfg.model.arch, matched, cfg.quant, tokens, t.gradient_checkpointing, on_gpu=True,
                        offload_inputs=offload, experts4=experts4,
                        # CUDA builds of torch bring Triton, which the 4-bit grouped matmul needs
                        experts_direct=experts4,
                        compact=fast != "false" and compacts(t.stage), lm_head=head(t.stage) == "lm",
                        embed_on_host=fast != "false" and graphs, keep_dequantized=fast != "false" and not offload,
                        head_on_host=hosted)

    single = one_gpu(str(t.fast))
    size = max(t.nproc, world().size)  # train.nproc, or the launcher's world under torchrun
    how = strategy(t.distributed, "cuda", size, lambda: single.total)
    # under FSDP2 training takes the reference path (qtune.modeling.fast.decide): no 4-bit experts, no compaction
    memory = per_process(one_gpu("false") if how == "fsdp" else single, how, size, cfg.model.arch.num_hidden_layers)
    return Plan(model, matched, sum(p.numel() for p in model.parameters()), memory, single)
