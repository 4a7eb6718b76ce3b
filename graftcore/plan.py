"""Match the three inputs tensor by tensor and decide what each output tensor is (docs/architecture.md, "Matching policy").

Every inconsistency is found here, before any output byte is written. The Plan lists, per output shard,
the TensorOps in the order their bytes go into the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from .errors import MismatchError
from .options import MergeOptions, parse_size
from .safetensors_io import FLOAT_DTYPES, TensorInfo, itemsize
from .sources import SINGLE_NAME, Checkpoint

WRAPPER_PREFIXES = ("module.", "_orig_mod.")
DTYPE_CODES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


class Action(str, Enum):
    GRAFT = "graft"  # I + alpha * (T - B)
    GRAFT_ROWS = "graft rows"  # the leading `rows` rows grafted, Instruct's extra rows copied
    COPY = "copy"  # Instruct's tensor (converted if the output dtype differs)
    LORA = "lora"  # I + alpha * s * (B @ A), see lora.py


@dataclass(frozen=True, slots=True)
class TensorOp:
    name: str
    action: Action
    out_dtype: str
    instruct: TensorInfo
    tuned: TensorInfo | None = None
    base: TensorInfo | None = None
    rows: int = 0  # GRAFT_ROWS: rows present in base and tuned
    reason: str = ""  # why a tensor is not simply grafted
    update: object = None  # LORA: a lora.LowRankUpdate

    @property
    def shape(self) -> tuple[int, ...]:
        return self.instruct.shape

    @property
    def numel(self) -> int:
        return self.instruct.numel

    @property
    def out_nbytes(self) -> int:
        return self.numel * itemsize(self.out_dtype)

    @property
    def grafted_numel(self) -> int:
        """Elements computed from the update; the rest are Instruct's, copied."""
        if self.action is Action.GRAFT_ROWS:
            return self.rows * (self.numel // self.shape[0])
        return 0 if self.action is Action.COPY else self.numel


@dataclass
class OutShard:
    file: str
    ops: list[TensorOp]
    metadata: dict[str, str]

    @property
    def entries(self) -> list[tuple[str, str, tuple[int, ...]]]:
        return [(op.name, op.out_dtype, op.shape) for op in self.ops]


@dataclass
class Plan:
    shards: list[OutShard]
    write_index: bool
    ignored: list[str] = field(default_factory=list)  # in base/tuned but not Instruct
    notes: list[str] = field(default_factory=list)

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
        lines = [f"plan: {len(ops)} tensors in {len(self.shards)} output shard(s), {human(self.out_nbytes)} to write"]
        for action in Action:
            chosen = [op for op in ops if op.action is action]
            if chosen:
                lines.append(f"  {action.value:<11} {len(chosen):>6} tensors  {human(sum(o.out_nbytes for o in chosen)):>10}")
        lines += [f"  note: {n}" for n in self.notes]
        decisions = [op for op in ops if op.action not in (Action.GRAFT, Action.LORA)]
        if decisions:
            lines.append("decisions:")
            lines += [f"  {op.action.value:<11} {op.name}  ({op.reason})" for op in decisions]
        if self.ignored:
            lines.append("ignored (not in Instruct):")
            lines += [f"  {n}" for n in self.ignored]
        lines.append("output shards:")
        lines += [f"  {s.file}  {len(s.ops)} tensors  {human(sum(o.out_nbytes for o in s.ops))}" for s in self.shards]
        return "\n".join(lines)


def build_plan(instruct: Checkpoint, tuned: Checkpoint, base: Checkpoint, opts: MergeOptions) -> Plan:
    """Decide graft / graft rows / copy for every Instruct tensor; raise MismatchError on inconsistent inputs.

    Example:
        >>> plan = build_plan(open_checkpoint(i), open_checkpoint(t), open_checkpoint(b), MergeOptions())  # doctest: +SKIP
        >>> print(plan.describe())                                                                          # doctest: +SKIP
    """
    notes: list[str] = []
    tuned_t = strip_wrappers(tuned, instruct.tensors, "tuned", notes)
    base_t = strip_wrappers(base, instruct.tensors, "base", notes)
    ops = {}
    for name, i in instruct.tensors.items():
        ops[name] = plan_tensor(name, i, tuned_t.get(name), base_t.get(name), opts, instruct, tuned, base)
    ignored = [
        f"{n}  (in {' and '.join(r for r, t in (('base', base_t), ('tuned', tuned_t)) if n in t)})"
        for n in dict.fromkeys([*base_t, *tuned_t])
        if n not in instruct.tensors
    ]
    return Plan(*layout_shards(instruct, ops, opts), ignored=ignored, notes=notes)


def plan_tensor(name, i: TensorInfo, t: TensorInfo | None, b: TensorInfo | None, opts, instruct, tuned, base) -> TensorOp:
    out_dtype = output_dtype(i, opts)
    if not opts.selects(name):
        return TensorOp(name, Action.COPY, out_dtype, i, reason="not selected")
    if i.dtype not in FLOAT_DTYPES and i.dtype != "F64" and not i.dtype.startswith("F8"):
        return TensorOp(name, Action.COPY, out_dtype, i, reason=f"{i.dtype} tensor, not floating point")
    if t is None and b is None:
        return TensorOp(name, Action.COPY, out_dtype, i, reason="in Instruct only")
    if t is None or b is None:
        (has, has_ck, info), (lacks, lacks_ck) = (("base", base, b), ("tuned", tuned)) if t is None else (("tuned", tuned, t), ("base", base))
        raise MismatchError(
            f"{has_ck.locate(info.file)}: tensor {name!r} is in {has} but not in {lacks} ({lacks_ck.ref}); "
            f"--exclude it to copy Instruct's"
        )
    for role, x, ck in (("instruct", i, instruct), ("tuned", t, tuned), ("base", b, base)):
        if x.dtype not in FLOAT_DTYPES:
            raise MismatchError(
                f"{ck.locate(x.file)}: tensor {name!r} in {role} is {x.dtype}; grafting reads F16, BF16 or F32 "
                f"(--exclude it to copy Instruct's)"
            )
    if t.shape != b.shape:
        raise MismatchError(
            f"{tuned.locate(t.file)}: tensor {name!r} is {list(t.shape)} in tuned but {list(b.shape)} in base "
            f"({base.locate(b.file)})"
        )
    if i.shape == t.shape:
        return TensorOp(name, Action.GRAFT, out_dtype, i, t, b)
    if len(i.shape) == len(t.shape) >= 1 and i.shape[1:] == t.shape[1:] and i.shape[0] > t.shape[0]:
        extra = i.shape[0] - t.shape[0]
        return TensorOp(
            name, Action.GRAFT_ROWS, out_dtype, i, t, b, rows=t.shape[0],
            reason=f"Instruct has {extra} more rows than base/tuned; rows {t.shape[0]}.. copied from Instruct",
        )
    raise MismatchError(
        f"{instruct.locate(i.file)}: tensor {name!r} is {list(i.shape)} in Instruct but {list(t.shape)} in base "
        f"and tuned ({tuned.locate(t.file)})"
    )


def output_dtype(i: TensorInfo, opts: MergeOptions) -> str:
    if opts.dtype == "auto" or i.dtype not in FLOAT_DTYPES:
        return i.dtype
    return DTYPE_CODES[opts.dtype]


def strip_wrappers(ck: Checkpoint, reference: dict, role: str, notes: list[str]) -> dict[str, TensorInfo]:
    """Drop training-wrapper prefixes (`module.`, `_orig_mod.`, nested) when that makes more names match Instruct's."""
    tensors, stripped = ck.tensors, []
    while tensors and (prefix := next((p for p in WRAPPER_PREFIXES if all(n.startswith(p) for n in tensors)), None)):
        tensors = {n[len(prefix):]: info for n, info in tensors.items()}
        stripped.append(prefix)
    if not stripped or sum(n in reference for n in tensors) <= sum(n in reference for n in ck.tensors):
        return ck.tensors
    notes.append(f"stripped the prefix {''.join(stripped)!r} from the {role} checkpoint's tensor names")
    return tensors


def layout_shards(instruct: Checkpoint, ops: dict[str, TensorOp], opts: MergeOptions) -> tuple[list[OutShard], bool]:
    """Output files: Instruct's names and tensor-to-file map, or `--max-shard-size` shards.

    Within a file, tensors keep Instruct's order, stably sorted by element size (largest first) so that every
    tensor starts aligned to its element size, as the reference writer guarantees.
    """

    def ordered(names):
        return sorted((ops[n] for n in names), key=lambda op: -itemsize(op.out_dtype))

    def meta(file):
        return {"format": "pt", **instruct.shard_metadata.get(file, {})}

    if opts.max_shard_size is None:
        by_file: dict[str, list[str]] = {f: [] for f in instruct.shard_files}
        for name, info in instruct.tensors.items():
            by_file[info.file].append(name)
        single_file_input = instruct.root is None
        shards = [
            OutShard(SINGLE_NAME if single_file_input else f, ordered(names), meta(f)) for f, names in by_file.items()
        ]
        return shards, instruct.has_index or len(shards) > 1
    limit = parse_size(opts.max_shard_size)
    groups: list[list[str]] = [[]]
    size = 0
    for name, op in ops.items():
        if groups[-1] and size + op.out_nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += op.out_nbytes
    n = len(groups)
    if n == 1:
        return [OutShard(SINGLE_NAME, ordered(groups[0]), {"format": "pt"})], False
    return [OutShard(f"model-{k + 1:05d}-of-{n:05d}.safetensors", ordered(g), {"format": "pt"}) for k, g in enumerate(groups)], True


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)
