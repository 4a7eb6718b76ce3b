"""The one streaming pass: merge, similarity and verify's recompute read their inputs through it.

    run_pass(groups, consumer):
        hub inputs download ahead, in the order of the reads (--low-disk ones into `scratch`)
        readers.InputStreamer: a thread per input reads every step's byte ranges, in order, into ring buffers
        for each group (an output shard, or all the measured tensors), each op, each step:
            consumer.step(op, step, held)         the merge computes and writes, similarity sums, verify compares
        at the end of a group: consumer.drain_group(), the group's input files checked unchanged,
                               consumer.finish_group() (the merge renames its shard only then)
        around it: torch single-threaded (the consumers parallelise over chunks, not inside an op), one
        progress bar (and the caller's callback), the readers' timings and byte counts

A consumer implements `StepConsumer`; adding a kind of pass, or a kind of read (a quantized tensor's scale
alongside its weight), is a change here and in stream/steps.py, not in each pass.

Example:
    >>> stats = run_pass([("model.safetensors", ops)], checkpoints, opts, consumer, chunk=1 << 18,
    ...                  total=nbytes, label="graft", scratch=out / ".graftcore-downloads")   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from graftcore import interrupts
from graftcore.options import MergeOptions, parse_size
from graftcore.plan.ops import TensorOp
from graftcore.plan.report import Progress
from graftcore.sources.checkpoint import Checkpoint
from graftcore.stream.readers import BUFFER_BYTES, DEPTH, IO_THREADS, Held, InputStreamer
from graftcore.stream.steps import Step, files_depended_on, files_read, op_inputs, op_steps

DROP_BEHIND_FRACTION = 0.5  # drop consumed pages from the page cache when a pass moves more than this of RAM

Steps = Callable[[int, TensorOp, int], Iterator[Step]]  # (op's index, op, raw bytes per copied step) -> its steps


class StepConsumer:
    """What a pass does with its steps. `step` is the one method every consumer writes; the others default to
    nothing. Each `held` read must be released (now, or once a thread or device is done with it)."""

    def begin_pass(self, streamer: InputStreamer) -> None:
        """The readers are started (a consumer may size its batches by `streamer.raw_bytes`)."""

    def begin_group(self, name: str, ops: list[TensorOp]) -> None:
        """A group of ops begins (the merge: an output shard, whose writer opens here)."""

    def begin_op(self, op: TensorOp) -> None:
        """An op's steps follow (LoRA factors are loaded here)."""

    def step(self, op: TensorOp, step: Step, held: list[Held]) -> int:
        """Consume one step (`held`: its reads, in step.reads' order); returns the bytes it adds to the progress."""
        raise NotImplementedError

    def end_op(self, op: TensorOp) -> None:
        """The op's last step was handed over."""

    def drain_group(self) -> None:
        """Everything of the group computed (and written); its inputs are then checked unchanged."""

    def finish_group(self) -> None:
        """The group's inputs held still to the end (the merge renames its shard into place here)."""

    def abort_group(self) -> None:
        """The group failed or was interrupted (the merge deletes its partial shard)."""


@dataclass
class PassStats:
    """What the readers did: seconds the pass waited for input, each reader's seconds in preadv, bytes read per
    input from the disk (O_DIRECT) and from the page cache."""

    waited: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    reads: dict[str, dict[str, int]] = field(default_factory=dict)


class ProgressBar:
    """The progress bar (tqdm, unless quiet) and the caller's progress callback."""

    def __init__(self, total: int, label: str, quiet: bool, callback: Callable[[Progress], None] | None):
        self.bar = tqdm(
            total=total, unit="B", unit_scale=True, desc=label, disable=True if quiet else None, leave=False
        )
        self.total, self.done, self.callback = total, 0, callback
        self.shard = self.tensor = ""

    def update(self, n: int) -> None:
        if not n:
            return
        self.bar.update(n)
        self.done += n
        if self.callback is not None:
            self.callback(Progress(self.done, self.total, self.shard, self.tensor))

    def close(self) -> None:
        self.bar.close()


def drop_behind(pass_bytes: int) -> bool:
    """Whether to drop consumed input and written output pages from the page cache: only when the pass moves
    more than DROP_BEHIND_FRACTION of the memory available, so a pass that fits leaves its inputs cached
    (a rerun reads them at memory speed) and one that does not never pushes the machine into reclaim."""
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return False
    return pass_bytes > DROP_BEHIND_FRACTION * available


def read_buffer_bytes(opts: MergeOptions) -> int:
    """--read-buffer, or the default."""
    return parse_size(opts.read_buffer, "--read-buffer") if opts.read_buffer else BUFFER_BYTES


def input_bytes(ops: list[TensorOp]) -> int:
    """The bytes a pass over every step of `ops` reads."""
    return sum(info.nbytes for op in ops for _, info in op_inputs(op))


def schedule_downloads(groups: list[tuple[str, list[TensorOp]]], checkpoints: dict[str, Checkpoint], scratch: Path):
    """Tell each input the order in which the pass opens its shards: hub inputs download ahead in that order
    (--low-disk ones into `scratch/ROLE`)."""
    order: dict[str, dict[str, None]] = {role: {} for role in checkpoints}
    for _, ops in groups:
        for op in ops:
            for role, file in files_read(op):
                order.setdefault(role, {})[file] = None
    for role, ck in checkpoints.items():
        ck.schedule(list(order[role]), scratch / role)


def check_inputs_unchanged(ops: list[TensorOp], checkpoints: dict[str, Checkpoint]) -> None:
    """CheckpointError if an input file `ops` were computed from changed since its header was read."""
    for role, file in sorted({rf for op in ops for rf in files_depended_on(op)}):
        checkpoints[role].verify_unchanged(file)


def run_pass(
    groups: list[tuple[str, list[TensorOp]]],
    checkpoints: dict[str, Checkpoint],
    opts: MergeOptions,
    consumer: StepConsumer,
    *,
    chunk: int,
    total: int,
    label: str,
    scratch: Path,
    pin: bool = False,
    out_bytes: int = 0,
    extra_depth: int = 0,
    buffer_bytes: int | None = None,
    steps: Steps | None = None,
    progress: Callable[[Progress], None] | None = None,
) -> PassStats:
    """Stream every step of every op of `groups` (name, ops) into `consumer` (see the module docstring).

    Args:
        chunk: elements per computed step. total: the progress bar's bytes (what `step` returns, summed).
        label: the bar's name. scratch: where --low-disk hub inputs download.
        pin: pinned read buffers (CUDA copies). out_bytes: what the pass writes (with the reads: drop-behind).
        extra_depth: read buffers per input beyond the default (steps a consumer keeps in flight pin theirs).
        buffer_bytes: bytes per read buffer (default: --read-buffer's).
        steps: which steps of each op to stream (default: all of them, stream/steps.op_steps).
        progress: called with a Progress after every step that adds bytes.
    """
    ops = [op for _, group in groups for op in group]
    schedule_downloads(groups, checkpoints, scratch)
    drop = drop_behind(out_bytes + input_bytes(ops))
    steps = steps or (lambda k, op, raw: op_steps(op, chunk, raw))
    bar = ProgressBar(total, label, opts.quiet, progress)
    stats = PassStats()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # with OpenMP threads spin-waiting beside the writer and readers, 2 cores ran 2x slower
    streamer = None
    try:
        streamer = InputStreamer(
            checkpoints,
            ops,
            chunk,
            pin,
            drop,
            buffer_bytes or read_buffer_bytes(opts),
            (opts.read_depth or DEPTH + extra_depth),
            opts.read_workers or IO_THREADS,
            steps,
        )
        consumer.begin_pass(streamer)
        k = 0
        for name, group in groups:
            k = stream_group(name, group, k, streamer, steps, consumer, bar, checkpoints)
    finally:
        if streamer is not None:
            streamer.close()
            stats.waited = streamer.waited()
            stats.timings = streamer.timings()
            stats.reads = streamer.bytes_read()
        bar.close()
        torch.set_num_threads(threads)
    return stats


def stream_group(name: str, group: list[TensorOp], k: int, streamer, steps, consumer, bar, checkpoints) -> int:
    """Every step of the ops of one group (an output shard) into `consumer`; `k`: the index of the group's first
    op among the pass's ops (returns the next one). The group's inputs are checked unchanged before its output
    takes its final name; any failure aborts the group."""
    bar.shard = name
    consumer.begin_group(name, group)
    try:
        for op in group:
            bar.tensor = op.name
            consumer.begin_op(op)
            for step in steps(k, op, streamer.raw_bytes):
                interrupts.check()
                bar.update(consumer.step(op, step, [streamer.take(r) for r in step.reads]))
            consumer.end_op(op)
            k += 1
        consumer.drain_group()
        check_inputs_unchanged(group, checkpoints)  # before the group's output takes its final name
        consumer.finish_group()
    except BaseException:
        consumer.abort_group()
        raise
    return k
