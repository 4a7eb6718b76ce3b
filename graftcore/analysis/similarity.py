"""`graftcore similarity`: how close Base and Instruct are, and how large each fine-tune's update is beside that gap.

Shadow-FT grafts `T - B` onto Instruct because Base and Instruct weights are close. Per tensor, with X the
Instruct model or a tuned input and B the Base model:

    sigma(X, B)   = sum|X - B| / (sum|X| + sum|B|)
    rel L2        = ||X - B|| / ||B||
    cosine        = sum X*B / (||X|| ||B||)
    ratio         = ||T - B|| / ||I - B||          each tuned input's update against the post-training gap

This module resolves and plans without torch: every tensor Instruct and Base share (floating point, selected
by include / exclude / targets) becomes a TensorOp whose steps read Instruct, Base and each full tuned input
over the same element ranges; Instruct's extra vocabulary rows are left out (measured over the shared rows).
Torch loads only then (a bad input fails in a fraction of a second); analysis/similarity_sums.py streams the inputs as a
merge streams them (nothing is written but the report) into float64 sums per tensor. sum X*B = (sum X^2 + sum B^2 -
sum D^2) / 2. The raw sums are kept per tensor, so an aggregate (a layer, a module kind, the whole model)
recomputes each metric from the summed accumulators, never from averaged metrics.

Example:
    >>> report = graftcore.similarity(base="Llama-3.1-8B", instruct="Llama-3.1-8B-Instruct")   # doctest: +SKIP
    >>> print(report.table())                                                                # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, astuple, dataclass, field
from pathlib import Path

from graftcore import interrupts
from graftcore.errors import AdapterError, GraftError, MismatchError, OutputError
from graftcore.io.output_folder import atomic_write, output_errors
from graftcore.io.safetensors_file import FLOAT_DTYPES, Quantized, TensorInfo, itemsize
from graftcore.lora.update import matrix_shape
from graftcore.options import PROJECTIONS, SIMILARITY_OPTIONS, MergeOptions
from graftcore.plan.build import match_inputs, swapped_hint
from graftcore.plan.inputs import Ref, check_call, check_output_outside_inputs, open_inputs, tuned_refs
from graftcore.plan.ops import Action, DeltaInput, TensorOp, Term
from graftcore.shapes import only_rows_grew
from graftcore.sources.checkpoint import Checkpoint
from graftcore.version import __version__

KINDS = (*PROJECTIONS, "embed", "lm_head", "norm", "other")  # the order of the table and the plot
LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
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

    def __add__(self, other: Sums) -> Sums:
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

    def add(self, other: Stats) -> None:
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
            "pairs": {
                role: {**finite(self.metrics(role)), "sums": finite(s.to_json())} for role, s in self.pairs.items()
            },
        }


@dataclass
class TensorStats(Stats):
    kind: str = "other"
    layer: int | None = None
    shape: tuple[int, ...] = ()  # Instruct's
    rows: int | None = None  # the shared rows measured, when Instruct has more (a grown vocabulary)
    dtypes: dict[str, str] = field(default_factory=dict)  # role -> safetensors dtype ("lora" for an adapter update)

    def to_json(self) -> dict:
        return {
            "kind": self.kind,
            "layer": self.layer,
            "shape": list(self.shape),
            "measured_rows": self.rows,
            "dtypes": self.dtypes,
            **super().to_json(),
        }


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
    instruct_numel: int = 0  # every parameter of Instruct: what the "% params" column is a fraction of
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
        header.append("% params")  # of Instruct's: the model row says how much of the model was measured
        lines = []
        for label, s in self.groups():
            row = [label, str(s.tensors), count(s.numel)]
            for role in self.roles:
                m = s.metrics(role)
                row += [percent(m["sigma"]), number(m["rel_l2"]), f"{m['cosine']:.6f}"]
                if role != "instruct":
                    row.append(number(m["ratio"]))
            row.append(f"{100 * s.numel / self.instruct_numel:.1f}%" if self.instruct_numel else "-")
            lines.append(row)
        widths = [max(len(r[c]) for r in [header, *lines]) for c in range(len(header))]

        def fmt(r):
            return "  ".join(r[0].ljust(widths[0]) if c == 0 else r[c].rjust(widths[c]) for c in range(len(r)))

        return "\n".join(fmt(r).rstrip() for r in [header, *lines])

    @property
    def coverage(self) -> float:
        """The fraction of Instruct's parameters the whole-model row measures."""
        return self.model.numel / self.instruct_numel if self.instruct_numel else 0.0

    def not_measured(self) -> str:
        """One line for the terminal: how many tensors were not measured, why, and how much of the model the
        measured ones cover ('' when every tensor was measured)."""
        if not self.skipped:
            return ""
        reasons: dict[str, list[str]] = {}
        for name, reason in self.skipped:
            reasons.setdefault(reason, []).append(name)
        why = "; ".join(f"{len(names)} {reason} (e.g. {names[0]!r})" for reason, names in reasons.items())
        return (
            f"{len(self.skipped)} tensor(s) not measured: {why}; the model row covers {100 * self.coverage:.1f}% of "
            f"Instruct's parameters"
        )

    def summary(self) -> str:
        """One line: the whole model's sigma(I, B), tensors, seconds."""
        return (
            f"sigma(instruct, base) = {percent(self.model.pairs['instruct'].sigma)} over {self.model.tensors} tensors "
            f"({count(self.model.numel)} parameters); {len(self.skipped)} not measured; {self.seconds:.1f} s"
        )

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
            "coverage": self.coverage,  # of Instruct's parameters, by the model row
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


def readable(x) -> bool:
    """Whether similarity measures a tensor of this kind: F16, BF16, F32, or FP8 decoded with its scales."""
    return x.dtype in FLOAT_DTYPES or isinstance(x, Quantized)


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
    instruct = checkpoints["instruct"]
    matched = match_inputs(instruct, deltas, checkpoints["base"], opts.rename, opts.targets)
    for _, _, updates in matched.sources:
        dora = next((u for u in updates.values() if u.magnitude is not None), None)
        if dora is not None:
            raise AdapterError(
                f"{dora.where}: DoRA adapter (tensor {dora.magnitude.name!r}): graftcore similarity does not measure "
                f"DoRA updates yet; merge the adapter into Base (PEFT merge_and_unload) and pass that model as --tuned"
            )
    base_t, sources, notes, locate = matched.base, matched.sources, matched.notes, matched.locate
    if matched.untied:
        notes.append(matched.untied)
    skipped: list[tuple[str, str]] = []
    measured = []
    for name, i in instruct.tensors.items():
        b = base_t.get(name)
        if not matched.selects(name, opts):
            skipped.append((name, "not selected"))
            continue
        if not readable(i):
            skipped.append((name, f"{i.dtype} in Instruct; measured: F16, BF16, F32, quantized formats decoded"))
            continue
        if b is None:
            skipped.append((name, "in Instruct, not in base"))
            continue
        if not readable(b):
            raise MismatchError(
                f"{locate('base', b)}: tensor {name!r} is {b.dtype} in base but {i.dtype} in Instruct "
                f"(--exclude it to skip it)"
            )
        rows = shared_rows(name, i, b, locate)
        if rows is not None:
            notes.append(
                f"{name}: Instruct has {i.shape[0] - rows} more rows than base (a grown vocabulary); "
                f"measured over the {rows} shared rows"
            )
        terms, how = measured_terms(name, b, sources, locate)
        info = i if rows is None else i._replace(shape=b.shape, end=i.start + b.numel * itemsize(i.dtype))
        out_dtype = "F32" if isinstance(info, Quantized) else info.dtype  # nothing is written: nothing encoded
        op = MeasureOp(name, Action.GRAFT, out_dtype, info, b, tuple(terms))
        measured.append(Measured(op, tuple(i.shape), rows, how))
    skipped += [(name, reason) for name, reason in matched.ignored()]
    return MeasurePlan(measured, skipped, notes)


def measured_terms(name: str, b: TensorInfo, sources, locate) -> tuple[list[Term], list[tuple]]:
    """(the full tuned tensors' Terms, (role, "full" | "lowrank" | "zero", term or update) per tuned input) of
    tensor `name` with Base's `b`; MismatchError for a tuned tensor that is missing or does not fit Base's."""
    terms, how = [], []
    for d, full, updates in sources:
        t, u = full.get(name), updates.get(name)
        if t is None and d.adapter is None:
            raise MismatchError(
                f"{locate('base', b)}: tensor {name!r} is in base but not in {d.role} "
                f"({locate(d.role, None)}); --exclude it to skip it"
            )
        if t is not None:
            if t.shape != b.shape or not readable(t):
                raise MismatchError(
                    f"{locate(d.role, t)}: tensor {name!r} is {t.dtype}{list(t.shape)} in {d.role} "
                    f"but {b.dtype}{list(b.shape)} in base ({locate('base', b)})"
                )
            term = Term(d.role, 1.0, t)
            terms.append(term)
            how.append((d.role, "full", term))
        elif u is not None:
            if (u.rows, u.cols) != matrix_shape(b.shape):
                raise MismatchError(
                    f"{u.where}: the update of {name!r} covers {u.rows} x {u.cols}, but base "
                    f"({locate('base', b)}) has {list(b.shape)}"
                )
            how.append((d.role, "lowrank", u))
        else:
            how.append((d.role, "zero", None))
    return terms, how


def shared_rows(name: str, i: TensorInfo, b: TensorInfo, locate) -> int | None:
    """None when Instruct and Base have one shape; Base's rows when only Instruct's dim 0 is larger (a grown
    vocabulary); MismatchError for any other difference."""
    if i.shape == b.shape:
        return None
    if only_rows_grew(b.shape, i.shape):
        return b.shape[0]
    raise MismatchError(
        f"{locate('instruct', i)}: tensor {name!r} is {list(i.shape)} in Instruct but {list(b.shape)} "
        f"in base ({locate('base', b)}){swapped_hint(i, b, i)}"
    )


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
        **options: rename, include, exclude, targets (names and the tensors to measure, as for `graft`), token,
            cache_dir, quiet, chunk_size, read_buffer, read_depth, read_workers.

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
    if base is None:
        raise GraftError("--base is required: similarity measures Instruct (and each tuned input) against Base")
    check_call(
        "similarity",
        options,
        SIMILARITY_OPTIONS,
        {"instruct": instruct, "base": base, "output": output},
        optional={"output"},
    )
    opts = MergeOptions(**options)
    refs = tuned_refs(tuned, optional=True)
    out = Path(output) if output is not None else None
    if out is not None and out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder; --output names the folder for {JSON_NAME}")
    checkpoints, deltas = open_inputs(instruct, refs, base, opts)
    plan = plan_similarity(checkpoints, deltas, opts)
    if not plan.measured:
        raise GraftError(
            f"{checkpoints['instruct'].ref}: no tensor to measure (none that Instruct and Base share is "
            f"floating point and selected by --include / --exclude / --targets)"
        )
    if out is not None:
        check_output_outside_inputs(out, checkpoints, may_contain=True)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"{out}: cannot create the folder ({e.strerror or e})") from None
        if not os.access(out, os.W_OK):
            raise OutputError(f"{out}: not writable")
    roles = ["instruct", *(d.role for d in deltas)]
    t_load = time.perf_counter()
    measure = interrupts.import_deferred(".analysis.similarity_sums").measure  # torch: not needed to resolve and plan
    t_load = time.perf_counter() - t_load
    sums, reads, timings = measure(plan, checkpoints, roles, opts)
    timings = {"load_torch": t_load, **timings}
    tensors = [tensor_stats(m, pairs_from_sums(acc, roles)) for m, acc in zip(plan.measured, sums)]
    notes = list(plan.notes)
    for t in tensors:
        bad = [role for role, s in t.pairs.items() if not all(math.isfinite(v) for v in astuple(s))]
        if bad:
            notes.append(f"{t.name}: NaN/Inf in {' and '.join(bad)} or base; its metrics are NaN")
    report = aggregate(tensors, roles)
    report.skipped, report.notes, report.reads, report.timings = plan.skipped, notes, reads, timings
    report.instruct_numel = sum(info.numel for info in checkpoints["instruct"].tensors.values())
    report.inputs = {
        role: {"ref": ck.ref, "revision": ck.revision, "fingerprint": ck.fingerprint}
        for role, ck in checkpoints.items()
    }
    report.options = {k: v for k, v in asdict(opts).items() if k in SIMILARITY_OPTIONS and k not in ("token", "quiet")}
    report.seconds = time.perf_counter() - t0
    if out is not None:
        report.output = out
        write_report(report, out)
    return report


def pairs_from_sums(sums: list[float], roles: list[str]) -> dict[str, Sums]:
    """The Sums of each pair (X_k, B) from a tensor's accumulators, in similarity_sums.ChunkMath.sums's order:
    [sum|X_k|.., sum|B|, sum|D_k|.., sum X_k^2.., sum B^2, sum D_k^2..] with X_0 = Instruct, D_k = X_k - B."""
    m = len(roles)
    width = 1 + 2 * m
    return {
        role: Sums(
            abs_x=sums[k],
            abs_base=sums[m],
            abs_diff=sums[m + 1 + k],
            sq_x=sums[width + k],
            sq_base=sums[width + m],
            sq_diff=sums[width + m + 1 + k],
        )
        for k, role in enumerate(roles)
    }


def tensor_stats(m: Measured, pairs: dict[str, Sums]) -> TensorStats:
    op = m.op
    dtypes = {"instruct": op.instruct.dtype, "base": op.base.dtype}
    for role, how, src in m.sources:
        dtypes[role] = src.tuned.dtype if how == "full" else "lora" if how == "lowrank" else "adapter: unchanged"
    return TensorStats(
        op.name,
        1,
        op.numel,
        pairs,
        kind=module_kind(op.name),
        layer=layer_index(op.name),
        shape=m.shape,
        rows=m.rows,
        dtypes=dtypes,
    )


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
    """out/similarity.json, and out/similarity.png when matplotlib is importable (else a note, and an older PNG is
    removed). Both are rendered before either is written, and written with Ctrl-C deferred: an interrupt leaves
    the previous pair or the new one, never a new JSON beside a stale PNG, nor a `.partial`."""
    data = json.dumps(report.to_json(), indent=1, allow_nan=False).encode() + b"\n"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        report.notes.append(f"matplotlib is not installed: no {PNG_NAME} (pip install 'graftcore[plot]')")
        png = None
    else:
        import io

        buf = io.BytesIO()
        plot(report).savefig(buf, format="png", dpi=FIGURE_DPI)
        png = buf.getvalue()
    with interrupts.deferred():
        atomic_write(out / JSON_NAME, data)
        if png is None:
            with output_errors(out / PNG_NAME, "remove the previous plot"):
                (out / PNG_NAME).unlink(missing_ok=True)
        else:
            atomic_write(out / PNG_NAME, png)
    report.json_path = out / JSON_NAME
    report.png_path = out / PNG_NAME if png is not None else None


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
            points = [
                (n, 100 * report.layer_kinds[(n, kind)].pairs["instruct"].sigma)
                for n in layers
                if (n, kind) in report.layer_kinds
            ]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, linewidth=1.2, label=kind)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        kinds = [k for k in KINDS if k in report.kinds]
        ax.bar(kinds, [100 * report.kinds[k].pairs["instruct"].sigma for k in kinds])
    ax.axhline(
        100 * report.model.pairs["instruct"].sigma, color="black", linestyle="--", linewidth=1, label="whole model"
    )
    ax.set_ylabel("σ(Instruct, Base)  %")
    ax.set_title("σ = Σ|I − B| / (Σ|I| + Σ|B|) per layer and module")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=3)
    fig.tight_layout()
    return fig
