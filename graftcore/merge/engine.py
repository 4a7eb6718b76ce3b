"""Execute a Plan: stream every output shard step by step from the input streamer into a ShardWriter.

    for each output shard:                 ShardWriter(NAME.partial), header planned up front
        for each TensorOp, each step:       input streamer (stream/readers.py): I, B, T1.. bytes in reusable buffers
                                            -> compute into a pooled output buffer
                                            -> writer thread: append (pwrite) + sha256
        finish: fsync, rename to NAME, record in graftcore.progress.json

Peak anonymous memory is a few buffers per input plus a few chunks (scratch + the output pool), whatever
the tensor or model size. The inputs are read at once by their own threads, because three concurrent
streams read 2-3x faster than one on the disks we measured (docs/architecture.md).
"""

from __future__ import annotations

import os
import queue
import time
from collections.abc import Callable
from pathlib import Path

import torch

from graftcore.codecs import codec_of
from graftcore.compute.cpu import CpuCompute
from graftcore.errors import NonFiniteError
from graftcore.io.safetensors_file import ShardWriter
from graftcore.kernels.fp8 import EncodeThreads, Scratch
from graftcore.merge.writer import ChunkSink, WriterThread
from graftcore.plan.ops import Plan, TensorOp
from graftcore.plan.report import Progress, Report
from graftcore.sources.checkpoint import Checkpoint
from graftcore.stream.codec_steps import check_copied, encode_on_device, on_device, out_elements
from graftcore.stream.compute_step import compute_step, largest_step_bytes, load_lora
from graftcore.stream.driver import StepConsumer, run_pass
from graftcore.stream.readers import Held
from graftcore.stream.steps import Step

ENCODE_THREADS = 4  # at most this many threads encode a quantized step's column tiles (one per core below that)
POOL = 4  # output buffers in flight between the compute thread and the writer thread


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
        self.on_host: dict[str, int] = {}  # format -> quantized tensors a GPU merge computed on the CPU twin
        self.shard = self.writer = self.sink = self.loaded = self.encoder = None
        self.host = compute if compute.name == "cpu" else CpuCompute(compute.chunk)  # quantized ops: the CPU twin
        self.encoded: dict[str, dict] = {}  # quantized output tensor -> its encoder's record (graftcore.json "fp8")
        self.scratch = Scratch()  # the quantized steps' buffers
        threads = min(ENCODE_THREADS, os.cpu_count() or 1)
        self.encode_threads = EncodeThreads(threads) if any(op.quantized_out for op in plan.ops) else None

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
        self.encoder = None
        if op.quantized_out:
            where = self.checkpoints["instruct"].locate(op.instruct.file)
            self.encoder = codec_of(op.instruct).encoder(op.instruct, where, self.encode_threads)
        if op.quantized and op.grafted_numel and self.compute is not self.host and not on_device(op, self.encoder):
            self.on_host[op_format(op)] = self.on_host.get(op_format(op), 0) + 1

    def step(self, op: TensorOp, step: Step, held: list[Held]) -> int:
        if step.raw:
            check_copied(op, step, held, self.locate)  # Instruct's scales copied as they are: checked all the same
            return self.sink.raw(held[0])
        if step.entry:
            return self.sink.chunk(step.hi - step.lo, op.entries[step.entry][1], self.write_entry(op, step))
        first, stop = out_elements(op, step)
        if op.quantized and self.compute is not self.host and on_device(op, self.encoder):  # the codec's kernel
            return self.sink.chunk(stop - first, op.out_dtype, lambda out: self.on_device(op, step, held, out))
        compute, loaded, encoder = self.host if op.quantized else self.compute, self.loaded, self.encoder
        try:
            return self.sink.chunk(
                stop - first,
                op.out_dtype,
                lambda out: compute_step(op, step, held, out, compute, loaded, encoder, self.locate, self.scratch),
            )
        finally:
            event = compute.input_event  # the GPU path may still be copying from the read buffers
            for h in held:
                h.release(event)

    def on_device(self, op: TensorOp, step: Step, held: list[Held], out: torch.Tensor) -> None:
        try:
            counts = encode_on_device(op, step, held, out, self.encoder, self.compute.device, self.locate)
            self.host.count(op.name, counts)
        finally:
            for h in held:
                h.release()

    def locate(self, role: str, file: str) -> str:
        return self.checkpoints[role].locate(file)

    def write_entry(self, op: TensorOp, step: Step):
        """The fill of a step that writes an entry the encoder adds (the new scales); the first records what the
        encoding kept."""
        encoder = self.encoder
        self.encoded.setdefault(op.name, encoder.record())
        return lambda out: encoder.write_entry(step.entry - 1, out, step.lo, step.hi)

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
        fp8 = {op.name: self.encoded.pop(op.name) for op in self.shard.ops if op.name in self.encoded}
        self.folder.shard_done(self.shard.file, self.writer.size, sha, fp8, self.writer.prefix_digests)
        self.report.shards_written += 1
        self.report.bytes_written += self.writer.size
        self.writer = None

    def abort_group(self) -> None:
        if self.writer is not None:  # it may still hold the file's descriptor: closed once the thread is gone
            self.writer.abort(close=self.writer_thread.close())
            self.writer = None

    def close(self) -> None:
        for fmt, n in self.on_host.items():
            self.notes.append(
                f"{n} quantized tensor(s) ({fmt}) computed on the CPU twin, not on {self.compute.name}: no device "
                f"kernel for that format or input mix (same bits)"
            )
        self.writer_thread.close()
        if self.encode_threads is not None:
            self.encode_threads.close()
        self.clock["write"] = self.writer_thread.busy


def op_format(op: TensorOp) -> str:
    """The formats an op reads and writes, for a note: "fp4 from fp8" or the one codec's name."""
    from graftcore.io.safetensors_file import Quantized

    inputs = sorted({x.codec for x in (op.base, *(t.tuned for t in op.terms)) if isinstance(x, Quantized)})
    out = op.instruct.codec if isinstance(op.instruct, Quantized) else op.out_dtype
    return out if inputs in ([], [out]) else f"{out} from {', '.join(inputs)}"


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
