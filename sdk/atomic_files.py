"""The delta store's file I/O: crash-safe replacement (a reader sees the old file or the new
one, never a half-written one, also after a power cut) and the typed errors of a failed write
(StoreWriteError) or read (StoreReadError).

Example:
    >>> import tempfile, pathlib
    >>> from bitfit.sdk.atomic_files import write_file_atomic
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "HEAD"
    >>> write_file_atomic(path, b'{"current": 1}')
    >>> path.read_bytes()
    b'{"current": 1}'
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import StoreReadError, StoreWriteError

# Temporary files start with this; the store removes such leftovers of a crash.
TEMP_PREFIX = ".tmp-"


def write_file_atomic(path: str | os.PathLike, data: bytes, *, sync_directory: bool = True) -> None:
    """Replace the file at ``path`` with ``data`` so that a crash leaves the old or the new file.

    Writes a ``.tmp-`` file in the same directory, fsyncs it, renames it over ``path``
    and fsyncs the directory (so the rename itself survives a power cut).
    ``sync_directory=False`` leaves that last fsync to the caller, for a rename that another
    write's directory fsync, in the same directory and before anything relies on it, covers
    (an fsync of a directory makes every entry renamed into it before then durable).

    Raises:
        StoreWriteError: the write failed (its ``errno`` is the OS error's); the old file is
            intact and the temp file removed.

    Example:
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> write_file_atomic(folder / "v1", b"old")
        >>> write_file_atomic(folder / "v1", b"new")
        >>> (folder / "v1").read_bytes(), sorted(p.name for p in folder.iterdir())   # no temp file left
        (b'new', ['v1'])
    """
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".part", dir=path.parent)
        with open(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as err:
        raise _write_error(path, err) from err
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    if sync_directory:
        _fsync_dir(path.parent)


def make_dir_durable(directory: str | os.PathLike) -> bool:
    """Create ``directory`` (and any missing parents) so that it survives a power cut: the
    parent of each level created is fsynced after it. Returns whether anything was created.

    Why: a file fsynced inside a new directory is not durable until the directory's own
    entry in its parent is; without this, a save that returned could vanish in a power cut.

    Raises:
        OSError: the directory could not be created (the caller types it).

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> make_dir_durable(root / "a" / "b"), make_dir_durable(root / "a" / "b")
        (True, False)
    """
    directory = Path(directory)
    try:
        directory.mkdir()
    except FileExistsError:
        if not directory.is_dir():
            raise
        return False
    except FileNotFoundError:
        make_dir_durable(directory.parent)
        try:
            directory.mkdir()
        except FileExistsError:  # another process created it meanwhile and may not have synced it yet
            if not directory.is_dir():
                raise
    _fsync_dir(directory.parent)
    return True


def _fsync_dir(directory: Path) -> None:
    if os.name != "posix":
        return  # Windows cannot open a directory; its rename is durable enough for us
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename already happened
    finally:
        os.close(fd)


def read_error(path: str | os.PathLike, err: OSError) -> StoreReadError:
    """The StoreReadError for a file or directory that exists but cannot be read.

    Why a type of its own: a file that cannot be read is neither missing nor damaged, and
    treating it as either would make the store recover to an older version (a rollback undone).

    Example:
        >>> try:
        ...     open(tempfile.gettempdir(), "rb")                    # a directory: IsADirectoryError
        ... except OSError as err:
        ...     print(read_error(tempfile.gettempdir(), err))
        could not read /...: Is a directory; check that this process may read it (permissions, owner, the disk), then try again. Nothing was treated as missing and no delta was changed
    """
    out = StoreReadError(
        f"could not read {path}: {err.strerror or err}; check that this process may read it (permissions, owner, the "
        "disk), then try again. Nothing was treated as missing and no delta was changed"
    )
    out.errno = err.errno
    return out


def _write_error(path: Path, err: OSError) -> StoreWriteError:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        why = "the disk is full; free some space"
    elif err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        why = "the location is read-only or not writable; check permissions or pick another store root"
    else:
        why = "check the disk and the directory's permissions"
    out = StoreWriteError(f"could not write {path}: {err.strerror or err} ({why}); the previous file is intact")
    out.errno = err.errno
    return out


def replace_dir(work: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Swap a finished directory ``work`` in as ``out_dir``; an old ``out_dir`` is moved aside
    first and removed only after the new one is in place (a reader never sees half of one).

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> (root / "new").mkdir(); _ = (root / "new" / "a.txt").write_text("new")
        >>> (root / "out").mkdir(); _ = (root / "out" / "a.txt").write_text("old")
        >>> replace_dir(root / "new", root / "out")
        >>> (root / "out" / "a.txt").read_text(), sorted(p.name for p in root.iterdir())
        ('new', ['out'])
    """
    work, out_dir = Path(work), Path(out_dir)
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".old-{out_dir.name}-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(work, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def building_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """A fresh directory beside ``out_dir`` to fill; on success it replaces ``out_dir``
    (``replace_dir``), on any error it is removed and ``out_dir`` is left as it was.

    Example:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "adapter"
        >>> with building_dir(out) as work:
        ...     _ = (work / "config.json").write_text("{}")
        >>> sorted(p.name for p in out.iterdir())
        ['config.json']
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    try:
        yield work
        replace_dir(work, out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


__all__ = ["write_file_atomic", "make_dir_durable", "read_error", "replace_dir", "building_dir", "TEMP_PREFIX"]
