"""The inputs of a merge or a measurement, resolved to Checkpoints (headers only) and planned without torch.

Nothing here imports torch: `graftcore similarity` resolves and plans (and refuses bad input) before torch
loads, in a fraction of a second.

Example:
    >>> checkpoints, deltas = open_inputs("instruct", ["sft"], "base", MergeOptions())   # doctest: +SKIP
    >>> sorted(checkpoints)                                                             # doctest: +SKIP
    ['base', 'instruct', 'tuned']
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Collection
from pathlib import Path

from graftcore.errors import GraftError, OutputError
from graftcore.lora.adapter import is_adapter, open_adapter
from graftcore.options import MergeOptions
from graftcore.plan.ops import DeltaInput, tuned_role
from graftcore.sources.checkpoint import Checkpoint
from graftcore.sources.local import open_checkpoint

Ref = str | os.PathLike


def check_call(call: str, options: dict, allowed: Collection[str], refs: dict[str, object], optional=()) -> None:
    """The checks graft(), similarity() and verify() share, before any input is opened: GraftError for an option
    `call` does not take, or a REF that is not a str or os.PathLike (None only for the roles in `optional`).

    Example:
        >>> check_call("graft", {"colour": "red"}, ["alpha"], {})
        Traceback (most recent call last):
        graftcore.errors.GraftError: graft: unknown option(s) colour (it takes alpha)
    """
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise GraftError(f"{call}: unknown option(s) {', '.join(unknown)} (it takes {', '.join(allowed)})")
    for role, ref in refs.items():
        if not isinstance(ref, (str, os.PathLike)) and not (ref is None and role in optional):
            raise GraftError(f"{role}: expected a folder, file or hub id, got {ref!r}")
        if ref is not None and not str(os.fspath(ref)).strip():
            raise GraftError(f"{role}: an empty path")


def tuned_refs(tuned, optional: bool = False) -> list[Ref]:
    """`tuned` as a list of REFs: one REF, or a non-empty list or tuple of them (None or empty: none, where
    `optional`); GraftError for anything else."""
    if tuned is None and optional:
        return []
    if isinstance(tuned, (str, os.PathLike)):
        return [tuned]
    if (
        isinstance(tuned, (list, tuple))
        and (tuned or optional)
        and all(isinstance(r, (str, os.PathLike)) for r in tuned)
    ):
        return list(tuned)
    what = "None, a REF" if optional else "a REF"
    raise GraftError(f"tuned: expected {what} or a list of REFs (folders, files, hub ids), got {tuned!r}")


def open_inputs(
    instruct: Ref, tuned: list[Ref], base: Ref | None, opts: MergeOptions
) -> tuple[dict[str, Checkpoint], list[DeltaInput]]:
    """Resolve the REFs (headers only): role -> Checkpoint (instruct, base, tuned, tuned2, ...) and the tuned inputs
    as the planner takes them, each with its alpha. GraftError when Base is needed and missing."""
    alphas = opts.alphas(len(tuned))
    hub = {"token": opts.token, "cache_dir": opts.cache_dir, "low_disk": opts.low_disk, "quiet": opts.quiet}
    adapters = [is_adapter(ref) for ref in tuned]
    if base is None and not all(adapters):
        ref = next(r for r, a in zip(tuned, adapters) if not a)
        raise GraftError(f"--base is required: the update is tuned - base ({ref} is not a PEFT adapter folder)")
    checkpoints = {"instruct": open_checkpoint(instruct, **hub)}
    if base is not None:
        checkpoints["base"] = open_checkpoint(base, **hub)
    deltas = []
    for k, (ref, alpha_k, adapter) in enumerate(zip(tuned, alphas, adapters)):
        role = tuned_role(k)
        if adapter:
            ad = open_adapter(ref)
            deltas.append(DeltaInput(role, alpha_k, ad.checkpoint, ad))
        else:
            deltas.append(DeltaInput(role, alpha_k, open_checkpoint(ref, **hub)))
        checkpoints[role] = deltas[-1].checkpoint
    return checkpoints, deltas


def check_output_outside_inputs(output: Path, checkpoints: dict[str, Checkpoint], may_contain: bool = False) -> None:
    """The output folder may not be, or lie inside, an input's folder (symlinks resolved): we would write into
    the model. Nor, unless `may_contain` (similarity's two files), contain one: a later merge would copy our
    files as the input's, and --overwrite would delete the input's."""
    out = Path(output).resolve()
    for role, ck in checkpoints.items():
        roots = [ck.root] if ck.root is not None else [p.parent for p in ck.local_files.values()]
        for root in (Path(r).resolve() for r in roots if r is not None):
            if out == root or out.is_relative_to(root) or (root.is_relative_to(out) and not may_contain):
                where = "is" if out == root else "is inside" if out.is_relative_to(root) else "contains"
                raise OutputError(f"{output}: {where} the {role} input's folder {root}; choose another --output")


def job_fingerprint(checkpoints: dict[str, Checkpoint], opts: MergeOptions) -> str:
    """Same inputs and same bit-changing options -> same fingerprint (a rerun resumes)."""
    doc = {"inputs": {r: c.fingerprint for r, c in sorted(checkpoints.items())}, "options": opts.bits_key()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
