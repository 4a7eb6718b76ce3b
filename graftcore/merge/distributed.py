"""Merges spread over processes and machines: torchrun, a process group the caller initialised, or --workers K.

Every rank resolves the inputs and builds the same plan, and the ranks agree that it is valid before anything
is written: a bad input fails every rank (exit 2, naming the rank that found it). Rank 0 locks and claims the
output folder and finds the shards an earlier run finished (of any world size); the other shards are dealt
out by bytes, largest first, each to the least-loaded rank. Each rank streams its shards as a single process
would (NAME.partial, fsync, rename, its own progress file). When every rank is done, rank 0 writes the index,
the non-weight files and graftcore.json with every shard's size and sha256.

Only small objects travel between ranks, over gloo collectives and the process group's key-value store, so
CPU-only nodes work and no NCCL is needed. A rank that fails posts its error in the store; the others see it
within STORE_POLL seconds, stop at their next step (deleting their partial shard) and fail with the same line. A
rank killed outright is the launcher's to handle: torchrun and --workers stop the others.

Example:
    $ torchrun --nnodes 2 --nproc-per-node 4 -m graftcore merge --base B --tuned T --instruct I --output OUT
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

from graftcore import interrupts
from graftcore.errors import GraftError

STORE_POLL = 0.5  # seconds between looks at the store (another rank's failure, progress, the end)
_initialised_here: list[bool] = []  # whether joined_group() initialised the process group (torchrun's env)


@dataclass
class Group:
    """This process's place in a merge spread over `world` processes."""

    rank: int
    world: int
    local_rank: int
    gloo: object  # a gloo process group for the few object collectives
    store: object  # a PrefixStore private to this merge
    lock: threading.Lock = field(default_factory=threading.Lock)  # the store client is shared with a watcher thread

    def agree(self, error: BaseException | None) -> None:
        """Collective: raise on every rank if any rank got here with an error (the lowest such rank's)."""
        import torch.distributed as dist

        message = None if error is None else f"rank {self.rank} of {self.world}: {error}"
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, message, group=self.gloo)
        failed = next((m for m in gathered if m), None)
        if failed is not None:
            if error is not None and isinstance(error, GraftError):
                raise type(error)(message) from None
            raise GraftError(failed)

    def broadcast(self, obj):
        """Collective: rank 0's `obj` on every rank."""
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=self.global_rank(0), group=self.gloo)
        return box[0]

    def global_rank(self, rank: int) -> int:
        import torch.distributed as dist

        return dist.get_global_rank(self.gloo, rank) if self.gloo is not dist.group.WORLD else rank

    def set(self, key: str, value: str) -> None:
        with self.lock:
            self.store.set(key, value)

    def get(self, key: str) -> str | None:
        with self.lock:
            return self.store.get(key).decode() if self.store.check([key]) else None

    def add(self, key: str, n: int) -> int:
        with self.lock:
            return self.store.add(key, n)

    def post_failure(self, error: BaseException) -> None:
        """Tell the other ranks this one failed (the first failure stays: a later one is usually its echo)."""
        what = (
            str(error)
            if isinstance(error, GraftError)
            else "interrupted"
            if isinstance(error, KeyboardInterrupt)
            else f"{type(error).__name__}: {error}"
        )
        with self.lock:
            if not self.store.check(["failed"]):
                self.store.set(
                    "failed", what if what.startswith("rank ") else f"rank {self.rank} of {self.world}: {what}"
                )

    def raise_if_failed(self) -> None:
        failed = self.get("failed")
        if failed is not None:
            raise GraftError(f"stopped: {failed}")

    @contextlib.contextmanager
    def watching(self):
        """While the engine runs: another rank's failure stops this one at its next step, with that rank's error."""
        stop = threading.Event()

        def watch():
            while not stop.wait(STORE_POLL):
                failed = self.get("failed")
                if failed is not None:
                    interrupts.fail(GraftError(f"stopped: {failed}"))
                    return

        thread = threading.Thread(target=watch, name="graftcore-peers", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def wait(self, done, tick=None) -> None:
        """Poll until `done()`, raising another rank's failure (and checking for Ctrl-C); `tick()` each poll."""
        while not done():
            self.raise_if_failed()
            interrupts.check()
            if tick is not None:
                tick()
            time.sleep(STORE_POLL)
        self.raise_if_failed()


def joined_group() -> Group | None:
    """The process group this process belongs to (world > 1): one the caller initialised, or torchrun's
    (WORLD_SIZE, MASTER_ADDR in the environment: initialised here, gloo); None for a single process."""
    torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1 and "MASTER_ADDR" in os.environ
    if not torchrun and "torch" not in sys.modules:  # no group without torch loaded: planning stays torch-free
        return None
    try:
        with interrupts.deferred():  # torch may load here (torchrun): a signal meanwhile only sets the flag
            import torch.distributed as dist
    except ImportError:  # pragma: no cover (torch without distributed support)
        return None
    if not dist.is_available():
        return None
    if not dist.is_initialized():
        if not torchrun:
            return None
        dist.init_process_group("gloo")
        _initialised_here.append(True)
    if dist.get_world_size() == 1:
        return None
    gloo = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    token = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(token, src=0, group=gloo)
    store = dist.PrefixStore(f"graftcore/{token[0]}/", dist.distributed_c10d._get_default_store())
    rank = dist.get_rank()
    return Group(rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", rank)), gloo, store)


def assign(sizes: dict[str, int], kept: set[str], world: int) -> dict[str, int]:
    """Output shard -> rank for every shard not kept: largest first, each to the least-loaded rank (ties: the
    lower rank), so ranks finish at about the same time."""
    load = [0] * world
    owner = {}
    for file in sorted((f for f in sizes if f not in kept), key=lambda f: (-sizes[f], f)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owner[file] = rank
        load[rank] += sizes[file]
    return owner


def write_output_distributed(group: Group, plan, checkpoints, output: Path, opts, log, compute, progress=None):
    """This rank's share of the merge of `plan` into `output` (see the module docstring); returns its Report."""
    from graftcore.io.output_folder import OutputFolder
    from graftcore.io.safetensors_file import planned_file_size
    from graftcore.merge.engine import execute
    from graftcore.merge.job import finish_output, resume_line, shard_keys
    from graftcore.plan.inputs import job_fingerprint

    fingerprint = job_fingerprint(checkpoints, opts)
    keys = shard_keys(plan, checkpoints, fingerprint)
    sizes = {s.file: planned_file_size(s.entries, s.metadata) for s in plan.shards}
    folder = OutputFolder(output, fingerprint, rank=group.rank)
    error = None
    if group.rank == 0:
        try:
            folder.prepare(sizes, opts.overwrite, keys)
        except GraftError as e:
            error = e
    try:
        group.agree(error)
        kept_records = group.broadcast(dict(folder.finished) if group.rank == 0 else None)
        if group.rank != 0:
            folder.join(keys)
        owner = assign(sizes, set(kept_records), group.world)
        if group.rank == 0 and kept_records:
            log(resume_line(output, len(kept_records), len(sizes)))
        skip = {f for f in sizes if owner.get(f) != group.rank}
        scratch = output / ".graftcore-downloads" / f"rank{group.rank}"  # --low-disk hub shards of this rank
        total = sum(op.out_nbytes for s in plan.shards if s.file in owner for op in s.ops)  # tensor bytes, as counted
        bar = GroupProgress(group, total, quiet=opts.quiet or group.rank != 0, callback=progress)
        quiet = replace(opts, quiet=True)
        with group.watching(), interrupts.deferred():
            report = execute(plan, checkpoints, output, folder, quiet, compute, skip, bar.engine_callback, scratch)
            report.shards_kept = len(kept_records)
            bar.flush()
            share = {
                "shards": folder.finished,
                "notes": report.notes,
                "reads": report.reads,
                "written": [report.shards_written, report.bytes_written],
            }
            group.set(f"records/{group.rank}", json.dumps(share))
            group.add("done", 1)
            if group.rank == 0:
                group.wait(lambda: group.add("done", 0) >= group.world, bar.show)
                for r in range(1, group.world):
                    add_share(report, folder, json.loads(group.get(f"records/{r}") or "{}"))
                folder.finished.update(kept_records)
                finish_output(plan, checkpoints, folder, opts, report)
                group.set("finalized", "1")
            else:
                group.wait(lambda: group.get("finalized") is not None)
        bar.close()
        return report
    except BaseException as e:
        group.post_failure(e)
        raise
    finally:
        folder.release()


def add_share(report, folder, share: dict) -> None:
    """Rank 0 takes another rank's finished shards, notes, read counts and written bytes into its report, so
    graftcore.json and the returned Report are those of one process."""
    folder.finished.update(share.get("shards", {}))
    report.notes += [n for n in share.get("notes", []) if n not in report.notes]
    for role, ways in share.get("reads", {}).items():
        mine = report.reads.setdefault(role, {})
        for way, n in ways.items():
            mine[way] = mine.get(way, 0) + n
    shards, nbytes = share.get("written", [0, 0])
    report.shards_written += shards
    report.bytes_written += nbytes


class GroupProgress:
    """One progress bar for all ranks (on rank 0): every rank adds its bytes to the store about every STORE_POLL
    seconds; rank 0 shows their sum, and calls the caller's `progress` callback with it (other ranks call none)."""

    def __init__(self, group: Group, total: int, quiet: bool, callback=None):
        from tqdm.auto import tqdm

        self.group, self.callback, self.total = group, callback if group.rank == 0 else None, total
        self.pending, self.seen, self.last, self.where = 0, 0, time.monotonic(), ("", "")
        self.bar = tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            desc=f"graft x{group.world}",
            disable=True if quiet else None,
            leave=False,
        )

    def engine_callback(self, p) -> None:
        self.pending += p.done - self.seen
        self.seen = p.done
        self.where = (p.shard, p.tensor)
        if time.monotonic() - self.last > STORE_POLL:
            self.flush()
            self.show()

    def flush(self) -> None:
        if self.pending:
            self.group.add("bytes", self.pending)
            self.pending = 0
        self.last = time.monotonic()

    def show(self) -> None:
        if self.bar.disable and self.callback is None:
            return
        done = self.group.add("bytes", 0)
        if not self.bar.disable:
            self.bar.n = done
            self.bar.refresh()
        if self.callback is not None:
            from graftcore.plan.report import Progress

            self.callback(Progress(done, self.total, *self.where))

    def close(self) -> None:
        self.show()
        self.bar.close()


# ---- --workers K: local processes ---------------------------------------------------------------------------


def spawn_workers(graft, workers: int, kwargs: dict, log=None, progress=None):
    """`graft(**kwargs)` (api.graft, passed in: this layer imports no API) in `workers` local processes joined in
    a gloo group (torch.multiprocessing, a file rendezvous); returns rank 0's Report (it counts the shards and
    bytes of all). Rank 0's log lines and progress reach `log` and `progress` here, through the same queue; the
    first failure is raised as a GraftError.

    torch.multiprocessing starts the workers with "spawn": a script calling this must guard its entry point with
    `if __name__ == "__main__":`, as for any multiprocessing program."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="graftcore-workers-") as tmp:
        init = f"file://{Path(tmp) / 'rendezvous'}"
        messages = mp.get_context("spawn").SimpleQueue()
        context = mp.start_processes(
            _worker,
            args=(graft, workers, init, kwargs, messages, os.getpid()),  # graft pickles by its name
            nprocs=workers,
            join=False,
            start_method="spawn",
        )
        outcomes = {}

        def drain():  # while waiting: a Report larger than the pipe's buffer blocks its worker until read
            while not messages.empty():
                kind, *rest = messages.get()
                if kind == "log" and log is not None:
                    log(rest[0])
                elif kind == "progress" and progress is not None:
                    progress(rest[0])
                elif kind == "done":
                    rank, error, report = rest
                    outcomes[rank] = (error, report)

        try:
            while not context.join(timeout=STORE_POLL):
                drain()
                interrupts.check()
        except KeyboardInterrupt:
            # Stop them before leaving this block: it deletes the rendezvous file their store lives in, and a
            # store call on a deleted file waits forever (so would this process, joining them at exit).
            stop_workers(context.processes, drain)
            if 0 in outcomes and outcomes[0][0] is None:  # too late: rank 0 had finished the folder (graftcore.json)
                return outcomes[0][1]
            raise
        except mp.ProcessExitedException as e:
            raise GraftError(f"worker {e.error_index} of {workers} died ({e})") from None
        drain()
    failures = sorted((r, err) for r, (err, _) in outcomes.items() if err)
    if failures:
        first = next((err for _, err in failures if not err.startswith("stopped: ")), failures[0][1])
        if first == "interrupted":
            raise KeyboardInterrupt
        raise GraftError(first)
    return outcomes[0][1]


def stop_workers(processes, drain, grace: float = 10.0) -> None:
    """SIGTERM every worker (each stops at its next step, deleting its partial shard), read their messages while
    they finish (a worker blocked on the full pipe would not), and SIGKILL any left after `grace` seconds."""
    for p in processes:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + grace
    while any(p.is_alive() for p in processes) and time.monotonic() < deadline:
        drain()
        time.sleep(0.05)
    for p in processes:
        if p.is_alive():
            p.kill()
        p.join()


def _worker(index: int, graft, world: int, init: str, kwargs: dict, messages, parent: int) -> None:
    """One --workers process: join the group, run graft, put ("done", rank, error or None, Report or None) on
    `messages`; rank 0 also forwards its log lines and the progress of all ranks. It stops as on SIGTERM (at its
    next step, its partial shard deleted) when the process `parent` that started it dies, even by SIGKILL."""
    import datetime

    stop_with_parent(parent)

    import torch.distributed as dist

    error, report = None, None
    forward = {}
    if index == 0:
        forward = {"log": lambda msg: messages.put(("log", msg)), "progress": lambda p: messages.put(("progress", p))}
    try:
        dist.init_process_group(
            "gloo", init_method=init, rank=index, world_size=world, timeout=datetime.timedelta(hours=24)
        )
        report = graft(**kwargs, **forward)
    except GraftError as e:
        error = str(e)
    except KeyboardInterrupt:
        error = "interrupted"
    finally:
        if report is not None and index != 0:
            report.plan = None  # rank 0's carries the plan and the counts of all
        messages.put(("done", index, error, report))
        if dist.is_initialized():
            dist.destroy_process_group()


def stop_with_parent(parent: int) -> None:
    """SIGTERM this process when its parent dies (Linux: PR_SET_PDEATHSIG); exit at once if it already has."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the workers of a killed parent finish their shards
        return
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def shutdown() -> None:
    """Tear down the process group joined_group() initialised (a process that exits with gloo's threads still
    running can abort in C++ after its work is done). A group the caller initialised is the caller's."""
    if _initialised_here:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        _initialised_here.clear()
