"""pt and sft: TRL's SFTTrainer on packed input_ids + labels (pt: raw text, every token trained)."""
from __future__ import annotations

from qtune.stages.base import Stage, Trains


class _Sft(Stage):
    def trl_config(self, cfg, common, aux_loss):
        from trl import SFTConfig

        return SFTConfig(**common, max_length=None, packing=False, padding_free=cfg.data.packing,  # prepare() packed
                         router_aux_loss_coef=aux_loss, dataset_kwargs={"skip_prepare_dataset": True})

    def trainer_class(self):
        from trl import SFTTrainer

        return SFTTrainer


PT = _Sft("pt", Trains("pt", "lm", "text", 'raw text ({"text": ...})'),
          "continued pre-training on raw text: every token trained", graphs=True)
SFT = _Sft("sft", Trains("sft", "lm", "lm", "conversations or instructions (messages, sharegpt, alpaca, ...)"),
           "supervised fine-tuning on conversations: the assistant turns trained", graphs=True)
