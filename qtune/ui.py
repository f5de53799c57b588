"""Everything Rich: error lines, tables, progress. Library code never imports rich directly."""
from __future__ import annotations

import sys

from rich.console import Console
from rich.markup import escape

from qtune.text import human_bytes  # noqa: F401 (verbs format sizes as ui.human_bytes)
from qtune.text import num as _num


def _terminal(stream) -> bool | None:
    """Colour and live displays only on a terminal: a pipe or a file gets plain text. FORCE_COLOR (or Rich's
    TTY_COMPATIBLE) set by the user still forces them (None: Rich decides from those)."""
    import os

    if os.environ.get("FORCE_COLOR") or os.environ.get("TTY_COMPATIBLE"):
        return None
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


err_console = Console(stderr=True, highlight=False, soft_wrap=True, force_terminal=_terminal(sys.stderr))
# Tables keep whole module names when output goes to a file or pipe (Rich would assume 80 columns).
console = Console(highlight=False, width=None if sys.stdout.isatty() else 160, force_terminal=_terminal(sys.stdout))


def print_error(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}")


def print_warning(message: str) -> None:
    err_console.print(f"[yellow]warning:[/] {escape(message)}")


def note(message: str) -> None:
    """A dim aside on stderr, out of the way of answers streamed to stdout."""
    err_console.print(f"[dim]{escape(message)}[/]")


def info(message: str) -> None:
    console.print(message, soft_wrap=True)  # one line stays one line, for people and for grep


def line(message: str) -> None:
    """One line of plain text on stdout, as it is (no markup read into it), at once (a server's log)."""
    console.print(message, markup=False, highlight=False, soft_wrap=True)
    console.file.flush()


def silence() -> None:
    """This process of a multi-process run keeps quiet: rank 0 speaks for the run (its errors included)."""
    console.quiet = True
    err_console.quiet = True


def is_terminal() -> bool:
    return sys.stdout.isatty()




def files_table(title: str, files: list[tuple[str, int | None]]) -> None:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("file")
    table.add_column("size", justify="right")
    for name, size in files:
        table.add_row(name, human_bytes(size))
    total = sum(s or 0 for _, s in files)
    table.add_section()
    table.add_row(f"{len(files)} files", human_bytes(total), style="bold")
    console.print(table)


def status(message: str):
    return console.status(message) if is_terminal() else _Null()


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def shown_path(path: str) -> str:
    """A path as people read it: relative to the current folder when inside it (run configs keep absolute paths)."""
    import os

    if os.path.isabs(path) and path.startswith(os.getcwd() + os.sep):
        return os.path.relpath(path)
    return path


def show_data_stats(stats: dict, path, cache_hit: bool) -> None:
    from rich.table import Table

    table = Table(title=f"prepared data ({'cache hit' if cache_hit else 'new'}): {path}", title_justify="left")
    for col in ("split / source", "format", "examples", "kept", "tokens", "trainable"):
        table.add_column(col, justify="left" if col in ("split / source", "format") else "right")
    for split in ("train", "eval"):
        s = stats.get(split)
        if not s:
            continue
        for p in s["per_source"]:
            table.add_row(f"{split}: {shown_path(p['source'])}", ", ".join(f"{k} {v}" for k, v in p["formats"].items()),
                          str(p["examples"]), str(p["kept"]), f"{p['tokens']:,}", f"{p['trainable_tokens']:,}")
        table.add_row(f"[bold]{split} total[/]", "", str(s["examples"]), str(s["kept"]), f"{s['tokens']:,}",
                      f"{s['trainable_tokens']:,}")
        table.add_section()
    console.print(table)
    for split in ("train", "eval"):
        s = stats.get(split)
        if s:
            L = s["length"]
            pack = (f", packed into {s['packed_rows']} rows of {s['max_length']} ({s['packing_efficiency']:.0%} full)"
                    if "packed_rows" in s else "")
            if "truncated_prompts" in s:  # preference data: what truncation cut (the prompt's start, answers' ends)
                pack += f" (prompts cut {s['truncated_prompts']}, answers cut {s['truncated_answers']})"
            if "thinking" in s:  # conversations whose trained turns reason (a non-empty <think> block), and the others
                pack += f"; thinking {s['thinking']}, non-thinking {s['non_thinking']}"
            console.print(f"{split}: length p50 {L['p50']} / p90 {L['p90']} / p99 {L['p99']} / max {L['max']}; "
                          f"truncated {s['truncated']}, dropped (no trainable token) {s['dropped_no_trainable']}{pack}")
    if stats.get("rejected"):
        console.print(f"[yellow]{stats['rejected']} bad records skipped[/] (see {path}/rejects.jsonl)")


def show_preview(shown, counts, rejected: int) -> None:
    from rich.panel import Panel
    from rich.text import Text

    colour = console.color_system is not None and not console.no_color
    for where, fmt, segments in shown:
        text = Text()
        for s, trainable in segments:
            if colour:
                text.append(s, style="bold green" if trainable else "dim")
            else:  # without colour (a pipe, a file, NO_COLOR) the trained spans stand between ⟦ and ⟧
                text.append(f"⟦{s}⟧" if trainable and s else s)
        key = "green = trained on, dim = context" if colour else "⟦ ⟧ = trained on, the rest = context"
        console.print(Panel(text, title=f"{where} ({fmt})", subtitle=key, title_align="left"))
    for path, n in counts:
        console.print(f"{path}: {n} records")
    if rejected:
        console.print(f"[yellow]{rejected} bad records would be skipped[/]")


# ---------------------------------------------------------------- train


def _group_rows(targets) -> list[tuple[str, str, str, int, int]]:
    """Collapse identical layers: (name with {layer range}, shape, how, count, LoRA params)."""
    import re

    groups: dict[tuple, list] = {}
    for t in targets:
        key = (re.sub(r"\.layers\.\d+\.", ".layers.{}.", t.name), t.shape, t.how)
        groups.setdefault(key, []).append(t)
    rows = []
    for (pattern, shape, how), ts in groups.items():
        layers = [t.layer for t in ts if t.layer is not None]
        name = pattern.replace("{}", _ranges(layers)) if layers else pattern
        rows.append((name.removeprefix("model."), "×".join(map(str, shape)), how, len(ts), sum(t.params for t in ts)))
    return rows


def _ranges(nums: list[int]) -> str:
    nums = sorted(set(nums))
    out, start, prev = [], None, None
    for n in nums + [None]:
        if start is None:
            start = prev = n
        elif n is not None and n == prev + 1:
            prev = n
        else:
            out.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = n
    return "{" + ",".join(out) + "}" if len(nums) > 1 else str(nums[0])


def show_lora_plan(cfg, matched, total_params: int, mem) -> None:
    """The dry-run table: every matched module (identical layers grouped), totals and a memory estimate."""
    from rich.table import Table

    lora = str(cfg.train.method) == "lora"
    title = (f"LoRA targets: {cfg.model.name}, lora r={cfg.lora.r} alpha={cfg.lora.alpha}"
             + (f", moe scope={cfg.moe.scope}" if matched.is_moe else "")) if lora else \
        f"trained weights: {cfg.model.name}, train.method={cfg.train.method}" + (
            f" (layers {cfg.train.freeze.trainable_layers:+d}, modules {list(cfg.train.freeze.trainable_modules)}"
            f", extra {list(cfg.train.freeze.extra_modules)})" if str(cfg.train.method) == "freeze" else "")
    table = Table(title=title, title_justify="left")
    for col in ("module", "shape", "adapter", "count", "LoRA params" if lora else "params"):
        table.add_column(col, justify="right" if col in ("count", "LoRA params", "params") else "left")
    for name, shape, how, count, params in _group_rows(matched.targets):
        table.add_row(name, shape, {"lora": "LoRA", "lora_param": "LoRA (fused param)", "full": "full"}[how],
                      str(count), f"{params:,}")
    table.add_section()
    pct = 100 * matched.trainable / total_params if total_params else 0
    table.add_row("[bold]trainable / total[/]", "", "", str(len(matched.targets)),
                  f"[bold]{matched.trainable:,}[/] / {total_params:,} ({pct:.3f}%)")
    console.print(table)
    from qtune.modeling.targets import covered_message, unmatched_message

    for pattern in matched.unmatched:
        print_warning(unmatched_message(pattern, cfg.model.name, matched.is_moe))
    if matched.covered:
        info(escape(covered_message(matched.covered, cfg.model.name, cfg.moe)))
    from qtune.stages import get

    stage, rows = cfg.train.stage, get(cfg.train.stage).forwards
    where = "GPU memory" if mem.world_size == 1 else \
        f"memory per GPU ({mem.strategy}, {mem.world_size} processes; train.distributed={cfg.train.distributed})"
    show_memory(f"estimated {where} (train.stage={stage}, quant={cfg.quant.method}, batch {cfg.train.batch_size} × "
                f"{cfg.data.max_length} tokens{rows}, gradient checkpointing "
                f"{'on' if cfg.train.gradient_checkpointing else 'off'})", mem.as_dict())


def gib(b: float) -> str:
    """GiB as every table writes them (two decimals): one estimate reads the same wherever it appears."""
    return f"{b / 2**30:.2f}"


def show_memory(title: str, m: dict) -> None:
    """The memory-estimate table (qtune.modeling.estimate.Memory.as_dict())."""
    from rich.table import Table

    mt = Table(title=title, title_justify="left")
    mt.add_column("part")
    mt.add_column("GiB", justify="right")
    host, head = m.get("host_embedding_bytes", 0), m.get("host_head_bytes", 0)
    mt.add_row(f"base weights ({m['quantized_params']:,} quantized, {m['unquantized_params']:,} in 16-bit"
               + (f"; the input embeddings' {gib(host)} GiB in host memory with CUDA graphs" if host else "")
               + (f"; the output head's {gib(head)} GiB in host memory (train.head_on_host), its GPU copy"
                  " under activations" if head else "") + ")",
               gib(m['base_bytes']))
    if m.get("method", "lora") != "lora":
        mt.add_row(f"trained weights (train.method={m['method']}): master copies + gradients + optimizer states",
                   gib(m['lora_bytes']))
    else:
        mt.add_row("LoRA weights + gradients + AdamW states ("
                   + ("bf16, as TRL keeps a quantized model's adapters" if m.get("quantized_params") else
                      "fp32" if m.get("strategy") == "fsdp" else "fp32; fused experts' in 16-bit") + ")",
                   gib(m['lora_bytes']))
    if m.get("reference_bytes"):
        mt.add_row("reference model (a frozen copy of the starting model: TRL's ref_model)", gib(m['reference_bytes']))
    mt.add_row("activations (one micro-batch)", gib(m['activation_bytes']))
    if m.get("dequantized_bytes"):
        mt.add_row("one layer's 4-bit weights dequantized to 16-bit (recompute to backward)",
                   gib(m['dequantized_bytes']))
    if m.get("delta_bytes"):
        mt.add_row("one layer's fused expert deltas, full size (PEFT's reference path: train.fast=false or FSDP2)",
                   gib(m['delta_bytes']))
    if m.get("generation_bytes"):
        mt.add_row("rollouts' KV cache (" + ("kept while training: train.grpo.rollout_cache=keep" if
                                             m.get("generation_kept") else "while generating only") + ")",
                   gib(m['generation_bytes']))
    mt.add_row("CUDA context and workspace", gib(m['overhead_bytes']))
    mt.add_section()
    mt.add_row("[bold]total (estimate)[/]", f"[bold]{gib(m['total_bytes'])}[/]")
    console.print(mt)


def train_progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}{task.fields[figures]}"),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console)


def _peaks(summary: dict) -> str:
    """The process's peak, and training's own where loading peaked higher (16-bit experts before 4-bit storage)."""
    peak, train = summary["peak_memory_bytes"], summary.get("train_peak_memory_bytes")
    if train and peak > 1.05 * train:
        return f"{human_bytes(peak)} while loading, {human_bytes(train)} training"
    return human_bytes(peak)


def _figures(summary: dict) -> str:
    """The stage's own figures (dpo, rm: reward accuracy and margin; kto: margin and KL), the eval value where the run
    evaluated, else the last train one: ", eval reward_accuracy 0.7500, eval reward_margin 0.1234"."""
    from qtune.stages import STAGES

    stage = STAGES.get(summary.get("stage"))
    parts = []
    for name in stage.figures if stage else ():
        for key, label in ((f"eval_{name}", f"eval {name}"), (name, f"train {name}")):
            if summary.get(key) is not None:
                parts.append(f"{label} {summary[key]:.4f}")
                break
    return "".join(f", {p}" for p in parts)


def show_train_summary(summary: dict) -> None:
    def f(x, spec=".4f"):
        return "-" if x is None else format(x, spec)

    steps = f"{summary['steps']} steps"
    if summary.get("resumed_from"):  # the time is this process's; say which part of the steps it covers
        steps += f" ({summary['steps_this_time']} this time, resumed from step {summary['resumed_from']})"
    console.print(f"[bold green]done[/]: {steps} in {summary['seconds']:.0f} s; train loss "
                  f"{f(summary['first_loss'])} -> {f(summary['train_loss'])}, eval loss {f(summary['eval_loss'])}"
                  f"{_figures(summary)}; peak memory {_peaks(summary)}")
    console.print(f"model: {summary['model_dir']}" if "model_dir" in summary else f"adapter: {summary['adapter']}")
    samples = summary.get("samples")
    if samples and samples.get("after"):
        before = {r["prompt"]: r["answer"] for r in samples.get("before") or []}
        for r in samples["after"]:
            console.print(f"[bold]prompt:[/] {escape(r['prompt'])}")
            if r["prompt"] in before:
                console.print(f"  [dim]before:[/] {escape(before[r['prompt']])}")
            console.print(f"  [green]after:[/]  {escape(r['answer'])}")


def show_sweep_summary(rows: list[dict], folder, extra=()) -> None:
    from rich.table import Table

    table = Table(title=f"sweep: {folder}", title_justify="left")
    failed = any(r.get("error") for r in rows)  # a failed job's row says why
    for col in ("job", "overrides", "train loss", "eval loss", "time", "peak memory", *[c.replace("_", " ") for c in extra],
                *(["error"] if failed else [])):
        table.add_column(col, justify="left" if col in ("job", "overrides", "error") else "right")
    for r in rows:
        table.add_row(str(r["job"]), r["overrides"], _num(r["train_loss"]), _num(r["eval_loss"]),
                      f"{r['seconds']:.0f} s" if r["seconds"] is not None else "-", human_bytes(r["peak_memory_bytes"]),
                      *[_num(r.get(c)) for c in extra], *([r.get("error") or ""] if failed else []))
    console.print(table)




# ---------------------------------------------------------------- inspect-moe


def _mark(adapted: bool) -> str:
    return "[green]LoRA[/]" if adapted else "[dim]frozen[/]"


def show_moe_report(r: dict, moe) -> None:
    from rich.table import Table

    s = r["settings"]
    title = (f"{r['model']}: lora r={s['lora_r']} alpha={s['lora_alpha']}, moe scope={s['scope']} "
             f"router={s['router_mode']}" + (f" max_experts={s['max_experts']} ({s['expert_selection']})"
                                              if s["max_experts"] else "") + f", quant={s['quant']}")
    if not r["is_moe"]:
        console.print(f"[yellow]{r['model']} is a dense model: no experts or router; moe= settings do not apply.[/]")
    table = Table(title=title, title_justify="left")
    for col in ("layers", "attention", "router", "experts", "shared", "LoRA params / layer"):
        table.add_column(col, justify="right" if col.startswith("LoRA") else "left")
    groups: list[tuple[list[int], dict]] = []
    for row in r["layers"]:
        key = {k: v for k, v in row.items() if k != "layer"}
        if groups and groups[-1][1] == key:
            groups[-1][0].append(row["layer"])
        else:
            groups.append(([row["layer"]], key))
    for layers, row in groups:
        attn = ", ".join(f"{k.removesuffix('_proj')} {_mark(v['adapted']) if v['adapted'] else '[dim]–[/]'}"
                         for k, v in row["attention"].items())
        shapes = {tuple(v["shape"]) for v in row["attention"].values()}
        attn += f"\n[dim]{' '.join('×'.join(map(str, sh)) for sh in sorted(shapes))}[/]"
        router = "-"
        if row["router"]:
            a = row["router"]["adapted"]
            router = (f"{'×'.join(map(str, row['router']['shape']))} "
                      + {"frozen": "[dim]frozen[/]", "lora": "[green]LoRA[/]", "full": "[magenta]full[/]"}[a])
        experts = "-"
        if row["experts"]:
            e = row["experts"]
            tensors = "\n".join(f"{k} {'×'.join(map(str, v))} {_mark(k in e['adapted'])}" for k, v in e["tensors"].items())
            reach = (f"{e['experts_adapted']} of {e['count']} experts" if e["adapted"] else f"{e['count']} experts")
            if e["chosen_by"]:
                reach += f" (by {'routing load, at train time' if e['chosen_by'] == 'load' else 'index'})"
            experts = f"{reach}\n{tensors}"
        elif row["dense_mlp"]:
            experts = "dense MLP: " + ", ".join(f"{k.removesuffix('_proj')} {_mark(v['adapted'])}"
                                                for k, v in row["dense_mlp"].items())
        shared = "none" if not row["shared_experts"] else ", ".join(row["shared_experts"])
        table.add_row(_ranges(layers).strip("{}") if len(layers) > 1 else str(layers[0]), attn, router, experts,
                      shared, f"{row['lora_params']:,}")
        table.add_section()
    console.print(table)

    pt = Table(title="patterns", title_justify="left")
    pt.add_column("pattern")
    pt.add_column("matches")
    for p, hit in r["patterns"].items():
        pt.add_row(escape(p), "[cyan]no linear: the fused experts[/]" if p in r["covered"]
                   else "[green]yes[/]" if hit else "[bold red]NOTHING[/]")
    console.print(pt)
    from qtune.modeling.targets import covered_message, unmatched_message

    for p in r["unmatched"]:
        print_warning(unmatched_message(p, r["model"], r["is_moe"]))
    if r["covered"]:
        info(escape(covered_message(r["covered"], r["model"], moe)))

    p = r["params"]
    ct = Table(title="parameters", title_justify="left")
    for col in ("part", "model params", "adapted targets", "LoRA params"):
        ct.add_column(col, justify="left" if col == "part" else "right")
    labels = {"expert": "experts", "mlp": "dense MLP", "other": "embeddings, norms, head"}
    for kind, v in sorted(p["by_kind"].items()):
        ct.add_row(labels.get(kind, kind), f"{v['params']:,}", str(v["targets"]), f"{v['lora_params']:,}")
    ct.add_section()
    pct = 100 * p["trainable"] / p["total"] if p["total"] else 0
    ct.add_row("[bold]total[/]", f"{p['total']:,}", str(sum(v["targets"] for v in p["by_kind"].values())),
               f"[bold]{p['trainable']:,}[/] ({pct:.3f}%)")
    if p["allocated"] != p["trainable"]:
        ct.add_row("[dim]allocated with train.fast=false (unselected experts held at zero)[/]", "", "", f"[dim]{p['allocated']:,}[/]")
    console.print(ct)

    if s["quant"] == "none" or not r["is_moe"]:
        experts = ""
    elif r["memory"].get("experts_4bit"):
        experts = "; fused experts in 4-bit (train.fast)"
    else:
        experts = "; fused experts in 16-bit (bitsandbytes leaves them; train.fast keeps them in 4-bit)"
    show_memory(f"estimated GPU memory (quant={s['quant']}{experts})", r["memory"])
    show_fits(r["fits"])


def show_fits(rows: list[dict]) -> None:
    """inspect-moe's answer to "which GPU does this need" (qtune.modeling.plan.fits)."""
    from rich.table import Table

    from qtune.modeling.world import USABLE_SHARE
    from qtune.modeling.plan import WORLD_SIZES

    def size(b, row=None) -> str:  # the memory table's figure; where the output head moved to the host, said
        moved = row is not None and row.get("one_gpu_head_on_host")
        return f"{gib(b)} GiB" + (", head on host" if moved else "")

    moved = any(f.get("one_gpu_head_on_host") for f in rows)
    ft = Table(title=f"where it fits (estimates; {USABLE_SHARE:.0%} of a GPU's memory usable, as "
                     "train.distributed=auto counts)",
               title_justify="left", caption_justify="left",
               caption="head on host: where the model does not fit, train.head_on_host=auto keeps the output head in "
                       "host memory, so that estimate is below the memory table's" if moved else None)
    for col in ("GPU", "usable", "one GPU", "several GPUs of it (FSDP2)", "on one GPU instead"):
        ft.add_column(col)
    for f in rows:
        several = "" if f["fits_one"] else (
            f"{f['fsdp_gpus']} ({size(f['fsdp_bytes_per_gpu'])} each)" if f["fsdp_gpus"]
            else f"[dim]{f['fsdp_refused']}[/]" if f["fsdp_refused"]
            else f"[red]not on {WORLD_SIZES[-1]}[/] ({size(f['fsdp_bytes_per_gpu'])} each)")
        instead = "" if f["fits_one"] else (f"{f['on_one_instead']} ({size(f['on_one_instead_bytes'])})"
                                             if f["on_one_instead"] else "[dim]nothing smaller fits[/]")
        ft.add_row(f["gpu"], size(f["usable_bytes"]),
                   f"[green]fits[/] ({size(f['one_gpu_bytes'], f)})" if f["fits_one"]
                   else f"[red]no[/] ({size(f['one_gpu_bytes'], f)})", several, instead)
    console.print(ft)


# ---------------------------------------------------------------- eval


def show_eval_summary(summary: dict, out, unscored: list[str]) -> None:
    from rich.table import Table

    from qtune.evaluation.report import _shown, fmt

    names = list(summary)
    table = Table(title=f"evaluation: {out}", title_justify="left")
    table.add_column("metric")
    for n in names:
        table.add_column(n, justify="right")
    for key, label, spec in _shown(summary):
        values = [summary[n].get(key) for n in names]
        best = None
        if key in ("heldout_loss", "perplexity", "ttft_s"):
            best = min((v for v in values if v is not None), default=None)
        elif key != "tok_s":
            best = max((v for v in values if v is not None), default=None)
        table.add_row(label, *[(f"[bold green]{fmt(v, spec)}[/]" if v is not None and v == best and len(names) > 1
                                else fmt(v, spec)) for v in values])
    console.print(table)
    if unscored:
        print_warning(f"{len(unscored)} answers have no judge score (see report.md)")
    console.print(f"report: {out}/report.md, results: {out}/results.jsonl, chart: {out}/chart.png")
