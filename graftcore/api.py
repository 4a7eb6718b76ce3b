"""The Python API: `graft(...)` resolves the inputs, plans, and runs the engine.

Example:
    >>> import graftcore
    >>> report = graftcore.graft(base="Llama-3.1-8B", tuned="my-sft", instruct="Llama-3.1-8B-Instruct",
    ...                          output="Llama-3.1-8B-Instruct-shadow")      # doctest: +SKIP
    >>> print(report.summary())                                              # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__, interrupts
from .devices import local_cuda_device, out_of_memory_is_an_error, select_compute
from .distributed import joined_group, spawn_workers, write_output_distributed
from .errors import GraftError
from .inputs import Ref, check_output_outside_inputs, open_inputs
from .options import MergeOptions, option_fields
from .output import OutputFolder
from .plan import Plan, build_plan, entries_digest, plan_entries
from .safetensors_io import planned_file_size
from .sources import Checkpoint
from .steps import files_depended_on, files_read

if TYPE_CHECKING:
    from .engine import Progress, Report  # torch: loaded once the inputs are planned (load_engine)


def graft(
    *,
    instruct: Ref,
    tuned: Ref | Sequence[Ref],
    output: Ref,
    base: Ref | None = None,
    alpha: float | Sequence[float] = 1.0,
    device: str = "auto",
    log: Callable[[str], None] | None = None,
    progress: Callable[[Progress], None] | None = None,
    **options,
) -> Report:
    """Write `instruct + a1 * (tuned1 - base) + a2 * (tuned2 - base) + ...` for every tensor into the folder `output`.

    Args:
        instruct, base: local folders, `.safetensors` files or hub ids `org/name[@revision]`.
        tuned: one such REF or a PEFT LoRA adapter folder, or a list of them: several fine-tunes of Base
            merged in one pass (one rounding per element). Base is needed unless every tuned input is an
            adapter of LoRA factors only.
        output: the folder to write (a shard layout, index and non-weight files like Instruct's).
        alpha: the coefficient of every update, or a list with one per tuned input.
        device: "auto", "cpu", "cuda" or "cuda:N".
        log: called with one-line notices (device fallback, resume); silent by default.
        progress: called with a `Progress` (bytes done, bytes in all, shard, tensor) as output is written.
        **options: any other MergeOptions field (include, exclude, targets, dtype, max_shard_size,
            overwrite, allow_nonfinite, dry_run, quiet, token, cache_dir, low_disk, chunk_size).

    Returns:
        A Report (counts of grafted and copied tensors, bytes, seconds); with dry_run=True nothing is
        written, `report.plan` holds the plan and `report.summary()` describes it.

    Raises:
        GraftError (or a subclass) for bad input, naming the file and tensor, before the output is touched.

    Example:
        >>> report = graftcore.graft(base="Llama-3.1-8B", tuned=["math-sft", "code-sft"], alpha=[0.7, 0.5],
        ...                          instruct="Llama-3.1-8B-Instruct", output="shadow")      # doctest: +SKIP
    """
    unknown = sorted(set(options) - {f.name for f in option_fields()})
    if unknown:
        raise GraftError(f"graft: unknown option(s) {', '.join(unknown)} (see graftcore.MergeOptions)")
    opts = MergeOptions(alpha=alpha, device=device, **options)
    refs = (
        [tuned] if isinstance(tuned, (str, os.PathLike)) else list(tuned) if isinstance(tuned, (list, tuple)) else None
    )
    if not refs or not all(isinstance(r, (str, os.PathLike)) for r in refs):
        raise GraftError(f"tuned: expected a REF or a list of REFs (folders, files, hub ids), got {tuned!r}")
    for role, ref in (("instruct", instruct), ("output", output), ("base", base)):
        if not isinstance(ref, (str, os.PathLike)) and not (role == "base" and ref is None):
            raise GraftError(f"{role}: expected a folder, file or hub id, got {ref!r}")
    log = log or (lambda _msg: None)
    group = joined_group()  # torchrun, or a process group the caller initialised
    if group is not None and opts.workers > 1:
        raise GraftError(
            f"--workers {opts.workers}: this process is already one of {group.world} ranks (torchrun); use one or "
            "the other"
        )
    error = None
    try:
        checkpoints, deltas = open_inputs(instruct, refs, base, opts)
        plan = build_plan(checkpoints["instruct"], deltas, checkpoints.get("base"), opts)
    except GraftError as e:
        if group is None:
            raise
        error = e
    if group is not None:
        group.agree(error)  # every rank validated the same plan before any rank writes
    load_engine()
    workers = min(opts.workers, len(plan.shards))  # a worker per output shard at most
    if group is None and workers > 1 and not opts.dry_run:  # the inputs are valid: start the processes
        args = dict(instruct=instruct, tuned=refs, output=output, base=base, alpha=opts.alpha, device=device, **options)
        return spawn_workers(workers, {**args, "workers": 1}, log, progress)
    return run_plan(plan, checkpoints, Path(output), opts, log, progress=progress, group=group)


def load_engine() -> None:
    """Import the engine (and torch), once the inputs are resolved and planned: a bad input is refused in the
    time it takes to read headers. A signal while torch loads only sets the flag (raised after the import)."""
    interrupts.import_deferred(".engine")


def run_plan(
    plan: Plan,
    checkpoints: dict[str, Checkpoint],
    output: Path,
    opts: MergeOptions,
    log,
    compute=None,
    progress=None,
    group=None,
) -> Report:
    """Execute `plan` into `output` (or only describe it, for dry_run) with `compute` (default: per opts.device);
    with `group` (distributed.Group), this rank's share of it."""
    device = opts.device
    if group is not None and device in ("auto", "cuda"):
        device = local_cuda_device(group.local_rank) or device  # one GPU per local rank
    compute = compute or select_compute(device, opts.chunk_size, log)
    from .engine import Report

    if opts.dry_run:
        report = Report(output, compute.name, dry_run=True)
        report.count(plan)
        return report
    check_output_outside_inputs(output, checkpoints)
    if group is not None:
        with out_of_memory_is_an_error(compute):
            return write_output_distributed(group, plan, checkpoints, output, opts, log, compute, progress)
    folder = OutputFolder(output, job_fingerprint(checkpoints, opts))
    try:
        with out_of_memory_is_an_error(compute):
            return write_output(plan, checkpoints, output, folder, opts, log, compute, progress)
    finally:
        folder.release()


def write_output(
    plan: Plan,
    checkpoints: dict[str, Checkpoint],
    output: Path,
    folder: OutputFolder,
    opts,
    log,
    compute,
    progress=None,
) -> Report:
    """Claim `folder`, stream the plan into it, finalize it."""
    sizes = {s.file: planned_file_size(s.entries, s.metadata) for s in plan.shards}
    kept = folder.prepare(sizes, opts.overwrite, shard_keys(plan, checkpoints, folder.fingerprint))
    if kept:
        log(
            f"{output}: {len(kept)} of {len(sizes)} shard(s) already finished by an earlier run of this merge "
            "(verified); resuming"
        )
    schedule_reads(plan, checkpoints, kept, output / ".graftcore-downloads")
    from .engine import execute

    with interrupts.deferred():  # Ctrl-C stops the engine at its next step, never inside a queue
        report = execute(plan, checkpoints, output, folder, opts, compute, kept, progress)
        finish_output(plan, checkpoints, folder, opts, report)
    return report


def finish_output(
    plan: Plan, checkpoints: dict[str, Checkpoint], folder: OutputFolder, opts: MergeOptions, report: Report
) -> None:
    """The index, Instruct's non-weight files and graftcore.json, once every shard is in `folder.finished`."""
    for ck in checkpoints.values():  # e.g. the disk that --low-disk hub inputs took
        report.notes += [n for n in ck.report_notes() if n not in report.notes]
    instruct = checkpoints["instruct"]
    index = None
    if plan.write_index:
        weight_map = {op.name: s.file for s in plan.shards for op in s.ops}
        index = {"metadata": {"total_size": plan.out_nbytes}, "weight_map": dict(sorted(weight_map.items()))}
    extras = [(instruct.extra_file_path(f), f) for f in instruct.extra_files()]
    interrupts.check()
    folder.finalize(index, extras, manifest(checkpoints, opts, report), opts.dtype if opts.dtype != "auto" else None)


def schedule_reads(plan: Plan, checkpoints: dict[str, Checkpoint], kept: set[str], scratch: Path) -> None:
    """Tell each input the order in which the engine will open its shards (hub inputs download in that order,
    ahead of the merge; --low-disk ones into `scratch/ROLE`). Shards in `kept` are not written."""
    order: dict[str, dict[str, None]] = {role: {} for role in checkpoints}
    for shard in plan.shards:
        if shard.file not in kept:
            for op in shard.ops:
                for role, file in files_read(op):
                    order.setdefault(role, {})[file] = None
    for role, ck in checkpoints.items():
        ck.schedule(list(order[role]), scratch / role)


def shard_keys(plan: Plan, checkpoints: dict[str, Checkpoint], job: str) -> dict[str, str]:
    """Output shard -> a key of the job and of the state of every input file it is computed from."""
    keys = {}
    for shard in plan.shards:
        files = {rf for op in shard.ops for rf in files_depended_on(op)}
        state = sorted(f"{role}|{f}|{checkpoints[role].file_state(f)}" for role, f in files)
        keys[shard.file] = hashlib.sha256(json.dumps([job, state]).encode()).hexdigest()
    return keys


def job_fingerprint(checkpoints: dict[str, Checkpoint], opts: MergeOptions) -> str:
    """Same inputs and same bit-changing options -> same fingerprint (a rerun resumes)."""
    doc = {"inputs": {r: c.fingerprint for r, c in sorted(checkpoints.items())}, "options": opts.bits_key()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def manifest(checkpoints: dict[str, Checkpoint], opts: MergeOptions, report: Report) -> dict:
    options = {k: v for k, v in asdict(opts).items() if k not in ("token", "dry_run", "quiet", "overwrite", "workers")}
    return {
        "graftcore_version": __version__,
        "formula": formula(checkpoints, opts, report),
        "inputs": {
            role: {
                "ref": ck.ref,
                "revision": ck.revision,
                "fingerprint": ck.fingerprint,
                **local_path(ck),
                **file_states(ck),
            }
            for role, ck in checkpoints.items()
        },
        "options": options,
        "plan": {"tensors": len(report.plan.ops), "sha256": entries_digest(plan_entries(report.plan))},
        "counts": {
            "grafted": report.grafted,
            "grafted_rows": report.grafted_rows,
            "lora": report.lora,
            "copied": report.copied,
        },
        "ignored": [{"name": name, "reason": reason} for name, reason in report.ignored],
        "notes": report.notes,
        "device": report.device,
        "seconds": round(report.seconds, 3),
        # seconds: compute, wait_input, wait_writer (compute thread), write (writer thread), fsync, read_ROLE (readers)
        "timings": {k: round(v, 3) for k, v in report.timings.items()},
        "reads": report.reads,  # per input: bytes read from the disk with O_DIRECT, and from the page cache
    }


def formula(checkpoints: dict[str, Checkpoint], opts: MergeOptions, report: Report) -> str:
    """The merge as graftcore.json states it, e.g. `instruct + 0.7 * (tuned - base) + 0.5 * lora(tuned2)`."""
    roles = [r for r in checkpoints if r.startswith("tuned")]
    adapters = report.plan.adapters if report.plan is not None else []
    terms = [
        f"{a:g} * lora({r})" if r in adapters else f"{a:g} * ({r} - base)"
        for r, a in zip(roles, opts.alphas(len(roles)))
    ]
    text = "instruct + " + " + ".join(terms) + ", float32 math, terms added left to right, one rounding"
    if adapters:
        text += (
            "; lora(adapter) = lora_alpha/r * (lora_B @ lora_A) for its LoRA tensors (DoRA as PEFT merges it), "
            "tensor - base for full tensors it carries"
        )
    return text


def file_states(ck: Checkpoint) -> dict:
    """{"file_states": shard -> identity (device, inode, size, mtime, ctime) when the merge read it} of a local
    input, for `graftcore verify --recompute` to refuse a file changed since; {} for a hub input (its commit
    pins it)."""
    states = {f: ck.file_state(f) for f in sorted(ck.identities) if ck.file_state(f)}
    return {"file_states": states} if states and ck.revision is None else {}


def local_path(ck: Checkpoint) -> dict:
    """{"path": the absolute path} of a local input (its REF may be relative), for `graftcore verify` run from
    anywhere; {} for a hub input."""
    if ck.revision is not None:
        return {}
    path = Path(ck.ref).expanduser()
    return {"path": str(path.resolve())} if path.exists() else {}
