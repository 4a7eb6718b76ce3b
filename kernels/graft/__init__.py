"""Graft kernels: `graft_` dispatches to the fused Triton kernel for CUDA tensors and to the CPU twin
otherwise. Both compute `out = round(I + a1 * (T1 - B) + a2 * (T2 - B) + ...)` in float32 with one rounding.

Example:
    >>> import torch
    >>> from graftcore.kernels import graft_
    >>> out = torch.empty(3, dtype=torch.bfloat16)
    >>> graft_(out, torch.zeros(3), torch.ones(3), torch.zeros(3), alpha=0.5)
    NonFinite(deltas=0, overflow=0, instruct=0)
    >>> out
    tensor([0.5000, 0.5000, 0.5000], dtype=torch.bfloat16)
"""

from __future__ import annotations

from .cpu import CHUNK, Alphas, CpuScratch, NonFinite, Tensors, graft_cpu, torch_graft


def graft_(out, instruct, tuned: Tensors, base, alpha: Alphas = 1.0, scratch: CpuScratch | None = None) -> NonFinite:
    """In place: `out = I + a1 * (T1 - B) + ...` (`tuned` one tensor or several, `alpha` one for all or one each);
    returns the NonFinite counts (NaN/Inf in a delta, produced from finite inputs, carried from Instruct).
    ValueError when `out` is not contiguous or not of Instruct's shape (it could not be written in place)."""
    if not out.is_contiguous():
        raise ValueError("graft_: out is not contiguous (graft into a contiguous tensor, then copy)")
    if out.shape != instruct.shape:
        raise ValueError(f"graft_: out has shape {list(out.shape)}, instruct {list(instruct.shape)}")
    if out.is_cuda:
        return graft_triton(out, instruct, tuned, base, alpha)
    return graft_cpu(out, instruct, tuned, base, alpha, scratch)


def graft_triton(out, instruct, tuned: Tensors, base, alpha: Alphas = 1.0) -> NonFinite:
    """The fused Triton kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""
    from .triton_graft import graft_triton as launch

    return launch(out, instruct, tuned, base, alpha)


__all__ = ["graft_", "graft_cpu", "graft_triton", "torch_graft", "CpuScratch", "NonFinite", "CHUNK"]
