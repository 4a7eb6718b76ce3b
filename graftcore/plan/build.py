"""Match the three inputs tensor by tensor and decide what each output tensor is (docs/architecture.md,
"Matching policy").

Every inconsistency is found here, before any output byte is written. The Plan lists, per output shard,
the TensorOps in the order their bytes go into the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from graftcore.errors import MismatchError
from graftcore.io.safetensors_file import (
    DTYPE_BITS,
    FLOAT_DTYPES,
    OPAQUE_FLOATS,
    SINGLE_NAME,
    Pieces,
    Quantized,
    TensorInfo,
)
from graftcore.options import MergeOptions, parse_renames, parse_size
from graftcore.plan.layouts import FUSED_EXPERTS, PER_EXPERT, expert_layouts, read_in_instructs_layout
from graftcore.plan.names import align
from graftcore.plan.ops import (
    DTYPE_CODES,
    Action,
    DeltaInput,
    Ignored,
    OutShard,
    Plan,
    TensorOp,
    Term,
)
from graftcore.shapes import only_rows_grew
from graftcore.sources.checkpoint import Checkpoint


@dataclass
class MatchedInputs:
    """The inputs as both planners (the merge's build_plan and similarity's) match them, by Instruct's names:
    Base's tensors, and per tuned input its full tensors and its adapter's low-rank updates."""

    instruct: Checkpoint
    checkpoints: dict[str, Checkpoint]  # role -> Checkpoint
    base: dict[str, TensorInfo]
    sources: list[tuple[DeltaInput, dict[str, TensorInfo], dict]]  # (delta, full tensors, low-rank updates)
    notes: list[str]
    renamed: list[dict] = field(default_factory=list)  # prefix rewrites applied: role, from, to, tensors, inferred
    projections: frozenset[str] | None = None  # what --targets projections selects (plan/projections.py), if resolved
    untied: str | None = None  # the note untie_heads gives, where Base's tied head is read as its embedding

    def selects(self, name: str, opts: MergeOptions) -> bool:
        """Whether Instruct's tensor `name` is to be grafted under `opts`' selection."""
        return opts.selects(name, self.projections)

    def locate(self, role: str, info: TensorInfo | None) -> str:
        """Where `info` of input `role` is (its shard file); the input's ref for None."""
        ck = self.checkpoints[role]
        return ck.ref if info is None else ck.locate(info.file)

    def ignored(self) -> list[Ignored]:
        """Tensors of Base or of a full tuned input that Instruct does not have, with the inputs that hold them."""
        extra: dict[str, list[str]] = {}
        fulls = [(d.role, full) for d, full, _ in self.sources if d.adapter is None]
        for role, tensors in [("base", self.base), *fulls]:
            for n in tensors:
                if n not in self.instruct.tensors:
                    extra.setdefault(n, []).append(role)
        return [Ignored(n, f"in {' and '.join(roles)}, not in Instruct") for n, roles in extra.items()]


def match_inputs(
    instruct: Checkpoint,
    deltas: list[DeltaInput],
    base: Checkpoint | None,
    renames: list[str] = (),
    targets: str = "all",
) -> MatchedInputs:
    """Every input's tensors under Instruct's names (wrapper prefixes stripped), adapters turned into low-rank
    updates (lora/adapter.adapter_terms); AdapterError / MismatchError for an adapter that does not fit. With `targets`
    "projections", what that selects on Instruct's architecture is resolved too (plan/projections.py)."""
    from graftcore.lora.adapter import adapter_terms
    from graftcore.plan.projections import projection_tensors

    notes: list[str] = []
    renamed: list[dict] = []
    rules = parse_renames(list(renames))
    checkpoints = {"instruct": instruct, **({"base": base} if base is not None else {})}
    sources = []
    for d in deltas:
        checkpoints[d.role] = d.checkpoint
        if d.adapter is None:
            sources.append((d, aligned(d.checkpoint, instruct.tensors, d.role, notes, rules, renamed), {}))
        else:
            sources.append((d, *adapter_terms(d.adapter, instruct, base, notes, rules)))
    base_t = aligned(base, instruct.tensors, "base", notes, rules, renamed) if base is not None else {}
    untied = untie_heads(instruct, base_t, [(d.role, full) for d, full, _ in sources if d.adapter is None])
    projections = projection_tensors(instruct, notes) if targets == "projections" else None
    return MatchedInputs(instruct, checkpoints, base_t, sources, notes, renamed, projections, untied)


HEAD_SUFFIX = "lm_head.weight"
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")


def untie_heads(instruct: Checkpoint, base: dict, fulls: list[tuple[str, dict]]) -> str | None:
    """Where Instruct has an output head of its own but Base (and a full tuned input) tie theirs to the input
    embedding (no head in their files), read their head as that embedding: in the tied model the head *is* the
    embedding, so the update it received is the embedding's, and Instruct's head gets it (copying Instruct's head
    would drop it). In place on `base` and each full input's tensors; returns the note to give where the head is
    grafted (None: nothing read so)."""
    heads = [n for n in instruct.tensors if n.endswith(HEAD_SUFFIX)]
    if len(heads) != 1 or heads[0] in base:
        return None
    head = heads[0]
    shape = instruct.tensors[head].shape
    embeddings = [n for n in instruct.tensors if n.endswith(EMBEDDING_SUFFIXES) and instruct.tensors[n].shape == shape]
    if len(embeddings) != 1 or embeddings[0] not in base:
        return None
    embedding = embeddings[0]
    untied = ["base"]
    base[head] = base[embedding]
    for role, full in fulls:
        if head not in full and embedding in full:
            full[head] = full[embedding]
            untied.append(role)
    return (
        f"{' and '.join(untied)} tie {head!r} to {embedding!r} (no head in their files) while Instruct has its own: "
        "Instruct's head gets the embedding's update (in a tied model the head's update is the embedding's)"
    )


def build_plan(instruct: Checkpoint, deltas: list[DeltaInput], base: Checkpoint | None, opts: MergeOptions) -> Plan:
    """Decide graft / graft rows / LoRA / copy for every Instruct tensor; raise MismatchError (or AdapterError)
    on inconsistent inputs, before anything is written.

    Example:
        >>> tuned = [DeltaInput("tuned", 1.0, open_checkpoint(t))]                                   # doctest: +SKIP
        >>> plan = build_plan(open_checkpoint(i), tuned, open_checkpoint(b), MergeOptions())          # doctest: +SKIP
        >>> print(plan.describe())                                                                    # doctest: +SKIP
    """
    matched = match_inputs(instruct, deltas, base, opts.rename, opts.targets)
    ops = {
        name: plan_tensor(name, i, matched.base.get(name), matched.sources, opts, matched.locate, matched.projections)
        for name, i in instruct.tensors.items()
    }
    ignored, notes = matched.ignored(), matched.notes
    check_nothing_dropped(ops, ignored, matched, opts)
    head = next((op for n, op in ops.items() if n.endswith(HEAD_SUFFIX)), None)
    if matched.untied and head is not None and head.action is not Action.COPY:  # not when --exclude / --targets
        notes.append(matched.untied)  # keep Instruct's head
    if opts.targets != "all":
        notes.extend(unselected_kinds(ops, opts.targets))
    if (
        base is not None
        and deltas
        and all(d.adapter is not None for d in deltas)
        and not any(op.base for op in ops.values())
    ):
        notes.append(f"--base {base.ref} was not read: the adapters' LoRA updates need no Base (W = I + s * B @ A)")
    adapters = [d.role for d in deltas if d.adapter is not None]
    return Plan(
        *layout_shards(instruct, ops, opts), ignored=ignored, notes=notes, adapters=adapters, renamed=matched.renamed
    )


def unselected_kinds(ops: dict[str, TensorOp], targets: str) -> list[str]:
    """A note naming the kinds of modules (names with layer and expert numbers as N) whose tensors --targets
    leaves to Instruct, so a selection that misses a kind of linear layer shows in every run."""
    kinds: dict[str, int] = {}
    for op in ops.values():
        if op.action is Action.COPY and op.reason.startswith("not selected") and op.instruct.dtype != "BOOL":
            kind = re.sub(r"\.\d+(?=\.|$)", ".N", re.sub(r"\.(weight|bias)$", "", op.name))
            kinds[kind] = kinds.get(kind, 0) + 1
    if not kinds:
        return []
    shown = ", ".join(sorted(kinds)[:12]) + (f" and {len(kinds) - 12} more" if len(kinds) > 12 else "")
    return [
        f"--targets {targets}: {sum(kinds.values())} tensor(s) of {len(kinds)} kind(s) copied from Instruct as not "
        f"selected: {shown}"
    ]


LORA_SKIPPED = " (its LoRA update is skipped)"
LISTED = 3  # names an error lists before "..."


def listed(names: list[str]) -> str:
    """The first few names, and how many more."""
    more = f" and {len(names) - LISTED} more" if len(names) > LISTED else ""
    return ", ".join(repr(n) for n in names[:LISTED]) + more


def check_nothing_dropped(ops: dict[str, TensorOp], ignored: list[Ignored], matched: MatchedInputs, opts) -> None:
    """MismatchError when an update would not reach the output without the user having asked for that: a tensor
    a full tuned input holds that Instruct has no counterpart for, an adapter's update left out by --targets or
    --include, or no tensor grafted at all. --exclude names what is dropped on purpose."""
    held = {}  # tensor -> (role, info) of the first full tuned input holding it
    for d, full, _ in matched.sources:
        if d.adapter is None:
            for n, info in full.items():
                held.setdefault(n, (d.role, info))
    lost = [ig.name for ig in ignored if ig.name in held and not opts.excludes(ig.name)]
    if lost:
        role, info = held[lost[0]]
        layouts = expert_layouts(lost, matched.instruct.tensors)
        if layouts is not None:
            raise MismatchError(
                f"{matched.locate(role, info)}: the MoE experts are saved {layouts[0]} in {role} but {layouts[1]} in "
                f"Instruct ({matched.instruct.ref}), and {len(lost)} tensor(s) such as {lost[0]!r} cannot be read in "
                f"Instruct's layout (names, shapes or dtypes that do not fit the qwen2_moe family's experts.E.gate_proj"
                f" / up_proj / down_proj = experts.gate_up_proj / down_proj); save the inputs in one layout "
                f"(transformers: save_pretrained(save_original_format=True) writes experts one by one)"
            )
        raise MismatchError(
            f"{matched.locate(role, info)}: {len(lost)} tensor(s) of {role} have no counterpart in Instruct "
            f"({matched.instruct.ref}), so their update would be dropped: {listed(lost)}; --exclude REGEX drops "
            f"them on purpose"
        )
    skipped = [op.name for op in ops.values() if op.reason.endswith(LORA_SKIPPED) and not opts.excludes(op.name)]
    if skipped:
        raise MismatchError(
            f"{matched.instruct.ref}: {len(skipped)} adapter update(s) are outside --targets/--include and would be "
            f"dropped: {listed(skipped)}; widen the selection, or --exclude REGEX drops them on purpose"
        )
    if ops and all(op.action is Action.COPY for op in ops.values()):
        reasons = sorted({op.reason for op in ops.values() if op.reason})
        raise MismatchError(
            f"{matched.instruct.ref}: nothing to graft: every tensor of Instruct would be copied as it is "
            f"({'; '.join(reasons[:LISTED])}); check --include / --exclude / --targets and the inputs' names"
        )


def plan_tensor(
    name: str,
    i: TensorInfo,
    b: TensorInfo | None,
    sources: list,
    opts: MergeOptions,
    locate,
    projections: frozenset[str] | None = None,
) -> TensorOp:
    """The TensorOp of Instruct's tensor `name`: `sources` lists (DeltaInput, full tensors, low-rank updates);
    `projections`: what --targets projections selects (MergeOptions.selects)."""
    out_dtype = output_dtype(i, opts)
    found = [(d, full.get(name), updates.get(name)) for d, full, updates in sources]
    if not opts.selects(name, projections):
        skipped = LORA_SKIPPED if any(u is not None for _, _, u in found) else ""
        return TensorOp(name, Action.COPY, out_dtype, i, reason="not selected" + skipped)
    if i.dtype in OPAQUE_FLOATS and not isinstance(i, Quantized):
        has = "base" if b is not None else next((d.role for d, t, u in found if t is not None or u is not None), None)
        if has is not None:
            raise MismatchError(
                f"{locate('instruct', i)}: tensor {name!r} is {i.dtype}, which graftcore does no arithmetic on outside "
                f"a quantized format, and {has} updates it (--exclude it to copy Instruct's)"
            )
        return TensorOp(name, Action.COPY, out_dtype, i, reason=f"{i.dtype} tensor, copied as it is")
    if i.dtype not in FLOAT_DTYPES and i.dtype != "F64" and not isinstance(i, Quantized):
        other = next(((r, x) for r, x in [("base", b), *((d.role, t) for d, t, _ in found)] if x is not None), None)
        if other is not None and (other[1].dtype != i.dtype or tuple(other[1].shape) != tuple(i.shape)):
            role, x = other
            raise MismatchError(
                f"{locate('instruct', i)}: tensor {name!r} is {i.dtype}{list(i.shape)} in Instruct but "
                f"{x.dtype}{list(x.shape)} in {role} ({locate(role, x)}): not the same tensor (a quantized weight "
                f"whose quantization_config does not say its format?)"
            )
        return TensorOp(name, Action.COPY, out_dtype, i, reason=f"{i.dtype} tensor, not floating point")
    for d, t, _ in found:  # a full checkpoint has every tensor Base has and none Base lacks; an adapter's full
        if (t is None) != (b is None) and (d.adapter is None or t is not None):  # tensors need Base's too
            has, info, lacks = (d.role, t, "base") if b is None else ("base", b, d.role)
            layout = (
                " (the inputs' MoE experts could not all be read in Instruct's layout: save them in one)"
                if PER_EXPERT.search(name) or FUSED_EXPERTS.search(name)
                else ""
            )
            raise MismatchError(
                f"{locate(has, info)}: tensor {name!r} is in {has} but not in {lacks} ({locate(lacks, None)}){layout}; "
                f"--exclude it to copy Instruct's"
            )
    terms = tuple(Term(d.role, d.alpha, t, u) for d, t, u in found if t is not None or u is not None)
    if not terms:
        adapters_only = all(d.adapter is not None for d, _, _ in found)
        why = "not in the adapter" + ("s" if len(found) > 1 else "") if adapters_only else "in Instruct only"
        return TensorOp(name, Action.COPY, out_dtype, i, reason=why)
    roles = [("instruct", i)] + ([("base", b)] if b is not None else []) + [(t.role, t.tuned) for t in terms if t.tuned]
    for role, x in roles:
        if x.dtype not in FLOAT_DTYPES and not isinstance(x, Quantized):
            raise MismatchError(
                f"{locate(role, x)}: tensor {name!r} in {role} is {x.dtype}; grafting reads F16, BF16, F32 or FP8 "
                f"with its scales (--exclude it to copy Instruct's)"
            )
    quantized = [role for role, x in roles if isinstance(x, Quantized)]
    if any(t.update is not None for t in terms) and any(isinstance(x, Pieces) for x in (b, *(t.tuned for t in terms))):
        raise MismatchError(
            f"{locate('instruct', i)}: tensor {name!r}: an adapter's update beside experts read from another layout "
            f"is not supported; save Base and the full tuned inputs in Instruct's expert layout"
        )
    rows = {term.role: term_rows(name, i, b, term, locate) for term in terms}
    if len(set(rows.values())) > 1:
        listed = ", ".join(f"{r} in {role}" for role, r in rows.items())
        raise MismatchError(
            f"{locate('instruct', i)}: tensor {name!r}: the tuned inputs cover different rows ({listed})"
        )
    covered = next(iter(rows.values()))
    whole = not i.shape or covered == i.shape[0]
    extra = (
        ""
        if whole
        else f"Instruct has {i.shape[0] - covered} more rows than the tuned inputs; "
        f"rows {covered}.. copied from Instruct"
    )
    if quantized and not whole:
        raise MismatchError(
            f"{locate('instruct', i)}: tensor {name!r}: {extra.split(';')[0]}, and {quantized[0]}'s "
            f"is quantized: grafting "
            f"the shared rows of quantized tensors is not supported"
        )
    if any(t.update is not None for t in terms):
        return TensorOp(name, Action.LORA, out_dtype, i, b, terms, rows=covered, reason=extra)
    if whole:
        return TensorOp(name, Action.GRAFT, out_dtype, i, b, terms)
    return TensorOp(name, Action.GRAFT_ROWS, out_dtype, i, b, terms, rows=covered, reason=extra)


def term_rows(name: str, i: TensorInfo, b: TensorInfo | None, term: Term, locate) -> int:
    """How many leading rows (of dim 0) of Instruct's tensor `term` covers; MismatchError when its shape cannot
    graft."""
    u = term.update
    if u is not None:
        if u.magnitude is not None and (b is None or b.shape != i.shape):
            found = "missing" if b is None else f"{b.dtype}{list(b.shape)}"
            raise MismatchError(
                f"{locate('base', None)}: DoRA target {name!r} is {found} in base, Instruct has "
                f"{i.dtype}{list(i.shape)}"
            )
        return u.rows // u.group if u.group else u.rows  # a fused expert update counts E * d1 matrix rows
    t = term.tuned
    if t.shape != b.shape:
        raise MismatchError(
            f"{locate(term.role, t)}: tensor {name!r} is {list(t.shape)} in {term.role} but {list(b.shape)} in base "
            f"({locate('base', b)}){swapped_hint(i, b, t)}"
        )
    if i.shape == t.shape:
        return i.shape[0] if i.shape else 0
    if only_rows_grew(t.shape, i.shape):
        return t.shape[0]
    raise MismatchError(
        f"{locate('instruct', i)}: tensor {name!r} is {list(i.shape)} in Instruct but {list(t.shape)} in base "
        f"and {term.role} ({locate(term.role, t)}){swapped_hint(i, b, t)}"
    )


def swapped_hint(i: TensorInfo, b: TensorInfo, t: TensorInfo) -> str:
    """A hint when the shapes would fit with --base and --instruct swapped: the tuned tensor has the shape of
    what was given as Instruct, and what was given as Base has more leading rows (a grown vocabulary)."""
    if t.shape == i.shape and only_rows_grew(i.shape, b.shape):
        return "; were --base and --instruct swapped? (Instruct may have more rows than Base, never fewer)"
    return ""


def output_dtype(i: TensorInfo, opts: MergeOptions) -> str:
    """Instruct's dtype, or --dtype's for a float tensor (a quantized one is then written dequantized)."""
    if opts.dtype == "auto" or (i.dtype not in FLOAT_DTYPES and not isinstance(i, Quantized)):
        return i.dtype
    return DTYPE_CODES[opts.dtype]


def aligned(ck: Checkpoint, reference: dict, role: str, notes: list[str], renames: list, renamed: list) -> dict:
    """`ck`'s tensors under Instruct's names and in Instruct's MoE expert layout (see renamed_tensors and
    layouts.read_in_instructs_layout); what was rewritten is a note."""
    tensors, moved = read_in_instructs_layout(renamed_tensors(ck, reference, role, notes, renames, renamed), reference)
    if moved:
        notes.append(f"{role}: {moved} MoE expert tensor(s) read in Instruct's expert layout (fused or per expert)")
    return tensors


def renamed_tensors(ck: Checkpoint, reference: dict, role: str, notes: list[str], renames: list, renamed: list):
    """`ck`'s tensors under Instruct's names (names.align: --rename rules, wrapper prefixes stripped, or one
    prefix rewrite inferred from the headers); each rewrite applied is a note and an entry of `renamed`."""
    shapes = {n: info.shape for n, info in ck.tensors.items()}
    new_names, applied, inferred = align(shapes, {n: i.shape for n, i in reference.items()}, renames)
    for old, new, count in applied:
        how = "inferred from the headers" if inferred else "--rename" if renames else "a training wrapper's"
        if new == "" and not renames:
            notes.append(f"stripped the prefix {old!r} from the {role} checkpoint's tensor names")
        else:
            notes.append(f"renamed {count} tensor(s) of {role}: prefix {old!r} -> {new!r} ({how})")
        renamed.append({"role": role, "from": old, "to": new, "tensors": count, "inferred": inferred})
    return {new_names[n]: info for n, info in ck.tensors.items()}


def layout_shards(instruct: Checkpoint, ops: dict[str, TensorOp], opts: MergeOptions) -> tuple[list[OutShard], bool]:
    """Output files: Instruct's names and tensor-to-file map, or `--max-shard-size` shards.

    Within a file, tensors keep Instruct's order, stably sorted by element size (largest first) so that every
    tensor starts aligned to its element size, as the reference writer guarantees.
    """

    def ordered(names):
        return sorted((ops[n] for n in names), key=lambda op: -DTYPE_BITS[op.out_dtype])

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
    return [
        OutShard(f"model-{k + 1:05d}-of-{n:05d}.safetensors", ordered(g), {"format": "pt"})
        for k, g in enumerate(groups)
    ], True
