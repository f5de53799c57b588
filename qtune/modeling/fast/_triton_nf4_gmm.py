"""The Triton kernel behind qtune.modeling.fast.nf4_gmm (imported only where it runs: it imports Triton).

Expert weights W (E, R, C) stay as bitsandbytes packs them (qtune.modeling.fast.experts.quantize_experts): the tensor
flattened row by row, two 4-bit codes a byte (the first in the high nibble), one absmax a block of 64 elements, itself
kept in 8 bits (double quantization: code2[absmax8] · nested[block // 256] + offset). C is a multiple of 64, so a block
never crosses a row.

One program computes a (BM rows of one expert) x (BN outputs) tile. Each k-step loads, through the tensor-memory
accelerator, a (BM, BK) tile of x and a (rows, CB/2) tile of packed bytes (CB the tile's width along C, a multiple of
64), looks both nibbles of each byte up among the 16 NF4 values held in registers (a gather within the warp), scales
by one absmax per row and 64 columns, and hands the 16-bit tile to tl.dot: no 16-bit copy of the experts is written,
and the weights cross memory in 4 bits. (Looking the values up in memory instead, a 16-entry or a 256-entry table of
byte pairs, made Triton's pipeliner copy each looked-up element asynchronously: 3-6x slower, with spills.)

  forward  (TRANS=False): out[m, r] = Σ_c x[m, c] · W[e, r, c]     x (M, C) -> (M, R)
  backward (TRANS=True):  out[m, c] = Σ_r x[m, r] · W[e, r, c]     dY (M, R) -> dX (M, C)

Rows of x are sorted by expert, `ends` (E,) the end of each expert's rows. A program finds its expert and first row
from `ends` itself (a cumulative sum of each expert's tile count over E ≤ EP lanes): no tile map, no extra launch and
no host sync, so a CUDA graph holds it. The grid has cdiv(M, BM) + E tiles along M (the most there can be); tiles past
the last expert's return at once.
"""
import triton
import triton.language as tl


@triton.jit
def _weights(q_desc, a8_ptr, code2_ptr, nested_ptr, offset, lut_ptr, row, col, n_rows, C, RB: tl.constexpr,
             CB: tl.constexpr):
    """The fp32 weight tile W.view(E·R, C)[row : row+RB, col : col+CB] (col a multiple of 64); rows past E·R read as
    zeros. The packed bytes come through the tensor-memory accelerator (no per-element addresses in registers)."""
    byte = q_desc.load([row, col // 2]).to(tl.int32)                       # (RB, CB/2)
    # the 16 values held in registers, looked up within the warp (no memory access in the loop)
    lut = tl.broadcast_to(tl.load(lut_ptr + tl.arange(0, 16))[None, :], (RB, 16))
    w = tl.interleave(tl.gather(lut, byte >> 4, 1), tl.gather(lut, byte & 15, 1))   # (RB, CB): codes in element order
    NB: tl.constexpr = CB // 64
    rows = row + tl.arange(0, RB)
    ok = rows < n_rows
    block = (rows.to(tl.int64) * C + col)[:, None] // 64 + tl.arange(0, NB)[None, :]   # (RB, NB)
    a8 = tl.load(a8_ptr + block, mask=ok[:, None], other=0).to(tl.int32)
    absmax = tl.load(code2_ptr + a8) * tl.load(nested_ptr + block // 256) + offset
    if NB == 1:
        return w * absmax
    return tl.reshape(tl.reshape(w, (RB, NB, 64)) * absmax[:, :, None], (RB, CB))


@triton.jit
def nf4_gmm_kernel(x_desc, out_ptr, q_desc, a8_ptr, code2_ptr, nested_ptr, offset, lut_ptr, ends_ptr,
                   E, R, C, red, width, stride_out,
                   TRANS: tl.constexpr, EP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(width, BN)
    t = pid // n_tiles
    pid_n = pid % n_tiles
    # this tile's expert: the first whose cumulative tile count passes t
    lanes = tl.arange(0, EP)
    in_e = lanes < E
    ends = tl.load(ends_ptr + lanes, mask=in_e, other=0)
    starts = tl.load(ends_ptr + lanes - 1, mask=in_e & (lanes > 0), other=0)
    per = tl.where(in_e, (ends - starts + BM - 1) // BM, 0)
    cum = tl.cumsum(per, 0)
    e = tl.sum((cum <= t).to(tl.int32), 0)
    if e >= E:
        return
    mine = lanes == e
    row0 = tl.sum(tl.where(mine, starts + (t - cum + per) * BM, 0), 0)
    row_end = tl.sum(tl.where(mine, ends, 0), 0)

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    # x's rows past this expert's (the next expert's, or zeros past M) only reach output rows that are not stored
    if TRANS:
        # W rows r = k-step (BK), columns c = this tile's outputs (BN); x's zero columns past R meet those of the next
        # expert's rows, which are finite
        for k0 in range(0, red, BK):
            x = x_desc.load([row0, k0])
            w = _weights(q_desc, a8_ptr, code2_ptr, nested_ptr, offset, lut_ptr, e * R + k0, pid_n * BN, E * R, C, BK,
                         BN)
            acc = tl.dot(x, w.to(x.dtype), acc)
    else:
        # W rows r = this tile's outputs (BN), columns c = k-step (BK)
        for k0 in range(0, red, BK):
            x = x_desc.load([row0, k0])
            w = _weights(q_desc, a8_ptr, code2_ptr, nested_ptr, offset, lut_ptr, e * R + pid_n * BN, k0, E * R, C, BN,
                         BK)
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
    rows = row0 + tl.arange(0, BM)
    outs = pid_n * BN + tl.arange(0, BN)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_out + outs[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rows < row_end)[:, None] & (outs < width)[None, :])
