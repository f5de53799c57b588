"""llama.cpp's k-quants Q4_K, Q5_K and Q6_K written in numpy, and the q4_k_m / q5_k_m / q6_k mixes that choose one
type per tensor (the gguf package reads these types but has no quantizer for them).

The rounding follows ggml's reference (non-imatrix) quantizers: rows cut into super-blocks of 256 values.
- Q4_K / Q5_K: 8 sub-blocks of 32, each fitted with a scale and a min (a weighted least-squares search over a few
  trial scales, weights |x| + rms of the sub-block); the 8 scales and 8 mins are then rounded to 6 bits against the
  super-block's fp16 `d` and `dmin`, packed into 12 bytes, and every value re-rounded to 4 (5) bits with them.
  Block: d, dmin (fp16), scales[12], [qh[32]: the 5th bits,] qs[128] (two 4-bit values a byte).
- Q6_K: 16 sub-blocks of 16, each fitted with a symmetric scale (a search over trial scales weighted by x^2), the
  16 scales rounded to int8 against the fp16 `d`; values in 6 bits. Block: ql[128], qh[64], scales[16], d (fp16).
The arithmetic is float32 as ggml's is, but sums run in numpy's order, so a byte can differ from llama-quantize's
where a rounding falls on a tie; the file reads the same with any GGUF reader. Speed: about 5 (Q4_K) to 7 (Q6_K)
million values a second on one CPU core (measured), so an 8B model takes some 25 minutes; llama-quantize is faster.

Mixes (llama.cpp's rule for dense and MoE models, no importance matrix): the output projection (the token embedding
when it is tied to it) is Q6_K; for q4_k_m and q5_k_m, attn_v and ffn_down in the first and last eighth of the
layers and every third layer between them are Q6_K too; the rest is Q4_K (q4_k_m), Q5_K (q5_k_m) or Q6_K. A model
with exactly 8 experts keeps attn_k and attn_v in Q8_0 (and q4_k_m's attn_output in Q5_K). A tensor whose rows are
not a multiple of 256 falls back as llama.cpp does: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0 (the output tensor
straight to Q8_0), and to F16 where rows are not a multiple of 32 either.
"""
from __future__ import annotations

import re

import numpy as np

QK_K = 256
MIXES = {"q4_k_m": "Q4_K", "q5_k_m": "Q5_K", "q6_k": "Q6_K"}
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
# values per chunk quantized at once: bounds the temporaries (a few dozen float32 copies of a chunk)
CHUNK = 1 << 20
_LAYER = re.compile(r"blk\.(\d+)\.")


def _more_bits(layer: int, n_layer: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers, and every third one between."""
    return layer < n_layer // 8 or layer >= 7 * n_layer // 8 or (layer - n_layer // 8) % 3 == 2


def tensor_type(name: str, cols: int, mix: str, n_layer: int, n_expert: int = 0, tied: bool = False) -> str:
    """The GGML type (a GGMLQuantizationType name) a mix gives to the 2-D/3-D weight `name` whose rows hold `cols`
    values; `tied`: the model has no output.weight (token_embd serves as the output projection)."""
    base = MIXES[mix]
    layer = int(m[1]) if (m := _LAYER.match(name)) else -1
    qtype = base
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        qtype = "Q8_0" if cols % QK_K else "Q6_K"
    elif name == "token_embd.weight":
        pass
    elif "attn_v.weight" in name:
        if mix in ("q4_k_m", "q5_k_m") and _more_bits(layer, n_layer):
            qtype = "Q6_K"
        if n_expert == 8:
            qtype = "Q8_0"
    elif "attn_k.weight" in name:
        if n_expert == 8:
            qtype = "Q8_0"
    elif "ffn_down" in name:
        if mix in ("q4_k_m", "q5_k_m") and _more_bits(layer, n_layer):
            qtype = "Q6_K"
    elif "attn_output.weight" in name:
        if n_expert == 8 and mix == "q4_k_m":
            qtype = "Q5_K"
    if qtype in FALLBACK and cols % QK_K:
        qtype = FALLBACK[qtype]
    if cols % 32:
        qtype = "F16"
    return qtype


def quantize(arr: np.ndarray, qtype: str) -> np.ndarray:
    """Rows of `arr` (last axis a multiple of 256) -> uint8 blocks of Q4_K, Q5_K or Q6_K, shape (..., bytes a row)."""
    x = np.ascontiguousarray(arr, dtype=np.float32)
    if x.shape[-1] % QK_K:
        raise ValueError(f"{qtype} rows must be a multiple of {QK_K} values, not {x.shape[-1]}")
    fn = {"Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}[qtype]
    blocks = x.reshape(-1, QK_K)
    step = max(1, CHUNK // QK_K)
    out = np.concatenate([fn(blocks[i:i + step]) for i in range(0, len(blocks), step)]) if len(blocks) else \
        np.zeros((0, {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}[qtype]), np.uint8)
    return out.reshape(*x.shape[:-1], x.shape[-1] // QK_K * out.shape[-1])


def _round(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: to the nearest integer, halves to even."""
    return np.rint(v)


def _fit_scale_min(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """ggml's make_qkx2_quants over the last axis: x ~ scale * L - min with L in [0, nmax], min >= 0, fitted by
    weighted least squares over nstep+1 trial scales; returns (scale, min) per group."""
    f32 = np.float32
    lo = np.minimum(x.min(-1), 0).astype(f32)
    hi = x.max(-1)
    span = hi - lo
    flat = span == 0
    span = np.where(flat, 1, span).astype(f32)
    sum_w = w.sum(-1)
    sum_x = (w * x).sum(-1)
    xm = x - lo[..., None]
    iscale = f32(nmax) / span
    scale = (1 / iscale).astype(f32)
    L = np.clip(_round(iscale[..., None] * xm), 0, nmax)
    best = (w * (scale[..., None] * L + lo[..., None] - x) ** 2).sum(-1)
    mn = lo.copy()
    for step in range(nstep + 1):
        isc = (f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)) / span
        La = np.clip(_round(isc[..., None] * xm), 0, nmax)
        wl = w * La
        sum_l, sum_l2, sum_xl = wl.sum(-1), (wl * La).sum(-1), (wl * x).sum(-1)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Ds = np.where(ok, D, 1)
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / Ds
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
        pos = this_min > 0
        this_scale = np.where(pos, sum_xl / np.where(sum_l2 > 0, sum_l2, 1), this_scale)
        this_min = np.where(pos, 0, this_min).astype(f32)
        err = (w * (this_scale[..., None] * La + this_min[..., None] - x) ** 2).sum(-1)
        take = ok & (err < best)
        best = np.where(take, err, best)
        scale = np.where(take, this_scale, scale).astype(f32)
        mn = np.where(take, this_min, mn).astype(f32)
    scale = np.where(flat, 0, scale).astype(f32)
    mn = np.where(flat, lo, mn).astype(f32)
    return scale, -mn


def _pack_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """8 six-bit scales and 8 six-bit mins -> the 12 bytes of Q4_K/Q5_K (low 6 bits of the first four of each in
    bytes 0-7, the last four's low nibbles in bytes 8-11, their top two bits in bytes 0-7's top bits)."""
    ls, lm = ls.astype(np.uint8), lm.astype(np.uint8)
    first = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    second = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    third = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return np.concatenate([first, second, third], axis=1)


def _k_with_min(blocks: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """The shared part of Q4_K and Q5_K: (d, dmin as fp16 bytes, the 12 scale bytes, L per value in [0, nmax])."""
    f32 = np.float32
    nb = len(blocks)
    x = blocks.reshape(nb, 8, 32)
    av = np.sqrt((x * x).sum(-1) / f32(32)).astype(f32)
    w = av[..., None] + np.abs(x)
    scales, mins = _fit_scale_min(x, w, nmax, rmin, rdelta, nstep)
    max_scale, max_min = scales.max(-1), mins.max(-1)
    inv_scale = np.where(max_scale > 0, f32(63) / np.where(max_scale > 0, max_scale, 1), 0).astype(f32)
    inv_min = np.where(max_min > 0, f32(63) / np.where(max_min > 0, max_min, 1), 0).astype(f32)
    ls = np.minimum(63, _round(inv_scale[:, None] * scales))
    lm = np.minimum(63, _round(inv_min[:, None] * mins))
    d = (max_scale / f32(63)).astype(np.float16)
    dmin = (max_min / f32(63)).astype(np.float16)
    sub_d = d.astype(f32)[:, None] * ls.astype(f32)
    sub_m = dmin.astype(f32)[:, None] * lm.astype(f32)
    # values re-rounded against the stored scales (where a sub-block's scale is 0 its levels do not matter: it reads
    # back as -min throughout)
    safe = np.where(sub_d != 0, sub_d, 1)
    L = np.clip(_round((x + sub_m[..., None]) / safe[..., None]), 0, nmax)
    L = np.where((sub_d != 0)[..., None], L, 0).astype(np.uint8)
    return d, dmin, _pack_scales(ls, lm), L


def _q4_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, scales, L = _k_with_min(blocks, 15, -1.0, 0.1, 20)
    nb = len(blocks)
    L = L.reshape(nb, 4, 2, 32)  # 64 values: the first 32 in low nibbles, the next 32 in high ones
    qs = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(nb, 128)
    return np.concatenate([d.view(np.uint8).reshape(nb, 2), dmin.view(np.uint8).reshape(nb, 2), scales, qs], axis=1)


def _q5_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, scales, L = _k_with_min(blocks, 31, -0.5, 0.1, 15)
    nb = len(blocks)
    high = (L >> 4).reshape(nb, 8, 32)  # sub-block k's 5th bits go to bit k of qh[0..31]
    qh = np.zeros((nb, 32), np.uint8)
    for k in range(8):
        qh |= high[:, k] << k
    low = (L & 0xF).reshape(nb, 4, 2, 32)
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(nb, 128)
    return np.concatenate([d.view(np.uint8).reshape(nb, 2), dmin.view(np.uint8).reshape(nb, 2), scales, qh, qs],
                          axis=1)


GROUP_MAX_EPS = 1e-15


def _fit_symmetric(x: np.ndarray, nmax: int):
    """ggml's make_qx_quants with x^2 weights (rmse_type 1) over the last axis: x ~ scale * l, l in [-nmax, nmax-1],
    the scale searched around -nmax / (the value of largest magnitude); returns the scale per group."""
    f32 = np.float32
    idx = np.abs(x).argmax(-1)
    mx = np.take_along_axis(x, idx[..., None], -1)[..., 0]
    zero = np.abs(mx) < GROUP_MAX_EPS
    mx = np.where(zero, 1, mx).astype(f32)
    w = x * x

    def levels(isc):
        return np.clip(_round(isc[..., None] * x), -nmax, nmax - 1)

    iscale = (f32(-nmax) / mx).astype(f32)
    l = levels(iscale)
    wl = w * l
    sumlx, suml2 = (wl * x).sum(-1), (wl * l).sum(-1)
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, 1), 0).astype(f32)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        isc = (-(f32(nmax) + f32(0.1) * f32(step)) / mx).astype(f32)
        l = levels(isc)
        wl = w * l
        sumlx, suml2 = (wl * x).sum(-1), (wl * l).sum(-1)
        take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        s = sumlx / np.where(suml2 > 0, suml2, 1)
        scale = np.where(take, s, scale).astype(f32)
        best = np.where(take, s * sumlx, best)
    return np.where(zero, 0, scale).astype(f32)


def _q6_k(blocks: np.ndarray) -> np.ndarray:
    f32 = np.float32
    nb = len(blocks)
    x = blocks.reshape(nb, 16, 16)
    scales = _fit_symmetric(x, 32)
    pick = np.abs(scales).argmax(-1)
    max_scale = np.take_along_axis(scales, pick[:, None], -1)[:, 0]
    empty = np.abs(max_scale) < GROUP_MAX_EPS
    iscale = np.where(empty, 0, f32(-128) / np.where(empty, 1, max_scale)).astype(f32)
    d = np.where(empty, 0, 1 / np.where(empty, 1, iscale)).astype(np.float16)
    sc = np.minimum(127, _round(iscale[:, None] * scales)).astype(np.int8)
    sub_d = d.astype(f32)[:, None] * sc.astype(f32)
    safe = np.where(sub_d != 0, sub_d, 1)
    L = np.clip(_round(x / safe[..., None]), -32, 31) + 32
    L = np.where((sub_d != 0)[..., None] & ~empty[:, None, None], L, 0).astype(np.uint8)  # (levels under a 0 scale
    # read back as 0 whatever they are; an all-zero block is all zero bytes)
    sc = np.where(empty[:, None], 0, sc).astype(np.int8)
    q = L.reshape(nb, 2, 4, 32)  # 128-value halves, each in four runs of 32
    ql = np.concatenate([(q[:, :, 0] & 0xF) | ((q[:, :, 2] & 0xF) << 4),
                         (q[:, :, 1] & 0xF) | ((q[:, :, 3] & 0xF) << 4)], axis=2).reshape(nb, 128)
    qh = ((q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6))
    return np.concatenate([ql, qh.reshape(nb, 64), sc.view(np.uint8), d.view(np.uint8).reshape(nb, 2)], axis=1)
