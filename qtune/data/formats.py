"""Read data files and normalize every record to chat messages.

Accepted layouts (detected per record, overridable per source with `format=`):
  messages           {"messages": [{"role", "content", "reasoning_content"?}]}  (OpenAI style)
  sharegpt           {"conversations": [{"from": human|gpt|system|..., "value"}], "system"?}
  alpaca             {"instruction", "input"?, "output", "system"?, "history"?: [[q, a], ...]}
  input_output       {"input", "output"}
  query_response     {"query", "response", "history"?, "system"?}
  prompt_completion  {"prompt", "completion"}
  reasoning          a question, a thinking/reasoning field and an answer (rendered as Qwen3 <think> blocks)
  text               {"text"}: plain text for continued pre-training (no template, every token trained)
Preference records (train.stage=dpo|kto|rm; qtune.data.preference normalizes them):
  preference           {"prompt" | "messages", "chosen", "rejected"}: strings or message lists
  implicit_preference  {"chosen": [messages], "rejected": [messages]}: the prompt is what both share (TRL)
  sharegpt_preference  {"conversations", "chosen": {"from", "value"}, "rejected": {...}} (as LLaMA-Factory writes them)
  swift_preference     {"messages", "rejected_response": a string or messages}: the last turn is chosen (ms-swift)
  kto                  {"prompt", "completion", "label": true|false}: strings or message lists (TRL)
  swift_kto            {"messages", "label": true|false}: the last turn is the answer (ms-swift)
LLaMA-Factory's dataset_info.json entries (columns, tags, ranking, kto_tag) are read by qtune.data.llamafactory,
which turns each record into one of these.
Prompt records (train.stage=grpo; qtune.data.prompts reads them):
  prompts              {"prompt" | "question", ...}: the prompt, and fields for the reward functions (e.g. "answer")
Which formats a stage trains on: the family its `Trains` names (FAMILIES). Every error names `file:line` and the
field.
Tool calling: OpenAI tool_calls on assistant messages (function.name, arguments as a JSON string or object) and
`tool` messages, ms-swift's tool_call / tool_response turns, LLaMA-Factory's function_call / observation turns, and a
record's `tools` (a list of JSON schemas, or that list as a JSON string) all become OpenAI-style messages and tools,
which the chat template renders (Qwen3: the tools system prompt, <tool_call> blocks, <tool_response> user turns).
Arguments that are not a JSON object, or a call to a tool the record's `tools` does not list, fail in one line.
"""
from __future__ import annotations

import codecs
import csv
import glob
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from qtune.errors import DataError
from qtune.io import EXTENSIONS

LM_FORMATS = ("messages", "sharegpt", "alpaca", "input_output", "query_response", "prompt_completion", "reasoning", "text")
PAIR_FORMATS = ("preference", "implicit_preference", "sharegpt_preference", "swift_preference")
KTO_FORMATS = ("kto", "swift_kto")
FORMATS = LM_FORMATS + PAIR_FORMATS + KTO_FORMATS + ("prompts",)

# The formats a stage's records may take, by the family name a stage declares (qtune.stages: Trains.formats).
FAMILIES = {"text": ("text",), "lm": LM_FORMATS, "pairs": PAIR_FORMATS,
            "kto": KTO_FORMATS + PAIR_FORMATS,  # KTO splits a pair into a desirable and an undesirable answer
            "prompts": ("prompts",)}         # grpo: prompts and the fields its reward functions read
STAGES = {"text": ("pt",), "lm": ("sft",), "pairs": ("dpo", "rm"), "kto": ("kto",), "prompts": ("grpo",)}  # by family
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "bard": "assistant", "bing": "assistant", "model": "assistant", "system": "system"}
# Tool turns: a tool's result (OpenAI "tool", its older "function", ms-swift's "tool_response") and a call turn
# (ms-swift's "tool_call"); sharegpt's function_call / observation (LLaMA-Factory's tags) are the same two.
RESULT_ROLES = ("tool", "function", "tool_response")
SHAREGPT_CALL, SHAREGPT_RESULT = ("function_call",), ("observation", "function_response", "tool")
SHARE_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
              "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
THINK_KEYS = ("reasoning_content", "reasoning", "thinking", "thought", "cot", "chain_of_thought")
QUESTION_KEYS = ("question", "problem", "prompt", "instruction", "query", "input")
ANSWER_KEYS = ("answer", "response", "output", "solution", "completion")


@dataclass
class Record:
    data: dict
    where: str  # "file:line"


@dataclass
class Example:
    messages: list[dict] | None  # None for plain text; a preference record's prompt
    text: str | None
    format: str
    where: str
    chosen: list[dict] | None = None    # preference records: the preferred answer's turns (kto: the answer)
    rejected: list[dict] | None = None  # the other answer (pairs only)
    label: bool | None = None           # kto: whether the answer is desirable
    extra: dict | None = None           # prompts: the record's other fields (the reward functions' arguments)
    tools: list | None = None           # the record's tools (JSON schemas, OpenAI style), for the chat template
    train_from: int = 0                 # assistant turns before this one are context (data.multi_turn_thinking=split)


def expand(path: str) -> list[Path]:
    """A file, a glob or a folder -> the data files it names (sorted)."""
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix in EXTENSIONS and f.is_file())
    elif any(c in path for c in "*?["):
        files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).suffix in EXTENSIONS)
    elif p.is_file():
        files = [p]
    else:
        raise DataError(f"{path}: no such file, folder or glob match")
    if not files:
        raise DataError(f"{path}: no data files ({', '.join(EXTENSIONS)}) found")
    return files


# Byte-order marks, longest first (UTF-32 LE starts with UTF-16 LE's): a file with one is read in its encoding.
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
_SAVE_AS = "save it as UTF-8 (UTF-16 needs a byte-order mark)"


def sniff(path: Path) -> None:
    """Cheap checks on a data file's first and last bytes, before anything heavy loads: a binary file, text in an
    encoding qtune does not read, or a .parquet file that is not Parquet fails now in one line."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
        if path.suffix.lower() == ".parquet":
            size = f.seek(0, io.SEEK_END)
            f.seek(max(size - 4, 0))
            if size < 12 or head[:4] != b"PAR1" or f.read(4) != b"PAR1":
                raise DataError(f"{path}: not a Parquet file ({size:,} bytes, no PAR1 marker at its start and end)")
            return
    if path.suffix.lower() not in EXTENSIONS:
        raise DataError(f"{path}: unsupported file type {path.suffix.lower()!r}; use .jsonl, .json, .csv, .tsv or .parquet")
    _encoding(path, head, partial=True)


def _encoding(path: Path, head: bytes, partial: bool = False) -> str:
    """UTF-8 with or without a BOM, or UTF-16/32 with a BOM; anything else is a DataError naming the file."""
    for bom, encoding in _BOMS:
        if head.startswith(bom):
            return encoding
    if b"\0" in head:
        raise DataError(f"{path}: binary data (NUL bytes), not UTF-8 text; {_SAVE_AS}")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if not (partial and e.reason == "unexpected end of data"):  # a character cut by the end of the sample
            raise DataError(_not_utf8(path, head, e, 1)) from None
    return "utf-8"


def _not_utf8(path: Path, data: bytes, e: UnicodeDecodeError, line: int) -> str:
    line += data.count(b"\n", 0, e.start)
    column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
    return f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at column {column}); {_SAVE_AS}"


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    encoding = _encoding(path, data[:1 << 16], partial=True)
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        if encoding.startswith("utf-8"):
            raise DataError(_not_utf8(path, data, e, 1)) from None
        raise DataError(f"{path}: not valid {encoding.upper()} text ({e.reason} at byte {e.start:,}); {_SAVE_AS}") from None


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a JSONL file; UTF-8 is decoded line by line, so a bad byte names its line."""
    with open(path, "rb") as f:
        encoding = _encoding(path, f.read(1 << 16), partial=True)
        f.seek(0)
        if not encoding.startswith("utf-8"):
            yield from enumerate(_read_text(path).split("\n"), 1)   # not splitlines(): JSON strings may hold U+2028
            return
        for n, raw in enumerate(f, 1):
            try:
                yield n, raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(_not_utf8(path, raw, e, n)) from None


def read_records(path: Path, skip=None) -> Iterator[Record]:
    """The records of one file. `skip(where, error, text)` (data.on_error=skip): a JSONL line that is not JSON is
    handed to it (where = file:line:column) and reading goes on; without it the line is a DataError."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        for n, line in _lines(path):
            if not line.strip():
                continue
            try:
                obj = json.loads(line, object_pairs_hook=_unique_keys)
            except json.JSONDecodeError as e:  # colno counts from 1 on the line as read (a JSONL record is one line)
                error = f"malformed JSON ({e.msg} at column {e.colno})"
                if skip is None:
                    raise DataError(f"{path}:{n}: {error}") from None
                skip(f"{path}:{n}:{e.colno}", error, line.rstrip("\r\n"))
                continue
            except _DuplicateKey as e:
                if skip is None:
                    raise DataError(f"{path}:{n}: {e}") from None
                skip(f"{path}:{n}", str(e), line.rstrip("\r\n"))
                continue
            if _SURROGATE_ESCAPE.search(line):
                _check_surrogates(obj, line, path, n)
            yield _as_record(obj, f"{path}:{n}")
    elif suffix == ".json":
        yield from _read_json(path)
    elif suffix in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(_read_text(path), newline=""), delimiter="\t" if suffix == ".tsv" else ",")
        for row in reader:
            yield Record({k: v for k, v in row.items() if k is not None and v not in (None, "")},
                         f"{path}:{reader.line_num}")
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as e:
            why = re.sub(r"^Could not open Parquet input source '[^']*': ", "", str(e).splitlines()[0])
            raise DataError(f"{path}: not a readable Parquet file ({why})") from None
        for i, row in enumerate(table.to_pylist()):
            yield _as_record(row, f"{path}:row {i + 1}")
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json, .csv, .tsv or .parquet")


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list) -> dict:
    """json's object_pairs_hook: a key given twice in one object is an error (json keeps the last value silently)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _DuplicateKey(f"key {key!r} appears twice in one JSON object (only the last value would be kept); "
                            "keep one")
    return obj


# A \uD800-\uDFFF escape: half of a UTF-16 pair. JSON decodes a lone one into a str that no UTF-8 writer accepts.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_LONE_SURROGATE = re.compile(r"(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}"
                             r"|\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})")


def _check_surrogates(obj, text: str, path: Path, line: int) -> None:
    """A DataError naming the line, column and field when a string of obj (parsed from text, which starts at `line`
    of `path`) holds a lone surrogate."""
    def walk(value, name):
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                where, at = f"{path}:{line}", ""
                if m := _LONE_SURROGATE.search(text):
                    n, column = line + text.count("\n", 0, m.start()), m.start() - text.rfind("\n", 0, m.start())
                    where, at = f"{path}:{n}", f" at column {column}"
                char = f"\\u{ord(value[e.start]):04x}"
                raise DataError(f"{where}: field '{name}' holds a lone surrogate {char}{at}, half of a UTF-16 pair and "
                                "not a character; fix or remove that escape") from None
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(k, f"{name} (a key)")
                walk(v, f"{name}.{k}" if name else k)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{name}[{i}]")
    walk(obj, "")


def _as_record(obj, where: str) -> Record:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object per record, got {type(obj).__name__}")
    return Record(obj, where)


def _read_json(path: Path) -> Iterator[Record]:
    text = _read_text(path)
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys)
        duplicate = None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    except _DuplicateKey as e:  # found again below, record by record, to name its line
        data, duplicate = json.loads(text), e
    surrogates = _SURROGATE_ESCAPE.search(text) is not None
    if isinstance(data, dict):  # {"data": [...]} / {"train": [...]} wrappers
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1:
            data = lists[0]
        else:
            if duplicate:
                raise DataError(f"{path}:1: {duplicate}")
            if surrogates:
                _check_surrogates(data, text, path, 1)
            yield _as_record(data, f"{path}:1")
            return
    if not isinstance(data, list):
        raise DataError(f"{path}:1: expected a list of records")
    # Line numbers of top-level records, for error messages.
    decoder, lines, idx = json.JSONDecoder(object_pairs_hook=_unique_keys), [], text.index("[") + 1
    line, counted = 1, 0
    for _ in data:
        while text[idx] in " \t\r\n,":
            idx += 1
        line, counted = line + text.count("\n", counted, idx), idx  # (counted on from the last record: linear)
        lines.append(line)
        start = idx
        try:
            _, idx = decoder.raw_decode(text, idx)
        except _DuplicateKey as e:
            raise DataError(f"{path}:{lines[-1]}: {e}") from None
        if surrogates:
            _check_surrogates(data[len(lines) - 1], text[start:idx], path, lines[-1])
    if duplicate:  # in the wrapper, not in a record
        raise DataError(f"{path}:1: {duplicate}")
    for obj, line in zip(data, lines):
        yield _as_record(obj, f"{path}:{line}")


def detect(rec: dict) -> str | None:
    keys = set(rec)
    if {"chosen", "rejected"} <= keys:
        conv = rec.get("conversations")
        first = conv[0] if isinstance(conv, list) and conv else {}
        if isinstance(first, dict) and "from" in first:
            return "sharegpt_preference"
        if not keys & {"prompt", "messages", "conversations"} and all(isinstance(rec[k], list) for k in ("chosen", "rejected")):
            return "implicit_preference"
        return "preference"
    if {"prompt", "completion", "label"} <= keys:
        return "kto"
    if "messages" in keys and "rejected_response" in keys:
        return "swift_preference"
    if "messages" in keys and isinstance(rec.get("label"), bool):
        return "swift_kto"
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        conv = rec["conversations"]
        first = conv[0] if isinstance(conv, list) and conv else {}
        return "sharegpt" if isinstance(first, dict) and "from" in first else "messages"
    if keys & set(THINK_KEYS) and keys & set(QUESTION_KEYS) and keys & set(ANSWER_KEYS):
        return "reasoning"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "query" in keys and "response" in keys:
        return "query_response"
    if "prompt" in keys and "completion" in keys:
        return "prompt_completion"
    if "input" in keys and "output" in keys:
        return "input_output"
    if "text" in keys:
        return "text"
    return None


def resolve(rec: Record, fmt: str, trains) -> str:
    """The record's format (`fmt`, or detected where it is auto), checked against what the stage trains on (`trains`,
    a qtune.stages.base.Trains). An LM format then becomes an Example through lm_example; a preference format through
    qtune.data.preference.normalize_preference, which builds on this module's readers."""
    data, where = rec.data, rec.where
    allowed = FAMILIES[trains.formats]
    if fmt == "auto" and allowed == ("prompts",):  # any record may be a prompt: qtune.data.prompts checks its fields
        fmt = "prompts"
    if fmt == "auto":
        fmt = detect(data)
        if fmt is None:
            raise DataError(f"{where}: record of no known format (keys: {', '.join(sorted(data)) or 'none'}); "
                            f"expected one of: {', '.join(allowed)}")
        if fmt == "swift_kto" and "messages" in allowed:  # (a conversation with a label: sft reads its messages)
            fmt = "messages"
    elif fmt not in FORMATS:
        raise DataError(f"format={fmt!r} is not a known format; valid: auto, {', '.join(FORMATS)}")
    if fmt not in allowed:
        fits = [s for family, stages in STAGES.items() if fmt in FAMILIES[family] for s in stages]
        raise DataError(f"{where}: train.stage={trains.stage} trains on {trains.describes}; this record is {fmt} "
                        f"(keys: {', '.join(sorted(data))})" + (f", which train.stage={' or '.join(fits)} trains on"
                                                                 if fits else ""))
    return fmt


def lm_example(data: dict, fmt: str, where: str) -> Example:
    """A record of an LM format (LM_FORMATS) as an Example: raw text, or chat messages."""
    if fmt == "text":
        return Example(None, _text(data, "text", where), fmt, where)
    messages = _TO_MESSAGES[fmt](data, where)
    _check_messages(messages, where)
    tools = record_tools(data, where)
    check_calls(messages, tools, where)
    return Example(messages, None, fmt, where, tools=tools)


def _text(data: dict, key: str, where: str, required: bool = True) -> str | None:
    if key not in data or data[key] is None:
        if required:
            raise DataError(f"{where}: field '{key}' missing")
        return None
    value = data[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise DataError(f"{where}: field '{key}' is empty")
    return value


def system_messages(data: dict, where: str) -> list[dict]:
    s = _text(data, "system", where, required=False)
    return [{"role": "system", "content": s}] if s else []


def _history(data: dict, where: str) -> list[dict]:
    hist = data.get("history") or []
    if not isinstance(hist, list):
        raise DataError(f"{where}: field 'history' must be a list of [question, answer] pairs")
    out = []
    for i, pair in enumerate(hist):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise DataError(f"{where}: history[{i}] must be a [question, answer] pair of strings")
        out += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return out


def messages_of(data: dict, where: str, key: str | None = None) -> list[dict]:
    key = key or ("messages" if "messages" in data else "conversations")
    msgs = data.get(key)
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: field '{key}' must be a non-empty list of messages")
    out = system_messages(data, where) if not any(isinstance(m, dict) and m.get("role") == "system" for m in msgs) else []
    for i, m in enumerate(msgs):
        at = f"{where}: {key}[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{at} must be an object with 'role' and 'content'")
        if "role" not in m:
            raise DataError(f"{at}: field 'role' missing")
        role = m["role"]
        if role == "tool_call":  # ms-swift: a call turn, {"name", "arguments"} as JSON text; joins the assistant's turn
            add_calls(out, parse_calls(m.get("content"), at))
            continue
        if "content" not in m and not (role == "assistant" and (m.get("tool_calls") or m.get("function_call"))):
            raise DataError(f"{at}: field 'content' missing")
        content = m.get("content")
        if role in RESULT_ROLES:
            out.append(tool_result(content, at))
            continue
        if role not in ROLES:
            raise DataError(f"{at}: unknown role {role!r}; valid: {', '.join(ROLES)}, tool_call, tool_response")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, list):  # OpenAI content parts, or plain strings: joined, as serve reads them
            content = _text_parts(content, at)
        if not isinstance(content, str):
            raise DataError(f"{at}: field 'content' must be a string")
        msg = {"role": role, "content": content}
        think = next((m[k] for k in THINK_KEYS if isinstance(m.get(k), str) and m[k].strip()), None)
        if role == "assistant" and think:
            msg["reasoning_content"] = think
        if role == "assistant" and (m.get("tool_calls") or m.get("function_call")):
            calls = m.get("tool_calls") or [m["function_call"]]   # (function_call: OpenAI's older single call)
            if not isinstance(calls, list):
                raise DataError(f"{at}: field 'tool_calls' must be a list of calls")
            msg["tool_calls"] = [tool_call(c, f"{at}.tool_calls[{j}]") for j, c in enumerate(calls)]
        out.append(msg)
    return out


def tool_call(call, at: str) -> dict:
    """One call as the chat template reads it: {"type": "function", "function": {"name", "arguments": an object}};
    an OpenAI call ({"function": {...}}) or a bare {"name", "arguments"}; arguments as a JSON string or an object."""
    fn = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
        raise DataError(f"{at}: a tool call needs a function name ({{\"function\": {{\"name\": ..., \"arguments\": "
                        f"...}}}}), got {json.dumps(call)[:80]}")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise DataError(f"{at}: the arguments of the call to {fn['name']!r} are not JSON ({e.msg} at column "
                            f"{e.colno}): {args[:60]!r}") from None
    if not isinstance(args, dict):
        raise DataError(f"{at}: the arguments of the call to {fn['name']!r} must be a JSON object, got "
                        f"{type(args).__name__}")
    out = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
    if isinstance(call, dict) and call.get("id"):
        out["id"] = call["id"]
    return out


def parse_calls(value, at: str) -> list[dict]:
    """A call turn's text (ms-swift tool_call, LLaMA-Factory function_call): one {"name", "arguments"} or a list."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"{at}: a tool call must be JSON like {{\"name\": ..., \"arguments\": {{...}}}} "
                            f"({e.msg} at column {e.colno}): {value[:60]!r}") from None
    calls = value if isinstance(value, list) else [value]
    return [tool_call(c, at if len(calls) == 1 else f"{at}[{j}]") for j, c in enumerate(calls)]


def add_calls(out: list[dict], calls: list[dict]) -> None:
    """Calls join the assistant turn just before them (its words, then the calls), or make an assistant turn."""
    if out and out[-1]["role"] == "assistant":
        out[-1].setdefault("tool_calls", []).extend(calls)
    else:
        out.append({"role": "assistant", "content": "", "tool_calls": calls})


def tool_result(content, at: str) -> dict:
    if isinstance(content, (dict, list)) and not (isinstance(content, list) and all(isinstance(x, (str, dict)) and
                                                                                  (isinstance(x, str) or "text" in x)
                                                                                  for x in content)):
        content = json.dumps(content, ensure_ascii=False)
    elif isinstance(content, list):
        content = _text_parts(content, at)
    if not isinstance(content, str):
        raise DataError(f"{at}: a tool result's content must be a string or JSON, got {type(content).__name__}")
    return {"role": "tool", "content": content}


def record_tools(data: dict, where: str) -> list[dict] | None:
    """A record's `tools`: a list of JSON schemas (OpenAI {"type": "function", "function": {...}} or a bare
    {"name", "description", "parameters"}), or that list as JSON text; as OpenAI tools (what serve's clients send)."""
    value = data.get("tools")
    if value in (None, "", [], {}):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: field 'tools' is not JSON ({e.msg} at column {e.colno})") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise DataError(f"{where}: field 'tools' must be a list of tool schemas, got {type(value).__name__}")
    out = []
    for i, t in enumerate(value):
        fn = t.get("function", t) if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise DataError(f"{where}: tools[{i}] must be a tool schema with a name ({{\"type\": \"function\", "
                            "\"function\": {\"name\": ..., \"parameters\": {...}}}})")
        out.append(t if "function" in t else {"type": "function", "function": t})
    return out or None


def check_calls(messages: list[dict], tools: list[dict] | None, where: str) -> None:
    """Every call names a tool of the record's `tools` (when it lists any)."""
    if not tools:
        return
    names = [t["function"]["name"] for t in tools]
    for i, m in enumerate(messages):
        for j, c in enumerate(m.get("tool_calls") or ()):
            if c["function"]["name"] not in names:
                raise DataError(f"{where}: message {i}: tool_calls[{j}] calls {c['function']['name']!r}, which is not "
                                f"in the record's tools ({', '.join(names)})")


def _text_parts(parts: list, where: str) -> str:
    texts = []
    for j, part in enumerate(parts):
        kind = part.get("type", "text") if isinstance(part, dict) else "text" if isinstance(part, str) else type(part).__name__
        if kind != "text":
            raise DataError(f"{where}: content[{j}] is a part of type {kind!r}; only text can be trained "
                            "(strings or {\"type\": \"text\", \"text\": ...})")
        texts.append(part if isinstance(part, str) else str(part.get("text", "")))
    return "".join(texts)


def sharegpt_messages(data: dict, where: str, key: str = "conversations", tags: dict | None = None) -> list[dict]:
    """ShareGPT turns ({"from", "value"}; LLaMA-Factory's tags rename both and the role names) as messages;
    function_call turns become the assistant's tool calls, observation turns tool results."""
    conv = data.get(key)
    if not isinstance(conv, list) or not conv:
        raise DataError(f"{where}: field '{key}' must be a non-empty list")
    out = [] if tags and any(isinstance(m, dict) and m.get(tags["role_tag"]) == tags["system_tag"] for m in conv) \
        else system_messages(data, where)
    for i, m in enumerate(conv):
        turn = sharegpt_turn(m, f"{where}: {key}[{i}]", tags)
        if turn.get("tool_calls") and not turn["content"]:
            add_calls(out, turn["tool_calls"])
        else:
            out.append(turn)
    return out


def sharegpt_turn(m, at: str, tags: dict | None = None) -> dict:
    t = tags or SHARE_TAGS
    role_tag, content_tag = t["role_tag"], t["content_tag"]
    if not isinstance(m, dict) or role_tag not in m:
        raise DataError(f"{at}: field '{role_tag}' missing")
    if content_tag not in m:
        raise DataError(f"{at}: field '{content_tag}' missing")
    who, value = m[role_tag], m[content_tag]
    if tags:
        roles = {t["user_tag"]: "user", t["assistant_tag"]: "assistant", t["system_tag"]: "system",
                 t["function_tag"]: "function_call", t["observation_tag"]: "tool"}
    else:
        roles = {**SHAREGPT_ROLES, **{r: "function_call" for r in SHAREGPT_CALL}, **{r: "tool" for r in SHAREGPT_RESULT}}
    role = roles.get(who)
    if role is None:
        raise DataError(f"{at}: unknown role {who!r}; valid: {', '.join(sorted(roles))}")
    if role == "function_call":
        return {"role": "assistant", "content": "", "tool_calls": parse_calls(value, at)}
    if role == "tool":
        return tool_result(value, at)
    if not isinstance(value, str):
        raise DataError(f"{at}: field '{content_tag}' must be a string")
    return {"role": role, "content": value}


def _alpaca(data: dict, where: str) -> list[dict]:
    instruction = _text(data, "instruction", where)
    extra = _text(data, "input", where, required=False)
    prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    return [*system_messages(data, where), *_history(data, where), {"role": "user", "content": prompt},
            {"role": "assistant", "content": _text(data, "output", where)}]


def _pair(q: str, a: str):
    def convert(data: dict, where: str) -> list[dict]:
        return [*system_messages(data, where), *_history(data, where), {"role": "user", "content": _text(data, q, where)},
                {"role": "assistant", "content": _text(data, a, where)}]
    return convert


def _reasoning(data: dict, where: str) -> list[dict]:
    q = next(k for k in QUESTION_KEYS if k in data)
    a = next(k for k in ANSWER_KEYS if k in data and k != q)
    t = next(k for k in THINK_KEYS if k in data)
    return [*system_messages(data, where), {"role": "user", "content": _text(data, q, where)},
            {"role": "assistant", "content": _text(data, a, where), "reasoning_content": _text(data, t, where)}]


_TO_MESSAGES = {"messages": messages_of, "sharegpt": sharegpt_messages, "alpaca": _alpaca, "input_output": _pair("input", "output"),
                "query_response": _pair("query", "response"), "prompt_completion": _pair("prompt", "completion"),
                "reasoning": _reasoning}


def check_opening(messages: list[dict], where: str) -> None:
    """A conversation's first turn after the system prompt is the user's."""
    i = next((i for i, m in enumerate(messages) if m["role"] != "system"), None)
    if i is not None and messages[i]["role"] == "assistant":
        raise DataError(f"{where}: the conversation opens with an assistant turn (message {i}) before any user turn; "
                        "start it with the user's message")


def _check_messages(messages: list[dict], where: str) -> None:
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant turn to learn from")
    check_opening(messages, where)
    for i, m in enumerate(messages):
        if m["role"] in ("user", "assistant") and not m["content"].strip() and not m.get("reasoning_content") \
                and not m.get("tool_calls"):
            raise DataError(f"{where}: empty content in message {i} ({m['role']})")


def _has_reasoning(m: dict) -> bool:
    return m["role"] == "assistant" and bool(m.get("reasoning_content") or "</think>" in m["content"])


def thinking_turns(ex: Example, mode: str) -> list[Example]:
    """data.multi_turn_thinking for one conversation. Qwen3's template drops the reasoning of assistant turns before
    the last user message (inference never shows a past turn's reasoning). split: one example per round (a user
    message and the assistant turns after it) with the history before it as inference renders it, only that round
    trained, so every turn's reasoning is trained once; done where an earlier round has reasoning, else the record
    stays one example. keep: earlier turns keep their reasoning (put into their content, where the template leaves
    it). last: as the template renders the whole conversation (only the reasoning after the last user message)."""
    msgs = ex.messages
    if mode == "last" or msgs is None:
        return [ex]
    users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
    if len(users) < 2 or not any(_has_reasoning(m) for m in msgs[:users[-1]]):
        return [ex]
    if mode == "keep":
        out = []
        for i, m in enumerate(msgs):
            if i < users[-1] and _has_reasoning(m):
                m = dict(m)
                think = m.pop("reasoning_content", None)
                if think is not None:
                    m["content"] = f"<think>\n{think.strip()}\n</think>\n\n{m['content'].lstrip()}"
                m["reasoning_content"] = ""  # a string: the template reads no <think> out of the content
            out.append(m)
        return [Example(out, None, ex.format, ex.where, tools=ex.tools)]
    out, before = [], 0
    for r, start in enumerate(users):
        end = users[r + 1] if r + 1 < len(users) else len(msgs)
        turns = sum(m["role"] == "assistant" for m in msgs[start:end])
        if turns:
            out.append(Example(msgs[:end], None, ex.format, f"{ex.where} (turn {r + 1})", tools=ex.tools,
                               train_from=before))
        before += turns
    return out
