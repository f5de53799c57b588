"""`qtune eval`: is the fine-tune better than the base model? Numbers and a report one can share.

  1. what to compare: `eval.models` (base, adapter, merged, other run folders, model folders); by default
     the run's base, its adapter and, when present, its merged model
  2. held-out loss and perplexity of each on the run's eval split (or `eval.data`, prepared the same way); for dpo,
     kto and rm runs the held-out preference figures instead (qtune.evaluation.preference: reward accuracy and margin)
  3. with `eval.prompts`: each model answers every prompt (greedy, or `eval.repeats` sampled answers for
     consistency), timed (time to first token, tokens/s), scored against references (exact match, token
     F1, ROUGE-L) and, with `eval.judge_url`, by an LLM judge (1-5: accuracy, helpfulness, tone)
  4. <run>/eval/: results.jsonl, summary.json, report.md, chart.png; a Rich table in the terminal
The base and the adapter share one loaded model (the adapter is switched off for the base), so a run's
comparison loads its weights once, plus the merged model if there is one.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

from qtune.config.schema import Config
from qtune.errors import ConfigError, DataError


@dataclass
class Candidate:
    name: str            # base | adapter | merged | a folder's name
    kind: str            # base | adapter | model
    path: Path | None    # adapter folder or model folder


def run(cfg: Config):
    from qtune import ui
    from qtune.evaluation.report import write_report
    from qtune.runs import run_config, run_folder
    from qtune.modeling.load import pick_device, quiet_libraries

    if cfg.run and (Path(cfg.run).expanduser() / "summary.csv").is_file():
        return evaluate_sweep(cfg, Path(cfg.run).expanduser())
    run = run_folder(cfg)
    rcfg = run_config(run, cfg)
    stage = rcfg.train.stage
    if stage == "rm" and cfg.eval.prompts:
        raise ConfigError(f"eval.prompts: {run} is a reward model (train.stage=rm), which writes no answers; its eval "
                          "is the pairwise accuracy on held-out pairs (the run's eval split, or eval.data)")
    prompts = load_prompts(Path(cfg.eval.prompts).expanduser()) if cfg.eval.prompts else []
    candidates = _candidates(cfg, run, stage)                                      # 1
    judge = None
    if cfg.eval.judge_url:
        if not prompts:
            raise ConfigError("eval.judge_url needs eval.prompts: the judge scores answers to a prompt set")
        from qtune.evaluation.judge import Judge

        judge = Judge(cfg.eval)  # unreachable: one line now, before any model loads
    quiet_libraries()
    device, dtype = pick_device(rcfg.train.device, rcfg.train.dtype)
    tokenizer, rows = _heldout(rcfg, cfg)
    out = Path(cfg.eval.output_dir).expanduser() if cfg.eval.output_dir else run / "eval"
    results, summary, reference = [], {}, None
    groups = _load_groups(candidates)
    if stage in ("dpo", "kto") and rows and not any(c.kind != "model" for g in groups for c in g):
        groups.insert(0, [Candidate("base", "base", None)])  # the reference the implicit rewards are measured against
    for group in groups:
        loaded = _load(rcfg, group, tokenizer, device, dtype)
        if stage in ("dpo", "kto") and rows and group[0].kind != "model":
            from qtune.evaluation.preference import answer_logps

            with loaded.using("base"):
                reference = answer_logps(loaded.model, rows)
        for cand in (c for c in group if c in candidates):
            ui.info(f"evaluating {cand.name}")
            with loaded.using(cand.name):
                summary[cand.name] = _heldout_figures(rcfg, loaded, cand, rows, reference)   # 2
                answers = [answer(loaded, p, cfg, rcfg, i) for i, p in enumerate(prompts)]   # 3
            for a in answers:
                a["model"] = cand.name
            results += answers
        del loaded
    unscored = _judge(judge, results) if judge else []
    for name in summary:
        summary[name].update(_aggregate([r for r in results if r["model"] == name]))
    report = write_report(out, run, cfg, summary, results, unscored, len(rows))  # 4
    ui.show_eval_summary(summary, out, unscored)
    return report


def evaluate_sweep(cfg: Config, folder: Path) -> list[dict]:
    """A sweep folder: evaluate each job's adapter, then add the numbers to the sweep's summary tables."""
    import copy
    import csv

    from qtune import ui
    from qtune.runs import write_summary

    rows = list(csv.DictReader(open(folder / "summary.csv")))
    for row in rows:
        job = Path(row["run"])
        if row.get("error") or not (job / "adapter" / "adapter_config.json").is_file():
            continue
        jcfg = copy.deepcopy(cfg)
        jcfg.run, jcfg.eval.models, jcfg.eval.output_dir = str(job), ["adapter"], None
        report = run(jcfg)["models"]["adapter"]
        row.update({f"eval_{k}": report.get(k) for k in SWEEP_COLUMNS})
    from qtune.stages import SWEEP_COLUMNS as STAGE_COLUMNS

    trained = [c for c in STAGE_COLUMNS if c in (rows[0] if rows else {})]  # the training's own figures stay in the tables
    for row in rows:
        for key in ("train_loss", "eval_loss", "seconds", "peak_memory_bytes", *trained):
            row[key] = float(row[key]) if row.get(key) not in (None, "") else None
        row["job"] = int(row["job"])
        row["overrides"] = row["overrides"].split()
        row["error"] = row.get("error") or None
        for k in SWEEP_COLUMNS:
            v = row.get(f"eval_{k}")
            row[f"eval_{k}"] = float(v) if v not in (None, "") else None
    extra = trained + [f"eval_{k}" for k in SWEEP_COLUMNS]
    ui.show_sweep_summary(write_summary(rows, folder, extra, shared_overrides_known=True), folder, extra)
    return rows


SWEEP_COLUMNS = ("heldout_loss", "reward_accuracy", "reward_margin", "rouge_l", "judge_accuracy")


# ---------------------------------------------------------------- inputs


def load_prompts(path: Path) -> list[dict]:
    """The prompt set: records (JSONL, JSON, CSV, Parquet) with "prompt" and optional "system", "reference"."""
    from qtune.data.formats import read_records

    if not path.is_file():
        raise DataError(f"eval.prompts={path}: no such file")
    prompts = []
    for rec in read_records(path):  # malformed lines stop with file:line
        data = rec.data
        if not isinstance(data.get("prompt"), str) or not data["prompt"].strip():
            raise DataError(f'{rec.where}: each line needs a non-empty "prompt" string (optional: "system", "reference")')
        for key in ("system", "reference"):
            if data.get(key) is not None and not isinstance(data[key], str):
                raise DataError(f"{rec.where}: {key!r} must be a string")
        prompts.append({"prompt": data["prompt"], "system": data.get("system"), "reference": data.get("reference"),
                        "where": rec.where.rsplit("/", 1)[-1]})
    if not prompts:
        raise DataError(f"eval.prompts={path}: no prompts in the file")
    return prompts


def _candidates(cfg: Config, run: Path, stage: str) -> list[Candidate]:
    merged = ["merged"] if (run / "merged" / "config.json").is_file() else []
    if stage == "rm" and "base" in cfg.eval.models:
        raise ConfigError(f"eval.models: base: {run} is a reward model, and its base has no trained score head "
                          "(the head is in the adapter); compare adapter and merged")
    names = list(cfg.eval.models) or ([] if stage == "rm" else ["base"]) + ["adapter"] + merged
    out = _candidate_list(names, run)
    from qtune import integrity
    from qtune.runs import check_adapter

    for c in out:  # a damaged file is one line now, before any model loads
        if c.kind == "adapter":
            check_adapter(c.path)
        elif c.kind == "model":
            remedy = (f"run `qtune merge run={run}` again to replace it" if c.path == run / "merged"
                      else "save or download that model again")
            integrity.check_model(c.path, remedy)
    return out


def _candidate_list(names: list[str], run: Path) -> list[Candidate]:
    from qtune.runs import find_adapter

    out = []
    for name in names:
        if name == "base":
            out.append(Candidate("base", "base", None))
        elif name == "adapter":
            out.append(Candidate("adapter", "adapter", run / "adapter"))
        elif name == "merged":
            if not (run / "merged" / "config.json").is_file():
                raise ConfigError(f"eval.models: {run}/merged does not exist; run `qtune merge run={run}` first")
            out.append(Candidate("merged", "model", run / "merged"))
        else:
            p = Path(name).expanduser()
            if find_adapter(p) is not None:
                out.append(Candidate(p.name, "adapter", find_adapter(p)))
            elif (p / "config.json").is_file():
                out.append(Candidate(p.name, "model", p))
            else:
                raise ConfigError(f"eval.models: {name}: not base, adapter, merged, a run folder, an adapter folder "
                                  "or a model folder")
    return out


def _load_groups(candidates: list[Candidate]) -> list[list[Candidate]]:
    """Base and adapters share one loaded base; every model folder loads on its own."""
    shared = [c for c in candidates if c.kind in ("base", "adapter")]
    return ([shared] if shared else []) + [[c] for c in candidates if c.kind == "model"]


def _heldout(rcfg: Config, cfg: Config):
    from qtune.data.prepare import prepare
    from qtune.modeling.load import load_tokenizer

    tokenizer = load_tokenizer(rcfg.model, rcfg.paths)
    data = rcfg.data
    if cfg.eval.data:
        data.path, data.sources, data.eval_path, data.val_size = cfg.eval.data, [], cfg.eval.data, 0.0
    elif not (data.eval_path or data.val_size):
        return tokenizer, []
    prepared = prepare(data, tokenizer, rcfg.model.name, rcfg.model.chat_template, rcfg.train.stage)
    ds = prepared.load("eval")
    rows = [] if ds is None else [ds[i] for i in range(len(ds))]
    return tokenizer, rows[:cfg.eval.max_eval_rows] if cfg.eval.max_eval_rows else rows


# ---------------------------------------------------------------- models


def _load(rcfg: Config, group: list[Candidate], tokenizer, device: str, dtype):
    """One model for the group (inference's loaders): a model folder, or the base with the group's adapters, where
    `using("base")` switches the adapters off."""
    from qtune.data.template import resolve_template
    from qtune.inference import Loaded, load_folder, load_with_adapters
    from qtune.ui import print_warning

    template, _ = resolve_template(tokenizer, rcfg.model.chat_template, rcfg.model.name)
    if group[0].kind == "model":
        return Loaded(load_folder(group[0].path, device, dtype), tokenizer, template, group[0].name)
    adapters = {c.name: c.path for c in group if c.kind == "adapter"}
    return Loaded(load_with_adapters(rcfg, adapters, device, dtype, warn=print_warning, key="eval.models"), tokenizer,
                  template, "base", adapters)


def _heldout_figures(rcfg: Config, loaded, cand: Candidate, rows: list[dict], reference) -> dict:
    """What the held-out rows say about one candidate: loss and perplexity (pt, sft), or the stage's preference
    figures (qtune.evaluation.preference): for dpo and kto against the base, which has none of its own."""
    stage = rcfg.train.stage
    if not rows:
        return {}
    if stage in ("pt", "sft"):
        loss = heldout_loss(loaded.model, rows)
        return {"heldout_loss": loss, "perplexity": math.exp(loss)}
    from qtune.evaluation import preference

    if stage == "rm":
        return preference.figures(preference.scores(loaded.model, rows, loaded.tokenizer.pad_token_id))
    if cand.kind == "base":
        return {"reward_accuracy": None, "reward_margin": None}
    beta = rcfg.train.dpo.beta if stage == "dpo" else rcfg.train.kto.beta
    rewards = beta * (preference.answer_logps(loaded.model, rows) - reference)
    return preference.figures(rewards, [r.get("label") for r in rows])


def heldout_loss(model, rows: list[dict]) -> float:
    """Mean loss per trained token over the held-out rows (packed rows keep their sequence boundaries)."""
    import torch

    from qtune.data.prepare import row_tensors

    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            batch = row_tensors(row, device, labels=True)
            n = int((batch["labels"][:, 1:] != -100).sum())
            if n == 0:
                continue
            loss = model(**batch, use_cache=False).loss
            total += loss.item() * n
            count += n
    return total / count if count else float("nan")


def answer(loaded, prompt: dict, cfg: Config, rcfg: Config, index: int) -> dict:
    """The model's answer(s) to one prompt, timed, with reference metrics."""
    import torch

    from qtune.evaluation.metrics import consistency, reference_scores
    from qtune.inference import answer as generate, prompt_tensors

    messages = ([{"role": "system", "content": prompt["system"]}] if prompt["system"] else []) + \
        [{"role": "user", "content": prompt["prompt"]}]
    inputs = prompt_tensors(loaded.model, loaded.tokenizer, loaded.template, messages, cfg.chat.enable_thinking)
    sample = cfg.eval.repeats > 1
    # one answer is greedy; `eval.repeats` answers are drawn with the chat settings (both keep its repetition penalty)
    sampling = cfg.chat if sample else dataclasses.replace(cfg.chat, temperature=0)
    answers, timings = [], []
    for k in range(cfg.eval.repeats):
        torch.manual_seed(rcfg.train.seed + 1000 * index + k)
        clock = _Clock()
        text, n_new = generate(loaded.model, loaded.tokenizer, inputs, cfg.eval.max_new_tokens, sampling, streamer=clock)
        answers.append(text)
        timings.append(clock.result(n_new))
    row = {"prompt_id": index, "where": prompt["where"], "prompt": prompt["prompt"], "reference": prompt["reference"],
           "answer": answers[0], "answers": answers if sample else None,
           "consistency": consistency(answers) if sample else None,
           "ttft_s": _median([t[0] for t in timings]), "tok_s": _median([t[1] for t in timings]),
           "new_tokens": timings[0][2], "judge": None, "judge_error": None}
    scores = [reference_scores(a, prompt["reference"]) for a in answers]
    for key in ("exact_match", "f1", "rouge_l"):
        row[key] = sum(s[key] for s in scores) / len(scores) if scores and key in scores[0] else None
    return row


class _Clock:
    """A generate() streamer that only keeps time: the prompt arrives first, then each new token."""

    def __init__(self):
        self.start = time.perf_counter()
        self.first = None
        self.stop = None
        self.calls = 0

    def put(self, value):
        self.calls += 1
        if self.calls == 2:
            self.first = time.perf_counter()

    def end(self):
        self.stop = time.perf_counter()

    def result(self, n_new: int) -> tuple[float, float | None, int]:
        self.stop = self.stop or time.perf_counter()
        first = self.first or self.stop
        rate = (n_new - 1) / (self.stop - first) if n_new > 1 and self.stop > first else None
        return first - self.start, rate, n_new


def _median(xs):
    xs = sorted(x for x in xs if x is not None)
    return xs[len(xs) // 2] if xs else None


# ---------------------------------------------------------------- judge and aggregates


def _judge(judge, results: list[dict]) -> list[str]:
    """Score every answer; a failure leaves that row unscored (with its error) and the rest intact."""
    from qtune import ui

    unscored = []
    with ui.status(f"judging {len(results)} answers with {judge.model}"):
        for r in results:
            try:
                r["judge"] = judge.score(r["prompt"], r["answer"], r["reference"])
            except Exception as e:
                r["judge_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                unscored.append(f"{r['model']} / {r['where']}")
    if unscored:
        ui.print_warning(f"the judge failed on {len(unscored)} of {len(results)} answers; those rows have no score: "
                         + ", ".join(unscored[:10]) + (" …" if len(unscored) > 10 else ""))
    return unscored


def _aggregate(rows: list[dict]) -> dict:
    def mean(key, sub=None):
        vals = [(r[key] or {}).get(sub) if sub else r[key] for r in rows]
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else None

    out = {k: mean(k) for k in ("exact_match", "f1", "rouge_l", "consistency")}
    out["ttft_s"] = _median([r["ttft_s"] for r in rows])
    out["tok_s"] = _median([r["tok_s"] for r in rows])
    for c in ("accuracy", "helpfulness", "tone"):
        out[f"judge_{c}"] = mean("judge", c)
    out["prompts"] = len(rows)
    out["unscored"] = sum(1 for r in rows if r["judge"] is None and r["judge_error"])
    return out
