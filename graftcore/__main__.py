"""`python -m graftcore ...` (and `torchrun ... -m graftcore ...`) runs the `graftcore` command."""

import sys

from .cli import main

sys.exit(main())
