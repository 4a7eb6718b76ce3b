"""Shape arithmetic every layer shares, torch-free.

Example:
    >>> cdiv(300, 128), numel((2, 3)), only_rows_grew((4, 8), (5, 8))
    (3, 6, True)
"""

from __future__ import annotations

from collections.abc import Iterable


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive b, in integers."""
    return -(-a // b)


def numel(shape: Iterable[int]) -> int:
    """Elements of a tensor of this shape (1 for a scalar)."""
    n = 1
    for d in shape:
        n *= d
    return n


def only_rows_grew(smaller: tuple[int, ...], larger: tuple[int, ...]) -> bool:
    """Whether `larger` is `smaller` with more rows (dim 0) and every other dimension equal: Instruct's extra
    vocabulary rows, grafted on the shared rows and copied beyond them."""
    return len(smaller) == len(larger) >= 1 and smaller[1:] == larger[1:] and larger[0] > smaller[0]
