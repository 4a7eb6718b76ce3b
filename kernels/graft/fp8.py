"""FP8 E4M3 with block scales, the CPU twin: decode to float32, and encode a grafted float32 block back.

Layout (DeepSeek-V3 inference/kernel.py, weight_dequant): a weight [rows, cols] of float8_e4m3fn and a scale grid
[ceil(rows / bh), ceil(cols / bw)]; element (r, c) is float32(q) * scale[r // bh, c // bw]. A per-channel scale is
the grid of (bh, bw) = (1, cols), a per-tensor one of (rows, cols). The functions here take whole rows
[row0, row0 + n) and the scale rows that cover them.

Encoding, per block, the same on every path (the rule of the project's FP8 contract):
  x = the grafted float32 values, s = Instruct's scale;
  keep s if every |x| / s <= 464 (the midpoint above E4M3's largest value 448: such an x rounds, saturating, to
  within +-448; dequantizing and dividing again can give 448.00003 for an element stored as 448, and a bound of
  448 would rescale blocks that did not change); else s = amax / 448 rounded up in the scale's dtype (to a power
  of two for `ue8m0` scales) so that no |x| / s exceeds 448;
  q = x / s, round-to-nearest-even to E4M3, saturating at +-448; NaN as the canonical 0x7F.
Then a zero update gives back Instruct's bytes (a -0 may come back as +0, as IEEE addition gives).

Example:
    >>> import torch
    >>> q = torch.tensor([[1.0, -2.0]]).to(torch.float8_e4m3fn)
    >>> dequantize(q.view(-1), torch.tensor([0.5]), 0, 2, (1, 2))
    tensor([[ 0.5000, -1.0000]])
"""

from __future__ import annotations

from typing import NamedTuple

import torch

E4M3_MAX = 448.0
KEEP_BOUND = 464.0
CANONICAL_NAN = 0x7F  # positive, every exponent and mantissa bit set: E4M3FN's only NaN encoding, sign cleared


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def scale_per_element(scale: torch.Tensor, row0: int, rows: int, cols: int, block: tuple[int, int]) -> torch.Tensor:
    """[rows, cols] float32: each element's scale, from `scale`, the float32 grid rows covering rows
    [row0, row0 + rows) (its first row is the block row holding row0)."""
    bh, bw = block
    grid = scale.reshape(-1, cdiv(cols, bw)).to(torch.float32)
    index = torch.arange(row0, row0 + rows) // bh - row0 // bh
    return grid[index].repeat_interleave(bw, dim=1)[:, :cols]


def dequantize(q: torch.Tensor, scale: torch.Tensor, row0: int, cols: int, block: tuple[int, int]) -> torch.Tensor:
    """float32 [rows, cols]: the whole rows [row0, row0 + rows) of a quantized weight, `q` their elements (flat, a
    float8_e4m3fn or uint8 view), `scale` the scale grid rows covering them (any float dtype)."""
    q = q.view(torch.float8_e4m3fn) if q.dtype == torch.uint8 else q
    rows = q.numel() // cols
    x = q.reshape(rows, cols).to(torch.float32)
    return x.mul_(scale_per_element(scale, row0, rows, cols, block))


class Encoded(NamedTuple):
    """What `quantize_into` did: the block scales it wrote (float32 values of the scale dtype), how many blocks
    took a new scale, and the squared norms (float64) of the encoding error deq(out) - x and of the update
    x - Instruct, over the rows given."""

    scale: torch.Tensor
    rescaled: int
    error_sq: float
    update_sq: float


def round_up_scale(amax: torch.Tensor, dtype: torch.dtype, power_of_two: bool) -> torch.Tensor:
    """float32 tensor of scales representable in `dtype`: the smallest with amax / s <= 448 in float32 (a power of
    two with `power_of_two`), for blocks of positive finite `amax`."""
    wanted = amax / E4M3_MAX
    if power_of_two:  # 2 ** ceil(log2(wanted)), exactly: frexp gives wanted = m * 2**e with m in [0.5, 1)
        m, e = torch.frexp(wanted)
        s = torch.where(m == 0.5, wanted, torch.ldexp(torch.ones_like(wanted), e))
        return s.to(dtype).to(torch.float32)
    s = wanted.to(dtype)
    for _ in range(3):  # rounding to the dtype may have gone down, then amax / s may round above 448: step up
        s32 = s.to(torch.float32)
        low = (s32 < wanted) | (amax / s32 > E4M3_MAX)
        if not bool(low.any()):
            break
        s = torch.where(low, next_up(s), s)
    return s.to(torch.float32)


def next_up(s: torch.Tensor) -> torch.Tensor:
    """The next representable value above each positive finite `s`, in its own dtype."""
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[s.dtype]
    return (s.view(bits) + 1).view(s.dtype)


def block_amax(x: torch.Tensor, block: tuple[int, int], row0: int) -> torch.Tensor:
    """float32 [grid rows, grid cols]: max |x| of each block of the rows x [rows, cols] (whole blocks of rows
    from row0, which starts a block row; NaN where a block holds NaN)."""
    rows, cols = x.shape
    bh, bw = block
    assert row0 % bh == 0, "a step starts a block row"
    grid_rows, grid_cols = cdiv(rows, bh), cdiv(cols, bw)
    a = x.abs()
    if rows % bh or cols % bw:  # edge blocks are partial: pad with zeros, which never raise a max
        a = torch.nn.functional.pad(a, (0, grid_cols * bw - cols, 0, grid_rows * bh - rows))
    return a.view(grid_rows, bh, grid_cols, bw).amax(dim=(1, 3))


def quantize_into(
    out: torch.Tensor,
    x: torch.Tensor,
    kept: torch.Tensor,
    row0: int,
    block: tuple[int, int],
    scale_dtype: torch.dtype,
    power_of_two: bool = False,
    instruct: torch.Tensor | None = None,
) -> Encoded:
    """Encode float32 rows `x` [rows, cols] (whole block rows from `row0`) into `out` (float8_e4m3fn or uint8,
    rows * cols elements) by the module's rule; `kept`: Instruct's scales for these block rows (any float
    dtype); `instruct`: Instruct's decoded rows, for the update's norm (None: not measured)."""
    rows, cols = x.shape
    kept32 = kept.reshape(-1, cdiv(cols, block[1])).to(torch.float32)
    amax = block_amax(x, block, row0)
    ratio = amax / kept32
    rescale = (ratio > KEEP_BOUND) & torch.isfinite(amax)
    scale = kept32
    if bool(rescale.any()):
        scale = torch.where(
            rescale, round_up_scale(torch.where(rescale, amax, kept32), scale_dtype, power_of_two), kept32
        )
    per_element = scale_per_element(scale, row0, rows, cols, block)
    y = torch.div(x, per_element).clamp_(-E4M3_MAX, E4M3_MAX)
    q = out.view(torch.float8_e4m3fn) if out.dtype == torch.uint8 else out
    q.view(rows, cols).copy_(y)
    nan = torch.isnan(y).view(-1)
    if bool(nan.any()):
        q.view(torch.uint8)[nan] = CANONICAL_NAN
    back = q.view(rows, cols).to(torch.float32).mul_(per_element)
    error = float(torch.linalg.vector_norm(back.sub_(x), dtype=torch.float64) ** 2)
    update = 0.0 if instruct is None else float(torch.linalg.vector_norm(x - instruct, dtype=torch.float64) ** 2)
    return Encoded(scale, int(rescale.sum()), error, update)
