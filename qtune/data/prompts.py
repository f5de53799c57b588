"""Prompts for online RL (train.stage=grpo): records -> a prompt as chat messages and the record's other fields.

A record holds `prompt` (a string, or OpenAI messages) or, as GSM8K has it, `question`; every other field (`answer`,
`solution`, `tests`, ...) is kept beside the prompt and reaches the reward functions as a keyword argument (TRL's
convention). The prompt stays messages: the trainer renders it with the chat template (the one qtune.data.template
resolves) when it generates. data.max_length bounds a rendered prompt's tokens: longer prompts are left out and
counted in stats.json (dropped_no_trainable).
"""
from __future__ import annotations

import json

from qtune.data import formats
from qtune.data.template import render
from qtune.errors import DataError

PROMPT_KEYS = ("prompt", "question")
BOOKKEEPING = ("length", "trainable", "truncated", "source", "format")


def example(data: dict, where: str) -> formats.Example:
    key = next((k for k in PROMPT_KEYS if k in data), None)
    if key is None:
        raise DataError(f"{where}: a prompt record needs 'prompt' (text or messages) or 'question'; fields found: "
                        f"{', '.join(sorted(data)) or 'none'}")
    value = data[key]
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field '{key}' is empty")
        messages = [*formats.system_messages(data, where), {"role": "user", "content": value}]
    elif isinstance(value, list):
        messages = formats.messages_of(data, where, key)
        formats.check_opening(messages, where)
        if messages[-1]["role"] == "assistant":
            raise DataError(f"{where}: field '{key}' ends with an assistant turn; the completions follow the "
                            "prompt's last user turn")
    else:
        raise DataError(f"{where}: field '{key}' must be a string or a list of messages, got {type(value).__name__}")
    extra = {k: v for k, v in data.items() if k not in (key, "system")}
    clash = [k for k in extra if k in BOOKKEEPING or k in ("completion", "completion_ids")]
    if clash:
        raise DataError(f"{where}: field '{clash[0]}' is a name the trainer uses itself; rename it")
    return formats.Example([{"role": m["role"], "content": m["content"]} for m in messages], None, "prompts", where,
                           extra=extra)


def tokenize(examples: list, tokenizer, template: str, data, desc: str):
    """The examples as a dataset: `prompt` (messages), the records' other fields, and per-row counts for stats (the
    rendered prompt's tokens; trainable 0 for a prompt over data.max_length, which prepare then leaves out)."""
    from datasets import Dataset

    rows = []
    for i, ex in examples:
        text = render(tokenizer, template, ex.messages, add_generation_prompt=True, enable_thinking=data.enable_thinking)
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        rows.append({"prompt": ex.messages, **ex.extra, "length": n, "trainable": int(n <= data.max_length),
                     "truncated": n > data.max_length, "source": i, "format": ex.format})
    try:
        return Dataset.from_list(rows)
    except Exception as e:  # a field whose values differ in type from record to record
        line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{examples[0][1].where}: the prompts' fields must keep one type across records ({line})") \
            from None


def model_columns(ds) -> list[str]:
    return [c for c in ds.column_names if c not in BOOKKEEPING]


def preview(first: list, tokenizer, template: str, data) -> list:
    """`prepare --dry-run`: each prompt as the trainer renders it, and the fields the reward functions get."""
    shown = []
    for _, ex in first:
        text = render(tokenizer, template, ex.messages, add_generation_prompt=True, enable_thinking=data.enable_thinking)
        shown.append((ex.where, ex.format, [(text, False), (f"\n[fields] {json.dumps(ex.extra, default=str)}", True)]))
    return shown
