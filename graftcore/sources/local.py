"""REF -> Checkpoint (checkpoint.py): which safetensors files make up an input, and where each tensor lies in them.

A REF is an existing local path (a folder, or one `.safetensors` file) or a hub repo id `org/name[@rev]`.
Only headers are read here; tensor data is read later by the streaming pass (stream/readers.py), file by file, through
`Checkpoint.shard_path`, which is where a hub checkpoint downloads.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from graftcore.errors import CheckpointError
from graftcore.io.safetensors_file import INDEX_NAME, SINGLE_NAME, read_header
from graftcore.sources.checkpoint import (
    NEVER_UNPICKLES,
    PICKLE_SUFFIXES,
    Checkpoint,
    check_index,
    checkpoint_from_headers,
    pickled_only,
    read_index,
)
from graftcore.sources.quantized import fold_quantized

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def local_ref_reason(ref: str) -> str | None:
    """Why REF is a local path and not a hub repo id `org/name[@revision]`; None when it is a hub id.

    A path that does not exist is still read as one when it starts with '.', '/' or '~', has more than one
    '/' before any '@', or lies in a folder that exists (`demo/bsae` beside `demo/`): a typo there must be
    reported as a missing path, not sent to the hub.
    """
    repo = ref.partition("@")[0]
    if os.path.exists(ref):
        return "it exists"
    if ref.startswith((".", "/", "~")):
        return f"it starts with {ref[0]!r}"
    if repo.count("/") > 1:
        return "it has more than one '/' before any '@'"
    if not HUB_ID.match(ref):
        return "it is not of the form org/name[@revision]"
    if os.path.isdir(os.path.dirname(repo)):
        return f"the folder {os.path.dirname(repo)}/ exists"
    return None


def open_checkpoint(ref: str | os.PathLike, **hub_options) -> Checkpoint:
    """Resolve a REF to a Checkpoint, reading headers only.

    Example:
        >>> ck = open_checkpoint("path/to/Llama-3.1-8B-Instruct")   # doctest: +SKIP
        >>> ck.tensors["model.embed_tokens.weight"].shape            # doctest: +SKIP
        (128256, 4096)
    """
    ref = str(ref)
    reason = local_ref_reason(ref)
    if reason is None:
        from graftcore.sources.hub import open_hub_checkpoint

        return fold_quantized(open_hub_checkpoint(ref, **hub_options))
    path = Path(ref).expanduser()
    if not path.exists():
        raise CheckpointError(f"{ref}: no such file or folder (not a hub repo id: {reason})")
    return fold_quantized(open_local(path))


def open_local(path: Path) -> Checkpoint:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_file():
        if not path.name.endswith(".safetensors"):
            raise CheckpointError(f"{path}: not a .safetensors file{pickle_hint(path)}")
        return checkpoint_from_headers(str(path), None, [read_header(path)], has_index=False, files={path.name: path})
    index = path / INDEX_NAME
    if index.is_file():
        return open_indexed_folder(path, index)
    single = path / SINGLE_NAME
    shards = [single] if single.is_file() else sorted(p for p in path.glob("*.safetensors") if p.is_file())
    if not shards:
        pickles = sorted(p.name for p in path.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
        if pickles:
            raise CheckpointError(pickled_only(str(path), pickles, f"'{path}'", f"{path}-safetensors"))
        raise CheckpointError(f"{path}: no .safetensors files and no {INDEX_NAME}")
    headers = [read_header(p) for p in shards]
    return checkpoint_from_headers(str(path), path, headers, has_index=False, files={p.name: p for p in shards})


def open_indexed_folder(path: Path, index: Path) -> Checkpoint:
    weight_map = read_index(index)
    files = list(dict.fromkeys(weight_map.values()))
    for f in files:
        if not (path / f).is_file():
            some = next(n for n, v in weight_map.items() if v == f)
            raise CheckpointError(f"{index}: tensor {some!r} is mapped to {f}, which does not exist")
    headers = [read_header(path / f, f) for f in files]
    check_index(index, weight_map, files, headers)
    return checkpoint_from_headers(str(path), path, headers, has_index=True, files={f: path / f for f in files})


def pickle_hint(path: Path) -> str:
    if path.name.endswith(PICKLE_SUFFIXES):
        return f" (pickled weights: {NEVER_UNPICKLES}; convert to safetensors with transformers' save_pretrained)"
    return ""
