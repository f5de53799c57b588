"""A reward model's scores of answers, for GRPO's `reward_model` reward (qtune.stages.rewards): a train.stage=rm run
loaded once (its base as trained, 4-bit stays 4-bit, with the score head's adapter), each prompt + answer rendered
and tokenized exactly as its training pairs were (qtune.data.preference.render_parts: the generation prompt, then the
answer up to the template's end-of-turn marker), the score read at the last token, as training and `qtune eval`
read it."""
from __future__ import annotations

from pathlib import Path


class Scorer:
    """score(prompts, answers) -> one float per answer (prompts: TRL's, text or messages; answers: text)."""

    def __init__(self, run: Path):
        import torch

        from qtune.config import compose, to_object
        from qtune.data.template import probe_markers, resolve_template
        from qtune.inference.load import load_with_adapters
        from qtune.modeling.load import load_tokenizer, pick_device
        from qtune.runs import run_config

        rcfg = run_config(run, to_object(compose([])))
        device, dtype = pick_device(rcfg.train.device, rcfg.train.dtype)
        self.model = load_with_adapters(rcfg, {"reward": run / "adapter"}, device, dtype)
        self.tokenizer = load_tokenizer(rcfg.model, rcfg.paths)
        self.template, _ = resolve_template(self.tokenizer, rcfg.model.chat_template, rcfg.model.name)
        self.markers = probe_markers(self.tokenizer, self.template)
        self.max_length = rcfg.data.max_length
        pad = self.tokenizer.pad_token_id
        self.model.config.pad_token_id = pad if pad is not None else self.tokenizer.eos_token_id
        self.device, self.torch = next(self.model.parameters()).device, torch

    def ids(self, prompt, answer: str) -> list[int]:
        from qtune.data.preference import render_parts, truncate
        from qtune.data.template import encode, escape

        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
        (messages, reply), esc = escape(self.tokenizer, [messages, [{"role": "assistant", "content": answer}]])
        head, tail = render_parts(self.tokenizer, self.template, self.markers, messages, reply, None, "reward_model")
        (p, a), _ = encode(self.tokenizer, [head, tail], [esc, esc])
        p, (a,), _, _ = truncate(p, [a], self.max_length)
        return p + a

    def __call__(self, prompts, answers: list[str]) -> list[float]:
        torch = self.torch
        out = []
        with torch.no_grad():
            for prompt, answer in zip(prompts, answers):
                ids = torch.tensor([self.ids(prompt, answer)], device=self.device)
                out.append(float(self.model(input_ids=ids).logits.float().reshape(-1)[0]))
        return out
