"""dpo: TRL's DPOTrainer on prompt, chosen and rejected ids. The reference is the model the run starts from: the base
with the adapter switched off, or, with train.init_adapter, a frozen copy of that adapter (TRL's "ref" adapter: a
copy of the adapter's weights, never of the model's)."""
from __future__ import annotations

from qtune.stages.base import Stage, Trains, tokenized


class Dpo(Stage):
    def trl_config(self, cfg, common, aux_loss):
        from trl import DPOConfig

        d = cfg.train.dpo
        return DPOConfig(**common, max_length=None, beta=d.beta, loss_type=[str(d.loss_type)],
                         label_smoothing=d.label_smoothing, router_aux_loss_coef=aux_loss)

    def trainer_class(self):
        from trl import DPOTrainer

        return tokenized(DPOTrainer)

    def after_init(self, trainer, cfg):
        drop_fresh_reference(trainer, cfg)

    def beta(self, train):
        return train.dpo.beta


def drop_fresh_reference(trainer, cfg) -> None:
    """TRL copies a PEFT model's adapter as a frozen "ref" adapter, the reference for an adapter that starts trained.
    A fresh adapter starts as the base itself, whose outputs are the adapter switched off (what TRL uses without
    "ref"): the copy would only cost memory and a LoRA pass per reference forward."""
    if cfg.train.init_adapter is None and "ref" in (getattr(trainer.model, "peft_config", None) or {}):
        trainer.model.delete_adapter("ref")


# compacts=False: TRL copies a PEFT model's adapter as its frozen reference (qtune deletes the copy of a fresh one), and
# the copy is made at the adapter's full size
DPO = Dpo("dpo", Trains("dpo", "pairs", "pairs", 'preference pairs ({"prompt", "chosen", "rejected"})'),
          "direct preference optimization on chosen/rejected pairs", sequences=2,
          forwards=" × 2 (chosen and rejected), reference forwards without gradients", compacts=False, reference=True,
          curve="reward_margin", figures=("reward_accuracy", "reward_margin"), measure="implicit_reward")
