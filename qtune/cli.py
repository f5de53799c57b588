"""The `qtune` command: one thin function per verb.

Each verb takes Hydra overrides as trailing arguments, composes the config, and calls its module's `run`
(`qtune train` -> `qtune.commands.train.run`, imported inside the function below that names the verb). torch/transformers
load inside the verbs, so `qtune --help` is instant.
"""
from __future__ import annotations

import sys
from typing import List, Optional

import typer
from typing_extensions import Annotated

app = typer.Typer(
    name="qtune",
    help="Fine-tune Qwen3 models (dense and MoE) with LoRA and QLoRA.\n\n"
    "Every verb composes one Hydra config tree (groups: model, quant, lora, moe, data, train, chat, serve, "
    "merge, eval, hub); change it with overrides such as `model=qwen3_8b quant=nf4 lora=r64 train.lr=1e-4`.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
)

Overrides = Annotated[Optional[List[str]], typer.Argument(help="Hydra overrides: group=option, key=value, +key=value, ~key; "
                                                         "and an experiment file, exp.yaml (what --cfg prints, or some of it).", show_default=False)]
ShowCfg = Annotated[bool, typer.Option("--cfg", help="Print the fully resolved config as YAML and exit.")]
Multirun = Annotated[bool, typer.Option("--multirun", "-m", help="Sweep: run one job per combination (Hydra's sweeper and launcher).")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Show what would happen, without doing it.")]
Json = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]

def _dispatch(run, overrides: Optional[List[str]], show_cfg: bool, multirun: bool = False, **flags) -> None:
    """Compose the config from the overrides and call the verb's `run` (a sweep calls it once per job)."""
    from qtune.config import compose, to_object
    from qtune.config.compose import expand_experiment

    overrides = expand_experiment(overrides or [])  # `qtune train exp.yaml [overrides]`: the file's settings first
    if multirun:
        from qtune.commands import sweep

        sweep.run(run, overrides, flags)
        return
    cfg = compose(overrides)
    if show_cfg:
        from omegaconf import OmegaConf

        typer.echo(OmegaConf.to_yaml(cfg, resolve=True), nl=False)
        return
    run(to_object(cfg), **flags)


@app.command()
def download(overrides: Overrides = None, cfg: ShowCfg = False, dry_run: DryRun = False) -> None:
    """Fetch a model's weights, tokenizer and config into `model.local_dir`, verified.

    Examples: `qtune download model=qwen3_8b` · `qtune download model=qwen3_8b model.revision=<sha> --dry-run` ·
    `qtune download` (the embedded SmolLM2, converted locally from its GGUF file; no network)
    """
    from qtune.commands.download import run

    _dispatch(run, overrides, cfg, dry_run=dry_run)


@app.command()
def prepare(overrides: Overrides = None, cfg: ShowCfg = False, dry_run: DryRun = False) -> None:
    """Turn data files into cached, tokenized, loss-masked (and packed) training examples.

    Examples: `qtune prepare data.path=chats.jsonl` · `qtune prepare model=qwen3_8b data.path=alpaca.json data.max_length=4096 --dry-run`
    """
    from qtune.commands.prepare import run

    _dispatch(run, overrides, cfg, dry_run=dry_run)


@app.command("inspect-moe")
def inspect_moe(overrides: Overrides = None, cfg: ShowCfg = False, dry_run: DryRun = False, json: Json = False) -> None:
    """Show which attention, router and expert parameters the `lora=`/`moe=` settings reach, from config alone.

    Examples: `qtune inspect-moe model=qwen3_30b_a3b moe=expert_only lora=r16` · `qtune inspect-moe model=qwen3_235b_a22b moe=all moe.max_experts=16 --json`
    """
    from qtune.commands.inspect_moe import run

    _dispatch(run, overrides, cfg, json=json, dry_run=dry_run)


@app.command()
def train(overrides: Overrides = None, cfg: ShowCfg = False, multirun: Multirun = False, dry_run: DryRun = False) -> None:
    """Train a LoRA / QLoRA adapter into a run folder (`runs/<name>/`); resumes where it stopped.

    Examples: `qtune train model=qwen3_8b quant=nf4 lora=r64 data.path=chats.jsonl` ·
    `qtune train --dry-run model=qwen3_30b_a3b quant=nf4` · `qtune train -m lora=r16,r64 train.lr=1e-4,2e-4`
    """
    from qtune.commands.train import run

    _dispatch(run, overrides, cfg, multirun, dry_run=dry_run)


@app.command()
def merge(overrides: Overrides = None, cfg: ShowCfg = False) -> None:
    """Fold a run's adapter into the base weights (16-bit safetensors, parity-checked).

    Examples: `qtune merge run=runs/my-run` · `qtune merge run=runs/my-run merge.gguf=[f16,q4_k_m]`
    """
    from qtune.commands.merge import run

    _dispatch(run, overrides, cfg)


@app.command()
def chat(overrides: Overrides = None, cfg: ShowCfg = False,
         prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="Answer this once and exit.")] = None) -> None:
    """Talk to a base model, a run's adapter or a merged model in the terminal (streaming).

    Examples: `qtune chat run=runs/my-run` · `qtune chat --prompt "Hello" chat.temperature=0`
    """
    from qtune.commands.chat import run

    _dispatch(run, overrides, cfg, prompt=prompt)


@app.command()
def serve(overrides: Overrides = None, cfg: ShowCfg = False) -> None:
    """Serve a base model with its adapters over an OpenAI-compatible HTTP API.

    Examples: `qtune serve run=runs/my-run` · `qtune serve serve.port=9000 serve.api_key=secret`
    """
    from qtune.commands.serve import run

    _dispatch(run, overrides, cfg)


@app.command()
def push(overrides: Overrides = None, cfg: ShowCfg = False) -> None:
    """Upload a run's adapter, merged model or GGUF files to a Hugging Face Hub repo, with a model card.

    Examples: `qtune push run=runs/my-run hub.repo_id=me/my-adapter` ·
    `qtune push run=runs/my-run hub.repo_id=me/my-model hub.what=merged hub.private=false`
    """
    from qtune.commands.push import run

    _dispatch(run, overrides, cfg)


@app.command("eval")
def eval_(overrides: Overrides = None, cfg: ShowCfg = False) -> None:
    """Compare base, adapter and merged models on held-out data and a prompt set.

    Examples: `qtune eval run=runs/my-run eval.prompts=prompts.jsonl` ·
    `qtune eval run=runs/my-run 'eval.lm_eval.tasks=[gsm8k]' eval.lm_eval.limit=100` (pip install 'qtune[eval]')
    """
    from qtune.commands.eval import run

    _dispatch(run, overrides, cfg)


def main() -> None:
    import os

    from qtune.errors import QtuneError

    if os.environ.get("RANK", "0") != "0":  # one of several processes (torchrun, accelerate launch): rank 0 speaks
        from qtune import ui

        ui.silence()
    try:
        app()
    except QtuneError as e:
        from qtune.ui import print_error

        print_error(str(e))
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # a disk that filled up where no verb expected it (the big writes say more: DiskFull)
        from qtune.io import out_of_space

        if not out_of_space(e):
            raise
        from qtune.ui import print_error

        where = f" writing {e.filename}" if getattr(e, "filename", None) else ""
        print_error(f"no space left on device{where}; free space and run the same command again")
        sys.exit(1)


if __name__ == "__main__":
    main()
