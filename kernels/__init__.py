"""Graft kernels: `graft_` dispatches to the fused Triton kernel for CUDA tensors and to the CPU twin
otherwise. Both compute `out = round(I + alpha * (T - B))` in float32 with one rounding.

Example:
    >>> import torch
    >>> from graftcore.kernels import graft_
    >>> out = torch.empty(3, dtype=torch.bfloat16)
    >>> graft_(out, torch.zeros(3), torch.ones(3), torch.zeros(3), alpha=0.5)
    0
    >>> out
    tensor([0.5000, 0.5000, 0.5000], dtype=torch.bfloat16)
"""

from __future__ import annotations

import torch

from .cpu import CHUNK, CpuScratch, graft_cpu, torch_graft


def graft_(
    out: torch.Tensor,
    instruct: torch.Tensor,
    tuned: torch.Tensor,
    base: torch.Tensor,
    alpha: float = 1.0,
    scratch: CpuScratch | None = None,
) -> int:
    """In place: `out = I + alpha * (T - B)`; returns the number of elements where T - B is NaN/Inf."""
    if out.is_cuda:
        return graft_triton(out, instruct, tuned, base, alpha)
    return graft_cpu(out, instruct, tuned, base, alpha, scratch)


def graft_triton(out, instruct, tuned, base, alpha: float = 1.0) -> int:
    """The fused Triton kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""
    from .triton_graft import graft_triton as launch

    return launch(out, instruct, tuned, base, alpha)


__all__ = ["graft_", "graft_cpu", "graft_triton", "torch_graft", "CpuScratch", "CHUNK"]
