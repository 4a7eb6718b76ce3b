"""REF -> Checkpoint: local folders and files (local.py), hub repos (hub.py), and what both build (checkpoint.py).

Example:
    >>> from graftcore.sources.local import open_checkpoint
    >>> ck = open_checkpoint("path/to/Llama-3.1-8B-Instruct")   # doctest: +SKIP
"""

from graftcore.sources.checkpoint import Checkpoint
from graftcore.sources.local import open_checkpoint

__all__ = ["Checkpoint", "open_checkpoint"]
