"""An LLM judge behind any OpenAI-compatible endpoint (another `qtune serve`, vLLM, a hosted API): scores
each answer 1-5 on accuracy, helpfulness and tone and keeps its rationale."""
from __future__ import annotations

import json
import os
import re

from qtune.config.schema import EvalConfig
from qtune.errors import QtuneError

CRITERIA = ("accuracy", "helpfulness", "tone")
SYSTEM = ("You grade answers given by an assistant. Score each criterion from 1 (poor) to 5 (excellent): "
          "accuracy (is it correct; compare with the reference answer when one is given), helpfulness (does it "
          "answer what was asked), tone (clear and appropriate). Reply with JSON only: "
          '{"accuracy": n, "helpfulness": n, "tone": n, "rationale": "one or two sentences"}')


class JudgeError(QtuneError):
    """The judge endpoint cannot be used at all."""


class Judge:
    def __init__(self, cfg: EvalConfig):
        from openai import OpenAI

        self.url = cfg.judge_url
        self.client = OpenAI(base_url=cfg.judge_url, api_key=os.environ.get(cfg.judge_api_key_env) or "none",
                             timeout=120, max_retries=1)
        try:
            models = [m.id for m in self.client.models.list().data]
        except Exception as e:
            raise JudgeError(f"eval.judge_url={cfg.judge_url}: the judge cannot be reached "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:160]}); start it or fix the URL") from None
        if cfg.judge_model is None and not models:
            raise JudgeError(f"eval.judge_url={cfg.judge_url}: the judge lists no model; set eval.judge_model")
        self.model = cfg.judge_model or models[0]

    def score(self, prompt: str, answer: str, reference: str | None) -> dict:
        """{accuracy, helpfulness, tone, rationale}; raises on a failed request or an unreadable reply."""
        user = f"Question:\n{prompt}\n\n" + (f"Reference answer:\n{reference}\n\n" if reference else "") + \
            f"Answer to grade:\n{answer}"
        reply = self.client.chat.completions.create(
            model=self.model, temperature=0, max_tokens=300,
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}])
        return parse(reply.choices[0].message.content or "")


def parse(text: str) -> dict:
    m = re.search(r"\{.*\}", text, re.S)
    if not m:
        raise ValueError(f"no JSON in the judge's reply: {text[:120]!r}")
    data = json.loads(m.group(0))
    out = {}
    for c in CRITERIA:
        v = int(data[c])
        if not 1 <= v <= 5:
            raise ValueError(f"{c}={v} is outside 1-5")
        out[c] = v
    out["rationale"] = str(data.get("rationale", ""))
    return out


def score_all(judge: Judge, results: list[dict]) -> list[str]:
    """Score every answer row in place; a failure leaves that row unscored (with its error) and the rest intact.
    Returns the unscored rows as "model / where"."""
    unscored = []
    for r in results:
        try:
            r["judge"] = judge.score(r["prompt"], r["answer"], r["reference"])
        except Exception as e:
            r["judge_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            unscored.append(f"{r['model']} / {r['where']}")
    return unscored
