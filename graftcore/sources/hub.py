"""Hub inputs: `org/name[@revision]` -> a Checkpoint that is fully planned before any weight byte is fetched.

    open_hub_checkpoint   resolve the revision to a commit, list the repo's files with their sizes, download
                          the small files (index, config, tokenizer...), and read every shard's safetensors
                          header with two range requests: TensorInfo offsets are then exactly a local file's.
    schedule(order)       the engine will open the shards in this order: one background thread per input
                          downloads them in it, ahead of the merge (into the hub cache; with --low-disk into a
                          private folder inside the output, at most LOW_DISK_HELD shards per input at a time
                          unless one output shard needs more of them at once).
    shard_path(file)      waits for that shard; release(file) deletes a --low-disk shard after its last use.

Everything goes through huggingface_hub (token, HF_ENDPOINT, HF_HUB_OFFLINE, the cache layout, retries that
resume a cut transfer); its exceptions become one-line DownloadError/CheckpointError naming repo@revision.
Why not `get_safetensors_metadata`: it returns parsed headers without their length, so the absolute offsets
(8 + header length + data_offsets) are lost, and it reads the first 100 KB of every shard (tensor bytes).
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import struct
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx2  # huggingface_hub's own HTTP library: only its transport errors are caught here
from huggingface_hub import HfApi, constants, hf_hub_download, hf_hub_url, snapshot_download, try_to_load_from_cache
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    RevisionResolutionError,
)
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status
from huggingface_hub.utils import tqdm as hf_tqdm

from graftcore.errors import CheckpointError, DownloadError, GraftError
from graftcore.io.safetensors_file import (
    INDEX_NAME,
    MAX_HEADER_BYTES,
    SINGLE_NAME,
    ShardHeader,
    parse_header,
    read_header,
)
from graftcore.sources.checkpoint import (
    PICKLE_SUFFIXES,
    Checkpoint,
    check_index,
    collect_tensors,
    is_extra_file,
    pickled_only,
    read_index,
)

LOW_DISK_HELD = 2  # --low-disk: shards of one input on disk at once (the one being merged + the next)
HEADER_THREADS = 8  # concurrent header range requests (each is two small GETs)


@contextmanager
def hub_errors(where: str, file: str | None = None):
    """Turn huggingface_hub's exceptions into one-line GraftErrors naming `where` (repo@revision) and `file`."""
    what = f"{where}: {file}" if file else where
    try:
        yield
    except GraftError:
        raise
    except GatedRepoError as e:
        raise DownloadError(
            f"{where}: gated repo, and this token has no access (HTTP {status(e)}); request access on its page at "
            f"{constants.ENDPOINT}/{where.split('@')[0]}, then pass --token or set HF_TOKEN"
        ) from None
    except RepositoryNotFoundError as e:
        raise DownloadError(
            f"{where}: no such repo at {constants.ENDPOINT}, or it is private and needs a token with access "
            f"(HTTP {status(e)}); check the name, or pass --token / set HF_TOKEN"
        ) from None
    except RevisionNotFoundError as e:
        raise DownloadError(
            f"{where}: the repo has no such revision (branch, tag or commit) (HTTP {status(e)})"
        ) from None
    except HfHubHTTPError as e:
        if isinstance(e, EntryNotFoundError):
            raise DownloadError(f"{what}: no such file in the repo (HTTP {status(e)})") from None
        raise DownloadError(f"{what}: HTTP {status(e)} from {constants.ENDPOINT} ({first_line(e)})") from None
    except (OfflineModeIsEnabled, LocalEntryNotFoundError, RevisionResolutionError) as e:
        if constants.is_offline_mode():
            raise DownloadError(
                f"{what}: not in the hub cache, and HF_HUB_OFFLINE is set (so nothing is downloaded)"
            ) from None
        raise DownloadError(
            f"{what}: cannot reach {constants.ENDPOINT} and not in the hub cache ({first_line(e)})"
        ) from None
    except httpx2.TransportError as e:
        raise DownloadError(
            f"{what}: cannot reach {constants.ENDPOINT} ({type(e).__name__}: {first_line(e)})"
        ) from None
    except OSError as e:
        raise DownloadError(f"{what}: {e.strerror or first_line(e)}") from None


def status(e: HfHubHTTPError) -> str:
    return str(e.response.status_code) if getattr(e, "response", None) is not None else "?"


def first_line(e: BaseException) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


class Cancelled(Exception):
    """Raised from a download's progress callback to stop it (interpreter exit): huggingface_hub then deletes
    its temporary file."""


def progress_class(quiet: bool, cancelled: threading.Event | None = None):
    """A tqdm class for huggingface_hub's per-file byte bars: silent with --quiet, and a way to cancel."""

    class Bar(hf_tqdm):
        def __init__(self, *args, **kwargs):
            if quiet:
                kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            if cancelled is not None and cancelled.is_set():
                raise Cancelled("download cancelled")
            return super().update(n)

    return Bar


@dataclass
class HubRepo:
    """One repo at one commit, and how to reach it (token, cache)."""

    repo: str
    requested: str  # the revision as the user wrote it
    commit: str
    token: str | None
    cache_dir: str | None
    quiet: bool

    @property
    def where(self) -> str:
        return f"{self.repo}@{self.requested}"

    def cached(self, file: str) -> Path | None:
        p = try_to_load_from_cache(self.repo, file, cache_dir=self.cache_dir, revision=self.commit)
        return Path(p) if isinstance(p, str) else None

    def download(self, file: str, local_dir: Path | None = None, cancelled: threading.Event | None = None) -> Path:
        """`file` at the commit: into the hub cache (reused if already there), or into `local_dir`."""
        with hub_errors(self.where, file):
            return Path(
                hf_hub_download(
                    self.repo,
                    file,
                    revision=self.commit,
                    cache_dir=self.cache_dir,
                    local_dir=local_dir,
                    token=self.token,
                    tqdm_class=progress_class(self.quiet, cancelled),
                )
            )

    def header(self, file: str, size: int) -> ShardHeader:
        """The validated safetensors header of shard `file` (`size` bytes): read from the cache when the shard
        is there, else with two range requests (the 8-byte length, then exactly the JSON)."""
        shown = Path(f"{self.where}/{file}")
        local = self.cached(file)
        if local is not None:
            h = read_header(local, file)
            if local.stat().st_size != size:
                raise CheckpointError(f"{local}: cached {shown} is {local.stat().st_size} bytes, the hub says {size}")
            return h
        if size < 8:
            raise CheckpointError(f"{shown}: file is {size} bytes, too short for a safetensors header")
        url = hf_hub_url(self.repo, file, revision=self.commit)
        (n,) = struct.unpack("<Q", self.read_range(url, file, 0, 8))
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(f"{shown}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
        if 8 + n > size:
            raise CheckpointError(f"{shown}: header length {n} runs past the end of the {size}-byte file")
        return parse_header(self.read_range(url, file, 8, 8 + n), size, shown, file)

    def read_range(self, url: str, file: str, start: int, stop: int) -> bytes:
        """Bytes [start, stop) of the file at `url`; never reads more, even from a server that ignores Range."""
        headers = {**build_hf_headers(token=self.token), "Range": f"bytes={start}-{stop - 1}"}
        data = bytearray()
        with hub_errors(self.where, file):
            with get_session().stream("GET", url, headers=headers, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as r:
                hf_raise_for_status(r)
                skip = start if r.status_code == 200 else 0  # Range ignored: the body starts at byte 0
                for chunk in r.iter_bytes():
                    data += chunk
                    if len(data) >= skip + stop - start:
                        break
        data = data[skip : skip + stop - start]
        if len(data) != stop - start:
            raise DownloadError(f"{self.where}: {file}: got {len(data)} bytes for range {start}-{stop - 1}")
        return bytes(data)


def open_hub_checkpoint(
    ref: str, *, token: str | None = None, cache_dir: str | None = None, low_disk: bool = False, quiet: bool = False
) -> HubCheckpoint:
    """Resolve `org/name[@revision]` and read everything but tensor data: a Checkpoint ready to plan.

    Example:
        >>> ck = open_hub_checkpoint("meta-llama/Llama-3.1-8B-Instruct")   # doctest: +SKIP
        >>> ck.revision, ck.tensors["lm_head.weight"].shape                 # doctest: +SKIP
        ('0e9e39f2...', (128256, 4096))
    """
    repo, _, requested = ref.partition("@")
    requested = requested or constants.DEFAULT_REVISION
    cache_dir = str(Path(cache_dir).expanduser()) if cache_dir else None
    where = f"{repo}@{requested}"
    with hub_errors(where):
        if constants.is_offline_mode():  # the cached snapshot is all there is
            snapshot = Path(snapshot_download(repo, revision=requested, cache_dir=cache_dir, local_files_only=True))
            commit = snapshot.name
            sizes = {
                str((Path(d) / f).relative_to(snapshot)): (Path(d) / f).stat().st_size
                for d, _, files in os.walk(snapshot)
                for f in files
            }
        else:
            api = HfApi(token=token)
            # a str whose value is still `requested`: the commit is its `.resolved`
            commit = api.resolve_revision(repo, revision=requested, cache_dir=cache_dir, token=token).resolved
            info = api.model_info(repo, revision=commit, files_metadata=True, token=token)
            sizes = {s.rfilename: s.lfs.size if s.lfs else s.size for s in info.siblings or []}
    hub = HubRepo(repo, requested, commit, token, cache_dir, quiet)
    files, weight_map = weight_files(hub, sizes)
    with ThreadPoolExecutor(HEADER_THREADS) as pool:
        headers = list(pool.map(lambda f: hub.header(f, sizes[f]), files))
        extras = [f for f in sorted(sizes) if is_extra_file(f)]
        extra_paths = dict(zip(extras, pool.map(hub.download, extras)))
    if weight_map is not None:
        check_index(f"{where}/{INDEX_NAME}", weight_map, files, headers)
    fingerprint = hashlib.sha256(f"{repo}@{commit}".encode())
    for f, h in zip(files, headers):
        fingerprint.update(f"|{f}|{sizes[f]}|".encode() + h.header_bytes)
    return HubCheckpoint(
        ref=ref,
        root=Path(cache_dir or constants.HF_HUB_CACHE)
        / repo_folder_name(repo_id=repo, repo_type="model")
        / "snapshots"
        / commit,
        tensors=collect_tensors(headers),
        shard_files=files,
        shard_metadata={f: h.metadata for f, h in zip(files, headers)},
        has_index=weight_map is not None,
        fingerprint=fingerprint.hexdigest(),
        revision=commit,
        hub=hub,
        sizes={f: sizes[f] for f in files},
        headers={f: h.header_bytes for f, h in zip(files, headers)},
        extras=extra_paths,
        low_disk=low_disk,
    )


def weight_files(hub: HubRepo, sizes: dict[str, int]) -> tuple[list[str], dict[str, str] | None]:
    """The shard files in order (and the index's weight map), chosen as for a local folder."""
    if INDEX_NAME in sizes:
        index = f"{hub.where}/{INDEX_NAME}"
        weight_map = read_index(index, hub.download(INDEX_NAME).read_text())
        files = list(dict.fromkeys(weight_map.values()))
        for f in files:
            if f not in sizes:
                some = next(n for n, v in weight_map.items() if v == f)
                raise CheckpointError(f"{index}: tensor {some!r} is mapped to {f}, which the repo does not have")
        return files, weight_map
    if SINGLE_NAME in sizes:
        return [SINGLE_NAME], None
    shards = sorted(f for f in sizes if "/" not in f and f.endswith(".safetensors"))
    if shards:
        return shards, None
    pickles = sorted(f for f in sizes if f.endswith(PICKLE_SUFFIXES))
    if pickles:
        load_args = f"'{hub.repo}', revision='{hub.requested}'"
        raise CheckpointError(pickled_only(hub.where, pickles, load_args, "local-safetensors"))
    raise CheckpointError(f"{hub.where}: no .safetensors weights and no {INDEX_NAME} in the repo")


@dataclass(eq=False)
class HubCheckpoint(Checkpoint):
    """A Checkpoint whose shards are downloaded when the engine needs them (see the module docstring)."""

    hub: HubRepo | None = None
    sizes: dict[str, int] = field(default_factory=dict)  # shard -> bytes
    headers: dict[str, bytes] = field(default_factory=dict)  # shard -> header JSON the plan was built from
    extras: dict[str, Path] = field(default_factory=dict)  # non-weight file -> local path
    low_disk: bool = False
    downloads: Downloads | None = None

    def schedule(self, files: list[str], scratch: Path) -> None:
        meter = DiskMeter.for_folder(scratch.parent) if self.low_disk else None
        self.downloads = Downloads(self, files, scratch if self.low_disk else None, meter)

    def shard_path(self, file: str) -> Path:
        if self.downloads is None:  # used without the engine's schedule: plain downloads into the cache
            self.downloads = Downloads(self, [], None, None)
        return self.downloads.path(file)

    def present(self, file: str) -> Path | None:
        """The cached copy of shard `file` when it is already in the hub cache (else None: not downloaded yet)."""
        return self.hub.cached(file) if self.hub is not None else None

    def verify_unchanged(self, file: str) -> None:
        """Nothing to do: hub shards are content-addressed downloads, checked against the planned header when
        fetched (and a --low-disk shard may already be deleted after its last use)."""

    def ready(self, file: str) -> bool:
        return self.downloads is not None and self.downloads.finished(file)

    def release(self, file: str) -> None:
        if self.downloads is not None:
            self.downloads.release(file)

    def extra_files(self) -> list[str]:
        return list(self.extras)

    def extra_file_path(self, name: str) -> Path:
        return self.extras[name]

    def report_notes(self) -> list[str]:
        meter = self.downloads.meter if self.downloads is not None else None
        return [meter.note()] if meter is not None else []

    def fetch(self, file: str, local_dir: Path | None, cancelled: threading.Event) -> Path:
        """Download shard `file` and check it is the file the plan was made from (size and header bytes)."""
        path = self.hub.download(file, local_dir, cancelled)
        h = read_header(path, file)
        if path.stat().st_size != self.sizes[file] or h.header_bytes != self.headers[file]:
            raise DownloadError(
                f"{self.hub.where}: {file}: the downloaded file ({path}) differs from the one planned with; delete "
                "it and rerun"
            )
        return path


class DiskMeter:
    """Bytes of --low-disk input shards on disk, shared by the inputs of one merge (one output folder).

    A shard counts from the moment its download starts (at its full size: an upper bound) until it is deleted.
    """

    _by_folder: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
    _lock = threading.Lock()

    def __init__(self):
        self.lock = threading.Lock()
        self.now = self.peak = self.total = self.files = 0

    @classmethod
    def for_folder(cls, folder: Path) -> DiskMeter:
        with cls._lock:
            key = str(folder.resolve())
            meter = cls._by_folder.get(key)
            if meter is None:
                meter = cls._by_folder[key] = cls()
            return meter

    def add(self, n: int) -> None:
        with self.lock:
            self.now += n
            self.peak = max(self.peak, self.now)
            if n > 0:
                self.total += n
                self.files += 1

    def note(self) -> str:
        return (
            f"--low-disk: hub input shards took at most {self.peak} bytes ({self.peak / 1e9:.2f} GB) of disk at once; "
            f"{self.files} shard(s), {self.total / 1e9:.2f} GB, were downloaded and deleted after their last use"
        )


_ACTIVE: weakref.WeakSet = weakref.WeakSet()


class Downloads:
    """Downloads one checkpoint's shards on a background thread in `order` (the engine's), ahead of its requests.

    With `scratch` (--low-disk) shards not already in the hub cache go into that folder, at most LOW_DISK_HELD at
    a time unless the engine itself waits for one, and each is deleted when released. Errors are raised to
    the engine when it asks for the shard that failed.
    """

    def __init__(self, ck: HubCheckpoint, order: list[str], scratch: Path | None, meter: DiskMeter | None):
        self.ck, self.order, self.scratch, self.meter = ck, list(order), scratch, meter
        self.cv = threading.Condition()
        self.started: set[str] = set()
        self.done: dict[str, Path | BaseException] = {}
        self.held: set[str] = set()  # in `scratch`: downloading or downloaded, not yet deleted
        self.released: set[str] = set()
        self.wanted: str | None = None  # a shard the engine waits for
        self.cancelled = threading.Event()
        self.thread: threading.Thread | None = None
        _ACTIVE.add(self)
        with self.cv:
            self._wake()

    def _wake(self) -> None:
        """Start the worker if it has exited (called with `cv` held)."""
        if self.thread is None and not self.cancelled.is_set():
            self.thread = threading.Thread(target=self._run, name=f"graftcore-download {self.ck.hub.repo}", daemon=True)
            self.thread.start()
        self.cv.notify_all()

    def _pick(self) -> tuple[str | None, bool]:
        """(the next shard to download or None, whether any is left to download)."""
        if self.wanted is not None and self.wanted not in self.started:
            return self.wanted, True
        left = [f for f in self.order if f not in self.started and f not in self.released]
        if not left:
            return None, False
        if self.scratch is not None and len(self.held) >= LOW_DISK_HELD:
            return None, True
        return left[0], True

    def _run(self) -> None:
        while True:
            with self.cv:
                while True:
                    file, left = (None, False) if self.cancelled.is_set() else self._pick()
                    if file is not None:
                        break
                    if not left:
                        self.thread = None
                        return
                    self.cv.wait()
                self.started.add(file)
                own = self.scratch is not None and self.ck.hub.cached(file) is None  # cached: costs no disk
                if own:
                    self.held.add(file)
                    self.meter.add(self.ck.sizes[file])
            try:
                result: Path | BaseException = self.ck.fetch(file, self.scratch if own else None, self.cancelled)
            except BaseException as e:  # handed to the engine when it asks for this shard
                result = e
            with self.cv:
                self.done[file] = result
                if own and (isinstance(result, BaseException) or file in self.released):
                    self._delete(file)
                self.cv.notify_all()

    def path(self, file: str) -> Path:
        with self.cv:
            if file not in self.started:
                self.wanted = file
                self._wake()
            while file not in self.done:
                self.cv.wait()
            result = self.done[file]
        if isinstance(result, BaseException):
            raise result
        return result

    def finished(self, file: str) -> bool:
        """Whether `file` is downloaded (path() would not wait)."""
        with self.cv:
            return file in self.done

    def release(self, file: str) -> None:
        with self.cv:
            self.released.add(file)
            if file in self.held and file in self.done:
                self._delete(file)
            if self.scratch is not None and not self.held and all(f in self.released for f in self.order):
                shutil.rmtree(self.scratch, ignore_errors=True)
                try:
                    self.scratch.parent.rmdir()  # the shared downloads folder, once every input is done
                except OSError:
                    pass
            self.cv.notify_all()

    def _delete(self, file: str) -> None:
        """Delete a --low-disk shard (called with `cv` held)."""
        (self.scratch / file).unlink(missing_ok=True)
        self.held.discard(file)
        self.meter.add(-self.ck.sizes[file])

    def cancel(self, timeout: float) -> None:
        self.cancelled.set()
        with self.cv:
            self.cv.notify_all()
            thread = self.thread
        if thread is not None:
            thread.join(timeout)


@atexit.register
def _cancel_downloads() -> None:
    """At exit (a finished merge, an error or Ctrl-C) stop background downloads at their next chunk, so that
    huggingface_hub removes their temporary files instead of leaving them half-written."""
    for d in list(_ACTIVE):
        d.cancel(timeout=10)
