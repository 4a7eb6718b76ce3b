"""The tensor-level API, for merge tools that already hold tensors in memory: the same math and the same bits
as `graftcore.graft` on files, with the same matching policy for whole state dicts.

Example:
    >>> import torch, graftcore
    >>> i, t, b = torch.ones(3, dtype=torch.bfloat16), torch.full((3,), 3.0), torch.full((3,), 2.0)
    >>> graftcore.graft_tensor(i, t, b, alpha=0.5)
    tensor([1.5000, 1.5000, 1.5000], dtype=torch.bfloat16)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from graftcore.errors import GraftError, MismatchError, NonFiniteError
from graftcore.io.safetensors_file import TORCH_TO_CODE, TensorInfo
from graftcore.options import MergeOptions, alphas_from
from graftcore.plan.build import plan_tensor
from graftcore.plan.ops import Action, DeltaInput, tuned_role

GRAFTABLE = (torch.bfloat16, torch.float16, torch.float32)


def graft_tensor(
    instruct: torch.Tensor,
    tuned: torch.Tensor | Sequence[torch.Tensor],
    base: torch.Tensor,
    alpha: float | Sequence[float] = 1.0,
    dtype: torch.dtype | str | None = None,
    allow_nonfinite: bool = False,
) -> torch.Tensor:
    """`round(I + a1 * (T1 - B) + a2 * (T2 - B) + ...)`, out of place, on the tensors' device (CUDA: the fused
    Triton kernel; else the CPU twin), with the engine's bits.

    Args:
        instruct, base: bf16/fp16/fp32 tensors of one shape, on one device (dtypes may differ).
        tuned: one such tensor, or a sequence of them (one delta each).
        alpha: the coefficient of every delta, or one per delta (finite numbers).
        dtype: the result's dtype (torch.bfloat16 / "bfloat16" / "bf16", ...); default: Instruct's.
        allow_nonfinite: keep NaN/Inf appearing in a delta, or produced from finite inputs (overflow), instead
            of raising NonFiniteError. NaN/Inf of Instruct itself are carried through either way.

    Returns:
        A new tensor of Instruct's shape.

    Example:
        >>> a, b = torch.zeros(2), torch.zeros(2)
        >>> graft_tensor(torch.ones(2), [a + 1, a + 2], b, alpha=[1.0, 0.5], dtype="float16")
        tensor([3., 3.], dtype=torch.float16)
    """
    from graftcore.kernels import graft_

    tuned = [tuned] if isinstance(tuned, torch.Tensor) else list(tuned)
    alphas = alphas_from(alpha)
    if len(alphas) == 1:
        alphas *= len(tuned)
    if not tuned or len(alphas) != len(tuned):
        raise GraftError(f"graft_tensor: {len(alphas)} alpha(s) for {len(tuned)} tuned tensor(s)")
    out_dtype = resolve_dtype(dtype, instruct.dtype)
    named = {"instruct": instruct, "base": base, **{f"tuned[{k}]": t for k, t in enumerate(tuned)}}
    for name, x in named.items():
        if not isinstance(x, torch.Tensor):
            raise GraftError(f"graft_tensor: {name} is a {type(x).__name__}, not a tensor")
        if x.dtype not in GRAFTABLE:
            raise GraftError(f"graft_tensor: {name} is {x.dtype}; grafting reads bfloat16, float16 or float32")
        if x.shape != instruct.shape:
            raise MismatchError(f"graft_tensor: {name} has shape {list(x.shape)}, instruct {list(instruct.shape)}")
        if x.device != instruct.device:
            raise GraftError(f"graft_tensor: {name} is on {x.device}, instruct on {instruct.device}")
        if x.is_meta:
            raise GraftError(
                f"graft_tensor: {name} is on the meta device: it has no data to graft (load or materialize it first)"
            )
    out = torch.empty(instruct.shape, dtype=out_dtype, device=instruct.device)
    found = graft_(out, instruct.contiguous(), [t.contiguous() for t in tuned], base.contiguous(), alphas)
    if found.deltas and not allow_nonfinite:
        raise NonFiniteError(
            f"graft_tensor: {found.deltas} element(s) of tuned - base are NaN/Inf (allow_nonfinite=True keeps them)"
        )
    if found.overflow and not allow_nonfinite:
        raise NonFiniteError(
            f"graft_tensor: {found.overflow} element(s) of the result are NaN/Inf in {out_dtype} although every "
            "input is "
            f"finite (allow_nonfinite=True keeps them)"
        )
    return out


def graft_state_dict(
    instruct: Mapping[str, torch.Tensor],
    tuned: Mapping[str, torch.Tensor] | Sequence[Mapping[str, torch.Tensor]],
    base: Mapping[str, torch.Tensor],
    alpha: float | Sequence[float] = 1.0,
    dtype: torch.dtype | str | None = None,
    **options,
) -> dict[str, torch.Tensor]:
    """Every tensor of `instruct` grafted (or copied) by the file merge's matching policy, in memory.

    Tensors in all with one shape are grafted; Instruct's extra leading rows (a grown vocabulary) are copied;
    tensors only in Instruct, non-float ones, or outside include/exclude/targets are Instruct's (converted to
    `dtype`); a tensor in Base but not in a tuned dict, or of another shape, raises MismatchError.

    Args:
        instruct, base: name -> tensor. tuned: one such dict or a list of them.
        alpha, dtype: as in graft_tensor. **options: include, exclude, targets, allow_nonfinite.

    Example:
        >>> sd = {"w": torch.ones(2, 2)}
        >>> graft_state_dict(sd, {"w": torch.full((2, 2), 3.0)}, {"w": torch.full((2, 2), 2.0)})["w"]
        tensor([[2., 2.],
                [2., 2.]])
    """
    tuned = [tuned] if isinstance(tuned, Mapping) else list(tuned)
    allowed = {"include", "exclude", "targets", "allow_nonfinite"}
    if set(options) - allowed:
        raise GraftError(f"graft_state_dict: unknown option(s) {', '.join(sorted(set(options) - allowed))}")
    opts = MergeOptions(alpha=alpha, **options)
    roles = [tuned_role(k) for k in range(len(tuned))]
    deltas = [DeltaInput(role, a, None) for role, a in zip(roles, opts.alphas(len(tuned)))]
    infos = {"base": infos_of(base), **{role: infos_of(sd) for role, sd in zip(roles, tuned)}}
    sources = [(d, infos[d.role], {}) for d in deltas]
    tensors = dict(zip(roles, tuned))

    def locate(role: str, info: TensorInfo | None) -> str:
        return f"the {role} state dict"

    merged = {}
    for name, i in instruct.items():
        info = TensorInfo(name, TORCH_TO_CODE.get(i.dtype, "F32"), tuple(i.shape), "", 0, 0)
        op = plan_tensor(name, info, infos["base"].get(name), sources, opts, locate)
        out_dtype = resolve_dtype(dtype, i.dtype) if i.dtype in GRAFTABLE else i.dtype
        if op.action is Action.COPY:
            merged[name] = i.to(out_dtype, copy=True)
            continue
        shared = i[: op.rows] if op.action is Action.GRAFT_ROWS else i
        delta_tensors = [tensors[t.role][name] for t in op.terms]
        alphas = [t.alpha for t in op.terms]
        grafted = graft_tensor(shared, delta_tensors, base[name], alphas, out_dtype, opts.allow_nonfinite)
        if op.action is Action.GRAFT_ROWS:  # Instruct's extra rows, copied
            grafted = torch.cat([grafted, i[op.rows :].to(out_dtype)])
        merged[name] = grafted
    return merged


def infos_of(state_dict: Mapping[str, torch.Tensor]) -> dict[str, TensorInfo]:
    """Header-like entries (name, dtype code, shape) for the planner's matching policy."""
    return {
        n: TensorInfo(n, TORCH_TO_CODE.get(t.dtype, "F32"), tuple(t.shape), "", 0, 0) for n, t in state_dict.items()
    }


def resolve_dtype(dtype: torch.dtype | str | None, default: torch.dtype) -> torch.dtype:
    """torch.bfloat16, "bfloat16", "bf16", ... -> a dtype the kernels write; GraftError otherwise."""
    if dtype is None or dtype == "auto":
        return default
    if isinstance(dtype, str):
        name = MergeOptions(dtype=dtype).dtype
        dtype = getattr(torch, name)
    if dtype not in GRAFTABLE:
        raise GraftError(f"dtype {dtype}: expected bfloat16, float16 or float32")
    return dtype
