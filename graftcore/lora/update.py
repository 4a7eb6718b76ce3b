"""A LoRA term's factors, as the engine reads them: `left @ right` over the rows of the Instruct tensor as stored.

    Linear          W [out, in]         left = B    [out, r]    right = A     [r, in]
    fan_in_fan_out  W [in, out]         left = A.T  [in, r]     right = B.T   [r, out]
    Embedding       W [vocab, d]        left = A.T  [vocab, r]  right = B.T   [r, d]
    lora_B.bias     b [out]             left = b    [out, 1]    right = [[1]]
    expert          W [E, out, in]      per expert e: left = B_e [out, r], right = A_e [r, in]
    expert_t        W [E, in, out]      per expert e: left = A_e.T [in, r], right = B_e.T [r, out]

The last two are PEFT's LoRA on a 3-D MoE parameter (target_parameters, lora.ParamWrapper): lora_A is
[r * E, in] and lora_B [out, r * E], A_e = lora_A.reshape(E, r, in)[e], B_e = lora_B.reshape(out, r, E)[:, :, e]
(ParamWrapper.get_delta_weight, PEFT 0.21: einsum "o r e, e r i -> e o i", or "-> e i o" for experts stored
transposed, `is_transposed`). A fused Instruct tensor [E, d1, d2] is computed as a [E * d1, d2] matrix whose
rows [e * d1, (e + 1) * d1) take expert e's `right`; a per-expert Instruct tensor takes rows of one expert's.

Example:
    >>> loaded = update.load(lambda info: read(info))     # doctest: +SKIP
    >>> loaded.left.shape, loaded.right.shape             # [rows, r], [r, cols] (or [E, r, cols])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from graftcore.errors import NonFiniteError
from graftcore.io.safetensors_file import TensorInfo

if TYPE_CHECKING:
    import torch  # imported where the factors are loaded: planning needs no torch

EXPERT_KINDS = ("expert", "expert_t")


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The [rows, cols] a LoRA term is computed over: a 3-D expert tensor [E, d1, d2] as [E * d1, d2], any other
    tensor as [dim 0, the rest]."""
    if not shape or not shape[0]:
        return 0, 0
    numel = 1
    for d in shape:
        numel *= d
    if len(shape) == 3:
        return numel // shape[-1], shape[-1]
    return shape[0], numel // shape[0]


@dataclass(frozen=True)
class LowRankUpdate:
    """`out[:rows] = I[:rows] + alpha * scale * left @ right`, viewing the Instruct tensor as [rows_I, cols]
    (matrix_shape).

    The factors stay on disk until the engine calls `load`; `rows` < Instruct's rows only when Instruct's
    vocabulary grew (its extra rows are copied).
    """

    module: str
    kind: str  # "linear", "fan_in_fan_out", "embedding", "bias", "expert" or "expert_t"
    scale: float  # lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA
    a: TensorInfo  # lora_A.weight, lora_embedding_A, or lora_B.bias for kind "bias"
    b: TensorInfo | None
    rows: int
    cols: int
    magnitude: TensorInfo | None = None  # DoRA
    where: str = ""  # the adapter file, for messages
    experts: int = 0  # kinds "expert" / "expert_t": E, the experts the factors hold
    expert: int = -1  # ... the expert a per-expert Instruct tensor is; -1: all (a fused [E, d1, d2] tensor)
    first_row: int = 0  # ... where that tensor's rows begin in its expert's delta (an up_proj: after the gate's)

    @property
    def dora_axis(self) -> str:
        """PEFT normalises Linear weights per output row, Embedding and Conv1D weights per stored column."""
        return "rows" if self.kind == "linear" else "cols"

    @property
    def group(self) -> int:
        """Rows per expert of a fused expert tensor (each block of them takes its expert's `right`); 0 otherwise."""
        return self.rows // self.experts if self.kind in EXPERT_KINDS and self.expert < 0 else 0

    def load(self, view: Callable[[TensorInfo], torch.Tensor], allow_nonfinite: bool = False) -> LoadedUpdate:
        """Read the factors in float32, laid out for row chunks (left [rows, r], right [r, cols] or, for a fused
        expert tensor, [E, r, cols]; contiguous)."""
        import torch  # not at the top: planning needs no torch

        a = view(self.a).to(torch.float32, copy=True)  # a float32 copy: the read buffer is not kept
        b = None if self.kind == "bias" else view(self.b).to(torch.float32, copy=True).reshape(self.b.shape)
        magnitude = None if self.magnitude is None else view(self.magnitude).to(torch.float32, copy=True)
        if not allow_nonfinite:  # each factor named as the adapter file names it (lora_A, lora_B, magnitude)
            for t, info in ((a, self.a), (b, self.b), (magnitude, self.magnitude)):
                if t is not None and not bool(torch.isfinite(t).all()):
                    raise NonFiniteError(
                        f"{self.where}: tensor {info.name!r} holds NaN/Inf (pass --allow-nonfinite to keep them)"
                    )
        if self.kind == "bias":
            left, right = a.reshape(-1, 1), torch.ones(1, 1)
        elif self.kind in EXPERT_KINDS:
            left, right = self.expert_factors(a.reshape(self.a.shape), b)
        else:
            a = a.reshape(self.a.shape)
            left, right = (b, a) if self.kind == "linear" else (a.T, b.T)
        return LoadedUpdate(self, left.contiguous(), right.contiguous(), magnitude)

    def expert_factors(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(left, right) of kinds expert / expert_t from lora_A [r * E, ·] and lora_B [·, r * E], as PEFT's
        ParamWrapper.get_delta_weight splits them (module docstring)."""
        e, r = self.experts, a.shape[0] // self.experts
        a3, b3 = a.reshape(e, r, -1), b.reshape(b.shape[0], r, e)
        if self.kind == "expert":  # W [E, out, in]: delta_e = B_e @ A_e
            lefts, rights = b3.permute(2, 0, 1), a3
        else:  # W [E, in, out]: delta_e = (B_e @ A_e).T = A_e.T @ B_e.T
            lefts, rights = a3.transpose(1, 2), b3.permute(2, 1, 0)
        if self.expert >= 0:
            return lefts[self.expert, self.first_row : self.first_row + self.rows], rights[self.expert]
        return lefts.reshape(-1, r), rights


@dataclass
class LoadedUpdate:
    """A LowRankUpdate's factors in float32; for DoRA, `dora_scale` (magnitude / norm) is set by the engine."""

    update: LowRankUpdate
    left: torch.Tensor
    right: torch.Tensor
    magnitude: torch.Tensor | None = None
    dora_scale: torch.Tensor | None = None

    @property
    def scale(self) -> float:
        return self.update.scale

    def right_for(self, r0: int, r1: int) -> torch.Tensor:
        """`right` for the rows [r0, r1) of the update (within one expert's of a fused expert tensor)."""
        if self.right.dim() == 2:
            return self.right
        group = self.update.group
        assert r0 // group == (r1 - 1) // group, "a block spans two experts"
        return self.right[r0 // group]


def dora_scale(
    loaded: LoadedUpdate,
    base_rows: Callable[[int, int], torch.Tensor],
    rows_per_chunk: int,
    allow_nonfinite: bool = False,
) -> torch.Tensor:
    """magnitude / ||W_base + s * delta||, the norm taken as PEFT's DoRA merge takes it (per row or per column).

    One pass over Base in row chunks, float32 math, column sums of squares accumulated in float64.
    `base_rows(r0, r1)` returns Base's rows [r0, r1) as a [r1 - r0, cols] tensor.
    """
    import torch  # not at the top: planning needs no torch

    u = loaded.update
    sumsq = torch.zeros(u.rows if u.dora_axis == "rows" else u.cols, dtype=torch.float64)
    for r0 in range(0, u.rows, rows_per_chunk):
        r1 = min(u.rows, r0 + rows_per_chunk)
        w = base_rows(r0, r1).to(torch.float32)
        w.addmm_(loaded.left[r0:r1], loaded.right, alpha=u.scale)
        sq = w.square_()
        if u.dora_axis == "rows":
            sumsq[r0:r1] = sq.sum(dim=1, dtype=torch.float64)
        else:
            sumsq += sq.sum(dim=0, dtype=torch.float64)
    scale = (loaded.magnitude.double() / sumsq.sqrt()).to(torch.float32)
    if not allow_nonfinite and not bool(torch.isfinite(scale).all()):
        raise NonFiniteError(
            f"{u.where}: tensor {u.magnitude.name!r}: DoRA magnitude / weight norm is NaN/Inf (a zero or non-finite "
            f"norm of base + update); pass --allow-nonfinite to keep it"
        )
    return scale
