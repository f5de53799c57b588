"""`qtune eval`: is the fine-tune better than the base model? Numbers and a report one can share.

  1. what to compare: `eval.models` (base, adapter, merged, other run folders, model folders); by default
     the run's base, its adapter and, when present, its merged model
  2. held-out loss and perplexity of each on the run's eval split (or `eval.data`, prepared the same way); for dpo,
     kto and rm runs the held-out preference figures instead (qtune.evaluation.preference: reward accuracy and margin)
  3. with `eval.prompts`: each model answers every prompt (greedy, or `eval.repeats` sampled answers for
     consistency), timed (time to first token, tokens/s), scored against references (exact match, token
     F1, ROUGE-L) and, with `eval.judge_url`, by an LLM judge (1-5: accuracy, helpfulness, tone)
  4. with `eval.lm_eval.tasks`: EleutherAI's lm-eval tasks on each model as loaded here (qtune.evaluation.harness);
     their scores join the same table
  5. <run>/eval/: results.jsonl, summary.json, report.md, chart.png; a Rich table in the terminal
The base and the adapter share one loaded model (the adapter is switched off for the base), so a run's
comparison loads its weights once, plus the merged model if there is one.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qtune import stages
from qtune.config.schema import Config
from qtune.errors import ConfigError


@dataclass
class Candidate:
    name: str            # base | adapter | merged | a folder's name
    kind: str            # base | adapter | model
    path: Path | None    # adapter folder or model folder


def run(cfg: Config):
    from qtune import ui
    from qtune.inference.scoring import Scorer
    from qtune.stages import rewards

    rewards.use_scorer(Scorer)   # a grpo run's reward_model reward loads its rm run as inference does
    from qtune.evaluation import heldout
    from qtune.evaluation.answers import aggregate, answer, load_prompts
    from qtune.evaluation.report import write_report
    from qtune.runs import run_config, run_folder
    from qtune.modeling.load import pick_device, quiet_libraries

    if cfg.run and (Path(cfg.run).expanduser() / "summary.csv").is_file():
        return evaluate_sweep(cfg, Path(cfg.run).expanduser())
    run = run_folder(cfg)
    rcfg = run_config(run, cfg)
    stage = stages.get(rcfg.train.stage)
    if not stage.writes and cfg.eval.prompts:
        raise ConfigError(f"eval.prompts: {run} is a reward model (train.stage={stage.name}), which writes no answers; its eval "
                          "is the pairwise accuracy on held-out pairs (the run's eval split, or eval.data)")
    prompts = load_prompts(Path(cfg.eval.prompts).expanduser()) if cfg.eval.prompts else []
    candidates = _candidates(cfg, run, stage)                                      # 1
    judge = None
    if cfg.eval.judge_url:
        if not prompts:
            raise ConfigError("eval.judge_url needs eval.prompts: the judge scores answers to a prompt set")
        from qtune.evaluation.judge import Judge

        judge = Judge(cfg.eval)  # unreachable: one line now, before any model loads
    harness = None
    if cfg.eval.lm_eval.tasks:
        if not stage.writes:
            raise ConfigError(f"eval.lm_eval.tasks: {run} is a reward model (train.stage={stage.name}), which lm-eval's "
                              "tasks cannot score (they read a language model's next-token probabilities)")
        from qtune.evaluation import harness

        manager = harness.task_manager(cfg.eval.lm_eval)  # not installed, an unknown task: one line, before any load
    quiet_libraries()
    device, dtype = pick_device(rcfg.train.device, rcfg.train.dtype)
    tokenizer, rows = _heldout(rcfg, cfg)
    out = Path(cfg.eval.output_dir).expanduser() if cfg.eval.output_dir else run / "eval"
    results, summary, reference = [], {}, None
    groups = _load_groups(candidates)
    if heldout.needs_reference(stage) and rows and not any(c.kind != "model" for g in groups for c in g):
        groups.insert(0, [Candidate("base", "base", None)])  # the reference the implicit rewards are measured against
    for group in groups:
        loaded = _load(rcfg, group, tokenizer, device, dtype)
        if heldout.needs_reference(stage) and rows and group[0].kind != "model":
            from qtune.evaluation.preference import answer_logps

            with loaded.using("base"):
                reference = answer_logps(loaded.model, rows)
        for cand in (c for c in group if c in candidates):
            ui.info(f"evaluating {cand.name}")
            with loaded.using(cand.name):
                summary[cand.name] = heldout.figures(stage, loaded, cand.kind == "base", rows, reference,  # 2
                                                     stage.beta(rcfg.train), rcfg.train)
                answers = [answer(loaded, p, cfg, rcfg, i) for i, p in enumerate(prompts)]   # 3
                if harness:                                                                   # 4
                    with ui.status(f"lm-eval: {', '.join(cfg.eval.lm_eval.tasks)} on {cand.name}"):
                        summary[cand.name].update(harness.scores(loaded.model, tokenizer, manager, cfg.eval.lm_eval))
            for a in answers:
                a["model"] = cand.name
            results += answers
        del loaded
    unscored = _judge(judge, results) if judge else []
    for name in summary:
        summary[name].update(aggregate([r for r in results if r["model"] == name]))
    report = write_report(out, run, cfg, summary, results, unscored, len(rows))  # 5
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
        trained = "model" if (job / "model" / "config.json").is_file() else "adapter"  # train.method=full|freeze
        if row.get("error") or (trained == "adapter" and not (job / "adapter" / "adapter_config.json").is_file()):
            continue
        jcfg = copy.deepcopy(cfg)
        jcfg.run, jcfg.eval.models, jcfg.eval.output_dir = str(job), [trained], None
        report = run(jcfg)["models"][trained]
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





def _candidates(cfg: Config, run: Path, stage) -> list[Candidate]:
    merged = ["merged"] if (run / "merged" / "config.json").is_file() else []
    scorer = stage.head == "score"  # a new score head, trained in the adapter: the base has none worth measuring
    if scorer and "base" in cfg.eval.models:
        raise ConfigError(f"eval.models: base: {run} is a reward model, and its base has no trained score head "
                          "(the head is in the adapter); compare adapter and merged")
    from qtune.runs import model_output

    trained = "model" if model_output(run) is not None else "adapter"  # train.method=full|freeze: <run>/model/
    names = list(cfg.eval.models) or ([] if scorer else ["base"]) + [trained] + merged
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
        elif name == "adapter" and (run / "model" / "config.json").is_file():
            raise ConfigError(f"eval.models: adapter: {run} trained the weights themselves (train.method=full|freeze) "
                              "and has no adapter; its trained model is `model`")
        elif name == "adapter":
            out.append(Candidate("adapter", "adapter", run / "adapter"))
        elif name == "model" and (run / "model" / "config.json").is_file():
            out.append(Candidate("model", "model", run / "model"))
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
    prepared = prepare(data, tokenizer, rcfg.model.name, rcfg.model.chat_template, stages.get(rcfg.train.stage).data)
    ds = prepared.load("eval")
    rows = [] if ds is None else [ds[i] for i in range(len(ds))]
    return tokenizer, rows[:cfg.eval.max_eval_rows] if cfg.eval.max_eval_rows else rows


# ---------------------------------------------------------------- models


def _load(rcfg: Config, group: list[Candidate], tokenizer, device: str, dtype):
    """One model for the group (inference's loaders): a model folder, or the base with the group's adapters, where
    `using("base")` switches the adapters off."""
    from qtune.data.template import resolve_template
    from qtune.inference.load import Loaded, load_folder, load_with_adapters
    from qtune.ui import print_warning

    template, _ = resolve_template(tokenizer, rcfg.model.chat_template, rcfg.model.name)
    if group[0].kind == "model":
        return Loaded(load_folder(group[0].path, device, dtype), tokenizer, template, group[0].name)
    adapters = {c.name: c.path for c in group if c.kind == "adapter"}
    return Loaded(load_with_adapters(rcfg, adapters, device, dtype, warn=print_warning, key="eval.models"), tokenizer,
                  template, "base", adapters)


# ---------------------------------------------------------------- judge and aggregates


def _judge(judge, results: list[dict]) -> list[str]:
    """Every answer scored by the judge (qtune.evaluation.judge.score_all); the unscored rows named in a warning."""
    from qtune import ui
    from qtune.evaluation.judge import score_all

    with ui.status(f"judging {len(results)} answers with {judge.model}"):
        unscored = score_all(judge, results)
    if unscored:
        ui.print_warning(f"the judge failed on {len(unscored)} of {len(results)} answers; those rows have no score: "
                         + ", ".join(unscored[:10]) + (" …" if len(unscored) > 10 else ""))
    return unscored
