"""Preference data (train.stage=dpo|kto|rm): records -> a prompt and answers -> token ids, truncated.

A record becomes the prompt's messages and the answers' turns (formats.Example: messages, chosen, rejected, label).
Each is rendered with the chat template exactly as at inference: the prompt with the generation prompt (as chat and
serve send it), each answer as the text that follows it, up to the end of the assistant turn. Prompt and answers are
tokenized apart, as the model sees them at inference: prompt tokens, then the answer's tokens.

When prompt + answer exceed data.max_length, the prompt keeps its end and each answer its start (the prompt keeps at
least half the budget when an answer is long); stats.json counts what was cut. Pairs whose two answers are the same
carry no preference: they are left out, counted, and named in a warning.
"""
from __future__ import annotations

import json

import numpy as np

from qtune.data import formats
from qtune.data.template import EMPTY_THINK, Markers, check_tool_rendering, encode, escape, render, unescape
from qtune.errors import DataError

# What prepare builds for a stage's kind of rows (qtune.stages.base.Trains.kind): packed token rows (lm); prompt, chosen and
# rejected ids (pairs); the same with the prompt in front of each answer, whole sequences a reward model scores
# (scored); prompt, completion ids and label (unpaired); prompt messages and the records' fields (prompts).
KINDS = ("lm", "pairs", "scored", "unpaired", "prompts")  # prompts: qtune.data.prompts builds them


# ---------------------------------------------------------------- records


def normalize_preference(data: dict, fmt: str, where: str) -> formats.Example:
    tools = formats.record_tools(data, where)
    if fmt in ("kto", "swift_kto"):
        if fmt == "kto":
            prompt, answer = _prompt(data, "prompt", where), _answer(data, "completion", where)
        else:
            prompt, answer = _last_turn(data, where)
        ex = formats.Example(prompt, None, fmt, where, chosen=answer, label=_label(data.get("label"), where),
                             tools=tools)
        _check_calls(ex, where)
        return ex
    if fmt == "sharegpt_preference":
        prompt = formats.sharegpt_messages(data, where)
        answers = {k: _sharegpt_turn(data.get(k), where, k) for k in ("chosen", "rejected")}
    elif fmt == "swift_preference":
        prompt, chosen = _last_turn(data, where)
        answers = {"chosen": chosen, "rejected": _answer(data, "rejected_response", where)}
    elif fmt == "implicit_preference":
        prompt, answers = _shared_prompt(data, where)
    else:
        key = next((k for k in ("prompt", "messages", "conversations") if k in data), None)
        if key is None:
            raise DataError(f"{where}: a preference pair needs its prompt: field 'prompt' (a string or messages) or "
                            "'messages' next to 'chosen' and 'rejected' (or chosen and rejected as whole "
                            "conversations that share it)")
        prompt = _prompt(data, key, where)
        answers = {k: _answer(data, k, where) for k in ("chosen", "rejected")}
    if prompt[-1]["role"] == "assistant":
        raise DataError(f"{where}: the prompt ends with an assistant turn; the answers in 'chosen' and 'rejected' "
                        "follow the prompt's last user turn")
    ex = formats.Example(prompt, None, fmt, where, chosen=answers["chosen"], rejected=answers["rejected"], tools=tools)
    _check_calls(ex, where)
    return ex


def _check_calls(ex: formats.Example, where: str) -> None:
    for turns in (ex.messages, ex.chosen, ex.rejected):
        if turns:
            formats.check_calls(turns, ex.tools, where)


def _last_turn(data: dict, where: str) -> tuple[list[dict], list[dict]]:
    """ms-swift: `messages` whose last turn is the answer (the chosen one, or KTO's) and the rest its prompt."""
    messages = formats.messages_of(data, where, "messages")
    formats.check_opening(messages, where)
    if messages[-1]["role"] != "assistant" or len(messages) < 2:
        raise DataError(f"{where}: field 'messages' must end with the assistant's answer after a user turn "
                        f"(its last turn is {messages[-1]['role']!r})")
    last = messages[-1]
    if not last["content"].strip() and not last.get("reasoning_content") and not last.get("tool_calls"):
        raise DataError(f"{where}: the answer (the last turn of 'messages') is empty")
    return messages[:-1], [last]


def _shared_prompt(data: dict, where: str) -> tuple[list[dict], dict]:
    """TRL's implicit prompt: chosen and rejected are whole conversations; the turns both begin with are the prompt."""
    full = {k: formats.messages_of(data, where, k) for k in ("chosen", "rejected")}
    n = 0
    while n < min(len(full["chosen"]), len(full["rejected"])) - 1 and full["chosen"][n] == full["rejected"][n]:
        n += 1
    while n and full["chosen"][n - 1]["role"] == "assistant":  # the answers begin after the last shared user turn
        n -= 1
    if n == 0 or full["chosen"][n - 1]["role"] == "system":
        raise DataError(f"{where}: 'chosen' and 'rejected' share no user turn to be their prompt; give both the same "
                        "opening turns, or the prompt in field 'prompt'")
    formats.check_opening(full["chosen"][:n], where)
    answers = {}
    for k, turns in full.items():
        rest = turns[n:]
        if not rest or rest[-1]["role"] != "assistant":
            raise DataError(f"{where}: field '{k}' must end with an assistant turn after the shared prompt")
        answers[k] = rest
    return full["chosen"][:n], answers


def _prompt(data: dict, key: str, where: str) -> list[dict]:
    value = data.get(key)
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field '{key}' is empty")
        return [*formats.system_messages(data, where), {"role": "user", "content": value}]
    if isinstance(value, list):
        messages = formats.messages_of(data, where, key)
        formats.check_opening(messages, where)
        return messages
    raise DataError(f"{where}: field '{key}' must be a string or a list of messages, got {type(value).__name__}")


def _answer(data: dict, key: str, where: str) -> list[dict]:
    """An answer: a string, one assistant message, or the turns that follow the prompt (ending with the assistant's)."""
    value = data.get(key)
    if isinstance(value, str):
        value = [{"role": "assistant", "content": value}]
    elif isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field '{key}' must be a string, a message or a list of messages, "
                        f"got {type(data.get(key)).__name__}")
    turns = formats.messages_of({key: value}, where, key)
    last = turns[-1]
    if last["role"] != "assistant":
        raise DataError(f"{where}: field '{key}' must end with an assistant turn, not {last['role']!r}")
    if not last["content"].strip() and not last.get("reasoning_content") and not last.get("tool_calls"):
        raise DataError(f"{where}: field '{key}' is empty")
    return turns


def _sharegpt_turn(value, where: str, key: str, tags: dict | None = None) -> list[dict]:
    t = tags or formats.SHARE_TAGS
    if not isinstance(value, dict) or t["content_tag"] not in value:
        raise DataError(f"{where}: field '{key}' must be a turn like {{\"{t['role_tag']}\": \"{t['assistant_tag']}\", "
                        f"\"{t['content_tag']}\": \"...\"}}")
    value = {t["role_tag"]: t["assistant_tag"], **value}
    turn = formats.sharegpt_turn(value, f"{where}: field '{key}'", tags)
    if turn["role"] != "assistant":
        raise DataError(f"{where}: field '{key}' must be the assistant's turn (from: gpt), not "
                        f"{value.get(t['role_tag'])!r}")
    if not turn["content"].strip() and not turn.get("tool_calls"):
        raise DataError(f"{where}: field '{key}': 'value' must be a non-empty string")
    return [turn]


def _label(value, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):  # CSV cells are text
        return value.strip().lower() == "true"
    raise DataError(f"{where}: field 'label' must be true (a desirable answer) or false, got {value!r}")


def identical(ex: formats.Example) -> bool:
    return ex.rejected is not None and ex.chosen == ex.rejected


def unpair(examples: list, seed: int) -> list:
    """KTO: each pair as two answers, the chosen one desirable; the order shuffled again (KTO's batches are taken in
    order, so a pair's two halves should not always sit side by side)."""
    import random

    out = []
    for i, ex in examples:
        if ex.rejected is None:
            out.append((i, ex))
            continue
        for answer, label in ((ex.chosen, True), (ex.rejected, False)):
            out.append((i, formats.Example(ex.messages, None, ex.format, ex.where, chosen=answer, label=label,
                                           tools=ex.tools)))
    random.Random(seed).shuffle(out)
    return out


# ---------------------------------------------------------------- rendering, tokenizing, truncating


def render_parts(tokenizer, template: str, markers: Markers, prompt: list[dict], answer: list[dict],
                 enable_thinking, where: str, tools: list | None = None) -> tuple[str, str]:
    """(prompt text, answer text): the prompt as sent at inference, the answer as what follows it, to its turn's end."""
    head = render(tokenizer, template, prompt, add_generation_prompt=True, enable_thinking=enable_thinking, tools=tools)
    full = render(tokenizer, template, prompt + answer, enable_thinking=enable_thinking, tools=tools)
    if tools or any(m.get("tool_calls") for m in prompt + answer):
        check_tool_rendering(full, prompt + answer, tools, where)
    if not full.startswith(head):
        raise DataError(f"{where}: the chat template renders this prompt differently before an answer than as a "
                        "generation prompt; set model.chat_template=chatml (or a .jinja path)")
    tail = full[len(head):]
    end = tail.rfind(markers.footer)
    return head, tail[:end + len(markers.footer)] if markers.footer and end >= 0 else tail


def truncate(prompt: list[int], answers: list[list[int]], max_length: int) -> tuple[list[int], list[list[int]], bool, bool]:
    """Keep the prompt's end and each answer's start within max_length (prompt + answer); the prompt keeps at least
    half the budget when an answer is long. Returns (prompt, answers, prompt cut, an answer cut)."""
    longest = max(len(a) for a in answers)
    if len(prompt) + longest <= max_length:
        return prompt, answers, False, False
    keep = min(len(prompt), max(max_length - longest, max_length // 2))
    cut_prompt = keep < len(prompt)
    prompt = prompt[len(prompt) - keep:]
    room = max_length - len(prompt)
    return prompt, [a[:room] for a in answers], cut_prompt, any(len(a) > room for a in answers)


def _empty_think_to_prompt(texts: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """data.ignore_empty_think for pairs and KTO answers: an empty <think></think> opening every answer moves to the
    prompt's end, where it is context (TRL scores the answer tokens only); an answer without one leaves all as they are
    (the pair's two answers must stay comparable)."""
    found = [EMPTY_THINK.match(tail) for _, tail in texts]
    if not all(found) or len({m.group() for m in found}) != 1:
        return texts
    return [(head + m.group(), tail[m.end():]) for (head, tail), m in zip(texts, found)]


def _tokenize_batch(batch, tokenizer, template: str, markers: Markers, max_length: int, enable_thinking,
                    ignore_empty_think: bool = False):
    out = {k: [] for k in ("prompt_ids", "chosen_ids", "rejected_ids", "label", "length", "trainable", "truncated",
                           "prompt_cut", "answer_cut")}
    for prompt, chosen, rejected, label, where, tools in zip(batch["prompt"], batch["chosen"], batch["rejected"],
                                                             batch["label"], batch["where"], batch["tools"]):
        parts = [json.loads(m) for m in (prompt, chosen, rejected) if m is not None]
        (tools, prompt, *answers), esc = escape(tokenizer, [json.loads(tools) if tools else None] + parts)
        texts = [render_parts(tokenizer, template, markers, prompt, a, enable_thinking, where, tools) for a in answers]
        if ignore_empty_think:
            texts = _empty_think_to_prompt(texts)
        pieces = [texts[0][0]] + [t[1] for t in texts]
        ids = encode(tokenizer, pieces, [esc] * len(pieces))[0]   # control tokens only where the template put them
        p, answer_ids, cut_p, cut_a = truncate(ids[0], ids[1:], max_length)
        out["prompt_ids"].append(p)
        out["chosen_ids"].append(answer_ids[0])
        out["rejected_ids"].append(answer_ids[1] if len(answer_ids) > 1 else None)
        out["label"].append(label)
        out["length"].append(len(p) + max(len(a) for a in answer_ids))
        out["trainable"].append(sum(len(a) for a in answer_ids))
        out["prompt_cut"].append(cut_p)
        out["answer_cut"].append(cut_a)
        out["truncated"].append(cut_p or cut_a)
    return out


def tokenize(examples: list[tuple[int, formats.Example]], tokenizer, template: str, markers: Markers, data, desc: str,
             kind: str):
    """The examples as a dataset: prompt_ids, chosen_ids and rejected_ids (pairs) or completion_ids and label (kto),
    with per-row counts for stats (length, trainable, truncated, source, format)."""
    import hashlib

    from datasets import Dataset

    ds = Dataset.from_dict({
        "prompt": [json.dumps(ex.messages) for _, ex in examples],
        "chosen": [json.dumps(ex.chosen) for _, ex in examples],
        "rejected": [json.dumps(ex.rejected) if ex.rejected is not None else None for _, ex in examples],
        "label": [ex.label for _, ex in examples],
        "where": [ex.where for _, ex in examples],
        "source": [i for i, _ in examples],
        "format": [ex.format for _, ex in examples],
        "tools": [json.dumps(ex.tools) if ex.tools else None for _, ex in examples],
    })
    ds = ds.map(_tokenize_batch, batched=True, batch_size=500,
                remove_columns=["prompt", "chosen", "rejected", "where", "tools"],
                fn_kwargs=dict(tokenizer=tokenizer, template=template, markers=markers, max_length=data.max_length,
                               enable_thinking=data.enable_thinking,
                               # rm scores whole sequences at their last token: there is no per-token loss to spare
                               ignore_empty_think=data.ignore_empty_think and kind != "scored"),
                new_fingerprint=hashlib.sha1(desc.encode()).hexdigest(), desc=f"tokenizing {desc}")
    if kind == "pairs":
        return ds.remove_columns(["label"])
    if kind == "scored":
        return ds.map(lambda r: {k: r["prompt_ids"] + r[k] for k in ("chosen_ids", "rejected_ids")},
                      remove_columns=["label"], desc="prompt + answer")
    return ds.remove_columns(["rejected_ids"]).rename_column("chosen_ids", "completion_ids")


def preview(first: list, tokenizer, template: str, markers: Markers, data) -> list:
    """`prepare --dry-run`: each example's prompt (context) and its answers (trained on), rendered."""
    shown = []
    for _, ex in first:
        segments = []
        (prompt, chosen, rejected, tools), esc = escape(tokenizer, [ex.messages, ex.chosen, ex.rejected, ex.tools])
        for name, answer in (("chosen", chosen), ("rejected", rejected)):
            if answer is None:
                continue
            head, tail = render_parts(tokenizer, template, markers, prompt, answer, data.enable_thinking, ex.where,
                                      tools)
            if not segments:
                segments.append((unescape(head, esc), False))
            label = name if ex.label is None else ("desirable" if ex.label else "undesirable")
            segments += [(f"\n[{label}] ", False), (unescape(tail, esc), True)]
        shown.append((ex.where, ex.format, segments))
    return shown


def token_row(row: dict) -> dict:
    """A prepared row of any kind as one token sequence the model reads (a preference row: its prompt and first
    answer), e.g. to measure MoE routing on the training data."""
    if "input_ids" in row:
        return row
    return {"input_ids": row.get("prompt_ids", []) + (row["chosen_ids"] if "chosen_ids" in row else row["completion_ids"])}


def model_columns(kind: str) -> list[str]:
    """What the trainer reads from a prepared split of this kind."""
    return {"lm": ["input_ids", "labels"], "pairs": ["prompt_ids", "chosen_ids", "rejected_ids"],
            "scored": ["chosen_ids", "rejected_ids"], "unpaired": ["prompt_ids", "completion_ids", "label"]}[kind]


def pair_stats(ds) -> dict:
    """What preference stats add to prepare's: how many prompts and answers truncation cut (kto: desirable share)."""
    out = {"truncated_prompts": int(np.asarray(ds["prompt_cut"]).sum()),
           "truncated_answers": int(np.asarray(ds["answer_cut"]).sum())}
    if "label" in ds.column_names:
        out["desirable"] = int(np.asarray(ds["label"]).sum())
    return out
