"""The local models: Qwen3 tokenizer ids and template, tiny Qwen3 / Qwen3-MoE, the embedded SmolLM2."""
from __future__ import annotations

import pytest
import torch

from qtune.modeling.assets import QWEN_PATTERN, qwen_tiktoken_path


def test_qwen3_special_token_ids(qwen3_tokenizer):
    tok = qwen3_tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]}
    assert ids == {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
                   "<think>": 151667, "</think>": 151668}
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


def test_rendered_conversation_has_qwen3_ids(qwen3_tokenizer):
    msgs = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there"}]
    text = qwen3_tokenizer.apply_chat_template(msgs, tokenize=False)
    assert text == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nHi there<|im_end|>\n"
    ids = qwen3_tokenizer(text, add_special_tokens=False)["input_ids"]
    # Known Qwen3 ids: "user" 872, "\n" 198, "Hello" 9707, "assistant" 77091, "\n\n" 271.
    assert ids[:9] == [151644, 872, 198, 9707, 151645, 198, 151644, 77091, 198]
    assert ids[9:13] == [151667, 271, 151668, 271]
    assert ids[-2:] == [151645, 198]


def test_generation_prompt_and_thinking_switch(qwen3_tokenizer):
    msgs = [{"role": "user", "content": "2+2?"}]
    on = qwen3_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    off = qwen3_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert on.endswith("<|im_start|>assistant\n")
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_bpe_matches_tiktoken_reference(qwen3_tokenizer):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    enc = tiktoken.Encoding("qwen", pat_str=QWEN_PATTERN, mergeable_ranks=load_tiktoken_bpe(str(qwen_tiktoken_path())),
                            special_tokens={})
    texts = ["Hello world! 12345 naïve café", "你好，世界。今天天气很好", "def f(x):\n    return x ** 2\n\n\n",
             "  leading spaces and\ttabs\r\n", "emoji 🤖🎉 and symbols ∑∫√", "It's we'll they've I'm"]
    for t in texts:
        assert qwen3_tokenizer(t, add_special_tokens=False)["input_ids"] == enc.encode_ordinary(t), t


@pytest.mark.parametrize("fixture, moe", [("tiny_qwen3", False), ("tiny_qwen3_moe", True)])
def test_tiny_models_load_and_run(request, fixture, moe):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = request.getfixturevalue(fixture)
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    names = dict(model.named_parameters())
    if moe:
        gate_up = names["model.layers.0.mlp.experts.gate_up_proj"]
        assert gate_up.dim() == 3 and gate_up.shape[0] == 8
        assert names["model.layers.0.mlp.gate.weight"].shape == (8, 64)
        assert model.config.num_experts_per_tok == 2
    else:
        assert "model.layers.0.mlp.gate_proj.weight" in names
    ids = tok("Hello, tiny model. How are you?", return_tensors="pt")["input_ids"]
    out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss)


def test_smollm2_answers_sensibly(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.tie_word_embeddings
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
