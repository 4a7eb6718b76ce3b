"""One step's math, shared by the merge and `verify --recompute`: a step's inputs decoded, the graft (full
deltas, LoRA/DoRA blocks) computed on a Compute, a quantized output encoded by its codec's encoder; and the LoRA
factors of an op loaded where the math runs.

Example:
    >>> loaded = load_lora(op, compute, checkpoints, opts) if op.low_rank else None     # doctest: +SKIP
    >>> compute_step(op, step, held, out, compute, loaded, encoder)
"""

from __future__ import annotations

import torch

from graftcore.codecs import codec_of
from graftcore.io.safetensors_file import Quantized, itemsize, nbytes_of
from graftcore.plan.ops import TensorOp
from graftcore.sources.checkpoint import Checkpoint
from graftcore.stream.codec_steps import decode, encode_full_deltas, fused
from graftcore.stream.readers import Held, read_elements
from graftcore.stream.steps import Step, step_elements


def compute_step(
    op: TensorOp,
    step: Step,
    held: list[Held],
    out: torch.Tensor,
    compute,
    loaded,
    encoder=None,
    locate=None,
    scratch=None,
):
    """Compute one step into `out`; returns the event the writer waits on (GPU) or None. An op with quantized
    inputs decodes them (codec_steps.decode; `locate(role, file)` names a bad companion's file; `scratch`: reused
    buffers); one with a quantized output computes float32 rows and its codec's `encoder` encodes them (full
    deltas alone: graft and encode fused by the encoder where it has `graft_encode`; else, and with a LoRA term: the
    step into float32, then encoded).
    NaN/Inf of a fused step are counted on `compute` (`count`)."""
    if encoder is not None and step.grafted == step.hi and fused(op, encoder):
        compute.count(op.name, encode_full_deltas(op, step, held, out, encoder, locate))
        return None
    if op.quantized:
        views, stored = decode(step, held, locate, scratch)
    else:
        views = {read.role: h.tensor(read.info) for read, h in zip(step.reads, held)}
    i = views["instruct"]
    g = step.grafted - step.lo  # elements computed from the update; the rest are Instruct's, copied
    n = step.hi - step.lo
    if encoder is None:
        target = out
    else:
        target = torch.empty(n, dtype=torch.float32) if scratch is None else scratch.get("grafted", n)
    if g == 0:
        ready = compute.convert(target, i)
    elif loaded is not None:
        ready = compute.block(target, i, views.get("base"), block_terms(op, step.block, views, loaded), op.name)
    else:
        tuned = [views[t.role] for t in op.terms]
        ready = compute.graft(target[:g], i[:g], tuned, views.get("base"), [t.alpha for t in op.terms], op.name)
        if g < step.hi - step.lo:  # Instruct's extra vocabulary rows begin inside this step
            compute.convert(target[g:], i[g:])
    if encoder is not None:
        encoder.encode(out, target, step.lo // op.instruct.cols, stored["instruct"], i, scratch)
    return ready


def largest_step_bytes(op: TensorOp, chunk: int) -> int:
    """The most output bytes one step of `op` computes (quantized ops step in whole rows, beyond `chunk`; an
    added entry, the new scales, is written by one step)."""
    if not op.quantized:
        return 0
    added = [nbytes_of(dtype, shape) for _, dtype, shape in op.entries[1:]]
    return max([step_elements(op, chunk) * itemsize(op.out_dtype), *added])


def block_terms(op: TensorOp, block: tuple[int, int, int, int], views: dict[str, torch.Tensor], loaded: dict) -> list:
    """The terms of one block of an op with LoRA terms: FullDelta / LowRankDelta over rows [r0, r1), columns
    [c0, c1); `views`: each input's elements of the block."""
    from graftcore.kernels.lora import FullDelta, LowRankDelta

    r0, r1, c0, c1 = block
    terms = []
    for term in op.terms:
        if term.update is None:
            terms.append(FullDelta(views[term.role], term.alpha))
            continue
        f = loaded[term.role]
        axis = term.update.dora_axis
        dora = None if f.dora_scale is None else f.dora_scale[r0:r1] if axis == "rows" else f.dora_scale[c0:c1]
        terms.append(LowRankDelta(f.left[r0:r1], f.right_for(r0, r1)[:, c0:c1], f.scale, term.alpha, dora, axis))
    return terms


def base_rows(ck: Checkpoint, b, cols: int):
    """(r0, r1) -> Base's rows [r0, r1) as a [r1 - r0, cols] tensor, read directly (DoRA's norm pass); a quantized
    Base decoded by its codec from the stored parts those rows read."""
    if not isinstance(b, Quantized):
        path = ck.shard_path(b.file)
        return lambda r0, r1: read_elements(path, b, r0 * cols, r1 * cols).view(r1 - r0, cols)
    codec = codec_of(b)

    def decoded(r0: int, r1: int) -> torch.Tensor:
        parts = [read_elements(ck.shard_path(p.file), p, lo, hi) for p, lo, hi in codec.row_reads(b, r0, r1)]
        return codec.decode(b, parts, r0)

    return decoded


def load_lora(op: TensorOp, compute, checkpoints: dict[str, Checkpoint], opts) -> dict:
    """The factors of each LoRA term of `op` in float32, by role, where the math runs (read whole: rank r is
    small); for DoRA, also magnitude / norm, from one pass over Base's rows read directly (the streamer then
    reads Base again for the merge)."""
    from graftcore.lora.update import dora_scale

    loaded = {}
    for term in op.terms:
        u = term.update
        if u is None:
            continue
        adapter = checkpoints[term.role]
        f = u.load(lambda info: read_elements(adapter.shard_path(info.file), info), opts.allow_nonfinite)
        if u.magnitude is not None:
            i, b = op.instruct, op.base
            cols = i.numel // max(1, i.shape[0])
            rows = base_rows(checkpoints["base"], b, cols)
            f.dora_scale = dora_scale(f, rows, max(1, compute.chunk // cols), opts.allow_nonfinite)
        loaded[term.role] = compute.place(f)
    return loaded
