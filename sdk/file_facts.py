"""What this process already learned about a file (its sha256, the external data an ONNX
file reads), kept while the file is provably unchanged, so reopening a bundle does not
re-hash and re-parse it.

Why: an app that opens a ``Personalizer`` per user (a server handling one request per user)
opened the same bundle again each time; re-hashing MiniLM's 90 MB of weights and walking its
ONNX files cost ~140 ms a time, and on a tiny model the checks were a fifth of a whole
``personalize``.

When a fact is reused: the file's identity (resolved path, device, inode, size, modification
and status-change times in nanoseconds) is the one it had when the fact was computed, the
identity did not change while it was computed, and both its times were already
:data:`SETTLED_SECONDS` old then. The last rule is git's "racy clean" guard: file times have
a coarse clock (a few milliseconds on Linux), so a same-size rewrite in the same tick as the
computation would keep the identity; a file written that recently is simply checked again
next time. A status-change time cannot be set back by a user, so a rewrite, a ``touch -d``
or a replacement by another file changes the identity. On Windows ``st_ctime`` is the
creation time instead, which a same-size rewrite with its modification time forged back
would keep: nothing is remembered there (:data:`REMEMBERS`), every open checks again.

Example:
    >>> import tempfile, pathlib, hashlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "x"; _ = p.write_bytes(b"abc")
    >>> facts = FileFacts(lambda path: hashlib.sha256(path.read_bytes()).hexdigest())
    >>> facts.get(p)[:12]
    'ba7816bf8f01'
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

Value = TypeVar("Value")

# How old a file's times must be (when a fact is computed) for the fact to be kept.
SETTLED_SECONDS = 2.0
# Facts kept per kind; the least recently used goes first (a bundle has ~10 files).
MAX_FILES = 256
# Whether facts are kept at all: only where st_ctime is the status-change time (not Windows).
REMEMBERS = os.name != "nt"

_Identity = tuple[str, int, int, int, int, int]


def _identity(path: Path) -> tuple[_Identity, os.stat_result]:
    st = os.stat(path)
    return (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns), st


class FileFacts(Generic[Value]):
    """A fact per file (``compute(path)``), recomputed whenever the file may have changed.

    Args:
        compute: what to learn from a file; it may raise, and nothing is kept then.
        max_files: how many files' facts to keep.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "x"; _ = p.write_bytes(b"abc")
        >>> calls = []
        >>> sizes = FileFacts(lambda path: calls.append(path) or path.stat().st_size)
        >>> sizes.get(p), sizes.get(p)
        (3, 3)
        >>> len(calls)        # written just now: not settled, so computed both times
        2
    """

    def __init__(self, compute: Callable[[Path], Value], max_files: int = MAX_FILES) -> None:
        self._compute = compute
        self._max_files = max_files
        self._known: OrderedDict[_Identity, Value] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: str | os.PathLike, *, resolved: bool = False) -> Value:
        """``compute(path)``, or what it returned before for this unchanged file.

        ``resolved=True``: the caller already resolved ``path`` (links followed, absolute), so
        it is not resolved again (the bundle checks resolve each file once).

        Raises:
            OSError: the file cannot be stat'ed; whatever ``compute`` raises.

        Example:
            >>> FileFacts(lambda p: 1).get("/nonexistent")
            Traceback (most recent call last):
            ...
            FileNotFoundError: [Errno 2] No such file or directory: '/nonexistent'
        """
        path = Path(path) if resolved else Path(path).resolve()
        before, st = _identity(path)
        with self._lock:
            if before in self._known:
                self._known.move_to_end(before)
                return self._known[before]
        value = self._compute(path)
        after, _ = _identity(path)
        settled = time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > SETTLED_SECONDS * 1e9
        if after == before and settled and REMEMBERS:
            with self._lock:
                self._known[before] = value
                while len(self._known) > self._max_files:
                    self._known.popitem(last=False)
        return value

    def forget(self) -> None:
        """Drop every kept fact (the next ``get`` of each file computes again).

        Example:
            >>> FileFacts(len).forget()
        """
        with self._lock:
            self._known.clear()


__all__ = ["FileFacts", "SETTLED_SECONDS", "MAX_FILES", "REMEMBERS"]
