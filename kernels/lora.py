"""LoRA merge on the CPU, one block of output rows at a time: `out = round(I + scale * left @ right)`.

The block's float32 sum lives in a preallocated scratch buffer: Instruct's rows are widened into it and
one GEMM (`addmm_`, beta = 1) adds the scaled low-rank product, so each output element is rounded once,
from float32 to the output dtype. The factors are small (rank r << rows, cols) and are read whole.

Example:
    >>> import torch
    >>> from graftcore.kernels import CpuScratch
    >>> from graftcore.kernels.lora import lora_cpu
    >>> out = torch.empty(2, 3, dtype=torch.bfloat16)
    >>> lora_cpu(out, torch.zeros(2, 3), torch.ones(2, 1), torch.ones(1, 3), 0.5, CpuScratch(6))
    >>> out
    tensor([[0.5000, 0.5000, 0.5000],
            [0.5000, 0.5000, 0.5000]], dtype=torch.bfloat16)
"""

from __future__ import annotations

import torch

from .cpu import CpuScratch


def lora_cpu(out: torch.Tensor, instruct: torch.Tensor, left: torch.Tensor, right: torch.Tensor, scale: float, scratch: CpuScratch) -> None:
    """In place: `out = I + scale * left @ right` for a block; out and instruct hold rows x cols elements.

    Args:
        out, instruct: the block of the output and of Instruct (any float dtypes; flat or [rows, cols]).
        left: [rows, r] float32. right: [r, cols] float32.
        scale: alpha * lora_alpha / r (already multiplied: one float32 scalar in the GEMM).
        scratch: CpuScratch with at least rows * cols elements.
    """
    rows, cols = left.shape[0], right.shape[1]
    acc = scratch.delta[: rows * cols].view(rows, cols)
    acc.copy_(instruct.reshape(rows, cols))  # widening to float32 is exact
    acc.addmm_(left, right, alpha=scale)
    out.view(rows, cols).copy_(acc)  # the one rounding: float32 -> output dtype


def dora_cpu(
    out: torch.Tensor,
    instruct: torch.Tensor,
    base: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    scale: float,
    dora_scale: torch.Tensor,
    axis: str,
    alpha: float,
    scratch: CpuScratch,
) -> None:
    """In place: `out = I + alpha * (T - B)` with T = dora_scale * (B + scale * left @ right), PEFT's DoRA merge.

    `dora_scale` is magnitude / weight norm for this block: [rows] when axis == "rows", [cols] when "cols".
    """
    rows, cols = left.shape[0], right.shape[1]
    acc = scratch.delta[: rows * cols].view(rows, cols)
    b = base.reshape(rows, cols)
    acc.copy_(b)
    acc.addmm_(left, right, alpha=scale)  # the tuned weight before normalisation
    acc.mul_(dora_scale.view(-1, 1) if axis == "rows" else dora_scale.view(1, -1))
    acc.sub_(b)  # mixed dtypes promote to float32: widening is exact, no second buffer needed
    if alpha != 1.0:
        acc.mul_(alpha)
    acc.add_(instruct.reshape(rows, cols))
    out.view(rows, cols).copy_(acc)


def torch_lora(instruct: torch.Tensor, left: torch.Tensor, right: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """The formula written plainly (whole tensors, float32): the reference the blocked kernel is checked against."""
    return (instruct.float() + scale * (left.float() @ right.float())).to(dtype)
