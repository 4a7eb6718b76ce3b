"""`python -m graftcore ...` (and `torchrun ... -m graftcore ...`) runs the `graftcore` command."""

from .cli import entry

entry()
