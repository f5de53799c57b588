"""Loading: the tokenizer, and the base model for training (quantized per the quant group)."""
from __future__ import annotations

from pathlib import Path

from qtune.config.schema import DType, ModelConfig, ModelSource, PathsConfig, QuantConfig, QuantMethod
from qtune.errors import ConfigError, QtuneError

TOKENIZER_FILES = ["tokenizer*", "vocab*", "merges.txt", "*.tiktoken", "special_tokens_map.json", "chat_template*",
                   "config.json", "generation_config.json"]


def load_tokenizer(model: ModelConfig, paths: PathsConfig):
    """The model's tokenizer; for a Hub model only the tokenizer files are fetched when missing."""
    from transformers import AutoTokenizer

    local = Path(model.local_dir).expanduser()
    if not any(local.glob("tokenizer*")):
        if model.source is ModelSource.hub:
            from huggingface_hub import snapshot_download

            from qtune.modeling.hub import explain_hub_error

            try:
                snapshot_download(model.repo_id, revision=model.revision, local_dir=local, allow_patterns=TOKENIZER_FILES)
            except Exception as e:
                raise QtuneError(explain_hub_error(e, model)) from None
        else:
            from qtune.modeling.hub import ensure_model

            ensure_model(model, paths=paths)
    tok = AutoTokenizer.from_pretrained(local, trust_remote_code=model.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


# ---------------------------------------------------------------- models for training


def torch_dtype(dtype: DType):
    import torch

    return {DType.bf16: torch.bfloat16, DType.fp16: torch.float16, DType.fp32: torch.float32}[dtype]


def pick_device(device: str, dtype: DType):
    """(device, torch dtype): cuda when asked or available; bf16 where supported, fp16 on older GPUs, fp32 on CPU."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"train.device={device}: valid: auto, cpu, cuda, cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise QtuneError(f"train.device={device}: no CUDA GPU is visible on this machine; use train.device=cpu")
    if dtype is DType.auto:
        if device == "cpu":
            return device, torch.float32
        return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return device, torch_dtype(dtype)


def bnb_config(quant: QuantConfig, quant_storage=None, keep: tuple[str, ...] = ()):
    """transformers' BitsAndBytesConfig for quant=nf4|fp4|int8; None for quant=none. quant_storage (FSDP2): the dtype
    the packed 4-bit weights are stored as, the model's own, so that FSDP can shard them like every other weight (the
    FSDP-QLoRA recipe: it shards floating-point tensors only). `keep`: more modules left unquantized (a reward model's
    score head, trained whole)."""
    if quant.method is QuantMethod.none:
        return None
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # not installed, or no backend for this machine
        raise QtuneError(f"quant={quant.method}: bitsandbytes cannot load here ({str(e).splitlines()[0]}); "
                         "install bitsandbytes>=0.45 or use quant=none") from None
    from transformers import BitsAndBytesConfig

    skip = [*quant.skip_modules, *keep]
    if quant.method is QuantMethod.int8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=str(quant.method),
                              bnb_4bit_use_double_quant=quant.double_quant,
                              bnb_4bit_compute_dtype=torch_dtype(quant.compute_dtype),
                              llm_int8_skip_modules=skip,
                              **({"bnb_4bit_quant_storage": quant_storage} if quant_storage is not None else {}))


def model_class(head: str):
    """The transformers class that loads a model ending in `head` ("lm", or "score": a one-output sequence-classification
    head, a reward model's), with the keyword arguments it needs."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return (AutoModelForSequenceClassification, {"num_labels": 1}) if head == "score" else (AutoModelForCausalLM, {})


def load_model(folder: Path, model: ModelConfig, quant: QuantConfig, device: str, dtype, gradient_checkpointing: bool,
               experts_4bit: bool = False, quant_storage=None, head: str = "lm"):
    """The base model for training: quantized per `quant`, on `device`, SDPA (flash-attention when installed), with
    model.rope_scaling's positions (qtune.modeling.rope).
    experts_4bit (the fast path's MoE on CUDA with quant=nf4|fp4): fused expert tensors, which bitsandbytes leaves in
    16 bits, become 4-bit one at a time as they load (qtune.modeling.fast.experts). quant_storage: see bnb_config.
    head="score": the base under a new one-output sequence-classification head (a reward model, qtune.training.trainers), drawn
    from the current seed."""
    import contextlib
    import importlib.util

    attn = "flash_attention_2" if device != "cpu" and importlib.util.find_spec("flash_attn") else "sdpa"
    qconfig = bnb_config(quant, quant_storage, keep=("score",) if head == "score" else ())
    auto, extra = model_class(head)
    experts = contextlib.nullcontext()
    if experts_4bit and device.startswith("cuda") and quant.method in (QuantMethod.nf4, QuantMethod.fp4):
        from qtune.modeling.fast.experts import four_bit_while_loading

        experts = four_bit_while_loading(str(quant.method))
    from qtune.modeling.rope import load_kwargs

    with experts:
        m = auto.from_pretrained(
            folder, dtype=dtype, quantization_config=qconfig, attn_implementation=attn,
            device_map={"": device}, trust_remote_code=model.trust_remote_code, **load_kwargs(folder, model, **extra))
    m.config.use_cache = False
    prepare_for_training(m, gradient_checkpointing)
    return m


def prepare_for_training(model, gradient_checkpointing: bool) -> None:
    """k-bit preparation without PEFT's blanket fp32 upcast: freeze the base, keep its dtype, checkpoint
    activations (non-reentrant) and let gradients reach the first layer through frozen embeddings."""
    for p in model.parameters():
        p.requires_grad_(False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()


def quiet_libraries(trl: bool = False) -> None:
    """Our progress and messages replace the libraries' bars, deprecation notes and advice. trl=True (train only:
    importing TRL costs seconds) also quiets TRL, whose loggers are set up when it is imported."""
    import logging
    import warnings

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # e.g. its kernel-hub notice on AVX512-bf16 CPUs
    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*(MatMul8bitLt|ensure_weight_tying|torch.jit).*")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if not trl:
        return
    import trl.trainer.sft_trainer  # noqa: F401  (its loggers exist once imported)

    for name in list(logging.root.manager.loggerDict):
        if name.startswith("trl"):
            logging.getLogger(name).setLevel(logging.ERROR)
