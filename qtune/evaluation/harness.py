"""EleutherAI's lm-evaluation-harness inside `qtune eval` (eval.lm_eval.*; the optional extra qtune[eval]).

The tasks run in process, through lm-eval's HFLM wrapped around the model qtune eval has already loaded (the base
with its adapters switched off, each adapter, the merged model): no second copy of the weights, the same device and
dtype as qtune's own figures, and the adapter switch of qtune.inference.load.Loaded.using. (Through qtune serve's
endpoint lm-eval could only score generations: its OpenAI-compatible clients need prompt log-probabilities for
multiple-choice and perplexity tasks, which the endpoint does not return.)

Checked before any model loads: lm-eval importable, eval.lm_eval.include_path a folder, every task known. Tasks of
eval.lm_eval.include_path are indexed first; lm-eval's own (some 14,000 yaml files, about ten seconds to index) only
when a task is not among them. Each model's scores come back as flat keys, "lm_eval/<task>/<metric>" (with
":<filter>" where lm-eval names a filter other than none), beside qtune's own in eval/summary.json and report.md.
"""
from __future__ import annotations

from pathlib import Path

from qtune.config.schema import LmEvalConfig
from qtune.errors import ConfigError, QtuneError
from qtune.evaluation.report import LM_EVAL as PREFIX

INSTALL = "pip install 'qtune[eval]'"


def _import():
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise QtuneError(f"eval.lm_eval.tasks needs EleutherAI's lm-evaluation-harness, which is not installed "
                         f"({e.name or e}): {INSTALL}") from None
    return TaskManager


def task_manager(lm: LmEvalConfig):
    """lm-eval's TaskManager holding every task of eval.lm_eval.tasks; one line for a task it does not know."""
    TaskManager = _import()
    include = None
    if lm.include_path:
        include = Path(lm.include_path).expanduser()
        if not include.is_dir():
            raise ConfigError(f"eval.lm_eval.include_path={lm.include_path}: no such folder (a folder of task yaml files)")
        local = TaskManager(include_path=str(include), include_defaults=False)
        if all(t in local.all_tasks for t in lm.tasks):
            return local
    manager = TaskManager(include_path=str(include) if include else None)
    unknown = [t for t in lm.tasks if t not in manager.all_tasks]
    if unknown:
        see = "`lm-eval ls tasks`" + (f" (`lm-eval ls tasks --include_path {include}` for yours)" if include else
                                      " (your own: eval.lm_eval.include_path=<folder of task yamls>)")
        raise ConfigError(f"eval.lm_eval.tasks: no task named {', '.join(unknown)}; see the tasks lm-eval knows with {see}")
    return manager


def scores(model, tokenizer, manager, lm: LmEvalConfig) -> dict[str, float]:
    """Run the tasks on a loaded model (a PeftModel in the adapter state its caller set, or a plain model)."""
    import logging

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)  # its notices would bury qtune's lines
    import lm_eval.evaluator

    # lm-eval records the git commit of the current folder with a bare `git describe`, whose "fatal: not a git
    # repository" would land on the terminal wherever qtune eval runs outside a checkout: the same, quietly
    lm_eval.evaluator.get_git_commit_hash = _git_commit
    limit = lm.limit if lm.limit is None or lm.limit < 1 else int(lm.limit)
    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=lm.batch_size, max_length=lm.max_length)
    out = simple_evaluate(model=wrapped, tasks=list(lm.tasks), num_fewshot=lm.num_fewshot, limit=limit,
                          task_manager=manager, log_samples=False, bootstrap_iters=0, verbosity=None)
    return flatten(out["results"])


def _git_commit() -> str | None:
    import subprocess

    try:
        return subprocess.run(["git", "describe", "--always"], capture_output=True, text=True).stdout.strip() or None
    except OSError:
        return None


def flatten(results: dict) -> dict[str, float]:
    """{"tiny_qa": {"acc,none": 0.5, "acc_stderr,none": ..., "alias": ...}} -> {"lm_eval/tiny_qa/acc": 0.5}."""
    flat = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            if metric.endswith("_stderr"):
                continue
            flat[f"{PREFIX}{task}/{metric}" + ("" if filt == "none" else f":{filt}")] = float(value)
    return flat
