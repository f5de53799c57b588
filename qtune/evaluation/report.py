"""<run>/eval/: results.jsonl (every answer), summary.json, report.md (tables, best and worst examples,
settings) and chart.png — each written atomically."""
from __future__ import annotations

import io
import json
from datetime import datetime, timezone
from pathlib import Path

from qtune.config.schema import Config
from qtune.io import atomic_write_bytes, atomic_write_json, atomic_write_text

METRICS = [("heldout_loss", "held-out loss", ".4f"), ("perplexity", "perplexity", ".2f"),
           ("reward_accuracy", "held-out reward accuracy", ".3f"), ("reward_margin", "held-out reward margin", ".3f"),
           ("reward", "held-out mean reward", ".3f"), ("pass@1", "held-out pass@1 (exact_answer)", ".3f"),
           ("facts_right", "facts right", ".2f"), ("exact_match", "exact match", ".2f"), ("f1", "token F1", ".3f"),
           ("rouge_l", "ROUGE-L", ".3f"),
           ("consistency", "consistency", ".2f"), ("judge_accuracy", "judge accuracy", ".2f"),
           ("judge_helpfulness", "judge helpfulness", ".2f"), ("judge_tone", "judge tone", ".2f"),
           ("ttft_s", "time to first token (s)", ".3f"), ("tok_s", "tokens/s", ".1f")]


def fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def write_report(out: Path, run: Path, cfg: Config, summary: dict, results: list[dict], unscored: list[str],
                 heldout_rows: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.jsonl", "".join(json.dumps(r, default=str) + "\n" for r in results))
    report = {"run": str(run), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "models": summary, "heldout_rows": heldout_rows, "unscored": unscored,
              "settings": {"prompts": cfg.eval.prompts, "repeats": cfg.eval.repeats,
                           "max_new_tokens": cfg.eval.max_new_tokens, "judge_url": cfg.eval.judge_url,
                           "judge_model": cfg.eval.judge_model, "data": cfg.eval.data,
                           "lm_eval": {"tasks": list(cfg.eval.lm_eval.tasks), "include_path": cfg.eval.lm_eval.include_path,
                                       "limit": cfg.eval.lm_eval.limit, "num_fewshot": cfg.eval.lm_eval.num_fewshot}
                           if cfg.eval.lm_eval.tasks else None}}
    atomic_write_json(out / "summary.json", report)
    atomic_write_text(out / "report.md", markdown(report, results))
    chart(out / "chart.png", summary)
    return report


LM_EVAL = "lm_eval/"  # a model's lm-eval scores: "lm_eval/<task>/<metric>" keys beside qtune's own


def lm_eval_keys(summary: dict) -> list[str]:
    return list(dict.fromkeys(k for v in summary.values() for k in v if k.startswith(LM_EVAL)))


def _shown(summary: dict) -> list[tuple[str, str, str]]:
    ours = [m for m in METRICS if any(v.get(m[0]) is not None for v in summary.values())]
    return ours + [(k, f"{k.removeprefix(LM_EVAL).replace('/', ' ')} (lm-eval)", ".4f") for k in lm_eval_keys(summary)]


def summary_table(summary: dict) -> list[str]:
    """The markdown table of every measure some model has (rows) by model (columns)."""
    names = list(summary)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key, label, spec in _shown(summary):
        lines.append(f"| {label} | " + " | ".join(fmt(summary[n].get(key), spec) for n in names) + " |")
    return lines


def markdown(report: dict, results: list[dict]) -> str:
    summary = report["models"]
    names = list(summary)
    lines = [f"# Evaluation of `{report['run']}`", "", f"{report['date']}", "", "## Summary", "", *summary_table(summary)]
    if any(v.get("reward_accuracy") is not None for v in summary.values()):
        lines += ["", f"Over {report['heldout_rows']} held-out rows: reward accuracy is the share of pairs whose chosen "
                  "answer gets the higher reward, reward margin the mean reward of chosen less rejected answers "
                  "(dpo, kto: the implicit reward against the base; rm: the score head's output); higher is better."]
    else:
        lines += ["", f"Held-out loss is the mean loss per trained token over {report['heldout_rows']} held-out rows; "
                  "lower is better."]
    if report["unscored"]:
        lines += ["", f"**The judge failed on {len(report['unscored'])} answers; these rows have no score:** "
                  + ", ".join(report["unscored"])]
    by_prompt: dict[int, dict[str, dict]] = {}
    for r in results:
        by_prompt.setdefault(r["prompt_id"], {})[r["model"]] = r
    if by_prompt:
        lines += ["", "## Answers side by side", ""]
        lines += ["| prompt | reference | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for pid in sorted(by_prompt):
            rows = by_prompt[pid]
            first = next(iter(rows.values()))
            cells = [_cell(rows[n]["answer"]) if n in rows else "" for n in names]
            lines.append(f"| {_cell(first['prompt'])} | {_cell(first['reference'] or '')} | " + " | ".join(cells) + " |")
        key = _ranking_key(results)
        if key:
            target = names[-1] if len(names) > 1 else names[0]
            ranked = sorted((r for r in results if r["model"] == target and _score(r, key) is not None),
                            key=lambda r: _score(r, key))
            lines += ["", f"## Worst and best answers of `{target}` (by {key})", ""]
            k = max(1, min(3, len(ranked) // 2))  # few prompts: no answer is both worst and best
            for label, rows in (("worst", ranked[:k]), ("best", ranked[::-1][:k])):
                for r in rows:
                    lines.append(f"- **{label}** ({key} {_score(r, key):.2f}) {r['where']}: _{_cell(r['prompt'])}_ → "
                                 f"{_cell(r['answer'])}" + (f" (reference: {_cell(r['reference'])})" if r['reference'] else "")
                                 + (f" — judge: {_cell(r['judge']['rationale'])}" if r.get("judge") else ""))
    s = report["settings"]
    lines += ["", "## Settings", "", f"- prompts: `{s['prompts']}`, repeats: {s['repeats']}, "
              f"max_new_tokens: {s['max_new_tokens']}", f"- judge: {s['judge_url'] or 'none'}"
              + (f" (model {s['judge_model']})" if s["judge_model"] else ""),
              f"- held-out data: {s['data'] or 'the run’s eval split'}"]
    if s.get("lm_eval"):
        h = s["lm_eval"]
        lines.append(f"- lm-eval tasks: {', '.join(h['tasks'])}" + (f" (from {h['include_path']})" if h["include_path"] else "")
                     + f", limit: {h['limit'] if h['limit'] is not None else 'none'}, num_fewshot: "
                     f"{h['num_fewshot'] if h['num_fewshot'] is not None else 'each task’s'}")
    lines.append("")
    return "\n".join(lines)


def _ranking_key(results: list[dict]) -> str | None:
    if any(r.get("judge") for r in results):
        return "judge accuracy"
    if any(r.get("rouge_l") is not None for r in results):
        return "ROUGE-L"
    return None


def _score(r: dict, key: str):
    if key == "judge accuracy":
        return (r.get("judge") or {}).get("accuracy")
    return r.get("rouge_l")


def _cell(text) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")[:300]


def chart(path: Path, summary: dict) -> None:
    """Bars per model: held-out loss, the answer metrics that exist (0–1 scale) and the lm-eval scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    scores = [k for k in ("facts_right", "exact_match", "f1", "rouge_l", "consistency") if any(summary[n].get(k) is not None for n in names)]
    harness = lm_eval_keys(summary)
    panels = 1 + bool(scores) + bool(harness)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), dpi=110, squeeze=False)
    ax = axes[0][0]
    key, title = (("heldout_loss", "held-out loss (lower is better)")
                  if any(summary[n].get("heldout_loss") is not None for n in names)
                  else ("reward", "held-out mean reward (higher is better)")
                  if any(summary[n].get("reward") is not None for n in names)
                  else ("reward_accuracy", "held-out reward accuracy (higher is better)"))
    losses = [summary[n].get(key) or 0 for n in names]
    ax.bar(names, losses, color=["tab:gray", "tab:blue", "tab:green", "tab:orange", "tab:red"][:len(names)])
    ax.set_title(title)
    for i, v in enumerate(losses):
        ax.text(i, v, f"{v:.3f}", ha="center", va="bottom")
    if scores:
        ax = axes[0][1]
        width = 0.8 / len(names)
        for i, n in enumerate(names):
            ax.bar([j + i * width for j in range(len(scores))], [summary[n].get(k) or 0 for k in scores], width, label=n)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(scores))], scores)
        ax.set_ylim(0, 1.05)
        ax.set_title("answers (higher is better)")
        ax.legend()
    if harness:
        ax = axes[0][panels - 1]
        width = 0.8 / len(names)
        for i, n in enumerate(names):
            ax.bar([j + i * width for j in range(len(harness))], [summary[n].get(k) or 0 for k in harness], width, label=n)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(harness))],
                      [k.removeprefix(LM_EVAL).replace("/", "\n") for k in harness])
        ax.set_title("lm-eval tasks")
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
