"""4-bit weights packed two a byte with a scale per group of a row: DeepSeek-V4's FP4 experts and compressed-tensors'
MXFP4, NVFP4 and INT4 (pack-quantized). Decode and encode are kernels/graft/packed4.py's; the formats differ in the
tensors' names, the scale's dtype, the group and a global scale.

The formats (facts from the code that defines them):
- `fp4` (DeepSeek-V4 routed experts; transformers `integrations/finegrained_fp8.py`, FP8Experts with
  `expert_dtype: "fp4"`, Fp8Dequantize._unpack_fp4): `NAME.weight` I8 [out, in / 2], E2M1 low nibble first, and
  `NAME.scale` F8_E8M0 [out, in / 32], inside a block-FP8 checkpoint whose quantization_config says
  `"expert_dtype": "fp4"` (folded by codecs/fp8.py's BlockFp8).
- compressed-tensors `mxfp4-pack-quantized` (compressors/mxfp4): `NAME.weight_packed` U8 [out, in / 2] (E2M1),
  `NAME.weight_scale` U8 [out, in / 32] holding E8M0 exponents (2 ** (byte - 127), mx_utils.decompress_mx_scale).
- compressed-tensors `nvfp4-pack-quantized` (compressors/nvfp4): `NAME.weight_packed` U8 [out, in / 2] (E2M1),
  `NAME.weight_scale` F8_E4M3 [out, in / 16], `NAME.weight_global_scale` F32 [1]; value = q * (scale / global)
  (quantization/lifecycle/forward_helpers._dequantize).
- compressed-tensors `pack-quantized` INT4, symmetric (compressors/pack_quantized, helpers.pack_to_int32):
  `NAME.weight_packed` I32 [out, ceil(in / 8)] (element i at bits 4i of the row's little-endian words, stored as
  value + 8), `NAME.weight_scale` [out, ceil(in / group)] in the weights' dtype, `NAME.weight_shape` [2].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from graftcore.codecs.registry import QuantFormat, register
from graftcore.codecs.values import encoding_record, group_weights, scale_values
from graftcore.errors import CheckpointError, NonFiniteError
from graftcore.io.safetensors_file import Quantized, TensorInfo, torch_dtype
from graftcore.shapes import cdiv

if TYPE_CHECKING:
    import torch

BAD_SCALE = "holds a NaN, Inf, zero or negative scale; a 4-bit weight's scales are positive and finite"


class Packed4:
    """What the 4-bit codecs share. A subclass says its grid, its tensors' names and its scales' dtype."""

    grid = "e2m1"
    kind = "FP4"
    config_keys = ("quantization_config",)
    methods: tuple[str, ...] = ("compressed-tensors",)
    format: str | None = None
    scale_bytes_are_e8m0 = False  # the scale is U8 bytes of E8M0 exponents
    companion_suffixes: tuple[str, ...] = ()

    def claims(self, config: dict) -> bool:
        return config.get("quant_method") in self.methods and config.get("format") == self.format

    def describe(self) -> str:
        return f"'{self.methods[0]}' {self.format}"

    def stored_dtypes(self) -> tuple[str, ...]:
        return ("U8", "I8", "I32")

    # -- parts and reads
    def parts(self, q: Quantized) -> tuple[TensorInfo, ...]:
        return (q.stored or q, q.scale, *q.extra)

    def row_band(self, q: Quantized) -> int:
        return 1

    def row_reads(self, q: Quantized, row0: int, row1: int) -> tuple[tuple[TensorInfo, int, int], ...]:
        per_row = (q.stored or q).shape[-1]  # stored elements of one row
        groups = q.scale.shape[-1]
        reads = [(q, row0 * per_row, row1 * per_row), (q.scale, row0 * groups, row1 * groups)]
        return tuple(reads + [(e, 0, e.numel) for e in self.decode_extras(q)])

    def decode_extras(self, q: Quantized) -> tuple[TensorInfo, ...]:
        """The extra companions decoding reads (the global scale); the others are copied."""
        return ()

    def group(self, q: Quantized) -> int:
        return q.block[1]

    def scale_float(self, scale, dtype: str):
        """float32 values of stored scales (E8M0 bytes as 2 ** (byte - 127))."""
        import torch

        if dtype == "U8" and self.scale_bytes_are_e8m0:
            return torch.ldexp(torch.ones(scale.shape), scale.view(torch.uint8).to(torch.int32) - 127)
        return scale.to(torch.float32)

    def check_read(self, q: Quantized, k: int, t, where: str, role: str = "") -> None:
        import torch

        info = self.parts(q)[k]
        if info.name == q.scale.name or info in self.decode_extras(q):
            v = self.scale_float(t, info.dtype)
            low, high = torch.aminmax(v)
            if not (low.item() > 0 and high.item() < math.inf):
                raise CheckpointError(f"{where}: tensor {info.name!r}{f' ({role})' if role else ''} {BAD_SCALE}")

    def check_values(self, q: Quantized, part: TensorInfo, data: bytes, where: str) -> None:
        import numpy as np

        if part.name.endswith(".weight_shape"):
            values = np.frombuffer(data, "<i8" if part.dtype == "I64" else "<i4").tolist()
            if tuple(values) != tuple(q.shape):
                raise CheckpointError(
                    f"{where}: tensor {part.name!r} says {values}, but {(q.stored or q).name!r} "
                    f"{list((q.stored or q).shape)} with its scale holds {list(q.shape)}"
                )
            return
        if part.name != q.scale.name and part not in self.decode_extras(q):
            return
        if part.dtype == "U8" and self.scale_bytes_are_e8m0:
            v = scale_values(data, "F8_E8M0")
        elif part.dtype == "F8_E4M3":
            import torch

            v = torch.frombuffer(bytearray(data), dtype=torch.float8_e4m3fn).to(torch.float32).numpy()
        else:
            v = scale_values(data, part.dtype)
        if not (v > 0).all() or not np.isfinite(v).all():
            raise CheckpointError(f"{where}: tensor {part.name!r} {BAD_SCALE}")

    def decode(self, q: Quantized, parts: list, row0: int, scratch=None, buffer: str = "decoded"):
        import torch

        from graftcore.kernels.packed4 import decode_rows

        rows = parts[1].numel() // q.scale.shape[-1]
        packed = parts[0].view(-1).view(torch.uint8).view(rows, -1)
        scale = self.scale_float(parts[1], q.scale.dtype).view(rows, -1)
        global_scale = parts[2] if len(parts) > 2 else None
        return decode_rows(packed, scale, q.cols, self.group(q), self.grid, global_scale)

    # -- writing
    def output_entries(self, q: Quantized) -> list[tuple[str, str, tuple[int, ...]]]:
        return [(p.name, p.dtype, tuple(p.shape)) for p in self.parts(q)]

    def encoder(self, q: Quantized, where: str, threads=None) -> Packed4Encoder:
        return Packed4Encoder(q, self, where)

    # -- folding helpers
    def logical(self, name: str, packed: TensorInfo, scale: TensorInfo, cols: int, group: int, extra=(), **kw):
        """The Quantized of a packed weight with `cols` logical columns; CheckpointError for a scale of the wrong
        shape."""
        rows = packed.shape[0]
        want = (rows, cdiv(cols, group))
        if len(packed.shape) != 2 or tuple(scale.shape) != want:
            raise CheckpointError(
                f"{kw.get('where', packed.file)}: tensor {scale.name!r} is {list(scale.shape)}, but {packed.name!r} "
                f"{list(packed.shape)} ({cols} columns in groups of {group}) needs {list(want)}"
            )
        return Quantized(
            name,
            packed.dtype,
            (rows, cols),
            packed.file,
            packed.start,
            packed.end,
            scale,
            (1, group),
            self.name,
            kw.get("power_of_two", False),
            packed,
            tuple(extra),
        )


class CompressedPacked4(Packed4):
    """compressed-tensors' packed formats: `NAME.weight_packed`, `NAME.weight_scale` (and the format's others)."""

    group_size = 32
    scale_dtypes: tuple[str, ...] = ()
    extras: tuple[str, ...] = ()  # further companions by suffix

    @property
    def companion_suffixes(self) -> tuple[str, ...]:
        return (".weight_packed", ".weight_scale", *(f".{e}" for e in self.extras))

    def read_config(self, config: dict, where: str) -> QuantFormat:
        for key, weights in group_weights(config):
            bits, kind = weights.get("num_bits", 4), weights.get("type", "float" if self.grid == "e2m1" else "int")
            if bits != 4 or kind != ("float" if self.grid == "e2m1" else "int"):
                raise CheckpointError(
                    f"{where}: quantization_config {key}.weights says type {kind!r}, num_bits {bits!r}; the "
                    f"{self.format!r} format stores 4-bit {'float' if self.grid == 'e2m1' else 'int'} weights"
                )
            if weights.get("symmetric", True) is not True:
                raise CheckpointError(
                    f"{where}: quantization_config {key}.weights is asymmetric; graftcore reads "
                    f"symmetric {self.format} weights"
                )
        return QuantFormat(self.name, config, None, self.scale_bytes_are_e8m0)

    def config_group(self, config: dict) -> int:
        sizes = {w.get("group_size") for _, w in group_weights(config) if isinstance(w.get("group_size"), int)}
        return next(iter(sizes)) if len(sizes) == 1 else self.group_size

    def fold(self, tensors: dict[str, TensorInfo], fmt: QuantFormat, locate, ref: str) -> dict[str, Quantized]:
        out = {}
        for packed_name, packed in tensors.items():
            if not packed_name.endswith(".weight_packed"):
                continue
            stem = packed_name[: -len("packed")]  # "NAME.weight_"
            at = locate(packed.file)
            scale = tensors.get(stem + "scale")
            if scale is None:
                raise CheckpointError(f"{at}: tensor {packed_name!r} has no {stem + 'scale'!r} in {ref}")
            if scale.dtype not in self.scale_dtypes:
                raise CheckpointError(
                    f"{locate(scale.file)}: tensor {scale.name!r} is {scale.dtype}; {self.format} scales are "
                    f"{' or '.join(self.scale_dtypes)}"
                )
            extra = []
            for suffix in self.extras:
                e = tensors.get(stem[: -len("weight_")] + suffix)
                if e is None:
                    raise CheckpointError(f"{at}: tensor {packed_name!r} has no {stem[:-7] + suffix!r} in {ref}")
                extra.append(e)
            name = stem[:-1]  # "NAME.weight"
            if ignored(name[: -len(".weight")], fmt.config.get("ignore") or []):
                raise CheckpointError(
                    f"{at}: tensor {packed_name!r} is packed, but quantization_config.ignore names its module "
                    f"{name[: -len('.weight')]!r} as left unquantized"
                )
            if name in tensors:
                raise CheckpointError(f"{at}: tensor {name!r} stands beside {packed_name!r}: one weight stored twice")
            q = self.fold_one(name, packed, scale, extra, fmt, at)
            out[name] = q
        stray = [n for n in tensors if n.endswith(".weight_scale") and n[: -len("scale")] + "packed" not in tensors]
        if stray:
            raise CheckpointError(
                f"{locate(tensors[stray[0]].file)}: tensor {stray[0]!r} is a scale with no packed weight"
            )
        return out

    def fold_one(self, name, packed, scale, extra, fmt, at) -> Quantized:
        if packed.dtype != "U8":
            raise CheckpointError(f"{at}: tensor {packed.name!r} is {packed.dtype}; {self.format} packs into U8")
        group = self.config_group(fmt.config)
        return self.logical(
            name, packed, scale, 2 * packed.shape[-1], group, extra, where=at, power_of_two=self.scale_bytes_are_e8m0
        )


class Mxfp4(CompressedPacked4):
    name = format = "mxfp4-pack-quantized"
    scale_dtypes = ("U8",)
    scale_bytes_are_e8m0 = True


class Nvfp4(CompressedPacked4):
    name = format = "nvfp4-pack-quantized"
    group_size = 16
    scale_dtypes = ("F8_E4M3",)
    extras = ("weight_global_scale",)

    def decode_extras(self, q: Quantized) -> tuple[TensorInfo, ...]:
        return q.extra[:1]


class Int4(CompressedPacked4):
    name = format = "pack-quantized"
    grid = "int4"
    kind = "INT4"
    group_size = 128
    scale_dtypes = ("BF16", "F16", "F32")
    extras = ("weight_shape",)

    def fold_one(self, name, packed, scale, extra, fmt, at) -> Quantized:
        if packed.dtype != "I32":
            raise CheckpointError(f"{at}: tensor {packed.name!r} is {packed.dtype}; pack-quantized packs into I32")
        shape = extra[0]
        if tuple(shape.shape) != (2,) or shape.dtype not in ("I32", "I64"):
            raise CheckpointError(f"{at}: tensor {shape.name!r} is {shape.dtype}{list(shape.shape)}, not a [2] shape")
        words = packed.shape[-1]
        groups = scale.shape[-1] if len(scale.shape) == 2 else 0
        group = self.config_group(fmt.config) if groups > 1 else None
        cols = 8 * words if group is None else min(8 * words, groups * group)  # checked against weight_shape
        return self.logical(name, packed, scale, cols, group or cols, extra, where=at)


def ignored(module: str, ignore: list) -> bool:
    """Whether compressed-tensors' `ignore` list names `module`: by its whole name, or a "re:" pattern matched from
    its start (compressed-tensors utils/match.py: `re.match` for "re:" targets, else equality)."""
    import re

    for entry in ignore if isinstance(ignore, list) else ():
        if not isinstance(entry, str):
            continue
        if entry.startswith("re:") and re.match(entry[3:], module):
            return True
        if entry == module:
            return True
    return False


@dataclass
class Packed4Encoder:
    """A 4-bit output tensor in progress: its new scales row by row, what encoding kept of the update, and the
    extras it copies from Instruct (the global scale, the shape)."""

    q: Quantized
    codec: Packed4
    where: str = ""
    scale: torch.Tensor = field(init=False)
    rescaled: int = 0
    error_sq: float = 0.0
    update_sq: float = 0.0
    extras: list = field(default_factory=list)

    def __post_init__(self):
        import torch

        self.scale = torch.empty(tuple(self.q.scale.shape), dtype=torch.float32)

    def encode(self, out, x, row0: int, instruct: list, decoded, scratch=None) -> None:
        import torch

        from graftcore.kernels.packed4 import encode_rows

        q, codec = self.q, self.codec
        rows = x.numel() // q.cols
        kept = codec.scale_float(instruct[1], q.scale.dtype).view(rows, -1)
        global_scale = instruct[2] if len(instruct) > 2 else None
        if global_scale is not None and not self.extras:
            self.extras = [global_scale.clone()]
        packed = q.stored or q
        row_bytes = packed.nbytes // packed.shape[0]
        rounding = torch.float32 if q.power_of_two else torch_dtype(q.scale.dtype)
        enc = encode_rows(
            x.view(rows, q.cols),
            kept,
            q.cols,
            codec.group(q),
            codec.grid,
            row_bytes,
            rounding,
            q.power_of_two,
            global_scale,
            decoded.view(rows, q.cols),
        )
        self.check(enc.scale)
        out.view(torch.uint8).view(rows, row_bytes).copy_(enc.packed)
        self.scale[row0 : row0 + rows] = enc.scale
        self.rescaled += enc.rescaled
        self.error_sq += enc.error_sq
        self.update_sq += enc.update_sq

    def check(self, scale) -> None:
        """NonFiniteError for a new scale the scale's dtype cannot hold."""
        import torch

        high = 2.0**127 if self.q.power_of_two else torch.finfo(torch_dtype(self.q.scale.dtype)).max
        bad = int((~torch.isfinite(scale) | (scale > high)).sum())
        if bad:
            raise NonFiniteError(
                f"{self.where or self.q.file}: tensor {self.q.name!r}: {bad} group(s) of the grafted values need a "
                f"scale {self.q.scale.dtype} cannot hold (tensor {self.q.scale.name!r}); --dtype bfloat16 writes "
                f"the merge dequantized (into a new --output, or with --overwrite)"
            )

    def stored_scale(self, values):
        """`values` (float32) in the scale's stored dtype (E8M0 bytes: the exponent + 127)."""
        import torch

        if self.q.scale.dtype == "U8" and self.codec.scale_bytes_are_e8m0:
            _, e = torch.frexp(values)
            return (e - 1 + 127).to(torch.uint8)
        return values.to(torch_dtype(self.q.scale.dtype))

    def write_entry(self, k: int, out, lo: int, hi: int) -> None:
        import torch

        if k == 0:
            out.copy_(self.stored_scale(self.scale.view(-1)[lo:hi]))
        elif self.codec.parts(self.q)[k + 1].name.endswith("weight_shape"):
            out.copy_(torch.tensor(self.q.shape)[lo:hi])
        else:
            out.copy_(self.extras[0].view(-1)[lo:hi])

    def entries_for_rows(self, row0: int, row1: int) -> list:
        groups = self.q.scale.shape[-1]
        values = self.stored_scale(self.scale[row0:row1].reshape(-1))
        return [(self.q.scale.name, row0 * groups, row1 * groups, values)]

    def record(self) -> dict:
        precision = "1 mantissa bit" if self.codec.grid == "e2m1" else "16 levels per group"
        return encoding_record(
            self.codec.kind, precision, self.error_sq, self.update_sq, self.rescaled, self.scale.numel()
        )


class DeepSeekFp4(Packed4):
    """DeepSeek-V4's FP4 experts (folded by codecs/fp8.py's BlockFp8 inside a block-FP8 checkpoint)."""

    name = "fp4"
    methods = ("fp8",)
    format = "expert_dtype fp4"

    def claims(self, config: dict) -> bool:
        return False  # reached through the block-FP8 config

    def describe(self) -> str:
        return "DeepSeek-V4 FP4 experts"

    def fold_weight(self, name: str, info: TensorInfo, scale: TensorInfo, where: str) -> Quantized:
        """The Quantized of an I8 [out, in / 2] weight with its F8_E8M0 [out, in / 32] scale."""
        if scale.dtype != "F8_E8M0":
            raise CheckpointError(f"{where}: tensor {scale.name!r} is {scale.dtype}; FP4 expert scales are F8_E8M0")
        return self.logical(name, info, scale, 2 * info.shape[-1], 32, where=where, power_of_two=True)


MXFP4 = register(Mxfp4())
NVFP4 = register(Nvfp4())
INT4 = register(Int4())
FP4 = register(DeepSeekFp4())
