"""The model card (README.md) `qtune push` writes beside what it uploads: the base model, the data (sources and
counts from the run's data.json), the settings, the final losses and the loss plot (summary.json, loss.png) and, when
the run was evaluated, the table of eval/summary.json. Everything comes from the run folder; nothing loads a model."""
from __future__ import annotations

import json
from pathlib import Path

from qtune.config.schema import Config, ModelSource, QuantMethod

USES = {
    "adapter": ("peft", "a LoRA adapter"),
    "merged": ("transformers", "a merged model (the LoRA adapter folded into the 16-bit base weights)"),
    "gguf": (None, "GGUF files of the merged model (with an Ollama Modelfile each)"),
}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def hub_base(rcfg: Config) -> str | None:
    """The base model's Hub id, where it has one (a random test model or a local folder has none)."""
    return rcfg.model.repo_id if rcfg.model.source in (ModelSource.hub, ModelSource.package) else None


def _n(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def model_card(run: Path, rcfg: Config, what: str, repo_id: str, files: list[str]) -> str:
    library, kind = USES[what]
    base = hub_base(rcfg)
    qlora = rcfg.quant.method is not QuantMethod.none
    tags = ["qtune", "qlora" if qlora else "lora", rcfg.train.stage] + (["gguf"] if what == "gguf" else [])
    front = ["---"] + ([f"base_model: {base}"] if base else []) + ([f"library_name: {library}"] if library else []) + \
        ["pipeline_tag: text-generation", "tags:"] + [f"- {t}" for t in tags] + ["---", ""]
    on = f"[{base}](https://huggingface.co/{base})" if base else f"`{rcfg.model.name}`"
    lines = front + [f"# {repo_id.split('/')[-1]}", "",
                     f"{kind[0].upper() + kind[1:]} of {on}, trained with qtune (train.stage={rcfg.train.stage}, "
                     f"{'QLoRA on a ' + str(rcfg.quant.method) + ' base' if qlora else 'LoRA'}, r={rcfg.lora.r}, "
                     f"alpha={rcfg.lora.alpha}).", ""]
    lines += _usage(what, base or rcfg.model.name, repo_id, files)
    lines += _data(run, rcfg)
    lines += _settings(rcfg)
    lines += _results(run)
    lines += _evaluation(run)
    return "\n".join(lines).rstrip() + "\n"


def _usage(what: str, base: str, repo_id: str, files: list[str]) -> list[str]:
    if what == "adapter":
        code = ["from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer", "",
                f'model = AutoPeftModelForCausalLM.from_pretrained("{repo_id}")  # loads {base} beneath it',
                f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")']
        return ["## Use", "", "```python", *code, "```", ""]
    if what == "merged":
        code = ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
                f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")']
        return ["## Use", "", "```python", *code, "```", ""]
    ggufs = [f for f in files if f.endswith(".gguf")]
    first = ggufs[0].removesuffix(".gguf") if ggufs else ""
    modelfile = f"{first}.Modelfile" if f"{first}.Modelfile" in files else None
    fetch = " ".join(x for x in (ggufs[0] if ggufs else None, modelfile) if x)
    return ["## Use", "", "Files: " + ", ".join(f"`{f}`" for f in ggufs) + ".", "",
            "```sh", f"hf download {repo_id} {fetch} --local-dir .",
            *([f"ollama create {repo_id.split('/')[-1]} -f {modelfile}"] if modelfile else []), "```", ""]


def _data(run: Path, rcfg: Config) -> list[str]:
    counts = _read_json(run / "data.json") or {}
    d = rcfg.data
    paths = [d.path] if d.path else [s.path for s in d.sources]
    lines = ["## Training data", ""]
    per = {s["source"]: s for s in (counts.get("train") or {}).get("per_source", [])}
    held = {s["source"]: s for s in (counts.get("eval") or {}).get("per_source", [])}
    lines += ["| source | train examples | held-out examples | train tokens |", "|---|---|---|---|"]
    for p in dict.fromkeys(paths + ([d.eval_path] if d.eval_path else []) + list(per) + list(held)):
        name = Path(p).name if p and not _hub_dataset(p) else p
        lines.append(f"| `{name}` | {_n((per.get(p) or {}).get('kept'))} | {_n((held.get(p) or {}).get('kept'))} | "
                     f"{_n((per.get(p) or {}).get('tokens'))} |")
    if counts.get("train"):
        t, e = counts["train"], counts.get("eval") or {}
        lines += ["", f"{_n(t.get('kept'))} training examples ({_n(t.get('tokens'))} tokens), {_n(e.get('kept', 0))} "
                  f"held out; data.max_length={d.max_length}, packing={str(d.packing).lower()}, "
                  f"train_on={d.train_on}."]
    else:
        lines += ["", "(The run folder holds no data.json, so the counts are not known here.)"]
    return lines + [""]


def _hub_dataset(path: str) -> bool:
    from qtune.io import is_hub_dataset

    return is_hub_dataset(path)


def _settings(rcfg: Config) -> list[str]:
    t, lo = rcfg.train, rcfg.lora
    rows = [("base model", rcfg.model.repo_id if hub_base(rcfg) else rcfg.model.name),
            ("quant", str(rcfg.quant.method)), ("stage", t.stage),
            ("LoRA", f"r={lo.r}, alpha={lo.alpha}, dropout={lo.dropout:g}"
                     + (", rsLoRA" if lo.use_rslora else "") + (", DoRA" if lo.use_dora else "")),
            ("LoRA targets", lo.target_regex or ", ".join(lo.target_modules)),
            ("learning rate", f"{t.lr:g} ({t.scheduler}, warmup {t.warmup_ratio:g})"),
            ("batch", f"{t.batch_size} × {t.grad_accum} accumulation"),
            ("length", f"{t.max_steps} steps" if t.max_steps > 0 else f"{t.epochs:g} epochs"),
            ("seed", str(t.seed))]
    return ["## Settings", "", "| setting | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]


def _results(run: Path) -> list[str]:
    s = _read_json(run / "summary.json") or {}
    rows = [("steps", s.get("steps")), ("epochs", s.get("epochs")), ("final train loss", s.get("train_loss")),
            ("final held-out loss", s.get("eval_loss")), ("best held-out loss", s.get("best_eval_loss")),
            ("tokens", s.get("tokens")), ("training time (s)", s.get("seconds"))]
    lines = ["## Training", "", "| | |", "|---|---|", *[f"| {k} | {_n(v)} |" for k, v in rows if v is not None], ""]
    if (run / "loss.png").is_file():
        lines += ["![training and held-out loss](loss.png)", ""]
    return lines


def _evaluation(run: Path) -> list[str]:
    report = _read_json(run / "eval" / "summary.json")
    if not report or not report.get("models"):
        return []
    from qtune.evaluation.report import summary_table

    return ["## Evaluation", "", f"`qtune eval` ({report.get('date', '')}), {report.get('heldout_rows', 0)} held-out "
            "rows:", "", *summary_table(report["models"]), ""]
