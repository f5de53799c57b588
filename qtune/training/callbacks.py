"""Trainer callbacks: metrics.jsonl, loss.png, progress, NaN guard, and SIGINT/SIGTERM -> checkpoint + exit."""
from __future__ import annotations

import json
import math
import signal
import sys
import time
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from qtune.io import atomic_write_bytes


_SETUP_PEAK = [0]  # the GPU allocator's peak while loading and preparing the model, before the first step


def peak_memory() -> int:
    """Peak memory of this process: the GPU's allocator peak, else the CPU's resident-set peak."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return max(_SETUP_PEAK[0], int(torch.cuda.max_memory_allocated()))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


# TRL's log keys -> metrics.jsonl's names; each also as eval_<name> from eval_<key>. The preference stages share one
# vocabulary: reward_* (DPO and KTO: the implicit reward beta·log(policy/reference); rm: the score head's output),
# reward_accuracy (the share of pairs whose chosen answer out-scores the rejected one), kl (KTO's estimate).
METRIC_NAMES = (("loss", "loss"), ("learning_rate", "lr"), ("grad_norm", "grad_norm"), ("num_tokens", "tokens"),
                ("mean_token_accuracy", "accuracy"), ("aux_loss", "aux_loss"), ("train_loss", "train_loss_avg"),
                ("rewards/chosen", "reward_chosen"), ("rewards/rejected", "reward_rejected"),
                ("rewards/margins", "reward_margin"), ("rewards/accuracies", "reward_accuracy"),
                ("logps/chosen", "logp_chosen"), ("logps/rejected", "logp_rejected"), ("kl", "kl"),
                ("accuracy", "reward_accuracy"), ("margin", "reward_margin"), ("mean_reward", "reward_mean"),
                # grpo: the total reward of a completion (the weighted sum of the reward functions'), its spread, the
                # share of prompts whose completions all scored alike (no advantage), the policy's entropy, the
                # completions' mean length and the share cut at train.grpo.max_completion_length, and the share of
                # tokens whose ratio was clipped
                ("reward", "reward"), ("reward_std", "reward_std"), ("frac_reward_zero_std", "reward_zero_std"),
                ("entropy", "entropy"), ("completions/mean_length", "completion_length"),
                ("completions/clipped_ratio", "completion_clipped"), ("clip_ratio/region_mean", "clip_ratio"),
                # grpo: new tokens a second while the rollouts are generated (generation alone, either engine)
                ("rollout_tokens_per_second", "rollout_tokens_per_s"))
# grpo: each reward function's mean and spread, rewards/<name>/mean and /std -> reward_<name> and reward_<name>_std
PER_REWARD = ("rewards/", {"/mean": "", "/std": "_std"})


class MetricsCallback(TrainerCallback):
    """One JSON line per log: step, loss, eval_loss, lr, grad_norm, tokens/s, memory, and the stage's own figures
    (METRIC_NAMES). Refreshes loss.png at every save (with the stage's key `curve` beside the loss). On resume, rows
    past the checkpoint's step are dropped so the curve continues exactly."""

    def __init__(self, run_dir: Path, resume_step: int | None, curve: str | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.run_dir = Path(run_dir)
        self.curve = curve
        self._last = None  # (time, tokens) at the previous training log
        from qtune.modeling.world import world

        if not world().main:  # one writer: rank 0 (its logs carry the losses and token counts of all processes)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            rows = [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]
            kept = [r for r in rows if r["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        for src, dst in METRIC_NAMES:
            for prefix in ("", "eval_") if src != "num_tokens" else ("",):  # (TRL's evals repeat the train count)
                if prefix + src in logs:
                    row[prefix + dst] = logs[prefix + src]
        for key, value in logs.items():
            prefix = "eval_" if key.startswith("eval_") else ""
            name = key[len(prefix):]
            head, ends = PER_REWARD
            for end, suffix in ends.items():
                if name.startswith(head) and name.endswith(end) and name.count("/") == 2:
                    row[f"{prefix}reward_{name[len(head):-len(end)]}{suffix}"] = value
        if "loss" in logs and "tokens" in row:
            now = time.time()
            if self._last is not None and now > self._last[0]:
                row["tokens_per_s"] = round((row["tokens"] - self._last[1]) / (now - self._last[0]), 1)
                if len(self._last) > 2 and state.global_step > self._last[2]:
                    row["step_s"] = round((now - self._last[0]) / (state.global_step - self._last[2]), 3)
            self._last = (now, row["tokens"], state.global_step)
        training = training_peak_memory()
        row["memory_bytes"] = peak_memory() if training is None else training
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = (time.time(), _tokens_so_far(self.path), state.global_step)
        start_training_peak()

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            plot_losses(self.run_dir, self.curve)


def start_training_peak() -> None:
    """From here on the GPU allocator's peak is training's own (the setup's is kept for peak_memory())."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        _SETUP_PEAK[0] = max(_SETUP_PEAK[0], int(torch.cuda.max_memory_allocated()))
        torch.cuda.empty_cache()  # loading's cached blocks go back to the GPU: training's reserved peak is its own
        torch.cuda.reset_peak_memory_stats()


def training_reserved_peak() -> int | None:
    """The most the GPU allocator held from the GPU since training began, cached blocks and CUDA graph pools included
    (what the GPU must have; None on CPU)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_reserved())
    return None


def training_peak_memory() -> int | None:
    """The GPU allocator's peak since training began (None on CPU)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    return None


def _tokens_so_far(path: Path) -> int:
    tokens = 0
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                tokens = json.loads(line).get("tokens", tokens)
    return tokens


def plot_losses(run_dir: Path, curve: str | None = None) -> Path | None:
    """loss.png: train and eval loss against step, and beside them the stage's key `curve` (e.g. reward_margin) where
    metrics.jsonl has it (written atomically)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]

    def series(key: str) -> tuple[list, list]:
        return ([(r["step"], r[key]) for r in rows if r.get(key) is not None],
                [(r["step"], r[f"eval_{key}"]) for r in rows if r.get(f"eval_{key}") is not None])

    panels = [("loss", series("loss"))]
    if curve and any(series(curve)):
        panels.append((curve, series(curve)))
    if not any(panels[0][1]):
        return None
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4), dpi=110, squeeze=False)
    for ax, (key, (train, evals)) in zip(axes[0], panels):
        name = key.replace("_", " ")
        if train:
            ax.plot(*zip(*train), label=f"train {name}", color="tab:blue")
        if evals:
            ax.plot(*zip(*evals), "o-", label=f"eval {name}", color="tab:orange")
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(Path(run_dir).name)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    out = Path(run_dir) / "loss.png"
    atomic_write_bytes(out, buf.getvalue())
    return out


class NanGuard(TrainerCallback):
    """Stops at the first non-finite loss or gradient norm, before that step's checkpoint is written, so the
    last checkpoint on disk is a good one. Saves are made to coincide with logs to guarantee the check.
    `stopped` tells the verb why training ended early (None: it did not stop for this)."""

    def __init__(self):
        self.stopped: NanStop | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            control.should_log = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        bad = {k: v for k, v in (logs or {}).items() if k in ("loss", "grad_norm", "eval_loss")
               and isinstance(v, float) and not math.isfinite(v)}
        if bad:
            self.stopped = NanStop(state.global_step, bad, state.best_model_checkpoint)
            control.should_save = False
            control.should_training_stop = True


class NanStop:
    def __init__(self, step: int, bad: dict, best):
        self.step, self.bad, self.best = step, bad, best

    def message(self, run_dir: Path) -> str:
        cks = sorted((Path(run_dir) / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        last = f"the last good checkpoint is {cks[-1]}" if cks else "no checkpoint was saved before it"
        what = ", ".join(f"{k}={v}" for k, v in self.bad.items())
        return (f"training diverged at step {self.step} ({what}); {last}. Lower train.lr, keep "
                "train.max_grad_norm=1.0, or check the data; resume with train.resume=<checkpoint>")


class ProgressCallback(TrainerCallback):
    """Live progress (step, loss, lr, tok/s, ETA) from `live()`, a Rich progress the verb makes on a terminal; plain
    lines otherwise (live=None)."""

    def __init__(self, live=None, figures: tuple[str, ...] = ()):
        self.live = live
        # the stage's own figures (metrics.jsonl's names, e.g. reward_accuracy) shown beside the loss, from TRL's keys
        self.figures = {name: [src for src, dst in METRIC_NAMES if dst == name] for name in figures}
        self.progress = None
        self.task = None
        self.start = None
        self.start_step = 0
        self.last = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.start_step = time.time(), state.global_step
        if self.live is not None:
            self.progress = self.live()
            self.progress.start()
            self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step,
                                               loss="-", lr="-", tps="-", figures="")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not state.is_world_process_zero or not ({"loss", "eval_loss"} & set(logs)):
            return
        if "loss" in logs:
            self.last.update(loss=f"{logs['loss']:.4f}", lr=f"{logs.get('learning_rate', 0):.2e}")
        for name, sources in self.figures.items():
            for src in sources:
                if src in logs and "loss" in logs:
                    self.last[name] = f"{logs[src]:.4f}"
        if "reward" not in self.figures and isinstance(logs.get("reward"), (int, float)):  # grpo: the completions' mean reward
            self.last["reward"] = f"{logs['reward']:.3f}"
        if "eval_loss" in logs:
            self.last["eval"] = f"{logs['eval_loss']:.4f}"
            for name, sources in self.figures.items():
                for src in sources:
                    if f"eval_{src}" in logs:
                        self.last[f"eval_{name}"] = f"{logs[f'eval_{src}']:.4f}"
        if self.progress is None:
            done = state.global_step - self.start_step
            elapsed = time.time() - self.start
            eta = elapsed / done * (state.max_steps - state.global_step) if done else 0
            parts = [f"step {state.global_step}/{state.max_steps}"]
            parts += [f"{k} {v}" for k, v in self.last.items()]
            parts.append(f"eta {_hms(eta)}")
            print("  ".join(parts), flush=True)
            for key in [k for k in self.last if k.startswith("eval")]:
                self.last.pop(key)

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step, loss=self.last.get("loss", "-"),
                                 lr=self.last.get("lr", "-"),
                                 figures="".join(f"  {k} {self.last[k]}" for k in self.figures if k in self.last))

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class GracefulStop:
    """While active, SIGINT/SIGTERM ask the trainer to save a checkpoint and stop; a second signal exits now."""

    current: "GracefulStop | None" = None

    def __init__(self):
        self.signal: str | None = None
        self._old = {}

    def __enter__(self):
        GracefulStop.current = self
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        from qtune.modeling.world import world

        say = world().main  # every process of a run gets the signal; one says so
        if self.signal is not None:  # asked twice: stop without saving
            if say:
                print("stopping now, without a checkpoint", file=sys.stderr, flush=True)
            raise SystemExit(130)
        self.signal = signal.Signals(signum).name
        if say:
            print(f"\n{self.signal}: saving a checkpoint at the end of this step, then stopping "
                  "(send it again to stop at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        GracefulStop.current = None
        return False


class StopOnSignal(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        from qtune.training.distributed import any_rank

        stop = GracefulStop.current
        # processes get a signal at slightly different steps; they must save (a collective under FSDP) at the same one
        asked = stop is not None and stop.signal is not None
        if any_rank(asked, args.device):
            control.should_save = True
            control.should_training_stop = True


class WorldRecord(TrainerCallback, ExportableState):
    """Keeps the run's qtune.training.distributed.Setup in every checkpoint's trainer_state.json (the Trainer saves the state of
    ExportableState callbacks), so a resume can tell whether the checkpoint still means the same there."""

    def __init__(self, **setup):
        self.setup = setup

    def state(self) -> dict:
        return {"args": self.setup, "attributes": {}}
