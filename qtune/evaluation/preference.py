"""Held-out preference figures for `qtune eval` on dpo, kto and rm runs (what qtune.data.prepare made of the run's
held-out data: prompt/chosen/rejected ids, prompt/completion/label ids, or prompt+answer sequences for rm).

  dpo, kto  the implicit reward of an answer: beta * (log p_model(answer | prompt) - log p_base(answer | prompt)), the
            base being the run's reference (the adapter switched off). reward_accuracy: the share of pairs whose
            chosen answer gets the higher reward (kto's unpaired rows: of desirable-undesirable combinations);
            reward_margin: the mean reward of chosen (desirable) answers less that of rejected (undesirable) ones
  rm        the score head's output: reward_accuracy, the share of pairs with score(chosen) > score(rejected), and
            reward_margin, the mean of score(chosen) - score(rejected)
"""
from __future__ import annotations

import numpy as np


def answer_logps(model, rows: list[dict]) -> np.ndarray:
    """Summed log-probabilities of each row's answers given its prompt: shape (rows, 2) for pairs (chosen,
    rejected), (rows, 1) for unpaired rows."""
    import torch

    device = next(model.parameters()).device
    keys = ["chosen_ids", "rejected_ids"] if "chosen_ids" in rows[0] else ["completion_ids"]
    out = np.zeros((len(rows), len(keys)))
    with torch.no_grad():
        for i, row in enumerate(rows):
            for j, key in enumerate(keys):
                answer = torch.tensor(row[key], device=device)
                ids = torch.tensor([row["prompt_ids"] + row[key]], device=device)
                # the logits that predict the answer's tokens: the last len(answer) + 1 positions but the final one
                logits = model(input_ids=ids, use_cache=False, logits_to_keep=len(answer) + 1).logits[0, :-1].float()
                out[i, j] = torch.log_softmax(logits, -1).gather(-1, answer[:, None]).sum().item()
    return out


def scores(model, rows: list[dict], pad_token_id: int) -> np.ndarray:
    """A reward model's score of each pair's chosen and rejected sequence: shape (rows, 2). The score is read at the
    last token that is not `pad_token_id`, as in training (TRL sets the model's pad token to the tokenizer's)."""
    import torch

    model.config.pad_token_id = pad_token_id
    device = next(model.parameters()).device
    out = np.zeros((len(rows), 2))
    with torch.no_grad():
        for i, row in enumerate(rows):
            for j, key in enumerate(("chosen_ids", "rejected_ids")):
                out[i, j] = model(input_ids=torch.tensor([row[key]], device=device)).logits.float().item()
    return out


def figures(rewards: np.ndarray, labels=None) -> dict:
    """reward_accuracy and reward_margin from per-row rewards: pairs (rows, 2), or unpaired (rows, 1) with labels."""
    if rewards.shape[1] == 2:
        diff = rewards[:, 0] - rewards[:, 1]
        return {"reward_accuracy": float((diff > 0).mean()), "reward_margin": float(diff.mean())}
    labels = np.asarray(labels, dtype=bool)
    good, bad = rewards[labels, 0], rewards[~labels, 0]
    if not len(good) or not len(bad):
        return {"reward_accuracy": None, "reward_margin": None}
    return {"reward_accuracy": float((good[:, None] > bad[None, :]).mean()),
            "reward_margin": float(good.mean() - bad.mean())}
