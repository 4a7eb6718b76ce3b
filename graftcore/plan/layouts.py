"""MoE experts stored in another layout than Instruct's, read as Instruct's: here, fused experts read per expert.

transformers 5 holds the experts of the qwen2_moe family (Qwen2/3-MoE, DeepSeek-V3, GLM-4 MoE) fused in memory
and, by default, saves them one by one (`save_pretrained(save_original_format=False)` saves them fused):

    fused      P.experts.gate_up_proj  [E, 2I, H]   expert e: rows 0..I-1 its gate_proj, rows I..2I-1 its up_proj
               P.experts.down_proj     [E, H, I]
    per expert P.experts.{e}.gate_proj.weight [I, H], .up_proj.weight [I, H], .down_proj.weight [H, I]

(the shapes of a tiny Qwen3-MoE saved both ways with transformers 5.25; the row order checked on its weights).
Mixtral (and MiniMax) save their experts as `P.experts.{e}.w1.weight` (gate), `.w3.weight` (up), `.w2.weight` (down),
fused the same way: transformers' conversion_mapping.py concatenates w1 then w3 along dim 1 into `gate_up_proj` and
stacks w2 into `down_proj`. In that row-major layout each per-expert tensor is one contiguous range of the fused
one, so both directions stream:
- an input saved fused, read for a per-expert Instruct: TensorInfos covering those ranges (per_expert_views);
- inputs saved per expert, read for a fused Instruct: one logical tensor in 2E (or E) `Pieces`, whose steps are
  cut at the parts' boundaries so that each reads one part (fused_views, steps.read).
Nothing is assembled in memory. GPT-OSS stores its experts fused and transposed ([E, H, 2I], gate and up
interleaved); it has no per-expert form in transformers, so no mix of layouts arises there.

Example:
    >>> views = per_expert_views(base_tensors, instruct.tensors)     # doctest: +SKIP
"""

from __future__ import annotations

import re

from graftcore.io.safetensors_file import Pieces, TensorInfo, itemsize

FUSED = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<kind>gate_up_proj|down_proj)$")
PER_EXPERT = re.compile(r"\.experts\.\d+\.")  # experts.E.gate_proj.weight, Mixtral's experts.E.w1.weight
FUSED_EXPERTS = re.compile(r"\.experts\.(gate_up_proj|down_proj)(_bias)?$")  # transformers 5 in memory: [E, ...]


def expert_layouts(lost: list[str], instruct: dict) -> tuple[str, str] | None:
    """('per expert', 'fused') or the reverse when the tensors an input holds and Instruct lacks are MoE experts in
    the other layout than Instruct's; None otherwise."""
    lost_per, lost_fused = any(PER_EXPERT.search(n) for n in lost), any(FUSED_EXPERTS.search(n) for n in lost)
    has_per = any(PER_EXPERT.search(n) for n in instruct)
    has_fused = any(FUSED_EXPERTS.search(n) for n in instruct)
    if lost_per and has_fused and not has_per:
        return "per expert (experts.N.*)", "fused (experts.gate_up_proj / experts.down_proj)"
    if lost_fused and has_per and not has_fused:
        return "fused (experts.gate_up_proj / experts.down_proj)", "per expert (experts.N.*)"
    return None


# per-expert names of (gate, up, down): the qwen2_moe family's and Mixtral's
NAMINGS = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))
# (segment as transformers 5 names it in memory and in fused files, segment in the original per-expert files):
# conversion_mapping.py, "mixtral" / "phimoe" / "minimax": WeightRenaming(".block_sparse_moe.", ".mlp."), and
# "phimoe" also WeightRenaming(".gate.weight", ".router.weight") (its router); the first pair that applies wins
FILE_SEGMENTS = ((".mlp.router.", ".block_sparse_moe.gate."), (".mlp.", ".block_sparse_moe."))


def segment_variants(name: str) -> list[str]:
    """`name`, then `name` with each FILE_SEGMENTS pair swapped either way (where it holds one)."""
    out = [name]
    for a, b in FILE_SEGMENTS:
        for old, new in ((a, b), (b, a)):
            if old in name and name.replace(old, new, 1) not in out:
                out.append(name.replace(old, new, 1))
    return out


def expert_parts(name: str, shape: tuple, present) -> tuple[list[str], tuple[int, int]] | None:
    """The per-expert tensor names of the fused expert tensor `name` of `shape`, in the order they follow each other
    in it (gate 0, up 0, gate 1, ... or down 0, down 1, ...), and each one's shape, in the naming whose first part
    is in `present` (a set or dict of names); None for any other tensor."""
    m = FUSED.match(name)
    if m is None or len(shape) != 3:
        return None
    kind = m["kind"]
    experts, rows, cols = shape
    if kind != "down_proj" and rows % 2:
        return None
    for prefix in segment_variants(m["prefix"]):
        for gate, up, down in NAMINGS:
            if kind == "down_proj":
                names, part = [f"{prefix}.{e}.{down}.weight" for e in range(experts)], (rows, cols)
            else:
                parts = (gate, up)
                names, part = [f"{prefix}.{e}.{p}.weight" for e in range(experts) for p in parts], (rows // 2, cols)
            if names[0] in present:
                return names, part
    return None


def expert_groups(fused: dict, other: dict):
    """(name, info, per-expert names, per-expert shape) of each tensor of `fused` that `other` lacks and that
    expert_parts reads as experts stored one by one under `other`'s names."""
    for name, info in fused.items():
        layout = None if name in other else expert_parts(name, tuple(info.shape), other)
        if layout is not None:
            yield name, info, *layout


def per_expert_views(tensors: dict[str, TensorInfo], instruct: dict) -> tuple[dict[str, TensorInfo], set[str]]:
    """(per-expert TensorInfos named as Instruct names them, the fused tensors they cover): for each fused expert
    tensor of `tensors` that Instruct stores one expert at a time, a view per expert with its shape and its byte
    range inside the fused tensor. Nothing for a fused tensor Instruct holds itself, or whose shapes do not fit."""
    views: dict[str, TensorInfo] = {}
    used: set[str] = set()
    for name, info, names, shape in expert_groups(tensors, instruct):
        if not all(n in instruct and tuple(instruct[n].shape) == shape for n in names):
            continue
        per = shape[0] * shape[1] * itemsize(info.dtype)  # bytes of one part
        for k, n in enumerate(names):
            start = info.start + k * per
            views[n] = TensorInfo(n, info.dtype, shape, info.file, start, start + per)
        used.add(name)
    return views, used


def fused_views(tensors: dict[str, TensorInfo], instruct: dict) -> tuple[dict[str, Pieces], set[str]]:
    """(Pieces named as Instruct's fused expert tensors, the per-expert tensors of `tensors` they are made of): for
    each fused expert tensor of Instruct whose experts `tensors` holds one by one, every part with its shape."""
    views: dict[str, Pieces] = {}
    used: set[str] = set()
    for name, info, names, shape in expert_groups(instruct, tensors):
        found = [tensors.get(n) for n in names]
        if any(f is None or tuple(f.shape) != shape for f in found) or len({f.dtype for f in found}) != 1:
            continue
        per = shape[0] * shape[1]  # elements of one part
        parts = tuple((k * per, (k + 1) * per, f) for k, f in enumerate(found))
        views[name] = Pieces(name, found[0].dtype, tuple(info.shape), parts, tuple(p[0] for p in parts))
        used.update(names)
    return views, used


def read_in_instructs_layout(tensors: dict[str, TensorInfo], instruct: dict) -> tuple[dict, int]:
    """`tensors` with its MoE experts read in Instruct's layout (per_expert_views, fused_views); and how many of
    its tensors were so read."""
    out = tensors
    moved = 0
    for views, used in (per_expert_views(tensors, instruct), fused_views(tensors, instruct)):
        if views:
            out = {n: info for n, info in out.items() if n not in used}
            out.update(views)
            moved += len(used)
    return out, moved
