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
  sharegpt_preference  {"conversations", "chosen": {"from", "value"}, "rejected": {...}} (as LLaMA-Factory writes them)
  kto                  {"prompt", "completion", "label": true|false}: strings or message lists
Prompt records (train.stage=grpo; qtune.data.prompts reads them):
  prompts              {"prompt" | "question", ...}: the prompt, and fields for the reward functions (e.g. "answer")
Which formats a stage trains on: the family its `Trains` names (FAMILIES). Every error names `file:line` and the
field.
Tool calling is not trained yet: a message with tool_calls, a record with `tools` or a tool turn is refused (in one
line), not rendered without its calls.
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
PAIR_FORMATS = ("preference", "sharegpt_preference")
FORMATS = LM_FORMATS + PAIR_FORMATS + ("kto", "prompts")

# The formats a stage's records may take, by the family name a stage declares (qtune.stages: Trains.formats).
FAMILIES = {"text": ("text",), "lm": LM_FORMATS, "pairs": PAIR_FORMATS,
            "kto": ("kto",) + PAIR_FORMATS,  # KTO splits a pair into a desirable and an undesirable answer
            "prompts": ("prompts",)}         # grpo: prompts and the fields its reward functions read
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "bard": "assistant", "bing": "assistant", "model": "assistant", "system": "system"}
# Tool calling is not trained yet: records with these are refused (not rendered without their calls).
TOOL_ROLES = ("tool", "function")                                                      # OpenAI messages
SHAREGPT_TOOL_ROLES = ("function_call", "observation", "function_response", "tool")     # LLaMA-Factory sharegpt
TOOL_KEYS = ("tool_calls", "function_call")                                            # on an assistant message
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
        return "sharegpt_preference" if isinstance(first, dict) and "from" in first else "preference"
    if {"prompt", "completion", "label"} <= keys:
        return "kto"
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
    elif fmt not in FORMATS:
        raise DataError(f"format={fmt!r} is not a known format; valid: auto, {', '.join(FORMATS)}")
    if fmt not in allowed:
        raise DataError(f"{where}: train.stage={trains.stage} trains on {trains.describes}; this record is {fmt} "
                        f"(keys: {', '.join(sorted(data))})")
    if data.get("tools") not in (None, "", "[]", [], {}):
        raise tool_calls(where, "field 'tools'")
    return fmt


def lm_example(data: dict, fmt: str, where: str) -> Example:
    """A record of an LM format (LM_FORMATS) as an Example: raw text, or chat messages."""
    if fmt == "text":
        return Example(None, _text(data, "text", where), fmt, where)
    messages = _TO_MESSAGES[fmt](data, where)
    _check_messages(messages, where)
    return Example(messages, None, fmt, where)


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
        if not isinstance(m, dict):
            raise DataError(f"{where}: {key}[{i}] must be an object with 'role' and 'content'")
        if "role" not in m:
            raise DataError(f"{where}: {key}[{i}]: field 'role' missing")
        calls = next((k for k in TOOL_KEYS if m.get(k)), None)
        if calls or m["role"] in TOOL_ROLES:
            raise tool_calls(where, f"{key}[{i}]: " + (f"field '{calls}'" if calls else f"role {m['role']!r}"))
        if "content" not in m:
            raise DataError(f"{where}: {key}[{i}]: field 'content' missing")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise DataError(f"{where}: {key}[{i}]: unknown role {role!r}; valid: {', '.join(ROLES)}")
        if isinstance(content, list):  # OpenAI content parts, or plain strings: joined, as serve reads them
            content = _text_parts(content, f"{where}: {key}[{i}]")
        if not isinstance(content, str):
            raise DataError(f"{where}: {key}[{i}]: field 'content' must be a string")
        msg = {"role": role, "content": content}
        think = next((m[k] for k in THINK_KEYS if isinstance(m.get(k), str) and m[k].strip()), None)
        if role == "assistant" and think:
            msg["reasoning_content"] = think
        out.append(msg)
    return out


def _text_parts(parts: list, where: str) -> str:
    texts = []
    for j, part in enumerate(parts):
        kind = part.get("type", "text") if isinstance(part, dict) else "text" if isinstance(part, str) else type(part).__name__
        if kind != "text":
            raise DataError(f"{where}: content[{j}] is a part of type {kind!r}; only text can be trained "
                            "(strings or {\"type\": \"text\", \"text\": ...})")
        texts.append(part if isinstance(part, str) else str(part.get("text", "")))
    return "".join(texts)


def sharegpt_messages(data: dict, where: str) -> list[dict]:
    conv = data.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise DataError(f"{where}: field 'conversations' must be a non-empty list")
    out = system_messages(data, where)
    for i, m in enumerate(conv):
        if not isinstance(m, dict) or "from" not in m:
            raise DataError(f"{where}: conversations[{i}]: field 'from' missing")
        if m["from"] in SHAREGPT_TOOL_ROLES:
            raise tool_calls(where, f"conversations[{i}]: from {m['from']!r}")
        if "value" not in m:
            raise DataError(f"{where}: conversations[{i}]: field 'value' missing")
        role = SHAREGPT_ROLES.get(m["from"])
        if role is None:
            raise DataError(f"{where}: conversations[{i}]: unknown role {m['from']!r}; "
                            f"valid: {', '.join(sorted(SHAREGPT_ROLES))}")
        if not isinstance(m["value"], str):
            raise DataError(f"{where}: conversations[{i}]: field 'value' must be a string")
        out.append({"role": role, "content": m["value"]})
    return out


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


def tool_calls(where: str, what: str) -> DataError:
    return DataError(f"{where}: {what}: tool calls are not supported yet; leave such records out "
                     "(data.on_error=skip skips them)")


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
        if m["role"] in ("user", "assistant") and not m["content"].strip() and not m.get("reasoning_content"):
            raise DataError(f"{where}: empty content in message {i} ({m['role']})")
