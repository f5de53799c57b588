"""`qtune prepare`: data files -> cached training examples, with statistics."""
from __future__ import annotations

from qtune.config.schema import Config


def run(cfg: Config, dry_run: bool = False):
    from qtune.data.prepare import check_inputs

    check_inputs(cfg.data)                       # a typo fails before the tokenizer and libraries load
    from qtune.modeling.rope import check_context

    check_context(cfg)                           # data.max_length within the model's positions
    from qtune import ui
    from qtune.data.prepare import prepare, preview
    from qtune.modeling.load import load_tokenizer
    from qtune.stages import get

    trains = get(cfg.train.stage).data
    tokenizer = load_tokenizer(cfg.model, cfg.paths)
    if dry_run:
        shown, counts, rejected, warning = preview(cfg.data, tokenizer, cfg.model.name, cfg.model.chat_template,
                                                   trains)
        if warning:
            ui.print_warning(warning)
        ui.show_preview(shown, counts, rejected)
        return None
    with ui.status("preparing data"):
        result = prepare(cfg.data, tokenizer, cfg.model.name, cfg.model.chat_template, trains)
    if not result.cache_hit:
        from qtune.runs import write_config

        write_config(result.path, cfg)
    for w in result.warnings:
        ui.print_warning(w)
    ui.show_data_stats(result.stats, result.path, result.cache_hit)
    return result
