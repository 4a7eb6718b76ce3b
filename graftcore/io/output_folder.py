"""The output folder: lock it, refuse what is not ours, resume what is, write the finishing files atomically.

While a merge runs, `graftcore.progress.json` records the job's fingerprint and every finished shard with
its size, sha256 and key (the identities of the input files it was computed from): a rerun keeps a shard only
if all three still hold, so restoring or replacing one input recomputes just the shards that read it.
Shards appear under their final names only when complete (see ShardWriter). The index, Instruct's
non-weight files and `graftcore.json` are written last, so an interrupted folder never looks like a finished
model. An exclusive lock (`.graftcore.lock`, holding the pid) keeps a second merge out while one runs.
Every OSError on this side (no space, no permission, a read-only or missing folder) becomes an OutputError
naming the path.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from graftcore.errors import GraftError, OutputError
from graftcore.io.json_files import read_json_file
from graftcore.io.safetensors_file import INDEX_NAME, fsync_dir

PROGRESS = "graftcore.progress.json"
MANIFEST = "graftcore.json"
LOCK = ".graftcore.lock"
OUR_SUFFIXES = (".safetensors", ".partial", ".safetensors.index.json")
# what a model folder holds besides weights: --overwrite removes these too, so no file of the previous model
# (a chat template, a tokenizer) is left beside the new one
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
)


@contextmanager
def output_errors(path: Path, doing: str):
    """Turn an OSError into an OutputError naming the file (exit 2: the user's to fix)."""
    try:
        yield
    except OSError as e:
        raise OutputError(f"{e.filename or path}: cannot {doing} ({e.strerror or e})") from None


def atomic_write(path: Path, data: bytes) -> None:
    """Write `path` through `path.partial` + fsync + rename, so it is never seen half-written."""
    tmp = path.with_name(path.name + ".partial")
    try:
        with output_errors(tmp, "write"):
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:  # an OSError, or Ctrl-C mid-write: no .partial left behind
        tmp.unlink(missing_ok=True)
        raise


def atomic_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".partial")
    try:
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
        except OSError as e:  # named by the file being written (copyfile's error may name the source)
            raise OutputError(f"{dst}: cannot write it as a copy of {src} ({e.strerror or e})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def config_with_dtype(text: str, dtype: str, dropped: tuple[str, ...] = ()) -> str:
    """config.json's `text` with its top-level "torch_dtype" (and "dtype" where present, as newer transformers
    writes it) set to `dtype`, and without the keys `dropped` (a quantized format's "quantization_config", for
    weights written dequantized); other keys keep their values and order. Text that is not a JSON object, or that
    already says so, comes back unchanged."""
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        return text
    if not isinstance(doc, dict):
        return text
    new = {**doc, "torch_dtype": dtype, **({"dtype": dtype} if "dtype" in doc else {})}
    for key in dropped:
        new.pop(key, None)
    if new == doc:
        return text
    return json.dumps(new, indent=2, ensure_ascii=False) + ("\n" if text.endswith("\n") else "")


def config_takes_dtype(path: Path) -> bool:
    """Whether the config.json at `path` is a JSON object, so that config_with_dtype can set its dtype."""
    try:
        return isinstance(json.loads(path.read_bytes().decode()), dict)
    except (OSError, ValueError, RecursionError):
        return False


def atomic_copy_config(src: Path, dst: Path, dtype: str, dropped: tuple[str, ...] = ()) -> None:
    """atomic_copy of a config.json whose dtype becomes `dtype` and without the keys `dropped` (a file that is not
    UTF-8 is copied as is)."""
    with output_errors(src, "read it"):
        raw = src.read_bytes()
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        return atomic_copy(src, dst)
    atomic_write(dst, config_with_dtype(text, dtype, dropped).encode())


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


class OutputFolder:
    """Owns the output folder for one job, identified by `fingerprint` (inputs + bit-changing options)."""

    def __init__(self, path: str | os.PathLike, fingerprint: str, rank: int | None = None):
        """`rank`: one process of a merge spread over several (merge/distributed.py); each keeps its own progress file,
        rank 0 alone locks, claims and finishes the folder."""
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.finished: dict[str, dict] = {}  # shard file -> {"size", "sha256", "key"}
        self.keys: dict[str, str] = {}  # shard file -> key of the inputs it is computed from
        self._lock_fd: int | None = None
        self.progress = PROGRESS if rank is None else f"graftcore.progress.rank{rank}.json"

    def join(self, shard_keys: dict[str, str]) -> None:
        """Another rank's share of a folder rank 0 has prepared: record finished shards in this rank's file."""
        self.keys = shard_keys

    def prepare(
        self, shard_sizes: dict[str, int], overwrite: bool, shard_keys: dict[str, str] | None = None
    ) -> set[str]:
        """Lock and claim the folder; return the shards already finished by an earlier run of the same job
        (same size, same key in `shard_keys`, sha256 verified).

        Refuses a non-empty folder that holds something else, unless `overwrite`, which also starts afresh
        instead of resuming and removes the previous model's files.
        """
        with output_errors(self.path, "use the output folder"):
            if self.path.exists() and not self.path.is_dir():
                raise OutputError(f"{self.path}: exists and is not a folder")
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock()
        try:
            return self._claim(shard_sizes, overwrite, shard_keys)
        except BaseException:
            (self.path / LOCK).unlink(missing_ok=True)  # refused: leave the folder as it was (we hold the lock)
            self.release()
            raise

    def _claim(self, shard_sizes: dict[str, int], overwrite: bool, shard_keys: dict[str, str] | None) -> set[str]:
        with output_errors(self.path, "use the output folder"):
            self.keys = shard_keys or {}
            earlier = None if overwrite else self._earlier_record()
            if earlier is not None:
                for file, rec in earlier.items():
                    if (
                        file in shard_sizes
                        and rec.get("size") == shard_sizes[file]
                        and rec.get("key") == self.keys.get(file)
                        and self._verify(file, rec)
                    ):
                        self.finished[file] = rec
            elif any(p.name != LOCK for p in self.path.iterdir()):
                if not overwrite:
                    raise self._occupied()
                self._remove_previous_model()
            for p in self.path.glob("*.partial"):
                p.unlink()
            self._save_progress()
        return set(self.finished)

    def check_claimable(self, overwrite: bool) -> None:
        """What prepare() would refuse, found without writing anything (a dry run)."""
        with output_errors(self.path, "use the output folder"):
            if self.path.exists() and not self.path.is_dir():
                raise OutputError(f"{self.path}: exists and is not a folder")
            if self.path.is_dir() and not overwrite and self._earlier_record() is None:
                if any(p.name != LOCK for p in self.path.iterdir()):
                    raise self._occupied()

    def _occupied(self) -> OutputError:
        return OutputError(
            f"{self.path}: folder is not empty and was not written by this same merge; "
            f"pass --overwrite to replace the model in it, or choose another --output"
        )

    def _lock(self) -> None:
        """Take `.graftcore.lock` exclusively (flock: released by the kernel when this process ends)."""
        path = self.path / LOCK
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise OutputError(
                    f"{self.path}: another graftcore merge (pid {holder}) is writing this folder; wait for it, or "
                    f"choose another --output"
                ) from None
            if os.path.exists(path) and os.path.samestat(os.fstat(fd), os.stat(path)):
                break
            os.close(fd)  # the holder removed the lock file as we opened it: take the new one
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def release(self) -> None:
        """Drop the lock (its file goes with it once the merge is finished)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _remove_previous_model(self) -> None:
        """--overwrite: remove the weights, index, model files and graftcore records at the folder's top level,
        and every file a previous graftcore.json lists; anything else (a README of the user's) stays."""
        listed: set[str] = set()
        try:
            listed = set(read_json_file(self.path / MANIFEST, "graftcore.json", OutputError).get("files", []))
        except (OSError, GraftError, AttributeError, TypeError):
            pass
        for p in self.path.iterdir():  # the top level only: subfolders are the user's unless listed
            if p.is_file() and (
                p.name.endswith(OUR_SUFFIXES) or p.name in (MANIFEST, *MODEL_FILES) or is_progress(p.name)
            ):
                p.unlink()
        root = self.path.resolve()
        for rel in listed:  # only files inside this folder (a crafted graftcore.json must not reach outside it)
            p = self.path / rel
            if (
                isinstance(rel, str)
                and not Path(rel).is_absolute()
                and p.is_file()
                and p.resolve().is_relative_to(root)
            ):
                p.unlink()

    def _earlier_record(self) -> dict | None:
        """Finished shards recorded by an earlier run of this same job (interrupted or complete)."""
        found = None
        for path in [*sorted(p for p in self.path.iterdir() if is_progress(p.name)), self.path / MANIFEST]:
            try:
                doc = read_json_file(path, "a progress record", OutputError)
            except (OSError, GraftError):
                continue
            if (
                isinstance(doc, dict)
                and doc.get("fingerprint") == self.fingerprint
                and isinstance(doc.get("shards"), dict)
            ):
                found = found or {}  # the progress files of every rank of an earlier run (of any world size)
                found.update({f: rec for f, rec in doc["shards"].items() if isinstance(rec, dict)})
        return found

    def _verify(self, file: str, rec: dict) -> bool:
        p = self.path / file
        return p.is_file() and p.stat().st_size == rec.get("size") and file_sha256(p) == rec.get("sha256")

    def _save_progress(self) -> None:
        doc = {"fingerprint": self.fingerprint, "shards": self.finished}
        atomic_write(self.path / self.progress, json.dumps(doc, indent=1).encode())

    def shard_done(
        self, file: str, size: int, sha256: str, fp8: dict | None = None, digests: list[str] | None = None
    ) -> None:
        """Record a finished shard (`fp8`: its FP8 tensors' records, kept for graftcore.json across a resume;
        `digests`: ShardWriter.prefix_digests, with which verify names the first tensor that changed)."""
        rec = {"size": size, "sha256": sha256, "key": self.keys.get(file)}
        if digests is not None:
            rec["prefix_digests"] = digests
        self.finished[file] = {**rec, "fp8": fp8} if fp8 else rec
        self._save_progress()

    def finalize(
        self,
        index: dict | None,
        extra_files: list[tuple[Path, str]],
        manifest: dict,
        dtype: str | None = None,
        dropped: tuple[str, ...] = (),
    ) -> None:
        """Copy Instruct's non-weight files, write the index and graftcore.json, drop the progress file.

        With `dtype` (the --dtype of the tensors, unless auto) config.json's "torch_dtype" says it too, and it
        loses the keys `dropped` (a quantized Instruct's quantization_config, when its weights are written
        dequantized).
        """
        for src, rel in extra_files:
            if dtype is not None and rel == "config.json":
                atomic_copy_config(src, self.path / rel, dtype, dropped)
            else:
                atomic_copy(src, self.path / rel)
        written = [*self.finished, *(rel for _, rel in extra_files)]
        if index is not None:
            atomic_write(self.path / INDEX_NAME, json.dumps(index, indent=2).encode())
            written.append(INDEX_NAME)
        manifest = {**manifest, "fingerprint": self.fingerprint, "shards": self.finished, "files": sorted(written)}
        atomic_write(self.path / MANIFEST, json.dumps(manifest, indent=2).encode())
        with output_errors(self.path, "finish the output folder"):
            for p in list(self.path.iterdir()):
                if is_progress(p.name):
                    p.unlink(missing_ok=True)
            (self.path / LOCK).unlink(missing_ok=True)  # while still held: a waiting merge then takes a new one
            fsync_dir(self.path)
        self.release()


def is_progress(name: str) -> bool:
    """graftcore.progress.json, or a rank's graftcore.progress.rankN.json."""
    return name == PROGRESS or (name.startswith("graftcore.progress.rank") and name.endswith(".json"))
