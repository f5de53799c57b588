"""`qtune merge`: fold a run's adapter into 16-bit base weights, save a standalone model, prove parity (the work is
qtune.export.merging's; this verb reads the run, checks the output folder and reports)."""
from __future__ import annotations

from pathlib import Path

from qtune.config.schema import Config, QuantMethod
from qtune.errors import ConfigError
from qtune.export.merging import check_exports, check_output, merge
from qtune.runs import run_config, run_folder
from qtune.stages import get


def run(cfg: Config):
    from qtune import ui

    run = run_folder(cfg)                       # a wrong run= or output folder fails before the libraries load
    out = Path(cfg.merge.output_dir).expanduser() if cfg.merge.output_dir else run / "merged"
    check_output(out, cfg.merge.overwrite)
    rcfg = run_config(run, cfg)
    from qtune.modeling.load import quiet_libraries

    quiet_libraries()
    from qtune.export.gguf import TYPES, unknown_type

    bad = [t for t in cfg.merge.gguf if t not in TYPES]
    if bad:
        raise ConfigError(unknown_type(bad[0]))
    from qtune.runs import model_output

    if model_output(run) is not None:
        return _export_only(cfg, rcfg, run / "model")
    check_exports(rcfg, run / "adapter")
    if rcfg.quant.method is not QuantMethod.none:
        ui.print_warning(f"the adapter was trained on a {rcfg.quant.method} base; it is merged into the 16-bit "
                         "original weights, so the merged model can differ slightly from what training saw")
    result = merge(rcfg, run / "adapter", out, warn=ui.print_warning)
    if get(rcfg.train.stage).head == "score":
        ui.info("a reward model: merged into a sequence-classification checkpoint with its score head "
                "(load it with transformers' AutoModelForSequenceClassification)")
    ui.info(f"parity ({result['parity_dtype']}): max |logits(merged) - logits(base+adapter)| = "
            f"{result['max_abs_diff']:.3g} <= {cfg.merge.tolerance:g} on {result['prompts']} prompts")
    if "top1_agreement" in result:
        ui.info(f"saved in {result['dtype']}: next-token choice agrees with base+adapter at "
                f"{result['top1_agreement']:.1%} of positions (largest logit change {result['cast_max_abs_diff']:.3g})")
    ui.info(f"merged model: {out}")
    for g in result.get("gguf", []):
        ui.info(f"GGUF {g['type']}: {g['file']} ({ui.human_bytes(g['bytes'])}); loaded back with transformers, "
                f"next-token choice agrees with the merged model at {g['top1_agreement']:.1%} of positions")
    if result.get("gguf"):
        ui.info(f"GGUF files and their Ollama Modelfiles are kept in {Path(result['gguf'][0]['file']).parent}, beside "
                f"{out.name}/, which the next merge replaces; `ollama create <name> -f {result['gguf'][0]['modelfile']}`")
    if result.get("bnb_4bit"):
        ui.info(f"4-bit (nf4) merged checkpoint: {result['bnb_4bit']}")
    return result


def _export_only(cfg: Config, rcfg: Config, model_dir: Path):
    """A train.method=full|freeze run: no adapter to fold; its exports from model/."""
    from qtune import ui
    from qtune.export.merging import export_model

    ui.info(f"{model_dir.parent} trained the weights themselves (train.method={rcfg.train.method}): nothing to fold, "
            f"{model_dir} is the model" + ("; exporting from it" if cfg.merge.gguf or cfg.merge.save_4bit else ""))
    result = export_model(rcfg, model_dir, warn=ui.print_warning)
    for g in result.get("gguf", []):
        ui.info(f"GGUF {g['type']}: {g['file']} ({ui.human_bytes(g['bytes'])}); loaded back with transformers, "
                f"next-token choice agrees with the model at {g['top1_agreement']:.1%} of positions")
    if result.get("bnb_4bit"):
        ui.info(f"4-bit (nf4) checkpoint: {result['bnb_4bit']}")
    return result
