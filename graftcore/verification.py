"""`graftcore verify OUT`: is this folder what graftcore wrote, and (with --recompute) what it would write again?

    every shard:  size and sha256 as graftcore.json records them; header valid (the strict parser)
    the index:    names exactly the tensors the shards hold, each in the shard that holds it
    the plan:     the (shard, tensor, dtype, shape) list hashes to graftcore.json's `plan` digest
    --recompute K: the recorded inputs re-opened (hub inputs pinned to their recorded commits), the plan rebuilt
                  from them and the recorded options (the same tensors, dtypes, shapes, shard for shard), and
                  K random chunks plus the first and last chunk of every shard computed again and compared,
                  bit for bit (LoRA blocks merged on a GPU: within one ulp, the GEMM's order being the device's):
                  recompute.py, which alone imports torch

The first discrepancy is a VerifyError naming the file (and tensor): exit 2.

Example:
    >>> report = graftcore.verify("Llama-3.1-8B-Instruct-shadow", recompute=16)   # doctest: +SKIP
    >>> print(report.summary())                                                  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import interrupts
from .errors import GraftError, VerifyError
from .output import MANIFEST, file_sha256
from .plan import entries_digest
from .safetensors_io import read_header

INDEX = "model.safetensors.index.json"


@dataclass
class VerifyReport:
    """What `verify` checked (it raises VerifyError at the first discrepancy)."""

    output: Path
    shards: int = 0
    tensors: int = 0
    bytes_hashed: int = 0
    chunks_recomputed: int = 0
    within_ulp: int = 0  # of them, LoRA blocks merged on a GPU compared within one ulp
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        what = f"{self.shards} shard(s), {self.tensors} tensors, {self.bytes_hashed / 1e9:.2f} GB: sha256, headers, index and plan hold"
        if self.chunks_recomputed:
            exact = self.chunks_recomputed - self.within_ulp
            what += f"; {self.chunks_recomputed} chunk(s) recomputed from the inputs: {exact} bit-exact"
            what += f", {self.within_ulp} LoRA block(s) within one ulp" if self.within_ulp else ""
        return f"{self.output}: verified: {what} ({self.seconds:.1f} s)"


def verify(output: str | os.PathLike, recompute: int = 0, seed: int | None = None, **hub_options) -> VerifyReport:
    """Check the graftcore output folder `output` (see the module docstring); VerifyError at the first discrepancy.

    Args:
        output: a folder written by `graftcore merge` / `graftcore.graft`.
        recompute: how many random chunks to compute again from the recorded inputs (0: files only); the first
            and last chunk of every shard are recomputed too whenever recompute > 0.
        seed: for the choice of chunks (default: a fresh one, printed in the summary's notes).
        **hub_options: token, cache_dir, quiet for hub inputs.

    Example:
        >>> graftcore.verify("out").shards                                         # doctest: +SKIP
        2
    """
    t0 = time.perf_counter()
    folder = Path(output)
    manifest = read_manifest(folder)
    report = VerifyReport(folder)
    headers = check_shards(folder, manifest, report)
    check_index(folder, manifest, headers)
    digest = (manifest.get("plan") or {}).get("sha256")
    if digest is not None and digest != entries_digest(headers_entries(headers)):
        raise VerifyError(f"{folder / MANIFEST}: the shards' tensors (names, dtypes, shapes) are not the planned ones")
    report.tensors = sum(len(h.tensors) for h in headers.values())
    if recompute > 0:
        recompute_chunks = interrupts.import_deferred(".recompute").recompute_chunks  # torch: only for this
        recompute_chunks(folder, manifest, headers, recompute, seed, report, hub_options)
    report.seconds = time.perf_counter() - t0
    return report


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise VerifyError(f"{path}: missing; {folder} is not a finished graftcore output (or it was interrupted)") from None
    except (OSError, ValueError) as e:
        raise VerifyError(f"{path}: unreadable ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("shards"), dict) or not doc["shards"]:
        raise VerifyError(f"{path}: lists no shards; not a graftcore output")
    return doc


def check_shards(folder: Path, manifest: dict, report: VerifyReport) -> dict:
    """Every recorded shard: present, its size and sha256 as recorded, its header valid. Returns name -> header."""
    headers = {}
    for file, rec in sorted(manifest["shards"].items()):
        path = folder / file
        if not path.is_file():
            raise VerifyError(f"{path}: missing (graftcore.json lists it)")
        size = path.stat().st_size
        if size != rec.get("size"):
            raise VerifyError(f"{path}: {size} bytes, graftcore.json records {rec.get('size')} (truncated or rewritten)")
        if file_sha256(path) != rec.get("sha256"):
            raise VerifyError(f"{path}: sha256 differs from graftcore.json (the file changed after the merge)")
        try:
            headers[file] = read_header(path)
        except GraftError as e:
            raise VerifyError(f"{path}: bad header: {e}") from None
        report.shards += 1
        report.bytes_hashed += size
    for rel in manifest.get("files", []):
        if isinstance(rel, str) and not (folder / rel).is_file():
            raise VerifyError(f"{folder / rel}: missing (graftcore.json lists it)")
    return headers


def check_index(folder: Path, manifest: dict, headers: dict) -> None:
    """The index (when the output has one) maps exactly the tensors the shards hold, each to its shard."""
    held = {name: file for file, h in headers.items() for name in h.tensors}
    index = folder / INDEX
    if not index.exists():
        if len(headers) > 1:
            raise VerifyError(f"{index}: missing, and the output has {len(headers)} shards")
        return
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise VerifyError(f"{index}: unreadable ({e})") from None
    if not isinstance(weight_map, dict):
        raise VerifyError(f"{index}: weight_map is not an object")
    for name, file in weight_map.items():
        if held.get(name) != file:
            where = f"in {held[name]}" if name in held else "in no shard"
            raise VerifyError(f"{index}: maps tensor {name!r} to {file}, but it is {where}")
    missing = [n for n in held if n not in weight_map]
    if missing:
        raise VerifyError(f"{index}: does not list tensor {missing[0]!r} ({held[missing[0]]}) ({len(missing)} missing)")


def headers_entries(headers: dict) -> list:
    return [[file, name, info.dtype, list(info.shape)] for file, h in headers.items() for name, info in h.tensors.items()]
