"""Other tools' dataset layouts as their own docs write them (LLaMA-Factory's data/README.md, ms-swift's
Custom-dataset and Agent docs, TRL's dataset formats), tool calling through Qwen3's template, and multi-turn reasoning.
Prepare-level: the dry run's reading (qtune.data.prepare.preview) shows what is trained; a few full prepares check
the stats."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import qtune_warm
from qtune.config.schema import DataConfig
from qtune.data import prepare as dp
from qtune.errors import DataError
from qtune.stages import get

IM_END = "<|im_end|>"
EMPTY_THINK = "<think>\n\n</think>\n\n"
WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' + IM_END


def write(path: Path, value) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in value))
    else:
        path.write_text(json.dumps(value, indent=2))
    return path


def cfg(tmp_path, **kw) -> DataConfig:
    kw.setdefault("val_size", 0.0)
    kw.setdefault("packing", False)
    return DataConfig(cache_dir=str(tmp_path / "cache"), **kw)


def read(tmp_path, tok, stage="sft", n=10, **kw):
    """What the dry run shows: per example (where, layout, trained spans, the whole text)."""
    shown = dp.preview(cfg(tmp_path, **kw), tok, "q", None, get(stage).data, n=n)[0]
    return [(where, fmt, [s for s, t in segs if t], "".join(s for s, _ in segs)) for where, fmt, segs in shown]


def info(tmp_path, entries: dict, files: dict) -> str:
    for name, records in files.items():
        write(tmp_path / name, records)
    return str(write(tmp_path / "dataset_info.json", entries))


# ---------------------------------------------------------------- LLaMA-Factory (data/README.md)

def test_llamafactory_alpaca_sft_and_preference_and_kto(tmp_path, qwen3_tokenizer):
    path = info(tmp_path, {
        "sft": {"file_name": "sft.json", "columns": {"prompt": "instruction", "query": "input", "response": "output",
                                                     "system": "system", "history": "history"}},
        "pairs": {"file_name": "pairs.json", "ranking": True,
                  "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"}},
        "kto": {"file_name": "kto.json", "columns": {"prompt": "instruction", "query": "input", "response": "output",
                                                     "kto_tag": "kto_tag"}},
    }, {
        "sft.json": [{"instruction": "Translate", "input": "cat", "output": "chat", "system": "You translate.",
                      "history": [["Hi", "Hello"]]}],
        "pairs.json": [{"instruction": "Capital of Peru?", "input": "One word.", "chosen": "Lima.", "rejected": "Cusco."}],
        "kto.json": [{"instruction": "Sky colour?", "input": "", "output": "Blue.", "kto_tag": True},
                     {"instruction": "Grass colour?", "input": "", "output": "Red.", "kto_tag": False}],
    })
    ((_, layout, trained, text),) = read(tmp_path, qwen3_tokenizer, dataset_info=path, dataset="sft")
    assert layout == "sft: LLaMA-Factory alpaca sft"
    assert "<|im_start|>system\nYou translate." in text and "<|im_start|>user\nTranslate\ncat" in text  # instruction\ninput
    assert trained == ["Hello" + IM_END, EMPTY_THINK + "chat" + IM_END]   # the history's answers are learned too
    ((_, layout, trained, text),) = read(tmp_path, qwen3_tokenizer, "dpo", dataset_info=path, dataset="pairs")
    assert layout == "pairs: LLaMA-Factory alpaca ranking" and "Capital of Peru?\nOne word." in text
    assert [t.removeprefix(EMPTY_THINK) for t in trained] == ["Lima." + IM_END, "Cusco." + IM_END]
    shown = read(tmp_path, qwen3_tokenizer, "kto", dataset_info=path, dataset="kto")
    assert [(s[1], s[3].split("[")[-1].split("]")[0]) for s in shown] == [("kto: LLaMA-Factory alpaca kto", "desirable"),
                                                                           ("kto: LLaMA-Factory alpaca kto", "undesirable")]


def test_llamafactory_sharegpt_preference_tools_and_openai_tags(tmp_path, qwen3_tokenizer):
    path = info(tmp_path, {
        "pairs": {"file_name": "pairs.json", "formatting": "sharegpt", "ranking": True,
                  "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
        "tools": {"file_name": "tools.json", "formatting": "sharegpt",
                  "columns": {"messages": "conversations", "system": "system", "tools": "tools"}},
        "skto": {"file_name": "skto.json", "formatting": "sharegpt",
                 "columns": {"messages": "conversations", "kto_tag": "kto_tag"}},
        "openai": {"file_name": "openai.json", "formatting": "sharegpt", "columns": {"messages": "messages"},
                   "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                            "assistant_tag": "assistant", "system_tag": "system"}},
    }, {
        "pairs.json": [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
                                          {"from": "human", "value": "Capital of Peru?"}],
                        "chosen": {"from": "gpt", "value": "Lima."}, "rejected": {"from": "gpt", "value": "Cusco."}}],
        "tools.json": [{"conversations": [{"from": "human", "value": "Weather in Paris?"},
                                          {"from": "function_call", "value": json.dumps({"name": "get_weather",
                                                                                         "arguments": {"city": "Paris"}})},
                                          {"from": "observation", "value": "22C"},
                                          {"from": "gpt", "value": "It is 22C."}],
                        "system": "Be brief.", "tools": json.dumps([WEATHER])}],
        "skto.json": [{"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "5"}],
                       "kto_tag": False}],
        "openai.json": [{"messages": [{"role": "system", "content": "S."}, {"role": "user", "content": "2+2?"},
                                      {"role": "assistant", "content": "4"}]}],
    })
    ((_, layout, trained, text),) = read(tmp_path, qwen3_tokenizer, "dpo", dataset_info=path, dataset="pairs")
    assert layout == "pairs: LLaMA-Factory sharegpt ranking" and "<|im_start|>user\nCapital of Peru?" in text
    assert [t.removeprefix(EMPTY_THINK) for t in trained] == ["Lima." + IM_END, "Cusco." + IM_END]
    ((_, layout, trained, text),) = read(tmp_path, qwen3_tokenizer, dataset_info=path, dataset="tools")
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n") and '"name": "get_weather"' in text
    assert trained == [CALL, EMPTY_THINK + "It is 22C." + IM_END]       # the call is trained, its result is not
    assert "<|im_start|>user\n<tool_response>\n22C\n</tool_response>" + IM_END in text
    ((_, layout, trained, text),) = read(tmp_path, qwen3_tokenizer, "kto", dataset_info=path, dataset="skto")
    assert layout == "skto: LLaMA-Factory sharegpt kto" and "[undesirable]" in text
    assert [t.removeprefix(EMPTY_THINK) for t in trained] == ["5" + IM_END]
    ((_, layout, trained, text),) = read(tmp_path, qwen3_tokenizer, dataset_info=path, dataset="openai")
    assert layout == "openai: LLaMA-Factory sharegpt sft" and trained == [EMPTY_THINK + "4" + IM_END]
    assert text.startswith("<|im_start|>system\nS.<|im_end|>")


def test_llamafactory_two_datasets_one_mix_with_stats(tmp_path, qwen3_tokenizer):
    path = info(tmp_path, {"a": {"file_name": "a.json"}, "b": {"file_name": "b.jsonl", "formatting": "sharegpt"}}, {
        "a.json": [{"instruction": f"q{i}", "output": "a"} for i in range(3)],
        "b.jsonl": [{"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]}]})
    res = dp.prepare(cfg(tmp_path, dataset_info=path, dataset="a,b"), qwen3_tokenizer, "q", None, get("sft").data)
    per = res.stats["train"]["per_source"]
    assert [(Path(p["source"]).name, p["formats"]) for p in per] == [
        ("a.json", {"a: LLaMA-Factory alpaca sft": 3}), ("b.jsonl", {"b: LLaMA-Factory sharegpt sft": 1})]


LF_BAD = [
    ({"dataset": "c"}, "data.dataset=c: no such dataset in {info}; valid: a, p"),
    ({"dataset": "a", "stage": "sft", "entry": {"columns": {"prompt": "question"}}},
     "a.json:2: dataset 'a' of {info} maps columns.prompt to field 'question', which this record lacks (its fields: "
     "instruction, output)"),
    ({"dataset": "p"}, "p.json:2: dataset 'p' of {info} is a ranking dataset (ranking: true, preference pairs): it "
     "trains with train.stage=dpo, rm or kto, not sft"),
    ({"dataset": "a", "stage": "dpo"}, "a.json:2: dataset 'a' of {info} is not a ranking dataset"),
]


@pytest.mark.parametrize("case, message", LF_BAD, ids=["unknown name", "missing column", "ranking for sft", "sft for dpo"])
def test_llamafactory_mistakes_are_one_line(tmp_path, qwen3_tokenizer, case, message):
    entries = {"a": {"file_name": "a.json", **case.get("entry", {})}, "p": {"file_name": "p.json", "ranking": True}}
    path = info(tmp_path, entries, {"a.json": [{"instruction": "q", "output": "a"}],
                                    "p.json": [{"instruction": "q", "chosen": "a", "rejected": "b"}]})
    with pytest.raises(DataError) as e:
        dp.prepare(cfg(tmp_path, dataset_info=path, dataset=case["dataset"]), qwen3_tokenizer, "q", None,
                   get(case.get("stage", "sft")).data)
    assert str(e.value).endswith(message.format(info=path)) or message.format(info=path) in str(e.value), str(e.value)


# ---------------------------------------------------------------- ms-swift (Custom-dataset.md, Agent-support.md)

def test_swift_preference_kto_and_agent_layouts(tmp_path, qwen3_tokenizer):
    chat = [{"role": "system", "content": "You are a useful and harmless assistant"},
            {"role": "user", "content": "Tell me tomorrow's weather"},
            {"role": "assistant", "content": "Tomorrow's weather will be sunny"}]
    write(tmp_path / "dpo.jsonl", [{"messages": chat, "rejected_response": "I don't know"},
                                   {"messages": chat, "rejected_response": [{"role": "assistant", "content": "No."}]}])
    shown = read(tmp_path, qwen3_tokenizer, "dpo", path=str(tmp_path / "dpo.jsonl"))
    assert [s[1] for s in shown] == ["swift_preference"] * 2
    assert [[t.removeprefix(EMPTY_THINK) for t in s[2]] for s in shown] == [
        ["Tomorrow's weather will be sunny" + IM_END, "I don't know" + IM_END],
        ["Tomorrow's weather will be sunny" + IM_END, "No." + IM_END]]
    with pytest.raises(DataError, match="this record is swift_preference .*, which train.stage=dpo or rm or kto trains on"):
        read(tmp_path, qwen3_tokenizer, path=str(tmp_path / "dpo.jsonl"))
    write(tmp_path / "kto.jsonl", [{"messages": chat, "label": False}])
    ((_, layout, trained, text),) = read(tmp_path, qwen3_tokenizer, "kto", path=str(tmp_path / "kto.jsonl"))
    assert layout == "swift_kto" and "[undesirable]" in text
    ((_, layout, trained, _),) = read(tmp_path, qwen3_tokenizer, path=str(tmp_path / "kto.jsonl"))
    assert layout == "messages" and len(trained) == 1                  # sft reads the conversation, as ms-swift does
    agent = {"tools": json.dumps([{"type": "function", "function": WEATHER}]),
             "messages": [{"role": "user", "content": "Weather in Paris?"},
                          {"role": "assistant", "content": "Let me look."},
                          {"role": "tool_call", "content": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
                          {"role": "tool_response", "content": "{\"temp\": 22}"},
                          {"role": "assistant", "content": "It is 22C."}]}
    write(tmp_path / "agent.jsonl", [agent])
    ((_, layout, trained, text),) = read(tmp_path, qwen3_tokenizer, path=str(tmp_path / "agent.jsonl"))
    assert trained == ["Let me look.\n" + CALL, EMPTY_THINK + "It is 22C." + IM_END]  # the words, then the call
    assert "<tool_response>\n{\"temp\": 22}\n</tool_response>" in text
    pair = {"tools": agent["tools"], "messages": agent["messages"][:1] + [{"role": "assistant", "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}],
            "rejected_response": "I cannot look that up."}
    write(tmp_path / "pair.jsonl", [pair])
    ((_, layout, trained, text),) = read(tmp_path, qwen3_tokenizer, "dpo", path=str(tmp_path / "pair.jsonl"))
    assert text.startswith("<|im_start|>system\n# Tools\n") and trained[0].removeprefix(EMPTY_THINK) == CALL


# ---------------------------------------------------------------- TRL

def test_trl_implicit_prompt_and_unpaired(tmp_path, qwen3_tokenizer):
    user = {"role": "user", "content": "What color is the sky?"}
    write(tmp_path / "d.jsonl", [{"chosen": [user, {"role": "assistant", "content": "It is blue."}],
                                  "rejected": [user, {"role": "assistant", "content": "It is green."}]}])
    ((_, layout, trained, text),) = read(tmp_path, qwen3_tokenizer, "dpo", path=str(tmp_path / "d.jsonl"),
                                         format="implicit_preference")             # named, as detected
    assert read(tmp_path, qwen3_tokenizer, "dpo", path=str(tmp_path / "d.jsonl"))[0][1] == layout
    assert layout == "implicit_preference" and text.startswith("<|im_start|>user\nWhat color is the sky?<|im_end|>\n"
                                                               "<|im_start|>assistant\n\n[chosen]")
    assert [t.removeprefix(EMPTY_THINK) for t in trained] == ["It is blue." + IM_END, "It is green." + IM_END]
    write(tmp_path / "k.jsonl", [{"prompt": [user], "completion": [{"role": "assistant", "content": "Blue."}],
                                  "label": True}])
    ((_, layout, trained, _),) = read(tmp_path, qwen3_tokenizer, "kto", path=str(tmp_path / "k.jsonl"))
    assert layout == "kto" and [t.removeprefix(EMPTY_THINK) for t in trained] == ["Blue." + IM_END]
    write(tmp_path / "e.jsonl", [{"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                                  "rejected": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}])
    with pytest.raises(DataError, match="e.jsonl:1: 'chosen' and 'rejected' share no user turn"):
        read(tmp_path, qwen3_tokenizer, "dpo", path=str(tmp_path / "e.jsonl"))


# ---------------------------------------------------------------- OpenAI tool calls through Qwen3's template

def openai_record(arguments, name="get_weather", tools=(WEATHER,)):
    return {"messages": [{"role": "user", "content": "Weather in Paris?"},
                         {"role": "assistant", "content": None, "tool_calls": [
                             {"id": "c1", "type": "function", "function": {"name": name, "arguments": arguments}}]},
                         {"role": "tool", "tool_call_id": "c1", "content": "22C"},
                         {"role": "assistant", "content": "It is 22C."}],
            "tools": [{"type": "function", "function": t} for t in tools]}


def test_openai_tool_calls_render_as_qwen3_does_and_train_the_calls(tmp_path, qwen3_tokenizer):
    write(tmp_path / "d.jsonl", [openai_record('{"city": "Paris"}'), openai_record({"city": "Paris"})])
    shown = read(tmp_path, qwen3_tokenizer, path=str(tmp_path / "d.jsonl"))
    rec = openai_record({"city": "Paris"})
    expected = qwen3_tokenizer.apply_chat_template(rec["messages"], tools=rec["tools"], tokenize=False)
    assert CALL in expected and "<tools>" in expected                         # the tokenizer's own Qwen3 template
    for _, layout, trained, text in shown:                                     # arguments as text or as an object
        assert layout == "messages" and text == expected
        assert trained == [CALL, EMPTY_THINK + "It is 22C." + IM_END]


def test_a_template_without_tool_calls_is_refused_not_trained_without_them(tmp_path, qwen3_tokenizer):
    write(tmp_path / "d.jsonl", [openai_record({"city": "Paris"})])
    with pytest.raises(DataError, match="d.jsonl:1: the chat template does not render tool calls or tools"):
        dp.preview(cfg(tmp_path, path=str(tmp_path / "d.jsonl")), qwen3_tokenizer, "q", "chatml", get("sft").data)


TOOL_BAD = [
    (openai_record('{"city": Paris}'), "d.jsonl:2: messages[1].tool_calls[0]: the arguments of the call to "
     "'get_weather' are not JSON (Expecting value at column 10)"),
    (openai_record('{"city": "Paris"}', name="get_time"), "d.jsonl:2: message 1: tool_calls[0] calls 'get_time', "
     "which is not in the record's tools (get_weather)"),
    (openai_record('["Paris"]'), "d.jsonl:2: messages[1].tool_calls[0]: the arguments of the call to 'get_weather' "
     "must be a JSON object, got list"),
    ({**openai_record({}), "tools": "[{\"name\": "}, "d.jsonl:2: field 'tools' is not JSON"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "function_call", "value": "get_weather(Paris)"},
                        {"from": "observation", "value": "x"}, {"from": "gpt", "value": "b"}]},
     "d.jsonl:2: conversations[1]: a tool call must be JSON like"),
]


@pytest.mark.parametrize("record, message", TOOL_BAD, ids=["args not JSON", "unknown tool", "args a list",
                                                            "tools not JSON", "sharegpt call not JSON"])
def test_malformed_tool_calls_are_one_line_naming_file_and_line(tmp_path, qwen3_tokenizer, record, message):
    write(tmp_path / "d.jsonl", [openai_record({"city": "Paris"}), record])
    with pytest.raises(DataError) as e:
        read(tmp_path, qwen3_tokenizer, path=str(tmp_path / "d.jsonl"))
    assert str(e.value).startswith(str(tmp_path / message)), str(e.value)


# ---------------------------------------------------------------- multi-turn reasoning

TWO_TURNS = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "reasoning_content": "old"},
                          {"role": "user", "content": "c"}, {"role": "assistant", "content": "d", "reasoning_content": "new"}]}
OLD, NEW = "<think>\nold\n</think>\n\nb" + IM_END, "<think>\nnew\n</think>\n\nd" + IM_END


@pytest.mark.parametrize("mode, expected", [
    ("split", [("d.jsonl:1 (turn 1)", [OLD], False), ("d.jsonl:1 (turn 2)", [NEW], False)]),
    ("last", [("d.jsonl:1", ["b" + IM_END, NEW], False)]),
    ("keep", [("d.jsonl:1", [OLD, NEW], True)]),
])
def test_multi_turn_thinking(tmp_path, qwen3_tokenizer, mode, expected):
    write(tmp_path / "d.jsonl", [TWO_TURNS])
    shown = read(tmp_path, qwen3_tokenizer, path=str(tmp_path / "d.jsonl"), multi_turn_thinking=mode)
    assert [(Path(w).name, trained, "old" in text.split("<|im_start|>user\nc")[0] and "<think>\nold" in text
             and len(trained) == 2) for w, _, trained, text in shown] == expected
    if mode == "split":  # the second round's history is what inference shows: no reasoning in the first answer
        assert shown[1][3] == qwen3_tokenizer.apply_chat_template(TWO_TURNS["messages"], tokenize=False)


def test_ignore_empty_think_and_thinking_counts(tmp_path, qwen3_tokenizer):
    write(tmp_path / "d.jsonl", [{"input": "ping", "output": "pong"}, TWO_TURNS,
                                 {"messages": [{"role": "user", "content": "x"},
                                               {"role": "assistant", "content": "<think>\n\n</think>\n\ny"}]}])
    shown = read(tmp_path, qwen3_tokenizer, path=str(tmp_path / "d.jsonl"), ignore_empty_think=True)
    assert [s[2] for s in shown] == [["pong" + IM_END], [OLD], [NEW], ["y" + IM_END]]
    assert EMPTY_THINK + "pong" in shown[0][3]                     # rendered, as context
    assert read(tmp_path, qwen3_tokenizer, path=str(tmp_path / "d.jsonl"))[0][2] == [EMPTY_THINK + "pong" + IM_END]
    res = dp.prepare(cfg(tmp_path, path=str(tmp_path / "d.jsonl"), ignore_empty_think=True), qwen3_tokenizer, "q",
                     None, get("sft").data)
    s = res.stats["train"]
    assert (s["examples"], s["thinking"], s["non_thinking"]) == (4, 2, 2)
    assert s["trainable_tokens"] == sum(len(qwen3_tokenizer(t)["input_ids"]) for t in ["pong" + IM_END, OLD, NEW,
                                                                                         "y" + IM_END])


def test_ignore_empty_think_moves_a_pairs_shared_empty_block_into_its_prompt(tmp_path, qwen3_tokenizer):
    """dpo and kto score the answer tokens only: an empty <think></think> opening both answers becomes the prompt's end
    (context); a pair where one answer has none keeps both as they are; rm scores whole sequences and is unchanged."""
    q = [{"role": "user", "content": "2+2?"}]
    both = {"prompt": q, "chosen": [{"role": "assistant", "content": "<think>\n\n</think>\n\n4"}],
            "rejected": [{"role": "assistant", "content": "<think>\n\n</think>\n\n5"}]}
    # (Qwen3's template writes an empty block before a plain last answer itself: a reasoned one differs)
    one = {"prompt": q, "chosen": [{"role": "assistant", "content": "4"}],
           "rejected": [{"role": "assistant", "content": "<think>\nfour? five.\n</think>\n\n5"}]}
    path = write(tmp_path / "p.jsonl", [both, one])

    dec = qwen3_tokenizer.decode

    def rows(stage, **kw):  # in the file's order (prepare shuffles): the reasoned pair second
        res = dp.prepare(cfg(tmp_path, path=str(path), **kw), qwen3_tokenizer, "q", None, get(stage).data)
        return sorted(res.load("train"), key=lambda r: "four?" in dec(r.get("rejected_ids") or []))

    plain, ignored = rows("dpo"), rows("dpo", ignore_empty_think=True)
    assert dec(plain[0]["chosen_ids"]).startswith("<think>") and not dec(plain[0]["prompt_ids"]).endswith(EMPTY_THINK)
    assert dec(ignored[0]["prompt_ids"]).endswith(EMPTY_THINK)
    assert (dec(ignored[0]["chosen_ids"]), dec(ignored[0]["rejected_ids"])) == ("4" + IM_END, "5" + IM_END)
    assert ignored[1] == plain[1]                       # one answer reasons: the pair stays as it was
    assert rows("rm", ignore_empty_think=True) == rows("rm")


# ---------------------------------------------------------------- the dry run names the layout

def test_dry_run_shows_which_layout_read_a_record(tmp_path, tiny_qwen3):
    path = info(tmp_path, {"calls": {"file_name": "c.json", "formatting": "sharegpt",
                                     "columns": {"messages": "conversations", "tools": "tools"}}},
                {"c.json": [{"conversations": [{"from": "human", "value": "Weather in Paris?"},
                                               {"from": "function_call", "value": json.dumps(
                                                   {"name": "get_weather", "arguments": {"city": "Paris"}})},
                                               {"from": "observation", "value": "22C"},
                                               {"from": "gpt", "value": "It is 22C."}], "tools": json.dumps([WEATHER])}]})
    p = qtune_warm("prepare", "--dry-run", "model=tiny_qwen3", f"data.dataset_info={path}", "data.dataset=calls",
                   f"data.cache_dir={tmp_path / 'cache'}", env={"NO_COLOR": "1", "COLUMNS": "200"})
    assert p.returncode == 0, p.stderr
    assert "c.json:2 (calls: LLaMA-Factory sharegpt sft)" in p.stdout
    assert '⟦<tool_call>' in p.stdout and "⟦<tool_response>" not in p.stdout


def test_split_keeps_a_rounds_tool_calls_together_and_trains_each_round_once(tmp_path, qwen3_tokenizer):
    rec = openai_record({"city": "Paris"})
    rec["messages"][-1]["reasoning_content"] = "Easy."
    rec["messages"] += [{"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "You are welcome."}]
    write(tmp_path / "d.jsonl", [rec])
    first, second = read(tmp_path, qwen3_tokenizer, path=str(tmp_path / "d.jsonl"))
    assert first[2] == [CALL, "<think>\nEasy.\n</think>\n\nIt is 22C." + IM_END]     # the call and the answer of round 1
    assert second[2] == [EMPTY_THINK + "You are welcome." + IM_END]                   # round 2 only
    assert "Easy." not in second[3] and second[3] == qwen3_tokenizer.apply_chat_template(
        rec["messages"], tools=rec["tools"], tokenize=False)                          # the history inference shows
