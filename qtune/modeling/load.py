"""Loading: tokenizer (and, with the train issue, quantized models)."""
from __future__ import annotations

from pathlib import Path

from qtune.config.schema import ModelConfig, ModelSource, PathsConfig
from qtune.errors import QtuneError

TOKENIZER_FILES = ["tokenizer*", "vocab*", "merges.txt", "*.tiktoken", "special_tokens_map.json", "chat_template*",
                   "config.json", "generation_config.json"]


def load_tokenizer(model: ModelConfig, paths: PathsConfig):
    """The model's tokenizer; for a Hub model only the tokenizer files are fetched when missing."""
    from transformers import AutoTokenizer

    local = Path(model.local_dir).expanduser()
    if not any(local.glob("tokenizer*")):
        if model.source is ModelSource.hub:
            from huggingface_hub import snapshot_download

            from qtune.download import explain_hub_error

            try:
                snapshot_download(model.repo_id, revision=model.revision, local_dir=local, allow_patterns=TOKENIZER_FILES)
            except Exception as e:
                raise QtuneError(explain_hub_error(e, model)) from None
        else:
            from qtune.download import ensure_model

            ensure_model(model, paths=paths)
    tok = AutoTokenizer.from_pretrained(local, trust_remote_code=model.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
