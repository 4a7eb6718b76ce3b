"""One exception hierarchy for everything graftcore reports to users.

Every message names the file and, where there is one, the tensor, so the CLI can print it as one line.
"""


class GraftError(Exception):
    """Base class: bad input or a condition the user must fix (the CLI exits 2)."""


class CheckpointError(GraftError):
    """A checkpoint is unreadable or malformed (bad header, missing shard, .bin-only folder)."""


class MismatchError(GraftError):
    """Base, tuned and Instruct disagree in a way no policy resolves (names, shapes, dtypes)."""


class NonFiniteError(GraftError):
    """NaN or Inf appeared in tuned - base for a tensor."""


class OutputError(GraftError):
    """The output folder cannot be used (occupied by something else, not writable)."""


class DownloadError(GraftError):
    """A hub repo, revision or file cannot be fetched (missing, gated, offline)."""


class AdapterError(GraftError):
    """A PEFT adapter is malformed or does not fit the Instruct model."""


class VerifyError(GraftError):
    """An output folder is not what graftcore wrote (a changed shard, index or input), found by `graftcore verify`."""
