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
import re
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from . import __version__, interrupts
from .engine import CpuCompute, Report, execute
from .errors import GraftError, OutputError
from .lora import build_lora_plan, is_adapter, open_adapter
from .options import MergeOptions
from .output import OutputFolder
from .plan import Plan, build_plan
from .safetensors_io import planned_file_size
from .sources import Checkpoint, open_checkpoint
from .steps import files_depended_on, files_read


def graft(
    *,
    instruct: str | os.PathLike,
    tuned: str | os.PathLike,
    output: str | os.PathLike,
    base: str | os.PathLike | None = None,
    alpha: float = 1.0,
    device: str = "auto",
    log: Callable[[str], None] | None = None,
    **options,
) -> Report:
    """Write `instruct + alpha * (tuned - base)` for every tensor into the folder `output`.

    Args:
        instruct, tuned, base: local folders, `.safetensors` files or hub ids `org/name[@revision]`.
        output: the folder to write (a shard layout, index and non-weight files like Instruct's).
        alpha: scale of the grafted update.
        device: "auto", "cpu", "cuda" or "cuda:N".
        log: called with one-line notices (device fallback, resume); silent by default.
        **options: any other MergeOptions field (include, exclude, targets, dtype, max_shard_size,
            overwrite, allow_nonfinite, dry_run, quiet, token, cache_dir, low_disk, chunk_size).

    Returns:
        A Report (counts of grafted and copied tensors, bytes, seconds); with dry_run=True nothing is
        written and `report.plan` holds the plan.

    Raises:
        GraftError (or a subclass) for bad input, naming the file and tensor.
    """
    opts = MergeOptions(alpha=alpha, device=device, **options)
    log = log or (lambda _msg: None)
    hub = {"token": opts.token, "cache_dir": opts.cache_dir, "low_disk": opts.low_disk, "quiet": opts.quiet}
    if is_adapter(tuned):
        return graft_adapter(tuned, instruct, base, Path(output), opts, hub, log)
    if base is None:
        raise GraftError(f"--base is required: the update is tuned - base ({tuned} is not a PEFT adapter folder)")
    checkpoints = {role: open_checkpoint(ref, **hub) for role, ref in (("instruct", instruct), ("tuned", tuned), ("base", base))}
    plan = build_plan(checkpoints["instruct"], checkpoints["tuned"], checkpoints["base"], opts)
    return run_plan(plan, checkpoints, Path(output), opts, log)


def graft_adapter(adapter, instruct, base, output: Path, opts: MergeOptions, hub: dict, log) -> Report:
    """`tuned` is a PEFT LoRA adapter: W_I + alpha * s * (B @ A); Base only for modules_to_save and DoRA."""
    ad = open_adapter(adapter)
    checkpoints = {"instruct": open_checkpoint(instruct, **hub), "tuned": ad.checkpoint}
    if base is not None:
        checkpoints["base"] = open_checkpoint(base, **hub)
    plan = build_lora_plan(checkpoints["instruct"], ad, checkpoints.get("base"), opts)
    return run_plan(plan, checkpoints, output, opts, log)


def run_plan(plan: Plan, checkpoints: dict[str, Checkpoint], output: Path, opts: MergeOptions, log, compute=None) -> Report:
    """Execute `plan` into `output` (or only describe it, for dry_run) with `compute` (default: per opts.device)."""
    compute = compute or select_compute(opts, log)
    if opts.dry_run:
        report = Report(output, compute.name, ignored=plan.ignored, notes=plan.notes)
        report.plan = plan
        return report
    check_output_is_not_an_input(output, checkpoints)
    folder = OutputFolder(output, job_fingerprint(checkpoints, opts))
    try:
        return write_output(plan, checkpoints, output, folder, opts, log, compute)
    finally:
        folder.release()


def write_output(plan: Plan, checkpoints: dict[str, Checkpoint], output: Path, folder: OutputFolder, opts, log, compute) -> Report:
    """Claim `folder`, stream the plan into it, finalize it."""
    sizes = {s.file: planned_file_size(s.entries, s.metadata) for s in plan.shards}
    kept = folder.prepare(sizes, opts.overwrite, shard_keys(plan, checkpoints, folder.fingerprint))
    if kept:
        log(f"{output}: {len(kept)} of {len(sizes)} shard(s) already finished by an earlier run of this merge (verified); resuming")
    schedule_reads(plan, checkpoints, kept, output)
    with interrupts.deferred():  # Ctrl-C stops the engine at its next step, never inside a queue
        report = execute(plan, checkpoints, output, folder, opts, compute, kept)
        for ck in checkpoints.values():  # e.g. the disk that --low-disk hub inputs took
            report.notes += [n for n in ck.report_notes() if n not in report.notes]
        instruct = checkpoints["instruct"]
        index = None
        if plan.write_index:
            weight_map = {op.name: s.file for s in plan.shards for op in s.ops}
            index = {"metadata": {"total_size": plan.out_nbytes}, "weight_map": dict(sorted(weight_map.items()))}
        extras = [(instruct.extra_file_path(f), f) for f in instruct.extra_files()]
        interrupts.check()
        folder.finalize(index, extras, manifest(checkpoints, opts, report))
    report.plan = plan
    return report


def schedule_reads(plan: Plan, checkpoints: dict[str, Checkpoint], kept: set[str], output: Path) -> None:
    """Tell each input the order in which the engine will open its shards (hub inputs download in that order,
    ahead of the merge; --low-disk ones into `output/.graftcore-downloads/ROLE`)."""
    order: dict[str, dict[str, None]] = {role: {} for role in checkpoints}
    for shard in plan.shards:
        if shard.file not in kept:
            for op in shard.ops:
                for role, file in files_read(op):
                    order.setdefault(role, {})[file] = None
    for role, ck in checkpoints.items():
        ck.schedule(list(order[role]), output / ".graftcore-downloads" / role)


def select_compute(opts: MergeOptions, log):
    """CpuCompute or the GPU StreamCompute for `--device`; auto takes CUDA when CUDA and Triton are there."""
    from .kernels import CHUNK

    import torch

    device = opts.device
    if device == "auto":
        why = cuda_unavailable(None)
        if why and torch.version.cuda:  # a CUDA build of torch: the user expected the GPU, so say why not
            log(f"{why}: merging on the CPU (bit-identical, slower)")
        device = "cpu" if why else "cuda"
    if device == "cpu":
        return CpuCompute(opts.chunk_size or CHUNK)
    if re.fullmatch(r"cuda(:\d+)?", device) is None:
        raise GraftError(f"--device {device}: expected auto, cpu, cuda or cuda:N")
    why = cuda_unavailable(device)
    if why:
        raise GraftError(f"--device {device}: {why}")
    from .gpu import GPU_CHUNK, StreamCompute

    return StreamCompute(device, opts.chunk_size or GPU_CHUNK)


def cuda_unavailable(device: str | None) -> str | None:
    """Why `device` (None: any CUDA device) cannot run the Triton kernel, or None if it can."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device"
    if device and ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
        return f"only {torch.cuda.device_count()} CUDA device(s)"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed (pip install triton)"
    return None


def check_output_is_not_an_input(output: Path, checkpoints: dict[str, Checkpoint]) -> None:
    """The output folder may not be, or lie inside, or contain an input's folder (symlinks resolved): a later
    merge would copy our files as the input's, and --overwrite would delete the input's."""
    out = output.resolve()
    for role, ck in checkpoints.items():
        roots = [ck.root] if ck.root is not None else [p.parent for p in ck.local_files.values()]
        for root in (Path(r).resolve() for r in roots if r is not None):
            if out == root or out.is_relative_to(root) or root.is_relative_to(out):
                where = "is" if out == root else "is inside" if out.is_relative_to(root) else "contains"
                raise OutputError(f"{output}: {where} the {role} input's folder {root}; choose another --output")


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
    options = {k: v for k, v in asdict(opts).items() if k not in ("token", "dry_run", "quiet", "overwrite")}
    return {
        "graftcore_version": __version__,
        "formula": "instruct + alpha * (tuned - base), float32 math, one rounding"
        + ("; LoRA tensors: instruct + alpha * lora_alpha/r * (lora_B @ lora_A)" if report.lora else ""),
        "inputs": {
            role: {"ref": ck.ref, "revision": ck.revision, "fingerprint": ck.fingerprint}
            for role, ck in checkpoints.items()
        },
        "options": options,
        "counts": {"grafted": report.grafted, "grafted_rows": report.grafted_rows, "lora": report.lora, "copied": report.copied},
        "ignored": report.ignored,
        "notes": report.notes,
        "device": report.device,
        "seconds": round(report.seconds, 3),
        # seconds: compute, wait_input, wait_writer (compute thread), write (writer thread), fsync, read_ROLE (readers)
        "timings": {k: round(v, 3) for k, v in report.timings.items()},
        "reads": report.reads,  # per input: bytes read from the disk with O_DIRECT, and from the page cache
    }
