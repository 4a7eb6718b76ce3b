"""4-bit weights packed two a byte, with one scale per group of a row's elements: the CPU twin of their decode and of
the encode of grafted float32 rows back into them.

Layout (compressed-tensors' pack_to_int32 / nvfp4 pack_fp4_to_uint8, DeepSeek-V4's FP4 experts, transformers'
Fp8Dequantize._unpack_fp4): a weight [rows, cols] stored row by row in `row_bytes` bytes each (a row may be padded to
a whole word); element (r, c) is the low nibble of byte c // 2 for even c, the high nibble for odd c. A code means:
- "e2m1" (FP4): sign bit 3, magnitude [0, 0.5, 1, 1.5, 2, 3, 4, 6][code & 7] (no NaN, no Inf);
- "int4": code - 8 (offset binary: -8 .. 7; compressed-tensors' symmetric INT4).
Value = code's value * scale[r, c // group] (NVFP4: * (scale / global scale), the division in float32).

Encoding, per group, the FP8 rule on this grid: x = the grafted float32 values, s = Instruct's effective scale;
keep s while every x / s lies within the midpoints beyond the grid's ends (E2M1: +-7 around +-6; INT4: -8.5 and 7.5
around -8 and 7), else the smallest scale the scale's dtype holds with every x / s inside the grid (a power of two
for E8M0);
codes = x / s rounded to the nearest grid value, ties to the even code, saturating; NaN as code 0 (counted by the
merge as non-finite), Inf saturates. A value that rounds to zero keeps its sign (E2M1's -0 is code 8).

Example:
    >>> import torch
    >>> packed = torch.tensor([[0x21]], dtype=torch.uint8)     # codes 1 (0.5) then 2 (1.0)
    >>> decode_rows(packed, torch.tensor([[2.0]]), 2, 32, "e2m1")
    tensor([[1., 2.]])
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from graftcore.shapes import cdiv

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
INT4 = torch.arange(16, dtype=torch.float32) - 8
TABLES = {"e2m1": E2M1, "int4": INT4}
MAX = {"e2m1": 6.0, "int4": 7.0}  # the largest magnitude of the grid (INT4 also holds -8)
KEEP = {"e2m1": 7.0, "int4": 7.5}
NEGATIVE = {"e2m1": (6.0, 7.0), "int4": (8.0, 8.5)}  # below zero: the largest magnitude, and its keep bound


def codes_of(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """int64 codes [rows, cols] of packed rows (uint8 [rows, row_bytes]): low nibble first."""
    u8 = packed.view(torch.uint8)
    both = torch.stack((u8 & 0xF, u8 >> 4), dim=-1).reshape(u8.shape[0], -1)
    return both[:, :cols].long()


def effective_scale(scale: torch.Tensor, global_scale: torch.Tensor | None) -> torch.Tensor:
    """float32 scales per group: the stored ones (any dtype), divided by the global scale where there is one."""
    s = scale.to(torch.float32)
    return s if global_scale is None else s / global_scale.to(torch.float32).reshape(())


def byte_table(grid: str) -> torch.Tensor:
    """float32 [256, 2]: the two values of every byte (low nibble first), so a row decodes by one lookup."""
    codes = torch.arange(256)
    return torch.stack((TABLES[grid][codes & 0xF], TABLES[grid][codes >> 4]), dim=1)


PAIRS = {grid: byte_table(grid) for grid in TABLES}


def decode_rows(packed, scale, cols: int, group: int, grid: str, global_scale=None) -> torch.Tensor:
    """float32 [rows, cols] of packed rows (uint8 [rows, row_bytes]) with their scale rows [rows, groups]."""
    u8 = packed.view(torch.uint8)
    rows, row_bytes = u8.shape
    values = torch.index_select(PAIRS[grid], 0, u8.reshape(-1).to(torch.int32)).view(rows, 2 * row_bytes)
    s = effective_scale(scale, global_scale).reshape(rows, -1)
    groups = s.shape[1]
    if 2 * row_bytes == cols == groups * group:  # whole groups: scale by broadcasting, no per-element copy
        return values.view(rows, groups, group).mul_(s.unsqueeze(2)).view(rows, cols)
    return values[:, :cols] * s.repeat_interleave(group, dim=1)[:, :cols]


class Encoded4(NamedTuple):
    """What `encode_rows` did: the codes packed (uint8 [rows, row_bytes]), the stored scales it chose (float32
    values of the scale dtype), how many groups took a new scale, and sq_norm64 of the encoding error and of the
    update over the rows."""

    packed: torch.Tensor
    scale: torch.Tensor
    rescaled: int
    error_sq: float
    update_sq: float


def grid_codes(y: torch.Tensor, grid: str) -> torch.Tensor:
    """int64 codes of `y` (already divided by its scale): the nearest grid value, ties to the even code,
    saturating; NaN as 0."""
    if grid == "int4":
        return (torch.round(torch.nan_to_num(y, nan=0.0)).clamp(-8, 7) + 8).long()
    # E2M1's magnitudes are steps of 0.5 below 2, of 1 up to 4, then 4 and 6: round half to even within each
    # stretch gives the nearest value with ties to the even code (0.75 -> 1.0, code 2; 2.5 -> 2.0, code 4)
    mag = torch.nan_to_num(y.abs(), nan=0.0, posinf=6.0).clamp_(max=6.0)
    code = torch.where(
        mag < 2.0, torch.round(mag * 2.0), torch.where(mag < 4.0, torch.round(mag) + 2.0, torch.round(mag / 2.0) + 4.0)
    ).long()
    negative = torch.signbit(y) & ~torch.isnan(y)
    return code | (negative.long() << 3)


def pack_codes(codes: torch.Tensor, row_bytes: int) -> torch.Tensor:
    """uint8 [rows, row_bytes] of int64 codes [rows, cols] (low nibble first, zero padding)."""
    rows, cols = codes.shape
    padded = torch.zeros(rows, 2 * row_bytes, dtype=torch.uint8)
    padded[:, :cols] = codes.to(torch.uint8)
    return padded[:, 0::2] | (padded[:, 1::2] << 4)


def new_scales(needed: torch.Tensor, scale_dtype: torch.dtype, power_of_two: bool, global_scale=None) -> torch.Tensor:
    """float32 stored scales: the smallest the dtype holds whose effective scale (divided by the global scale where
    there is one) is at least `needed` (positive finite)."""
    g = None if global_scale is None else global_scale.to(torch.float32).reshape(())
    wanted = needed if g is None else needed * g
    if power_of_two:
        m, e = torch.frexp(wanted)
        s = torch.where(m == 0.5, wanted, torch.ldexp(torch.ones_like(wanted), e))
        return s.to(scale_dtype).to(torch.float32)
    s = wanted.to(scale_dtype)
    bits = {1: torch.int8, 2: torch.int16, 4: torch.int32}[s.element_size()]
    for _ in range(4):  # rounding to the dtype may have gone down: step up to the next representable value
        eff = s.to(torch.float32) if g is None else s.to(torch.float32) / g
        low = eff < needed
        if not bool(low.any()):
            break
        s = torch.where(low, (s.view(bits) + 1).view(scale_dtype), s)
    return s.to(torch.float32)


def encode_rows(
    x: torch.Tensor,
    kept: torch.Tensor,
    cols: int,
    group: int,
    grid: str,
    row_bytes: int,
    scale_dtype: torch.dtype,
    power_of_two: bool = False,
    global_scale: torch.Tensor | None = None,
    instruct: torch.Tensor | None = None,
) -> Encoded4:
    """Encode float32 rows `x` [rows, cols] by the module's rule; `kept`: Instruct's stored scales for these rows
    [rows, groups] (any dtype); `instruct`: Instruct's decoded rows, for the update's norm (None: not measured)."""
    from .fp8 import sq_norm64

    rows = x.shape[0]
    groups = cdiv(cols, group)
    pad = groups * group - cols
    xg = (torch.nn.functional.pad(x, (0, pad)) if pad else x).view(rows, groups, group)
    high, low = xg.amax(dim=2).clamp_(min=0), xg.amin(dim=2).neg_().clamp_(min=0)  # the largest above, below 0
    all_finite = bool(torch.isfinite(high).all() and torch.isfinite(low).all())
    if not all_finite:  # NaN and Inf do not count toward a group's scale
        finite = torch.where(torch.isfinite(xg), xg, 0.0)
        high, low = finite.clamp(min=0).amax(dim=2), (-finite).clamp(min=0).amax(dim=2)
    kept32 = kept.reshape(rows, groups).to(torch.float32)
    eff = effective_scale(kept32, global_scale)
    neg_max, neg_keep = NEGATIVE[grid]
    rescale = (high / eff > KEEP[grid]) | (low / eff > neg_keep)
    stored = kept32
    if bool(rescale.any()):
        needed = torch.maximum(high / MAX[grid], low / neg_max)
        fresh = new_scales(torch.where(rescale, needed, eff), scale_dtype, power_of_two, global_scale)
        stored = torch.where(rescale, fresh, kept32)
        eff = effective_scale(stored, global_scale)
    e = eff.repeat_interleave(group, dim=1)[:, :cols]
    codes = grid_codes(x / e, grid)
    back = TABLES[grid][codes].mul_(e).sub_(x)
    if not all_finite:
        back = torch.where(torch.isfinite(x), back, 0.0)
    update = 0.0
    if instruct is not None:
        d = x - instruct
        update = sq_norm64(
            d if all_finite and bool(torch.isfinite(d).all()) else torch.where(torch.isfinite(d), d, 0.0)
        )
    return Encoded4(pack_codes(codes, row_bytes), stored, int(rescale.sum()), sq_norm64(back), update)
