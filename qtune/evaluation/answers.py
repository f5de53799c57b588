"""Answers to a prompt set, timed and scored against references (qtune eval's prompts): the prompts read, each model's
answer(s) generated (greedy, or eval.repeats sampled answers for consistency), time to first token and tokens/s, exact
match, token F1, ROUGE-L, the share of stated facts, and the per-model aggregates with the judge's scores."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from qtune.errors import DataError


def load_prompts(path: Path) -> list[dict]:
    """The prompt set: records (JSONL, JSON, CSV, Parquet) with "prompt" and optional "system", "reference" and
    "facts" (words or phrases a right answer states)."""
    from qtune.data.formats import read_records

    if not path.is_file():
        raise DataError(f"eval.prompts={path}: no such file")
    prompts = []
    for rec in read_records(path):  # malformed lines stop with file:line
        data = rec.data
        if not isinstance(data.get("prompt"), str) or not data["prompt"].strip():
            raise DataError(f'{rec.where}: each line needs a non-empty "prompt" string (optional: "system", "reference", "facts")')
        for key in ("system", "reference"):
            if data.get(key) is not None and not isinstance(data[key], str):
                raise DataError(f"{rec.where}: {key!r} must be a string")
        facts = data.get("facts")
        facts = [facts] if isinstance(facts, str) else facts
        if facts is not None and (not isinstance(facts, list) or not facts
                                  or not all(isinstance(f, str) and f.strip() for f in facts)):
            raise DataError(f'{rec.where}: "facts" must be a non-empty string or list of strings (words the answer '
                            'must state, e.g. ["two"])')
        prompts.append({"prompt": data["prompt"], "system": data.get("system"), "reference": data.get("reference"),
                        "facts": facts, "where": rec.where.rsplit("/", 1)[-1]})
    if not prompts:
        raise DataError(f"eval.prompts={path}: no prompts in the file")
    return prompts


def answer(loaded, prompt: dict, cfg, rcfg, index: int) -> dict:
    """The model's answer(s) to one prompt, timed, with reference metrics."""
    import torch

    from qtune.evaluation.metrics import consistency, reference_scores
    from qtune.inference.load import answer as generate, prompt_tensors

    messages = ([{"role": "system", "content": prompt["system"]}] if prompt["system"] else []) + \
        [{"role": "user", "content": prompt["prompt"]}]
    inputs = prompt_tensors(loaded.model, loaded.tokenizer, loaded.template, messages, cfg.chat.enable_thinking)
    sample = cfg.eval.repeats > 1
    # one answer is greedy; `eval.repeats` answers are drawn with the chat settings (both keep its repetition penalty)
    sampling = cfg.chat if sample else dataclasses.replace(cfg.chat, temperature=0)
    answers, timings = [], []
    for k in range(cfg.eval.repeats):
        torch.manual_seed(rcfg.train.seed + 1000 * index + k)
        clock = Clock()
        text, n_new = generate(loaded.model, loaded.tokenizer, inputs, cfg.eval.max_new_tokens, sampling, streamer=clock)
        answers.append(text)
        timings.append(clock.result(n_new))
    row = {"prompt_id": index, "where": prompt["where"], "prompt": prompt["prompt"], "reference": prompt["reference"],
           "answer": answers[0], "answers": answers if sample else None,
           "consistency": consistency(answers) if sample else None,
           "ttft_s": median([t[0] for t in timings]), "tok_s": median([t[1] for t in timings]),
           "new_tokens": timings[0][2], "judge": None, "judge_error": None}
    scores = [reference_scores(a, prompt["reference"], prompt.get("facts")) for a in answers]
    row["facts"] = prompt.get("facts")
    for key in ("facts_right", "exact_match", "f1", "rouge_l"):
        row[key] = sum(s[key] for s in scores) / len(scores) if scores and key in scores[0] else None
    return row


class Clock:
    """A generate() streamer that only keeps time: the prompt arrives first, then each new token."""

    def __init__(self):
        self.start = time.perf_counter()
        self.first = None
        self.stop = None
        self.calls = 0

    def put(self, value):
        self.calls += 1
        if self.calls == 2:
            self.first = time.perf_counter()

    def end(self):
        self.stop = time.perf_counter()

    def result(self, n_new: int) -> tuple[float, float | None, int]:
        self.stop = self.stop or time.perf_counter()
        first = self.first or self.stop
        rate = (n_new - 1) / (self.stop - first) if n_new > 1 and self.stop > first else None
        return first - self.start, rate, n_new


def median(xs):
    xs = sorted(x for x in xs if x is not None)
    return xs[len(xs) // 2] if xs else None


def aggregate(rows: list[dict]) -> dict:
    """One model's answers in figures: reference metrics, consistency, timings and the judge's means."""
    def mean(key, sub=None):
        vals = [(r[key] or {}).get(sub) if sub else r[key] for r in rows]
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else None

    out = {k: mean(k) for k in ("facts_right", "exact_match", "f1", "rouge_l", "consistency")}
    out["ttft_s"] = median([r["ttft_s"] for r in rows])
    out["tok_s"] = median([r["tok_s"] for r in rows])
    for c in ("accuracy", "helpfulness", "tone"):
        out[f"judge_{c}"] = mean("judge", c)
    out["prompts"] = len(rows)
    out["unscored"] = sum(1 for r in rows if r["judge"] is None and r["judge_error"])
    return out
