"""The FP8 graft kernel: Instruct in block-scaled FP8, Base and one tuned input each FP8 with scales or
bf16/fp16/fp32; reads them, grafts in float32 and writes FP8 plus the block's new scale, in one launch whose
programs are the scale blocks (program (r, c): elements [r*BH, (r+1)*BH) x [c*BW, (c+1)*BW), edge blocks
masked). The same bits as the CPU twin (fp8.py decode / graft / quantize_into), by construction:

    decode     float32(q) * s: q's bits turned into a float32 with integer ops (exact), one float32 multiply
    graft      x = I + alpha * (T - B), the CPU twin's order (no FMA: compiled with enable_fp_fusion=False)
    scale      keep Instruct's s unless max|x| / s > 464 (div.rn; the max over finite x); else amax / 448
               (div.rn), rounded to the scale's dtype and stepped up until amax / s <= 448, as fp8.round_up_scale
    encode     x / s (div.rn), clamped to +-448 keeping NaN, to E4M3 by integer round-to-nearest-even (the
               subnormal range by adding and subtracting 2**23, exact in float32); NaN -> 0x7F

No float8 or bf16 cast of Triton's is used: the interpreter (3.9) emulates them with numpy and does not match
the GPU on every value; integer paths give the same bits in both. The kernel also returns, per block, the
squared norms of the encoding error and of the update (float64 sums of squares: the report's measure, not bits).

Example:
    >>> q, s = torch.empty_like(iq), torch.empty(grid, dtype=torch.float32)          # doctest: +SKIP
    >>> graft_fp8_triton(q, s, err, (iq, i_s), (bq, b_s), (t, None), block=(128, 128))  # doctest: +SKIP
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# input kinds: how a pointer's elements become float32
F32, F16, BF16_BITS, FP8 = 0, 1, 2, 3
# the output scale's dtype, for rounding a new scale
SCALE_F32, SCALE_F16, SCALE_BF16 = 0, 1, 2
E4M3_MAX = tl.constexpr(448.0)
KEEP_BOUND = tl.constexpr(464.0)
FLT_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _e4m3_to_f32(raw):
    """float32 of E4M3FN bits (uint8 loaded), exactly: normal (1 + m/8) * 2**(e-7), subnormal m * 2**-9."""
    b = raw.to(tl.int32) & 0xFF
    sign = (b >> 7) & 1
    e = (b >> 3) & 0xF
    m = b & 7
    normal = ((sign << 31) | ((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    sub = m.to(tl.float32) * 0.001953125
    sub = tl.where(sign == 1, -sub, sub)
    v = tl.where(e == 0, sub, normal)
    nan = tl.full(v.shape, 0x7FC00000, tl.int32).to(tl.float32, bitcast=True)
    return tl.where((e == 15) & (m == 7), nan, v)


@triton.jit
def _f32_to_e4m3(y):
    """E4M3FN bits (int32) of float32 `y` with |y| <= 448 or NaN: round-to-nearest-even; NaN -> 0x7F."""
    u = y.to(tl.int32, bitcast=True)
    sign = (u >> 31) & 1
    a = u & 0x7FFFFFFF
    absy = a.to(tl.float32, bitcast=True)
    normal = ((a + 0x7FFFF + ((a >> 20) & 1)) >> 20) - (120 << 3)  # 3 mantissa bits kept, exponent rebiased
    t = absy * 512.0  # subnormals are multiples of 2**-9
    sub = ((t + 8388608.0) - 8388608.0).to(tl.int32)  # round-to-nearest-even to an integer, exact below 2**22
    code = tl.where(absy < 0.015625, sub, normal) | (sign << 7)
    return tl.where(a > 0x7F800000, 0x7F, code)


@triton.jit
def _load(ptr, s_ptr, offs, mask, s_index, KIND: tl.constexpr):
    """One input's tile as float32: FP8 decoded with its block's scale (float32), or a float dtype widened."""
    if KIND == 3:
        return _e4m3_to_f32(tl.load(ptr + offs, mask=mask, other=0)) * tl.load(s_ptr + s_index)
    elif KIND == 2:
        bits = tl.load(ptr + offs, mask=mask, other=0).to(tl.uint16, bitcast=True)
        return (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _in_scale_dtype(s, SCALE_KIND: tl.constexpr):
    """`s` (float32, positive) rounded to the scale's dtype and widened back."""
    if SCALE_KIND == 2:
        u = s.to(tl.uint32, bitcast=True)
        return (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).to(tl.float32, bitcast=True)
    elif SCALE_KIND == 1:
        return s.to(tl.float16).to(tl.float32)
    else:
        return s


@triton.jit
def _next_up(s, SCALE_KIND: tl.constexpr):
    """The next value above positive `s` in the scale's dtype (widened)."""
    if SCALE_KIND == 2:
        return (s.to(tl.uint32, bitcast=True) + 0x10000).to(tl.float32, bitcast=True)
    elif SCALE_KIND == 1:
        h = s.to(tl.float16).to(tl.int16, bitcast=True) + 1
        return h.to(tl.float16, bitcast=True).to(tl.float32)
    else:
        return (s.to(tl.int32, bitcast=True) + 1).to(tl.float32, bitcast=True)


@triton.jit
def _new_scale(amax, SCALE_KIND: tl.constexpr, POWER_OF_TWO: tl.constexpr):
    """fp8.round_up_scale for one block: the smallest scale of the dtype with amax / s <= 448."""
    wanted = tl.math.div_rn(amax, E4M3_MAX)
    if POWER_OF_TWO:
        bits = wanted.to(tl.int32, bitcast=True)
        up = (((bits >> 23) & 0xFF) + 1) << 23
        return tl.where((bits & 0x7FFFFF) == 0, wanted, up.to(tl.float32, bitcast=True))
    s = _in_scale_dtype(wanted, SCALE_KIND)
    for _ in tl.static_range(3):
        low = (s < wanted) | (tl.math.div_rn(amax, s) > E4M3_MAX)
        s = tl.where(low, _next_up(s, SCALE_KIND), s)
    return s


@triton.jit
def fp8_graft_kernel(
    q_ptr,  # [rows * cols] uint8: the encoded output
    s_out_ptr,  # [grid] float32: each block's scale (a value of the scale's dtype)
    norms_ptr,  # [grid, 2] float64: per block, sum (deq(out) - x)^2 and sum (x - I)^2 (float32 differences)
    counts_ptr,  # [3] int64: NonFinite counts (deltas, overflow, instruct), added to
    i_ptr,  # Instruct: uint8 FP8
    i_s_ptr,  # its scales, float32 [grid]
    b_ptr,  # Base: of B_KIND; b_s_ptr its scales (FP8) or unused
    b_s_ptr,
    t_ptr,  # the tuned input: of T_KIND
    t_s_ptr,
    rows,
    cols,
    grid_cols,
    alpha,
    B_KIND: tl.constexpr,
    T_KIND: tl.constexpr,
    ALPHA_IS_ONE: tl.constexpr,
    SCALE_KIND: tl.constexpr,
    POWER_OF_TWO: tl.constexpr,
    BH: tl.constexpr,
    BW: tl.constexpr,
    TILE_H: tl.constexpr,  # BH and BW rounded up to powers of two
    TILE_W: tl.constexpr,
):
    r, c = tl.program_id(0), tl.program_id(1)
    rr = tl.arange(0, TILE_H)
    cc = tl.arange(0, TILE_W)
    row = r.to(tl.int64) * BH + rr
    col = c.to(tl.int64) * BW + cc
    mask = ((rr < BH) & (row < rows))[:, None] & ((cc < BW) & (col < cols))[None, :]
    offs = row[:, None] * cols + col[None, :]
    s_index = r.to(tl.int64) * grid_cols + c
    x_i = _load(i_ptr, i_s_ptr, offs, mask, s_index, 3)
    b = _load(b_ptr, b_s_ptr, offs, mask, s_index, B_KIND)
    d = _load(t_ptr, t_s_ptr, offs, mask, s_index, T_KIND) - b
    bad_d = (d != d) | (tl.abs(d) > FLT_MAX)
    if not ALPHA_IS_ONE:
        d = d * alpha
    x = x_i + d

    finite = mask & (x == x) & (tl.abs(x) <= FLT_MAX)  # NaN/Inf do not count toward the block's max
    flat = tl.reshape(tl.where(finite, tl.abs(x), 0.0), (TILE_H * TILE_W,))
    amax = tl.reduce(flat, 0, tl.standard._elementwise_max)
    kept = tl.load(i_s_ptr + s_index)
    rescale = tl.math.div_rn(amax, kept) > KEEP_BOUND
    s = kept
    if rescale:
        s = _new_scale(amax, SCALE_KIND, POWER_OF_TWO)
    y = tl.math.div_rn(x, s)
    y = tl.where(y > E4M3_MAX, E4M3_MAX, tl.where(y < -E4M3_MAX, -E4M3_MAX, y))  # NaN compares False: kept
    code = _f32_to_e4m3(y)
    tl.store(q_ptr + offs, code.to(tl.uint8), mask=mask)
    tl.store(s_out_ptr + s_index, s)

    back = _e4m3_to_f32(code) * s
    e = (back - x).to(tl.float64)  # squared in float64, as fp8.sq_norm64: a 2e19 element does not overflow
    err = tl.where(finite, e * e, 0.0)
    u = x - x_i
    u64 = u.to(tl.float64)
    upd = tl.where(mask & (u == u) & (tl.abs(u) <= FLT_MAX), u64 * u64, 0.0)
    tl.store(norms_ptr + 2 * s_index, tl.reduce(tl.reshape(err, (TILE_H * TILE_W,)), 0, tl.standard._sum_combine))
    tl.store(norms_ptr + 2 * s_index + 1, tl.reduce(tl.reshape(upd, (TILE_H * TILE_W,)), 0, tl.standard._sum_combine))

    bad_x = ((x != x) | (tl.abs(x) > FLT_MAX)) & mask
    bad_d = bad_d & mask
    bad_i = ((x_i != x_i) | (tl.abs(x_i) > FLT_MAX)) & mask
    n_bad = tl.reduce(tl.reshape((bad_x | bad_d).to(tl.int32), (TILE_H * TILE_W,)), 0, tl.standard._sum_combine)
    if n_bad != 0:
        over = bad_x & ~bad_d & ~bad_i
        carried = bad_x & ~bad_d & bad_i
        tl.atomic_add(
            counts_ptr,
            tl.reduce(tl.reshape(bad_d.to(tl.int64), (TILE_H * TILE_W,)), 0, tl.standard._sum_combine),
            sem="relaxed",
        )
        tl.atomic_add(
            counts_ptr + 1,
            tl.reduce(tl.reshape(over.to(tl.int64), (TILE_H * TILE_W,)), 0, tl.standard._sum_combine),
            sem="relaxed",
        )
        tl.atomic_add(
            counts_ptr + 2,
            tl.reduce(tl.reshape(carried.to(tl.int64), (TILE_H * TILE_W,)), 0, tl.standard._sum_combine),
            sem="relaxed",
        )


def kind_of(t: torch.Tensor, scale: torch.Tensor | None) -> int:
    if scale is not None:
        return FP8
    return {torch.float32: F32, torch.float16: F16, torch.bfloat16: BF16_BITS}[t.dtype]


def pointer(t: torch.Tensor) -> torch.Tensor:
    """What the kernel loads: FP8 and bf16 as their bits (uint8, int16), others as they are."""
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8)
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16)
    return t


def graft_fp8_triton(
    q_out: torch.Tensor,
    scale_out: torch.Tensor,
    norms: torch.Tensor,
    counts: torch.Tensor,
    instruct: tuple[torch.Tensor, torch.Tensor],
    base: tuple[torch.Tensor, torch.Tensor | None],
    tuned: tuple[torch.Tensor, torch.Tensor | None],
    cols: int,
    block: tuple[int, int],
    alpha: float = 1.0,
    scale_dtype: torch.dtype = torch.float32,
    power_of_two: bool = False,
) -> None:
    """Launch the kernel over whole block rows: `instruct` = (FP8 elements, float32 scale grid rows), `base` and
    `tuned` = (elements, float32 scale grid rows or None for a float tensor); writes the FP8 bytes into `q_out`,
    the block scales (float32 values of `scale_dtype`) into `scale_out`, per-block squared norms into `norms`
    ([grid, 2] float64) and adds the NonFinite counts to `counts` ([3] int64)."""
    i, i_s = instruct
    n = i.numel()
    rows = n // cols
    bh, bw = block
    grid = (triton.cdiv(rows, bh), triton.cdiv(cols, bw))
    b, b_s = base
    t, t_s = tuned
    scale_kind = {torch.float32: SCALE_F32, torch.float16: SCALE_F16, torch.bfloat16: SCALE_BF16}[scale_dtype]
    fp8_graft_kernel[grid](
        pointer(q_out),
        scale_out,
        norms,
        counts,
        pointer(i),
        i_s,
        pointer(b),
        b_s if b_s is not None else i_s,
        pointer(t),
        t_s if t_s is not None else i_s,
        rows,
        cols,
        grid[1],
        float(alpha),
        B_KIND=kind_of(b, b_s),
        T_KIND=kind_of(t, t_s),
        ALPHA_IS_ONE=alpha == 1.0,
        SCALE_KIND=scale_kind,
        POWER_OF_TWO=power_of_two,
        BH=bh,
        BW=bw,
        TILE_H=triton.next_power_of_2(bh),
        TILE_W=triton.next_power_of_2(bw),
        enable_fp_fusion=False,
    )
