"""`qtune <verb> -m ...`: one job per combination through Hydra's sweeper and launcher.

Each job writes into its own folder under the sweep folder (`runs/sweep-<time>/<job>/`), where Hydra
also records the job's overrides; the verb's run() receives typed config like a single run.
"""
from __future__ import annotations

from qtune.errors import NotYetAvailable


def run(verb: str, overrides: list[str], flags: dict, sweep_dir: str | None = None) -> list:
    from hydra.core.hydra_config import HydraConfig

    from qtune.cli import _verb_module
    from qtune.config.compose import check_sweep, multirun, to_object

    check_sweep(overrides)
    if verb != "train":
        raise NotYetAvailable(f"`qtune {verb} -m`: sweeps are for `qtune train`")
    module = _verb_module(verb)  # says so, in one line, when the verb is not built yet
    results = []

    def job(cfg):
        obj = to_object(cfg)
        obj.train.output_dir = HydraConfig.get().runtime.output_dir
        results.append(module.run(obj, **flags))

    multirun(overrides, job, sweep_dir=sweep_dir)
    return results
