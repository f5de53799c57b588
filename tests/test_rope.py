"""model.rope_scaling=yarn: data.max_length past a model's context is refused without it, and with it the model loads
with YaRN positions for training, and the run folder and its merged model keep them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import one_line_error, qtune_warm

# the tiny Qwen3 reaches 4096 positions; YaRN from 2048 with the factor 4 reaches 8192
TINY_YARN = ("model.rope_scaling=yarn", "model.rope_original_max_position_embeddings=2048")


def test_a_length_past_the_context_is_refused_in_one_line():
    p = qtune_warm("train", "--dry-run", "model=qwen3_8b", "data.max_length=65536")
    line = one_line_error(p)
    assert "data.max_length=65,536" in line and "40,960" in line and "model.rope_scaling=yarn" in line
    assert "131,072" in line
    ok = qtune_warm("train", "--dry-run", "model=qwen3_8b", "quant=nf4", "data.max_length=65536",
                    "model.rope_scaling=yarn", check=True)
    assert "longest data.max_length that fits" in ok.stdout
    far = one_line_error(qtune_warm("train", "--dry-run", "model=qwen3_8b", "data.max_length=200000",
                                    "model.rope_scaling=yarn"))
    assert "data.max_length=200,000" in far and "131,072" in far and "model.rope_factor" in far
    assert "data.max_length=65,536" in one_line_error(qtune_warm("prepare", "model=qwen3_8b", "data=demo",
                                                                 "data.max_length=65536"))
    bad = one_line_error(qtune_warm("train", "--dry-run", "model=tiny_qwen3", "model.rope_scaling=yarn"))
    assert "model.rope_original_max_position_embeddings=32768" in bad and "4,096" in bad
    assert "model.rope_factor=1" in one_line_error(qtune_warm("train", "--dry-run", "model=qwen3_8b",
                                                              "model.rope_scaling=yarn", "model.rope_factor=1"))


def test_yarn_reaches_the_loaded_model(tiny_qwen3):
    """The model loads with transformers' YaRN parameters (rope_parameters, transformers 5's spelling): a rotary table
    other than the default's, its attention scaling, and positions to factor x original."""
    import torch

    from qtune.config import compose, to_object
    from qtune.modeling.load import load_model

    def loaded(*over):
        cfg = to_object(compose(["model=tiny_qwen3", *over]))
        return load_model(tiny_qwen3, cfg.model, cfg.quant, "cpu", torch.float32, gradient_checkpointing=False)

    plain, yarn = loaded(), loaded(*TINY_YARN)
    assert plain.config.rope_parameters["rope_type"] == "default"
    params = yarn.config.rope_parameters
    assert params["rope_type"] == "yarn" and params["factor"] == 4.0
    assert params["original_max_position_embeddings"] == 2048
    assert params["rope_theta"] == plain.config.rope_parameters["rope_theta"]
    assert yarn.config.max_position_embeddings == 8192
    rotary, base = yarn.model.rotary_emb, plain.model.rotary_emb
    assert rotary.attention_scaling == pytest.approx(0.1 * torch.log(torch.tensor(4.0)).item() + 1)
    assert not torch.allclose(rotary.inv_freq, base.inv_freq)
    ids = torch.arange(3000)[None] % 1000 + 10
    with torch.no_grad():
        assert not torch.allclose(yarn(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_a_yarn_run_keeps_it_in_its_config_and_merged_model(tiny_qwen3, tmp_path):
    """Train past the tiny model's 4096 positions with YaRN (an example of ~6,000 tokens kept whole), then merge: the
    run's config.yaml says yarn, and the merged model's config.json carries the YaRN parameters that chat and serve
    load it with."""
    data = tmp_path / "long.jsonl"
    words = " ".join(f"w{i % 97}" for i in range(2000))  # ~5,800 tokens
    data.write_text(json.dumps({"instruction": "repeat", "output": words}) + "\n"
                    + "".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(4)))
    run = tmp_path / "run"
    p = qtune_warm("train", "model=tiny_qwen3", f"data.path={data}", "data.max_length=6144", "data.val_size=0",
                   *TINY_YARN, "train.max_steps=1", "train.grad_accum=1", "train.report_to=[]",
                   f"train.output_dir={run}", check=True)
    assert "longer than data.max_length" not in p.stderr
    import re

    assert int(re.search(r"([\d,]+) train tokens", p.stdout).group(1).replace(",", "")) > 5000
    saved = yaml.safe_load((run / "config.yaml").read_text())["model"]
    assert saved["rope_scaling"] == "yarn" and saved["rope_original_max_position_embeddings"] == 2048
    qtune_warm("merge", f"run={run}", "merge.dtype=fp32", check=True)
    merged = json.loads((Path(run) / "merged" / "config.json").read_text())
    assert merged["rope_parameters"]["rope_type"] == "yarn" and merged["max_position_embeddings"] == 8192
