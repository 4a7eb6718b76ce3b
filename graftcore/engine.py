"""Execute a Plan: stream every output shard step by step from the input streamer into a ShardWriter.

    for each output shard:                 ShardWriter(NAME.partial), header planned up front
        for each TensorOp, each step:       input streamer (readers.py): I, B, T1.. bytes in reusable buffers
                                            -> compute into a pooled output buffer
                                            -> writer thread: append (pwrite) + sha256
        finish: fsync, rename to NAME, record in graftcore.progress.json

Peak anonymous memory is a few buffers per input plus a few chunks (scratch + the output pool), whatever
the tensor or model size. The inputs are read at once by their own threads, because three concurrent
streams read 2-3x faster than one on the disks we measured (docs/architecture.md).
"""

from __future__ import annotations

import math
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from graftcore import interrupts
from graftcore.compute.cpu import CpuCompute
from graftcore.errors import NonFiniteError
from graftcore.fp8_steps import Encoded, check_scales, decode, encode_full_deltas, encode_on_device, on_device
from graftcore.interrupts import POLL
from graftcore.io.safetensors_file import Quantized, ShardWriter, itemsize, torch_dtype
from graftcore.kernels.fp8 import Scratch, Workers, dequantize
from graftcore.plan import Plan, TensorOp
from graftcore.readers import Held, read_elements
from graftcore.report import Progress, Report
from graftcore.sources.checkpoint import Checkpoint
from graftcore.steps import Step, step_elements
from graftcore.stream import StepConsumer, run_pass

FP8_THREADS = 4  # at most this many threads encode an FP8 step's column tiles (one per core below that)
POOL = 4  # output buffers in flight between the compute thread and the writer thread
SMALL_RAW = 256 << 10  # bytes: a tensor copied unchanged below this is packed with its neighbours into one write


class WriterThread:
    """Appends buffers to ShardWriters in order, off the compute thread (pwrite and sha256 release the GIL).

    Every wait on it polls (interrupts.POLL) and checks for Ctrl-C, so an interrupt never leaves the engine
    blocked on it; `close()` abandons what is queued and waits only for the write in hand.
    """

    def __init__(self, depth: int):
        self.jobs: queue.Queue = queue.Queue(depth)
        self.error: BaseException | None = None
        self.busy = 0.0  # seconds spent writing and hashing
        self.abandoned = False
        self._pending = 0  # jobs queued and not yet done
        self._idle = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="graftcore-writer", daemon=True)
        self.thread.start()

    def _run(self):
        while (job := self.jobs.get()) is not None:
            writer, data, ready, done = job
            try:
                if self.error is None and not self.abandoned:
                    t0 = time.perf_counter()
                    if ready is not None:
                        ready.synchronize()  # a GPU chunk: its copy back to the host has finished
                    writer.append(data)
                    self.busy += time.perf_counter() - t0
            except BaseException as e:  # noqa: BLE001 - reported to the compute thread at its next put/drain
                self.error = e
            finally:
                done()
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

    def put(self, writer: ShardWriter, data, done: Callable[[], None], ready=None) -> None:
        """Queue `data` for `writer`; `done()` runs after it is written; `ready` is an event to wait for first."""
        self._check()
        with self._idle:
            self._pending += 1
        while True:
            try:
                self.jobs.put((writer, data, ready, done), timeout=POLL)
                return
            except queue.Full:
                try:
                    interrupts.check()
                    self._check()
                except BaseException:
                    with self._idle:
                        self._pending -= 1
                    raise

    def drain(self) -> None:
        """Wait until everything queued is written (raising the writer's error, or KeyboardInterrupt)."""
        with self._idle:
            while self._pending:
                self._idle.wait(POLL)
                interrupts.check()
                self._check()
        self._check()

    def _check(self):
        if self.error is not None:
            raise self.error

    def close(self, timeout: float = 5.0) -> bool:
        """Stop the thread: what is still queued is skipped (after an error or an interrupt; after a drain
        nothing is). Waits at most `timeout` s for the write in hand; returns whether the thread is gone."""
        self.abandoned = True
        deadline = time.monotonic() + timeout
        sent = False
        while self.thread.is_alive() and time.monotonic() < deadline:
            if not sent:
                try:
                    self.jobs.put_nowait(None)
                    sent = True
                except queue.Full:  # the thread empties the queue quickly: it skips the writes now
                    pass
            self.thread.join(POLL)
        return not self.thread.is_alive()


class ChunkSink:
    """Where one output shard's bytes go: consecutive steps are computed into one pooled buffer until it is full,
    then the buffer is queued, in order, for the writer thread (so a shard of many small tensors costs a few
    large writes, not a write per tensor); the time breakdown is kept on the way."""

    def __init__(
        self, writer: ShardWriter, wt: WriterThread, pool: queue.Queue, capacity: int, clock: dict[str, float]
    ):
        self.writer, self.wt, self.pool, self.clock = writer, wt, pool, clock
        self.capacity = capacity  # bytes of each pooled buffer
        self.buf: torch.Tensor | None = None  # the pooled buffer being filled
        self.used = 0  # bytes of it filled
        self.ready = None  # the last GPU event among its chunks (copies back run in order on one stream)

    def raw(self, held: Held) -> int:
        """Queue input bytes as they are (a tensor copied unchanged); returns their count. A small piece is copied
        into the buffer being filled; a large one goes to the writer as it is, its read buffer released once
        written."""
        n = held.data.numel()
        if n <= min(SMALL_RAW, self.capacity):
            self._space(n, 1).copy_(held.data)
            held.release()
            self.used += n
        else:
            self.flush()
            self.wt.put(self.writer, held.data, held.release)
        return n

    def chunk(self, n: int, dtype: str, fill: Callable[[torch.Tensor], object]) -> int:
        """Add `n` elements of `dtype` that `fill(out)` computes in place (`fill` returns the event the writer
        must wait for, on a GPU, or None); returns their bytes."""
        size = itemsize(dtype)
        space = self._space(n * size, size)
        t1 = time.perf_counter()
        ready = fill(space.view(torch_dtype(dtype)))
        self.clock["compute"] += time.perf_counter() - t1
        self.ready = ready if ready is not None else self.ready
        self.used += n * size
        return n * size

    def _space(self, nbytes: int, align: int) -> torch.Tensor:
        """`nbytes` of room in the buffer being filled (queuing it and taking a fresh one when it is full)."""
        if self.buf is not None and (self.used + nbytes > self.buf.numel() or self.used % align):
            self.flush()
        if self.buf is None:
            t0 = time.perf_counter()
            while True:
                try:
                    self.buf = self.pool.get(timeout=POLL)
                    break
                except queue.Empty:
                    interrupts.check()
                    self.wt._check()
            self.clock["wait_writer"] += time.perf_counter() - t0
        return self.buf[self.used : self.used + nbytes]

    def flush(self) -> None:
        """Queue the buffer being filled for the writer."""
        buf, used, ready = self.buf, self.used, self.ready
        self.buf, self.used, self.ready = None, 0, None
        if buf is not None and used:
            self.wt.put(self.writer, buf[:used], lambda: self.pool.put(buf), ready)
        elif buf is not None:
            self.pool.put(buf)


class MergeConsumer(StepConsumer):
    """The merge's side of the pass: each output shard (a group) into a ShardWriter through the ChunkSink and the
    writer thread; NaN/Inf checked per tensor (CPU) or per shard (GPU: one device sync); a shard fsynced and
    renamed once its inputs are known unchanged, then recorded in the folder's progress file."""

    def __init__(self, plan: Plan, checkpoints, folder, opts, compute, report: Report):
        self.plan, self.checkpoints, self.folder, self.opts, self.compute = plan, checkpoints, folder, opts, compute
        self.report, self.drop = report, False
        self.shards = {s.file: s for s in plan.shards}
        self.writer_thread = WriterThread(POOL)
        self.pool: queue.Queue = queue.Queue()
        self.capacity = max([compute.chunk * 4] + [largest_step_bytes(op, compute.chunk) for op in plan.ops])
        for _ in range(POOL):
            self.pool.put(torch.empty(self.capacity, dtype=torch.uint8, pin_memory=compute.pin_output))
        self.clock = {"compute": 0.0, "wait_input": 0.0, "wait_writer": 0.0, "write": 0.0, "fsync": 0.0}
        self.notes: list[str] = []
        self.shard = self.writer = self.sink = self.loaded = self.encoded = None
        self.host = compute if compute.name == "cpu" else CpuCompute(compute.chunk)  # FP8 ops: the CPU twin
        self.fp8: dict[str, dict] = {}  # FP8 output tensor -> what its encoding kept of the update
        self.scratch = Scratch()  # the FP8 steps' buffers
        self.workers = (
            Workers(min(FP8_THREADS, os.cpu_count() or 1)) if any(op.quantized_out for op in plan.ops) else None
        )
        self.power_of_two = bool(getattr(checkpoints["instruct"].quant, "power_of_two", False))

    def begin_pass(self, streamer) -> None:
        self.drop = streamer.drop_behind  # out of core: written windows dropped from the page cache too

    def begin_group(self, name: str, ops: list[TensorOp]) -> None:
        self.shard = self.shards[name]
        self.by_name = {op.name: op for op in self.shard.ops}
        self.writer = ShardWriter(
            self.folder.path / name, self.shard.entries, self.shard.metadata, drop_behind=self.drop
        )
        self.sink = ChunkSink(self.writer, self.writer_thread, self.pool, self.capacity, self.clock)

    def begin_op(self, op: TensorOp) -> None:
        compute = self.host if op.quantized else self.compute
        self.loaded = load_lora(op, compute, self.checkpoints, self.opts) if op.low_rank else None
        where = self.checkpoints["instruct"].locate(op.instruct.file)
        self.encoded = Encoded(op, self.power_of_two, self.workers, where) if op.quantized_out else None

    def step(self, op: TensorOp, step: Step, held: list[Held]) -> int:
        if step.raw:
            if step.reads[0].scale:  # Instruct's scales of an FP8 weight copied as they are: checked all the same
                check_scales(held[0].tensor(step.reads[0].info), step.reads[0], self.locate)
            return self.sink.raw(held[0])
        if step.scales:
            return self.sink.chunk(step.hi - step.lo, op.instruct.scale.dtype, self.write_scales(step))
        if op.quantized and self.compute is not self.host and on_device(op):  # the Triton FP8 kernel
            return self.sink.chunk(step.hi - step.lo, op.out_dtype, lambda out: self.fp8_on_device(op, step, held, out))
        compute, loaded, encoded = self.host if op.quantized else self.compute, self.loaded, self.encoded
        try:
            return self.sink.chunk(
                step.hi - step.lo,
                op.out_dtype,
                lambda out: compute_step(op, step, held, out, compute, loaded, encoded, self.locate, self.scratch),
            )
        finally:
            event = compute.input_event  # the GPU path may still be copying from the read buffers
            for h in held:
                h.release(event)

    def fp8_on_device(self, op: TensorOp, step: Step, held: list[Held], out: torch.Tensor) -> None:
        try:
            counts = encode_on_device(op, step, held, out, self.encoded, self.compute.device, self.locate)
            self.host._count(op.name, counts)
        finally:
            for h in held:
                h.release()

    def locate(self, role: str, file: str) -> str:
        return self.checkpoints[role].locate(file)

    def write_scales(self, step: Step):
        """The fill of the step that writes an FP8 tensor's new scales; records what its encoding kept."""
        encoded = self.encoded
        op = encoded.op
        finite = lambda v: v if math.isfinite(v) else None  # noqa: E731  JSON has no NaN: "not measured"
        self.fp8[op.name] = {
            "update_error": finite(encoded.relative_error()),
            "rescaled_blocks": encoded.rescaled,
            "blocks": encoded.blocks,
            "update_norm_sq": finite(encoded.update_sq),
            "error_norm_sq": finite(encoded.error_sq),
        }
        return lambda out: encoded.write_scales(out, step.lo, step.hi)

    def end_op(self, op: TensorOp) -> None:
        if op.quantized:
            check_finite(self.host, self.by_name, self.checkpoints, self.opts, self.notes)
        if not self.compute.deferred:
            check_finite(self.compute, self.by_name, self.checkpoints, self.opts, self.notes)

    def drain_group(self) -> None:
        check_finite(self.compute, self.by_name, self.checkpoints, self.opts, self.notes)  # one device sync per shard
        self.sink.flush()
        t_drain = time.perf_counter()
        self.writer_thread.drain()
        self.clock["wait_writer"] += time.perf_counter() - t_drain

    def finish_group(self) -> None:
        t_fsync = time.perf_counter()
        sha = self.writer.finish()
        self.clock["fsync"] += time.perf_counter() - t_fsync
        fp8 = {op.name: self.fp8.pop(op.name) for op in self.shard.ops if op.name in self.fp8}
        self.folder.shard_done(self.shard.file, self.writer.size, sha, fp8, self.writer.prefix_digests)
        self.report.shards_written += 1
        self.report.bytes_written += self.writer.size
        self.writer = None

    def abort_group(self) -> None:
        if self.writer is not None:  # it may still hold the file's descriptor: closed once the thread is gone
            self.writer.abort(close=self.writer_thread.close())
            self.writer = None

    def close(self) -> None:
        self.writer_thread.close()
        if self.workers is not None:
            self.workers.close()
        self.clock["write"] = self.writer_thread.busy


def execute(
    plan: Plan,
    checkpoints: dict[str, Checkpoint],
    output,
    folder,
    opts,
    compute,
    skip: set[str],
    progress: Callable[[Progress], None] | None = None,
    scratch: Path | None = None,
) -> Report:
    """Write every shard of `plan` not in `skip` into the OutputFolder `folder`; returns the Report. `scratch`:
    where --low-disk hub inputs download (default: OUTPUT/.graftcore-downloads)."""
    report = Report(Path(output), compute.name)
    t0 = time.perf_counter()
    shards = [s for s in plan.shards if s.file not in skip]
    report.shards_kept = len(plan.shards) - len(shards)
    ops = [op for s in shards for op in s.ops]
    todo = sum(op.out_nbytes for op in ops)
    consumer = MergeConsumer(plan, checkpoints, folder, opts, compute, report)
    with compute:
        try:
            stats = run_pass(
                [(s.file, s.ops) for s in shards],
                checkpoints,
                opts,
                consumer,
                chunk=compute.chunk,
                total=todo,
                label="graft",
                scratch=scratch or Path(output) / ".graftcore-downloads",
                pin=compute.pin_output,
                out_bytes=todo,
                progress=progress,
            )
        finally:
            consumer.close()
    report.timings = {**consumer.clock, "wait_input": stats.waited, **stats.timings}
    report.reads = stats.reads
    report.count(plan)
    report.notes += consumer.notes
    report.seconds = time.perf_counter() - t0
    return report


def compute_step(
    op: TensorOp,
    step: Step,
    held: list[Held],
    out: torch.Tensor,
    compute,
    loaded,
    encoded: Encoded | None = None,
    locate=None,
    scratch=None,
):
    """Compute one step into `out`; returns the event the writer waits on (GPU) or None. An op with FP8 inputs
    decodes them (fp8_steps.decode; `locate(role, file)` names a bad scale's file; `scratch`: reused buffers);
    one with an FP8 output computes float32 rows and `encoded` encodes them (full deltas alone: graft and encode
    fused in encode_full_deltas; with a LoRA term: the block into float32, then encoded)."""
    if encoded is not None and not op.low_rank and step.grafted == step.hi:
        return encode_full_deltas(op, step, held, out, compute, encoded, locate)
    if op.quantized:
        views, scales = decode(step, held, locate, scratch)
    else:
        views = {read.role: h.tensor(read.info) for read, h in zip(step.reads, held)}
    i = views["instruct"]
    g = step.grafted - step.lo  # elements computed from the update; the rest are Instruct's, copied
    n = step.hi - step.lo
    if encoded is None:
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
    if encoded is not None:
        encoded.encode(out, target, scales["instruct"], step.lo // op.instruct.cols, i, scratch)
    return ready


def largest_step_bytes(op: TensorOp, chunk: int) -> int:
    """The most output bytes one step of `op` computes (FP8 ops step in whole block rows, beyond `chunk`)."""
    if not op.quantized:
        return 0
    return max(step_elements(op, chunk) * itemsize(op.out_dtype), op.instruct.scale.nbytes if op.quantized_out else 0)


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


def check_finite(compute, ops: dict[str, TensorOp], checkpoints: dict[str, Checkpoint], opts, notes: list[str]) -> None:
    """Raise NonFiniteError for the first tensor (in the order computed) of `ops` (name -> op: the shard's) with
    NaN/Inf in a delta or produced from finite inputs (unless allowed); NaN/Inf that Instruct itself holds and
    the merge carried through become notes. Only the tensors with counts are looked at: a check per tensor costs
    nothing for the shard's others."""
    for name, found in compute.nonfinite().items():
        op = ops.get(name)
        if op is None or not found:
            continue
        if found.instruct:
            notes.append(
                f"{checkpoints['instruct'].locate(op.instruct.file)}: tensor {op.name!r}: {found.instruct} NaN/Inf "
                f"value(s) of Instruct carried into the output"
            )
        if opts.allow_nonfinite:
            continue
        if found.deltas:
            files = "; ".join(
                f"{t.role}: {checkpoints[t.role].locate(t.tuned.file)}" for t in op.terms if t.tuned is not None
            )
            raise NonFiniteError(
                f"{files or checkpoints['instruct'].locate(op.instruct.file)}: tensor {op.name!r}: {found.deltas} "
                "element(s) of tuned - base are NaN/Inf (base: "
                f"{checkpoints['base'].locate(op.base.file) if op.base else '-'}; "
                f"pass --allow-nonfinite to keep them)"
            )
        if found.overflow:
            raise NonFiniteError(
                f"{checkpoints['instruct'].locate(op.instruct.file)}: tensor {op.name!r}: {found.overflow} "
                "element(s) of "
                f"the result are NaN/Inf in {op.out_dtype} although every input is finite (a large alpha or delta "
                f"overflowed; --dtype float32 has more range; pass --allow-nonfinite to keep them)"
            )


def base_rows(ck: Checkpoint, b, cols: int):
    """(r0, r1) -> Base's rows [r0, r1) as a [r1 - r0, cols] tensor, read directly (DoRA's norm pass); an FP8
    Base decoded with its scale rows."""
    path = ck.shard_path(b.file)
    if not isinstance(b, Quantized):
        return lambda r0, r1: read_elements(path, b, r0 * cols, r1 * cols).view(r1 - r0, cols)

    def decoded(r0: int, r1: int) -> torch.Tensor:
        scale = read_elements(ck.shard_path(b.scale.file), b.scale, *b.scale_range(r0, r1))
        return dequantize(read_elements(path, b, r0 * cols, r1 * cols), scale, r0, cols, b.block)

    return decoded


def load_lora(op: TensorOp, compute, checkpoints: dict[str, Checkpoint], opts) -> dict:
    """The factors of each LoRA term of `op` in float32, by role, where the math runs (read whole: rank r is
    small); for DoRA, also magnitude / norm, from one pass over Base's rows read directly (the streamer then
    reads Base again for the merge)."""
    from graftcore.lora_update import dora_scale

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
