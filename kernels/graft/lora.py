"""LoRA merge, one block of output rows at a time: `out = round(I + scale * left @ right)`, and blocks that sum
several terms (LoRA, DoRA, full deltas) for merges of several fine-tunes in one pass.

The block's float32 sum lives in a preallocated scratch buffer: Instruct's rows are widened into it and
one GEMM (`addmm_`, beta = 1) adds each scaled low-rank product, so each output element is rounded once,
from float32 to the output dtype. The factors are small (rank r << rows, cols) and are read whole. The same
code runs on GPU tensors (the GEMM's summation order is then the device's).

Example:
    >>> import torch
    >>> from graftcore.kernels import CpuScratch
    >>> from graftcore.kernels.lora import LowRankDelta, block_cpu
    >>> out = torch.empty(2, 3, dtype=torch.bfloat16)
    >>> block_cpu(out, torch.zeros(2, 3), None, [LowRankDelta(torch.ones(2, 1), torch.ones(1, 3), 0.5)], CpuScratch(6))
    NonFinite(deltas=0, overflow=0, instruct=0)
    >>> out
    tensor([[0.5000, 0.5000, 0.5000],
            [0.5000, 0.5000, 0.5000]], dtype=torch.bfloat16)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cpu import NonFinite, flag_nonfinite, round_into


@dataclass
class FullDelta:
    """A term `alpha * (T - B)` over the block (T: the block's elements of a full tuned checkpoint)."""

    tuned: torch.Tensor
    alpha: float = 1.0


@dataclass
class LowRankDelta:
    """A term `alpha * scale * left @ right` (LoRA), or with `dora_scale`, `alpha * (T - B)` where
    `T = dora_scale * (B + scale * left @ right)` (PEFT's DoRA merge; dora_scale is magnitude / weight norm,
    [rows] when axis == "rows", [cols] when "cols"). left: [rows, r] float32; right: [r, cols] float32."""

    left: torch.Tensor
    right: torch.Tensor
    scale: float
    alpha: float = 1.0
    dora_scale: torch.Tensor | None = None
    axis: str = "rows"


def block_cpu(out: torch.Tensor, instruct: torch.Tensor, base: torch.Tensor | None, terms: list, scratch) -> NonFinite:
    """In place, for one block of rows x cols elements: `out = round(I + term1 + term2 + ...)`, the sum in
    float32 and added left to right, one rounding, the NaN policy of kernels.cpu; returns the NonFinite counts
    (`deltas`: elements where a full delta T - B or a DoRA delta is NaN/Inf).

    Args:
        out, instruct, base: the block of the output, of Instruct and of Base (any float dtypes; flat or
            [rows, cols]); base only when a term needs it (a FullDelta or DoRA).
        terms: FullDelta / LowRankDelta, in the order of the tuned inputs.
        scratch: CpuScratch (or any object with float32 `acc` and `delta` of at least rows * cols elements,
            on the tensors' device).
    """
    rows = next((t.left.shape[0] for t in terms if isinstance(t, LowRankDelta)), None)
    cols = out.numel() // rows if rows else out.numel()
    rows = rows or 1
    acc = scratch.acc[: rows * cols].view(rows, cols)
    d = scratch.delta[: rows * cols].view(rows, cols)
    b = None if base is None else base.reshape(rows, cols)
    acc.copy_(instruct.reshape(rows, cols))  # widening to float32 is exact
    bad_delta = None
    for term in terms:
        if isinstance(term, FullDelta):
            d.copy_(term.tuned.reshape(rows, cols))
            d.sub_(b)  # mixed dtypes promote to float32: widening is exact, the bits are the flat kernel's
        elif term.dora_scale is None:
            acc.addmm_(term.left, term.right, alpha=term.alpha * term.scale)
            continue
        else:
            d.copy_(b)
            d.addmm_(term.left, term.right, alpha=term.scale)  # the tuned weight before normalisation
            d.mul_(term.dora_scale.view(-1, 1) if term.axis == "rows" else term.dora_scale.view(1, -1))
            d.sub_(b)
        bad_delta = flag_nonfinite(d, bad_delta)
        if term.alpha != 1.0:
            d.mul_(term.alpha)
        acc.add_(d)
    return round_into(out.reshape(-1), acc.reshape(-1), instruct, bad_delta)  # the one rounding
