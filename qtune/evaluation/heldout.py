"""What held-out rows say about a model, by the run's stage's measure (qtune.stages: Stage.measure): loss and
perplexity (pt, sft), implicit rewards against the base (dpo, kto: the base has none of its own), or a reward model's
scores (rm); the preference figures are qtune.evaluation.preference's."""
from __future__ import annotations

import math


def figures(stage, loaded, is_base: bool, rows: list[dict], reference, beta: float | None) -> dict:
    """One candidate's held-out figures. `reference`: the base's answer log-probabilities (implicit_reward)."""
    if not rows:
        return {}
    if stage.measure == "loss":
        loss = heldout_loss(loaded.model, rows)
        return {"heldout_loss": loss, "perplexity": math.exp(loss)}
    from qtune.evaluation import preference

    if stage.measure == "score":
        return preference.figures(preference.scores(loaded.model, rows, loaded.tokenizer.pad_token_id))
    if is_base:
        return {"reward_accuracy": None, "reward_margin": None}
    rewards = beta * (preference.answer_logps(loaded.model, rows) - reference)
    return preference.figures(rewards, [r.get("label") for r in rows])


def needs_reference(stage) -> bool:
    """Whether the figures are measured against the base's log-probabilities (implicit_reward)."""
    return stage.measure == "implicit_reward"


def heldout_loss(model, rows: list[dict]) -> float:
    """Mean loss per trained token over the held-out rows (packed rows keep their sequence boundaries)."""
    import torch

    from qtune.data.prepare import row_tensors

    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            batch = row_tensors(row, device, labels=True)
            n = int((batch["labels"][:, 1:] != -100).sum())
            if n == 0:
                continue
            loss = model(**batch, use_cache=False).loss
            total += loss.item() * n
            count += n
    return total / count if count else float("nan")
