"""The Triton kernel behind qtune.modeling.fast.dropout (imported only where it runs: it imports Triton)."""
import triton
import triton.language as tl


@triton.jit
def _quarter(x_ptr, out_ptr, offs, r, n, p, scale):
    inside = offs < n
    x = tl.load(x_ptr + offs, mask=inside, other=0.0)
    y = tl.where(r >= p, x.to(tl.float32) * scale, 0.0)
    tl.store(out_ptr + offs, y.to(x.dtype), mask=inside)


@triton.jit
def dropout_kernel(x_ptr, out_ptr, seed_ptr, salt, n, p, scale, BLOCK: tl.constexpr):
    """out = x · (r ≥ p) · scale over n elements, r uniform from Philox keyed by (seed + salt) and the element's group.
    One Philox call gives four numbers (tl.rand4x): each program draws BLOCK of them for 4·BLOCK elements in four
    contiguous quarters, so the generator, which bounds this kernel, runs a quarter as often as one draw per element."""
    pid = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK)
    seed = tl.load(seed_ptr) + salt
    r0, r1, r2, r3 = tl.rand4x(seed, (pid * BLOCK + lanes).to(tl.int32))
    base = pid * 4 * BLOCK + lanes
    _quarter(x_ptr, out_ptr, base, r0, n, p, scale)
    _quarter(x_ptr, out_ptr, base + BLOCK, r1, n, p, scale)
    _quarter(x_ptr, out_ptr, base + 2 * BLOCK, r2, n, p, scale)
    _quarter(x_ptr, out_ptr, base + 3 * BLOCK, r3, n, p, scale)
