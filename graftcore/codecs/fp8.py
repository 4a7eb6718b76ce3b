"""FP8 E4M3 weights with scales: the first codecs, block FP8 and compressed-tensors' float-quantized.

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

Both decode float32(q) * scale of the element's block (DeepSeek-V3 inference/kernel.py, weight_dequant: scale
[ceil(M / 128), ceil(N / 128)], row-major, edge blocks partial) and encode by the rule of kernels/graft/fp8.py;
they differ only in how the config and the scale tensors are named and read.

Example:
    >>> from graftcore.codecs import codec_named
    >>> codec_named("fp8").read_config({"quant_method": "fp8"}, "config.json").block
    (128, 128)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from graftcore.codecs.registry import QuantFormat, register
from graftcore.codecs.values import encoding_record, group_weights, positive_pair, scale_values
from graftcore.errors import CheckpointError, NonFiniteError
from graftcore.io.safetensors_file import Quantized, TensorInfo, torch_dtype
from graftcore.shapes import cdiv

if TYPE_CHECKING:
    import torch

FP8_DTYPES = ("F8_E4M3",)  # the weights these codecs decode and encode
FP8_KINDS = ("F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ")  # 8-bit float weights (only the first is read)
SCALE_DTYPES = ("F32", "BF16", "F16", "F8_E8M0")  # the dtypes of their scales (E8M0: a power of two, 2 ** (byte - 127))
DEFAULT_BLOCK = (128, 128)  # transformers' FineGrainedFP8Config.weight_block_size
# scale_fmt values transformers' FineGrainedFP8Config accepts ("float" its default; DeepSeek-V3 writes none)
SCALE_FORMATS = (None, "float", "ue8m0")
BAD_SCALE = "holds a NaN, Inf, zero or negative scale; an FP8 weight's scales are positive and finite"


def scale_range(q: Quantized, first_row: int, stop_row: int) -> tuple[int, int]:
    """Elements [first, stop) of the scale grid (row-major, ceil(cols / bw) per grid row) whose blocks cover the
    weight's rows [first_row, stop_row)."""
    bh, bw = q.block
    grid_cols = cdiv(q.cols, bw)
    return first_row // bh * grid_cols, cdiv(stop_row, bh) * grid_cols


class ScaledFp8:
    """What both FP8 codecs share: an F8_E4M3 `.weight` with one scale tensor, decoded and encoded by block."""

    kind = "FP8"
    methods: tuple[str, ...] = ()
    format: str | None = None  # the compressed-tensors `format` it reads (None: the method alone says it)
    suffix = ""  # the scale tensor's name ending, after the weight's name without "weight"
    other_suffixes: tuple[str, ...] = ()  # further endings a scale may have (DeepSeek-V4's `.scale`), never strays
    config_keys = ("quantization_config",)

    def claims(self, config: dict) -> bool:
        if config.get("quant_method") not in self.methods:
            return False
        return self.format is None or config.get("format", self.format) == self.format

    @property
    def companion_suffixes(self) -> tuple[str, ...]:
        return tuple("." + s for s in (self.suffix, *self.other_suffixes))

    def stored_dtypes(self) -> tuple[str, ...]:
        return FP8_DTYPES

    # -- which tensors form one weight
    def fold(self, tensors: dict[str, TensorInfo], fmt: QuantFormat, locate, ref: str) -> dict[str, Quantized]:
        folded: dict[str, Quantized] = {}
        for name, info in tensors.items():
            if info.dtype not in FP8_KINDS:
                continue
            at = locate(info.file)
            if info.dtype not in FP8_DTYPES:
                raise CheckpointError(f"{at}: tensor {name!r} is {info.dtype}, but {self.method} declares F8_E4M3")
            if not name.endswith(".weight") or len(info.shape) != 2:
                raise CheckpointError(
                    f"{at}: tensor {name!r} is {info.dtype}{list(info.shape)}; graftcore reads FP8 only as 2-D "
                    f"`.weight` tensors with a scale"
                )
            scale_name = self.scale_name(name, tensors, at)
            scale = tensors.get(scale_name)
            if scale is None:
                raise CheckpointError(f"{at}: tensor {name!r} is {info.dtype} but {scale_name!r} is missing in {ref}")
            if scale.dtype not in SCALE_DTYPES:
                raise CheckpointError(
                    f"{locate(scale.file)}: tensor {scale_name!r} is {scale.dtype}; graftcore reads F32, BF16 or "
                    f"F16 scales"
                )
            block = self.scale_block(info, scale, fmt, locate(scale.file))
            power_of_two = fmt.power_of_two or scale.dtype == "F8_E8M0"  # an E8M0 scale is one
            folded[name] = Quantized(
                name, info.dtype, info.shape, info.file, info.start, info.end, scale, block, self.name, power_of_two
            )
        scales = {q.scale.name for q in folded.values()}
        stray = [n for n in tensors if n.endswith("." + self.suffix) and n not in scales]
        if stray:
            info = tensors[stray[0]]
            raise CheckpointError(f"{locate(info.file)}: tensor {stray[0]!r} is a scale with no FP8 weight beside it")
        return folded

    def scale_name(self, weight: str, tensors: dict, at: str) -> str:
        """The name of `weight`'s scale: `NAME.<suffix>`, or one of the other endings the format allows (transformers
        renames DeepSeek-V4's `.scale` to `.weight_scale_inv` on load); CheckpointError when it has two."""
        stem = weight[: -len("weight")]
        present = [stem + s for s in (self.suffix, *self.other_suffixes) if stem + s in tensors]
        if len(present) > 1:
            raise CheckpointError(f"{at}: tensor {weight!r} has two scales, {present[0]!r} and {present[1]!r}")
        return present[0] if present else stem + self.suffix

    def parts(self, q: Quantized) -> tuple[TensorInfo, ...]:
        return (q, q.scale)

    def check_values(self, q: Quantized, part: TensorInfo, data: bytes, where: str) -> None:
        import numpy as np

        v = scale_values(data, part.dtype)
        if not (v > 0).all() or not np.isfinite(v).all():  # NaN fails the first
            raise CheckpointError(f"{where}: tensor {part.name!r} {BAD_SCALE}")
        if q.power_of_two and not (np.frexp(v)[0] == 0.5).all():
            raise CheckpointError(
                f"{where}: tensor {part.name!r} holds scales that are not powers of two, but "
                f"quantization_config.scale_fmt is 'ue8m0'"
            )

    # -- what a step reads, and decoding it
    def row_band(self, q: Quantized) -> int:
        return q.block[0]

    def row_reads(self, q: Quantized, row0: int, row1: int) -> tuple[tuple[TensorInfo, int, int], ...]:
        return ((q, row0 * q.cols, row1 * q.cols), (q.scale, *scale_range(q, row0, row1)))

    def check_read(self, q: Quantized, k: int, t: torch.Tensor, where: str, role: str = "") -> None:
        import torch

        low, high = torch.aminmax(t.to(torch.float32))
        if not (low.item() > 0 and high.item() < math.inf):  # NaN fails both
            raise CheckpointError(f"{where}: tensor {q.scale.name!r}{f' ({role})' if role else ''} {BAD_SCALE}")

    def decode(self, q: Quantized, parts: list, row0: int, scratch=None, buffer: str = "decoded") -> torch.Tensor:
        import torch

        from graftcore.kernels.fp8 import decode_into, dequantize

        weight, scale = parts
        rows = weight.numel() // q.cols
        if scratch is None:
            return dequantize(weight, scale, row0, q.cols, q.block)
        out = scratch.get(buffer, weight.numel()).view(rows, q.cols)
        index = scratch.get("index", weight.numel(), torch.int32)
        return decode_into(out, weight, scale, row0, q.block, index)

    # -- writing
    def output_entries(self, q: Quantized) -> list[tuple[str, str, tuple[int, ...]]]:
        return [(q.name, q.dtype, q.shape), (q.scale.name, q.scale.dtype, tuple(q.scale.shape))]

    def encoder(self, q: Quantized, where: str, threads=None) -> ScaleGridEncoder:
        return ScaleGridEncoder(q, threads, where)

    # -- the config
    def describe(self) -> str:
        return f"{self.methods[0]!r} {self.label}"

    def read_config(self, config: dict, where: str) -> QuantFormat:
        scale_fmt = config.get("scale_fmt")
        if scale_fmt not in SCALE_FORMATS:
            raise CheckpointError(
                f"{where}: quantization_config.scale_fmt is {scale_fmt!r}; expected 'float' or 'ue8m0' (transformers' "
                f"FineGrainedFP8Config), or none"
            )
        return QuantFormat(
            self.name, config, self.config_block(config, where), scale_fmt == "ue8m0", self.strategies(config)
        )

    def strategies(self, config: dict) -> frozenset[str]:
        return frozenset()

    @property
    def method(self) -> str:
        return self.methods[0]


class BlockFp8(ScaledFp8):
    """Block FP8 (`"quant_method": "fp8"`), scales `weight_scale_inv`."""

    name = "fp8"
    label = "(block FP8)"
    methods = ("fp8",)
    suffix = "weight_scale_inv"
    other_suffixes = ("scale",)  # DeepSeek-V4 (transformers' FineGrainedFP8 quantizer: `^(.+)\.scale` renamed on load)

    def fold(self, tensors: dict[str, TensorInfo], fmt: QuantFormat, locate, ref: str) -> dict[str, Quantized]:
        """Block FP8 weights, and with `"expert_dtype": "fp4"` (DeepSeek-V4) the I8 FP4 experts beside them (their
        codec: codecs/packed4.py's `fp4`)."""
        fp4 = {}
        packed = fmt.config.get("expert_dtype") == "fp4"
        for name, info in tensors.items():
            if info.dtype not in ("I8", "U8") or not name.endswith(".weight") or len(info.shape) != 2:
                continue
            scale = tensors.get(name[: -len("weight")] + "scale")
            if scale is None and not packed:
                continue
            at = locate(info.file)
            if not packed:
                raise CheckpointError(
                    f"{at}: tensor {name!r} is {info.dtype} with a scale {scale.name!r}, but quantization_config's "
                    f"expert_dtype is {fmt.config.get('expert_dtype', 'fp8')!r}: FP4 experts need 'fp4'"
                )
            if scale is None or info.dtype != "I8":
                raise CheckpointError(
                    f"{at}: tensor {name!r} is {info.dtype}{list(info.shape)} in a checkpoint of FP4 experts, but "
                    + (f"{name[: -len('weight')] + 'scale'!r} is missing" if scale is None else "FP4 experts are I8")
                )
            from graftcore.codecs.packed4 import FP4

            fp4[name] = FP4.fold_weight(name, info, scale, at)
        scales = {q.scale.name for q in fp4.values()}
        rest = {n: i for n, i in tensors.items() if n not in fp4 and n not in scales}
        return {**super().fold(rest, fmt, locate, ref), **fp4}

    def read_config(self, config: dict, where: str) -> QuantFormat:
        if config.get("expert_dtype", "fp8") not in ("fp8", "fp4"):
            raise CheckpointError(
                f"{where}: quantization_config.expert_dtype is {config.get('expert_dtype')!r}; graftcore reads fp8 "
                f"and fp4 (DeepSeek-V4) experts"
            )
        if str(config.get("fmt", "e4m3")).lower() != "e4m3":
            raise CheckpointError(f"{where}: quantization_config.fmt is {config.get('fmt')!r}; graftcore reads e4m3")
        return super().read_config(config, where)

    def config_block(self, config: dict, where: str) -> tuple[int, int] | None:
        """weight_block_size (or the default); None for per-tensor scales."""
        block = config.get("weight_block_size", list(DEFAULT_BLOCK))
        if block is None:
            return None  # per tensor
        if positive_pair(block) is None:
            raise CheckpointError(f"{where}: quantization_config.weight_block_size is {block!r}, not two positive ints")
        return positive_pair(block)

    def scale_block(self, weight: TensorInfo, scale: TensorInfo, fmt: QuantFormat, where: str) -> tuple[int, int]:
        """The (rows, cols) of weight elements each scale covers: the config's block, or the whole tensor."""
        rows, cols = weight.shape
        shape = tuple(scale.shape)
        if fmt.block is not None:
            return fitted_block(weight, scale, fmt.block, "weight_block_size", where)
        if shape in ((), (1,), (1, 1)):
            return (rows, cols)  # no block size: one scale for the tensor
        raise CheckpointError(
            f"{where}: tensor {scale.name!r} is {list(shape)}: not a per-tensor, per-channel or block scale of "
            f"{weight.name!r} {list(weight.shape)}"
        )


class CompressedFp8(ScaledFp8):
    """compressed-tensors' "float-quantized" format, scales `weight_scale` per tensor, channel, group or block."""

    name = "float-quantized"
    label = "FP8"
    methods = ("compressed-tensors",)
    format = "float-quantized"
    suffix = "weight_scale"

    def read_config(self, config: dict, where: str) -> QuantFormat:
        for key, weights in group_weights(config):
            kind, bits = weights.get("type", "float"), weights.get("num_bits", 8)
            if kind != "float" or bits != 8:
                raise CheckpointError(
                    f"{where}: quantization_config {key}.weights says type {kind!r}, num_bits {bits!r}; the "
                    f"'float-quantized' format stores 8-bit float (F8_E4M3) weights"
                )
        return super().read_config(config, where)

    def strategies(self, config: dict) -> frozenset[str]:
        """The weight strategies the config declares ("tensor", "channel", "group", "block"); empty when it states
        none (the scales' shapes then say which)."""
        return frozenset(w["strategy"] for _, w in group_weights(config) if isinstance(w.get("strategy"), str))

    def config_block(self, config: dict, where: str) -> tuple[int, int] | None:
        """The weights' `block_structure` ([bh, bw] or "bhxbw", strategy "block") or (1, group_size) (strategy
        "group"); None when the config gives none (per-tensor and per-channel scales say theirs by their shape)."""
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

    def scale_block(self, weight: TensorInfo, scale: TensorInfo, fmt: QuantFormat, where: str) -> tuple[int, int]:
        """The (rows, cols) of weight elements each scale covers, from the scale's shape; CheckpointError when it
        fits neither the config's block nor a per-channel or per-tensor scale, or none of the strategies the config
        declares (none declared: any)."""
        rows, cols = weight.shape
        shape = tuple(scale.shape)
        per_tensor = shape in ((), (1,), (1, 1))
        block = fmt.block
        fits = {  # the strategies that write a scale of this shape
            "tensor": per_tensor,
            "channel": shape in ((rows, 1), (rows,)),
            "group": block is not None and shape == (cdiv(rows, block[0]), cdiv(cols, block[1])),
        }
        fits["block"] = fits["group"]
        if fmt.strategies and not any(fits.get(s, False) for s in fmt.strategies):
            raise CheckpointError(
                f"{where}: tensor {scale.name!r} is {list(shape)}, which is not the scale of {weight.name!r} "
                f"{list(weight.shape)} that quantization_config's strategy {' or '.join(sorted(fmt.strategies))} "
                f"writes"
            )
        if per_tensor:
            return (rows, cols)  # one scale for the tensor
        if fits["channel"] and (block is None or block[0] == 1):
            return (1, cols)  # one per output channel
        if block is not None:
            return fitted_block(weight, scale, block, "block_structure / group_size", where)
        raise CheckpointError(
            f"{where}: tensor {scale.name!r} is {list(shape)}: not a per-tensor, per-channel or block scale of "
            f"{weight.name!r} {list(weight.shape)}"
        )


def fitted_block(weight: TensorInfo, scale: TensorInfo, block: tuple[int, int], key: str, where: str):
    """`block` when the scale grid has the shape that block gives the weight; CheckpointError otherwise."""
    rows, cols = weight.shape
    want = (cdiv(rows, block[0]), cdiv(cols, block[1]))
    if tuple(scale.shape) == want:
        return block
    raise CheckpointError(
        f"{where}: tensor {scale.name!r} is {list(scale.shape)}, but {weight.name!r} {list(weight.shape)} in "
        f"{block[0]}x{block[1]} blocks (quantization_config {key}) needs {list(want)}"
    )


def with_scale(parts: list) -> tuple:
    """(elements, scale rows or None) from an input's stored parts."""
    return (parts[0], parts[1] if len(parts) > 1 else None)


@dataclass
class ScaleGridEncoder:
    """An FP8 output tensor in progress: its new scale grid, filled block row by block row, and what the encoding
    kept of the update (squared norms, float64). `where`: the file to name when a block needs a scale its dtype
    cannot hold; `threads`: the CPU twin's column tiles are encoded on them (kernels/graft/fp8.EncodeThreads)."""

    q: Quantized
    threads: object = None
    where: str = ""
    scale: torch.Tensor = field(init=False)
    rescaled: int = 0
    error_sq: float = 0.0
    update_sq: float = 0.0

    def __post_init__(self):
        import torch

        self.scale = torch.empty(tuple(self.q.scale.shape) or (1,), dtype=torch.float32).view(-1)

    @property
    def blocks(self) -> int:
        return self.scale.numel()

    @property
    def power_of_two(self) -> bool:
        return self.q.power_of_two

    def add(self, row0: int, scale: torch.Tensor, rescaled: int, error_sq: float, update_sq: float) -> None:
        """Record the block rows from `row0` that were encoded: their scales (float32) and measures. NonFiniteError
        when a new scale overflowed its dtype (an F16 scale above 65504): no scale of that dtype holds the block,
        and an Inf scale would decode the block as NaN/Inf."""
        import torch

        if not bool(torch.isfinite(scale).all()):
            q = self.q
            bad = int((~torch.isfinite(scale)).sum())
            raise NonFiniteError(
                f"{self.where or q.file}: tensor {q.name!r}: {bad} block(s) of the grafted values need a "
                f"scale above the largest {q.scale.dtype} value (tensor {q.scale.name!r}), so they cannot be "
                f"written in Instruct's FP8 format; --dtype bfloat16 (or float32) writes the merge dequantized "
                f"(into a new --output, or with --overwrite)"
            )
        first, _ = scale_range(self.q, row0, row0)
        self.scale[first : first + scale.numel()] = scale.reshape(-1)
        self.rescaled += rescaled
        self.error_sq += error_sq
        self.update_sq += update_sq

    def encode(self, out: torch.Tensor, x: torch.Tensor, row0: int, instruct: list, decoded, scratch=None) -> None:
        """Encode the float32 rows `x` (from row `row0`) into `out`; `instruct`: Instruct's stored parts of these
        rows (weight, scale rows), `decoded` the same rows decoded (for the update's norm)."""
        from graftcore.kernels.fp8 import quantize_into

        q = self.q
        rows = x.numel() // q.cols
        kept = instruct[1]
        dtype = torch_dtype(q.scale.dtype)
        enc = quantize_into(
            out, x.view(rows, q.cols), kept, row0, q.block, dtype, q.power_of_two, decoded.view(rows, -1), scratch
        )
        self.add(row0, enc.scale, enc.rescaled, enc.error_sq, enc.update_sq)

    def graft_encode(self, out: torch.Tensor, stored: dict, alphas: list[float], row0: int, roles: list[str]):
        """One step grafted from full deltas and encoded in column tiles shared among the workers (kernels/graft/
        fp8.graft_encode); `stored`: role -> stored parts ([elements] or [weight, scale rows]). Returns the
        NonFinite counts."""
        from graftcore.kernels.fp8 import graft_encode

        q = self.q
        stored = {role: with_scale(parts) for role, parts in stored.items()}
        enc, counts = graft_encode(
            out,
            stored["instruct"],
            stored["base"],
            [stored[r] for r in roles],
            alphas,
            row0,
            q.cols,
            q.block,
            torch_dtype(q.scale.dtype),
            q.power_of_two,
            self.threads,
        )
        self.add(row0, enc.scale, enc.rescaled, enc.error_sq, enc.update_sq)
        return counts

    def on_device(self, out: torch.Tensor, stored: dict, alpha: float, role: str, row0: int, row1: int, device):
        """One step grafted from one full delta and encoded on `device` by the Triton FP8 kernel (the CPU twin's
        bits): the FP8 bytes copied back into `out`, the new scales recorded. Returns the NonFinite counts."""
        import torch

        from graftcore.kernels import NonFinite
        from graftcore.kernels.triton_fp8 import graft_fp8_triton

        q = self.q
        pairs = {role: with_scale(parts) for role, parts in stored.items()}
        raw = {r: (t.to(device), None if s is None else s.to(device, torch.float32)) for r, (t, s) in pairs.items()}
        first, stop = scale_range(q, row0, row1)
        grid = stop - first
        codes = torch.empty(out.numel(), dtype=torch.uint8, device=device)
        scale = torch.empty(grid, dtype=torch.float32, device=device)
        norms = torch.empty(grid, 2, dtype=torch.float64, device=device)
        counts = torch.zeros(3, dtype=torch.int64, device=device)
        graft_fp8_triton(
            codes,
            scale,
            norms,
            counts,
            raw["instruct"],
            raw["base"],
            raw[role],
            q.cols,
            q.block,
            alpha,
            torch_dtype(q.scale.dtype),
            q.power_of_two,
        )
        out.view(torch.uint8).copy_(codes.cpu())
        kept, scale = raw["instruct"][1].cpu(), scale.cpu()
        sums = norms.sum(dim=0).cpu()
        self.add(row0, scale, int((scale != kept).sum()), float(sums[0]), float(sums[1]))
        return NonFinite(*counts.cpu().tolist())

    def write_entry(self, k: int, out: torch.Tensor, lo: int, hi: int) -> None:
        """Elements [lo, hi) of the new scale grid (the one entry added), in the scale's dtype, into `out`."""
        out.copy_(self.scale[lo:hi])

    def entries_for_rows(self, row0: int, row1: int) -> list[tuple[str, int, int, torch.Tensor]]:
        """(entry name, first, stop, values in its dtype) of the new scales of rows [row0, row1), encoded."""
        first, stop = scale_range(self.q, row0, row1)
        return [(self.q.scale.name, first, stop, self.scale[first:stop].to(torch_dtype(self.q.scale.dtype)))]

    def record(self) -> dict:
        return encoding_record("FP8", "3 mantissa bits", self.error_sq, self.update_sq, self.rescaled, self.blocks)


BLOCK_FP8 = register(BlockFp8())
COMPRESSED_FP8 = register(CompressedFp8())
