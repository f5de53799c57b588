"""A training stage: what the rest of qtune reads of one (qtune.stages registers them)."""
from __future__ import annotations

from dataclasses import dataclass, field

SCORE_HEAD = "score"  # transformers' name for the sequence-classification head of Qwen3 and Llama models


@dataclass(frozen=True)
class Trains:
    """What a stage trains on, as the data layer reads it: the stage's name (in messages and the cache key), the kind
    of rows it makes (qtune.data.preference.KINDS: lm, input_ids + labels; pairs, prompt, chosen and rejected ids;
    scored, the same for a reward model; unpaired, prompt and completion ids with a label; prompts, chat messages and
    the records' other fields for reward functions), the family of record
    formats it accepts (qtune.data.formats.FAMILIES) and those in a few words for error lines."""
    stage: str
    kind: str
    formats: str
    describes: str


@dataclass(frozen=True)
class Stage:
    name: str
    data: Trains                      # what the data layer reads and makes for it
    summary: str                      # one line: the trainer and what it learns from
    head: str = "lm"                  # what the model ends in: the language-model head, or a one-output "score" head
    sequences: int = 1                # sequences a micro-batch row becomes in the forward that keeps activations
    forwards: str = ""                # the dry run's note on that forward (e.g. " × 2 (chosen and rejected)")
    # whether the fast path may cut capped MoE expert adapters to the chosen experts (moe.max_experts)
    compacts: bool = True
    graphs: bool = False              # whether a micro-step (one forward and backward) can replay as a CUDA graph
    curve: str | None = None          # the figure loss.png plots beside the loss (metrics.jsonl's name)
    figures: tuple[str, ...] = ()     # the stage's own figures in summary.json (the last eval value, else train)
    # what `qtune eval` measures on held-out rows (qtune.evaluation.heldout): loss (pt, sft), implicit_reward against
    # the base (dpo, kto), score (rm), reward (grpo: its reward functions on greedy completions)
    measure: str = "loss"
    writes: bool = True               # it writes answers (chat, serve, samples, eval prompts, GGUF exports)
    keeps: tuple[str, ...] = field(default=())  # modules trained whole beside the adapter (rm: the score head)
    # whether the loss compares with a reference model: with adapters, the base (adapter off); with train.method=
    # full|freeze, a frozen copy of the model the run starts from (TRL's ref_model, counted in the dry run's estimate)
    reference: bool = False

    def check(self, train) -> None:
        """Cross-field checks of train.* for this stage (raise ValueError naming the key)."""

    def check_run(self, cfg) -> None:
        """Checks of the whole config before anything loads, the dry run's included (raise a QtuneError)."""

    def tokens(self, cfg) -> int:
        """The tokens a micro-batch puts through the forward that keeps activations (the dry run's estimate)."""
        return cfg.data.max_length * cfg.train.batch_size * self.sequences

    def generation_memory(self, cfg) -> tuple[int, bool]:
        """(bytes a generation phase adds beside the weights, whether they stay allocated while training runs): the
        dry run's estimate; (0, False) for stages that do not generate."""
        return 0, False

    def trl_config(self, cfg, common: dict, aux_loss: float | None):
        """TRL's config class for this stage over the arguments every stage shares (`common`); `aux_loss`: the MoE
        router's balancing loss coefficient, None for dense models."""
        raise NotImplementedError

    def trainer_class(self):
        """TRL's trainer class for this stage (reading qtune's prepared ids as they are)."""
        raise NotImplementedError

    def trainer_kwargs(self, cfg, tokenizer) -> dict:
        """More arguments of the stage's trainer (grpo: its reward functions)."""
        return {}

    def datasets(self, train_ds, eval_ds, batch_size: int):
        """The prepared splits as the trainer takes them."""
        return train_ds, eval_ds

    def after_init(self, trainer, cfg) -> None:
        """What the stage adjusts once its trainer is built."""

    def beta(self, train) -> float | None:
        """The implicit reward's scale (measure implicit_reward)."""
        return None


def tokenized(trainer_class):
    """`trainer_class` reading qtune's prepared ids as they are (its own pass would look for text to tokenize)."""
    class Trainer(trainer_class):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    Trainer.__name__ = trainer_class.__name__
    return Trainer
