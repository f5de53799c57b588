"""Reward functions of train.stage=grpo (train.grpo.rewards): the built-ins, and a user's own functions.

Every reward function takes TRL's keyword arguments: `prompts` and `completions` (chat messages: a completion is a list
holding the assistant's message), `completion_ids`, and each column of the prompts' records beside the prompt
(`answer`, `solution`, `tests`, ...) as a list, one value per completion; it returns one float per completion (None:
the function does not apply to it). Built-ins:

  exact_answer  1.0 when the completion's answer equals the record's `answer`, else 0.0. The completion's answer is its
                last \\boxed{...}, else what follows its last "####", else its last number; the record's answer is what
                follows "####" where it has one (GSM8K), else the whole field. Numbers compare as numbers (commas,
                a $ and a trailing period dropped: "1,000." == "1000" == "1e3"), other text case- and space-folded.
  format        1.0 when the completion is Qwen3's thinking then an answer: "<think>...</think>" and text after it
                (with train.grpo.enable_thinking=true; with it false, the template itself closes an empty think block
                before the completion starts), else 0.0.
  length        DAPO's soft over-length penalty on the completion's tokens L, with L_max =
                train.grpo.max_completion_length and a buffer B = L_max / 4: 0 while L <= L_max - B, then falling
                linearly to -1 at L = L_max: (L_max - B - L) / B.

  reward_model  the score of a reward model trained by qtune (`{fn: reward_model, run: runs/my-rm}`: a train.stage=rm
                run folder) on each prompt + completion, rendered as its training pairs were (qtune.inference.scoring;
                the model loads once, at the first completions it scores).

A user's function is `module:function` (imported from the working directory or the Python path) or
`path/to/file.py:function`: qtune imports it as it is, running the user's own code.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import re
import sys
from pathlib import Path

from qtune.errors import ConfigError, QtuneError


class RewardError(QtuneError):
    """A reward function raised, or returned other than one number per completion."""


# ---------------------------------------------------------------- the built-ins


def completion_text(completion) -> str:
    """A completion as text: TRL's chat completion (a list of messages) or a plain string."""
    if isinstance(completion, str):
        return completion
    return "".join(str(m.get("content") or "") for m in completion if isinstance(m, dict))


_NUMBER = re.compile(r"[-+]?\$?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")


def _boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (braces nested)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def extract_answer(text: str) -> str | None:
    """A completion's final answer: its last \\boxed{}, else after its last ####, else its last number."""
    boxed = _boxed(text)
    if boxed is not None:
        return boxed
    if "####" in text:
        return text.rsplit("####", 1)[1].strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def reference_answer(value) -> str:
    """The record's answer: what follows its last #### (GSM8K's solutions), else the whole value."""
    text = str(value)
    return text.rsplit("####", 1)[1].strip() if "####" in text else text.strip()


def _as_number(text: str) -> float | None:
    t = text.strip().replace(",", "").replace("$", "").rstrip(".").strip()
    boxed = _boxed(t)
    t = boxed.strip() if boxed is not None else t
    try:
        value = float(t)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def same_answer(predicted: str | None, expected) -> bool:
    if predicted is None:
        return False
    want = reference_answer(expected)
    a, b = _as_number(predicted), _as_number(want)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    fold = lambda s: " ".join(s.strip().lower().split())  # noqa: E731
    return fold(predicted) == fold(want)


def exact_answer(prompts, completions, answer=None, **kwargs) -> list[float]:
    if answer is None:
        raise ValueError("the prompts' records have no 'answer' field to compare with")
    return [1.0 if same_answer(extract_answer(completion_text(c)), a) else 0.0 for c, a in zip(completions, answer)]


_THINK_THEN_ANSWER = re.compile(r"^\s*<think>.*?</think>\s*\S", re.DOTALL)


def think_format(prompts, completions, **kwargs) -> list[float]:
    return [1.0 if _THINK_THEN_ANSWER.match(completion_text(c)) else 0.0 for c in completions]


def length_penalty(max_completion_length: int):
    """The `length` reward for completions of at most max_completion_length tokens (module docstring)."""
    buffer = max(max_completion_length / 4, 1.0)
    start = max_completion_length - buffer

    def length(prompts, completions, completion_ids, **kwargs) -> list[float]:
        return [0.0 if len(ids) <= start else max((start - len(ids)) / buffer, -1.0) for ids in completion_ids]

    return length


# reward_model's scorer: factory(run folder) -> fn(prompts, answers) -> scores. The verbs that compute rewards (train,
# eval) hand it over (qtune.inference.scoring.Scorer), which loads models as inference does.
_SCORER: list = []


def use_scorer(factory) -> None:
    _SCORER[:] = [factory]


def reward_model(run: Path):
    """The `reward_model` reward over the rm run at `run` (checked already)."""
    loaded: list = []

    def reward_model(prompts, completions, **kwargs) -> list[float]:
        if not loaded:
            if not _SCORER:
                raise RuntimeError("no reward-model scorer was handed over (qtune.stages.rewards.use_scorer)")
            loaded.append(_SCORER[0](run))
        return loaded[0](prompts, [completion_text(c) for c in completions])

    return reward_model


def _reward_model_run(spec, key: str) -> Path:
    """spec.run: a finished train.stage=rm run folder, or one line saying what it is not."""
    import json

    if not spec.run:
        raise ConfigError(f"{key}: name the reward model's run folder: {{fn: reward_model, run: runs/my-rm}}")
    path = Path(str(spec.run)).expanduser()
    adapter = path / "adapter" / "adapter_config.json"
    why = None
    if not adapter.is_file():
        why = "is not a trained run folder (no adapter/adapter_config.json)"
    elif json.loads(adapter.read_text()).get("task_type") != "SEQ_CLS":
        why = "is not a reward model (it was not trained with train.stage=rm)"
    if why:
        raise ConfigError(f"{key}: run={path} {why}; valid: the output_dir of a finished "
                          "`qtune train train.stage=rm` run")
    return path


BUILTIN = {"exact_answer": lambda grpo, spec, key: exact_answer, "format": lambda grpo, spec, key: think_format,
           "length": lambda grpo, spec, key: length_penalty(grpo.max_completion_length),
           "reward_model": lambda grpo, spec, key: reward_model(_reward_model_run(spec, key))}


# ---------------------------------------------------------------- loading and checking


def load(grpo) -> tuple[list, list[float]]:
    """train.grpo.rewards as (functions, weights): each checked as it runs (`checked`), named as TRL logs it."""
    funcs, weights = [], []
    for i, spec in enumerate(grpo.rewards):
        key = f"train.grpo.rewards[{i}].fn={spec.fn}"
        funcs.append(checked(_resolve(str(spec.fn), key, grpo, spec), spec.fn))
        weights.append(float(spec.weight))
    return funcs, weights


def _resolve(name: str, key: str, grpo, spec):
    if ":" not in name:
        if name not in BUILTIN:
            raise ConfigError(f"{key}: no such reward; built-in: {', '.join(BUILTIN)}, or your own as "
                              "module:function or path/to/file.py:function")
        return BUILTIN[name](grpo, spec, key)
    where, _, attr = name.rpartition(":")
    try:
        if where.endswith(".py"):
            path = Path(where).expanduser()
            if not path.is_file():
                raise ConfigError(f"{key}: {path} is not a file")
            spec = importlib.util.spec_from_file_location(f"qtune_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))
            module = importlib.import_module(where)
    except ConfigError:
        raise
    except BaseException as e:  # the user's code: whatever it raises (a SyntaxError, a SystemExit) is one line
        if isinstance(e, KeyboardInterrupt):
            raise
        line = str(e).splitlines()[0] if str(e) else ""
        raise ConfigError(f"{key}: cannot import {where} ({type(e).__name__}{': ' + line if line else ''})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"{key}: {where} has no function {attr!r}")
    return fn


def _prompt_text(prompt) -> str:
    if isinstance(prompt, list):
        users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        prompt = users[-1] if users else completion_text(prompt)
    text = " ".join(str(prompt).split())
    return text if len(text) <= 60 else text[:57] + "..."


def checked(fn, name: str):
    """fn as TRL calls it, named as it is logged (rewards/<name>/mean): an exception, or a result other than one
    number (or None) per completion, is a RewardError naming the function and the first prompt it failed on."""
    label = str(name).rpartition(":")[2]

    def reward(prompts, completions, **kwargs):
        try:
            out = fn(prompts=prompts, completions=completions, **kwargs)
        except Exception as e:
            first = _first_failing(fn, prompts, completions, kwargs)
            line = str(e).splitlines()[0] if str(e) else ""
            raise RewardError(f"train.grpo.rewards: {name} raised {type(e).__name__}{': ' + line if line else ''} "
                              f"(first on the prompt {first!r})") from None
        try:
            values = list(out)
        except TypeError:
            values = None
        if values is None or len(values) != len(completions):
            got = f"{len(values)} values" if values is not None else type(out).__name__
            raise RewardError(f"train.grpo.rewards: {name} returned {got} for {len(completions)} completions (one number each; "
                              f"first prompt {_prompt_text(prompts[0])!r})")
        for i, v in enumerate(values):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
                    values[i] = float(v.item())
                    continue
                raise RewardError(f"train.grpo.rewards: {name} returned {type(v).__name__} {v!r:.40} for the prompt "
                                  f"{_prompt_text(prompts[i])!r}; valid: a number or None")
        return values

    reward.__name__ = label
    return reward


def _first_failing(fn, prompts, completions, kwargs) -> str:
    """The first prompt whose completion alone makes fn raise (its own batch's first where none does alone)."""
    for i in range(len(prompts)):
        one = {k: v[i:i + 1] if isinstance(v, list) and len(v) == len(prompts) else v for k, v in kwargs.items()}
        try:
            fn(prompts=prompts[i:i + 1], completions=completions[i:i + 1], **one)
        except Exception:
            return _prompt_text(prompts[i])
    return _prompt_text(prompts[0])
