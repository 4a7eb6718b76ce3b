"""`graftcore similarity`: how close Base and Instruct are, and how large each fine-tune's update is beside that gap.

Shadow-FT grafts `T - B` onto Instruct because Base and Instruct weights are close. Per tensor, with X the
Instruct model or a tuned input and B the Base model:

    sigma(X, B)   = sum|X - B| / (sum|X| + sum|B|)
    rel L2        = ||X - B|| / ||B||
    cosine        = sum X*B / (||X|| ||B||)
    ratio         = ||T - B|| / ||I - B||          each tuned input's update against the post-training gap

The inputs are streamed as a merge streams them (readers.InputStreamer, the same buffers and memory bound);
nothing is written but the report. Every tensor Instruct and Base share (floating point, selected by
include / exclude / targets) becomes a TensorOp whose steps (steps.op_steps) read Instruct, Base and each full
tuned input over the same element ranges; Instruct's extra vocabulary rows are left out (measured over the
shared rows). An adapter's `T - B` is its low-rank update `s * (B @ A)`, computed for the rows each chunk covers.

Numerics: each chunk is widened to float32 (rows X, B and D = X - B); per row, the sum of |x| and of x^2 are
taken in float32 blocks of 256 elements (an abs pass then block sums; a fused L2 norm per block, squared), and the
block results are reduced in float64 (one float64 reduction per accumulator and chunk) into float64 sums per
tensor (ChunkMath); sum X*B = (sum X^2 + sum B^2 - sum D^2) / 2. The raw sums are kept per
tensor, so an aggregate (a layer, a module kind, the whole model) recomputes each metric from the summed
accumulators, never from averaged metrics.

Example:
    >>> report = graftcore.similarity(base="Llama-3.1-8B", instruct="Llama-3.1-8B-Instruct")   # doctest: +SKIP
    >>> print(report.table())                                                                # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from collections import deque
from concurrent import futures
from dataclasses import asdict, astuple, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from . import __version__, interrupts
from .api import Ref, open_inputs
from .engine import drop_behind
from .interrupts import POLL
from .errors import AdapterError, GraftError, MismatchError, OutputError
from .kernels import CHUNK
from .options import PROJECTIONS, SIMILARITY_OPTIONS, MergeOptions, parse_size
from .plan import Action, DeltaInput, TensorOp, Term, strip_wrappers
from .readers import BUFFER_BYTES, DEPTH, WORKERS, InputStreamer, read_elements
from .safetensors_io import FLOAT_DTYPES, TensorInfo, itemsize
from .sources import Checkpoint
from .steps import files_read, op_inputs, op_steps

KINDS = (*PROJECTIONS, "embed", "lm_head", "norm", "other")  # the order of the table and the plot
LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
BLOCK = 256  # float32 terms summed into one partial sum before the float64 reduction
FIGURE_INCHES, FIGURE_DPI = (8.0, 4.5), 100
FIGURE_PX = (800, 450)  # the PNG's width and height: FIGURE_INCHES * FIGURE_DPI
JSON_NAME, PNG_NAME = "similarity.json", "similarity.png"


def module_kind(name: str) -> str:
    """q_proj ... down_proj, embed, lm_head, norm or other, from a tensor name."""
    parts = name.split(".")
    for p in PROJECTIONS:
        if p in parts:
            return p
    if "lm_head" in parts or "embed_out" in parts:
        return "lm_head"
    if any("embed" in p or p in ("wte", "wpe") for p in parts):
        return "embed"
    if any("norm" in p or p.startswith("ln_") or p == "ln" for p in parts):
        return "norm"
    return "other"


def layer_index(name: str) -> int | None:
    """N of `layers.N.` / `h.N.` / `blocks.N.` in a tensor name; None for tensors outside the layers."""
    m = LAYER.search(name)
    return int(m.group(1)) if m else None


def ratio_of(num: float, den: float) -> float:
    """num / den, with 0 / 0 = 0 (two all-zero tensors are identical) and x / 0 = inf."""
    if num == 0 and den == 0:
        return 0.0
    return num / den if den != 0 else math.inf


@dataclass
class Sums:
    """The raw float64 sums of one pair (X, Base) over some elements. Sums add, so the metrics of any set of
    tensors are recomputed exactly from the sums of its members."""

    abs_x: float = 0.0  # sum |X|
    abs_base: float = 0.0  # sum |B|
    abs_diff: float = 0.0  # sum |X - B|
    sq_x: float = 0.0  # sum X^2
    sq_base: float = 0.0  # sum B^2
    sq_diff: float = 0.0  # sum (X - B)^2

    def __add__(self, other: "Sums") -> "Sums":
        return Sums(*(a + b for a, b in zip(astuple(self), astuple(other))))

    @property
    def dot(self) -> float:
        """sum X*B = (sum X^2 + sum B^2 - sum (X - B)^2) / 2: no cancellation where X is close to B (the result is
        about sum B^2), and exact for X = B (sum B^2) and X = -B (-sum B^2)."""
        return (self.sq_x + self.sq_base - self.sq_diff) / 2

    @property
    def sigma(self) -> float:
        return ratio_of(self.abs_diff, self.abs_x + self.abs_base)

    @property
    def rel_l2(self) -> float:
        return ratio_of(math.sqrt(self.sq_diff), math.sqrt(self.sq_base))

    @property
    def cosine(self) -> float:
        norms = math.sqrt(self.sq_x) * math.sqrt(self.sq_base)
        return self.dot / norms if norms > 0 else math.nan

    def to_json(self) -> dict:
        """The raw sums, and sum X*B derived from them."""
        return {**asdict(self), "dot": self.dot}


@dataclass
class Stats:
    """One tensor or a group of tensors: element count and the sums of each pair, by the role of X
    (`instruct`, then `tuned`, `tuned2`, ...)."""

    name: str
    tensors: int = 0
    numel: int = 0
    pairs: dict[str, Sums] = field(default_factory=dict)

    def add(self, other: "Stats") -> None:
        self.tensors += other.tensors
        self.numel += other.numel
        for role, s in other.pairs.items():
            self.pairs[role] = self.pairs.get(role, Sums()) + s

    def ratio(self, role: str) -> float:
        """||T - B|| / ||I - B|| for tuned input `role`."""
        return ratio_of(math.sqrt(self.pairs[role].sq_diff), math.sqrt(self.pairs["instruct"].sq_diff))

    def metrics(self, role: str) -> dict[str, float]:
        s = self.pairs[role]
        out = {"sigma": s.sigma, "rel_l2": s.rel_l2, "cosine": s.cosine}
        if role != "instruct":
            out["ratio"] = self.ratio(role)
        return out

    def to_json(self) -> dict:
        return {
            "tensors": self.tensors,
            "numel": self.numel,
            "pairs": {role: {**finite(self.metrics(role)), "sums": finite(s.to_json())} for role, s in self.pairs.items()},
        }


@dataclass
class TensorStats(Stats):
    kind: str = "other"
    layer: int | None = None
    shape: tuple[int, ...] = ()  # Instruct's
    rows: int | None = None  # the shared rows measured, when Instruct has more (a grown vocabulary)
    dtypes: dict[str, str] = field(default_factory=dict)  # role -> safetensors dtype ("lora" for an adapter update)

    def to_json(self) -> dict:
        return {"kind": self.kind, "layer": self.layer, "shape": list(self.shape), "measured_rows": self.rows,
                "dtypes": self.dtypes, **super().to_json()}


def finite(d: dict) -> dict:
    """NaN / inf as None: strict JSON has neither."""
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in d.items()}


@dataclass
class SimilarityReport:
    """What `graftcore.similarity` measured: per tensor, per layer, per module kind and for the whole model.

    `roles`: `instruct`, then each tuned input's role; `tensors`: TensorStats in Instruct's order; `model`,
    `kinds` (kind -> Stats), `layers` (layer index or None -> Stats), `layer_kinds` ((layer, kind) -> Stats);
    `skipped`: (name, reason) of the tensors not measured; `notes`: one-line notes (grown vocabularies,
    NaN/Inf found, a missing matplotlib); `json_path` / `png_path`: the files written under `output`.
    """

    roles: list[str]
    tensors: list[TensorStats]
    model: Stats
    kinds: dict[str, Stats]
    layers: dict[int | None, Stats]
    layer_kinds: dict[tuple[int | None, str], Stats]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    inputs: dict[str, dict] = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    seconds: float = 0.0
    reads: dict[str, dict[str, int]] = field(default_factory=dict)  # per input: bytes read direct / from the cache
    timings: dict[str, float] = field(default_factory=dict)  # seconds: stream, wait_input, wait_compute, read_ROLE
    output: Path | None = None
    json_path: Path | None = None
    png_path: Path | None = None

    def groups(self) -> list[tuple[str, Stats]]:
        """(label, Stats) rows of the table: the whole model, each module kind, each layer, then no layer."""
        rows = [("model", self.model)]
        rows += [(k, self.kinds[k]) for k in KINDS if k in self.kinds]
        rows += [(f"layer {n}", self.layers[n]) for n in sorted(n for n in self.layers if n is not None)]
        if None in self.layers:
            rows.append(("no layer", self.layers[None]))
        return rows

    def table(self) -> str:
        """The report as a terminal table: a header, then the whole model, each module kind, each layer."""
        header = ["", "tensors", "params", "σ(I,B)", "‖I-B‖/‖B‖", "cos(I,B)"]
        for role in self.roles[1:]:
            header += [f"σ({role},B)", f"‖{role}-B‖/‖B‖", f"cos({role},B)", f"‖{role}-B‖/‖I-B‖"]
        lines = []
        for label, s in self.groups():
            row = [label, str(s.tensors), count(s.numel)]
            for role in self.roles:
                m = s.metrics(role)
                row += [percent(m["sigma"]), number(m["rel_l2"]), f"{m['cosine']:.6f}"]
                if role != "instruct":
                    row.append(number(m["ratio"]))
            lines.append(row)
        widths = [max(len(r[c]) for r in [header, *lines]) for c in range(len(header))]

        def fmt(r):
            return "  ".join(r[0].ljust(widths[0]) if c == 0 else r[c].rjust(widths[c]) for c in range(len(r)))

        return "\n".join(fmt(r).rstrip() for r in [header, *lines])

    def summary(self) -> str:
        """One line: the whole model's sigma(I, B), tensors, seconds."""
        return (f"sigma(instruct, base) = {percent(self.model.pairs['instruct'].sigma)} over {self.model.tensors} tensors "
                f"({count(self.model.numel)} parameters); {len(self.skipped)} not measured; {self.seconds:.1f} s")

    def to_json(self) -> dict:
        def layer_key(n):
            return "none" if n is None else str(n)

        return {
            "graftcore_version": __version__,
            "metrics": {
                "sigma": "sum|X - B| / (sum|X| + sum|B|)",
                "rel_l2": "||X - B|| / ||B||",
                "cosine": "sum X*B / (||X|| ||B||)",
                "ratio": "||T - B|| / ||I - B|| (tuned inputs only)",
                "sums": "float64 sums over the measured elements; X is the pair's role (instruct or a tuned input)",
            },
            "inputs": self.inputs,
            "options": self.options,
            "seconds": round(self.seconds, 3),
            "reads": self.reads,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "notes": self.notes,
            "skipped": [{"name": n, "reason": r} for n, r in self.skipped],
            "model": self.model.to_json(),
            "kinds": {k: s.to_json() for k, s in self.kinds.items()},
            "layers": {layer_key(n): s.to_json() for n, s in self.layers.items()},
            "layer_kinds": {f"{layer_key(n)}/{k}": s.to_json() for (n, k), s in self.layer_kinds.items()},
            "tensors": {t.name: t.to_json() for t in self.tensors},
        }


def percent(x: float) -> str:
    return f"{100 * x:.3f}%" if math.isfinite(x) else str(x)


def number(x: float) -> str:
    return f"{x:#.4g}" if math.isfinite(x) else str(x)


def count(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


# ---------------------------------------------------------------- what to measure


class MeasureOp(TensorOp):
    """A TensorOp that reads Base even without a full tuned term (Instruct against Base alone, or adapters only):
    op_steps then reads Instruct, Base and each full tuned input over the same ranges, as for a graft."""

    __slots__ = ()

    @property
    def reads_base(self) -> bool:
        return self.base is not None


@dataclass
class Measured:
    """One tensor to measure: its op (reads), and for each tuned input in order how `T - B` is had:
    ("full", Term) read by the op, ("lowrank", LowRankUpdate) from an adapter's factors, or ("zero", None) for a
    tensor an adapter leaves as Base's."""

    op: MeasureOp
    shape: tuple[int, ...]
    rows: int | None
    sources: list[tuple[str, str, object]]  # (role, how, Term | LowRankUpdate | None)


@dataclass
class MeasurePlan:
    measured: list[Measured]
    skipped: list[tuple[str, str]]
    notes: list[str]


def plan_similarity(checkpoints: dict[str, Checkpoint], deltas: list[DeltaInput], opts: MergeOptions) -> MeasurePlan:
    """Which tensors to measure and how each input is read; MismatchError / AdapterError before anything is read."""
    from .lora import adapter_terms

    instruct, base = checkpoints["instruct"], checkpoints["base"]
    notes: list[str] = []
    skipped: list[tuple[str, str]] = []
    base_t = strip_wrappers(base, instruct.tensors, "base", notes)
    sources = []  # (delta, full tensors by Instruct name, low-rank updates by Instruct name)
    for d in deltas:
        if d.adapter is None:
            sources.append((d, strip_wrappers(d.checkpoint, instruct.tensors, d.role, notes), {}))
            continue
        full, updates = adapter_terms(d.adapter, instruct, base, notes)
        dora = next((u for u in updates.values() if u.magnitude is not None), None)
        if dora is not None:
            raise AdapterError(
                f"{dora.where}: DoRA adapter (tensor {dora.magnitude.name!r}): graftcore similarity does not measure "
                f"DoRA updates yet; merge the adapter into Base (PEFT merge_and_unload) and pass that model as --tuned"
            )
        sources.append((d, full, updates))

    def locate(role: str, info: TensorInfo | None) -> str:
        return checkpoints[role].ref if info is None else checkpoints[role].locate(info.file)

    measured = []
    for name, i in instruct.tensors.items():
        b = base_t.get(name)
        if not opts.selects(name):
            skipped.append((name, "not selected"))
            continue
        if i.dtype not in FLOAT_DTYPES:
            skipped.append((name, f"{i.dtype} in Instruct; measured: F16, BF16, F32"))
            continue
        if b is None:
            skipped.append((name, "in Instruct, not in base"))
            continue
        if b.dtype not in FLOAT_DTYPES:
            raise MismatchError(f"{locate('base', b)}: tensor {name!r} is {b.dtype} in base but {i.dtype} in Instruct "
                                f"(--exclude it to skip it)")
        rows = shared_rows(name, i, b, locate)
        if rows is not None:
            notes.append(f"{name}: Instruct has {i.shape[0] - rows} more rows than base (a grown vocabulary); "
                         f"measured over the {rows} shared rows")
        terms, how = [], []
        for d, full, updates in sources:
            t, u = full.get(name), updates.get(name)
            if t is None and d.adapter is None:
                raise MismatchError(f"{locate('base', b)}: tensor {name!r} is in base but not in {d.role} "
                                    f"({locate(d.role, None)}); --exclude it to skip it")
            if t is not None:
                if t.shape != b.shape or t.dtype not in FLOAT_DTYPES:
                    raise MismatchError(f"{locate(d.role, t)}: tensor {name!r} is {t.dtype}{list(t.shape)} in {d.role} "
                                        f"but {b.dtype}{list(b.shape)} in base ({locate('base', b)})")
                term = Term(d.role, 1.0, t)
                terms.append(term)
                how.append((d.role, "full", term))
            elif u is not None:
                if u.rows != b.shape[0] or u.rows * u.cols != b.numel:
                    raise MismatchError(f"{u.where}: the update of {name!r} covers {u.rows} x {u.cols}, but base "
                                        f"({locate('base', b)}) has {list(b.shape)}")
                how.append((d.role, "lowrank", u))
            else:
                how.append((d.role, "zero", None))
        info = i if rows is None else i._replace(shape=b.shape, end=i.start + b.numel * itemsize(i.dtype))
        op = MeasureOp(name, Action.GRAFT, info.dtype, info, b, tuple(terms))
        measured.append(Measured(op, tuple(i.shape), rows, how))
    seen = set(instruct.tensors)
    for role, tensors in [("base", base_t), *((d.role, full) for d, full, _ in sources if d.adapter is None)]:
        skipped += [(n, f"in {role}, not in Instruct") for n in tensors if n not in seen]
    return MeasurePlan(measured, skipped, notes)


def shared_rows(name: str, i: TensorInfo, b: TensorInfo, locate) -> int | None:
    """None when Instruct and Base have one shape; Base's rows when only Instruct's dim 0 is larger (a grown
    vocabulary); MismatchError for any other difference."""
    if i.shape == b.shape:
        return None
    if len(i.shape) == len(b.shape) >= 1 and i.shape[1:] == b.shape[1:] and i.shape[0] > b.shape[0]:
        return b.shape[0]
    hint = ""
    if len(i.shape) == len(b.shape) >= 1 and i.shape[1:] == b.shape[1:]:
        hint = "; were --base and --instruct swapped? (Instruct may have more rows than Base, never fewer)"
    raise MismatchError(f"{locate('instruct', i)}: tensor {name!r} is {list(i.shape)} in Instruct but {list(b.shape)} "
                        f"in base ({locate('base', b)}){hint}")


# ---------------------------------------------------------------- the chunk math


class ChunkMath:
    """The accumulators of one chunk in a few passes over preallocated float32 rows.

    Rows of `x`: X_0 .. X_m-1 (Instruct, then each tuned input), B, then D_k = X_k - B. Per row, in float32
    blocks of BLOCK elements: the sum of |x| (one abs pass over all rows, then block sums) and the L2 norm (one
    fused square-and-add pass over all rows, squared afterwards); the block results are reduced in float64:
    [sum|X_k|.., sum|B|, sum|D_k|.., sum X_k^2.., sum B^2, sum D_k^2..]. sum X_k*B follows (Sums.dot).
    """

    def __init__(self, chunk: int, m: int):
        self.m = m
        cap = -(-chunk // BLOCK) * BLOCK
        width = 1 + 2 * m
        self.x = torch.empty(width, cap)
        self.blocks = torch.empty(2 * width, cap // BLOCK)

    def rows(self, n: int) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """(B's row, the X rows, the X - B rows), `n` elements each, for the caller to fill."""
        m = self.m
        return self.x[m, :n], [self.x[k, :n] for k in range(m)], [self.x[m + 1 + k, :n] for k in range(m)]

    def sums(self, n: int, diffs: list[int]) -> torch.Tensor:
        """The float64 sums of the first `n` elements, once B and the X rows are filled; `diffs`: the k whose
        X_k - B is computed here (the others were filled by the caller)."""
        m, width = self.m, 1 + 2 * self.m
        pad = -(-n // BLOCK) * BLOCK
        if pad > n:  # zeros add nothing to any sum
            self.x[:, n:pad].zero_()
        x = self.x[:, :pad]
        if len(diffs) == m:
            torch.sub(x[:m], x[m: m + 1], out=x[m + 1:])
        else:
            for k in diffs:
                torch.sub(x[k], x[m], out=x[m + 1 + k])
        nb = pad // BLOCK
        blocks = self.blocks[:, :nb]
        torch.linalg.vector_norm(x.view(width, nb, BLOCK), 2, dim=2, out=blocks[width:])
        torch.sum(x.abs_().view(width, nb, BLOCK), dim=2, out=blocks[:width])  # the rows are refilled next chunk
        blocks[width:].square_()
        return blocks.sum(dim=1, dtype=torch.float64)

    @staticmethod
    def pairs(sums: list[float], roles: list[str]) -> dict[str, Sums]:
        """The Sums of each pair (X_k, B) from the accumulators in the order `sums` returns them."""
        m = len(roles)
        width = 1 + 2 * m
        return {role: Sums(abs_x=sums[k], abs_base=sums[m], abs_diff=sums[m + 1 + k], sq_x=sums[width + k],
                           sq_base=sums[width + m], sq_diff=sums[width + m + 1 + k]) for k, role in enumerate(roles)}


def lowrank_into(out: torch.Tensor, left: torch.Tensor, right: torch.Tensor, scale: float, lo: int, hi: int, cols: int) -> None:
    """out = scale * (left @ right) over the flat elements [lo, hi) of the [rows, cols] update: the end of a row
    begun in an earlier chunk, whole rows, the start of a row the next chunk ends (each a float32 GEMM)."""
    r0, c0 = divmod(lo, cols)
    n, pos = hi - lo, 0
    if c0:
        c1 = min(cols, c0 + n)
        torch.mm(left[r0: r0 + 1], right[:, c0:c1], out=out[: c1 - c0].view(1, c1 - c0))
        pos, r0 = c1 - c0, r0 + 1
    whole = (n - pos) // cols
    if whole:
        torch.mm(left[r0: r0 + whole], right, out=out[pos: pos + whole * cols].view(whole, cols))
        pos, r0 = pos + whole * cols, r0 + whole
    if pos < n:
        torch.mm(left[r0: r0 + 1], right[:, : n - pos], out=out[pos:n].view(1, n - pos))
    out.mul_(scale)


# ---------------------------------------------------------------- the API


def similarity(
    *,
    base: Ref,
    instruct: Ref,
    tuned: Ref | Sequence[Ref] | None = None,
    output: Ref | None = None,
    **options,
) -> SimilarityReport:
    """Measure how close Instruct is to Base, tensor by tensor, and how large each tuned input's update is.

    Args:
        base, instruct: local folders, `.safetensors` files or hub ids `org/name[@revision]`.
        tuned: None, or one such REF or PEFT LoRA adapter folder, or a list of them (fine-tunes of Base).
        output: a folder to write `similarity.json` (every tensor's metrics and raw sums, the aggregates,
            inputs, options) and `similarity.png` (sigma(I, B) per layer per module kind; needs matplotlib).
        **options: include, exclude, targets (the tensors to measure, as for `graft`), token, cache_dir,
            quiet, chunk_size, read_buffer, read_depth, read_workers.

    Returns:
        A SimilarityReport; `report.table()` is the table `graftcore similarity` prints.

    Raises:
        GraftError (or a subclass), naming the file and tensor, before any weight is read; AdapterError for a
        DoRA adapter (not measured yet).

    Example:
        >>> r = graftcore.similarity(base="demo/base", instruct="demo/instruct", tuned="demo/tuned")  # doctest: +SKIP
        >>> r.model.metrics("instruct")["sigma"]                                                       # doctest: +SKIP
    """
    t0 = time.perf_counter()
    unknown = sorted(set(options) - set(SIMILARITY_OPTIONS))
    if unknown:
        raise GraftError(f"similarity: unknown option(s) {', '.join(unknown)} (it takes {', '.join(SIMILARITY_OPTIONS)})")
    opts = MergeOptions(**options)
    if base is None:
        raise GraftError("--base is required: similarity measures Instruct (and each tuned input) against Base")
    if tuned is None:
        refs = []
    elif isinstance(tuned, (str, os.PathLike)):
        refs = [tuned]
    elif isinstance(tuned, (list, tuple)) and all(isinstance(r, (str, os.PathLike)) for r in tuned):
        refs = list(tuned)
    else:
        raise GraftError(f"tuned: expected None, a REF or a list of REFs (folders, files, hub ids), got {tuned!r}")
    for role, ref in (("instruct", instruct), ("base", base), ("output", output)):
        if not isinstance(ref, (str, os.PathLike)) and not (role == "output" and ref is None):
            raise GraftError(f"{role}: expected a folder, file or hub id, got {ref!r}")
    out = Path(output) if output is not None else None
    if out is not None and out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder; --output names the folder for {JSON_NAME}")
    checkpoints, deltas = open_inputs(instruct, refs, base, opts)
    plan = plan_similarity(checkpoints, deltas, opts)
    if not plan.measured:
        raise GraftError(f"{checkpoints['instruct'].ref}: no tensor to measure (none that Instruct and Base share is "
                         f"floating point and selected by --include / --exclude / --targets)")
    if out is not None:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"{out}: cannot create the folder ({e.strerror or e})") from None
        if not os.access(out, os.W_OK):
            raise OutputError(f"{out}: not writable")
    roles = ["instruct", *(d.role for d in deltas)]
    tensors, reads, timings = measure(plan, checkpoints, roles, opts)
    notes = list(plan.notes)
    for t in tensors:
        bad = [role for role, s in t.pairs.items() if not all(math.isfinite(v) for v in astuple(s))]
        if bad:
            notes.append(f"{t.name}: NaN/Inf in {' and '.join(bad)} or base; its metrics are NaN")
    report = aggregate(tensors, roles)
    report.skipped, report.notes, report.reads, report.timings = plan.skipped, notes, reads, timings
    report.inputs = {role: {"ref": ck.ref, "revision": ck.revision, "fingerprint": ck.fingerprint} for role, ck in checkpoints.items()}
    report.options = {k: v for k, v in asdict(opts).items() if k in SIMILARITY_OPTIONS and k not in ("token", "quiet")}
    report.seconds = time.perf_counter() - t0
    if out is not None:
        report.output = out
        write_report(report, out)
    return report


def measure(plan: MeasurePlan, checkpoints: dict[str, Checkpoint], roles: list[str], opts: MergeOptions):
    """Stream every op of `plan` through the input streamer; return (TensorStats in order, bytes read per input,
    seconds). The main thread takes each step's reads in plan order and hands the step to the compute threads."""
    ops = [m.op for m in plan.measured]
    chunk = opts.chunk_size or CHUNK
    order: dict[str, dict[str, None]] = {role: {} for role in checkpoints}
    for op in ops:
        for role, file in files_read(op):
            order[role][file] = None
    for role, ck in checkpoints.items():  # hub inputs download ahead, in the order they are read
        ck.schedule(list(order[role]), Path(".graftcore-downloads") / role)
    total = sum(info.nbytes if info.numel else 0 for op in ops for _, info in op_inputs(op))
    buffer_bytes = parse_size(opts.read_buffer, "--read-buffer") if opts.read_buffer else BUFFER_BYTES
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="similarity", disable=True if opts.quiet else None, leave=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # parallel over chunks (ComputePool), not inside each op: OpenMP threads spinning
    streamer = pool = None  # beside the readers made a 2-core machine several times slower
    try:
        with interrupts.deferred():
            streamer = InputStreamer(checkpoints, ops, chunk, False, drop_behind(total), buffer_bytes,
                                     opts.read_depth or DEPTH + 1, opts.read_workers or WORKERS)  # + 1: the buffers
            # the steps in flight in the ComputePool hold would otherwise leave the readers waiting for a free one
            pool = ComputePool(COMPUTE_THREADS, chunk, len(roles))
            # The steps the main thread has taken but not yet handed over pin their read buffers: they must span
            # fewer buffers than a reader's ring holds, or the next take() would wait for one only it can free.
            depth = max(opts.read_depth or DEPTH + 1, (opts.read_workers or WORKERS) + 1)
            largest = max(min(info.numel, chunk) * itemsize(info.dtype) for op in ops for _, info in op_inputs(op))
            per_task = next(s for s in range(STEPS_PER_TASK, 0, -1)
                            if s == 1 or min(s, -(-s * largest // streamer.raw_bytes) + 1) <= depth - 1)
            t0 = time.perf_counter()
            accs = [stream_tensor(m, streamer, pool, checkpoints, chunk, per_task, bar) for m in plan.measured]
            pool.drain()
            waited = streamer.waited()
            timings = {"stream": time.perf_counter() - t0, "wait_input": waited, "wait_compute": pool.waited,
                       **streamer.timings()}
            reads = streamer.bytes_read()
            streamer.close()
            streamer = None
        for role, file in sorted({rf for op in ops for rf in files_read(op)}):  # nothing changed under us
            checkpoints[role].verify_unchanged(file)
    finally:
        torch.set_num_threads(threads)
        bar.close()
        if pool is not None:
            pool.close()
        if streamer is not None:
            streamer.close()
    return [tensor_stats(m, ChunkMath.pairs(acc.tolist(), roles)) for m, acc in zip(plan.measured, accs)], reads, timings


COMPUTE_THREADS = min(4, os.cpu_count() or 1)  # torch releases the GIL inside each op: chunks compute in parallel


class ComputePool:
    """Chunks computed on a few threads, each with its own ChunkMath; each task's float64 sums (a few consecutive
    steps of one tensor, added in step order) are added to its tensor's accumulator by the main thread in
    submission order, so the sums do not depend on which thread computed what. At most `threads + 1` tasks are
    in flight (each holds its reads' buffers until computed)."""

    def __init__(self, threads: int, chunk: int, m: int):
        self.chunk, self.m = chunk, m
        self.local = threading.local()
        self.executor = futures.ThreadPoolExecutor(threads, thread_name_prefix="graftcore-similarity")
        self.pending: deque = deque()
        self.limit = threads + 1
        self.waited = 0.0  # seconds the main thread waited for a chunk to be computed

    def math(self) -> ChunkMath:
        """This thread's ChunkMath."""
        math_ = getattr(self.local, "math", None)
        if math_ is None:
            math_ = self.local.math = ChunkMath(self.chunk, self.m)
        return math_

    def submit(self, acc: torch.Tensor, fn, *args) -> None:
        """Compute `fn(self.math(), *args)` (float64 sums) on a thread; add it to `acc` in submission order."""
        self.pending.append((self.executor.submit(lambda: fn(self.math(), *args)), acc))
        while len(self.pending) > self.limit:
            self._collect()

    def _collect(self) -> None:
        done, acc = self.pending.popleft()
        t0 = time.perf_counter()
        while True:
            try:
                sums = done.result(timeout=POLL)
                break
            except futures.TimeoutError:
                interrupts.check()
        self.waited += time.perf_counter() - t0
        acc += sums

    def drain(self) -> None:
        while self.pending:
            self._collect()

    def close(self) -> None:
        """Wait for the chunks being computed (they release their buffers); drop the others."""
        self.executor.shutdown(wait=True, cancel_futures=True)


def stream_tensor(m: Measured, streamer: InputStreamer, pool: ComputePool, checkpoints, chunk: int, per_task: int,
                  bar) -> torch.Tensor:
    """Take the reads of every step of `m` in order and hand them to the pool `per_task` steps at a time; returns
    the tensor's accumulator (complete once the pool is drained)."""
    op = m.op
    loaded = {}
    for role, how, u in m.sources:
        if how == "lowrank":
            ck = checkpoints[role]
            loaded[role] = u.load(lambda info, ck=ck: read_elements(ck.shard_path(info.file), info), allow_nonfinite=True)
    acc = torch.zeros(2 + 4 * pool.m, dtype=torch.float64)  # ChunkMath.sums: 2 * (1 + 2m)
    cols = op.numel // op.shape[0] if op.shape and op.shape[0] else 1
    diffs = [0] + [k for k, (_, how, _) in enumerate(m.sources, start=1) if how == "full"]  # X - B to compute
    batch: list = []
    for step in op_steps(op, chunk, streamer.raw_bytes):
        interrupts.check()
        batch.append((step, [streamer.take(r) for r in step.reads]))
        if len(batch) == per_task:
            pool.submit(acc, compute_steps, m.sources, batch, loaded, cols, diffs)
            batch = []
        bar.update(sum(r.end_byte - r.start_byte for r in step.reads))
    if batch:
        pool.submit(acc, compute_steps, m.sources, batch, loaded, cols, diffs)
    return acc


STEPS_PER_TASK = 4  # steps handed to a compute thread at once (at most): fewer thread hand-offs per byte


def compute_steps(math_: ChunkMath, sources, batch: list, loaded: dict, cols: int, diffs: list[int]) -> torch.Tensor:
    """The float64 sums of a few consecutive steps of one tensor (on a compute thread), added in step order;
    each step's read buffers are released once it is computed."""
    total = None
    for k, (step, held) in enumerate(batch):
        try:
            sums = compute_step(math_, sources, step, held, loaded, cols, diffs)
        except BaseException:
            for _, later in batch[k + 1:]:
                for h in later:
                    h.release()
            raise
        total = sums if total is None else total.add_(sums)
    return total


def compute_step(math_: ChunkMath, sources, step, held, loaded: dict, cols: int, diffs: list[int]) -> torch.Tensor:
    """The float64 sums of one step; releases the step's read buffers."""
    try:
        views = {read.role: h.tensor(read.info) for read, h in zip(step.reads, held)}
        n = step.hi - step.lo
        b, xs, ds = math_.rows(n)
        b.copy_(views["base"])
        xs[0].copy_(views["instruct"])
        for k, (role, how, _) in enumerate(sources, start=1):
            if how == "full":
                xs[k].copy_(views[role])
                continue
            if how == "lowrank":
                f = loaded[role]
                lowrank_into(ds[k], f.left, f.right, f.scale, step.lo, step.hi, cols)
            else:
                ds[k].zero_()
            torch.add(b, ds[k], out=xs[k])
        return math_.sums(n, diffs)
    finally:
        for h in held:
            h.release()


def tensor_stats(m: Measured, pairs: dict[str, Sums]) -> TensorStats:
    op = m.op
    dtypes = {"instruct": op.instruct.dtype, "base": op.base.dtype}
    for role, how, src in m.sources:
        dtypes[role] = src.tuned.dtype if how == "full" else "lora" if how == "lowrank" else "adapter: unchanged"
    return TensorStats(op.name, 1, op.numel, pairs, kind=module_kind(op.name), layer=layer_index(op.name),
                       shape=m.shape, rows=m.rows, dtypes=dtypes)


def aggregate(tensors: list[TensorStats], roles: list[str]) -> SimilarityReport:
    """The whole model, per module kind, per layer and per (layer, kind), from the tensors' summed sums."""
    model = Stats("model")
    kinds: dict[str, Stats] = {}
    layers: dict[int | None, Stats] = {}
    layer_kinds: dict[tuple[int | None, str], Stats] = {}
    for t in tensors:
        model.add(t)
        kinds.setdefault(t.kind, Stats(t.kind)).add(t)
        layers.setdefault(t.layer, Stats(f"layer {t.layer}")).add(t)
        layer_kinds.setdefault((t.layer, t.kind), Stats(f"layer {t.layer} {t.kind}")).add(t)
    return SimilarityReport(roles, tensors, model, kinds, layers, layer_kinds)


# ---------------------------------------------------------------- files


def write_report(report: SimilarityReport, out: Path) -> None:
    """out/similarity.json, and out/similarity.png when matplotlib is importable (else a note)."""
    path = out / JSON_NAME
    write_atomically(path, json.dumps(report.to_json(), indent=1, allow_nan=False).encode() + b"\n")
    report.json_path = path
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        report.notes.append(f"matplotlib is not installed: no {PNG_NAME} (pip install 'graftcore[plot]')")
        return
    import io

    buf = io.BytesIO()
    plot(report).savefig(buf, format="png", dpi=FIGURE_DPI)
    png = out / PNG_NAME
    write_atomically(png, buf.getvalue())
    report.png_path = png


def write_atomically(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".partial")
    try:
        partial.write_bytes(data)
        os.replace(partial, path)
    except OSError as e:
        partial.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write ({e.strerror or e})") from None


def plot(report: SimilarityReport):
    """A matplotlib Figure (no pyplot state): sigma(I, B) in % per layer, one line per module kind, the whole
    model as a dashed line; for a model without numbered layers, one bar per module kind."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=FIGURE_INCHES, dpi=FIGURE_DPI)
    ax = fig.add_subplot()
    layers = sorted(n for n in report.layers if n is not None)
    if layers:
        for kind in KINDS:
            points = [(n, 100 * report.layer_kinds[(n, kind)].pairs["instruct"].sigma) for n in layers if (n, kind) in report.layer_kinds]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, linewidth=1.2, label=kind)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        kinds = [k for k in KINDS if k in report.kinds]
        ax.bar(kinds, [100 * report.kinds[k].pairs["instruct"].sigma for k in kinds])
    ax.axhline(100 * report.model.pairs["instruct"].sigma, color="black", linestyle="--", linewidth=1, label="whole model")
    ax.set_ylabel("σ(Instruct, Base)  %")
    ax.set_title("σ = Σ|I − B| / (Σ|I| + Σ|B|) per layer and module")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=3)
    fig.tight_layout()
    return fig
