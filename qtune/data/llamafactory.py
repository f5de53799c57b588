"""LLaMA-Factory's dataset_info.json: data.dataset_info=<file> data.dataset=a,b reads the datasets it describes.

An entry names its file (file_name, next to dataset_info.json; or hf_hub_url), its formatting (alpaca | sharegpt),
whether it holds preference pairs (ranking: true), and how its fields are named (columns: prompt, query, response,
history, messages, system, tools, chosen, rejected, kto_tag; tags: role_tag, content_tag, user_tag, assistant_tag,
observation_tag, function_tag, system_tag). Each record is turned into one of qtune's layouts (qtune.data.formats):
conversations (with tool calls), preference pairs or KTO answers, read from there on as qtune reads those.
"""
from __future__ import annotations

import json
from pathlib import Path

from qtune.data import formats
from qtune.errors import DataError

COLUMNS = ("prompt", "query", "response", "history", "messages", "system", "tools", "images", "videos", "audios",
           "chosen", "rejected", "kto_tag")
ALPACA = {"prompt": "instruction", "query": "input", "response": "output"}
SHAREGPT = {"messages": "conversations"}
FORMATTINGS = ("alpaca", "sharegpt")


def read_info(path: str) -> dict:
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"data.dataset_info={path}: no such file")
    try:
        info = json.loads(p.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise DataError(f"{p}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(info, dict) or not all(isinstance(v, dict) for v in info.values()):
        raise DataError(f"{p}: expected an object of dataset entries ({{\"name\": {{\"file_name\": ...}}}})")
    return info


def entries(info_path: str, names: str) -> list[tuple[str, dict]]:
    """(file or hub path, the entry with its name and file) for each name of data.dataset (comma-separated)."""
    info = read_info(info_path)
    p = Path(info_path).expanduser()
    out = []
    for name in [n.strip() for n in str(names).split(",") if n.strip()]:
        if name not in info:
            raise DataError(f"data.dataset={name}: no such dataset in {p}; valid: {', '.join(sorted(info))}")
        entry = dict(info[name])
        where = f"{p}: dataset {name!r}"
        formatting = entry.get("formatting", "alpaca")
        if formatting not in FORMATTINGS:
            raise DataError(f"{where}: formatting {formatting!r}; valid: {', '.join(FORMATTINGS)}")
        for key in ("columns", "tags"):
            if not isinstance(entry.get(key, {}), dict):
                raise DataError(f"{where}: '{key}' must be an object")
        unknown = sorted(set(entry.get("columns", {})) - set(COLUMNS))
        if unknown:
            raise DataError(f"{where}: columns.{unknown[0]} is not a LLaMA-Factory column; valid: {', '.join(COLUMNS)}")
        unknown = sorted(set(entry.get("tags", {})) - set(formats.SHARE_TAGS))
        if unknown:
            raise DataError(f"{where}: tags.{unknown[0]} is not a LLaMA-Factory tag; valid: "
                            f"{', '.join(formats.SHARE_TAGS)}")
        if entry.get("file_name"):
            path = str(p.parent / entry["file_name"])
        elif entry.get("hf_hub_url"):
            path = "hf://" + entry["hf_hub_url"]
        else:
            raise DataError(f"{where}: no file_name (qtune reads a dataset's file_name, or its hf_hub_url)")
        out.append((path, {"name": name, "info": str(p), "formatting": formatting,
                           "ranking": bool(entry.get("ranking", False)), "columns": dict(entry.get("columns", {})),
                           "tags": dict(entry.get("tags", {}))}))
    if not out:
        raise DataError(f"data.dataset: name a dataset of {p}; valid: {', '.join(sorted(info))}")
    return out


def layout(entry: dict) -> str:
    kind = "ranking" if entry["ranking"] else "kto" if "kto_tag" in entry["columns"] else "sft"
    return f"{entry['name']}: LLaMA-Factory {entry['formatting']} {kind}"


def convert(data: dict, entry: dict, where: str, stage: str, first: bool) -> tuple[dict, str]:
    """A record of a dataset_info.json entry as a qtune record and its format. `first`: the file's first record, where
    an optional column the entry names must be there too (a required one must be in every record)."""
    cols = {**(SHAREGPT if entry["formatting"] == "sharegpt" else ALPACA), **entry["columns"]}
    tags = {**formats.SHARE_TAGS, **entry["tags"]}
    ranking, kto = entry["ranking"], "kto_tag" in entry["columns"]
    name = f"dataset {entry['name']!r} of {entry['info']}"
    if ranking and stage not in ("dpo", "rm", "kto"):
        raise DataError(f"{where}: {name} is a ranking dataset (ranking: true, preference pairs): it trains with "
                        f"train.stage=dpo, rm or kto, not {stage}")
    if kto and stage != "kto":
        raise DataError(f"{where}: {name} is a KTO dataset (kto_tag: answers marked good or bad): it trains with "
                        f"train.stage=kto, not {stage}")
    if not ranking and not kto and stage in ("dpo", "rm"):
        raise DataError(f"{where}: {name} is not a ranking dataset (no ranking: true): train.stage={stage} trains on "
                        "preference pairs; mark the entry ranking: true with chosen and rejected columns, or train "
                        "it with train.stage=sft")

    def field(col: str, required: bool = False):
        key = cols.get(col)
        if key is None:
            return None
        if key not in data:
            if required or (first and col in entry["columns"]):
                raise DataError(f"{where}: {name} maps columns.{col} to field {key!r}, which this record lacks "
                                f"(its fields: {', '.join(sorted(data)) or 'none'})")
            return None
        return data[key]

    out: dict = {}
    for col in ("system", "tools"):
        value = field(col)
        if value not in (None, ""):
            out[col] = value
    if entry["formatting"] == "alpaca":
        if stage == "pt":
            return {"text": field("prompt", True)}, "text"
        history = field("history")
        if history is not None:
            out["history"] = history
        prompt = formats._text({"prompt": field("prompt", True)}, "prompt", where)
        query = field("query")
        content = "\n".join([prompt] + ([query] if isinstance(query, str) and query.strip() else []))  # as LLaMA-Factory joins them
        messages = [*formats.system_messages(out, where), *_history(out, where),
                    {"role": "user", "content": content}]
        if ranking:
            return {"messages": messages, "chosen": field("chosen", True), "rejected": field("rejected", True),
                    **_tools(out)}, "preference"
        answer = field("response", True)
        if kto:
            return {"prompt": messages, "completion": answer, "label": field("kto_tag", True), **_tools(out)}, "kto"
        return {"messages": messages + [{"role": "assistant", "content": answer}], **_tools(out)}, "messages"
    messages = formats.sharegpt_messages({"conversations": field("messages", True), **out}, where, tags=tags)
    if ranking:
        from qtune.data.preference import _sharegpt_turn

        answers = {k: _sharegpt_turn(field(k, True), where, cols.get(k, k), tags) for k in ("chosen", "rejected")}
        return {"messages": messages, **answers, **_tools(out)}, "preference"
    if kto:
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last turn of {cols['messages']!r} must be the answer (the assistant's) "
                            "that kto_tag marks")
        return {"prompt": messages[:-1], "completion": messages[-1:], "label": field("kto_tag", True),
                **_tools(out)}, "kto"
    return {"messages": messages, **_tools(out)}, "messages"


def _tools(out: dict) -> dict:
    return {"tools": out["tools"]} if "tools" in out else {}


def _history(out: dict, where: str) -> list[dict]:
    return formats._history(out, where)
