"""The output folder: refuse what is not ours, resume what is, and write the finishing files atomically.

While a merge runs, `graftcore.progress.json` records the job's fingerprint and every finished shard with
its size, sha256 and key (the identities of the input files it was computed from): a rerun keeps a shard only
if all three still hold, so restoring or replacing one input recomputes just the shards that read it. Shards appear under their final names only when complete (see ShardWriter). The
index, Instruct's non-weight files and `graftcore.json` are written last, so an interrupted folder never
looks like a finished model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from .errors import OutputError
from .safetensors_io import fsync_dir

PROGRESS = "graftcore.progress.json"
MANIFEST = "graftcore.json"
OUR_SUFFIXES = (".safetensors", ".partial", ".safetensors.index.json")


def atomic_write(path: Path, data: bytes) -> None:
    """Write `path` through `path.partial` + fsync + rename, so it is never seen half-written."""
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".partial")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


class OutputFolder:
    """Owns the output folder for one job, identified by `fingerprint` (inputs + bit-changing options)."""

    def __init__(self, path: str | os.PathLike, fingerprint: str):
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.finished: dict[str, dict] = {}  # shard file -> {"size", "sha256", "key"}
        self.keys: dict[str, str] = {}  # shard file -> key of the inputs it is computed from

    def prepare(self, shard_sizes: dict[str, int], overwrite: bool, shard_keys: dict[str, str] | None = None) -> set[str]:
        """Claim the folder; return the shards already finished by an earlier run of the same job (same size,
        same key in `shard_keys`, sha256 verified).

        Refuses a non-empty folder that holds something else, unless `overwrite`, which also starts afresh
        instead of resuming.
        """
        if self.path.exists() and not self.path.is_dir():
            raise OutputError(f"{self.path}: exists and is not a folder")
        self.path.mkdir(parents=True, exist_ok=True)
        self.keys = shard_keys or {}
        earlier = None if overwrite else self._earlier_record()
        if earlier is not None:
            for file, rec in earlier.items():
                if (
                    file in shard_sizes and rec.get("size") == shard_sizes[file]
                    and rec.get("key") == self.keys.get(file) and self._verify(file, rec)
                ):
                    self.finished[file] = rec
        elif any(self.path.iterdir()):
            if not overwrite:
                raise OutputError(
                    f"{self.path}: folder is not empty and was not written by this same merge; "
                    f"pass --overwrite to replace its weights, or choose another --output"
                )
            for p in self.path.iterdir():
                if p.is_file() and (p.name.endswith(OUR_SUFFIXES) or p.name in (PROGRESS, MANIFEST)):
                    p.unlink()
        for p in self.path.glob("*.partial"):
            p.unlink()
        self._save_progress()
        return set(self.finished)

    def _earlier_record(self) -> dict | None:
        """Finished shards recorded by an earlier run of this same job (interrupted or complete)."""
        for name in (PROGRESS, MANIFEST):
            try:
                doc = json.loads((self.path / name).read_text())
            except (OSError, ValueError):
                continue
            if isinstance(doc, dict) and doc.get("fingerprint") == self.fingerprint and isinstance(doc.get("shards"), dict):
                return doc["shards"]
        return None

    def _verify(self, file: str, rec: dict) -> bool:
        p = self.path / file
        return p.is_file() and p.stat().st_size == rec.get("size") and file_sha256(p) == rec.get("sha256")

    def _save_progress(self) -> None:
        doc = {"fingerprint": self.fingerprint, "shards": self.finished}
        atomic_write(self.path / PROGRESS, json.dumps(doc, indent=1).encode())

    def shard_done(self, file: str, size: int, sha256: str) -> None:
        self.finished[file] = {"size": size, "sha256": sha256, "key": self.keys.get(file)}
        self._save_progress()

    def finalize(self, index: dict | None, extra_files: list[tuple[Path, str]], manifest: dict) -> None:
        """Copy Instruct's non-weight files, write the index and graftcore.json, drop the progress file."""
        for src, rel in extra_files:
            atomic_copy(src, self.path / rel)
        if index is not None:
            atomic_write(self.path / "model.safetensors.index.json", json.dumps(index, indent=2).encode())
        manifest = {**manifest, "fingerprint": self.fingerprint, "shards": self.finished}
        atomic_write(self.path / MANIFEST, json.dumps(manifest, indent=2).encode())
        (self.path / PROGRESS).unlink(missing_ok=True)
        fsync_dir(self.path)
