"""Attributes of a package loaded on first use: a table of name -> module (under graftcore), so importing the
package (or one of its modules) loads nothing else, and `graftcore --version` starts in a fraction of a second.

Example:
    >>> __getattr__ = lazy_attributes("graftcore.plan", {"Plan": "plan.ops"})
    >>> __getattr__("Plan").__name__
    'Plan'
"""

from __future__ import annotations

from collections.abc import Callable


def lazy_attributes(package: str, table: dict[str, str]) -> Callable[[str], object]:
    """A module-level `__getattr__` for `package` that imports `graftcore.<table[name]>` and returns its `name`."""

    def __getattr__(name: str):
        if name in table:
            from importlib import import_module

            return getattr(import_module(f"graftcore.{table[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
