"""The steps of ops with quantized tensors, through their codecs (graftcore/codecs/): each quantized input's rows
decoded from its stored parts (every pass: the merge, similarity, verify --recompute), and the output's rows
encoded back into Instruct's format by the codec's encoder (in the merge's compute_step).

Example:
    >>> views, stored = decode(step, held)   # role -> float32 rows of a quantized input, or its stored dtype
"""

from __future__ import annotations

import torch

from graftcore.codecs import codec_of
from graftcore.io.safetensors_file import Quantized
from graftcore.plan.ops import TensorOp
from graftcore.stream.readers import Held
from graftcore.stream.steps import Read, Step


def where(read: Read, locate) -> str:
    """The path to name for `read` in an error (`locate(role, file)`; default the shard's name)."""
    return locate(read.role, read.info.file) if locate else read.info.file


def stored_parts(step: Step, held: list[Held], locate=None) -> tuple[dict[str, torch.Tensor], dict[str, tuple]]:
    """(role -> the step's elements of that input as stored, flat; role -> (Quantized, the stored parts its codec
    lists for the step's rows: weight, then companions, each companion checked by the codec as it arrives))."""
    views: dict[str, torch.Tensor] = {}
    stored: dict[str, tuple[Quantized, list]] = {}
    for read, h in zip(step.reads, held):
        t = h.tensor(read.info)
        if read.part == 0:
            views[read.role] = t
            if isinstance(read.info, Quantized):
                stored[read.role] = (read.info, [t])
            continue
        q, parts = stored[read.role]
        codec_of(q).check_read(q, read.part, t, where(read, locate), read.role)
        parts.append(t)
    return views, stored


def decode(step: Step, held: list[Held], locate=None, scratch=None) -> tuple[dict[str, torch.Tensor], dict]:
    """(role -> the step's elements of that input, flat: float32 for a quantized one, decoded by its codec, else
    as stored; role -> a quantized input's stored parts). CheckpointError for a companion whose values the format
    forbids (`locate(role, file)`: the path to name). With `scratch`, the decoded rows live in its buffers (valid
    until the next step decoded with it)."""
    views, stored = stored_parts(step, held, locate)
    for role, (q, parts) in stored.items():
        views[role] = codec_of(q).decode(q, parts, step.lo // q.cols, scratch, f"decoded-{role}").view(-1)
    return views, {role: parts for role, (_, parts) in stored.items()}


def check_copied(op: TensorOp, step: Step, held: list[Held], locate) -> None:
    """A raw step copying a companion of Instruct's quantized weight as it is: checked by the codec all the same."""
    read = step.reads[0]
    if read.part:
        codec_of(op.instruct).check_read(op.instruct, read.part, held[0].tensor(read.info), where(read, locate))


def one_format(op: TensorOp) -> bool:
    """Whether every quantized input of `op` is stored as its output is (one codec, one block): what the encoders
    that decode for themselves (the fused CPU graft, the device kernel) take. Other mixes decode each input by its
    own codec, then graft and encode."""
    i = op.instruct
    inputs = [op.base] if op.reads_base else []
    inputs += [t.tuned for t in op.terms if t.tuned is not None]
    return all(not isinstance(x, Quantized) or (x.codec, x.block) == (i.codec, i.block) for x in inputs)


def fused(op: TensorOp, encoder) -> bool:
    """Whether the encoder grafts and encodes `op`'s steps itself on the CPU (full deltas, one format)."""
    return hasattr(encoder, "graft_encode") and not op.low_rank and one_format(op)


def on_device(op: TensorOp, encoder) -> bool:
    """Whether the codec's device kernel computes `op` on a GPU: an output its encoder can graft on the device
    (`on_device`), from one full tuned input in one format (LoRA terms, several deltas and mixed formats use the
    CPU twin)."""
    return (
        hasattr(encoder, "on_device")
        and op.quantized_out
        and not op.low_rank
        and len(op.terms) == 1
        and op.reads_base
        and one_format(op)
    )


def out_elements(op: TensorOp, step: Step) -> tuple[int, int]:
    """[first, stop) of the elements of the output tensor op.entries[0] that a computed step writes: the step's
    own range, or for an output in a packed format the stored elements of its rows."""
    if not op.quantized_out:
        return step.lo, step.hi
    i = op.instruct
    _, first, stop = codec_of(i).row_reads(i, step.lo // i.cols, step.hi // i.cols)[0]
    return first, stop


def encode_on_device(op: TensorOp, step: Step, held: list[Held], out: torch.Tensor, encoder, device, locate):
    """One step of an on_device op on `device` (the CPU twin's bits); returns the NonFinite counts."""
    stored = full_delta_inputs(step, held, locate)
    cols = op.instruct.cols
    term = op.terms[0]
    return encoder.on_device(out, stored, term.alpha, term.role, step.lo // cols, step.hi // cols, device)


def encode_full_deltas(op: TensorOp, step: Step, held: list[Held], out: torch.Tensor, encoder, locate):
    """One step of a quantized output grafted from full tuned inputs (no LoRA term) on the CPU: decode, graft and
    encode fused by the encoder; returns the NonFinite counts."""
    stored = full_delta_inputs(step, held, locate)
    roles = [t.role for t in op.terms]
    return encoder.graft_encode(out, stored, [t.alpha for t in op.terms], step.lo // op.instruct.cols, roles)


def full_delta_inputs(step: Step, held: list[Held], locate) -> dict[str, list]:
    """role -> the step's stored parts of that input ([elements] for an unquantized one), companions checked: what
    the encoders that decode for themselves (the device kernel, the fused CPU graft) take."""
    views, stored = stored_parts(step, held, locate)
    return {role: stored[role][1] if role in stored else [t] for role, t in views.items()}
