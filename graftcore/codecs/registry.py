"""The codec protocol and its registry: one codec per stored weight format, keyed by the name its checkpoints'
`quantization_config` gives it (the `quant_method`; compressed-tensors' `format`, the name compressed-tensors
registers its compressors by).

A codec knows everything about its format, so the passes (merge, similarity, verify --recompute, LoRA and DoRA
onto a quantized Instruct) never name one:
- **config**: which `config.json` keys declare it, read and validated into a `QuantFormat`;
- **fold**: which stored tensors form one weight (weight, scales, ...), folded into one `io.Quantized`;
- **values**: checks of the stored scales' values (plan time, numpy; and as a hub shard's bytes arrive);
- **reads**: the stored element ranges that rows [row0, row1) of a weight read, and the rows a step must cover
  together (a scale block's rows);
- **decode** rows to float32, and an **encoder** that writes float32 rows back under the codec's rule, with the
  entries it adds to the output (new scales) and the measure of what encoding kept of the update;
- optionally a **device kernel** (the encoder's `on_device`).

Registering a codec: a module of this package defines it and calls `register(...)`; `graftcore.codecs` imports
the module (its `BUILTIN` list).

Example:
    >>> from graftcore.codecs import codec_for_config
    >>> codec_for_config({"quant_method": "fp8"}, "config.json").name
    'fp8'
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from graftcore.errors import CheckpointError
from graftcore.io.safetensors_file import Quantized, TensorInfo

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class QuantFormat:
    """How an input's weights are stored: the codec's registry name, the `quantization_config` itself, and what
    the codec read from it (`block`: the scale block the config gives; `power_of_two`: new scales must be powers
    of two; `strategies`: the compressed-tensors strategies it declares)."""

    codec: str
    config: dict
    block: tuple[int, int] | None = None
    power_of_two: bool = False
    strategies: frozenset[str] = frozenset()


class Encoder(Protocol):
    """One quantized output tensor in progress, fed whole rows in order (step by step), then asked for the
    tensors it adds to the output (its new scales) and a record of what the encoding kept."""

    def encode(self, out: torch.Tensor, x: torch.Tensor, row0: int, instruct: list, decoded, scratch) -> None:
        """Encode the float32 rows `x` (from row `row0`) into `out`; `instruct`: Instruct's stored parts of these
        rows, as `Codec.row_reads` lists them, and `decoded` the same rows decoded."""

    def graft_encode(self, out: torch.Tensor, stored: dict, alphas: list[float], row0: int, roles: list[str]):
        """Decode, graft I + a1 * (T1 - B) + ... and encode one step in one pass (full deltas only); `stored`:
        role -> that input's stored parts of the step's rows; `roles`: the tuned inputs in order. Returns the
        NonFinite counts."""

    def entries_for_rows(self, row0: int, row1: int) -> list:
        """(entry name, first, stop, values) of the added entries' elements that rows [row0, row1) gave."""

    def write_entry(self, k: int, out: torch.Tensor, lo: int, hi: int) -> None:
        """Elements [lo, hi) of the k-th added output entry (Codec.output_entries(q)[k + 1]) into `out`."""

    def record(self) -> dict:
        """graftcore.json's record of the tensor: what encoding kept of the update (FP8: update_error, ...)."""


class Codec(Protocol):
    """A stored weight format. `name`: the registry key; `methods`: the `quant_method` values whose configs it
    reads; `config_keys`: the config.json keys that declare it (removed where the output is written dequantized);
    `kind`: what it stores, in words; `companion_suffixes`: the name endings of the tensors it folds into a
    weight (a verify counts them apart)."""

    name: str
    kind: str  # what it stores, in words: "FP8"
    methods: tuple[str, ...]
    config_keys: tuple[str, ...]
    companion_suffixes: tuple[str, ...]

    def describe(self) -> str:
        """How messages name the format: "'fp8' (block FP8)"."""

    def claims(self, config: dict) -> bool:
        """Whether this codec reads checkpoints with this `quantization_config`."""

    def read_config(self, config: dict, where: str) -> QuantFormat:
        """The validated format; CheckpointError naming `where` for a config this codec cannot read."""

    def stored_dtypes(self) -> tuple[str, ...]:
        """The dtypes of the weights it stores (the tensors whose presence says a checkpoint is quantized)."""

    def fold(
        self, tensors: dict[str, TensorInfo], fmt: QuantFormat, locate: Callable[[str], str], ref: str
    ) -> dict[str, Quantized]:
        """Each quantized weight of `tensors` with its companions, as one Quantized by the weight's name; the
        companions' names are the `parts` of each. CheckpointError (`locate(file)` names the file) for a missing,
        stray or misshapen companion."""

    def parts(self, q: Quantized) -> tuple[TensorInfo, ...]:
        """The stored tensors of `q`: its weight first, then its companions (a copy of `q` writes them all)."""

    def check_values(self, q: Quantized, part: TensorInfo, data: bytes, where: str) -> None:
        """CheckpointError when the stored bytes of companion `part` hold values the format forbids."""

    def row_band(self, q: Quantized) -> int:
        """Rows that an encoded output's step covers together (a scale block's rows)."""

    def row_reads(self, q: Quantized, row0: int, row1: int) -> tuple[tuple[TensorInfo, int, int], ...]:
        """(stored tensor, first, stop element) of each stored part that rows [row0, row1) read, weight first."""

    def check_read(self, q: Quantized, k: int, t: torch.Tensor, where: str, role: str = "") -> None:
        """CheckpointError when stored part k (> 0) read for a step holds values the format forbids (hub shards
        arrive after the plan; a copied Instruct's companions are checked on the way too)."""

    def decode(self, q: Quantized, parts: list, row0: int, scratch=None, buffer: str = "decoded") -> torch.Tensor:
        """float32 [rows, cols] of the rows from `row0`, from their stored parts (row_reads' order); with
        `scratch`, into its buffer named `buffer` (valid until the next decode into it)."""

    def output_entries(self, q: Quantized) -> list[tuple[str, str, tuple[int, ...]]]:
        """(name, dtype, shape) of the output tensors of `q` written in its own format: the weight, then what the
        encoder adds."""

    def encoder(self, q: Quantized, where: str, threads=None) -> Encoder:
        """An Encoder for an output tensor of `q`'s format; `where`: the file its errors name; `threads`: an
        EncodeThreads (kernels/graft/fp8.py) to spread a step's work on."""


REGISTRY: dict[str, Codec] = {}


def register(codec: Codec) -> Codec:
    """Add `codec` to the registry under its name (a second codec of one name is a bug)."""
    if codec.name in REGISTRY:
        raise ValueError(f"two codecs named {codec.name!r}")
    REGISTRY[codec.name] = codec
    return codec


def codec_named(name: str) -> Codec:
    """The registered codec of that name (KeyError for an unknown one: a Quantized names only registered ones)."""
    return REGISTRY[name]


def codec_of(q: Quantized) -> Codec:
    """The codec of a quantized logical tensor."""
    return REGISTRY[q.codec]


def codec_for_config(config: dict, where: str) -> Codec:
    """The codec that reads checkpoints with this `quantization_config`; CheckpointError naming `where` and what
    graftcore reads when none does."""
    method = config.get("quant_method")
    candidates = [c for c in REGISTRY.values() if isinstance(method, str) and method in c.methods]
    if not candidates:
        readable = " and ".join(c.describe() for c in REGISTRY.values())
        raise CheckpointError(
            f"{where}: quantization_config.quant_method is {method!r}; graftcore reads {readable} checkpoints"
        )
    for codec in candidates:
        if codec.claims(config):
            return codec
    formats = ", ".join(f"{c.name!r} ({c.kind})" for c in candidates)
    raise CheckpointError(f"{where}: {method} format {config.get('format')!r}; graftcore reads {formats}")


def companion_suffixes() -> tuple[str, ...]:
    """The name endings of every codec's companion tensors."""
    return tuple(sorted({s for c in REGISTRY.values() for s in c.companion_suffixes}))
