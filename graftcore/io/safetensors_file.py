"""Reading and writing safetensors files without loading them.

A safetensors file is `u64 little-endian header length N`, `N bytes of JSON`, then the raw tensor bytes.
The JSON maps each tensor name to `{"dtype", "shape", "data_offsets": [begin, end]}` (offsets relative to
the end of the header) plus an optional `__metadata__` string map.

- `read_header` validates everything the format requires and says what is wrong in which file.
- `ShardWriter` plans a header up front, takes the data appended in order, and renames `NAME.partial`
  to `NAME` only once every byte is written and fsynced.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import re
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from graftcore.errors import CheckpointError, OutputError
from graftcore.io.json_files import parse_json
from graftcore.shapes import numel

INDEX_NAME = "model.safetensors.index.json"  # a sharded checkpoint's tensor -> shard map
SINGLE_NAME = "model.safetensors"  # an unsharded checkpoint's one file
MAX_HEADER_BYTES = 100_000_000  # the reference library's limit
WRITEBACK_EVERY = 32 << 20  # start writing dirty pages to disk after this many bytes, so fsync finds little left

# safetensors dtype code -> bytes per element: every dtype the reference library (0.8) writes whole bytes of. This
# module imports no torch: inputs are resolved and planned (and bad input refused) before torch loads
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2FNUZ": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}
# bits per element of every dtype: the byte-sized ones, and those the reference library packs below a byte (F4: two
# E2M1 values a byte; F6: four E2M3 / E3M2 values in three bytes), whose tensors are copied as bytes
DTYPE_BITS: dict[str, int] = {
    **{code: 8 * size for code, size in DTYPE_SIZES.items()},
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}
# safetensors dtype code -> the torch dtype's attribute name (absent from older torch versions for some)
_TORCH_NAMES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "I64": "int64",
    "U64": "uint64",
    "F64": "float64",
    "C64": "complex64",
}
FLOAT_DTYPES = ("F16", "BF16", "F32")  # what the graft kernels read and write
# floating dtypes graftcore does no arithmetic on outside a codec: such a tensor is copied where Instruct alone has it
# (or it is not selected), and refused where it would be grafted
OPAQUE_FLOATS = ("F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "C64")
DTYPE_NAMES = {code: code for code in DTYPE_BITS}
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def itemsize(dtype: str) -> int:
    """Bytes per element of a byte-sized dtype (KeyError for F4 and F6: see byte_view)."""
    return DTYPE_SIZES[dtype]


def nbytes_of(dtype: str, shape) -> int:
    """Bytes a tensor of `dtype` and `shape` takes (a sub-byte dtype's whole bytes)."""
    return numel(shape) * DTYPE_BITS[dtype] // 8


def byte_view(info: TensorInfo) -> TensorInfo:
    """`info` as the U8 bytes it spans, for a dtype below a byte (F4, F6_*), which is copied as bytes; `info` itself
    for every other."""
    if info.dtype in DTYPE_SIZES:
        return info
    return TensorInfo(info.name, "U8", (info.end - info.start,), info.file, info.start, info.end)


def torch_dtype_or_none(dtype: str):
    """The torch dtype of a safetensors dtype code, None where this torch version has none (imports torch)."""
    try:
        return _TORCH_DTYPES[dtype]
    except KeyError:
        import torch

        return _TORCH_DTYPES.setdefault(dtype, getattr(torch, _TORCH_NAMES[dtype], None))


_TORCH_DTYPES: dict = {}


def torch_dtype(dtype: str):
    t = torch_dtype_or_none(dtype)
    if t is None:
        raise CheckpointError(f"dtype {dtype} has no torch equivalent in this torch version")
    return t


def __getattr__(name: str):
    if name == "TORCH_TO_CODE":  # torch dtype -> safetensors code (imports torch on first use)
        table = {t: code for code in DTYPE_SIZES if (t := torch_dtype_or_none(code)) is not None}
        globals()[name] = table
        return table
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class TensorInfo(NamedTuple):
    """Where one tensor's bytes lie: `file` is the shard's name inside its checkpoint. (A NamedTuple: a
    checkpoint of 100k tensors makes 100k of them, and a frozen dataclass costs several times more to build.)"""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    start: int  # absolute byte offset in the file
    end: int

    @property
    def numel(self) -> int:
        return numel(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class Quantized(NamedTuple):
    """A quantized weight and its companions (scales) as one logical tensor of `shape`, folded by its codec
    (graftcore/codecs/, named by `codec`): the stored weight's bytes lie at [start, end) of `file` in `dtype`, like
    a TensorInfo's; `scale` is its scale tensor (possibly in another file), one multiplier per `block` = (rows,
    cols) of weight elements; `power_of_two`: the format wants new scales that are powers of two; `stored`: the
    stored weight tensor where its name, dtype or shape differ from the logical one (packed 4-bit formats:
    `NAME.weight_packed` U8 [rows, cols / 2] for a logical `NAME.weight` [rows, cols]); `extra`: further companions
    (a global scale, a `weight_shape`). What the bytes mean is the codec's alone."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    start: int
    end: int
    scale: TensorInfo
    block: tuple[int, int]
    codec: str = "fp8"
    power_of_two: bool = False
    stored: TensorInfo | None = None
    extra: tuple[TensorInfo, ...] = ()

    numel = TensorInfo.numel
    nbytes = TensorInfo.nbytes

    @property
    def cols(self) -> int:
        """Elements per row of the [rows, cols] matrix the blocks tile."""
        return self.shape[-1] if self.shape else 1


class Pieces(NamedTuple):
    """One logical tensor stored as several: `parts` are (first, stop, TensorInfo) covering its flat elements
    [0, numel) in order (MoE experts stored one by one, read as Instruct's fused tensor: plan/layouts.py)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    parts: tuple[tuple[int, int, TensorInfo], ...]
    starts: tuple[int, ...] = ()  # each part's first element, for a bisect (a fused tensor of 256 experts: 512 parts)

    numel = TensorInfo.numel

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for _, _, info in self.parts)

    @property
    def file(self) -> str:
        """The first part's file (for messages)."""
        return self.parts[0][2].file

    def part(self, lo: int, hi: int) -> tuple[int, TensorInfo]:
        """(first element, TensorInfo) of the part holding elements [lo, hi), which must lie in one part."""
        k = bisect.bisect_right(self.starts or tuple(p[0] for p in self.parts), lo) - 1
        first, stop, info = self.parts[k]
        if not first <= lo <= hi <= stop:
            raise ValueError(f"{self.name}: elements {lo}..{hi} span two of its parts")
        return first, info


@dataclass(frozen=True)
class ShardHeader:
    path: Path
    data_start: int  # 8 + header length
    tensors: dict[str, TensorInfo]  # in file order
    metadata: dict[str, str]
    header_bytes: bytes  # the raw JSON, for fingerprints
    identity: tuple[int, ...] | None = None  # file_identity() when the header was read (None: a remote header)


def file_identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """(device, inode, size, mtime_ns, ctime_ns): changes when a file is replaced, resized or rewritten in place
    (ctime moves on every write and cannot be set back by users, unlike mtime)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def read_header(path: str | os.PathLike, file_name: str | None = None) -> ShardHeader:
    """Parse and validate the header of one safetensors file, reading only the header.

    Example:
        >>> h = read_header("model.safetensors")          # doctest: +SKIP
        >>> h.tensors["lm_head.weight"].shape             # doctest: +SKIP
        (32000, 4096)
    """
    path = Path(path)
    name = file_name or path.name
    try:
        # O_NONBLOCK: opening a FIFO named *.safetensors must not wait for a writer
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with open(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise CheckpointError(f"{path}: not a regular file")
            size = st.st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: file is {size} bytes, too short for a safetensors header")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
            if 8 + n > size:
                raise CheckpointError(f"{path}: header length {n} runs past the end of the {size}-byte file")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    header = parse_header(raw, size, path, name)
    return ShardHeader(header.path, header.data_start, header.tensors, header.metadata, raw, file_identity(st))


def parse_header(raw: bytes, file_size: int | None, path: Path, file_name: str) -> ShardHeader:
    """Validate header JSON `raw` of a file of `file_size` bytes (None: size unknown, remote)."""
    doc = parse_json(raw, path, "header")
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    metadata = doc.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata  # null is allowed, as the reference parser allows it
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and utf8(k) and utf8(v) for k, v in metadata.items()
    ):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings (valid UTF-8)")
    data_start = 8 + len(raw)
    # A lone surrogate can only come from a \uD800-\uDFFF escape: names are checked one by one only if the raw
    # header holds one (the common header has none, and this loop runs once per tensor of the checkpoint)
    check_names = SURROGATE_ESCAPE.search(raw) is not None
    spans = []
    for tname, entry in doc.items():
        if check_names and not utf8(tname):
            raise CheckpointError(
                f"{path}: tensor {ascii(tname)[1:-1]!r}: the name is not valid UTF-8 (a lone surrogate escape)"
            )
        if type(entry) is not dict:
            raise CheckpointError(f"{path}: tensor {tname!r}: entry is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        bits = DTYPE_BITS.get(dtype) if type(dtype) is str else None
        if bits is None:
            raise CheckpointError(f"{path}: tensor {tname!r}: unknown dtype {dtype!r}")
        n = shape_numel(shape)
        if n is None:
            raise CheckpointError(
                f"{path}: tensor {tname!r}: shape {shape!r} is not a list of non-negative integers whose product "
                f"fits in 63 bits"
            )
        if (
            type(offsets) is not list
            or len(offsets) != 2
            or type(offsets[0]) is not int
            or type(offsets[1]) is not int
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise CheckpointError(
                f"{path}: tensor {tname!r}: data_offsets {offsets!r} are not [begin, end] with begin <= end"
            )
        begin, end = offsets
        if n * bits % 8:
            raise CheckpointError(f"{path}: tensor {tname!r}: {dtype}{shape} is not a whole number of bytes")
        if end - begin != n * bits // 8:
            raise CheckpointError(
                f"{path}: tensor {tname!r}: data_offsets span {end - begin} bytes but {dtype}{shape} needs "
                f"{n * bits // 8}"
            )
        spans.append(
            (begin, end, tname, DTYPE_NAMES[dtype], tuple(shape))
        )  # one shared str per dtype, not one per tensor
    spans.sort()
    cursor = 0
    tensors = {}
    for begin, end, tname, dtype, shape in spans:
        if begin != cursor:
            kind = "overlaps the previous tensor" if begin < cursor else f"leaves a hole of {begin - cursor} bytes"
            raise CheckpointError(f"{path}: tensor {tname!r} at data offset {begin} {kind}")
        cursor = end
        tensors[tname] = TensorInfo(tname, dtype, shape, file_name, data_start + begin, data_start + end)
    if file_size is not None and data_start + cursor != file_size:
        last = spans[-1][2] if spans else "(none)"
        if data_start + cursor > file_size:
            raise CheckpointError(
                f"{path}: tensor {last!r} ends at byte {data_start + cursor}, past the end of the "
                f"{file_size}-byte file (truncated download?)"
            )
        raise CheckpointError(f"{path}: {file_size - data_start - cursor} bytes after the last tensor {last!r}")
    return ShardHeader(path, data_start, tensors, metadata, raw)


INT64_LIMIT = 1 << 63


def utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:  # a lone surrogate, which JSON escapes can produce
        return False


def shape_numel(shape) -> int | None:
    """The element count of a header's `shape`, or None unless it is a list of non-negative integers (not
    booleans: JSON true is not 1, as for the reference parser) whose running product, left to right as the
    reference parser computes it, stays within int64."""
    if type(shape) is not list:
        return None
    n = 1
    for d in shape:
        if type(d) is not int or d < 0 or d >= INT64_LIMIT:
            return None
        n *= d
        if n >= INT64_LIMIT:
            return None
    return n


PREFIX_DIGEST_HEX = 16  # 64 bits of each prefix digest: enough to tell which tensor changed, small per tensor


class PrefixHasher:
    """The sha256 of a file fed in order, and at each offset of `ends` the digest of the file up to there (the
    first PREFIX_DIGEST_HEX hex digits of a copy of the running hash, finalised: nothing is hashed twice).

    Example:
        >>> h = PrefixHasher([2, 3]); h.update(b"abcd")
        >>> h.digests == [hashlib.sha256(b"ab").hexdigest()[:16], hashlib.sha256(b"abc").hexdigest()[:16]]
        True
    """

    def __init__(self, ends: list[int]):
        self.sha = hashlib.sha256()
        self.ends = ends
        self.at = 0  # bytes hashed
        self.digests: list[str] = []

    def update(self, data) -> None:
        view = memoryview(data).cast("B")
        k = len(self.digests)
        while k < len(self.ends) and self.ends[k] <= self.at + len(view):
            cut = self.ends[k] - self.at
            self.sha.update(view[:cut])
            self.digests.append(self.sha.copy().hexdigest()[:PREFIX_DIGEST_HEX])
            view, self.at, k = view[cut:], self.at + cut, k + 1
        self.sha.update(view)
        self.at += len(view)

    def hexdigest(self) -> str:
        return self.sha.hexdigest()


def tensor_ends(header_size: int, entries) -> list[int]:
    """The file offset where each of `entries`' tensors ends, laid out back to back after the header."""
    ends, cursor = [], header_size
    for _, dtype, shape in entries:
        cursor += nbytes_of(dtype, shape)
        ends.append(cursor)
    return ends


def plan_header(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None) -> bytes:
    """The header bytes (length prefix included) for tensors laid out back to back in `entries` order.

    The JSON is padded with spaces to a multiple of 8 bytes, as the reference library does, so the data
    section starts 8-byte aligned.
    """
    doc: dict = {}
    if metadata:
        doc["__metadata__"] = metadata
    cursor = 0
    for name, dtype, shape in entries:
        n = nbytes_of(dtype, shape)
        doc[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [cursor, cursor + n]}
        cursor += n
    raw = json.dumps(doc, separators=(",", ":")).encode()
    raw += b" " * (-(len(raw) + 8) % 8)
    return struct.pack("<Q", len(raw)) + raw


class ShardWriter:
    """Writes one safetensors file by appending tensor bytes in header order.

    The file is `NAME.partial` until `finish()` has checked the byte count, fsynced and renamed it, so a
    file under its final name is always complete. The sha256 of the whole file is computed on the way, and at
    the end of the header and of each tensor the digest of the file so far (`prefix_digests`: a copy of the
    running hash finalised, nothing hashed twice), so that verify can name the first tensor whose bytes changed.

    Example:
        >>> w = ShardWriter(out / "model.safetensors", [("w", "BF16", (2, 3))], {"format": "pt"})  # doctest: +SKIP
        >>> w.append(torch.zeros(6, dtype=torch.bfloat16)); w.finish()                           # doctest: +SKIP
    """

    def __init__(
        self,
        path: str | os.PathLike,
        entries: list[tuple[str, str, tuple[int, ...]]],
        metadata=None,
        drop_behind: bool = False,
    ):
        """`drop_behind`: once a window of the file is on disk, drop it from the page cache (a pass larger than
        RAM then never fills memory with written pages)."""
        self.path = Path(path)
        self.drop_behind = drop_behind
        self.partial = self.path.with_name(self.path.name + ".partial")
        header = plan_header(entries, metadata)
        self.size = planned_file_size(entries, metadata)
        self._hasher = PrefixHasher([len(header), *tensor_ends(len(header), entries)])
        self._hasher.update(header)
        try:
            self._fd = os.open(self.partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as e:
            raise OutputError(f"{self.partial}: cannot create ({e.strerror or e})") from None
        self._written = 0
        self._flushed = 0  # writeback started up to here
        self._dropped = 0  # on disk and dropped from the page cache up to here
        self._write(header)

    def _write(self, data) -> None:
        view = memoryview(data).cast("B")
        while view:
            try:
                n = os.pwrite(self._fd, view, self._written)
            except OSError as e:  # ENOSPC, EIO, EDQUOT...: the user's to fix, named here
                raise OutputError(f"{self.partial}: cannot write ({e.strerror or e})") from None
            self._written += n
            view = view[n:]
        if self._written - self._flushed >= WRITEBACK_EVERY:
            start_writeback(self._fd, self._flushed, self._written - self._flushed)
            if self.drop_behind and self._flushed > self._dropped:
                # Drop the window whose writeback started last time. Never waited for: DONTNEED skips pages still
                # dirty or under writeback, and waiting here made the writer as slow as the disk under reads.
                os.posix_fadvise(self._fd, self._dropped, self._flushed - self._dropped, os.POSIX_FADV_DONTNEED)
                self._dropped = self._flushed
            self._flushed = self._written

    def append(self, data) -> None:
        """Append raw bytes (anything with the buffer protocol, or a CPU tensor)."""
        if not isinstance(data, (bytes, bytearray, memoryview)) and hasattr(data, "data_ptr"):  # a tensor
            data = tensor_bytes(data)
        if self._written + memoryview(data).nbytes > self.size:
            raise OutputError(f"{self.partial}: more data than the planned {self.size} bytes")
        self._hasher.update(data)
        self._write(data)

    @property
    def prefix_digests(self) -> list[str]:
        """The digests of the file up to the end of its header, then of each tensor (PrefixHasher)."""
        return self._hasher.digests

    def finish(self) -> str:
        """Check the size, fsync, rename to the final name; returns the file's sha256."""
        if self._written != self.size:
            raise OutputError(f"{self.partial}: {self._written} bytes written, {self.size} planned")
        self._hasher.update(b"")  # the digests of empty tensors at the end
        try:
            os.fsync(self._fd)  # delayed allocation reports ENOSPC here at the latest
            if self.drop_behind:
                os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(self._fd)
            self._fd = -1
            os.replace(self.partial, self.path)
            fsync_dir(self.path.parent)
        except OSError as e:
            raise OutputError(f"{e.filename or self.partial}: cannot finish the shard ({e.strerror or e})") from None
        return self._hasher.hexdigest()

    def abort(self, close: bool = True) -> None:
        """Delete the partial file (after an error or an interrupt), and close it unless another thread may
        still be writing to its descriptor (`close=False`: the descriptor is left to the process's exit)."""
        if close and self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.partial.unlink(missing_ok=True)


def tensor_bytes(t) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (works for bfloat16, which numpy lacks)."""
    import torch

    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.contiguous().view(torch.uint8).numpy()).cast("B")


def _load_sync_file_range():
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
        fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
        return fn
    except (OSError, AttributeError):  # not Linux/glibc: the final fsync does all the work
        return None


_sync_file_range = _load_sync_file_range()


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask Linux to start writing [offset, offset+length) to disk now, without waiting (SYNC_FILE_RANGE_WRITE).

    Writeback then overlaps the computation instead of all happening in the final fsync.
    """
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, 2)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def planned_file_size(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None) -> int:
    """The size in bytes of the file ShardWriter writes for `entries`."""
    return len(plan_header(entries, metadata)) + sum(nbytes_of(d, s) for _, d, s in entries)
