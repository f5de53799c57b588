"""kto: TRL's KTOTrainer on prompt and completion ids with a desirable/undesirable label; the KL completions are each
answer's neighbour in its batch, as TRL builds them. Preference pairs are split into a desirable and an undesirable
answer."""
from __future__ import annotations

from qtune.stages.base import Stage, Trains, tokenized
from qtune.stages.dpo import drop_fresh_reference


class Kto(Stage):
    def check(self, train):
        super().check(train)
        if str(train.kto.loss_type) == "kto" and isinstance(train.batch_size, int) and train.batch_size < 2:
            raise ValueError(f"train.stage=kto needs train.batch_size >= 2 (got {train.batch_size}): its KL estimate "
                             "pairs each answer with another prompt of the same batch")

    def trl_config(self, cfg, common, aux_loss):
        from trl import KTOConfig

        k = cfg.train.kto
        return KTOConfig(**common, max_length=None, beta=k.beta, loss_type=str(k.loss_type),
                         desirable_weight=k.desirable_weight, undesirable_weight=k.undesirable_weight,
                         router_aux_loss_coef=aux_loss)

    def trainer_class(self):
        from trl import KTOTrainer

        return tokenized(KTOTrainer)

    def datasets(self, train_ds, eval_ds, batch_size):
        return _with_kl_completions(train_ds, batch_size), _with_kl_completions(eval_ds, batch_size)

    def after_init(self, trainer, cfg):
        drop_fresh_reference(trainer, cfg)

    def beta(self, train):
        return train.kto.beta


def _with_kl_completions(ds, batch_size: int):
    """KTO's KL estimate: each answer also scored after another prompt of its batch, TRL's rotation by one within
    each batch of `batch_size` (KTOConfig samples in order, so these batches are the training batches)."""
    if ds is None:
        return None

    def rotate(batch):
        return {"KL_completion_ids": [batch["completion_ids"][-1]] + batch["completion_ids"][:-1]}

    return ds.map(rotate, batched=True, batch_size=batch_size, keep_in_memory=True)


KTO = Kto("kto", Trains("kto", "unpaired", "kto",
                        'answers marked good or bad ({"prompt", "completion", "label"}) or preference pairs'),
          "Kahneman-Tversky optimization on answers marked good or bad",
          forwards=", KL and reference forwards without gradients", compacts=False, reference=True,
          curve="reward_margin", figures=("reward_margin", "kl"), measure="implicit_reward")
