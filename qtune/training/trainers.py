"""Training stages (`train.stage`): which TRL trainer runs, with which arguments, head and data, and what it logs.

  pt, sft  SFTTrainer on packed input_ids + labels (pt: raw text, every token trained)
  dpo      DPOTrainer on prompt, chosen and rejected ids. The reference is the model the run starts from: the base
           with the adapter switched off, or, with train.init_adapter, a frozen copy of that adapter (TRL's "ref"
           adapter: a copy of the adapter's weights, never of the model's)
  kto      KTOTrainer on prompt and completion ids with a desirable/undesirable label; the KL completions are each
           answer's neighbour in its batch, as TRL builds them
  rm       RewardTrainer on prompt+chosen and prompt+rejected ids; the model is the base with a one-output
           sequence-classification head (`score`), trained whole next to the LoRA layers and saved in the adapter
qtune.data.prepare has rendered, tokenized and truncated the records (qtune.data.preference), so the trainers' own dataset
passes are skipped. The losses are TRL's own.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from qtune.config.schema import Config, LoraConfig

SCORE_HEAD = "score"  # transformers' name for the sequence-classification head of Qwen3 and Llama models

# the figure loss.png plots beside the loss, per stage (metrics.jsonl's names, see qtune.training.callbacks.METRIC_NAMES)
CURVE = {"dpo": "reward_margin", "kto": "reward_margin", "rm": "reward_accuracy"}

# the stage's own figures that summary.json and a sweep's summary carry (the last eval value, else the last train one)
FIGURES = {"dpo": ("reward_accuracy", "reward_margin"), "kto": ("reward_margin", "kl"),
           "rm": ("reward_accuracy", "reward_margin")}


# a train sweep's summary columns for the stages' figures (the last eval value, else the last train one)
SWEEP_COLUMNS = ("reward_accuracy", "reward_margin", "kl")


def sweep_figures(summary: dict) -> dict:
    """A finished run's summary.json -> its SWEEP_COLUMNS values."""
    pick = {k: summary.get(f"eval_{k}", summary.get(k)) for k in SWEEP_COLUMNS}
    return {k: v for k, v in pick.items() if v is not None}


def head(stage: str) -> str:
    """What the model ends in: the language-model head, or a one-output score head (rm)."""
    return "score" if stage == "rm" else "lm"


def lora_settings(cfg: Config) -> LoraConfig:
    """The LoRA settings as this stage applies them: a reward model also trains its new score head whole."""
    if head(cfg.train.stage) != "score" or SCORE_HEAD in cfg.lora.modules_to_save:
        return cfg.lora
    return dataclasses.replace(cfg.lora, modules_to_save=[*cfg.lora.modules_to_save, SCORE_HEAD])


def compacts(stage: str) -> bool:
    """Whether the fast path may cut capped MoE expert adapters to the chosen experts (moe.max_experts). Not for dpo
    and kto: TRL copies a PEFT model's adapter as its frozen reference (qtune deletes the copy of a fresh one), and
    the copy is made at the adapter's full size."""
    return stage not in ("dpo", "kto")


def sequences(stage: str) -> int:
    """Sequences a micro-batch row becomes in the forward that keeps activations: a pair's chosen and rejected answers
    run side by side (dpo, rm); kto's KL and every reference forward run without gradients."""
    return 2 if stage in ("dpo", "rm") else 1


def figures(stage: str, rows: list[dict]) -> dict:
    """The stage's own figures at the end of a run, from metrics.jsonl's rows (eval values preferred)."""
    out = {}
    for key in FIGURES.get(stage, ()):
        for name in (f"eval_{key}", key):
            value = next((r[name] for r in reversed(rows) if r.get(name) is not None), None)
            if value is not None:
                out[name] = value
    return out


# ---------------------------------------------------------------- trainer arguments


def training_args(cfg: Config, out: Path, has_eval: bool, device: str, model_dtype, reentrant: bool,
                  evaluate_first: bool, extra: dict = None):
    """The stage's TRL config. `reentrant`: how the model checkpoints activations (TRL switches checkpointing off for
    reference forwards and back on with these kwargs). `evaluate_first`: a preference stage's first eval runs before
    any step, so metrics.jsonl shows where its figures started (fresh runs only: a resume would log it twice).
    `extra`: more TrainingArguments (several processes: qtune.training.distributed.trainer_args)."""
    import torch

    t, stage = cfg.train, cfg.train.stage
    eval_steps = t.eval_steps or t.save_steps
    common = dict(
        output_dir=str(out / "checkpoints"),
        seed=t.seed, data_seed=t.seed,
        per_device_train_batch_size=t.batch_size, per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr, num_train_epochs=t.epochs, max_steps=t.max_steps,
        warmup_steps=t.warmup_ratio, lr_scheduler_type=t.scheduler, weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, optim=t.optim,
        logging_steps=t.logging_steps, logging_first_step=True,
        # NanGuard stops on a non-finite loss, which the filter would hide; it also costs a host sync every micro-step
        logging_nan_inf_filter=False,
        eval_strategy="steps" if has_eval else "no", eval_steps=eval_steps if has_eval else None,
        eval_on_start=has_eval and evaluate_first and stage in CURVE,
        save_strategy="steps", save_steps=t.save_steps, save_total_limit=t.save_total_limit,
        metric_for_best_model="eval_loss" if has_eval else None, greater_is_better=False if has_eval else None,
        bf16=model_dtype == torch.bfloat16 and device != "cpu", fp16=model_dtype == torch.float16,
        use_cpu=device == "cpu",
        gradient_checkpointing=False,  # done in prepare_for_training (non-reentrant, no upcast) or by the fast path
        gradient_checkpointing_kwargs={"use_reentrant": reentrant},
        report_to=list(t.report_to), disable_tqdm=True,
        remove_unused_columns=False, dataloader_num_workers=0, save_only_model=False,
        # batches are pinned (dataloader_pin_memory); copied without blocking, the host does not wait at each batch for
        # the GPU to finish the step before: it launches the next step meanwhile (a CUDA graph's launch alone takes
        # ~15 ms of host time on Qwen3-8B, which a blocking copy left the GPU idle through: docs/benchmarks.md)
        dataloader_pin_memory=True, accelerator_config={"non_blocking": device.startswith("cuda")},
        **(extra or {}),
    )
    aux = cfg.moe.aux_loss_coef if cfg.model.arch.num_experts else None  # MoE balancing loss
    if stage in ("pt", "sft"):
        from trl import SFTConfig

        return SFTConfig(**common, max_length=None, packing=False, padding_free=cfg.data.packing,  # prepare() packed
                         router_aux_loss_coef=aux, dataset_kwargs={"skip_prepare_dataset": True})
    if stage == "dpo":
        from trl import DPOConfig

        d = t.dpo
        return DPOConfig(**common, max_length=None, beta=d.beta, loss_type=[str(d.loss_type)],
                         label_smoothing=d.label_smoothing, router_aux_loss_coef=aux)
    if stage == "kto":
        from trl import KTOConfig

        k = t.kto
        return KTOConfig(**common, max_length=None, beta=k.beta, loss_type=str(k.loss_type),
                         desirable_weight=k.desirable_weight, undesirable_weight=k.undesirable_weight,
                         router_aux_loss_coef=aux)
    from trl import RewardConfig

    return RewardConfig(**common, max_length=None, center_rewards_coefficient=t.rm.center_rewards_coefficient)


# ---------------------------------------------------------------- the trainer


def build_trainer(cfg: Config, model, tokenizer, train_ds, eval_ds, args, callbacks: list, graphs: bool = False,
                  note=None):
    """The stage's TRL trainer over the prepared splits. graphs: pt/sft micro-steps replay a CUDA graph
    (qtune.modeling.fast.graph; the fast path decides), and `note(line)` says when a batch cannot."""
    stage = cfg.train.stage
    kw = dict(model=model, args=args, processing_class=tokenizer, callbacks=callbacks)
    if stage in ("pt", "sft"):
        from trl import SFTTrainer

        if not graphs:
            return SFTTrainer(train_dataset=train_ds, eval_dataset=eval_ds, **kw)
        from qtune.modeling.fast import graph

        trainer = graph.trainer_class(SFTTrainer)(train_dataset=train_ds, eval_dataset=eval_ds, **kw)
        graph.attach(trainer, cfg.train.batch_size, cfg.data.max_length, tokenizer, note)
        return trainer
    if stage == "rm":
        from trl import RewardTrainer  # it reads tokenized chosen_ids/rejected_ids as they are

        trainer = RewardTrainer(train_dataset=train_ds, eval_dataset=eval_ds, **kw)
        # TRL keeps a quantized model's trainable weights in bf16 (QLoRA's recipe for adapters, whose layers cast their
        # input); the score head takes the hidden states as they come, in the model's dtype (fp32 on a CPU)
        dtype = trainer.model.get_base_model().dtype
        for name, p in trainer.model.named_parameters():
            if p.requires_grad and f"{SCORE_HEAD}." in name:
                p.data = p.data.to(dtype)
        return trainer
    if stage == "kto":
        from trl import KTOTrainer

        train_ds, eval_ds = (_with_kl_completions(ds, args.per_device_train_batch_size) for ds in (train_ds, eval_ds))
        trainer = _tokenized(KTOTrainer)(train_dataset=train_ds, eval_dataset=eval_ds, **kw)
    else:
        from trl import DPOTrainer

        trainer = _tokenized(DPOTrainer)(train_dataset=train_ds, eval_dataset=eval_ds, **kw)
    if cfg.train.init_adapter is None and "ref" in trainer.model.peft_config:
        # TRL copies a PEFT model's adapter as a frozen "ref" adapter, the reference for an adapter that starts
        # trained. A fresh adapter starts as the base itself, whose outputs are the adapter switched off (what TRL
        # uses without "ref"): the copy would only cost memory and a LoRA pass per reference forward.
        trainer.model.delete_adapter("ref")
    return trainer


def _tokenized(trainer_class):
    """`trainer_class` reading qtune's prepared ids as they are (its own pass would look for text to tokenize)."""
    class Trainer(trainer_class):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    Trainer.__name__ = trainer_class.__name__
    return Trainer


def _with_kl_completions(ds, batch_size: int):
    """KTO's KL estimate: each answer also scored after another prompt of its batch, TRL's rotation by one within
    each batch of `batch_size` (KTOConfig samples in order, so these batches are the training batches)."""
    if ds is None:
        return None

    def rotate(batch):
        return {"KL_completion_ids": [batch["completion_ids"][-1]] + batch["completion_ids"][:-1]}

    return ds.map(rotate, batched=True, batch_size=batch_size, keep_in_memory=True)
