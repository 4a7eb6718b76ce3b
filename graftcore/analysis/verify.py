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

import os
import re
import time
from pathlib import Path

from graftcore import interrupts
from graftcore.codecs import companion_suffixes
from graftcore.errors import GraftError, VerifyError
from graftcore.io.json_files import read_json_file
from graftcore.io.output_folder import MANIFEST
from graftcore.io.safetensors_file import INDEX_NAME, PrefixHasher, read_header
from graftcore.plan.inputs import check_call
from graftcore.plan.ops import entries_digest, headers_entries
from graftcore.plan.report import VerifyReport

SCALE_SUFFIXES = companion_suffixes()  # a quantized weight's companions (scales)


def verify(output: str | os.PathLike, recompute: int = 0, seed: int | None = None, **hub_options) -> VerifyReport:
    """Check the graftcore output folder `output` (see the module docstring); VerifyError at the first discrepancy.

    Args:
        output: a folder written by `graftcore merge` / `graftcore.graft`.
        recompute: how many random chunks to compute again from the recorded inputs (0: files only; at most the
            chunks there are); the first and last chunk of every shard are recomputed too whenever recompute > 0.
        seed: for the choice of chunks (default: a fresh one, printed in the summary's notes).
        **hub_options: token, cache_dir, quiet for hub inputs.

    Example:
        >>> graftcore.verify("out").shards                                         # doctest: +SKIP
        2
    """
    t0 = time.perf_counter()
    if not isinstance(output, (str, os.PathLike)) or isinstance(output, bytes):
        raise GraftError(f"verify: output must be a folder path (str or os.PathLike), got {output!r}")
    if not is_whole(recompute) or recompute < 0:
        raise GraftError(f"--recompute: expected a whole number >= 0, got {recompute!r}")
    if seed is not None and not is_whole(seed):
        raise GraftError(f"--seed: expected a whole number, got {seed!r}")
    check_call("verify", hub_options, ("token", "cache_dir", "quiet"), {})
    folder = Path(output)
    manifest = read_manifest(folder)
    report = VerifyReport(folder)
    headers = check_shards(folder, manifest, report)
    check_index(folder, manifest, headers)
    if manifest["plan"]["sha256"] != entries_digest(headers_entries(headers)):
        raise VerifyError(f"{folder / MANIFEST}: the shards' tensors (names, dtypes, shapes) are not the planned ones")
    report.tensors = sum(len(h.tensors) for h in headers.values())
    stored = {n for h in headers.values() for n in h.tensors}
    report.scales = sum(1 for n in stored if n.endswith(SCALE_SUFFIXES) and n.rsplit(".", 1)[0] + ".weight" in stored)
    if manifest["plan"]["tensors"] != report.tensors:
        raise VerifyError(
            f"{folder / MANIFEST}: plan.tensors is {manifest['plan']['tensors']}, the shards hold {report.tensors}"
        )
    if recompute > 0:
        recompute_chunks = interrupts.import_deferred(".analysis.recompute").recompute_chunks  # torch: only for this
        recompute_chunks(folder, manifest, headers, recompute, seed, report, hub_options)
    report.seconds = time.perf_counter() - t0
    return report


def is_whole(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_manifest(folder: Path) -> dict:
    """graftcore.json of `folder`, checked as strictly as a header (check_manifest)."""
    path = folder / MANIFEST
    try:
        doc = read_json_file(path, "graftcore.json", VerifyError)
    except FileNotFoundError:
        raise VerifyError(
            f"{path}: missing; {folder} is not a finished graftcore output (or it was interrupted)"
        ) from None
    check_manifest(doc, path)
    return doc


def check_manifest(doc, path: Path) -> None:
    """Every field verify reads has the type and form graftcore writes; VerifyError naming the field otherwise."""

    def bad(what: str):
        raise VerifyError(f"{path}: {what}; not a graftcore output (or it was edited)")

    if not isinstance(doc, dict):
        bad("not a JSON object")
    shards = doc.get("shards")
    if not isinstance(shards, dict) or not shards:
        bad("lists no shards")
    for file, rec in shards.items():
        if not inside_name(file):
            bad(f"shard name {file!r} is not a file name inside the folder")
        if (
            not isinstance(rec, dict)
            or not is_whole(rec.get("size"))
            or rec["size"] < 0
            or not is_sha256(rec.get("sha256"))
        ):
            bad(f"shards[{file!r}] is not {{size, sha256}}")
        digests = rec.get("prefix_digests", [])
        if not isinstance(digests, list) or not all(isinstance(d, str) for d in digests):
            bad(f"shards[{file!r}].prefix_digests is not a list of digests")
    files = doc.get("files")
    if not isinstance(files, list) or not all(inside_name(f) for f in files):
        bad("files is not a list of file names inside the folder")
    plan = doc.get("plan")
    if not isinstance(plan, dict) or not is_sha256(plan.get("sha256")):
        bad("has no plan digest (plan.sha256): the shards' tensors cannot be checked against the plan")
    if not is_whole(plan.get("tensors")) or plan["tensors"] < 0:
        bad("plan.tensors is not a count")
    if not is_sha256(doc.get("fingerprint")):
        bad("has no job fingerprint (a sha256 of the inputs and options)")
    counts = doc.get("counts")
    if not isinstance(counts, dict) or not all(is_whole(v) and v >= 0 for v in counts.values()):
        bad("counts is not an object of tensor counts")
    if not isinstance(doc.get("options"), dict):
        bad("options is not an object")
    if "device" in doc and not isinstance(doc["device"], str):
        bad("device is not a string")
    inputs = doc.get("inputs")
    if not isinstance(inputs, dict) or "instruct" not in inputs or not any(r.startswith("tuned") for r in inputs):
        bad("inputs does not record instruct and tuned")
    for role, rec in inputs.items():
        if not INPUT_ROLE.fullmatch(role):
            bad(f"inputs names an unknown role {role!r}")
        if (
            not isinstance(rec, dict)
            or not isinstance(rec.get("ref"), str)
            or not isinstance(rec.get("fingerprint"), str)
        ):
            bad(f"inputs.{role} is not {{ref, fingerprint, ...}}")
        if not isinstance(rec.get("revision"), (str, type(None))) or not isinstance(rec.get("path", ""), str):
            bad(f"inputs.{role}: revision or path is not a string")
        states = rec.get("file_states", {})
        if not isinstance(states, dict) or not all(isinstance(v, str) for v in states.values()):
            bad(f"inputs.{role}.file_states is not an object of file identities (file name -> string)")


INPUT_ROLE = re.compile(r"instruct|base|tuned|tuned[1-9][0-9]{0,5}")


def inside_name(name) -> bool:
    """A relative path that stays inside the folder (what graftcore writes: a shard or file name)."""
    if not isinstance(name, str) or not name or "\0" in name or name.startswith("/"):
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


def is_sha256(x) -> bool:
    return isinstance(x, str) and len(x) == 64 and all(c in "0123456789abcdef" for c in x)


def check_shards(folder: Path, manifest: dict, report: VerifyReport) -> dict:
    """Every recorded shard: present, its size and sha256 as recorded, its header valid. Returns name -> header."""
    headers = {}
    for file, rec in sorted(manifest["shards"].items()):
        path = folder / file
        try:
            if not path.exists():
                raise VerifyError(f"{path}: missing (graftcore.json lists it)")
            if not path.is_file():
                raise VerifyError(f"{path}: not a regular file (graftcore.json lists it as a shard)")
            size = path.stat().st_size
            if size != rec["size"]:
                raise VerifyError(
                    f"{path}: {size} bytes, graftcore.json records {rec['size']} (truncated or rewritten)"
                )
            try:
                header = read_header(path)
            except GraftError as e:
                raise VerifyError(f"{path}: bad header: {e}") from None
            check_bytes(path, header, rec)
            headers[file] = header
        except OSError as e:
            raise VerifyError(f"{path}: cannot read ({e.strerror or e})") from None
        report.shards += 1
        report.bytes_hashed += size
    for rel in manifest["files"]:
        if not (folder / rel).is_file():
            raise VerifyError(f"{folder / rel}: missing (graftcore.json lists it)")
    return headers


def check_bytes(path: Path, header, rec: dict) -> None:
    """The shard's sha256 is graftcore.json's; where it is not, the first tensor whose bytes differ is named, from
    the digests recorded at the end of the header and of each tensor (ShardWriter.prefix_digests)."""
    tensors = sorted(header.tensors.values(), key=lambda t: t.start)
    hasher = PrefixHasher([header.data_start, *(t.end for t in tensors)])
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            hasher.update(block)
    if hasher.hexdigest() == rec["sha256"]:
        return
    recorded = rec.get("prefix_digests")
    if isinstance(recorded, list) and len(recorded) == len(hasher.digests):
        for k, (got, want) in enumerate(zip(hasher.digests, recorded)):
            if got != want:
                where = "its header" if k == 0 else f"tensor {tensors[k - 1].name!r}"
                raise VerifyError(
                    f"{path}: {where}: its bytes changed after the merge (sha256 differs from graftcore.json)"
                )
    raise VerifyError(f"{path}: sha256 differs from graftcore.json (the file changed after the merge)")


def check_index(folder: Path, manifest: dict, headers: dict) -> None:
    """The index (when the output has one) maps exactly the tensors the shards hold, each to its shard."""
    held = {name: file for file, h in headers.items() for name in h.tensors}
    index = folder / INDEX_NAME
    if not index.exists():
        if len(headers) > 1:
            raise VerifyError(f"{index}: missing, and the output has {len(headers)} shards")
        return
    doc = read_json_file(index, "the index", VerifyError)
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict):
        raise VerifyError(f"{index}: weight_map is not an object")
    for name, file in weight_map.items():
        if held.get(name) != file:
            where = f"in {held[name]}" if name in held else "in no shard"
            raise VerifyError(f"{index}: maps tensor {name!r} to {file}, but it is {where}")
    missing = [n for n in held if n not in weight_map]
    if missing:
        raise VerifyError(f"{index}: does not list tensor {missing[0]!r} ({held[missing[0]]}) ({len(missing)} missing)")
