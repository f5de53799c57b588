"""rm: TRL's RewardTrainer on prompt+chosen and prompt+rejected ids; the model is the base with a one-output
sequence-classification head (`score`), trained whole next to the LoRA layers and saved in the adapter."""
from __future__ import annotations

from qtune.stages.base import SCORE_HEAD, Stage, Trains


class Rm(Stage):
    def check(self, train):
        if train.sample_prompts:
            raise ValueError("train.sample_prompts: a reward model (train.stage=rm) scores answers, it writes none; "
                             "leave train.sample_prompts empty")

    def trl_config(self, cfg, common, aux_loss):
        from trl import RewardConfig

        return RewardConfig(**common, max_length=None,
                            center_rewards_coefficient=cfg.train.rm.center_rewards_coefficient)

    def trainer_class(self):
        from trl import RewardTrainer  # it reads tokenized chosen_ids/rejected_ids as they are

        return RewardTrainer

    def after_init(self, trainer, cfg):
        # TRL keeps a quantized model's trainable weights in bf16 (QLoRA's recipe for adapters, whose layers cast their
        # input); the score head takes the hidden states as they come, in the model's dtype (fp32 on a CPU)
        if not hasattr(trainer.model, "get_base_model"):  # train.method=full|freeze: train.trainable_dtype holds
            return
        dtype = trainer.model.get_base_model().dtype
        for name, p in trainer.model.named_parameters():
            if p.requires_grad and f"{SCORE_HEAD}." in name:
                p.data = p.data.to(dtype)


RM = Rm("rm", Trains("rm", "scored", "pairs", 'preference pairs ({"prompt", "chosen", "rejected"})'),
        "a reward model: a one-output score head trained on chosen/rejected pairs", head="score", sequences=2,
        forwards=" × 2 (chosen and rejected), one-output score head", curve="reward_accuracy",
        figures=("reward_accuracy", "reward_margin"), measure="score", writes=False, keeps=(SCORE_HEAD,))
