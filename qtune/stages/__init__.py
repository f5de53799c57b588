"""Training stages (`train.stage`): one module each (sft.py holds pt and sft; dpo, kto, rm, grpo), registered in STAGES.

Everything that differs between stages is read from the Stage a name stands for, never from a comparison with a
name: what data the stage trains on (the data layer's `Trains`), the TRL config and trainer it runs, what the model
ends in, which fast-path pieces apply, what loss.png, summary.json, a sweep and `qtune eval` show, and whether the
run writes answers (chat, serve, samples, GGUF). Adding a stage is one module here plus its tests.

The stages' own settings (train.dpo, train.kto, train.rm, train.grpo) are typed in qtune.config.schema with the rest of the
config, which Hydra needs whole at compose time.
"""
from __future__ import annotations

from qtune.stages import dpo, grpo, kto, rm, sft
from qtune.stages.base import SCORE_HEAD, Stage

__all__ = ["SCORE_HEAD", "STAGES", "Stage", "check", "figures", "get", "sweep_figures"]

# a train sweep's summary columns for the stages' figures (the last eval value, else the last train one)
SWEEP_COLUMNS = ("reward_accuracy", "reward_margin", "kl", "reward")


STAGES: dict[str, Stage] = {s.name: s for s in (sft.PT, sft.SFT, dpo.DPO, kto.KTO, rm.RM, grpo.GRPO)}


def get(name: str) -> Stage:
    """The stage `train.stage=name` names (a name the config's check has accepted)."""
    return STAGES[name]


# stages users ask for that TRL's stable API no longer has, with where to go instead
RETIRED = {"ppo": "TRL no longer ships PPO in its stable API; for preference tuning use train.stage=dpo "
                  "(chosen/rejected pairs) or train.stage=kto (answers marked good or bad)"}


def check(train) -> None:
    """train.stage names a stage, and train.* suits it (the schema's check at compose time)."""
    if train.stage in RETIRED:
        raise ValueError(f"train.stage={train.stage}: {RETIRED[train.stage]}")
    if train.stage not in STAGES:
        raise ValueError(f"train.stage={train.stage}: valid: {', '.join(STAGES)}")
    get(train.stage).check(train)


def sweep_figures(summary: dict) -> dict:
    """A finished run's summary.json -> its SWEEP_COLUMNS values."""
    pick = {k: summary.get(f"eval_{k}", summary.get(k)) for k in SWEEP_COLUMNS}
    return {k: v for k, v in pick.items() if v is not None}


def figures(stage: Stage, rows: list[dict]) -> dict:
    """The stage's own figures at the end of a run, from metrics.jsonl's rows (eval values preferred)."""
    out = {}
    keys = []
    for key in stage.figures:  # "reward_*": every such figure metrics.jsonl has (grpo: one per reward function)
        if key.endswith("*"):
            keys += sorted({k for r in rows for k in r if k.startswith(key[:-1]) and k not in stage.figures})
        else:
            keys.append(key)
    for key in keys:
        for name in (f"eval_{key}", key):
            value = next((r[name] for r in reversed(rows) if r.get(name) is not None), None)
            if value is not None:
                out[name] = value
    return out
