"""Merging (the library part of `qtune merge`, also used by `train.merge_after`): fold a run's adapter into 16-bit base weights, save a standalone model, prove parity.

  1. read the run folder: its config.yaml names the base model, quant and adapter settings
  2. load the base in merge.parity_dtype (fp32 by default), never quantized, and the adapter over it
  3. logits of base+adapter on a few prompts (the reference)
  4. merge (linear layers, fused MoE experts, the router: PEFT's merge_and_unload); logits of the merged
     model on the same prompts: the largest absolute difference must stay within merge.tolerance,
     otherwise the merge fails loudly and nothing is left behind
  5. cast to merge.dtype (bf16 by default) and report what that rounding costs (how often the next-token
     choice still agrees, the largest logit change), then save sharded safetensors with tokenizer, chat
     template and generation config into <run>/merged/ (atomically)
  6. GGUF exports (merge.gguf) go beside it, <run>/gguf/merged-<type>.gguf with an Ollama Modelfile each, so a later
     merge (which replaces merged/) keeps them; ones an older qtune left inside merged/ are moved there first
The check runs in fp32 because a bf16 model differs from bf16 base+adapter by whole logits (rounding of
W+ΔW), which would hide a wrong merge; set merge.parity_dtype=bf16 (and a looser tolerance) for models
too large to hold in fp32.

An adapter trained on a quantized (nf4/int8) base is merged into the 16-bit original weights; the output
says so, since the training saw their quantized values.

A reward model (train.stage=rm) merges into a sequence-classification checkpoint that keeps its trained score head
(the adapter holds it); parity is checked on its scores. GGUF and 4-bit exports are for language models only.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from qtune.config.schema import Config, DType, QuantMethod
from qtune.errors import ConfigError, QtuneError
from qtune.stages import get

PARITY_PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "2 + 2 ="]


class ParityError(QtuneError):
    """The merged model does not reproduce base+adapter."""


MARKER = "qtune_merge.json"  # what makes a folder a qtune merge that a new merge may replace


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse to replace anything a user owns: a file, or a non-empty folder that no qtune merge wrote."""
    from qtune.io import check_writable

    check_writable(out, "merge.output_dir", beside=True)
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file() and not overwrite:
        raise ConfigError(f"merge.output_dir={out} holds files that no qtune merge wrote; choose another folder "
                          "or set merge.overwrite=true to replace them")


def check_exports(cfg: Config, adapter: Path) -> None:
    """GGUF and 4-bit exports are for language models: a reward model (train.stage=rm) is refused in one line."""
    if not get(cfg.train.stage).writes and (cfg.merge.gguf or cfg.merge.save_4bit):
        raise ConfigError(f"merge.{'gguf' if cfg.merge.gguf else 'save_4bit'}: {adapter.parent} is a reward model "
                          "(train.stage=rm), which merges into a sequence-classification checkpoint only; GGUF and 4-bit "
                          "exports are for language models")


def merge(cfg: Config, adapter: Path, out: Path, warn=None) -> dict:
    """Fold `adapter` into the base, check parity, save into `out` atomically; `warn` takes warnings (a verb's terminal)."""
    scorer = get(cfg.train.stage).head == "score"
    check_exports(cfg, adapter)
    check_output(out, cfg.merge.overwrite)
    if cfg.merge.save_4bit:
        check_output(_nf4_dir(out), cfg.merge.overwrite)
    _remove_stale(out, warn)
    import torch
    from peft import PeftModel

    from qtune.modeling.hub import ensure_model
    from qtune.io import atomic_dir, atomic_write_json
    from qtune.modeling.load import load_tokenizer, model_class, torch_dtype

    for key in ("dtype", "parity_dtype"):
        if getattr(cfg.merge, key) is DType.auto:
            raise ConfigError(f"merge.{key}=auto: choose bf16, fp16 or fp32")
    folder = ensure_model(cfg.model, cfg.download, cfg.paths, warn=warn)
    tokenizer = load_tokenizer(cfg.model, cfg.paths)
    auto, extra = model_class(get(cfg.train.stage).head)
    from qtune.modeling.rope import load_kwargs

    # YaRN (model.rope_scaling) as the run trained with it: the merged model's config.json keeps it
    base = auto.from_pretrained(folder, dtype=torch_dtype(cfg.merge.parity_dtype),
                                trust_remote_code=cfg.model.trust_remote_code, **load_kwargs(folder, cfg.model, **extra))
    if scorer:  # where the score is read (the last token that is not padding), as in training
        base.config.pad_token_id = tokenizer.pad_token_id
    model = PeftModel.from_pretrained(base, adapter)
    model.eval()
    inputs = _parity_inputs(model, tokenizer, cfg)
    with torch.no_grad():
        reference = [model(**x).logits.float() for x in inputs]
        merged = model.merge_and_unload()
        got = [merged(**x).logits.float() for x in inputs]
        diff = max((a - b).abs().max().item() for a, b in zip(reference, got))
        if not diff <= cfg.merge.tolerance:  # also catches NaN
            raise ParityError(f"merge parity failed: max |logits(merged) - logits(base+adapter)| = {diff:.4g} > "
                              f"merge.tolerance={cfg.merge.tolerance:g} ({cfg.merge.parity_dtype}); nothing was saved")
        result = {"base": str(folder), "adapter": str(adapter), "dtype": str(cfg.merge.dtype),
                  "parity_dtype": str(cfg.merge.parity_dtype), "max_abs_diff": diff,
                  "tolerance": cfg.merge.tolerance, "prompts": len(inputs)}
        if cfg.merge.dtype is not cfg.merge.parity_dtype:
            merged = merged.to(torch_dtype(cfg.merge.dtype))
            cast = [merged(**x).logits.float() for x in inputs]
            result["cast_max_abs_diff"] = max((a - b).abs().max().item() for a, b in zip(reference, cast))
            if not scorer:  # (a score has no next-token choice)
                agree = [(a.argmax(-1) == b.argmax(-1)).float().mean().item() for a, b in zip(reference, cast)]
                result["top1_agreement"] = sum(agree) / len(agree)
    _keep_old_exports(out)
    staged = None
    try:
        with atomic_dir(out, replace=True, need=_bytes_to_save(merged, folder, cfg.merge.gguf),
                        remedy="free space, or set merge.output_dir to a folder on another disk") as tmp:
            merged.save_pretrained(tmp, max_shard_size="2GB")
            tokenizer.save_pretrained(tmp)
            if cfg.merge.gguf:  # beside the merged folder, so that the next merge (which replaces it) keeps them
                staged = _stage(gguf_dir(out))
                result["gguf"] = [_gguf(merged, tokenizer, staged[0], out, t, inputs) for t in cfg.merge.gguf]
            else:
                result["gguf"] = []
            atomic_write_json(tmp / MARKER, result)
        if staged:
            for f in sorted(staged[0].iterdir()):
                os.replace(f, gguf_dir(out) / f.name)
    finally:
        if staged:
            shutil.rmtree(staged[0], ignore_errors=True)
            os.close(staged[1])
    if cfg.merge.save_4bit:
        result["bnb_4bit"] = str(_save_4bit(out, tokenizer))
        atomic_write_json(out / MARKER, result)
    return result


def _remove_stale(out: Path, warn=None) -> None:
    """What merges killed midway (kill -9) left beside `out`: full-size hidden copies, removed before this one
    writes its own, in one line."""
    from qtune.io import remove_stale_temps
    from qtune.text import human_bytes

    found = [remove_stale_temps(t) for t in (out, _nf4_dir(out), gguf_dir(out) / "export")]
    count, freed = sum(f[0] for f in found), sum(f[1] for f in found)
    if count and warn:
        pids = sorted({p for f in found for p in f[2]})
        warn(f"removed {count} unfinished merge{'s' if count > 1 else ''} beside {out} that "
             f"{'processes' if len(pids) > 1 else 'process'} {', '.join(map(str, pids))} left when "
             f"{'they were' if len(pids) > 1 else 'it was'} stopped: {human_bytes(freed)} freed")


# Next-token agreement a GGUF file must keep with the merged model when loaded back: f16 is a plain cast,
# q8_0 rounds every weight to 8 bits (~0.5 % error per weight: a few close calls flip); the k-quant mixes round most
# weights to 4-6 bits (2-7 % error per weight). A file whose blocks were laid out wrong agrees on almost nothing.
GGUF_MIN_AGREEMENT = {"f16": 0.98, "q8_0": 0.8, "q4_k_m": 0.6, "q5_k_m": 0.6, "q6_k": 0.7}


def gguf_dir(out: Path) -> Path:
    """Where the GGUF exports of the merged folder `out` go: `<out's parent>/gguf/` (a run's: <run>/gguf/), each file
    `<out's name>-<type>.gguf` with its Ollama Modelfile `<out's name>-<type>.Modelfile`."""
    return out.parent / "gguf"


def _stage(folder: Path):
    """A hidden temporary folder inside `folder` (owned by this process) where GGUF files are written and checked
    before they replace earlier ones of the same name."""
    from qtune.io import owned_temp

    folder.mkdir(parents=True, exist_ok=True)
    return owned_temp(folder / "export", ".tmp")


def _keep_old_exports(out: Path) -> None:
    """GGUF files an earlier qtune merge left inside `out` (where they used to be written) move to gguf_dir before the
    new merge replaces `out`."""
    if not (out / MARKER).is_file():
        return
    for f in out.glob("*.gguf"):
        target = gguf_dir(out) / f.name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(f, target)


def _gguf(merged, tokenizer, staging: Path, out: Path, qtype: str, inputs) -> dict:
    from qtune.export.gguf import export, modelfile, verify
    from qtune.io import atomic_write_text

    name = f"{out.name}-{qtype}.gguf"
    export(merged, tokenizer, staging / name, qtype)
    check = verify(staging / name, merged, tokenizer, inputs)
    if check["top1_agreement"] < GGUF_MIN_AGREEMENT[qtype]:
        raise ParityError(f"GGUF {qtype} check failed: loaded back, it agrees with the merged model on "
                          f"{check['top1_agreement']:.1%} of next tokens (< {GGUF_MIN_AGREEMENT[qtype]:.0%}); nothing was saved")
    atomic_write_text(staging / f"{out.name}-{qtype}.Modelfile", modelfile(name, tokenizer))
    check["file"] = str(gguf_dir(out) / name)
    check["modelfile"] = str(gguf_dir(out) / f"{out.name}-{qtype}.Modelfile")
    check["type"] = qtype
    return check


def _save_4bit(merged_dir: Path, tokenizer) -> Path:
    """The merged model re-loaded as bitsandbytes NF4 (double quant) and saved: a 4-bit checkpoint."""
    from transformers import AutoModelForCausalLM

    from qtune.config.schema import QuantConfig, QuantMethod
    from qtune.io import atomic_dir, atomic_write_json
    from qtune.modeling.load import bnb_config

    target = _nf4_dir(merged_dir)
    model = AutoModelForCausalLM.from_pretrained(merged_dir, quantization_config=bnb_config(QuantConfig(method=QuantMethod.nf4)),
                                                 device_map={"": "cuda" if _cuda() else "cpu"})
    with atomic_dir(target, replace=True, remedy=f"the merged model in {merged_dir} is saved; free space and run "
                                                 "the merge again for the 4-bit checkpoint") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / MARKER, {"merged": str(merged_dir), "quant": "nf4"})
    return target


# Bytes a GGUF file takes per weight: f16, and q8_0's blocks of 32 int8 weights with one f16 scale; the k-quant mixes
# at most their fallbacks' (Q5_0 / Q5_1 / Q8_0 where rows are not a multiple of 256)
GGUF_BYTES_PER_WEIGHT = {"f16": 2.0, "q8_0": 34 / 32, "q4_k_m": 34 / 32, "q5_k_m": 34 / 32, "q6_k": 34 / 32}


def _bytes_to_save(merged, base: Path, gguf: list[str]) -> int:
    """About what the merged folder takes: the weights (tied ones once), the tokenizer's files, each GGUF file."""
    from qtune.modeling.load import TOKENIZER_FILES

    tensors = {t.data_ptr(): t for t in merged.state_dict().values()}
    weights = sum(t.numel() * t.element_size() for t in tensors.values())
    numel = sum(t.numel() for t in tensors.values())
    tokenizer = sum(f.stat().st_size for pattern in TOKENIZER_FILES for f in Path(base).glob(pattern) if f.is_file())
    return int(weights + tokenizer + sum(GGUF_BYTES_PER_WEIGHT.get(t, 2.0) * numel for t in gguf))


def _nf4_dir(merged_dir: Path) -> Path:
    return merged_dir.parent / f"{merged_dir.name}-nf4"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _parity_inputs(model, tokenizer, cfg: Config) -> list[dict]:
    from qtune.data.template import resolve_template
    from qtune.inference.load import prompt_tensors

    template, _ = resolve_template(tokenizer, cfg.model.chat_template, cfg.model.name)
    return [prompt_tensors(model, tokenizer, template, [{"role": "user", "content": p}], None) for p in PARITY_PROMPTS]


def export_model(cfg: Config, model_dir: Path, warn=None) -> dict:
    """A run that trained the weights themselves (train.method=full|freeze): nothing to fold, <run>/model/ is the
    model. Its GGUF exports (merge.gguf: <run>/gguf/model-<type>.gguf with Ollama Modelfiles) and 4-bit checkpoint
    (merge.save_4bit: <run>/model-nf4/) are made from it, each checked as a merge's are."""
    if cfg.merge.save_4bit:
        check_output(_nf4_dir(model_dir), cfg.merge.overwrite)
    check_exports(cfg, model_dir)
    result = {"model": str(model_dir), "gguf": []}
    if not cfg.merge.gguf and not cfg.merge.save_4bit:
        return result
    for f in (gguf_dir(model_dir) / "export",):
        from qtune.io import remove_stale_temps

        remove_stale_temps(f)
    from qtune.modeling.load import load_tokenizer, model_class, torch_dtype

    tokenizer = load_tokenizer(cfg.model, cfg.paths)
    if cfg.merge.gguf:
        auto, extra = model_class(get(cfg.train.stage).head)
        model = auto.from_pretrained(model_dir, dtype=torch_dtype(cfg.merge.dtype), **extra)
        model.eval()
        inputs = _parity_inputs(model, tokenizer, cfg)
        staged = _stage(gguf_dir(model_dir))
        try:
            import torch

            with torch.no_grad():
                result["gguf"] = [_gguf(model, tokenizer, staged[0], model_dir, t, inputs) for t in cfg.merge.gguf]
            for f in sorted(staged[0].iterdir()):
                os.replace(f, gguf_dir(model_dir) / f.name)
        finally:
            shutil.rmtree(staged[0], ignore_errors=True)
            os.close(staged[1])
    if cfg.merge.save_4bit:
        result["bnb_4bit"] = str(_save_4bit(model_dir, tokenizer))
    return result
