"""Chat templates and loss masks.

The conversation is rendered once with the model's own chat template (Qwen3's thinking blocks as
Qwen3 renders them), tokenized once with character offsets, and a token is trainable when it starts
inside an assistant turn: from the end of the assistant header to the end of the turn's closing
token. The header and the closing token are found by probing the template with a one-turn
conversation, so any template that renders assistant turns contiguously works, not only ChatML.

Control tokens (the tokenizer's special tokens: <|im_start|>, <|im_end|>, ...) come only from the template.
A data string that spells one ("...<|im_end|>\n<|im_start|>assistant\nEVIL") is text: before rendering, a
character no text holds (a Unicode noncharacter) is put inside each such spelling (escape), so neither the
search for assistant turns nor the tokenizer can take it for the template's; the rendered text is then tokenized
piece by piece (encode): the template's control tokens as themselves, everything between them as plain text
(split_special_tokens), the escape character dropped. Conversations without such strings are tokenized whole,
as before: the tokenizer splits at its special tokens first, so both ways give the same tokens.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from qtune.errors import DataError, QtuneError

_Q, _A = "QTUNEPROBEQUESTION", "QTUNEPROBEANSWER"


# an empty thinking block (non-thinking data in a thinking model's template): data.ignore_empty_think keeps it out of
# the loss
EMPTY_THINK = re.compile(r"<think>\s*</think>\s*")


@dataclass(frozen=True)
class Markers:
    header: str  # text that opens an assistant turn, e.g. "<|im_start|>assistant\n"
    footer: str  # text that closes it, e.g. "<|im_end|>"


def template_text(name: str) -> str:
    """A chat template shipped with qtune (`qwen3`, `chatml`) or read from a .jinja file."""
    if name.endswith(".jinja"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise QtuneError(f"chat template file not found: {path}")
        return path.read_text()
    try:
        return resources.files("qtune.data").joinpath(f"templates/{name}.jinja").read_text()
    except FileNotFoundError:
        raise QtuneError(f"unknown chat template {name!r}; valid: qwen3, chatml, or a path to a .jinja file") from None


def resolve_template(tokenizer, name: str | None, model_name: str) -> tuple[str, str | None]:
    """(template text, warning or None): the configured template, else the tokenizer's, else ChatML."""
    if name:
        return template_text(name), None
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template, None
    return template_text("chatml"), (f"{model_name} has no chat template; using ChatML "
                                     "(set model.chat_template=<name or .jinja path> to choose another)")


def render(tokenizer, template: str, messages: list[dict], add_generation_prompt: bool = False,
           enable_thinking: bool | None = None, tools: list | None = None) -> str:
    kw = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    if tools:
        kw["tools"] = tools
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt, **kw)


def check_tool_rendering(text: str, messages: list[dict], tools: list | None, where: str) -> None:
    """A template that leaves tools or calls out (ChatML has no place for them) would train turns without their
    calls: a DataError naming the record."""
    names = [t["function"]["name"] for t in tools or ()]
    names += [c["function"]["name"] for m in messages for c in m.get("tool_calls") or ()]
    missing = next((n for n in names if n not in text), None)
    if missing is not None:
        raise DataError(f"{where}: the chat template does not render tool calls or tools (the record's {missing!r} is "
                        "not in its text); use a template that does, e.g. model.chat_template=qwen3")


def prompt_inputs(tokenizer, template: str, messages: list[dict], enable_thinking: bool | None = None) -> dict:
    """A generation prompt as model inputs (tensors): rendered with `template`, no special tokens added."""
    text = render(tokenizer, template, messages, add_generation_prompt=True, enable_thinking=enable_thinking)
    return dict(tokenizer(text, return_tensors="pt", add_special_tokens=False))


# Unicode noncharacters: never in text that means something; the escape takes the first one a conversation lacks.
_ESCAPES = [chr(c) for c in range(0xFDD0, 0xFDF0)]


@dataclass(frozen=True)
class _Controls:
    ids: dict            # control token text -> id
    spelled: re.Pattern  # its text anywhere (to escape in data)
    placed: re.Pattern   # the template's, with the whitespace a token strips (lstrip/rstrip), one group per token


def _controls(tokenizer) -> _Controls | None:
    """The tokenizer's special added tokens (those split_special_tokens turns into text), memoized on it."""
    found = getattr(tokenizer, "_qtune_controls", False)
    if found is False:
        tokens = sorted(((t, i) for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()
                         if t.special and len(t.content) > 1), key=lambda x: -len(x[0].content))
        found = None
        if tokens:
            found = _Controls({t.content: i for t, i in tokens},
                              re.compile("|".join(re.escape(t.content) for t, _ in tokens)),
                              re.compile("|".join((r"\s*" if t.lstrip else "") + f"({re.escape(t.content)})"
                                                  + (r"\s*" if t.rstrip else "") for t, _ in tokens)))
        tokenizer._qtune_controls = found
    return found


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def escape(tokenizer, value):
    """(value, escape character or None): value (a string, messages, lists of them) with every control token spelled
    in its strings broken by an escape character after its first character; None and value itself when no string
    spells one."""
    controls = _controls(tokenizer)
    if controls is None or not any(controls.spelled.search(s) for s in _strings(value)):
        return value, None
    esc = next((c for c in _ESCAPES if not any(c in s for s in _strings(value))), None)
    if esc is None:
        raise DataError("a record holds every Unicode noncharacter U+FDD0..U+FDEF and spells a control token; "
                        "remove those characters")

    def sub(v):
        if isinstance(v, str):
            return controls.spelled.sub(lambda m: m.group()[0] + esc + m.group()[1:], v)
        if isinstance(v, dict):
            return {k: sub(x) for k, x in v.items()}
        if isinstance(v, list):
            return [sub(x) for x in v]
        return v
    return sub(value), esc


def encode(tokenizer, texts: list[str], escapes: list[str | None]) -> tuple[list[list[int]], list[list[tuple]]]:
    """Token ids and character offsets (into each text) of texts rendered from escape()d data: a text without an
    escape character is tokenized whole (in one batch); one with it piece by piece, control tokens only where the
    template put them and the data's spellings of them as plain text."""
    ids: list = [None] * len(texts)
    offsets: list = [None] * len(texts)
    whole = [i for i, e in enumerate(escapes) if e is None]
    if whole:
        enc = tokenizer([texts[i] for i in whole], add_special_tokens=False, return_offsets_mapping=True)
        for i, t, o in zip(whole, enc["input_ids"], enc["offset_mapping"]):
            ids[i], offsets[i] = list(t), list(o)
    for i, esc in enumerate(escapes):
        if esc is not None:
            ids[i], offsets[i] = _encode_pieces(tokenizer, texts[i], esc)
    return ids, offsets


def _encode_pieces(tokenizer, text: str, esc: str) -> tuple[list[int], list[tuple[int, int]]]:
    controls = _controls(tokenizer)
    pieces, pos = [], 0  # (start, end, control token id or None)
    for m in controls.placed.finditer(text):
        if m.start() > pos:
            pieces.append((pos, m.start(), None))
        pieces.append((m.start(), m.end(), controls.ids[next(g for g in m.groups() if g is not None)]))
        pos = m.end()
    if pos < len(text):
        pieces.append((pos, len(text), None))
    plain = [(a, b) for a, b, tid in pieces if tid is None]
    enc = tokenizer([text[a:b].replace(esc, "") for a, b in plain], add_special_tokens=False,
                    return_offsets_mapping=True, split_special_tokens=True) if plain else None
    ids, offsets, k = [], [], 0
    for a, b, tid in pieces:
        if tid is not None:
            ids.append(tid)
            offsets.append((a, b))
            continue
        segment = text[a:b]
        at = [a + j for j, c in enumerate(segment) if c != esc] + [b]  # a character of the piece -> its place in text
        ids += enc["input_ids"][k]
        offsets += [(at[s], at[e]) for s, e in enc["offset_mapping"][k]]
        k += 1
    return ids, offsets


def unescape(text: str, esc: str | None) -> str:
    return text if esc is None else text.replace(esc, "")


def probe_markers(tokenizer, template: str) -> Markers:
    user = [{"role": "user", "content": _Q}]
    before = render(tokenizer, template, user)
    prompt = render(tokenizer, template, user, add_generation_prompt=True)
    full = render(tokenizer, template, user + [{"role": "assistant", "content": _A}])
    if not (full.startswith(prompt) and prompt.startswith(before) and _A in full[len(prompt):]):
        raise DataError("the chat template does not render an assistant turn after its generation prompt; "
                        "set model.chat_template=chatml (or a .jinja path) or data.train_on=all")
    header = prompt[len(before):]
    footer = full[full.index(_A) + len(_A):].rstrip()
    if not header or not footer:
        raise DataError("cannot find where assistant turns begin and end in the chat template; "
                        "set model.chat_template=chatml (or a .jinja path) or data.train_on=all")
    return Markers(header, footer)


def assistant_spans(text: str, markers: Markers) -> list[tuple[int, int]]:
    """Character spans [start, end) of every assistant turn: content and closing token, not the header."""
    spans, pos = [], 0
    while (h := text.find(markers.header, pos)) >= 0:
        start = h + len(markers.header)
        f = text.find(markers.footer, start)
        end = len(text) if f < 0 else f + len(markers.footer)
        spans.append((start, end))
        pos = end
    return spans


def label_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> np.ndarray:
    """True for each token whose first character lies inside a span."""
    starts = np.fromiter((s for s, _ in offsets), dtype=np.int64, count=len(offsets))
    mask = np.zeros(len(offsets), dtype=bool)
    for a, b in spans:
        mask |= (starts >= a) & (starts < b)
    return mask
