"""`qtune train`: LoRA / QLoRA with TRL's trainers into a run folder, at the stage `train.stage` names (qtune.stages).

The recipe, top to bottom:
  1. decide what the output folder means: a fresh run, a resume, or a refusal
  2. tokenizer + prepared data (prepared now when the cache misses), as the stage trains on it
  3. base model, quantized per `quant=`, frozen, activation checkpointing (rm: under a new score head)
  4. LoRA on exactly the targets qtune.modeling.targets.match() names (the dry run shows the same list), its weights
     taken from train.init_adapter when set
  5. the stage's TRL trainer (SFT, DPO, KTO, Reward); callbacks write metrics.jsonl and loss.png, show progress,
     stop on NaN and turn SIGINT/SIGTERM into a checkpoint and a clean exit
  6. the final adapter, written atomically, and summary.json
train.method=full|freeze (qtune.modeling.weights) trains the weights themselves instead of step 4 (requires_grad on what
qtune.modeling.targets.match_weights names, the dry run's same table) and writes model/, a whole checkpoint, at step 6.
With several processes (train.nproc=N: qtune.training.launch; torchrun; accelerate launch) every process runs this recipe;
rank 0 decides what the folder means and prepares the data first, and alone writes the run folder.
Run folder: config.yaml, data.json (examples per split and source), checkpoints/checkpoint-N/, adapter/,
metrics.jsonl, loss.png, tensorboard/, samples.jsonl, summary.json.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from qtune.config.schema import Config, QuantMethod
from qtune.errors import QtuneError


class TrainingError(QtuneError):
    """Training stopped for a reason the user can act on (NaN loss, out of memory)."""


def run(cfg: Config, dry_run: bool = False):
    from qtune.inference.scoring import Scorer
    from qtune.stages import get, rewards

    rewards.use_scorer(Scorer)                   # grpo's reward_model reward loads rm runs as inference does
    get(cfg.train.stage).check_run(cfg)          # the stage's checks of the whole config (grpo: rewards, context)
    from qtune.modeling.rope import check_context

    check_context(cfg)                           # data.max_length within the model's positions (YaRN's too)
    from qtune.modeling import weights

    weights.check(cfg)                           # train.method=full|freeze's settings, train.optim's package
    if weights.full(cfg) and not dry_run:        # what train.freeze names, on the meta-device model (no weights)
        from qtune.modeling.arch import meta_model
        from qtune.modeling.targets import trained

        trained(meta_model(cfg.model.arch, get(cfg.train.stage).head), cfg)
    if dry_run:
        return plan(cfg, show=True)
    from qtune.data.prepare import check_inputs

    check_inputs(cfg.data)                       # cheap checks first: no model loads, no heavy imports for a typo
    from qtune import runs, ui
    from qtune.modeling.world import world

    if cfg.train.init_adapter:
        runs.adapter_folder(cfg.train.init_adapter, "train.init_adapter")
    from qtune.io import check_writable

    main = world().main
    if not main:
        ui.silence()
    out = Path(cfg.train.output_dir).expanduser()
    check_writable(out, "train.output_dir")
    from qtune.training.trainers import check_reporters

    check_reporters(cfg.train.report_to)
    with runs.hold(out, warn=ui.print_warning):  # one process trains into a run folder at a time
        return _run(cfg, out, main)


def _run(cfg: Config, out: Path, main: bool):
    from qtune import runs, ui
    from qtune.training import distributed as dist
    from qtune.training import launch
    from qtune.modeling.load import pick_device, quiet_libraries

    device, dtype = pick_device(cfg.train.device, cfg.train.dtype)
    if launch.needed(cfg.train):                 # train.nproc=N: this same run in N processes
        dist.check_devices(device, cfg.train.nproc, cfg.train.backend)
        return launch.start(run, cfg, cfg.train.nproc)
    device = dist.local_device(device)
    from qtune.modeling.world import cap_gpu

    cap_gpu(cfg.train.max_gpu_memory, device)    # train.max_gpu_memory: before anything is allocated on the GPU
    setup = _setup(cfg, device)
    with dist.main_first(setup):
        resume = runs.resume_point(out, cfg)                                     # 1
    if resume:
        dist.check_resume(resume, setup)
    quiet_libraries(trl=True)                                                    # (seconds: after the checks)
    tokenizer, prepared = _data(cfg, setup)                                      # 2
    if resume:
        runs.check_same_data(out, cfg, prepared.digest)
    out.mkdir(parents=True, exist_ok=True)
    model, matched, fast = _model(cfg, setup, device, dtype, out, prepared.load("train"))  # 3, 4
    if main:
        runs.write_config(out, cfg, setup.record(), prepared.digest)
        runs.write_data_counts(out, prepared.stats)  # what the model card of `qtune push` reports
    trainer, nan = _trainer(cfg, setup, model, tokenizer, prepared, out, resume, fast, dtype)  # 5
    samples_before = _samples(cfg, trainer.model, tokenizer, out, "before") if resume is None and main else None
    start = f", from {cfg.train.init_adapter}" if cfg.train.init_adapter else ""
    how = f"{cfg.quant.method}, LoRA r{cfg.lora.r}" if str(cfg.train.method) == "lora" else f"train.method={cfg.train.method}"
    ui.info(f"training {cfg.model.name} ({cfg.train.stage}, {how}{start}) on {device}: "
            f"{matched.trainable:,} trainable parameters in {len(matched.targets)} targets -> {out}")
    ui.info(setup.describe())
    if device == "cpu" and cfg.train.device == "auto" and main:
        _suggest_cpu_preset(cfg, ui.note)
    if resume:
        ui.info(f"resuming from {resume}")
    seconds = _train(cfg, trainer, nan, out, resume)
    _end_wandb_run()
    summary = _finish(cfg, setup, trainer, tokenizer, out, seconds, samples_before, _step_of(resume))  # 6
    if not main:
        return None
    ui.show_train_summary(summary)
    from qtune.modeling import weights

    if cfg.train.merge_after and weights.full(cfg):
        ui.info(f"train.merge_after: nothing to fold (train.method={cfg.train.method}); {out / 'model'} is the model")
    elif cfg.train.merge_after:
        del trainer, model  # free the training model first: the merge loads the base again
        summary["merged"] = _merge_after(cfg, out)
    return summary


def _end_wandb_run() -> None:
    """train.report_to=[wandb]: end its run here, not at interpreter exit, where wandb writes its closing lines with
    escape codes into a pipe or a file."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def _suggest_cpu_preset(cfg: Config, say) -> None:
    """No GPU found (train.device=auto): one line naming train=cpu where the settings are the GPU-minded defaults.
    A suggestion, not a switch: the same command keeps the same global batch and schedule on every machine."""
    t = cfg.train
    if t.grad_accum <= 2 and t.logging_steps <= 1 and not t.gradient_checkpointing:
        return
    say(f"no GPU: training on the CPU with train.grad_accum={t.grad_accum}, a log every {t.logging_steps} steps and "
        f"gradient checkpointing {'on' if t.gradient_checkpointing else 'off'}; train=cpu (grad_accum 1, a log every "
        "step, no checkpointing) suits a CPU run")


def _train(cfg: Config, trainer, nan, out: Path, resume) -> float:
    """Run the trainer; returns its seconds. Every way a run stops short ends here: out of memory and a non-finite
    loss as a TrainingError, a signal as a saved checkpoint and exit status 130/143."""
    from qtune import ui
    from qtune.training.callbacks import GracefulStop

    if resume and _finished(trainer, resume):
        from qtune.runs import output_of

        if cfg.train.resume == "continue" and output_of(out) is not None:
            from qtune.errors import ConfigError

            t = cfg.train
            asked = f"train.max_steps={t.max_steps}" if t.max_steps > 0 else f"train.epochs={t.epochs:g}"
            raise ConfigError(f"train.resume=continue: {out} already trained {_step_of(resume)} steps, which {asked} "
                              "does not pass; ask for more (a larger train.epochs, or train.max_steps)")
        # transformers' loop takes a step before it checks max_steps, so resuming from the last step's checkpoint (a
        # finished run whose adapter/ is gone) would train one step too many: load that checkpoint instead
        from transformers import TrainerState

        trainer._load_from_checkpoint(str(resume))
        trainer.state = TrainerState.load_from_json(str(Path(resume) / "trainer_state.json"))
        return 0.0
    start = time.time()
    with GracefulStop() as stop:
        try:
            trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        except Exception as e:
            if type(e).__name__ == "OutOfMemoryError":
                raise TrainingError(_oom_message(cfg)) from None
            from qtune.io import out_of_space

            if out_of_space(e, out):
                raise _disk_full(cfg, trainer, out) from None
            raise
    if nan.stopped is not None:
        raise TrainingError(nan.stopped.message(out))
    if stop.signal is not None:
        ui.info(f"stopped by {stop.signal} at step {trainer.state.global_step}; a checkpoint was saved in "
                f"{out / 'checkpoints'}. Run the same command again to resume.")
        raise SystemExit(130 if stop.signal == "SIGINT" else 143)
    return time.time() - start


def _disk_full(cfg: Config, trainer, out: Path):
    """The disk filled up during training (a checkpoint is the big write): the checkpoint it was writing is removed,
    so that the next run resumes from the last complete one; the line says what one takes and what is free."""
    import shutil

    from qtune.modeling.world import world
    from qtune.io import disk_full
    from qtune.runs import latest_checkpoints

    complete = latest_checkpoints(out)
    partial = [p for p in (out / "checkpoints").glob("checkpoint-*") if p.is_dir() and p not in complete]
    if world().main:
        for p in partial:
            shutil.rmtree(p, ignore_errors=True)
    doing = (f"saving {out / 'checkpoints' / partial[0].name}" if len(partial) == 1
             else f"at step {trainer.state.global_step} in {out}")
    left = (f"the half-written {partial[0].name} was removed" if len(partial) == 1 else "nothing half-written is left")
    then = f"it resumes from {complete[-1].name}" if complete else "it starts afresh"
    return disk_full(doing, out, _checkpoint_bytes(cfg, trainer, complete),
                     f"{left}; free space and run the same command again ({then})")


def _checkpoint_bytes(cfg: Config, trainer, complete: list[Path]) -> int:
    """What one checkpoint takes: the last complete one's size, else an estimate (the adapter, the optimizer's two
    moments, the tokenizer's files)."""
    from qtune.modeling.load import TOKENIZER_FILES

    if complete:
        return sum(f.stat().st_size for f in complete[-1].rglob("*") if f.is_file())
    trainable = sum(p.numel() * p.element_size() for p in trainer.model.parameters() if p.requires_grad)
    local = Path(cfg.model.local_dir).expanduser()
    tokenizer = sum(f.stat().st_size for pattern in TOKENIZER_FILES for f in local.glob(pattern) if f.is_file())
    from qtune.modeling import weights

    if weights.full(cfg):  # every weight and the optimizer's states
        total = sum(p.numel() for p in trainer.model.parameters())
        count = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        return int(weights.checkpoint_bytes(cfg, total, count)) + tokenizer
    return 3 * trainable + tokenizer


def _finished(trainer, checkpoint) -> bool:
    """Whether `checkpoint` is already at the step this run trains to (max_steps, or the epochs' steps)."""
    return _step_of(checkpoint) >= trainer.set_initial_training_values(trainer.args, trainer.get_train_dataloader())[-1]


def _merge_after(cfg: Config, out: Path) -> str:
    """train.merge_after: fold the new adapter into the base, as `qtune merge` would."""
    import gc

    from qtune import ui
    from qtune.export.merging import merge

    gc.collect()
    result = merge(cfg, out / "adapter", out / "merged", warn=ui.print_warning)
    ui.info(f"merged into {out / 'merged'} (parity {result['max_abs_diff']:.3g} <= {cfg.merge.tolerance:g})")
    return str(out / "merged")


# ---------------------------------------------------------------- the dry run


def plan(cfg: Config, show: bool = False) -> dict:
    """Targets, counts and a memory estimate from the config alone (qtune.modeling.plan)."""
    from qtune.modeling.plan import plan as make_plan
    from qtune.modeling.targets import check

    from qtune.modeling import weights

    p = make_plan(cfg)
    if not weights.full(cfg):
        check(p.matched, cfg.lora)
    result = {"model": cfg.model.name, "quant": str(cfg.quant.method), "method": str(cfg.train.method),
              "total_params": p.total,
              "trainable_params": p.matched.trainable, "targets": len(p.matched.targets),
              "unmatched": p.matched.unmatched, "covered": p.matched.covered, "memory": p.memory.as_dict()}
    if weights.full(cfg):
        each = weights.checkpoint_bytes(cfg, p.total, p.matched.trainable)
        result["checkpoint_bytes"] = int(each)
        result["checkpoints_bytes"] = int(each * cfg.train.save_total_limit)
    longest = _longest(cfg, p.model)
    result["capacity"] = {"max_length": longest.tokens, "gpu_max_length": longest.gpu_tokens,
                          "budget_bytes": int(longest.budget), "host_budget_bytes":
                              None if longest.host_budget is None else int(longest.host_budget),
                          "host_bytes_per_token": int(longest.host_per_token)}
    if show:
        from qtune import ui

        ui.show_lora_plan(cfg, p.matched, p.total, p.memory)
        ui.info(_capacity_line(cfg, longest))
        if weights.full(cfg):
            ui.info(f"checkpoints: ~{each / 1e9:.2f} GB each (every weight and the {cfg.train.optim} states), up to "
                    f"train.save_total_limit={cfg.train.save_total_limit} kept: ~{each * cfg.train.save_total_limit / 1e9:.2f} GB "
                    f"on disk, plus {2 * p.total / 1e9:.2f} GB for model/")
            from qtune.modeling.plan import lighter
            from qtune.modeling.world import gpu_budget

            usable = gpu_budget(cfg.train.max_gpu_memory)  # (its usable share, or the cap)
            if p.memory.total > usable:
                ui.print_warning(f"train.method={cfg.train.method}: the estimate ({p.memory.total / 2**30:.1f} GiB) "
                                 f"exceeds the {usable / 2**30:.1f} GiB one GPU offers; instead: "
                                 + ", ".join(lighter(cfg, usable)))
    return result


# ---------------------------------------------------------------- the builders


def _setup(cfg: Config, device: str):
    """What the processes ask of the engines (qtune.training.distributed.Setup), their process group joined (one process: none)."""
    from qtune.modeling.world import world
    from qtune.training import distributed as dist

    def one_gpu_bytes() -> float:
        from qtune.modeling.plan import plan as make_plan

        return make_plan(cfg).single.total

    dist.check_devices(device, world().local_size, cfg.train.backend)
    setup = dist.setup(cfg.train, cfg.quant.method, device, need_bytes=one_gpu_bytes)
    dist.init(setup, device)
    return setup


def _data(cfg: Config, setup):
    from qtune import ui
    from qtune.data.prepare import prepare
    from qtune.training.distributed import check_rows, main_first
    from qtune.modeling.load import load_tokenizer
    from qtune.stages import get

    tokenizer = load_tokenizer(cfg.model, cfg.paths)
    with ui.status("preparing data"), main_first(setup):  # prepared once: the others find it in the cache
        prepared = prepare(cfg.data, tokenizer, cfg.model.name, cfg.model.chat_template, get(cfg.train.stage).data)
    for w in prepared.warnings:
        ui.print_warning(w)
    if not prepared.cache_hit:
        from qtune.runs import write_config

        write_config(prepared.path, cfg)
    s = prepared.stats
    ui.info(f"data: {s['train']['kept']} train / {s.get('eval', {}).get('kept', 0)} eval examples, "
            f"{s['train']['tokens']:,} train tokens ({'cache hit' if prepared.cache_hit else 'prepared'}: {prepared.path})")
    check_rows(len(prepared.load("train")), setup)  # packed rows (stats count examples)
    return tokenizer, prepared


def _model(cfg: Config, setup, device: str, dtype, out: Path, train_ds):
    """Steps 3 and 4: the training model as qtune.modeling.builder builds it."""
    from transformers import set_seed

    from qtune import ui
    from qtune.modeling import builder
    from qtune.modeling.hub import ensure_model
    from qtune.training.distributed import main_first

    folder = ensure_model(cfg.model, cfg.download, cfg.paths, warn=ui.print_warning)
    set_seed(cfg.train.seed)  # LoRA's A matrices (and rm's score head) are drawn now, before the trainer seeds anything
    fsdp = setup.strategy == "fsdp"
    with ui.status(f"loading {cfg.model.name}"):
        model, fast = builder.before_peft(cfg, folder, device, dtype, fsdp=fsdp, processes=setup.world_size)
    # rank 0 measures and keeps experts.json (moe.max_experts); the others read it
    built = builder.after_peft(cfg, model, fast, device, out=out, train_ds=train_ds, coordinate=lambda: main_first(setup),
                               say=ui.info, warn=ui.print_warning)
    if fsdp:  # the units TRL's fused LM head leaves half-run (qtune.training.distributed.unshard_skipped_units)
        from qtune.training.distributed import unshard_skipped_units

        unshard_skipped_units(built.model)
    ui.info(fast.describe())
    return built.model, built.matched, fast


def _trainer(cfg: Config, setup, model, tokenizer, prepared, out: Path, resume, fast, dtype=None):
    """fast: the fast path's decision (_model). With it on, the model checkpoints the fast path's way (reentrant),
    which TRL repeats when it turns checkpointing back on; with fast.graphs, SFT steps replay a CUDA graph."""
    import os

    from qtune import ui
    from qtune.stages import get
    from qtune.training import trainers
    from qtune.training.callbacks import MetricsCallback, NanGuard, ProgressCallback, StopOnSignal, WorldRecord
    from qtune.modeling.world import world
    from qtune.training.distributed import check_wrapped, trainer_args

    train_ds = prepared.load("train")
    eval_ds = prepared.load("eval")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = str(next(base.parameters()).device.type)
    main = world().main
    # the run's compute dtype (full/freeze's fp32 master weights autocast to it), else the model's
    args = trainers.training_args(cfg, out, eval_ds is not None, device, dtype or base.dtype, fast.on,
                                evaluate_first=resume is None,
                                extra=trainer_args(setup, cfg.train.gradient_checkpointing))  # DDP or FSDP2
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / "tensorboard")
    os.environ.setdefault("WANDB_DIR", str(out))   # train.report_to=[wandb]: its run folder in the run's (unless set)
    metrics = MetricsCallback(out, resume_step=_step_of(resume), curve=get(cfg.train.stage).curve)
    nan = NanGuard()
    trainer = trainers.build_trainer(cfg, model, tokenizer, train_ds, eval_ds, args,
                                   [StopOnSignal(), nan, metrics, WorldRecord(**setup.record()),
                                    ProgressCallback(ui.train_progress if ui.is_terminal() and main else None,
                                                     figures=get(cfg.train.stage).figures)],
                                   graphs=fast.graphs, note=ui.info)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # ProgressCallback prints instead
    check_wrapped(setup, trainer)
    if resume:
        _continue_token_count(trainer, resume)
    return trainer, nan


def _continue_token_count(trainer, checkpoint) -> None:
    """TRL counts the trained tokens from 0 in every process it starts; a resumed run goes on from the checkpoint's
    count (its last log, which NanGuard makes coincide with the save), so metrics.jsonl's tokens and tokens/s carry
    on rather than restarting."""
    state = Path(checkpoint) / "trainer_state.json"
    logs = json.loads(state.read_text()).get("log_history", []) if state.is_file() else []
    counts = [e["num_tokens"] for e in logs if isinstance(e.get("num_tokens"), (int, float))]
    if counts and hasattr(trainer, "_total_train_tokens"):
        trainer._total_train_tokens = int(counts[-1])


def _step_of(checkpoint) -> int | None:
    return int(Path(checkpoint).name.rsplit("-", 1)[-1]) if checkpoint else None


# ---------------------------------------------------------------- samples, the end of a run


def _samples(cfg: Config, model, tokenizer, out: Path, when: str, write: bool = True) -> list[dict] | None:
    """Greedy answers to train.sample_prompts (before and after training), kept in samples.jsonl (write=False: the
    answers only, for the processes of an FSDP run that generate beside rank 0)."""
    if not cfg.train.sample_prompts:
        return None
    from qtune.data.template import resolve_template
    from qtune.inference.load import answer, prompt_tensors

    template, _ = resolve_template(tokenizer, cfg.model.chat_template, cfg.model.name)
    rows = []
    was_training = model.training
    model.eval()
    for prompt in cfg.train.sample_prompts:
        inputs = prompt_tensors(model, tokenizer, template, [{"role": "user", "content": prompt}])
        text, _ = answer(model, tokenizer, inputs, cfg.train.sample_max_new_tokens)
        rows.append({"when": when, "prompt": prompt, "answer": text})
    model.train(was_training)
    if not write:
        return rows
    with open(out / "samples.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return rows


def _finish(cfg: Config, setup, trainer, tokenizer, out: Path, seconds: float, samples_before,
            resumed_from: int | None) -> dict | None:
    from qtune import stages
    from qtune.training.callbacks import peak_memory, plot_losses, training_peak_memory, training_reserved_peak
    from qtune.training.distributed import adapter_state
    from qtune.modeling.world import world
    from qtune.io import atomic_dir, atomic_write_json

    # First what every process takes part in (collectives): the final evaluation, the adapter gathered from FSDP's
    # shards, and, under FSDP, generation (each forward all-gathers the layers). Then rank 0 alone writes.
    main, fsdp = world().main, setup.strategy == "fsdp"
    step = trainer.state.global_step
    if trainer.eval_dataset is not None and not any(h.get("eval_loss") is not None and h.get("step") == step
                                                    for h in trainer.state.log_history):
        trainer.log({"eval_loss": trainer.evaluate()["eval_loss"]})
    state = adapter_state(trainer)
    samples_after = _samples(cfg, trainer.model, tokenizer, out, "after", write=main) if main or fsdp else None
    if not main:
        return None
    last = f"checkpoint-{trainer.state.global_step}"
    from qtune.modeling import weights

    if weights.full(cfg):
        adapter = out / "model"
        _save_model(cfg, trainer, tokenizer, adapter, state, last)
    else:
        adapter = out / "adapter"
        with atomic_dir(adapter, replace=True, remedy=f"free space and run the same command again (it writes the adapter from {last})") as tmp:
            # the trained adapter alone (with train.init_adapter, DPO and KTO hold a frozen "ref" copy beside it)
            trainer.model.save_pretrained(tmp, selected_adapters=["default"],
                                          **({"state_dict": state} if state is not None else {}))
            tokenizer.save_pretrained(tmp)
    stage = stages.get(cfg.train.stage)
    plot_losses(out, stage.curve)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_losses = [r["loss"] for r in rows if r.get("loss") is not None]
    eval_losses = [r["eval_loss"] for r in rows if r.get("eval_loss") is not None]
    summary = {
        "run": str(out), "model": cfg.model.name, "stage": cfg.train.stage, "init_adapter": cfg.train.init_adapter,
        "quant": str(cfg.quant.method), "method": str(cfg.train.method),
        "lora_r": cfg.lora.r if not weights.full(cfg) else None,
        "steps": trainer.state.global_step, "epochs": round(trainer.state.epoch or 0, 3),
        "resumed_from": resumed_from, "steps_this_time": trainer.state.global_step - (resumed_from or 0),
        "first_loss": train_losses[0] if train_losses else None,
        "train_loss": train_losses[-1] if train_losses else None,
        "eval_loss": eval_losses[-1] if eval_losses else None,
        "best_eval_loss": min(eval_losses) if eval_losses else None,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "seconds": round(seconds, 1), "peak_memory_bytes": peak_memory(),
        "train_peak_memory_bytes": training_peak_memory(), "train_reserved_peak_bytes": training_reserved_peak(),
        "tokens": next((r["tokens"] for r in reversed(rows) if "tokens" in r), None),
        ("model_dir" if weights.full(cfg) else "adapter"): str(adapter),
        "samples": {"before": samples_before, "after": samples_after} if samples_after else None,
        "distributed": setup.record(),  # world size, strategy, global batch
        **stages.figures(stage, rows),
    }
    atomic_write_json(out / "summary.json", summary)
    return summary


def _save_model(cfg: Config, trainer, tokenizer, folder: Path, state, last: str) -> None:
    """train.method=full|freeze: <run>/model/, a whole transformers checkpoint (sharded safetensors, config, tokenizer,
    generation config) that AutoModelForCausalLM.from_pretrained loads as it is, written atomically. The weights are
    saved in the dtype the run loaded the model in (fp32 master copies rounded to it: what inference runs)."""
    import torch

    from qtune.io import atomic_dir
    from qtune.modeling.load import pick_device

    model = trainer.accelerator.unwrap_model(trainer.model)
    _, dtype = pick_device(cfg.train.device, cfg.train.dtype)
    whole = state if state is not None else model.state_dict()
    # a tied weight once (under its first name), also where FSDP gathered it into two copies
    first, tied = {}, set()
    for k, v in model.state_dict(keep_vars=True).items():
        if id(v) in first:
            tied.add(k)
        else:
            first[id(v)] = k
    whole = {k: (v.detach().to(dtype) if torch.is_floating_point(v) else v.detach()) for k, v in whole.items()
             if k not in tied}
    with atomic_dir(folder, replace=True, remedy=f"free space and run the same command again (it writes the model "
                                                  f"from {last})") as tmp:
        model.config.use_cache = True
        model.save_pretrained(tmp, state_dict=whole, max_shard_size="2GB")
        model.config.use_cache = False
        # the saved weights' dtype, whatever the master copies were (transformers reads it off the parameters)
        config = json.loads((tmp / "config.json").read_text())
        config["dtype"] = str(dtype).replace("torch.", "")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        tokenizer.save_pretrained(tmp)


def _longest(cfg: Config, model=None):
    """The longest data.max_length these settings train with on this machine's GPU (train.max_gpu_memory's budget
    where set) and its host memory (qtune.modeling.plan.capacity)."""
    from qtune.modeling.plan import capacity
    from qtune.modeling.world import check_cap, gpu_budget, host_bytes_available

    check_cap(cfg.train.max_gpu_memory)
    return capacity(cfg, gpu_budget(cfg.train.max_gpu_memory), host_bytes_available(), model)


def _capacity_line(cfg: Config, c) -> str:
    """The dry run's one line on the longest data.max_length, what budget it fits and what limits it."""
    import torch

    from qtune.modeling.plan import CAPACITY_STEP
    from qtune.modeling.world import ASSUMED_GPU_BYTES, USABLE_SHARE, world

    gib = 2**30
    cap = cfg.train.max_gpu_memory
    if cap and c.budget >= cap * gib:
        where = f"train.max_gpu_memory={cap:g}"
    elif torch.cuda.is_available():
        total = torch.cuda.get_device_properties(world().local_rank).total_memory
        where = f"{USABLE_SHARE:.0%} of this GPU's {total / gib:.2f} GiB"
    else:
        where = f"{USABLE_SHARE:.0%} of an {ASSUMED_GPU_BYTES / gib:.0f} GiB GPU, assumed without one here"
    fits = f"{c.tokens:,} tokens" if c.tokens else f"none, not even {CAPACITY_STEP} tokens"
    text = (f"longest data.max_length that fits: {fits} (estimate at train.batch_size="
            f"{cfg.train.batch_size}, {c.budget / gib:.2f} GiB of GPU memory: {where}")
    if c.host_limits:
        text += (f"; host memory limits it: the offloaded layer inputs pin {c.host_per_token / 1024:,.0f} KiB a token "
                 f"of the {c.host_budget / gib:.1f} GiB available, GPU memory alone would take {c.gpu_tokens:,}")
    elif c.host_per_token and c.host_budget is not None:
        text += (f"; the offloaded layer inputs pin {c.host_per_token * c.tokens / gib:.1f} GiB of the "
                 f"{c.host_budget / gib:.1f} GiB of host memory available")
    text += ")"
    m = cfg.model
    if c.tokens > m.context:
        from qtune.config.schema import RopeScaling

        text += (f"; {m.name} reaches {m.context:,} positions" + (
            f", {int(m.rope_factor * m.rope_original_max_position_embeddings):,} with model.rope_scaling=yarn"
            if m.rope_scaling is not RopeScaling.yarn else " with YaRN (model.rope_factor)"))
    if c.tokens < cfg.data.max_length:
        text += f"; data.max_length={cfg.data.max_length:,} does not fit"
    return text


def _oom_message(cfg: Config) -> str:
    mem = plan(cfg)["memory"]
    from qtune.modeling import weights

    if weights.full(cfg):
        from qtune.modeling.plan import lighter

        return (f"CUDA out of memory (estimated need {mem['total_bytes'] / 2**30:.1f} GiB for train.method="
                f"{cfg.train.method} at data.max_length={cfg.data.max_length}, train.batch_size={cfg.train.batch_size}). "
                f"Try: " + ", ".join(lighter(cfg)))
    return (f"CUDA out of memory (estimated need {mem['total_bytes'] / 2**30:.1f} GiB at "
            f"data.max_length={cfg.data.max_length}, train.batch_size={cfg.train.batch_size}). Try: "
            f"data.max_length={_shorter(cfg)}"
            + ("" if cfg.train.gradient_checkpointing else ", train.gradient_checkpointing=true")
            + ("" if cfg.quant.method is QuantMethod.nf4 else ", quant=nf4")
            + (f", train.batch_size=1 train.grad_accum={cfg.train.batch_size * cfg.train.grad_accum}"
               if cfg.train.batch_size > 1 else "")
            + f", lora.r={max(cfg.lora.r // 2, 4)}")


def _shorter(cfg: Config) -> str:
    """The OOM message's data.max_length: the longest the estimate fits on this GPU (its budget), where that is
    shorter than the length that ran out; else half of it (the estimate was wrong here)."""
    longest = _longest(cfg).tokens
    if 0 < longest < cfg.data.max_length:
        return f"{longest} (the longest the estimate fits)"
    return str(max(cfg.data.max_length // 2, 128))
