"""What a merge and a verification report: torch-free, so `graftcore.Report` and a dry run load no torch.

Example:
    >>> report = graftcore.graft(base="b", tuned="t", instruct="i", output="out")   # doctest: +SKIP
    >>> print(report.summary())                                                   # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from graftcore.plan.ops import Action, Ignored, Plan


@dataclass
class Report:
    """What a merge did: returned by `graftcore.graft`."""

    output: Path
    device: str
    grafted: int = 0
    grafted_rows: int = 0
    lora: int = 0
    copied: int = 0
    shards_written: int = 0
    shards_kept: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    wall_seconds: float = 0.0  # from the call to its return: start-up, planning and --workers' processes too
    ignored: list[Ignored] = field(default_factory=list)  # (name, reason) of tensors Instruct does not have
    notes: list[str] = field(default_factory=list)
    plan: object = None  # the Plan that was executed (or only described, for a dry run)
    dry_run: bool = False
    timings: dict[str, float] = field(default_factory=dict)  # seconds: compute, wait_input, wait_writer, write, ...
    reads: dict[str, dict[str, int]] = field(default_factory=dict)  # per input: bytes read direct / from the cache
    fp8: dict = field(default_factory=dict)  # FP8 output: what requantizing kept of the update (fp8_summary)

    def count(self, plan: Plan) -> None:
        """Take the counts of tensors per action, the ignored tensors and the notes from `plan`."""
        self.plan = plan
        for op in plan.ops:
            self.grafted += op.action is Action.GRAFT
            self.grafted_rows += op.action is Action.GRAFT_ROWS
            self.lora += op.action is Action.LORA
            self.copied += op.action is Action.COPY
        self.ignored = list(plan.ignored)
        self.notes = list(plan.notes)

    def summary(self) -> str:
        """One line of counts, bytes and speed; for a dry run, the plan (what would be written)."""
        if self.dry_run:
            return f"{self.output}: dry run, nothing written\n" + self.plan.describe()
        seconds = self.wall_seconds or self.seconds  # what the user waited
        rate = self.bytes_written / seconds / 1e9 if seconds > 0 else 0.0
        parts = [f"{self.grafted} grafted"]
        if self.grafted_rows:
            parts.append(f"{self.grafted_rows} grafted on shared rows")
        if self.lora:
            parts.append(f"{self.lora} LoRA-merged")
        parts.append(f"{self.copied} copied")
        kept = f" ({self.shards_kept} kept from an earlier run)" if self.shards_kept else ""
        line = (
            f"{self.output}: {', '.join(parts)} tensors; {self.shards_written + self.shards_kept} shard(s){kept}, "
            f"{self.bytes_written / 1e9:.2f} GB written in {seconds:.1f} s ({rate:.2f} GB/s, {self.device})"
        )
        if self.fp8:
            line += "\n" + fp8_line(self.fp8)
        return line


# the relative error of the applied update above which the summary advises: the rounding noise is then more than a
# tenth of the update itself (0% = the update kept exactly; 100% = noise as large as the update, or none of it kept)
FP8_WARN = 0.10


def fp8_summary(per_tensor: dict[str, dict]) -> dict:
    """graftcore.json's "fp8" section from each FP8 output tensor's record (engine: update_error, rescaled_blocks,
    blocks and the squared norms): the whole model's relative error of the applied update,
    sqrt(sum ||deq(out) - deq(I) - update||^2 / sum ||update||^2), the worst tensor, rescaled blocks."""
    keys = ("update_error", "error_norm_sq", "update_norm_sq")  # None: not measured (JSON has no NaN/Inf)
    measured = {n: r for n, r in per_tensor.items() if all(r.get(k) is not None for k in keys)}
    error = sum(r["error_norm_sq"] for r in measured.values())
    update = sum(r["update_norm_sq"] for r in measured.values())
    worst = max(measured, key=lambda n: measured[n]["update_error"], default=None)
    by_kind: dict[str, dict] = {}  # "FP8", "FP4", "INT4": the same figure over that format's tensors
    for n, r in per_tensor.items():
        k = by_kind.setdefault(r.get("kind", "FP8"), {"tensors": 0, "error_norm_sq": 0.0, "update_norm_sq": 0.0})
        k["tensors"] += 1
        k["precision"] = r.get("precision", "3 mantissa bits")
        if n in measured:
            k["error_norm_sq"] += r["error_norm_sq"]
            k["update_norm_sq"] += r["update_norm_sq"]
    for k in by_kind.values():
        k["update_error"] = (k["error_norm_sq"] / k["update_norm_sq"]) ** 0.5 if k["update_norm_sq"] else 0.0
    return {
        "update_error": ((error / update) ** 0.5 if update else 0.0) if measured else None,
        "worst_tensor": worst,
        "worst_update_error": measured[worst]["update_error"] if worst else None,
        "unmeasured_tensors": len(per_tensor) - len(measured),
        "rescaled_blocks": sum(r["rescaled_blocks"] for r in per_tensor.values()),
        "blocks": sum(r["blocks"] for r in per_tensor.values()),
        "tensors": {n: {k: r[k] for k in ("update_error", "rescaled_blocks", "blocks")} for n, r in per_tensor.items()},
        "formats": {
            kind: {"tensors": k["tensors"], "update_error": k["update_error"], "precision": k["precision"]}
            for kind, k in sorted(by_kind.items())
        },
    }


def fp8_line(fp8: dict) -> str:
    """The summary's line on a quantized output (FP8, FP4, INT4: per format where there are several) and its
    warning when much of the update was rounded away."""
    formats = fp8.get("formats") or {"FP8": {"update_error": fp8["update_error"], "precision": "3 mantissa bits"}}
    label = "+".join(formats)
    blocks = f"{fp8['rescaled_blocks']} of {fp8['blocks']} blocks took a new scale"
    unmeasured = fp8.get("unmeasured_tensors", 0)
    if fp8["update_error"] is None:
        return f"{label} output: what requantizing kept of the update was not measured (NaN/Inf kept); {blocks}"
    each = (
        "" if len(formats) == 1 else " (" + ", ".join(f"{k}: {v['update_error']:.1%}" for k, v in formats.items()) + ")"
    )
    line = (
        f"{label} output: the requantized update is off by {fp8['update_error']:.1%} of its norm{each} (relative "
        f"error of deq(out) - deq(Instruct) against the float32 update; worst tensor {fp8['worst_tensor']}: "
        f"{fp8['worst_update_error']:.1%}); {blocks}"
    )
    if unmeasured:
        line += f"; {unmeasured} tensor(s) not measured (NaN/Inf kept)"
    if fp8["update_error"] > FP8_WARN:
        bits = " and ".join(f"{k}'s {v['precision']}" for k, v in formats.items())
        size = "2x the FP8 bytes, 5 more mantissa bits" if list(formats) == ["FP8"] else "2x to 4x the bytes"
        line += (
            f"\nnote: {bits} add rounding noise of {fp8['update_error']:.0%} of the update's size "
            "(0% keeps it exactly, 100% is noise as large as the update); where the fine-tune's effect matters more "
            f"than the output's size, --dtype bfloat16 writes a dequantized model ({size})"
        )
    return line


class Progress(NamedTuple):
    """What `graft(..., progress=callback)` receives after every written piece: output bytes done and in all
    (this run's: shards kept from an earlier run are not counted), the output shard and tensor being written."""

    done: int
    total: int
    shard: str
    tensor: str


@dataclass
class VerifyReport:
    """What `verify` checked (it raises VerifyError at the first discrepancy)."""

    output: Path
    shards: int = 0
    tensors: int = 0
    scales: int = 0  # of them, FP8 scale tensors (the merge counts a weight and its scale as one tensor)
    bytes_hashed: int = 0
    chunks_recomputed: int = 0
    within_ulp: int = 0  # of them, LoRA blocks merged on a GPU compared within one ulp
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        scales = f" ({self.tensors - self.scales} weights and tensors, {self.scales} FP8 scales)" if self.scales else ""
        what = f"{self.shards} shard(s), {self.tensors} stored tensors{scales}, {self.bytes_hashed / 1e9:.2f} GB"
        what += ": sha256, headers, index and plan hold"
        if self.chunks_recomputed:
            exact = self.chunks_recomputed - self.within_ulp
            what += f"; {self.chunks_recomputed} chunk(s) recomputed from the inputs: {exact} bit-exact"
            what += f", {self.within_ulp} LoRA block(s) within one ulp" if self.within_ulp else ""
        return f"{self.output}: verified: {what} ({self.seconds:.1f} s)"
