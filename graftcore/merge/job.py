"""Run a Plan into an output folder, in one process: claim the folder (resume what an earlier run finished),
schedule the inputs' downloads, stream the plan (merge/engine.execute), then the index, Instruct's non-weight files and
graftcore.json with what the run records (manifest). merge/distributed.py runs each rank's share with the same pieces.

Example:
    >>> report = write_output(plan, checkpoints, out, OutputFolder(out, fingerprint),
    ...                       opts, print, CpuCompute(1 << 18))                      # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from graftcore import interrupts
from graftcore.codecs import codec_named
from graftcore.io.output_folder import OutputFolder, config_takes_dtype
from graftcore.io.safetensors_file import planned_file_size
from graftcore.options import MergeOptions
from graftcore.plan.ops import Plan, entries_digest, plan_entries
from graftcore.plan.report import Report, fp8_summary
from graftcore.sources.checkpoint import Checkpoint
from graftcore.stream.steps import files_depended_on
from graftcore.version import __version__


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
        log(resume_line(output, len(kept), len(sizes)))
    from graftcore.merge.engine import execute

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
    fp8 = {name: rec for shard in folder.finished.values() for name, rec in shard.get("fp8", {}).items()}
    report.fp8 = fp8_summary(fp8) if fp8 else {}
    if plan.write_index:
        weight_map = {name: s.file for s in plan.shards for op in s.ops for name, _, _ in op.entries}
        index = {"metadata": {"total_size": plan.out_nbytes}, "weight_map": dict(sorted(weight_map.items()))}
    extras = [(instruct.extra_file_path(f), f) for f in instruct.extra_files()]
    config = next((src for src, rel in extras if rel == "config.json"), None)
    if opts.dtype != "auto" and config is not None and not config_takes_dtype(config):
        report.notes.append(
            f"{config}: not a JSON object, copied as it is: it does not say torch_dtype {opts.dtype} as the weights are"
        )
    interrupts.check()
    dropped: tuple[str, ...] = ()
    if instruct.quant is not None and opts.dtype != "auto":
        codec = codec_named(instruct.quant.codec)
        dropped = codec.config_keys
        report.notes.append(
            f"{instruct.ref}: {codec.kind} weights written dequantized ({opts.dtype}); config.json's "
            f"{', '.join(dropped)} removed"
        )
    dtype = opts.dtype if opts.dtype != "auto" else None
    folder.finalize(index, extras, manifest(checkpoints, opts, report), dtype, dropped)


def shard_keys(plan: Plan, checkpoints: dict[str, Checkpoint], job: str) -> dict[str, str]:
    """Output shard -> a key of the job and of the state of every input file it is computed from."""
    keys = {}
    for shard in plan.shards:
        files = {rf for op in shard.ops for rf in files_depended_on(op)}
        state = sorted(f"{role}|{f}|{checkpoints[role].file_state(f)}" for role, f in files)
        keys[shard.file] = hashlib.sha256(json.dumps([job, state]).encode()).hexdigest()
    return keys


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
        "plan": {"tensors": len(plan_entries(report.plan)), "sha256": entries_digest(plan_entries(report.plan))},
        "counts": {
            "grafted": report.grafted,
            "grafted_rows": report.grafted_rows,
            "lora": report.lora,
            "copied": report.copied,
        },
        "ignored": [{"name": name, "reason": reason} for name, reason in report.ignored],
        "renamed": report.plan.renamed,  # prefix rewrites of Base's / tuned names into Instruct's
        "notes": report.notes,
        "device": report.device,
        "seconds": round(report.seconds, 3),
        # seconds: compute, wait_input, wait_writer (compute thread), write (writer thread), fsync, read_ROLE (readers)
        "timings": {k: round(v, 3) for k, v in report.timings.items()},
        "reads": report.reads,  # per input: bytes read from the disk with O_DIRECT, and from the page cache
        **({"fp8": report.fp8} if report.fp8 else {}),  # what requantizing to FP8 kept of the update
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


def resume_line(output, kept: int, total: int) -> str:
    """What a rerun says of the shards an earlier run of the same merge finished."""
    if kept == total:
        return (
            f"{output}: all {total} shard(s) were finished by an earlier run of this merge (verified); nothing to write"
        )
    return f"{output}: {kept} of {total} shard(s) already finished by an earlier run of this merge (verified); resuming"
