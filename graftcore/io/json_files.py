"""The one way graftcore reads JSON: headers, indexes, adapter configs, graftcore.json and its progress files.

Python's `json` accepts what the reference safetensors parser refuses (NaN, 1e999, a key given twice, whose
last value silently wins) and fails in ways the CLI cannot report as one line (RecursionError on nesting
1000 deep, ValueError on an integer of 4300+ digits). `parse_json` refuses all of these with the error class
the caller names, so every file we parse keeps the exit-2 contract; `read_json_file` opens only a regular
file (a FIFO would block, /dev/zero never ends) of a bounded size.

Example:
    >>> parse_json(b'{"a": 1}', "x.json", "the index")
    {'a': 1}
    >>> parse_json(b'{"a": 1, "a": 2}', "x.json", "the index")
    Traceback (most recent call last):
    graftcore.errors.CheckpointError: x.json: the index names 'a' twice
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from graftcore.errors import CheckpointError, GraftError

MAX_JSON_BYTES = 100_000_000  # as the reference parser's header limit: every file we parse is smaller


class DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def unique_object(pairs: list) -> dict:
    """object_pairs_hook: the dict of `pairs`, or DuplicateKey when a key comes twice."""
    doc = dict(pairs)
    if len(doc) != len(pairs):
        seen: set = set()
        raise DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return doc


def parse_json(raw: bytes | str, path, what: str, error: type[GraftError] = CheckpointError):
    """The JSON document in `raw` (the `what` of file `path`), or `error` naming the file: never NaN/Infinity,
    a number out of float range, a key given twice, nor a RecursionError or ValueError escaping."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        return json.loads(
            text, parse_constant=reject_constant, parse_float=finite_float, object_pairs_hook=unique_object
        )
    except DuplicateKey as e:
        raise error(f"{path}: {what} names {e.key!r} twice") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError includes JSONDecodeError
        raise error(f"{path}: {what} is not valid JSON ({str(e)[:200]})") from None


def read_json_file(
    path: str | os.PathLike, what: str, error: type[GraftError] = CheckpointError, max_bytes: int = MAX_JSON_BYTES
):
    """parse_json of the regular file `path` (see read_file_bytes); `error` naming it for anything wrong but a
    missing file: FileNotFoundError is left to callers that say more about it."""
    return parse_json(read_file_bytes(path, what, error, max_bytes), path, what, error)


def read_file_bytes(
    path: str | os.PathLike, what: str, error: type[GraftError] = CheckpointError, max_bytes: int = MAX_JSON_BYTES
) -> bytes:
    """The bytes of the regular file `path`; `error` naming it when it is not a regular file (a FIFO, a device,
    a link to /dev/zero), larger than `max_bytes` or unreadable (FileNotFoundError passes through)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO must not wait for a writer
    except FileNotFoundError:
        raise
    except OSError as e:
        raise error(f"{path}: cannot read {what} ({e.strerror or e})") from None
    with open(fd, "rb") as f:
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise error(f"{path}: {what} is not a regular file")
            if st.st_size > max_bytes:
                raise error(f"{path}: {what} is {st.st_size} bytes, over the {max_bytes}-byte limit")
            raw = f.read(max_bytes + 1)
        except OSError as e:
            raise error(f"{path}: cannot read {what} ({e.strerror or e})") from None
    if len(raw) > max_bytes:  # it grew while we read it
        raise error(f"{path}: {what} is over the {max_bytes}-byte limit")
    return raw


def reject_constant(name: str):
    """NaN and Infinity are not JSON: the reference parser refuses a header holding them, so do we."""
    raise ValueError(f"{name} is not valid JSON")


def finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):  # 1e999: out of range for the reference parser
        raise ValueError(f"number {text[:40]} out of range")
    return value
