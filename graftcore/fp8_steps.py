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

import math
from dataclasses import dataclass, field

import torch

from graftcore.errors import CheckpointError, NonFiniteError
from graftcore.io.safetensors_file import Quantized, torch_dtype
from graftcore.kernels.fp8 import Scratch, Workers, decode_into, dequantize, graft_encode, quantize_into
from graftcore.plan import TensorOp
from graftcore.readers import Held
from graftcore.steps import Step


def decode(
    step: Step, held: list[Held], locate=None, scratch: Scratch | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(role -> the step's elements of that input, flat: float32 for a quantized one, decoded with its scales,
    else as stored; role -> the scale grid rows read for a quantized one). CheckpointError for a scale that is
    NaN, Inf, zero or negative (`locate(role, file)`: the path to name, default the shard's name). With
    `scratch`, the decoded rows live in its buffers (valid until the next step decoded with it)."""
    views: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    weights = {}
    for read, h in zip(step.reads, held):
        t = h.tensor(read.info)
        if not read.scale:
            views[read.role], weights[read.role] = t, read
            continue
        check_scales(t, read, locate)
        w = weights[read.role]
        info: Quantized = w.info
        scales[read.role] = t
        q = views[read.role]
        row0, rows = w.first // info.cols, q.numel() // info.cols
        if scratch is None:
            views[read.role] = dequantize(q, t, row0, info.cols, info.block).view(-1)
        else:
            out = scratch.get(f"decoded-{read.role}", q.numel()).view(rows, info.cols)
            index = scratch.get("index", q.numel(), torch.int32)
            views[read.role] = decode_into(out, q, t, row0, info.block, index).view(-1)
    return views, scales


def stored_inputs(step: Step, held: list[Held], locate) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """role -> (the step's elements as stored, the scale grid rows read for them or None), scales checked: what
    the encoders that decode for themselves (the kernel, graft_encode) take."""
    raw: dict[str, tuple] = {}
    for read, h in zip(step.reads, held):
        t = h.tensor(read.info)
        if read.scale:
            check_scales(t, read, locate)
            raw[read.role] = (raw[read.role][0], t)
        else:
            raw[read.role] = (t, None)
    return raw


def check_scales(t: torch.Tensor, read, locate) -> None:
    """CheckpointError when a scale read is NaN, Inf, zero or negative (`locate(role, file)`: the path to name)."""
    low, high = torch.aminmax(t.to(torch.float32))
    if not (low.item() > 0 and high.item() < math.inf):  # NaN fails both
        where = locate(read.role, read.info.file) if locate else read.info.file
        raise CheckpointError(
            f"{where}: tensor {read.info.name!r} ({read.role}) holds a NaN, Inf, zero or negative scale; an FP8 "
            f"weight's scales are positive and finite"
        )


@dataclass
class Encoded:
    """An FP8 output tensor in progress: its new scale grid, filled block row by block row, and what the encoding
    kept of the update (squared norms, float64). `where`: the file to name when a block needs a scale its dtype
    cannot hold."""

    op: TensorOp
    power_of_two: bool = False
    workers: Workers | None = None  # threads for the CPU twin's column tiles
    where: str = ""
    scale: torch.Tensor = field(init=False)
    rescaled: int = 0
    error_sq: float = 0.0
    update_sq: float = 0.0

    def __post_init__(self):
        self.scale = torch.empty(tuple(self.op.instruct.scale.shape) or (1,), dtype=torch.float32).view(-1)

    @property
    def blocks(self) -> int:
        return self.scale.numel()

    def add(self, row0: int, scale: torch.Tensor, rescaled: int, error_sq: float, update_sq: float) -> None:
        """Record the block rows from `row0` that were encoded: their scales (float32) and measures. NonFiniteError
        when a new scale overflowed its dtype (an F16 scale above 65504): no scale of that dtype holds the block,
        and an Inf scale would decode the block as NaN/Inf."""
        if not bool(torch.isfinite(scale).all()):
            info: Quantized = self.op.instruct
            bad = int((~torch.isfinite(scale)).sum())
            raise NonFiniteError(
                f"{self.where or info.file}: tensor {self.op.name!r}: {bad} block(s) of the grafted values need a "
                f"scale above the largest {info.scale.dtype} value (tensor {info.scale.name!r}), so they cannot be "
                f"written in Instruct's FP8 format; --dtype bfloat16 (or float32) writes the merge dequantized "
                f"(into a new --output, or with --overwrite)"
            )
        first, _ = self.op.instruct.scale_range(row0, row0)
        self.scale[first : first + scale.numel()] = scale.reshape(-1)
        self.rescaled += rescaled
        self.error_sq += error_sq
        self.update_sq += update_sq

    def encode(
        self,
        out: torch.Tensor,
        x: torch.Tensor,
        kept: torch.Tensor,
        row0: int,
        instruct: torch.Tensor,
        scratch: Scratch | None = None,
    ):
        """Encode the float32 rows `x` (from row `row0`) into `out`, with Instruct's scales `kept` for them."""
        info: Quantized = self.op.instruct
        dtype = torch_dtype(info.scale.dtype)
        rows = x.numel() // info.cols
        enc = quantize_into(
            out,
            x.view(rows, info.cols),
            kept,
            row0,
            info.block,
            dtype,
            self.power_of_two,
            instruct.view(rows, -1),
            scratch,
        )
        self.add(row0, enc.scale, enc.rescaled, enc.error_sq, enc.update_sq)

    def write_scales(self, out: torch.Tensor, lo: int, hi: int) -> None:
        """Elements [lo, hi) of the new scale grid, in the scale's dtype, into `out`."""
        out.copy_(self.scale[lo:hi])

    def relative_error(self) -> float:
        """||deq(out) - deq(I) - update|| / ||update|| (0 for a tensor the update leaves unchanged)."""
        return (self.error_sq / self.update_sq) ** 0.5 if self.update_sq else 0.0


def on_device(op: TensorOp) -> bool:
    """Whether the Triton FP8 kernel computes `op` on a GPU: an FP8 output grafted from one full tuned input
    (LoRA terms and several deltas use the CPU twin)."""
    return op.quantized_out and not op.low_rank and len(op.terms) == 1 and op.reads_base


def encode_on_device(op: TensorOp, step: Step, held: list[Held], out: torch.Tensor, encoded: Encoded, device, locate):
    """One step of an on_device op on `device` with the Triton kernel (the CPU twin's bits): the inputs copied
    there, the FP8 bytes and new scales copied back into `out` and `encoded`; returns the NonFinite counts."""
    from graftcore.kernels import NonFinite
    from graftcore.kernels.triton_fp8 import graft_fp8_triton

    raw = {
        role: (t.to(device), None if s is None else s.to(device, torch.float32))
        for role, (t, s) in stored_inputs(step, held, locate).items()
    }
    info: Quantized = op.instruct
    term = op.terms[0]
    first, stop = info.scale_range(step.lo // info.cols, step.hi // info.cols)
    grid = stop - first
    q = torch.empty(step.hi - step.lo, dtype=torch.uint8, device=device)
    scale = torch.empty(grid, dtype=torch.float32, device=device)
    norms = torch.empty(grid, 2, dtype=torch.float64, device=device)
    counts = torch.zeros(3, dtype=torch.int64, device=device)
    graft_fp8_triton(
        q,
        scale,
        norms,
        counts,
        raw["instruct"],
        raw["base"],
        raw[term.role],
        info.cols,
        info.block,
        term.alpha,
        torch_dtype(info.scale.dtype),
        encoded.power_of_two,
    )
    out.view(torch.uint8).copy_(q.cpu())
    kept, scale = raw["instruct"][1].cpu(), scale.cpu()
    sums = norms.sum(dim=0).cpu()
    encoded.add(step.lo // info.cols, scale, int((scale != kept).sum()), float(sums[0]), float(sums[1]))
    return NonFinite(*counts.cpu().tolist())


def encode_full_deltas(op: TensorOp, step: Step, held: list[Held], out: torch.Tensor, compute, encoded, locate):
    """One step of an FP8 output grafted from full tuned inputs (no LoRA term) on the CPU twin, in column tiles
    shared among `encoded.workers` (kernels/graft/fp8.py graft_encode); NaN/Inf counted on `compute`."""
    raw = stored_inputs(step, held, locate)
    info: Quantized = op.instruct
    enc, counts = graft_encode(
        out,
        raw["instruct"],
        raw["base"],
        [raw[t.role] for t in op.terms],
        [t.alpha for t in op.terms],
        step.lo // info.cols,
        info.cols,
        info.block,
        torch_dtype(info.scale.dtype),
        encoded.power_of_two,
        encoded.workers,
    )
    encoded.add(step.lo // info.cols, enc.scale, enc.rescaled, enc.error_sq, enc.update_sq)
    compute._count(op.name, counts)
    return None
