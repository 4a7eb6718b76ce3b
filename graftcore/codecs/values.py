"""What several codecs read from configs and scale bytes: compressed-tensors' config groups, "AxB" pairs, the float32
values of a scale tensor's stored bytes (numpy, torch-free).

Example:
    >>> positive_pair("128x128"), positive_pair([1, 32]), positive_pair([0, 1])
    ((128, 128), (1, 32), None)
"""

from __future__ import annotations


def group_weights(config: dict) -> list[tuple[str, dict]]:
    """('config_groups.NAME', its `weights` scheme) for each compressed-tensors group that quantizes weights."""
    groups = config.get("config_groups")
    out = []
    for name, group in groups.items() if isinstance(groups, dict) else ():
        weights = group.get("weights") if isinstance(group, dict) else None
        if isinstance(weights, dict):
            out.append((f"config_groups.{name}", weights))
    return out


def positive_pair(value) -> tuple[int, int] | None:
    """(a, b) from [a, b] or "AxB" with positive ints; None for anything else."""
    if isinstance(value, str) and value.lower().count("x") == 1:
        value = value.lower().split("x")
        value = [int(v) if v.strip().isdigit() else None for v in value]
    ok = isinstance(value, list) and len(value) == 2
    ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    return tuple(value) if ok else None


def scale_values(data: bytes, dtype: str):
    """numpy float32 values of a scale tensor's bytes (little-endian F32, F16 or BF16; E8M0 bytes as 2 ** (b - 127),
    0xFF as NaN)."""
    import numpy as np

    if dtype == "F8_E8M0":
        b = np.frombuffer(data, np.uint8).astype(np.int32)
        return np.where(b == 255, np.float32(np.nan), np.ldexp(np.float32(1.0), np.minimum(b, 254) - 127))
    if dtype == "BF16":
        return (np.frombuffer(data, "<u2").astype(np.uint32) << 16).view(np.float32)
    return np.frombuffer(data, "<f4" if dtype == "F32" else "<f2").astype(np.float32)


def encoding_record(kind: str, precision: str, error_sq: float, update_sq: float, rescaled: int, blocks: int) -> dict:
    """graftcore.json's record of one re-encoded tensor: its format, the relative error of the applied update
    ||deq(out) - deq(I) - update|| / ||update|| (0 for an update of zero) and its squared norms (None where not
    finite: JSON has no NaN, "not measured"), the blocks or groups that took a new scale."""
    import math

    finite = lambda v: v if math.isfinite(v) else None  # noqa: E731
    error = (error_sq / update_sq) ** 0.5 if update_sq else 0.0
    return {
        "kind": kind,
        "precision": precision,
        "update_error": finite(error),
        "rescaled_blocks": rescaled,
        "blocks": blocks,
        "update_norm_sq": finite(update_sq),
        "error_norm_sq": finite(error_sq),
    }
