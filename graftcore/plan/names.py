"""Tensor names across inputs: an input's names rewritten into Instruct's, from its headers alone.

The same weights can be named differently by the model class that saved them. transformers saves a text model's
layers as `model.layers.N...` and `lm_head.weight`, and a vision-language model built around it as
`language_model.model.layers.N...` and `language_model.lm_head.weight` (Llava, Gemma 3; seen in the files
`save_pretrained` writes with transformers 5). Grafting a text Base's update onto such an Instruct needs one
consistent prefix rewrite, `'' -> 'language_model.'`. Training wrappers add `module.` (DDP) or `_orig_mod.`
(torch.compile) in front of every name.

A rewrite is (old prefix, new prefix). `align` takes the user's `--rename OLD=NEW` rules, else strips wrapper
prefixes, else infers one rewrite: candidates are drawn from a few of the names Instruct lacks (a common dotted
suffix of at least module and weight), each is counted over all the missing names under its prefix, and the one
that maps the most, every one fitting Instruct's shape (equal, or a vocabulary grown in Instruct) and none onto a
name the input already has, is taken unless another maps as many. A prefix holding a layer's or an expert's index
is never a candidate: that would move a tensor to another layer. It may leave some names unmapped; the planner
then reports what does not match.

Example:
    >>> base = {"model.norm.weight": (4,), "lm_head.weight": (8, 4)}
    >>> instruct = {"language_model.model.norm.weight": (4,), "language_model.lm_head.weight": (8, 4)}
    >>> infer_rewrite(base, instruct)
    ('', 'language_model.')
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping

from graftcore.errors import GraftError
from graftcore.plan.layouts import segment_variants
from graftcore.shapes import only_rows_grew

WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP, torch.compile
CANDIDATES_FROM = 4  # names Instruct lacks that candidate rewrites are drawn from


def apply_rewrite(names, old: str, new: str) -> dict[str, str]:
    """original name -> rewritten name, for the names that start with `old`."""
    return {n: new + n[len(old) :] for n in names if n.startswith(old)}


def strip_wrapper_prefixes(names) -> str:
    """The wrapper prefixes (`module.`, `_orig_mod.`, nested) every name starts with, '' if none."""
    prefix = ""
    while names and (p := next((w for w in WRAPPER_PREFIXES if all(n.startswith(prefix + w) for n in names)), None)):
        prefix += p
    return prefix


def suffix_index(reference: Mapping[str, tuple]) -> dict[str, list[str]]:
    """Every dotted suffix of at least two parts (module and weight/bias) of `reference`'s names -> those names."""
    index: dict[str, list[str]] = {}
    for m in reference:
        parts = m.split(".")
        for k in range(len(parts) - 1):
            index.setdefault(".".join(parts[k:]), []).append(m)
    return index


def numbered(prefix: str) -> bool:
    """Whether a prefix holds a numeric component (a layer's or an expert's index): a rewrite that moves a tensor
    to another layer is never inferred (an adapter for layer 7 of a 2-layer model must not land on layer 1)."""
    return any(part.isdigit() for part in prefix.split("."))


def fits(shape: tuple, target: tuple) -> bool:
    """Whether a tensor of `shape` grafts onto one of `target`: equal, or only dim 0 larger in the target (a
    vocabulary grown in Instruct: its shared rows are grafted, as the planner does)."""
    shape, target = tuple(shape), tuple(target)
    return shape == target or only_rows_grew(shape, target)


def infer_rewrite(shapes: Mapping[str, tuple], reference: Mapping[str, tuple], index=None) -> tuple[str, str] | None:
    """The prefix rewrite that maps the most of `shapes`' names that `reference` lacks onto names it has, every one
    of them fitting (fits) and none onto a name the input already has; None when none does, or when another
    rewrite maps equally many of the same names elsewhere (rewrites of disjoint names, equally many, are not
    rivals: the first is returned, and infer_rewrites finds the other). Candidates come from a few of the missing
    names (CANDIDATES_FROM); each is then counted over all the missing names under its prefix (a bisect into them,
    sorted)."""
    missing = sorted(n for n in shapes if n not in reference)
    if not missing:
        return None
    index = suffix_index(reference) if index is None else index
    step = max(1, len(missing) // CANDIDATES_FROM)
    candidates = set()
    for n in missing[::step][:CANDIDATES_FROM]:
        parts = n.split(".")
        for k in range(len(parts) - 1):  # n = old + suffix; an Instruct name new + suffix gives (old, new)
            old, suffix = ".".join(parts[:k]) + ("." if k else ""), ".".join(parts[k:])
            for m in index.get(suffix, ()):
                new = m[: len(m) - len(suffix)]
                if m != n and not numbered(old) and not numbered(new):
                    candidates.add((old, new))
    best: dict[frozenset, tuple[str, str]] = {}  # what a rewrite maps -> the shortest rule that does it
    for old, new in sorted(candidates, key=lambda c: (len(c[0]), c)):
        lo, hi = bisect.bisect_left(missing, old), bisect.bisect_left(missing, old + "\U0010ffff")
        hits = {}
        for n in missing[lo:hi]:
            r = new + n[len(old) :]
            if r in reference:
                if not fits(shapes[n], reference[r]) or r in shapes:  # a shape that cannot graft; a collision
                    hits = {}
                    break
                hits[n] = r
        if hits:
            best.setdefault(frozenset(hits.items()), (old, new))  # ('', 'x.') and ('model.', 'x.model.') are one
    if not best:
        return None
    ranked = sorted(best.items(), key=lambda kv: -len(kv[0]))
    first = {n for n, _ in ranked[0][0]}
    tied = [hits for hits, _ in ranked[1:] if len(hits) == len(ranked[0][0])]
    if any(n in first for hits in tied for n, _ in hits):
        return None  # two rewrites read the same names two ways, equally well: say nothing rather than guess
    return ranked[0][1]  # rewrites of other names (a VL model's vision tower) are found by the next round


def infer_rewrites(shapes: Mapping[str, tuple], reference: Mapping[str, tuple], most: int = 4) -> list[tuple[str, str]]:
    """infer_rewrite again and again on the names still missing from `reference` (a VL model's language layers and
    its vision tower can each need their own rewrite): the rules found, in order; each maps names no earlier one
    did."""
    rules: list[tuple[str, str]] = []
    current = dict(shapes)
    index = suffix_index(reference)
    for _ in range(most):
        rule = infer_rewrite(current, reference, index)
        if rule is None:
            break
        rules.append(rule)
        moved = {
            n: r for n, r in apply_rewrite([n for n in current if n not in reference], *rule).items() if r in reference
        }
        current = {moved.get(n, n): s for n, s in current.items()}
    return rules


def rewrite_names(names, rules: list[tuple[str, str]], reference) -> dict[str, str]:
    """name -> its name after the first of `rules` whose prefix it has (with a `reference`: the first that maps it
    onto one of its names, and names it already holds stay), else itself."""
    out = {}
    for n in names:
        out[n] = n
        if reference is not None and n in reference:
            continue
        for old, new in rules:
            if n.startswith(old) and (reference is None or new + n[len(old) :] in reference):
                out[n] = new + n[len(old) :]
                break
    return out


def align(names_shapes: Mapping[str, tuple], reference: Mapping[str, tuple], renames: list[tuple[str, str]]):
    """(original name -> Instruct's name, [(old, new, count), ...] applied, inferred?) for one input. GraftError
    when --rename rules would read two tensors under one name."""
    if renames:
        rename = rewrite_names(list(names_shapes), renames, None)
        applied = [
            (old, new, sum(1 for n in names_shapes if n.startswith(old) and rename[n] != n)) for old, new in renames
        ]
        check_distinct(rename)
        return rename, applied, False
    rename = {n: n for n in names_shapes}
    wrapper = strip_wrapper_prefixes(list(names_shapes))
    if wrapper:
        stripped = {n: n[len(wrapper) :] for n in names_shapes}
        if sum(s in reference for s in stripped.values()) > sum(n in reference for n in names_shapes):
            return stripped, [(wrapper, "", len(stripped))], False
    rule = infer_rewrite(names_shapes, reference)
    applied = []
    if rule is not None:
        missing = [n for n in names_shapes if n not in reference]
        mapped = {n: r for n, r in apply_rewrite(missing, *rule).items() if r in reference}
        rename.update(mapped)
        applied.append((rule[0], rule[1], len(mapped)))
    applied += segment_renames(names_shapes, reference, rename)
    return rename, applied, bool(applied)


def segment_renames(names_shapes: Mapping[str, tuple], reference: Mapping[str, tuple], rename: dict) -> list:
    """Read names Instruct still lacks with a segment transformers renames on load (layouts.FILE_SEGMENTS: Mixtral's
    `.block_sparse_moe.` saved per expert, `.mlp.` saved fused) as Instruct names them, where it has that name
    with a fitting shape and the input does not; updates `rename`; [(old, new, count)] for what was read so."""
    taken = set(rename.values())
    counts: dict[tuple[str, str], int] = {}
    for n, r in rename.items():
        if r in reference:
            continue
        for variant in segment_variants(r)[1:]:
            if variant in reference and variant not in taken and fits(names_shapes[n], reference[variant]):
                rename[n] = variant
                taken.add(variant)
                pair = next((a, b) for a, b in zip(r.split("."), variant.split(".")) if a != b)
                counts[pair] = counts.get(pair, 0) + 1
                break
    return [(f".{a}.", f".{b}.", k) for (a, b), k in counts.items()]


def check_distinct(rename: dict[str, str]) -> None:
    """GraftError when two names are read as one."""
    seen: dict[str, str] = {}
    for n, r in rename.items():
        if r in seen:
            raise GraftError(f"--rename: tensors {seen[r]!r} and {n!r} would both be read as {r!r}")
        seen[r] = n
