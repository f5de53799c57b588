"""`qtune serve` honours the OpenAI request parameters it accepts (or answers 400 naming the field): usage in a
stream, seeds, logit_bias, presence/frequency penalties, stop strings; response_format asking for JSON is refused.
A real uvicorn serving the tiny random Qwen3 (test_serve_limits' server), queried with the real `openai` client,
once through `generate` (chat.cache=auto on CPU) and once through qtune.inference.decoding's step (chat.cache=graph, which
runs it eagerly off a GPU)."""
from __future__ import annotations

import pytest

from test_serve_limits import _start


def _serve(cache: str):
    import openai

    proc, port = _start(f"chat.cache={cache}")
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(tiny_qwen3):
    yield from _serve("auto")


@pytest.fixture(scope="module", params=["auto", "graph"])
def each_client(request, client):
    """Both decoding paths, for what each implements on its own (the draw, the bias and the penalties)."""
    if request.param == "auto":
        yield client
    else:
        yield from _serve("graph")


@pytest.fixture(scope="module")
def tok(tiny_qwen3):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_qwen3)


ASK = [{"role": "user", "content": "Tell me about the sea."}]


def _ask(client, **kw) -> str:
    return client.chat.completions.create(model="tiny_qwen3", messages=ASK, **kw).choices[0].message.content


def _refused(client, field: str, **kw) -> str:
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny_qwen3", messages=ASK, max_tokens=2, **kw)
    assert e.value.param == field, e.value.body
    assert field in e.value.body["message"], e.value.body
    return e.value.body["message"]


@pytest.mark.slow
def test_stream_options_include_usage_ends_with_a_usage_chunk(client):
    whole = client.chat.completions.create(model="tiny_qwen3", messages=ASK, max_tokens=8, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny_qwen3", messages=ASK, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == \
        (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens)
    assert all(c.usage is None and c.choices for c in chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == whole.choices[0].message.content

    text = list(client.completions.create(model="tiny_qwen3", prompt="The sea is", max_tokens=5, temperature=0,
                                          stream=True, stream_options={"include_usage": True}))
    assert text[-1].choices == [] and text[-1].usage.completion_tokens == 5
    plain = list(client.chat.completions.create(model="tiny_qwen3", messages=ASK, max_tokens=3, stream=True))
    assert all(c.choices and c.usage is None for c in plain)                # not asked for: no usage chunk
    assert "stream is true" in _refused(client, "stream_options", stream_options={"include_usage": True})


@pytest.mark.slow
def test_a_seed_makes_sampling_repeatable_whatever_ran_between(each_client):
    client = each_client
    kw = dict(max_tokens=8, temperature=1.0, top_p=1.0)
    first = _ask(client, seed=1234, **kw)
    _ask(client, **kw)                                                      # unseeded draws in between
    client.completions.create(model="tiny_qwen3", prompt="The sea is", max_tokens=5, temperature=1.0, seed=7)
    assert _ask(client, seed=1234, **kw) == first
    streamed = client.chat.completions.create(model="tiny_qwen3", messages=ASK, seed=1234, stream=True, **kw)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == first
    assert _ask(client, seed=4321, **kw) != first
    _refused(client, "seed", seed="abc")


@pytest.mark.slow
def test_response_format_json_is_400_naming_it(client):
    assert "json_object" in _refused(client, "response_format", response_format={"type": "json_object"})
    _refused(client, "response_format", response_format={"type": "json_schema",
                                                         "json_schema": {"name": "x", "schema": {"type": "object"}}})
    assert _ask(client, max_tokens=2, temperature=0, response_format={"type": "text"})


@pytest.mark.slow
def test_logit_bias_and_penalties_shape_the_tokens(each_client, tok):
    client = each_client
    ids = {c: tok.encode(c, add_special_tokens=False)[0] for c in "ABCD"}
    a, b = ids["A"], ids["B"]
    # +10 is far above the random model's own logits, which favour the token just written by about 1.2 (tied
    # embeddings): alone, the bias gives one letter repeated
    four = {str(ids[c]): 10 for c in "ABCD"}
    alone = _ask(client, max_tokens=4, temperature=0, logit_bias=four)
    assert len(set(alone)) == 1 and alone[0] in "ABCD", alone
    banned = _ask(client, max_tokens=4, temperature=0, logit_bias={**four, str(ids[alone[0]]): -100})
    assert len(banned) == 4 and set(banned) <= set("ABCD") - {alone[0]}, banned
    # presence: a letter once written loses 2, more than its echo: all four letters, each once
    assert sorted(_ask(client, max_tokens=4, temperature=0, logit_bias=four, presence_penalty=2)) == list("ABCD")
    # frequency: 2 for each time written: A and B take turns enough to stay level (presence alone would not)
    two = {str(a): 10, str(b): 10}
    level = _ask(client, max_tokens=6, temperature=0, logit_bias=two, frequency_penalty=2)
    assert sorted(level) == list("AAABBB"), level
    assert sorted(_ask(client, max_tokens=6, temperature=0, logit_bias=two, presence_penalty=2)) != list("AAABBB")
    assert client.completions.create(model="tiny_qwen3", prompt="The sea is", max_tokens=3, temperature=0,
                                     logit_bias={str(b): 50}).choices[0].text == "BBB"

    assert "-100" in _refused(client, "logit_bias", logit_bias={str(a): 101})
    _refused(client, "logit_bias", logit_bias={"A": 1})
    assert "vocabulary" in _refused(client, "logit_bias", logit_bias={"99999999": 1})
    _refused(client, "presence_penalty", presence_penalty=2.5)
    _refused(client, "frequency_penalty", frequency_penalty=-3)


@pytest.mark.slow
def test_a_stop_string_across_pieces_is_cut_exactly_before_it(client):
    kw = dict(max_tokens=16, temperature=1.0, seed=5)       # greedy, the random model writes only newlines
    pieces = [c.choices[0].delta.content for c in client.chat.completions.create(
        model="tiny_qwen3", messages=ASK, stream=True, **kw) if c.choices and c.choices[0].delta.content]
    whole = "".join(pieces)
    k = next(i for i in range(1, len(pieces) - 1) if pieces[i].strip() and pieces[i + 1].strip())
    stop = pieces[k][-2:] + pieces[k + 1][:2]                            # the end of one piece, the start of the next
    before = whole[:whole.find(stop)]
    assert stop not in before and before != whole

    r = client.chat.completions.create(model="tiny_qwen3", messages=ASK, stop=[stop], **kw)
    assert r.choices[0].message.content == before and r.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model="tiny_qwen3", messages=ASK, stop=stop, stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == before
    assert chunks[-1].choices[0].finish_reason == "stop"
    # a stop that starts like the text but never completes: the text held back for it comes out in the end
    never = pieces[k][-2:] + "\x00never"
    assert _ask(client, stop=[never], **kw) == whole
    streamed = client.chat.completions.create(model="tiny_qwen3", messages=ASK, stop=[never], stream=True, **kw)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == whole
