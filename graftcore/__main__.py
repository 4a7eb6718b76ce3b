"""`python -m graftcore ...` (and `torchrun ... -m graftcore ...`) runs the `graftcore` command."""

from graftcore.cli import entry

entry()
