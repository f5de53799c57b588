"""qtune's k-quants (Q4_K, Q5_K, Q6_K) read back with the gguf package's own dequantizer (the one transformers' GGUF
loader uses), and the q4_k_m / q5_k_m / q6_k mixes' choice of type per tensor. The merged SmolLM2 in q4_k_m, loaded
back by transformers, is checked in test_chat_serve.py."""
from __future__ import annotations

import numpy as np
import pytest

from qtune.export.kquants import quantize, tensor_type

BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}  # per 256 values


def _read_back(x: np.ndarray, qtype: str) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    q = quantize(x, qtype)
    assert q.dtype == np.uint8 and q.shape == (*x.shape[:-1], x.shape[-1] // 256 * BYTES[qtype])
    return dequantize(q, getattr(GGMLQuantizationType, qtype)).reshape(x.shape)


def _rel_rms(x, y) -> float:
    return float(np.sqrt(((y - x) ** 2).mean() / (x ** 2).mean()))


def test_random_rows_read_back_within_each_widths_error():
    """Relative RMS error as measured (Gaussian rows: 0.072 / 0.036 / 0.018; Student-t(3) rows, heavy tails: 0.092 /
    0.047 / 0.025): about half with each extra bit, as a uniform grid's step halves."""
    rng = np.random.default_rng(0)
    rows = {"gauss": (rng.standard_normal((32, 512)) * 0.02, (0.08, 0.04, 0.02)),
            "t3": (rng.standard_t(3, (32, 512)) * 0.02, (0.1, 0.052, 0.028)),
            "shifted": (rng.standard_normal((32, 512)) * 0.02 + 0.01, (0.07, 0.036, 0.02))}
    for name, (x, bounds) in rows.items():
        x = x.astype(np.float32)
        err = {t: _rel_rms(x, _read_back(x, t)) for t in ("Q4_K", "Q5_K", "Q6_K")}
        assert all(err[t] < b for t, b in zip(("Q4_K", "Q5_K", "Q6_K"), bounds)), (name, err)
        assert err["Q4_K"] > 1.6 * err["Q5_K"] > 1.6 * 1.6 * err["Q6_K"], (name, err)


def test_exact_grids_read_back_exactly():
    """Values that lie on a block's own grid (power-of-two scales, every level's end used) come back to the last bit:
    each 4/5/6-bit level, 6-bit scale and min and int8 scale lands where gguf's reader looks for it."""
    rng = np.random.default_rng(1)
    nb = 6
    for qtype, top in (("Q4_K", 15), ("Q5_K", 31)):
        d, dmin = 2.0 ** -12, 2.0 ** -13
        sc = rng.integers(1, 64, (nb, 8)); sc[:, rng.integers(0, 8)] = 63     # the largest scale is 63 * d
        mn = rng.integers(0, 64, (nb, 8)); mn[:, rng.integers(0, 8)] = 63
        L = rng.integers(0, top + 1, (nb, 8, 32)); L[..., 0], L[..., 1] = 0, top  # the fit sees the whole range
        x = (d * sc[..., None] * L - dmin * mn[..., None]).astype(np.float32).reshape(2, -1)
        np.testing.assert_array_equal(_read_back(x, qtype), x)
    s = rng.integers(1, 129, (nb, 16)); s[:, 3] = 128                     # Q6_K: int8 scales -s, d = -2^-14
    l = rng.integers(-31, 32, (nb, 16, 16)); l[..., 5] = -32              # -32: the value of largest magnitude
    x = (2.0 ** -14 * s[..., None] * l).astype(np.float32).reshape(3, -1)
    np.testing.assert_array_equal(_read_back(x, "Q6_K"), x)


def test_zero_constant_and_tiny_blocks():
    x = np.zeros((4, 512), np.float32)
    x[1] = 0.125          # constant
    x[2, :256] = 1e-30    # below ggml's all-zero threshold in Q6_K
    x[3, 7] = -3.0        # a single spike
    for qtype in ("Q4_K", "Q5_K", "Q6_K"):
        y = _read_back(x, qtype)
        assert np.all(np.isfinite(y)) and not y[0].any(), qtype
        assert np.abs(y[1] - 0.125).max() < 0.125 * 0.02 and abs(y[3, 7] + 3.0) < 3.0 * 0.02, qtype
        assert np.abs(np.delete(y[3], 7)).max() < 3.0 * 2 ** -10, qtype  # (the fp16 rounding of d and dmin)
    assert not quantize(x[2:3], "Q6_K")[0, :210].any()  # an all-zero super-block is all zero bytes
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize(np.ones((2, 576), np.float32), "Q4_K")


def test_real_weight_rows(smollm2):
    """SmolLM2's ffn_down rows (1536 values; its weights come from a Q4_1 file, so they lie on a 4-bit grid of
    32-value blocks already, which Q4_K's 16 levels a sub-block can nearly follow): measured 0.0188 / 0.0196 / 0.0181."""
    from safetensors import safe_open

    (path,) = list(smollm2.glob("*.safetensors"))
    with safe_open(str(path), "np") as f:
        x = f.get_tensor("model.layers.10.mlp.down_proj.weight").astype(np.float32)[:64]
    err = {t: _rel_rms(x, _read_back(x, t)) for t in ("Q4_K", "Q5_K", "Q6_K")}
    assert all(e < 0.025 for e in err.values()) and err["Q6_K"] <= err["Q4_K"], err


MORE_BITS_30 = {0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29}  # llama.cpp's use_more_bits over 30 layers


def test_mixes_choose_types_as_llama_cpp():
    # SmolLM2-135M: 30 layers, rows of 576 (not a multiple of 256) except ffn_down's 1536, embeddings tied
    def smol(mix, name, cols=576):
        return tensor_type(name, cols, mix, 30, tied=True)

    assert smol("q4_k_m", "token_embd.weight") == "Q8_0"  # the output's role; rows of 576 -> Q8_0
    for i in range(30):
        more = i in MORE_BITS_30
        assert smol("q4_k_m", f"blk.{i}.ffn_down.weight", 1536) == ("Q6_K" if more else "Q4_K")
        assert smol("q5_k_m", f"blk.{i}.ffn_down.weight", 1536) == ("Q6_K" if more else "Q5_K")
        assert smol("q6_k", f"blk.{i}.ffn_down.weight", 1536) == "Q6_K"
        assert smol("q4_k_m", f"blk.{i}.attn_v.weight") == ("Q8_0" if more else "Q5_0")  # Q6_K / Q4_K, fallen back
        assert smol("q5_k_m", f"blk.{i}.attn_v.weight") == ("Q8_0" if more else "Q5_1")
        for t in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
            assert (smol("q4_k_m", f"blk.{i}.{t}.weight"), smol("q5_k_m", f"blk.{i}.{t}.weight"),
                    smol("q6_k", f"blk.{i}.{t}.weight")) == ("Q5_0", "Q5_1", "Q8_0")
    # a Qwen3-8B-like model: rows of 4096 and 12288, an output tensor of its own (the embedding keeps the mix's type)
    for mix, base in (("q4_k_m", "Q4_K"), ("q5_k_m", "Q5_K"), ("q6_k", "Q6_K")):
        assert tensor_type("output.weight", 4096, mix, 36) == "Q6_K"
        assert tensor_type("token_embd.weight", 4096, mix, 36) == base
        assert tensor_type("blk.4.attn_q.weight", 4096, mix, 36) == base
        assert tensor_type("blk.4.ffn_down.weight", 12288, mix, 36) == base  # 36 layers: 4 -> (4-4)%3 != 2
        assert tensor_type("blk.6.ffn_down.weight", 12288, mix, 36) == "Q6_K"
        assert tensor_type("blk.35.attn_v.weight", 4096, mix, 36) == "Q6_K"
        assert tensor_type("blk.1.attn_output.weight", 4096, mix, 36) == base
    # exactly 8 experts (Mixtral-like): attn_k / attn_v in Q8_0, q4_k_m's attn_output in Q5_K; rows of 40 -> F16
    assert tensor_type("blk.3.attn_k.weight", 4096, "q4_k_m", 32, n_expert=8) == "Q8_0"
    assert tensor_type("blk.3.attn_v.weight", 4096, "q6_k", 32, n_expert=8) == "Q8_0"
    assert tensor_type("blk.3.attn_output.weight", 4096, "q4_k_m", 32, n_expert=8) == "Q5_K"
    assert tensor_type("blk.3.attn_output.weight", 4096, "q4_k_m", 32, n_expert=128) == "Q4_K"
    assert tensor_type("blk.0.ffn_down_exps.weight", 768, "q4_k_m", 48, n_expert=128) == "Q6_K"
    assert tensor_type("blk.3.ffn_up.weight", 40, "q4_k_m", 32) == "F16"
    assert tensor_type("output.weight", 40, "q4_k_m", 32) == "F16"
