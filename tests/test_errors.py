"""Bad input gets one line naming the key and what is valid, and a non-zero exit — never a traceback.
A table: add a row for each new case (verb, overrides, the words the line must hold)."""
from __future__ import annotations

import pytest

from conftest import qtune

CASES = [
    ("train", ["train.lr=-1"], "train.lr=-1: valid: > 0"),
    ("train", ["train.epochs=0"], "train.epochs=0: valid: > 0"),
    ("train", ["data.max_length=-5"], "data.max_length=-5: valid: >= 1"),
    ("prepare", ["data.max_length=-5"], "data.max_length=-5: valid: >= 1"),
    ("train", ["data.val_size=2.5"], "data.val_size=2.5: valid: a fraction 0 <= x < 1 of the examples, or a whole number"),
    ("train", ["data.val_size=-0.1"], "data.val_size=-0.1: valid: a fraction"),
    ("train", ["train.fast=maybe"], "train.fast=maybe: valid: auto, true, false"),
    ("train", ["train.offload_activations=yes"], "train.offload_activations=yes: valid: auto, true, false"),
    ("chat", ["chat.max_new_tokens=0"], "chat.max_new_tokens=0: valid: >= 1"),
    ("chat", ["chat.temperature=-1"], "chat.temperature=-1: valid: >= 0"),
    ("chat", ["chat.top_p=1.5"], "chat.top_p=1.5: valid: > 0 and <= 1"),
    ("serve", ["serve.port=99999"], "serve.port=99999: valid: >= 1 and <= 65535"),
    ("serve", ["serve.port=0"], "serve.port=0: valid: >= 1 and <= 65535"),
    ("inspect-moe", ["model=qwen3_30b_a3b", "moe.max_experts=-1"], "moe.max_experts=-1: valid: >= 1"),
    ("inspect-moe", ["model=qwen3_30b_a3b", "moe.max_experts=0"], "moe.max_experts=0: valid: >= 1"),
]


@pytest.mark.parametrize("verb,overrides,words", CASES, ids=[f"{c[0]}:{' '.join(c[1])}" for c in CASES])
def test_bad_setting_is_one_line_naming_the_key(verb, overrides, words):
    p = qtune(verb, *overrides)
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert p.returncode != 0
    assert "Traceback" not in p.stderr + p.stdout
    assert len(lines) == 1 and words in lines[0], p.stderr


def test_good_values_at_the_edges_compose():
    from qtune.config import compose, to_object

    cfg = to_object(compose(["data.val_size=200", "chat.temperature=0", "serve.port=65535", "chat.top_p=1",
                             "moe.max_experts=1"]))
    assert cfg.serve.port == 65535 and cfg.moe.max_experts == 1 and cfg.data.val_size == 200
    assert to_object(compose(["data.val_size=0"])).data.val_size == 0
