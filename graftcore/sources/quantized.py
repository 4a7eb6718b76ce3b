"""Quantized checkpoints: each quantized weight and its companions (scales) folded into one logical tensor
(io.Quantized) by the codec that config.json's `quantization_config` names (graftcore/codecs/), before anything
is matched, so the companions never show up as tensors to graft, copy or measure.

Example:
    >>> ck = fold_quantized(open_local(path))            # doctest: +SKIP
    >>> ck.tensors["model.layers.0.mlp.down_proj.weight"].scale.name
    'model.layers.0.mlp.down_proj.weight_scale_inv'
"""

from __future__ import annotations

from graftcore.codecs import codec_for_config, codec_of
from graftcore.errors import CheckpointError
from graftcore.io.json_files import read_json_file
from graftcore.io.safetensors_file import Quantized, TensorInfo
from graftcore.sources.checkpoint import Checkpoint

CONFIG = "config.json"
FP8_WEIGHTS = ("F8_E4M3", "F8_E5M2")  # an FP8 weight says a checkpoint is quantized, config or not


def read_quantization_config(ck: Checkpoint) -> dict | None:
    """config.json's `quantization_config` (None when there is no config.json or no such key)."""
    if CONFIG not in ck.extra_files():
        return None
    path = ck.extra_file_path(CONFIG)
    doc = read_json_file(path, CONFIG, CheckpointError)
    config = doc.get("quantization_config") if isinstance(doc, dict) else None
    if config is not None and not isinstance(config, dict):
        raise CheckpointError(f"{path}: quantization_config is not an object")
    return config


def fold_quantized(ck: Checkpoint) -> Checkpoint:
    """`ck` with every quantized weight and its companions folded into one io.Quantized (the companions' names
    gone from `ck.tensors`) and `ck.quant` set; `ck` unchanged when it holds no quantized weight and says no
    quantization. CheckpointError (naming the file and tensor) for quantized weights without a
    quantization_config or the reverse, and whatever the codec refuses (a missing, stray or misshapen companion,
    a dtype the config does not declare, a scale whose values the format forbids)."""
    fp8 = [n for n, i in ck.tensors.items() if i.dtype in FP8_WEIGHTS]  # weights that need their scales
    try:
        config = read_quantization_config(ck)
    except CheckpointError:
        if fp8:
            raise
        return ck  # an unreadable config.json of an unquantized model is copied as it is (output_folder.py)
    if config is None:
        if fp8:
            info = ck.tensors[fp8[0]]
            raise CheckpointError(
                f"{ck.locate(info.file)}: tensor {fp8[0]!r} is {info.dtype}, but {ck.ref} has no "
                f"quantization_config in {CONFIG}, so its scales cannot be read (give the model's folder, with its "
                f"{CONFIG})"
            )
        return ck
    where = str(ck.extra_file_path(CONFIG))
    codec = codec_for_config(config, where)
    fmt = codec.read_config(config, where)
    if not any(i.dtype in codec.stored_dtypes() for i in ck.tensors.values()):
        raise CheckpointError(
            f"{where}: quantization_config says {config.get('quant_method')}, but no tensor of {ck.ref} is "
            f"{' or '.join(codec.stored_dtypes())} (a dequantized copy with the quantized model's {CONFIG}?)"
        )
    folded = codec.fold(ck.tensors, fmt, ck.locate, ck.ref)
    companions = {part.name for q in folded.values() for part in codec_of(q).parts(q)[1:]}
    by_stored = {(q.stored or q).name: q for q in folded.values()}  # NAME.weight_packed -> NAME.weight's
    tensors = {}
    for name, info in ck.tensors.items():
        if name not in companions:
            q = by_stored.get(name)
            tensors[name if q is None else q.name] = info if q is None else q
    ck.tensors = tensors
    ck.quant = fmt
    check_stored_values(ck, list(folded.values()))
    return ck


def check_stored_values(ck: Checkpoint, weights: list[Quantized]) -> None:
    """Each weight's companions (scales) read from the files and checked by its codec at plan time, before any
    output byte is written and in a dry run too (scales are ~1/16000 of the weights' bytes). Shards of a hub input
    that are not downloaded yet are checked as they are read (the codec's check_read)."""
    by_file: dict[str, list[tuple[Quantized, TensorInfo]]] = {}
    for q in weights:
        for part in codec_of(q).parts(q)[1:]:
            by_file.setdefault(part.file, []).append((q, part))
    for file, parts in by_file.items():
        path = ck.present(file)
        if path is None:
            continue
        with open(path, "rb") as f:
            for q, part in sorted(parts, key=lambda p: p[1].start):
                f.seek(part.start)
                data = f.read(part.nbytes)
                if len(data) != part.nbytes:
                    raise CheckpointError(f"{ck.locate(file)}: tensor {part.name!r}: the file ends inside it")
                codec_of(q).check_values(q, part, data, ck.locate(file))
