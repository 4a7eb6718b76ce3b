"""graftcore: graft a fine-tune of a Base model onto its Instruct model, tensor by tensor, streaming.

    W_out = W_instruct + a1 * (W_tuned1 - W_base) + a2 * (W_tuned2 - W_base) + ...    float32 math, one rounding

Example:
    >>> import graftcore
    >>> report = graftcore.graft(base="base", tuned="sft", instruct="instruct", output="out")  # doctest: +SKIP
"""

from graftcore.errors import (  # noqa: E402
    AdapterError,
    CheckpointError,
    DownloadError,
    GraftError,
    MismatchError,
    NonFiniteError,
    OutputError,
    VerifyError,
)
from graftcore.lazy import lazy_attributes  # noqa: E402
from graftcore.options import MergeOptions  # noqa: E402
from graftcore.version import __version__  # noqa: E402

# loaded on first use (some import torch), so `graftcore --version` and `--help` start in a fraction of a second
_LAZY = {
    "graft": "api",
    "graft_tensor": "tensors",
    "graft_state_dict": "tensors",
    "open_checkpoint": "sources",
    "Checkpoint": "sources",
    "Report": "plan.report",
    "Progress": "plan.report",
    "Plan": "plan",
    "verify": "analysis.verify",
    "VerifyReport": "plan.report",
    "similarity": "analysis.similarity",
    "SimilarityReport": "analysis.similarity",
}


__getattr__ = lazy_attributes(__name__, _LAZY)


__all__ = [
    "graft",
    "graft_tensor",
    "graft_state_dict",
    "Report",
    "Progress",
    "Plan",
    "verify",
    "VerifyReport",
    "similarity",
    "SimilarityReport",
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
    "VerifyError",
    "__version__",
]
