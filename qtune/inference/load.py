"""What `chat` and `serve` share: load a base with its adapters (or a merged model) and stream generations.

Sources, from a run folder by default: the merged model when <run>/merged exists (chat.use=auto), else
the base loaded as it was trained (quant=nf4 stays 4-bit) with the run's adapter; without a run, the
`model=` base alone. Generation streams text pieces from a worker thread and stops early when asked
(Ctrl-C in chat, a closed connection in serve). Sampled generations draw with their own torch.Generator (seeded
by serve's `seed`, else at random), so a seeded answer does not depend on what ran before it.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

from qtune.config.schema import ChatConfig, Config
from qtune.errors import ConfigError


@dataclass
class Loaded:
    model: object                 # a PreTrainedModel or a PeftModel holding every adapter
    tokenizer: object
    template: str
    base_name: str                # the name requests use for the base model
    adapters: dict[str, Path] = field(default_factory=dict)
    label: str = ""               # what was loaded, for people
    decoder: object = None        # a GraphDecoder, made on first use where one can run (qtune.inference.decoding)
    notice: object = None         # where one-off notes go (a verb passes its terminal's; else the `qtune` logger)

    def names(self) -> list[str]:
        return [self.base_name, *self.adapters]

    def using(self, name: str):
        """A context in which generation uses adapter `name` (or the bare base for the base's name)."""
        if name == self.base_name:
            return self.model.disable_adapter() if self.adapters else contextlib.nullcontext()
        if name not in self.adapters:
            raise KeyError(name)
        self.model.set_adapter(name)
        return contextlib.nullcontext()

    def switch(self, name) -> None:
        """Make adapter `name` (the bare base for the base's name or None) the one every forward uses until the next
        switch: serve's engine calls it while no row runs."""
        if not self.adapters:
            return
        if name is None or name == self.base_name:
            self.model.base_model.disable_adapter_layers()
        else:
            self.model.base_model.enable_adapter_layers()
            self.model.set_adapter(name)


def load(cfg: Config, use: str = "auto", extra_adapters: dict[str, str] | None = None) -> Loaded:
    """The model to talk to. use: auto | merged | adapter | base (see the module doc)."""
    from qtune.runs import adapter_folder, model_output, run_config, run_folder

    # 1. what to load, checked before the libraries load: a wrong run= or chat.use, a damaged file
    run = run_folder(cfg) if cfg.run else None
    merged = run / "merged" if run else None
    if use not in ("auto", "merged", "adapter", "base"):
        raise ConfigError(f"chat.use={use}: valid: auto, merged, adapter, base")
    trained = model_output(run) if run is not None else None
    # train.method=full|freeze: <run>/model/ is the trained model, what a LoRA run's adapter (or merge) is elsewhere
    if trained is not None and use != "base":
        if extra_adapters:
            raise ConfigError(f"serve.adapters: {run} trained the weights themselves (train.method=full|freeze), so "
                              "adapters of its base do not apply to its model/; serve them with run= a LoRA run or "
                              "without run=")
        _refuse_reward_folder(trained)
        rcfg = run_config(run, cfg)
        from qtune.data.template import resolve_template
        from qtune.modeling.load import load_tokenizer, pick_device, quiet_libraries

        quiet_libraries()
        device, dtype = pick_device(rcfg.train.device, rcfg.train.dtype)
        tokenizer = load_tokenizer(rcfg.model, rcfg.paths)
        template, _ = resolve_template(tokenizer, rcfg.model.chat_template, rcfg.model.name)
        return Loaded(load_folder(trained, device, dtype), tokenizer, template, run.name, {},
                      f"trained model {trained} (train.method={rcfg.train.method})")
    if use == "merged" and not (merged and (merged / "config.json").is_file()):
        raise ConfigError(f"chat.use=merged: {run}/merged does not exist; run `qtune merge run={run}` first")
    adapters = {name: adapter_folder(path, "serve.adapters") for name, path in (extra_adapters or {}).items()}
    for where in ([run / "adapter"] if run is not None else []) + list(adapters.values()):
        _refuse_reward_model(where)
    use_merged = merged is not None and (merged / "config.json").is_file() and use in ("auto", "merged") and not adapters
    if use_merged:
        from qtune import integrity

        integrity.check_model(merged, f"run `qtune merge run={run}` again to replace it (or chat.use=adapter)")
    rcfg = run_config(run, cfg) if run else cfg
    # 2. load
    from qtune.data.template import resolve_template
    from qtune.modeling.load import load_tokenizer, pick_device, quiet_libraries

    quiet_libraries()
    device, dtype = pick_device(rcfg.train.device, rcfg.train.dtype)
    tokenizer = load_tokenizer(rcfg.model, rcfg.paths)
    template, _ = resolve_template(tokenizer, rcfg.model.chat_template, rcfg.model.name)
    if use_merged:
        return Loaded(load_folder(merged, device, dtype), tokenizer, template, run.name, {}, f"merged model {merged}")
    if run is not None and use != "base":
        adapters = {run.name: run / "adapter", **adapters}
    model = load_with_adapters(rcfg, adapters, device, dtype)
    if not adapters:
        return Loaded(model, tokenizer, template, rcfg.model.name, {}, f"{rcfg.model.name} (no adapter)")
    label = f"{rcfg.model.name} ({rcfg.quant.method}) + adapter {', '.join(adapters)}"
    return Loaded(model, tokenizer, template, rcfg.model.name, adapters, label)


def _refuse_reward_model(adapter: Path) -> None:
    """chat and serve write answers; a reward model's adapter (train.stage=rm) only scores them."""
    import json

    if json.loads((adapter / "adapter_config.json").read_text()).get("task_type") == "SEQ_CLS":
        raise ConfigError(f"{adapter.parent if adapter.name == 'adapter' else adapter} is a reward model "
                          "(train.stage=rm): it scores answers and writes none; measure it with `qtune eval`")


def _refuse_reward_folder(folder: Path) -> None:
    """A whole model folder that is a reward model (a sequence-classification checkpoint) writes no answers."""
    import json

    kinds = json.loads((folder / "config.json").read_text()).get("architectures") or []
    if any(k.endswith("ForSequenceClassification") for k in kinds):
        raise ConfigError(f"{folder.parent} is a reward model (train.stage=rm): it scores answers and writes none; "
                          "measure it with `qtune eval`")


def load_folder(path: Path, device: str, dtype):
    """A whole model saved as a folder (a merged run, any transformers checkpoint), ready to generate; a merged reward
    model (a sequence-classification checkpoint) loads as one, ready to score."""
    import json

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kinds = json.loads((Path(path) / "config.json").read_text()).get("architectures") or []
    auto = AutoModelForSequenceClassification if any(k.endswith("ForSequenceClassification") for k in kinds) \
        else AutoModelForCausalLM
    model = auto.from_pretrained(path, dtype=dtype, device_map={"": device})
    model.eval()
    return model


def load_with_adapters(rcfg: Config, adapters: dict[str, Path], device: str, dtype, warn=None,
                       key: str = "serve.adapters.{name}"):
    """A run's base loaded as it was trained (quant=nf4 stays 4-bit) with every adapter in `adapters` loaded
    by name, the first one active; the bare base when there are none. An adapter trained on another base is refused
    in one line (`key`: the setting that named it, {name} the adapter's), before the base loads where both bases'
    configs are on disk."""
    from qtune.modeling.hub import ensure_model
    from qtune.modeling.load import load_model
    from qtune.stages import get

    folder = ensure_model(rcfg.model, rcfg.download, rcfg.paths, warn=warn)
    for name, adapter in adapters.items():
        check_base(rcfg, folder, adapter, key.format(name=name))
    _same_parameters(adapters, key)
    base = load_model(folder, rcfg.model, rcfg.quant, device, dtype, gradient_checkpointing=False,
                      head=get(rcfg.train.stage).head)
    base.config.use_cache = True
    base.eval()
    if not adapters:
        return base
    from peft import PeftModel

    names = list(adapters)
    with _other_base_if_mismatched(rcfg, folder, adapters[names[0]], key.format(name=names[0])):
        model = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        with _other_base_if_mismatched(rcfg, folder, adapters[name], key.format(name=name)):
            model.load_adapter(adapters[name], adapter_name=name)
    model.set_adapter(names[0])
    model.eval()
    return model


def _same_parameters(adapters: dict[str, Path], key: str) -> None:
    """PEFT holds LoRA adapters on expert or router parameters (target_parameters, Qwen3-MoE's moe.scope) side by side
    only when they adapt the same parameters: say so in one line before anything loads, not with PEFT's error."""
    import json

    seen = {}
    for name, adapter in adapters.items():
        path = Path(adapter) / "adapter_config.json"
        if path.is_file():
            seen[name] = sorted(json.loads(path.read_text()).get("target_parameters") or [])
    items = list(seen.items())
    for b, pb in items[1:]:
        a, pa = items[0]
        if pb == pa:
            continue
        raise ConfigError(f"{key.format(name=b)}: its adapter's LoRA on Qwen3-MoE parameters "
                          f"({', '.join(pb) or 'none'}) differs from {a}'s ({', '.join(pa) or 'none'}); one model holds "
                          "such adapters only when they adapt the same parameters (trained with the same moe.scope): "
                          "serve the others from another qtune serve")


# What decides the shapes of a model's layers, so of the adapters trained on it
SHAPE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "num_experts", "moe_intermediate_size")


def trained_on(adapter: Path) -> tuple[str, Path | None]:
    """Which base `adapter` was trained on: (how to name it, its folder where that is known), from its run's
    config.yaml (model.name and model.local_dir), else adapter_config.json's base_model_name_or_path."""
    import json

    import yaml

    if adapter.name == "adapter" and (adapter.parent / "config.yaml").is_file():
        try:
            model = yaml.safe_load((adapter.parent / "config.yaml").read_text())["model"]
            return f"{model['name']} ({model['local_dir']})", Path(model["local_dir"]).expanduser()
        except (OSError, yaml.YAMLError, KeyError, TypeError):
            pass
    try:
        name = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError):
        name = None
    if not name:
        return "another base", None
    return str(name), Path(name).expanduser() if Path(name).expanduser().is_dir() else None


def _shapes(folder: Path | None) -> dict | None:
    import json

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return None
    return {k: config.get(k) for k in SHAPE_KEYS} if isinstance(config, dict) else None


def check_base(rcfg: Config, base: Path, adapter: Path, key: str) -> None:
    """Refuse an adapter whose base has other layer shapes than `base` (both configs read from disk); where the
    adapter's base is not on this machine the load itself tells (_other_base_if_mismatched)."""
    label, folder = trained_on(adapter)
    theirs, ours = _shapes(folder), _shapes(base)
    if theirs is None or ours is None or folder.resolve() == base.resolve():
        return
    diff = next((k for k in SHAPE_KEYS if theirs[k] != ours[k]), None)
    if diff:
        raise ConfigError(_other_base(rcfg, base, adapter, key, label, f"{diff} {theirs[diff]} vs {ours[diff]}"))


@contextlib.contextmanager
def _other_base_if_mismatched(rcfg: Config, base: Path, adapter: Path, key: str):
    """PEFT's size-mismatch error (a line per tensor) as the one line that names both bases."""
    try:
        yield
    except RuntimeError as e:
        if "size mismatch" not in str(e):
            raise
        import re

        m = re.search(r"size mismatch for (\S+?): copying a param with shape torch\.Size\(\[([^\]]*)\]\) from "
                      r"checkpoint, the shape in current model is torch\.Size\(\[([^\]]*)\]\)", str(e))
        why = f"{m.group(1)} is [{m.group(2)}] in the adapter, [{m.group(3)}] in this base" if m else "tensor sizes differ"
        raise ConfigError(_other_base(rcfg, base, adapter, key, trained_on(adapter)[0], why)) from None


def _other_base(rcfg: Config, base: Path, adapter: Path, key: str, label: str, why: str) -> str:
    run = adapter.name == "adapter" and (adapter.parent / "config.yaml").is_file()
    where = adapter.parent if run else adapter
    return (f"{key}: {where} was trained on {label}, but the base loaded here is {rcfg.model.name} ({base}): {why}; "
            f"an adapter fits only the base it was trained on: " + (f"use it with run={where}" if run else "use it over that base"))


def render(loaded: Loaded, messages: list[dict], enable_thinking: bool) -> str:
    from qtune.data import template

    return template.render(loaded.tokenizer, loaded.template, messages, add_generation_prompt=True,
                           enable_thinking=enable_thinking)


def prompt_tensors(model, tokenizer, template: str, messages: list[dict], enable_thinking: bool | None = False) -> dict:
    """A generation prompt for `messages`, rendered with `template`, as tensors on the model's device."""
    from qtune.data.template import prompt_inputs

    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in prompt_inputs(tokenizer, template, messages, enable_thinking).items()}


def answer(model, tokenizer, inputs: dict, max_new_tokens: int, sampling: ChatConfig | None = None,
           streamer=None) -> tuple[str, int]:
    """One whole answer to a prompt and its count of new tokens: greedy, or sampled with `sampling`'s settings.
    (Generation streams instead, for people waiting on it.)"""
    import torch

    sample = sampling is not None and sampling.temperature > 0
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=sample,
                             temperature=sampling.temperature if sample else None,
                             top_p=sampling.top_p if sample else None, top_k=sampling.top_k if sample else None,
                             repetition_penalty=sampling.repetition_penalty if sampling else None,
                             pad_token_id=tokenizer.pad_token_id, streamer=streamer, use_cache=True)
    new = out[0, inputs["input_ids"].shape[1]:]
    return tokenizer.decode(new, skip_special_tokens=True).strip(), len(new)


@dataclass(frozen=True)
class Controls:
    """What an OpenAI request adds to the chat settings (serve checks the ranges): the seed of its draws, a bias added
    to the logits of token ids, and penalties over the tokens generated so far (OpenAI's: each token's logit less
    frequency_penalty x its count, less presence_penalty once it has appeared)."""
    seed: int | None = None
    logit_bias: dict = field(default_factory=dict)    # token id -> -100..100
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def shapes_logits(self) -> bool:
        return bool(self.logit_bias) or bool(self.presence_penalty) or bool(self.frequency_penalty)


def _processors(sampling: ChatConfig, controls: Controls, prompt_tokens: int, generator):
    """`generate`'s logits processors for `controls`, and when sampling, temperature, top-k, top-p and a draw with
    `generator` (generate then runs greedy: the draw leaves one token standing). After generate's own processors
    (the repetition penalty), as its sampling would run them."""
    import torch
    from transformers import LogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    class Shape(LogitsProcessor):
        def __init__(self):
            self.bias = None

        def __call__(self, input_ids, scores):
            if self.bias is None:
                self.bias = torch.zeros(scores.shape[-1], dtype=scores.dtype, device=scores.device)
                for token, value in controls.logit_bias.items():
                    self.bias[token] = value
            counts = torch.zeros_like(scores).scatter_add_(
                1, input_ids[:, prompt_tokens:], torch.ones_like(input_ids[:, prompt_tokens:], dtype=scores.dtype))
            return (scores + self.bias - controls.frequency_penalty * counts
                    - controls.presence_penalty * (counts > 0).to(scores.dtype))

    class Draw(LogitsProcessor):
        def __call__(self, input_ids, scores):
            token = torch.multinomial(scores.float().softmax(-1), 1, generator=generator)
            return torch.full_like(scores, float("-inf")).scatter_(1, token, 0.0)

    out = [Shape()] if controls.shapes_logits() else []
    if sampling.temperature > 0:
        out.append(TemperatureLogitsWarper(sampling.temperature))
        if sampling.top_k:
            out.append(TopKLogitsWarper(sampling.top_k))
        if sampling.top_p < 1:
            out.append(TopPLogitsWarper(sampling.top_p))
        out.append(Draw())
    return out


class Generation:
    """One streamed generation: iterate for text pieces; stop() ends it early; counts tokens. `sampling` is the
    chat group's settings (serve fills a copy from each request, and `controls` from its OpenAI parameters); text
    stops exactly before the first of `stop` to appear (text that could begin one is held back until it cannot)."""

    def __init__(self, loaded: Loaded, prompt: str, sampling: ChatConfig, stop: list[str] = (),
                 controls: Controls | None = None):
        import torch
        from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        tok = loaded.tokenizer
        device = next(loaded.model.parameters()).device
        self.inputs = tok(prompt, return_tensors="pt", add_special_tokens=False).to(device)
        self.prompt_tokens = int(self.inputs["input_ids"].shape[1])
        self.completion_tokens = 0
        self.finish_reason = "stop"
        self._stop = threading.Event()
        self.streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True, timeout=600)
        outer = self

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), outer._stop.is_set(), dtype=torch.bool, device=input_ids.device)

        self.controls = controls = controls or Controls()
        self.generator = None
        if sampling.temperature > 0:   # this generation's own draws: the same seed, the same answer
            self.generator = torch.Generator(device)
            if controls.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(controls.seed)
        self.kwargs = dict(**self.inputs, max_new_tokens=sampling.max_new_tokens, do_sample=False,
                           temperature=None, top_p=None, top_k=None,
                           logits_processor=LogitsProcessorList(
                               _processors(sampling, controls, self.prompt_tokens, self.generator)),
                           repetition_penalty=sampling.repetition_penalty, streamer=self.streamer,
                           stopping_criteria=StoppingCriteriaList([_Stop()]),
                           pad_token_id=tok.pad_token_id, use_cache=True)
        # On a GPU, a 16-bit model without unmerged adapters decodes through qtune.inference.decoding (one CUDA graph a
        # token); other GPU models through generate's static cache, which transformers compiles; on CPU the
        # compilation costs more than it saves (docs/benchmarks.md).
        self.sampling = sampling
        self.decoder = None
        if sampling.cache == "graph" or (sampling.cache == "auto" and device.type == "cuda"):
            from qtune.inference import decoding

            why = decoding.supported(loaded.model)
            if why is None:
                if loaded.decoder is None:   # off a GPU the same loop runs eagerly (tests, debugging)
                    gpu = device.type == "cuda"
                    notice = loaded.notice or logging.getLogger("qtune").info
                    loaded.decoder = decoding.GraphDecoder(loaded.model, graph=gpu, compile=gpu, notice=notice)
                self.decoder = loaded.decoder
            elif sampling.cache == "graph":
                raise ConfigError(f"chat.cache=graph: cannot decode {why} with a CUDA graph; use chat.cache=static")
        self._in_worker = lambda: None
        if self.decoder is None and (sampling.cache == "static" or (sampling.cache == "auto" and device.type == "cuda")):
            self.kwargs["cache_implementation"] = "static"
            if device.type == "cuda":
                self._in_worker = _share_cudagraph_state()
        self.max_new_tokens = sampling.max_new_tokens
        self.stops = [s for s in stop if s]
        self.loaded = loaded
        self.error: BaseException | None = None

    def _run(self):
        import torch

        try:
            if self.decoder is not None:
                self._decode()
                return
            self._in_worker()
            with torch.no_grad():
                out = self.loaded.model.generate(**self.kwargs)
            self.completion_tokens = int(out.shape[1]) - self.prompt_tokens
            if self.completion_tokens >= self.max_new_tokens:
                self.finish_reason = "length"
        except BaseException as e:  # surfaced in the iterating thread
            self.error = e
            self.streamer.end()

    def _decode(self):
        import torch

        s = self.sampling
        self.streamer.put(self.inputs["input_ids"].cpu())          # the prompt, which the streamer skips
        try:
            self.completion_tokens, self.finish_reason = self.decoder.generate(
                self.inputs["input_ids"], s.max_new_tokens, lambda t: self.streamer.put(torch.tensor([t])),
                self._stop.is_set, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                repetition_penalty=s.repetition_penalty, logit_bias=self.controls.logit_bias,
                presence_penalty=self.controls.presence_penalty, frequency_penalty=self.controls.frequency_penalty,
                generator=self.generator)
        finally:
            self.streamer.end()

    def __iter__(self):
        thread = threading.Thread(target=self._run, daemon=True)
        thread.start()
        held = ""   # text not yet given out: it contains no stop string, and it is all the start of one
        stopped = False
        try:
            for piece in self.streamer:
                if not self.stops:
                    yield piece
                    continue
                held += piece
                hit = min((held.find(s) for s in self.stops if s in held), default=-1)
                if hit >= 0:
                    if hit > 0:
                        yield held[:hit]
                    held = ""
                    stopped = True
                    self.stop()
                    break
                keep = _stop_prefix(held, self.stops)
                if keep < len(held):
                    yield held[:len(held) - keep]
                    held = held[len(held) - keep:]
            if held:
                yield held    # the generation ended before the stop string it could have begun
        finally:
            self.stop()
            thread.join()
            if stopped:       # after the worker's own count (which may have reached max_new_tokens too)
                self.finish_reason = "stop"
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        self._stop.set()


def _stop_prefix(text: str, stops: list[str]) -> int:
    """The length of the longest end of `text` that is the start of one of `stops` (0 when none is)."""
    for n in range(min(len(text), max(map(len, stops)) - 1), 0, -1):
        if any(s.startswith(text[-n:]) for s in stops):
            return n
    return 0


def _share_cudagraph_state():
    """generate's compiled static-cache step runs under inductor's CUDA-graph trees, which keep their state in the
    thread that imported them; torch before 2.13 asserts when such a function runs in another Python thread
    (pytorch/pytorch#123177), as Generation's worker is. Returns a function that, called in the worker, shares
    this thread's state with it (the fix torch 2.13 makes itself)."""
    import torch

    try:
        from torch._inductor import cudagraph_trees as trees

        names = ("tree_manager_containers", "tree_manager_locks")
        state = {name: trees.get_obj(trees.local, name) for name in names}
    except Exception:  # a torch that keeps it elsewhere: nothing to share
        return lambda: None

    def share():
        for name, obj in state.items():
            if not torch._C._is_key_in_tls(name):
                torch._C._stash_obj_in_tls(name, obj)
    return share
