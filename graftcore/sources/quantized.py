"""Quantized checkpoints: each FP8 weight and its scales folded into one logical tensor (io.Quantized), from the
headers and config.json's `quantization_config`, before anything is matched, so the scales never show up as
tensors to graft, copy or measure.

The formats (facts from the libraries that write them and the files they wrote):
- block FP8, `"quant_method": "fp8"` (DeepSeek-V3/R1/V3.1, Kimi-K2, Qwen3-*-FP8; transformers'
  FineGrainedFP8Config): `NAME.weight` F8_E4M3 [out, in] and `NAME.weight_scale_inv` [ceil(out / bh),
  ceil(in / bw)], (bh, bw) = `weight_block_size` ([128, 128]); the scale is F32 in DeepSeek's files, BF16 in
  Qwen3-FP8's. `scale_fmt: "ue8m0"` (DeepSeek-V3.1) means power-of-two scales (transformers' Fp8Quantize rounds
  them up to one). Not quantized: embeddings, norms, lm_head, routers.
- compressed-tensors, `"quant_method": "compressed-tensors"`, format "float-quantized" (the RedHatAI
  "-FP8-dynamic" models): `NAME.weight` F8_E4M3 and `NAME.weight_scale` in the weights' original dtype, per
  tensor ([1] or []), per channel ([out, 1]) or per block; `NAME.input_scale` only for static activations (an
  ordinary tensor here: Instruct's, copied).

Example:
    >>> ck = fold_quantized(open_local(path))            # doctest: +SKIP
    >>> ck.tensors["model.layers.0.mlp.down_proj.weight"].scale.name
    'model.layers.0.mlp.down_proj.weight_scale_inv'
"""

from __future__ import annotations

from dataclasses import dataclass

from graftcore.errors import CheckpointError
from graftcore.io.json_files import read_json_file
from graftcore.io.safetensors_file import FP8_DTYPES, SCALE_DTYPES, Quantized, TensorInfo
from graftcore.sources.checkpoint import Checkpoint

CONFIG = "config.json"
SCALE_SUFFIX = {"fp8": "weight_scale_inv", "compressed-tensors": "weight_scale"}
DEFAULT_BLOCK = (128, 128)  # transformers' FineGrainedFP8Config.weight_block_size
# scale_fmt values transformers' FineGrainedFP8Config accepts ("float" its default; DeepSeek-V3 writes none)
SCALE_FORMATS = (None, "float", "ue8m0")


@dataclass(frozen=True)
class QuantFormat:
    """How an input's weights are quantized: `method` ("fp8" or "compressed-tensors"), the scale tensors' suffix,
    whether new scales must be powers of two (scale_fmt "ue8m0"), and the `quantization_config` itself."""

    method: str
    scale_suffix: str
    power_of_two: bool
    config: dict


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


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


def quant_format(config: dict, where: str) -> QuantFormat:
    """The QuantFormat of a `quantization_config`; CheckpointError for a method or format graftcore does not read."""
    method = config.get("quant_method")
    if not isinstance(method, str) or method not in SCALE_SUFFIX:
        raise CheckpointError(
            f"{where}: quantization_config.quant_method is {method!r}; graftcore reads 'fp8' (block FP8) and "
            f"'compressed-tensors' FP8 checkpoints"
        )
    if method == "fp8" and str(config.get("fmt", "e4m3")).lower() != "e4m3":
        raise CheckpointError(f"{where}: quantization_config.fmt is {config.get('fmt')!r}; graftcore reads e4m3")
    if method == "compressed-tensors" and config.get("format", "float-quantized") != "float-quantized":
        raise CheckpointError(
            f"{where}: compressed-tensors format {config.get('format')!r}; graftcore reads 'float-quantized' (FP8)"
        )
    scale_fmt = config.get("scale_fmt")
    if scale_fmt not in SCALE_FORMATS:
        raise CheckpointError(
            f"{where}: quantization_config.scale_fmt is {scale_fmt!r}; expected 'float' or 'ue8m0' (transformers' "
            f"FineGrainedFP8Config), or none"
        )
    if method == "compressed-tensors":
        for key, weights in group_weights(config):
            kind, bits = weights.get("type", "float"), weights.get("num_bits", 8)
            if kind != "float" or bits != 8:
                raise CheckpointError(
                    f"{where}: quantization_config {key}.weights says type {kind!r}, num_bits {bits!r}; the "
                    f"'float-quantized' format stores 8-bit float (F8_E4M3) weights"
                )
    return QuantFormat(method, SCALE_SUFFIX[method], scale_fmt == "ue8m0", config)


def group_weights(config: dict) -> list[tuple[str, dict]]:
    """('config_groups.NAME', its `weights` scheme) for each compressed-tensors group that quantizes weights."""
    groups = config.get("config_groups")
    out = []
    for name, group in groups.items() if isinstance(groups, dict) else ():
        weights = group.get("weights") if isinstance(group, dict) else None
        if isinstance(weights, dict):
            out.append((f"config_groups.{name}", weights))
    return out


def declared_strategies(config: dict) -> set[str]:
    """The compressed-tensors weight strategies the config declares ("tensor", "channel", "group", "block");
    empty for block FP8 and for a config that states none (the scales' shapes then say which)."""
    return {w["strategy"] for _, w in group_weights(config) if isinstance(w.get("strategy"), str)}


def positive_pair(value) -> tuple[int, int] | None:
    """(a, b) from [a, b] or "AxB" with positive ints; None for anything else."""
    if isinstance(value, str) and value.lower().count("x") == 1:
        value = value.lower().split("x")
        value = [int(v) if v.strip().isdigit() else None for v in value]
    ok = isinstance(value, list) and len(value) == 2
    ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    return tuple(value) if ok else None


def config_block(config: dict, where: str) -> tuple[int, int] | None:
    """(bh, bw) the config gives the scales of 2-D grids: block FP8's weight_block_size (or the default);
    compressed-tensors' weights `block_structure` ([bh, bw] or "bhxbw", strategy "block") or (1, group_size)
    (strategy "group"); None when it gives none (per-tensor and per-channel scales say theirs by their shape)."""
    if config.get("quant_method") == "fp8":
        block = config.get("weight_block_size", list(DEFAULT_BLOCK))
        if block is None:
            return None  # per tensor
        if positive_pair(block) is None:
            raise CheckpointError(f"{where}: quantization_config.weight_block_size is {block!r}, not two positive ints")
        return positive_pair(block)
    found = set()
    for _, weights in group_weights(config):
        strategy = weights.get("strategy")
        if strategy == "block":
            block = positive_pair(weights.get("block_structure"))
            if block is None:
                raise CheckpointError(
                    f"{where}: config_groups weights block_structure is {weights.get('block_structure')!r}, not "
                    f"[rows, cols] of positive ints"
                )
            found.add(block)
        elif strategy == "group":
            size = weights.get("group_size")
            if not (isinstance(size, int) and not isinstance(size, bool) and size > 0):
                raise CheckpointError(f"{where}: config_groups weights group_size is {size!r}, not a positive int")
            found.add((1, size))
    if len(found) > 1:
        raise CheckpointError(f"{where}: config_groups quantize weights in several block shapes {sorted(found)}")
    return next(iter(found), None)


def scale_block(
    weight: TensorInfo,
    scale: TensorInfo,
    block: tuple[int, int] | None,
    method: str,
    where: str,
    strategies: set[str] = frozenset(),
):
    """The (rows, cols) of weight elements each scale covers, from the scale's shape; CheckpointError when the
    shape fits neither the config's block nor a per-channel or per-tensor scale, or none of the compressed-tensors
    `strategies` the config declares (empty: any)."""
    rows, cols = weight.shape
    shape = tuple(scale.shape)
    per_tensor = shape in ((), (1,), (1, 1))
    per_channel = shape in ((rows, 1), (rows,)) and (block is None or block[0] == 1)
    fits = {  # the strategies that write a scale of this shape
        "tensor": per_tensor,
        "channel": shape in ((rows, 1), (rows,)),
        "group": block is not None and shape == (ceil_div(rows, block[0]), ceil_div(cols, block[1])),
    }
    fits["block"] = fits["group"]
    if strategies and not any(fits.get(s, False) for s in strategies):
        raise CheckpointError(
            f"{where}: tensor {scale.name!r} is {list(shape)}, which is not the scale of {weight.name!r} "
            f"{list(weight.shape)} that quantization_config's strategy {' or '.join(sorted(strategies))} writes"
        )
    if method == "compressed-tensors" and per_tensor:
        return (rows, cols)  # one scale for the tensor
    if method == "compressed-tensors" and per_channel:
        return (1, cols)  # one per output channel
    if block is not None:
        want = (ceil_div(rows, block[0]), ceil_div(cols, block[1]))
        if shape == want:
            return block
        key = "weight_block_size" if method == "fp8" else "block_structure / group_size"
        raise CheckpointError(
            f"{where}: tensor {scale.name!r} is {list(shape)}, but {weight.name!r} {list(weight.shape)} in "
            f"{block[0]}x{block[1]} blocks (quantization_config {key}) needs {list(want)}"
        )
    if shape in ((), (1,), (1, 1)):
        return (rows, cols)  # block FP8 without a block size: one scale for the tensor
    raise CheckpointError(
        f"{where}: tensor {scale.name!r} is {list(shape)}: not a per-tensor, per-channel or block scale of "
        f"{weight.name!r} {list(weight.shape)}"
    )


def fold_quantized(ck: Checkpoint) -> Checkpoint:
    """`ck` with every FP8 weight and its scale folded into one io.Quantized (the scales' names gone from
    `ck.tensors`) and `ck.quant` set; `ck` unchanged when it holds no FP8 and says no quantization. CheckpointError
    (naming the file and tensor) for FP8 without a quantization_config or the reverse, a missing scale, a scale of
    the wrong shape or dtype, E5M2 where E4M3 is declared, a scale with no FP8 weight."""
    fp8 = [n for n, i in ck.tensors.items() if i.dtype.startswith("F8_")]
    try:
        config = read_quantization_config(ck)
    except CheckpointError:
        if fp8:
            raise
        return ck  # an unreadable config.json of an unquantized model is copied as it is (output_folder.py)
    where = ck.extra_file_path(CONFIG) if config is not None else ck.ref
    if config is None:
        if fp8:
            info = ck.tensors[fp8[0]]
            raise CheckpointError(
                f"{ck.locate(info.file)}: tensor {fp8[0]!r} is {info.dtype}, but {ck.ref} has no "
                f"quantization_config in {CONFIG}, so its scales cannot be read (give the model's folder, with its "
                f"{CONFIG})"
            )
        return ck
    fmt = quant_format(config, str(where))
    block = config_block(config, str(where))
    strategies = declared_strategies(config)
    if not fp8:
        raise CheckpointError(
            f"{where}: quantization_config says {fmt.method}, but no tensor of {ck.ref} is F8_E4M3 (a dequantized "
            f"copy with the quantized model's {CONFIG}?)"
        )
    folded: dict[str, Quantized] = {}
    for name in fp8:
        info = ck.tensors[name]
        at = ck.locate(info.file)
        if info.dtype not in FP8_DTYPES:
            raise CheckpointError(f"{at}: tensor {name!r} is {info.dtype}, but {fmt.method} declares F8_E4M3")
        if not name.endswith(".weight") or len(info.shape) != 2:
            raise CheckpointError(
                f"{at}: tensor {name!r} is {info.dtype}{list(info.shape)}; graftcore reads FP8 only as 2-D "
                f"`.weight` tensors with a scale"
            )
        scale_name = name[: -len("weight")] + fmt.scale_suffix
        scale = ck.tensors.get(scale_name)
        if scale is None:
            raise CheckpointError(f"{at}: tensor {name!r} is {info.dtype} but {scale_name!r} is missing in {ck.ref}")
        if scale.dtype not in SCALE_DTYPES:
            raise CheckpointError(
                f"{ck.locate(scale.file)}: tensor {scale_name!r} is {scale.dtype}; graftcore reads F32, BF16 or F16 "
                f"scales"
            )
        b = scale_block(info, scale, block, fmt.method, ck.locate(scale.file), strategies)
        folded[name] = Quantized(name, info.dtype, info.shape, info.file, info.start, info.end, scale, b)
    scales = {q.scale.name for q in folded.values()}
    stray = [n for n in ck.tensors if n.endswith("." + fmt.scale_suffix) and n not in scales]
    if stray:
        info = ck.tensors[stray[0]]
        raise CheckpointError(f"{ck.locate(info.file)}: tensor {stray[0]!r} is a scale with no FP8 weight beside it")
    ck.tensors = {n: folded.get(n, info) for n, info in ck.tensors.items() if n not in scales}
    ck.quant = fmt
    check_scale_values(ck, list(folded.values()), fmt.power_of_two)
    return ck


def scale_values(data: bytes, dtype: str):
    """numpy float32 values of a scale tensor's bytes (little-endian F32, F16 or BF16)."""
    import numpy as np

    if dtype == "BF16":
        return (np.frombuffer(data, "<u2").astype(np.uint32) << 16).view(np.float32)
    return np.frombuffer(data, "<f4" if dtype == "F32" else "<f2").astype(np.float32)


def check_scale_values(ck: Checkpoint, weights: list[Quantized], power_of_two: bool) -> None:
    """CheckpointError naming the file and tensor for a scale that is NaN, Inf, zero or negative, or (scale_fmt
    "ue8m0") not a power of two: checked from the files at plan time, before any output byte is written and in
    a dry run too (scales are ~1/16000 of the weights' bytes). Shards of a hub input that are not downloaded yet
    are checked as they are read (fp8_steps.check_scales)."""
    import numpy as np

    by_file: dict[str, list[TensorInfo]] = {}
    for q in weights:
        by_file.setdefault(q.scale.file, []).append(q.scale)
    for file, scales in by_file.items():
        path = ck.present(file)
        if path is None:
            continue
        with open(path, "rb") as f:
            for scale in sorted(scales, key=lambda t: t.start):
                f.seek(scale.start)
                data = f.read(scale.nbytes)
                if len(data) != scale.nbytes:
                    raise CheckpointError(f"{ck.locate(file)}: tensor {scale.name!r}: the file ends inside it")
                v = scale_values(data, scale.dtype)
                if not (v > 0).all() or not np.isfinite(v).all():  # NaN fails the first
                    raise CheckpointError(
                        f"{ck.locate(file)}: tensor {scale.name!r} holds a NaN, Inf, zero or negative scale; an FP8 "
                        f"weight's scales are positive and finite"
                    )
                if power_of_two and not (np.frexp(v)[0] == 0.5).all():
                    raise CheckpointError(
                        f"{ck.locate(file)}: tensor {scale.name!r} holds scales that are not powers of two, but "
                        f"quantization_config.scale_fmt is 'ue8m0'"
                    )
