"""Tensor names across inputs: an input's names rewritten into Instruct's, from its headers alone.

The same weights can be named differently by the model class that saved them. transformers saves a text model's
layers as `model.layers.N...` and `lm_head.weight`, and a vision-language model built around it as
`language_model.model.layers.N...` and `language_model.lm_head.weight` (Llava, Gemma 3; seen in the files
`save_pretrained` writes with transformers 5). Grafting a text Base's update onto such an Instruct needs one
consistent prefix rewrite, `'' -> 'language_model.'`. Training wrappers add `module.` (DDP) or `_orig_mod.`
(torch.compile) in front of every name.

A rewrite is (old prefix, new prefix). `align` takes the user's `--rename OLD=NEW` rules, else strips wrapper
prefixes, else infers one rewrite: every candidate that maps a name Instruct lacks onto one it has is tried on all
such names, and the one that maps the most, with every shape equal and no two names onto one, is taken when it is
the only one that does. Anything else is left as it is (the planner then reports what does not match).

Example:
    >>> base = {"model.norm.weight": (4,), "lm_head.weight": (8, 4)}
    >>> instruct = {"language_model.model.norm.weight": (4,), "language_model.lm_head.weight": (8, 4)}
    >>> infer_rewrite(base, instruct)
    ('', 'language_model.')
"""

from __future__ import annotations

from collections.abc import Mapping

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


def infer_rewrite(shapes: Mapping[str, tuple], reference: Mapping[str, tuple]) -> tuple[str, str] | None:
    """The one prefix rewrite that maps the most of `shapes`' names that `reference` lacks onto names it has, with
    equal shapes and no collision; None when there is none, or more than one does equally well."""
    missing = [n for n in shapes if n not in reference]
    if not missing:
        return None
    candidates = set()
    for n in missing[:CANDIDATES_FROM]:
        parts = n.split(".")
        for k in range(len(parts)):  # n = old + suffix; an Instruct name new + suffix gives (old, new)
            old, suffix = ".".join(parts[:k]) + ("." if k else ""), ".".join(parts[k:])
            for m in reference:
                if m != n and (m == suffix or m.endswith("." + suffix)):
                    candidates.add((old, m[: len(m) - len(suffix)]))
    best: dict[frozenset, tuple[str, str]] = {}  # what a rewrite maps -> the shortest rule that does it
    for old, new in sorted(candidates, key=lambda c: (len(c[0]), c)):
        mapping = apply_rewrite(missing, old, new)
        hits = {n: r for n, r in mapping.items() if r in reference}
        if not hits or len(set(hits.values())) < len(hits):
            continue
        if any(tuple(shapes[n]) != tuple(reference[r]) for n, r in hits.items()):
            continue
        if any(r in shapes and r not in mapping for r in hits.values()):  # would collide with a name that matches
            continue
        best.setdefault(frozenset(hits.items()), (old, new))  # ('', 'x.') and ('model.', 'x.model.') are one
    if not best:
        return None
    ranked = sorted(best.items(), key=lambda kv: -len(kv[0]))
    if len(ranked) > 1 and len(ranked[1][0]) == len(ranked[0][0]):
        return None  # two different rewrites do equally well: say nothing rather than guess
    return ranked[0][1]


def infer_rewrites(shapes: Mapping[str, tuple], reference: Mapping[str, tuple], most: int = 4) -> list[tuple[str, str]]:
    """infer_rewrite again and again on the names still missing from `reference` (a VL model's language layers and
    its vision tower can each need their own rewrite): the rules found, in order; each maps names no earlier one
    did."""
    rules: list[tuple[str, str]] = []
    current = dict(shapes)
    for _ in range(most):
        rule = infer_rewrite(current, reference)
        if rule is None:
            break
        rules.append(rule)
        moved = {
            n: r for n, r in apply_rewrite([n for n in current if n not in reference], *rule).items() if r in reference
        }
        current = {moved.get(n, n): s for n, s in current.items()}
    return rules


def rewrite_names(names, rules: list[tuple[str, str]], reference) -> dict[str, str]:
    """name -> its name after the first of `rules` that maps it onto a name of `reference` (else itself)."""
    out = {}
    for n in names:
        out[n] = n
        if n in reference:
            continue
        for old, new in rules:
            if n.startswith(old) and new + n[len(old) :] in reference:
                out[n] = new + n[len(old) :]
                break
    return out


def align(names_shapes: Mapping[str, tuple], reference: Mapping[str, tuple], renames: list[tuple[str, str]]):
    """(original name -> Instruct's name, [(old, new, count), ...] applied, inferred?) for one input."""
    rename = {n: n for n in names_shapes}
    applied = []
    for old, new in renames:
        mapped = apply_rewrite(names_shapes, old, new)
        rename.update(mapped)
        applied.append((old, new, len(mapped)))
    if renames:
        return rename, applied, False
    wrapper = strip_wrapper_prefixes(list(names_shapes))
    if wrapper:
        stripped = {n: n[len(wrapper) :] for n in names_shapes}
        if sum(s in reference for s in stripped.values()) > sum(n in reference for n in names_shapes):
            return stripped, [(wrapper, "", len(stripped))], False
    rule = infer_rewrite(names_shapes, reference)
    if rule is None:
        return rename, [], False
    missing = [n for n in names_shapes if n not in reference]
    mapped = {n: r for n, r in apply_rewrite(missing, *rule).items() if r in reference}
    rename.update(mapped)
    return rename, [(rule[0], rule[1], len(mapped))], True
