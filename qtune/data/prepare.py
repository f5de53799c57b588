"""Data files -> tokenized, loss-masked, truncated, packed datasets, cached under a fingerprint.

The cache key covers the data bytes, the tokenizer, the chat template and every setting that changes
the result, so a rerun is a hit and any change is a miss. The folder appears atomically, with a manifest of its
files' sizes and checksums (qtune.integrity) that a hit verifies first: a damaged cache is rebuilt, with a warning.
data.rebuild_cache=true rebuilds it in any case.
Layout: <cache>/<name>/<fingerprint>/{train,eval}/ (datasets), stats.json, rejects.jsonl, manifest.json.
What a split holds follows the stage's kind of rows (qtune.stages.base.Trains.kind): input_ids + labels, packed
(pt, sft); prompt_ids, chosen_ids, rejected_ids (dpo, rm); prompt_ids, completion_ids, label (kto); prompt messages
and the records' other fields (grpo).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from qtune.config.schema import DataConfig, OnError, SourceConfig, TrainOn
from qtune.data import formats, llamafactory, preference, prompts
from qtune.data.template import (EMPTY_THINK, Markers, assistant_spans, check_tool_rendering, encode, escape, label_mask,
                                  probe_markers, render, resolve_template)
from qtune.errors import DataError
from qtune.integrity import manifest_problem, write_manifest
from qtune.io import atomic_dir, atomic_write_json, is_hub_dataset
from qtune.runs import main_process

VERSION = 4  # bump when the output of this module changes for the same inputs


@dataclass
class Prepared:
    path: Path
    stats: dict
    cache_hit: bool
    warnings: list[str] = field(default_factory=list)
    digest: str = ""  # the examples' own digest (digests()): what a resumed run compares

    def load(self, split: str = "train"):
        from datasets import load_from_disk

        p = self.path / split
        return load_from_disk(str(p)) if p.exists() else None


def sources_of(data: DataConfig) -> list[SourceConfig]:
    if data.dataset or data.dataset_info:
        if not (data.dataset and data.dataset_info):
            raise DataError("data.dataset names datasets of a dataset_info.json: set data.dataset_info=<its path> "
                            "and data.dataset=<name>[,<name>...] together" if data.dataset else
                            "data.dataset_info: which of its datasets? set data.dataset=<name>[,<name>...] (valid: "
                            f"{', '.join(sorted(llamafactory.read_info(data.dataset_info)))})")
        if data.sources or data.path:
            raise DataError("data.dataset: set it or data.path / data.sources, not both")
        return [SourceConfig(path=path, info=entry) for path, entry in llamafactory.entries(data.dataset_info, data.dataset)]
    if data.sources:
        return list(data.sources)
    if data.path:
        return [SourceConfig(path=data.path, format=data.format)]
    raise DataError("no training data: set data.path=<file, glob or folder> or data.sources=[...]")


def check_inputs(data: DataConfig) -> None:
    """Fail before anything heavy loads: every local source and the eval file exist and look readable."""
    paths = [src.path for src in sources_of(data) if not is_hub_dataset(src.path)]
    for path in paths + ([data.eval_path] if data.eval_path else []):
        for f in formats.expand(path):
            formats.sniff(f)


def _setup(data: DataConfig, tokenizer, model_name: str, chat_template: str | None, trains):
    """What prepare and preview both start from: sources, template (+ fallback warning), turn markers."""
    sources = sources_of(data)
    template, warning = resolve_template(tokenizer, chat_template, model_name)
    # preference answers end where the assistant's turn does, whatever data.train_on says
    needs_markers = data.train_on is not TrainOn.all or trains.kind != "lm"
    markers = probe_markers(tokenizer, template) if needs_markers else Markers("", "")
    return sources, template, warning, markers


# ---------------------------------------------------------------- loading and normalizing

def _example(rec: formats.Record, src: SourceConfig, trains, first: bool = False) -> formats.Example:
    """One record as what the stage trains on: its format resolved and checked, then read as LM data or a preference.
    A source of a dataset_info.json entry (src.info) is first turned into a qtune record; its examples are named by
    the entry (the layout the dry run and stats show)."""
    fmt, layout = src.format, None
    if src.info:
        data, fmt = llamafactory.convert(rec.data, src.info, rec.where, trains.stage, first)
        rec, layout = formats.Record(data, rec.where), llamafactory.layout(src.info)
    fmt = formats.resolve(rec, fmt, trains)
    if fmt == "prompts":
        ex = prompts.example(rec.data, rec.where)
    elif fmt in formats.LM_FORMATS:
        ex = formats.lm_example(rec.data, fmt, rec.where)
    else:
        ex = preference.normalize_preference(rec.data, fmt, rec.where)
    ex.format = layout or ex.format
    return ex


def load_examples(src: SourceConfig, on_error: OnError, rejects: list[dict],
                  system_prompt: str | None, trains, thinking: str = "last") -> list[formats.Example]:
    """A source's records as examples of what a stage trains on (`trains`); `system_prompt` (data.system_prompt) opens every
    conversation that has no system turn of its own; `thinking` (data.multi_turn_thinking) may make a conversation
    several examples (formats.thinking_turns)."""
    out = []

    def skip(where: str, error: str, text: str) -> None:  # a line that is no record at all (malformed JSON)
        rejects.append({"where": where, "error": error, "record": text})

    for n, rec in enumerate(_records(src, skip if on_error is OnError.skip else None)):
        try:
            ex = _example(rec, src, trains, first=n == 0)
            if system_prompt and ex.messages is not None and not any(m["role"] == "system" for m in ex.messages):
                ex.messages.insert(0, {"role": "system", "content": system_prompt})
            out += formats.thinking_turns(ex, thinking) if trains.kind == "lm" else [ex]
        except DataError as e:
            if on_error is not OnError.skip:
                raise
            rejects.append({"where": rec.where, "error": str(e).split(": ", 1)[-1], "record": rec.data})
    return out


def _records(src: SourceConfig, skip=None):
    if is_hub_dataset(src.path):
        from datasets import load_dataset

        name = src.path.removeprefix("hf://")
        try:
            ds = load_dataset(name, split=src.split)
        except Exception as e:
            raise DataError(f"{src.path}: cannot load dataset ({str(e).splitlines()[0]})") from None
        for i, row in enumerate(ds):
            yield formats.Record(row, f"{name}[{src.split}]:row {i + 1}")
        return
    for f in formats.expand(src.path):
        yield from formats.read_records(f, skip)


def _thinking(data: DataConfig) -> str:
    """data.multi_turn_thinking where it matters: split trains each round apart, which only data.train_on=assistant
    (every assistant turn) does."""
    mode = str(data.multi_turn_thinking)
    return "last" if mode == "split" and data.train_on is not TrainOn.assistant else mode


def mix(per_source: list[list], sources: list[SourceConfig], seed: int) -> list[tuple[int, object]]:
    """Combine sources by `weight` (shares of the mix, as large as the data allows) or `count`."""
    rng = random.Random(seed)
    weighted = [i for i, s in enumerate(sources) if s.weight is not None]
    if weighted and len(weighted) + sum(s.count is not None for s in sources) != len(sources):
        raise DataError("data.sources: give every source a weight (or a count) once any source has a weight")
    total_w = sum(sources[i].weight for i in weighted)
    if weighted and total_w <= 0:
        raise DataError("data.sources: weights must be positive")
    scale = min((len(per_source[i]) / (sources[i].weight / total_w) for i in weighted), default=0)
    out = []
    for i, (src, items) in enumerate(zip(sources, per_source)):
        if src.count is not None:
            n = src.count
        elif src.weight is not None:
            n = int(scale * src.weight / total_w)
        else:
            n = len(items)
        if n <= len(items):
            picked = rng.sample(items, n) if n < len(items) else list(items)
        else:  # oversample: every item at least once, the rest drawn again
            picked = list(items) + rng.choices(items, k=n - len(items))
        out += [(i, ex) for ex in picked]
    rng.shuffle(out)
    return out


# ---------------------------------------------------------------- tokenizing and masking

THINK = re.compile(r"<think>(.*?)</think>", re.S)


def _tokenize_batch(batch, tokenizer, template: str, markers: Markers, max_length: int, train_on: str,
                    enable_thinking, ignore_empty_think: bool = False):
    """Render, tokenize and mask a batch; data text that spells a control token stays text (template.escape).
    A row's `think`: 1 when a trained turn reasons (a non-empty <think> block), 0 when none does, -1 for plain text."""
    texts, spans, escapes, think = [], [], [], []
    for conv, text, where, tools, train_from in zip(batch["conv"], batch["text"], batch["where"],
                                                    batch.get("tools") or [None] * len(batch["conv"]),
                                                    batch.get("train_from") or [0] * len(batch["conv"])):
        if conv is None:
            text, esc = escape(tokenizer, text)
            texts.append(text + (tokenizer.eos_token or ""))
            spans.append([(0, len(texts[-1]))])
            escapes.append(esc)
            think.append(-1)
            continue
        (messages, tools), esc = escape(tokenizer, [json.loads(conv), json.loads(tools) if tools else None])
        rendered = render(tokenizer, template, messages, enable_thinking=enable_thinking, tools=tools)
        if tools or any(m.get("tool_calls") for m in messages):
            check_tool_rendering(rendered, messages, tools, where)
        s = [(0, len(rendered))] if train_on == "all" else assistant_spans(rendered, markers)
        if train_on != "all" and len(s) > sum(m["role"] == "assistant" for m in messages):
            # (a header of plain text, no control token in it, spelled inside a message)
            raise DataError(f"{where}: a message holds the chat template's assistant header {markers.header!r}; "
                            "only the template may open an assistant turn")
        s = s[-1:] if train_on == "last_assistant" else s[train_from:] if train_on != "all" else s
        if ignore_empty_think and train_on != "all":  # an empty <think></think> opening a turn: context, not trained
            s = [(m.end(), b) if (m := EMPTY_THINK.match(rendered, a)) else (a, b) for a, b in s]
        think.append(int(any(m.group(1).strip() for a, b in s for m in THINK.finditer(rendered, a, b))))
        texts.append(rendered)
        spans.append(s)
        escapes.append(esc)
    all_ids, all_offsets = encode(tokenizer, texts, escapes)
    out = {"input_ids": [], "labels": [], "length": [], "trainable": [], "truncated": [], "think": think}
    for ids, offsets, sp in zip(all_ids, all_offsets, spans):
        mask = label_mask(offsets, sp)
        truncated = len(ids) > max_length
        ids, mask = ids[:max_length], mask[:max_length]
        arr = np.asarray(ids, dtype=np.int64)
        out["input_ids"].append(arr)
        out["labels"].append(np.where(mask, arr, -100))
        out["length"].append(len(ids))
        out["trainable"].append(int(mask.sum()))
        out["truncated"].append(truncated)
    return out


def tokenize(examples: list[tuple[int, formats.Example]], tokenizer, template: str, markers: Markers,
             data: DataConfig, desc: str):
    from datasets import Dataset

    ds = Dataset.from_dict({
        "conv": [json.dumps(ex.messages) if ex.messages is not None else None for _, ex in examples],
        "text": [ex.text for _, ex in examples],
        "where": [ex.where for _, ex in examples],
        "source": [i for i, _ in examples],
        "format": [ex.format for _, ex in examples],
        "tools": [json.dumps(ex.tools) if ex.tools else None for _, ex in examples],
        "train_from": [ex.train_from for _, ex in examples],
    })
    nproc = data.num_proc or min(os.cpu_count() or 1, 8)
    nproc = 1 if len(ds) < 4000 else nproc
    return ds.map(_tokenize_batch, batched=True, batch_size=500, num_proc=nproc,
                  remove_columns=["conv", "text", "where", "tools", "train_from"],
                  fn_kwargs=dict(tokenizer=tokenizer, template=template, markers=markers, max_length=data.max_length,
                                 train_on=str(data.train_on), enable_thinking=data.enable_thinking,
                                 ignore_empty_think=data.ignore_empty_think),
                  new_fingerprint=hashlib.sha1(desc.encode()).hexdigest(), desc=f"tokenizing {desc}")


# ---------------------------------------------------------------- the whole pipeline

def fingerprint(data: DataConfig, sources: list[SourceConfig], tokenizer, template: str, stage: str) -> str:
    return digests(data, sources, tokenizer, template, stage)[0]


def digests(data: DataConfig, sources: list[SourceConfig], tokenizer, template: str,
            stage: str) -> tuple[str, str]:
    """The cache key, and the examples' own digest, from one read of the files. The digest is the key less where the
    files are (local paths and file names; a Hub dataset's name stays, it is what names its data) and less
    data.on_error (a prepare that succeeds makes the same examples with raise or skip): the same data moved or
    renamed has the same digest, so a run resumes on it (qtune.runs.check_same_data)."""
    h = hashlib.sha256(f"qtune-data-v{VERSION}".encode())
    d = hashlib.sha256(f"qtune-data-v{VERSION}".encode())
    if stage != "sft":  # (sft data keeps the fingerprints it had before stages)
        h.update(f"stage={stage}".encode())
        d.update(f"stage={stage}".encode())
    settings = {k: v for k, v in asdict(data).items() if k not in ("path", "sources", "cache_dir", "num_proc", "rebuild_cache")}
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    settings = {k: v for k, v in settings.items() if k not in ("eval_path", "on_error")}
    d.update(json.dumps(settings, sort_keys=True, default=str).encode())

    def files(path: str, named: bool) -> None:
        for f in formats.expand(path):
            if named:
                h.update(str(f.name).encode())
            d.update(f"{f.suffix.lower()}:{f.stat().st_size}:".encode())  # the suffix picks the reader
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
                    d.update(chunk)

    for src in sources:
        h.update(json.dumps(asdict(src), sort_keys=True, default=str).encode())
        hub = is_hub_dataset(src.path)
        own = {k: v for k, v in asdict(src).items() if hub or k != "path"}
        if own.get("info"):  # (where its dataset_info.json lies is where the files are)
            own["info"] = {k: v for k, v in own["info"].items() if k != "info"}
        d.update(json.dumps(own, sort_keys=True, default=str).encode())
        if not hub:
            files(src.path, named=True)
    if data.eval_path:
        d.update(b"eval:")
        files(data.eval_path, named=False)
    for x in (h, d):
        x.update(template.encode())
        x.update(_tokenizer_digest(tokenizer).encode())
    return h.hexdigest(), d.hexdigest()


def _tokenizer_digest(tokenizer) -> str:
    """A digest of the tokenizer's vocabulary, merges and special tokens (memoized on the object)."""
    digest = getattr(tokenizer, "_qtune_digest", None)
    if digest is None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
        digest = hashlib.sha256(text.encode()).hexdigest() + str(tokenizer.eos_token)
        tokenizer._qtune_digest = digest
    return digest


def prepare(data: DataConfig, tokenizer, model_name: str, chat_template: str | None,
            trains) -> Prepared:
    """`trains`: what the stage trains on (qtune.stages.get(name).data, a qtune.stages.base.Trains: its name, kind of
    rows, family of formats)."""
    import datasets

    datasets.disable_progress_bars()
    kind = trains.kind
    sources, template, warning, markers = _setup(data, tokenizer, model_name, chat_template, trains)
    warnings = ([warning] if warning else []) + _eval_overlap(data, sources)
    fp, digest = digests(data, sources, tokenizer, template, trains.stage)
    name = (Path(sources[0].path.rstrip("/*")).stem or "data") if len(sources) == 1 else "mix"
    out = Path(data.cache_dir).expanduser() / f"{model_name}-{name}" / fp[:16]
    rebuild = out.exists()
    # the other ranks of a multi-process run find the cache rank 0 has just (re)built (main_first): no rebuild again
    if rebuild and not (data.rebuild_cache and main_process()):
        damage = manifest_problem(out)
        if damage is None:
            stats = json.loads((out / "stats.json").read_text())
            return Prepared(out, stats, True, warnings + _identical_warning(stats.get("identical_pairs"))
                            + _truncated_warning(stats, data.packing), digest)
        warnings.append(f"{out}: the prepared-data cache is damaged ({damage}); rebuilding it")

    rejects: list[dict] = []
    identical: list[str] = []
    per_source = []
    for s in sources:
        before = len(identical)
        items = _informative(load_examples(s, data.on_error, rejects, data.system_prompt, trains,
                                           _thinking(data)), identical)
        if not items and len(identical) > before:
            n = len(identical) - before
            raise DataError(f"{s.path}: no usable records: in all {n} pair{'s' * (n > 1)} (from {identical[before]}) "
                            "chosen and rejected are the same answer, which carries no preference")
        if not items:
            raise DataError(f"{s.path}: no usable records")
        per_source.append(items)
    mixed = mix(per_source, sources, data.seed)

    if data.eval_path:
        held_out = _informative(load_examples(SourceConfig(path=data.eval_path), data.on_error, rejects,
                                              data.system_prompt, trains, _thinking(data)), identical)
        eval_items = [(len(sources), ex) for ex in held_out]
        train_items = mixed
    else:
        n_eval = int(round(data.val_size * len(mixed))) if data.val_size < 1 else int(data.val_size)
        n_eval = min(n_eval, max(len(mixed) - 1, 0))
        eval_items, train_items = mixed[:n_eval], mixed[n_eval:]
    if data.max_samples is not None:
        train_items = train_items[:data.max_samples]
    if data.max_eval_samples is not None:
        eval_items = eval_items[:data.max_eval_samples]

    splits, stats = {}, {"fingerprint": fp, "stage": trains.stage, "sources": [asdict(s) for s in sources],
                         "rejected": len(rejects)}
    if identical:
        stats["identical_pairs"] = {"count": len(identical), "first": identical[0]}
        warnings += _identical_warning(stats["identical_pairs"])
    for split, items in (("train", train_items), ("eval", eval_items)):
        if not items:
            continue
        if kind == "lm":
            ds = tokenize(items, tokenizer, template, markers, data, f"{fp}-{split}")
        elif kind == "prompts":
            ds = prompts.tokenize(items, tokenizer, template, data, f"{fp}-{split}")
        else:
            items = preference.unpair(items, data.seed) if kind == "unpaired" else items
            ds = preference.tokenize(items, tokenizer, template, markers, data, f"{fp}-{split}", kind)
        kept = ds.filter(lambda t: [x > 0 for x in t], input_columns="trainable", batched=True,
                         new_fingerprint=hashlib.sha1(f"{fp}-{split}-kept".encode()).hexdigest())
        named = sources + [SourceConfig(path=data.eval_path)] if data.eval_path else sources
        stats[split] = split_stats(ds, kept, named, data.max_length)
        if kind not in ("lm", "prompts"):
            stats[split].update(preference.pair_stats(ds))
        if not len(kept):
            raise DataError(f"data: no {split} example has a trainable token left "
                            f"(all {len(ds)} dropped; raise data.max_length or check data.train_on)")
        splits[split] = kept
    if "train" not in splits:
        raise DataError("data: the dataset is empty")

    with atomic_dir(out, replace=rebuild) as tmp:
        for split, ds in splits.items():
            ds = ds.select_columns(prompts.model_columns(ds) if kind == "prompts" else preference.model_columns(kind))
            if data.packing and kind == "lm":
                from trl import pack_dataset

                ds = pack_dataset(ds, seq_length=data.max_length, strategy="bfd")
                rows = len(ds)
                stats[split]["packed_rows"] = rows
                stats[split]["packing_efficiency"] = round(stats[split]["tokens"] / (rows * data.max_length), 4)
            ds.save_to_disk(str(tmp / split))
        if rejects:
            with open(tmp / "rejects.jsonl", "w") as f:
                for r in rejects:
                    f.write(json.dumps(r, default=str) + "\n")
        atomic_write_json(tmp / "stats.json", stats)
        write_manifest(tmp)
    return Prepared(out, stats, False, warnings + _truncated_warning(stats, data.packing), digest)




def _eval_overlap(data: DataConfig, sources: list[SourceConfig]) -> list[str]:
    """A warning when data.eval_path names files that the training sources hold too."""
    if not data.eval_path or is_hub_dataset(data.eval_path):
        return []
    train = {f.resolve() for s in sources if not is_hub_dataset(s.path) for f in formats.expand(s.path)}
    both = [f for f in formats.expand(data.eval_path) if f.resolve() in train]
    if not both:
        return []
    key = "data.sources" if data.sources else "data.path"
    more = f" and {len(both) - 1} more" if len(both) > 1 else ""
    return [f"data.eval_path={data.eval_path}: {both[0]}{more} is also in {key}: the eval loss would measure examples "
            "the model trains on; hold out other data (or leave data.eval_path unset: data.val_size splits one off)"]


def _informative(examples: list, identical: list[str]) -> list:
    """The examples less pairs whose chosen and rejected answers are the same (their places go to `identical`)."""
    kept = []
    for ex in examples:
        if preference.identical(ex):
            identical.append(ex.where)
        else:
            kept.append(ex)
    return kept


def _truncated_warning(stats: dict, packing: bool) -> list[str]:
    """One line per split where examples were longer than data.max_length: how many were cut to it."""
    out = []
    for split in ("train", "eval"):
        s = stats.get(split)
        if not s or not s.get("truncated"):
            continue
        whole = "; packing keeps every example that fits whole in one row" if packing else ""
        out.append(f"data: {s['truncated']} of {s['examples']} {split} examples are longer than data.max_length="
                   f"{s['max_length']} tokens and were cut to it{whole}; a larger data.max_length keeps them whole "
                   "(qtune train --dry-run states the longest that fits)")
    return out


def _identical_warning(found: dict | None) -> list[str]:
    if not found:
        return []
    more = f" and {found['count'] - 1} more" if found["count"] > 1 else ""
    return [f"{found['first']}{more}: chosen and rejected are the same answer; such pairs carry no preference and "
            f"were left out ({found['count']})"]


def row_tensors(row: dict, device, labels: bool = False) -> dict:
    """One prepared row as a batch of one; a packed row gets position ids restarting at each sequence,
    as in training (the attention then stays inside each sequence)."""
    import torch

    out = {"input_ids": torch.tensor([row["input_ids"]], device=device)}
    if "seq_lengths" in row:
        out["position_ids"] = torch.cat([torch.arange(n) for n in row["seq_lengths"]])[None].to(device)
    if labels:
        out["labels"] = torch.tensor([row["labels"]], device=device)
    return out


def split_stats(ds, kept, sources: list[SourceConfig], max_length: int) -> dict:
    length = np.asarray(ds["length"])
    trainable = np.asarray(ds["trainable"])
    truncated = np.asarray(ds["truncated"])
    src = np.asarray(ds["source"])
    fmt = np.asarray(ds["format"])
    klen = np.asarray(kept["length"])
    per = []
    for i in sorted(set(src.tolist())):
        sel = src == i
        per.append({"source": sources[i].path,
                    "formats": {f: int((fmt[sel] == f).sum()) for f in sorted(set(fmt[sel].tolist()))},
                    "examples": int(sel.sum()), "kept": int((sel & (trainable > 0)).sum()),
                    "tokens": int(length[sel].sum()), "trainable_tokens": int(trainable[sel].sum())})
    pct = (lambda q: int(np.percentile(klen, q))) if len(klen) else (lambda q: 0)
    thinking = {}
    if "think" in ds.column_names:  # conversations whose trained turns reason, and those whose turns do not
        think = np.asarray(ds["think"])
        thinking = {"thinking": int((think == 1).sum()), "non_thinking": int((think == 0).sum())}
    return {"examples": int(len(ds)), **thinking, "kept": int(len(kept)),
            "dropped_no_trainable": int((trainable == 0).sum()),
            "truncated": int(truncated.sum()), "tokens": int(klen.sum()),
            "trainable_tokens": int(trainable[trainable > 0].sum()),
            "length": {"p50": pct(50), "p90": pct(90), "p99": pct(99), "max": int(klen.max()) if len(klen) else 0},
            "max_length": max_length, "per_source": per}


def preview(data: DataConfig, tokenizer, model_name: str, chat_template: str | None, trains, n: int = 3):
    """Normalize everything (so every error shows) and tokenize the first n examples: (segments, counts)."""
    sources, template, warning, markers = _setup(data, tokenizer, model_name, chat_template, trains)
    rejects: list[dict] = []
    per_source = [load_examples(s, data.on_error, rejects, data.system_prompt, trains, _thinking(data))
                  for s in sources]
    first = [(i, ex) for i, items in enumerate(per_source) for ex in items][:n]
    counts = [(s.path, len(items)) for s, items in zip(sources, per_source)]
    if trains.kind == "prompts":
        return prompts.preview(first, tokenizer, template, data), counts, len(rejects), warning
    if trains.kind != "lm":
        return preference.preview(first, tokenizer, template, markers, data), counts, len(rejects), warning
    enc = _tokenize_batch({"conv": [json.dumps(e.messages) if e.messages else None for _, e in first],
                           "text": [e.text for _, e in first], "where": [e.where for _, e in first],
                           "tools": [json.dumps(e.tools) if e.tools else None for _, e in first],
                           "train_from": [e.train_from for _, e in first]},
                          tokenizer, template, markers, data.max_length,
                          str(data.train_on), data.enable_thinking, data.ignore_empty_think)
    shown = []
    for (_, ex), ids, labels in zip(first, enc["input_ids"], enc["labels"]):
        segs, cur, buf = [], None, []
        for tid, lab in zip(ids.tolist(), labels.tolist()):
            t = lab != -100
            if cur is not None and t != cur:
                segs.append((tokenizer.decode(buf), cur))
                buf = []
            cur = t
            buf.append(tid)
        if buf:
            segs.append((tokenizer.decode(buf), cur))
        shown.append((ex.where, ex.format, segs))
    return shown, counts, len(rejects), warning
