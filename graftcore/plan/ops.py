"""What a plan is: the TensorOps of each output shard, the terms each adds, and the plan's digest (graftcore.json).
Data only; plan/build.py decides them.

Example:
    >>> op = TensorOp("w", Action.COPY, "BF16", TensorInfo("w", "BF16", (2, 2), "m.safetensors", 8, 16))
    >>> op.out_nbytes
    8
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, NamedTuple

from graftcore.codecs import codec_of
from graftcore.io.safetensors_file import Quantized, TensorInfo, nbytes_of
from graftcore.sources.checkpoint import Checkpoint

if TYPE_CHECKING:
    from graftcore.lora.adapter import Adapter
    from graftcore.lora.update import LowRankUpdate

DTYPE_CODES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


class Action(str, Enum):
    GRAFT = "graft"  # I + a1 * (T1 - B) + ...
    GRAFT_ROWS = "graft rows"  # the leading `rows` rows grafted, Instruct's extra rows copied
    COPY = "copy"  # Instruct's tensor (converted if the output dtype differs)
    LORA = "lora"  # at least one term is a low-rank update: I + alpha * s * (B @ A) + ..., see lora/adapter.py


@dataclass(frozen=True, slots=True)
class Term:
    """One delta added to a tensor: `alpha * (T - B)` from the full tensor `tuned` of a fine-tuned checkpoint,
    or from a LoRA adapter's `update` (a lora/update.LowRankUpdate: `alpha * s * (B @ A)`, DoRA from Base too)."""

    role: str  # the tuned input it comes from: "tuned", then "tuned2", "tuned3", ...
    alpha: float
    tuned: TensorInfo | None = None
    update: LowRankUpdate | None = None


@dataclass(frozen=True, slots=True)
class TensorOp:
    name: str
    action: Action
    out_dtype: str
    instruct: TensorInfo
    base: TensorInfo | None = None  # read when a term is a full delta or DoRA
    terms: tuple[Term, ...] = ()  # in the order of the tuned inputs; the sum adds them left to right
    rows: int = 0  # GRAFT_ROWS and LORA: the leading rows the terms cover (the rest are Instruct's, copied)
    reason: str = ""  # why a tensor is not simply grafted

    @property
    def shape(self) -> tuple[int, ...]:
        return self.instruct.shape

    @property
    def numel(self) -> int:
        return self.instruct.numel

    @property
    def out_nbytes(self) -> int:
        return sum(nbytes_of(dtype, shape) for _, dtype, shape in self.entries)

    @property
    def quantized_out(self) -> bool:
        """Whether the output is written in Instruct's quantized format (its codec's encoder then also writes the
        entries it adds: the new scales)."""
        return isinstance(self.instruct, Quantized) and self.out_dtype == self.instruct.dtype

    @property
    def quantized(self) -> bool:
        """Whether an input the steps decode, or the output, is quantized (steps then cover whole rows)."""
        return self.quantized_out or any(
            isinstance(x, Quantized) for x in (self.instruct, self.base, *(t.tuned for t in self.terms))
        )

    @property
    def entries(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """The output tensors of this op: (name, dtype, shape); a quantized output's codec adds its new scales."""
        if self.quantized_out:
            return codec_of(self.instruct).output_entries(self.instruct)
        return [(self.name, self.out_dtype, self.shape)]

    @property
    def low_rank(self) -> bool:
        """Whether a term is a LoRA update (the op is then computed in blocks of whole rows)."""
        return any(t.update is not None for t in self.terms)

    @property
    def reads_base(self) -> bool:
        return self.base is not None and any(t.update is None or t.update.magnitude is not None for t in self.terms)

    @property
    def grafted_numel(self) -> int:
        """Elements computed from the update; the rest are Instruct's, copied."""
        if self.action in (Action.GRAFT_ROWS, Action.LORA):
            return self.rows * (self.numel // self.shape[0])
        return 0 if self.action is Action.COPY else self.numel


class Ignored(NamedTuple):
    """A tensor of Base or a tuned model that Instruct does not have (listed in graftcore.json)."""

    name: str
    reason: str


def tuned_role(k: int) -> str:
    """The name of the k-th tuned input (0-based) in messages and graftcore.json: tuned, tuned2, tuned3, ..."""
    return "tuned" if k == 0 else f"tuned{k + 1}"


@dataclass
class DeltaInput:
    """One tuned input as the planner sees it: a full checkpoint, or a PEFT adapter (`adapter`, a lora/adapter.Adapter,
    whose weights file is `checkpoint`)."""

    role: str
    alpha: float
    checkpoint: Checkpoint
    adapter: Adapter | None = None


@dataclass
class OutShard:
    file: str
    ops: list[TensorOp]
    metadata: dict[str, str]

    @property
    def entries(self) -> list[tuple[str, str, tuple[int, ...]]]:
        return [entry for op in self.ops for entry in op.entries]


@dataclass
class Plan:
    shards: list[OutShard]
    write_index: bool
    ignored: list[Ignored] = field(default_factory=list)  # in base/tuned but not Instruct
    adapters: list[str] = field(default_factory=list)  # the roles of the tuned inputs that are PEFT adapters
    notes: list[str] = field(default_factory=list)
    renamed: list[dict] = field(default_factory=list)  # prefix rewrites of input names (names.align)

    @property
    def ops(self) -> list[TensorOp]:
        return [op for s in self.shards for op in s.ops]

    def count(self, action: Action) -> int:
        return sum(op.action is action for op in self.ops)

    @property
    def out_nbytes(self) -> int:
        return sum(op.out_nbytes for op in self.ops)

    def describe(self) -> str:
        """The plan as `--dry-run` prints it: counts per action, bytes, every non-graft decision."""
        ops = self.ops
        lines = [f"plan: {tensors(len(ops))} in {len(self.shards)} output shard(s), {human(self.out_nbytes)} to write"]
        for action in Action:
            chosen = [op for op in ops if op.action is action]
            if chosen:
                lines.append(
                    f"  {action.value:<11} {tensors(len(chosen)):>13}  {human(sum(o.out_nbytes for o in chosen)):>10}"
                )
        lines += [f"  note: {n}" for n in self.notes]
        decisions = [op for op in ops if op.action not in (Action.GRAFT, Action.LORA)]
        if decisions:
            lines.append("decisions:")
            lines += [f"  {op.action.value:<11} {op.name}  ({op.reason})" for op in decisions]
        if self.ignored:
            lines.append("ignored (not in Instruct):")
            lines += [f"  {n}  ({reason})" for n, reason in self.ignored]
        lines.append("output shards:")
        lines += [f"  {s.file}  {tensors(len(s.ops))}  {human(sum(o.out_nbytes for o in s.ops))}" for s in self.shards]
        return "\n".join(lines)


def tensors(n: int) -> str:
    """'1 tensor', '2 tensors'."""
    return f"{n} tensor" if n == 1 else f"{n} tensors"


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def plan_entries(plan: Plan) -> list:
    """(shard, tensor, dtype, shape) of every output tensor: what graftcore.json's plan digest covers."""
    return [
        [s.file, name, dtype, list(shape)] for s in plan.shards for op in s.ops for name, dtype, shape in op.entries
    ]


def entries_digest(entries: list) -> str:
    """The plan as graftcore.json records it: sha256 of the sorted (shard, tensor, dtype, shape) list."""
    return hashlib.sha256(json.dumps(sorted(entries)).encode()).hexdigest()


def headers_entries(headers: dict) -> list:
    """plan_entries' form for the shards' headers (file -> ShardHeader) of a written output."""
    return [
        [file, name, info.dtype, list(info.shape)] for file, h in headers.items() for name, info in h.tensors.items()
    ]
