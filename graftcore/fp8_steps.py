"""The steps of ops with FP8 tensors: each quantized input's rows decoded with their scales, the output's rows
encoded back into Instruct's FP8 format block row by block row, and the new scales and the measure of what the
encoding kept of the update gathered for the op.

The math is the CPU twin's (kernels/graft/fp8.py): decode, the float32 graft of kernels/graft/cpu.py (or the
LoRA block of kernels/graft/lora.py) into float32, encode. Every pass that reads FP8 (the merge, similarity,
verify --recompute) decodes through `decode`.

Example:
    >>> views, scales = decode(step, held)   # role -> float32 rows of a quantized input, or its stored dtype
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from graftcore.errors import CheckpointError
from graftcore.io.safetensors_file import Quantized, torch_dtype
from graftcore.kernels.fp8 import dequantize, quantize_into
from graftcore.plan import TensorOp
from graftcore.readers import Held
from graftcore.steps import Step


def decode(step: Step, held: list[Held], locate=None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(role -> the step's elements of that input, flat: float32 for a quantized one, decoded with its scales,
    else as stored; role -> the scale grid rows read for a quantized one). CheckpointError for a scale that is
    NaN, Inf, zero or negative (`locate(role, file)`: the path to name, default the shard's name)."""
    views: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    weights = {}
    for read, h in zip(step.reads, held):
        t = h.tensor(read.info)
        if not read.scale:
            views[read.role], weights[read.role] = t, read
            continue
        if not bool((t > 0).all()) or not bool(torch.isfinite(t).all()):  # NaN fails both
            where = locate(read.role, read.info.file) if locate else read.info.file
            raise CheckpointError(
                f"{where}: tensor {read.info.name!r} ({read.role}) holds a NaN, Inf, zero or negative scale; an FP8 "
                f"weight's scales are positive and finite"
            )
        w = weights[read.role]
        info: Quantized = w.info
        scales[read.role] = t
        views[read.role] = dequantize(views[read.role], t, w.first // info.cols, info.cols, info.block).view(-1)
    return views, scales


@dataclass
class Encoded:
    """An FP8 output tensor in progress: its new scale grid, filled block row by block row, and what the encoding
    kept of the update (squared norms, float64)."""

    op: TensorOp
    power_of_two: bool = False
    scale: torch.Tensor = field(init=False)
    rescaled: int = 0
    error_sq: float = 0.0
    update_sq: float = 0.0

    def __post_init__(self):
        self.scale = torch.empty(tuple(self.op.instruct.scale.shape) or (1,), dtype=torch.float32).view(-1)

    @property
    def blocks(self) -> int:
        return self.scale.numel()

    def encode(self, out: torch.Tensor, x: torch.Tensor, kept: torch.Tensor, row0: int, instruct: torch.Tensor):
        """Encode the float32 rows `x` (from row `row0`) into `out`, with Instruct's scales `kept` for them."""
        info: Quantized = self.op.instruct
        dtype = torch_dtype(info.scale.dtype)
        rows = x.numel() // info.cols
        enc = quantize_into(
            out, x.view(rows, info.cols), kept, row0, info.block, dtype, self.power_of_two, instruct.view(rows, -1)
        )
        first = row0 // info.block[0] * enc.scale.shape[1]
        self.scale[first : first + enc.scale.numel()] = enc.scale.view(-1)
        self.rescaled += enc.rescaled
        self.error_sq += enc.error_sq
        self.update_sq += enc.update_sq

    def write_scales(self, out: torch.Tensor, lo: int, hi: int) -> None:
        """Elements [lo, hi) of the new scale grid, in the scale's dtype, into `out`."""
        out.copy_(self.scale[lo:hi])

    def relative_error(self) -> float:
        """||deq(out) - deq(I) - update|| / ||update|| (0 for a tensor the update leaves unchanged)."""
        return (self.error_sq / self.update_sq) ** 0.5 if self.update_sq else 0.0
