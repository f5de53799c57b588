"""What held-out rows say about a model, by the run's stage's measure (qtune.stages: Stage.measure): loss and
perplexity (pt, sft), implicit rewards against the base (dpo, kto: the base has none of its own), a reward model's
scores (rm), or the mean reward of a greedy completion of each held-out prompt (grpo: its reward functions, and pass@1
where exact_answer is one of them); the preference figures are qtune.evaluation.preference's."""
from __future__ import annotations

import math


def figures(stage, loaded, is_base: bool, rows: list[dict], reference, beta: float | None, train=None) -> dict:
    """One candidate's held-out figures. `reference`: the base's answer log-probabilities (implicit_reward); `train`:
    the run's train.* (reward: its train.grpo)."""
    if not rows:
        return {}
    if stage.measure == "reward":
        return reward_figures(loaded, rows, train.grpo)
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


def reward_figures(loaded, rows: list[dict], grpo) -> dict:
    """The run's reward functions on one greedy completion of each held-out prompt (up to max_completion_length
    tokens): the weighted total's mean (`reward`), each function's mean, and pass@1, exact_answer's mean."""
    from qtune.inference.load import answer, prompt_tensors
    from qtune.stages import rewards

    funcs, weights = rewards.load(grpo)
    prompts, completions, ids = [], [], []
    for row in rows:
        inputs = prompt_tensors(loaded.model, loaded.tokenizer, loaded.template, row["prompt"], grpo.enable_thinking)
        text, _ = answer(loaded.model, loaded.tokenizer, inputs, grpo.max_completion_length)
        prompts.append(row["prompt"])
        completions.append([{"role": "assistant", "content": text}])
        ids.append(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])
    fields = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
    out, total = {}, [0.0] * len(rows)
    for fn, weight in zip(funcs, weights):
        values = fn(prompts=prompts, completions=completions, completion_ids=ids, **fields)
        scored = [v for v in values if v is not None]
        out[f"reward_{fn.__name__}"] = sum(scored) / len(scored) if scored else None
        total = [t + weight * (v or 0.0) for t, v in zip(total, values)]
    out["reward"] = sum(total) / len(total)
    if "reward_exact_answer" in out:
        out["pass@1"] = out["reward_exact_answer"]
    return out
