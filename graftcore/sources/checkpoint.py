"""A Checkpoint: the safetensors files that make up one input and where each tensor lies in them, read from
headers only, wherever the files are (a local folder or a hub repo: sources/local.py and sources/hub.py build it).
Also the formats both read the same way: the index, the tensors' union across shards, which files are weights.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from graftcore.codecs.registry import QuantFormat
from graftcore.errors import CheckpointError
from graftcore.io.json_files import parse_json, read_file_bytes
from graftcore.io.safetensors_file import SURROGATE_ESCAPE, ShardHeader, TensorInfo, file_identity, utf8

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# files that are weights (never copied to the output as "non-weight files")
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".h5", ".msgpack", ".onnx", *PICKLE_SUFFIXES)
WEIGHT_INDEX = re.compile(r".*\.(safetensors|bin|pt|pth)\.index\.json$")


@dataclass
class Checkpoint:
    """The tensors of one input, as headers describe them.

    Attributes:
        ref: the REF as the user wrote it.
        tensors: name -> TensorInfo, in file order within each shard, shards in index order.
        shard_files: the shard names (relative to the checkpoint root), in order.
        shard_metadata: each shard's `__metadata__`.
        has_index: whether the input came with `model.safetensors.index.json`.
        revision: the resolved commit of a hub input (None for local ones).
        fingerprint: changes whenever a file's path or header changes (file_state() covers its contents).
        identities: shard -> file_identity() when its header was read (or when first opened, for a download).
        quant: how its weights are quantized (sources/quantized.py, by a codec of graftcore/codecs/), None for none.
    """

    ref: str
    root: Path | None
    tensors: dict[str, TensorInfo]
    shard_files: list[str]
    shard_metadata: dict[str, dict[str, str]]
    has_index: bool
    fingerprint: str
    revision: str | None = None
    local_files: dict[str, Path] = field(default_factory=dict)
    identities: dict[str, tuple] = field(default_factory=dict)
    quant: QuantFormat | None = None  # the codec's format when its weights are quantized (companions folded in)

    def shard_path(self, file: str) -> Path:
        """The local path of shard `file` (a hub checkpoint downloads it here)."""
        return self.local_files[file]

    def present(self, file: str) -> Path | None:
        """The local path of shard `file` if it can be read now without a download, else None."""
        return self.local_files.get(file)

    def ready(self, file: str) -> bool:
        """Whether shard `file` can be opened without waiting (a hub shard may still be downloading)."""
        return True

    def file_state(self, file: str) -> str:
        """What stands for the contents of shard `file` in resume keys: its identity when its header was read
        (device, inode, size, mtime, ctime: a file rewritten in place with its mtime set back still differs).
        Hub shards have none: the commit pins them, and each download is checked against the planned header."""
        return str(self.identities.get(file, ""))

    def check_unchanged(self, file: str, st: os.stat_result, when: str) -> None:
        """Raise CheckpointError if shard `file` (stat `st`) is not the file the plan was made from."""
        seen = self.identities.setdefault(file, file_identity(st))
        if file_identity(st) != seen:
            raise CheckpointError(
                f"{self.locate(file)}: the file changed {when} (replaced, resized or rewritten since graftcore read "
                f"its header); nothing finished was written from it. Rerun once the input is stable"
            )

    def verify_unchanged(self, file: str) -> None:
        """check_unchanged against the file as it is now on disk."""
        if file in self.local_files:
            try:
                st = os.stat(self.shard_path(file))
            except OSError as e:
                raise CheckpointError(f"{self.locate(file)}: gone during the merge ({e.strerror or e})") from None
            self.check_unchanged(file, st, "during the merge")

    def locate(self, file: str) -> str:
        """Where shard `file` is, for messages: a path, or `org/name@rev/file` on the hub."""
        if self.root is None and file in self.local_files:
            return str(self.local_files[file])
        return f"{self.ref.rstrip('/')}/{file}"

    def release(self, file: str) -> None:
        """The engine is done with shard `file` (a low-disk hub checkpoint deletes it)."""

    def schedule(self, files: list[str], scratch: Path) -> None:
        """The engine will open shards `files` in this order: a hub checkpoint downloads them ahead (with
        --low-disk into the folder `scratch`, inside the output). Local checkpoints have nothing to do."""

    def report_notes(self) -> list[str]:
        """One-line notes for the Report and graftcore.json (a low-disk hub input: the disk its shards took)."""
        return []

    def extra_files(self) -> list[str]:
        """Non-weight files (config, tokenizer, chat template...) relative to the root, to copy to the output."""
        if self.root is None:
            return []
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in sorted(filenames):
                if is_extra_file(f):
                    found.append(str((Path(dirpath) / f).relative_to(self.root)))
        return found

    def extra_file_path(self, name: str) -> Path:
        assert self.root is not None
        return self.root / name


NEVER_UNPICKLES = "graftcore reads safetensors and never unpickles (unpickling runs the file's code)"


def pickled_only(where: str, pickles: list[str], load_args: str, save_to: str) -> str:
    """The refusal of a model stored only as pickled weights, with the one-line conversion that fixes it
    (`load_args`: what from_pretrained takes, e.g. "'org/name', revision='main'")."""
    return (
        f"{where}: holds only pickled weights ({', '.join(pickles[:3])}); {NEVER_UNPICKLES}. Convert first: "
        f'python -c "from transformers import AutoModelForCausalLM as M; '
        f"M.from_pretrained({load_args}).save_pretrained('{save_to}')\""
    )


def is_extra_file(rel: str) -> bool:
    """Whether the file `rel` (a path relative to a checkpoint's root) is copied to the output: not weights,
    not hidden, not an earlier graftcore output's records or partial files."""
    parts = rel.split("/")
    name = parts[-1]
    return not (
        any(p.startswith(".") for p in parts)
        or name.endswith(WEIGHT_SUFFIXES)
        or WEIGHT_INDEX.match(name)
        or name == "graftcore.json"
        or name.startswith("graftcore.progress")
        or name.endswith(".partial")
    )


def read_index(index: Path | str, text: str | None = None) -> dict[str, str]:
    """The `weight_map` of a `model.safetensors.index.json`, validated."""
    if text is None:
        try:
            text = read_file_bytes(index, "the index")
        except FileNotFoundError:
            raise CheckpointError(f"{index}: cannot read the index (no such file)") from None
    doc = parse_json(text, index, "the index")
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    raw = text if isinstance(text, bytes) else text.encode(errors="surrogatepass")
    check_names = SURROGATE_ESCAPE.search(raw) is not None  # only then can a name hold a lone surrogate
    if not isinstance(weight_map, dict) or not all(
        type(v) is str and (not check_names or utf8(v) and utf8(k)) for k, v in weight_map.items()
    ):
        raise CheckpointError(f"{index}: no valid 'weight_map' object (tensor name -> file name)")
    if not weight_map:
        raise CheckpointError(f"{index}: the weight_map is empty: the index names no tensor")
    for name, f in weight_map.items():
        if "/" in f or "\\" in f or f.startswith(".") or "\0" in f or len(f.encode()) > 255:
            raise CheckpointError(
                f"{index}: tensor {name!r} maps to {f[:80]!r}, which is not a file name in the folder"
            )
    return weight_map


def check_index(index, weight_map: dict[str, str], files: list[str], headers: list[ShardHeader]) -> None:
    """The index and the headers agree (`headers[k]` is `files[k]`'s): every tensor it maps to a file is in that
    file's header, and every tensor a shard holds is mapped (transformers loads only what the index maps, so a
    tensor left out of it, an FP8 weight's scale say, is not part of the model it describes)."""
    for name, f in weight_map.items():
        if name not in headers[files.index(f)].tensors:
            raise CheckpointError(f"{index}: tensor {name!r} is mapped to {f}, but that file does not hold it")
    for f, h in zip(files, headers):
        for name in h.tensors:
            if name not in weight_map:
                raise CheckpointError(
                    f"{index}: tensor {name!r} is in {f}, but the index does not map it (loaders read only what the "
                    f"index maps); add it to the weight_map or remove it from the shard"
                )


def collect_tensors(headers: list[ShardHeader]) -> dict[str, TensorInfo]:
    """name -> TensorInfo over all shards, in shard then file order; a name in two shards is an error."""
    tensors: dict[str, TensorInfo] = {}
    for h in headers:
        for name, info in h.tensors.items():
            if name in tensors:
                raise CheckpointError(f"{h.path}: tensor {name!r} also appears in {tensors[name].file}")
            tensors[name] = info
    return tensors


def checkpoint_from_headers(
    ref: str, root: Path | None, headers: list[ShardHeader], has_index: bool, files: dict[str, Path]
) -> Checkpoint:
    """`headers[k]` is the header of the k-th entry of `files` (shard name -> local path)."""
    if not any(h.tensors for h in headers):
        where = headers[0].path if len(headers) == 1 else f"{ref} ({len(headers)} files)"
        raise CheckpointError(f"{where}: holds no tensors (every safetensors header is empty)")
    return Checkpoint(
        ref=ref,
        root=root,
        tensors=collect_tensors(headers),
        shard_files=list(files),
        shard_metadata={f: h.metadata for f, h in zip(files, headers)},
        has_index=has_index,
        fingerprint=local_fingerprint(headers),
        local_files=files,
        identities={f: h.identity for f, h in zip(files, headers) if h.identity is not None},
    )


def local_fingerprint(headers: list[ShardHeader]) -> str:
    """What local inputs are, for resume: each file's path and header (cheap; no data is hashed). Each file's
    contents are stood for by its identity (Checkpoint.file_state), part of the key of every output shard
    read from it."""
    h = hashlib.sha256()
    for hd in headers:
        h.update(f"{hd.path.resolve()}|".encode())
        h.update(hd.header_bytes)
    return h.hexdigest()
