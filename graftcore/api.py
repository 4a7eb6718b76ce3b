"""The Python API: `graft(...)` resolves the inputs, plans, and runs the engine.

Example:
    >>> import graftcore
    >>> report = graftcore.graft(base="Llama-3.1-8B", tuned="my-sft", instruct="Llama-3.1-8B-Instruct",
    ...                          output="Llama-3.1-8B-Instruct-shadow")      # doctest: +SKIP
    >>> print(report.summary())                                              # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from graftcore import interrupts
from graftcore.compute.devices import local_cuda_device, out_of_memory_is_an_error, select_compute
from graftcore.errors import GraftError
from graftcore.io.output_folder import OutputFolder
from graftcore.merge.distributed import joined_group, spawn_workers, write_output_distributed
from graftcore.merge.job import write_output
from graftcore.options import MergeOptions, option_fields
from graftcore.plan.build import build_plan
from graftcore.plan.inputs import Ref, check_call, check_output_outside_inputs, job_fingerprint, open_inputs, tuned_refs
from graftcore.plan.ops import Plan  # tuned_role: documented as graftcore.api.tuned_role
from graftcore.plan.report import Progress, Report
from graftcore.sources.checkpoint import Checkpoint


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
    started = time.perf_counter()
    allowed = [f.name for f in option_fields()]
    check_call("graft", options, allowed, {"instruct": instruct, "output": output, "base": base}, optional={"base"})
    opts = MergeOptions(alpha=alpha, device=device, **options)
    refs = tuned_refs(tuned)
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
    if opts.dry_run:  # the plan described, and the output folder checked as a merge would: no torch, no device
        check_output_outside_inputs(Path(output), checkpoints)
        OutputFolder(output, job_fingerprint(checkpoints, opts)).check_claimable(opts.overwrite)
        report = Report(Path(output), opts.device, dry_run=True)
        report.count(plan)
        return report
    load_engine()
    workers = min(opts.workers, len(plan.shards))  # a worker per output shard at most
    if group is None and workers > 1:  # the inputs are valid: start the processes
        args = dict(instruct=instruct, tuned=refs, output=output, base=base, alpha=opts.alpha, device=device, **options)
        report = spawn_workers(graft, workers, {**args, "workers": 1}, log, progress)
    else:
        report = run_plan(plan, checkpoints, Path(output), opts, log, progress=progress, group=group)
    report.wall_seconds = time.perf_counter() - started
    return report


def load_engine() -> None:
    """Import the engine (and torch), once the inputs are resolved and planned: a bad input is refused in the
    time it takes to read headers. A signal while torch loads only sets the flag (raised after the import)."""
    interrupts.import_deferred(".merge.engine")


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
    """Execute `plan` into `output` with `compute` (default: per opts.device); with `group` (distributed.Group),
    this rank's share of it."""
    device = opts.device
    if group is not None and device in ("auto", "cuda"):
        device = local_cuda_device(group.local_rank) or device  # one GPU per local rank
    compute = compute or select_compute(device, opts.chunk_size, log)
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
