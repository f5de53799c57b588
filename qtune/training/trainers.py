"""The stage's TRL trainer, wired for qtune: the arguments every stage shares (output folder, batches, schedule,
checkpoints, evaluation, precision, logging), the stage's own config and trainer class (qtune.stages), and, for a
stage whose micro-step replays as a CUDA graph, the graphed trainer (qtune.modeling.fast.graph).

qtune.data.prepare has rendered, tokenized and truncated the records, so the trainers' own dataset passes are skipped.
The losses are TRL's own.
"""
from __future__ import annotations

from pathlib import Path

from qtune.config.schema import Config
from qtune.stages import get


# ---------------------------------------------------------------- trainer arguments


# train.report_to names transformers reads -> the package each needs, and how to get it
REPORTERS = {"wandb": ("wandb", "pip install 'qtune[wandb]'"), "tensorboard": ("tensorboard", "pip install tensorboard"),
             "mlflow": ("mlflow", "pip install mlflow"), "comet_ml": ("comet_ml", "pip install comet_ml"),
             "trackio": ("trackio", "pip install trackio")}


def check_reporters(report_to) -> None:
    """Each train.report_to entry qtune knows of is installed: one line before the model loads, not a traceback from
    the trainer after."""
    import importlib.util

    from qtune.errors import QtuneError

    for name in report_to:
        module, how = REPORTERS.get(name, (None, None))
        if module and importlib.util.find_spec(module) is None:
            raise QtuneError(f"train.report_to=[{name}]: {module} is not installed here ({how}), or leave it out: "
                             f"train.report_to=[{', '.join(r for r in report_to if r != name)}]")


def training_args(cfg: Config, out: Path, has_eval: bool, device: str, model_dtype, reentrant: bool,
                  evaluate_first: bool, extra: dict = None):
    """The stage's TRL config. `reentrant`: how the model checkpoints activations (TRL switches checkpointing off for
    reference forwards and back on with these kwargs). `evaluate_first`: a preference stage's first eval runs before
    any step, so metrics.jsonl shows where its figures started (fresh runs only: a resume would log it twice).
    `extra`: more TrainingArguments (several processes: qtune.training.distributed.trainer_args)."""
    import torch

    t, stage = cfg.train, get(cfg.train.stage)
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
        eval_on_start=has_eval and evaluate_first and stage.curve is not None,
        save_strategy="steps", save_steps=t.save_steps, save_total_limit=t.save_total_limit,
        metric_for_best_model="eval_loss" if has_eval else None, greater_is_better=False if has_eval else None,
        bf16=model_dtype == torch.bfloat16 and device != "cpu", fp16=model_dtype == torch.float16,
        use_cpu=device == "cpu",
        gradient_checkpointing=False,  # done in prepare_for_training (non-reentrant, no upcast) or by the fast path
        gradient_checkpointing_kwargs={"use_reentrant": reentrant},
        report_to=list(t.report_to), run_name=out.name, disable_tqdm=True,
        remove_unused_columns=False, dataloader_num_workers=0, save_only_model=False,
        # batches are pinned (dataloader_pin_memory); copied without blocking, the host does not wait at each batch for
        # the GPU to finish the step before: it launches the next step meanwhile (a CUDA graph's launch alone takes
        # ~15 ms of host time on Qwen3-8B, which a blocking copy left the GPU idle through: docs/benchmarks.md)
        dataloader_pin_memory=True, accelerator_config={"non_blocking": device.startswith("cuda")},
        **(extra or {}),
    )
    aux = cfg.moe.aux_loss_coef if cfg.model.arch.num_experts else None  # MoE balancing loss
    return stage.trl_config(cfg, common, aux)


# ---------------------------------------------------------------- the trainer


def reference_copy(model):
    """train.method=full|freeze with dpo or kto: the reference is a frozen copy of the model the run starts from (TRL
    would load one again from the model's path, in the dtype of fp32 master weights). Made before the first step, its
    trained weights back in the dtype of the frozen ones (on a GPU the 16-bit values they were loaded as)."""
    import copy

    import torch

    frozen = next((p.dtype for p in model.parameters() if not p.requires_grad), None)
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.requires_grad_(False)
        if frozen is not None and p.dtype != frozen and torch.is_floating_point(p):
            p.data = p.data.to(frozen)
    ref.eval()
    return ref


def build_trainer(cfg: Config, model, tokenizer, train_ds, eval_ds, args, callbacks: list, graphs: bool = False,
                  note=None):
    """The stage's TRL trainer over the prepared splits. graphs: micro-steps replay a CUDA graph
    (qtune.modeling.fast.graph; the fast path decides where the stage allows it), and `note(line)` says when a batch
    cannot."""
    stage = get(cfg.train.stage)
    trainer_class = stage.trainer_class()
    if graphs:
        from qtune.modeling.fast import graph

        trainer_class = graph.trainer_class(trainer_class)
    train_ds, eval_ds = stage.datasets(train_ds, eval_ds, args.per_device_train_batch_size)
    extra = stage.trainer_kwargs(cfg, tokenizer)
    if stage.reference and not hasattr(model, "peft_config"):
        extra["ref_model"] = reference_copy(model)
    trainer = trainer_class(model=model, args=args, processing_class=tokenizer, callbacks=callbacks,
                            train_dataset=train_ds, eval_dataset=eval_ds, **extra)
    if graphs:
        graph.attach(trainer, cfg.train.batch_size, cfg.data.max_length, tokenizer, note)
    stage.after_init(trainer, cfg)
    return trainer
