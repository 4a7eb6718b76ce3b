"""graftcore: graft a fine-tune of a Base model onto its Instruct model, tensor by tensor, streaming.

    W_out = W_instruct + alpha * (W_tuned - W_base)      float32 math, one rounding

Example:
    >>> import graftcore
    >>> report = graftcore.graft(base="base", tuned="sft", instruct="instruct", output="out")  # doctest: +SKIP
"""

__version__ = "0.1.0"

from .api import graft  # noqa: E402
from .errors import (  # noqa: E402
    AdapterError,
    CheckpointError,
    DownloadError,
    GraftError,
    MismatchError,
    NonFiniteError,
    OutputError,
)
from .options import MergeOptions  # noqa: E402
from .sources import Checkpoint, open_checkpoint  # noqa: E402

__all__ = [
    "graft",
    "open_checkpoint",
    "Checkpoint",
    "MergeOptions",
    "GraftError",
    "CheckpointError",
    "MismatchError",
    "NonFiniteError",
    "OutputError",
    "DownloadError",
    "AdapterError",
    "__version__",
]
