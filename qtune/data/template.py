"""Chat templates and loss masks.

The conversation is rendered once with the model's own chat template (Qwen3's thinking blocks as
Qwen3 renders them), tokenized once with character offsets, and a token is trainable when it starts
inside an assistant turn: from the end of the assistant header to the end of the turn's closing
token. The header and the closing token are found by probing the template with a one-turn
conversation, so any template that renders assistant turns contiguously works, not only ChatML.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from qtune.errors import DataError, QtuneError

_Q, _A = "QTUNEPROBEQUESTION", "QTUNEPROBEANSWER"


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
           enable_thinking: bool | None = None) -> str:
    kw = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt, **kw)


def prompt_inputs(tokenizer, template: str, messages: list[dict], enable_thinking: bool | None = None) -> dict:
    """A generation prompt as model inputs (tensors): rendered with `template`, no special tokens added."""
    text = render(tokenizer, template, messages, add_generation_prompt=True, enable_thinking=enable_thinking)
    return dict(tokenizer(text, return_tensors="pt", add_special_tokens=False))


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
