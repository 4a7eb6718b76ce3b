"""Ctrl-C and SIGTERM while data moves: a flag checked at safe points, never an exception inside a lock.

Python raises KeyboardInterrupt wherever the main thread happens to be; inside a `queue.Queue` call shared
with the writer thread that leaves the queue's lock held, and the next wait on it never returns. So while
the engine runs (`deferred()`), SIGINT and SIGTERM only set a flag; every wait of the engine's thread polls
(`POLL`), and `check()` raises KeyboardInterrupt from the engine's own code at the next step, after which
the engine abandons its threads without blocking on them and deletes the partial shard.

Example:
    >>> with deferred():                     # doctest: +SKIP
    ...     for step in steps:
    ...         check()                      # KeyboardInterrupt here, never inside a queue
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

POLL = 0.1  # seconds: the longest any wait of the engine's thread goes without checking the flag
SIGNALS = (signal.SIGINT, signal.SIGTERM)

_requested = threading.Event()
_failure: list = []  # a GraftError to raise instead of KeyboardInterrupt (another rank failed)


def request(signum=None, frame=None) -> None:
    """A signal handler (or a direct call): ask the engine to stop at its next safe point."""
    _requested.set()


def fail(error: Exception) -> None:
    """Stop the engine at its next safe point with `error` (from another thread: a peer rank failed)."""
    _failure[:] = [error]
    _requested.set()


def requested() -> bool:
    return _requested.is_set() and not _failure


def check() -> None:
    """Raise KeyboardInterrupt if a stop was requested, or the error given to fail() (call only where no lock or
    queue operation is open)."""
    if _requested.is_set():
        _requested.clear()  # raised once
        if _failure:
            raise _failure.pop()
        raise KeyboardInterrupt


@contextmanager
def deferred():
    """Within this block, SIGINT and SIGTERM only set the flag (main thread only; elsewhere signals are the
    caller's business and reach no handler of ours). The previous handlers come back afterwards, and a signal
    that arrived meanwhile is raised then as KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, request)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    check()


def import_deferred(name: str):
    """Import the graftcore module `name` (".engine", ".recompute": one that loads torch) within deferred(): a
    KeyboardInterrupt raised inside torch's C++ import code would abort the process. Returns the module."""
    from importlib import import_module

    with deferred():
        return import_module(name, __package__)
