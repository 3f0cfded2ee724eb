"""DeltaStore: every user's delta versions on disk, written atomically under a per-user lock.

Layout (``docs/delta-format.md``, "Store layout")::

    <root>/<userdir>/user.json        {"user": "<original id>"}
    <root>/<userdir>/v000001.delta    one delta file per version (monotonic, never reused)
    <root>/<userdir>/HEAD             {"current": 3, "latest": 5}
    <root>/<userdir>/.lock            filelock, held while the user's files change

A version file is fully written and fsynced before ``HEAD`` moves to it, so a crash at
any point leaves the store loading the last committed version.

Example:
    >>> import numpy as np, tempfile
    >>> from bitfit.sdk.delta import Delta
    >>> store = DeltaStore(tempfile.mkdtemp())
    >>> store.save("alice", Delta({"b": np.ones(2)}, "sha256:00"))
    1
    >>> store.load("alice").tensors["b"].tolist(), store.users()
    ([1.0, 1.0], ['alice'])
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .atomic_files import TEMP_PREFIX, make_dir_durable, read_error, write_file_atomic
from .delta import Delta, encode_delta, load_delta, validate_key
from .errors import (
    DeltaCorruptError,
    DeltaNotFoundError,
    InvalidArgumentError,
    InvalidUserDataError,
    MissingDependencyError,
    StoreBusyError,
    StoreWriteError,
)

HEAD_NAME = "HEAD"
USER_FILE = "user.json"
LOCK_NAME = ".lock"
_DOOMED_PREFIX = ".deleted-"  # a user directory being removed by delete(user)
_VERSION_RE = re.compile(r"v(\d{6,})\.delta")
_PREFIX_CHARS = 40
_HASH_CHARS = 32
_USERDIR_RE = re.compile(rf"[A-Za-z0-9_-]{{1,{_PREFIX_CHARS}}}-[0-9a-f]{{{_HASH_CHARS}}}")


@dataclass(frozen=True)
class _State:
    current: int | None
    latest: int
    versions: list[int]  # committed versions whose file exists, ascending


class DeltaStore:
    """Per-user delta versions in a directory tree, safe across processes and crashes.

    Args:
        root: the store directory; None uses ``platformdirs.user_data_dir("bitfit")/deltas``.
            ``~`` is expanded. Created on the first save.
        retention: how many of the newest versions to keep per user (the current one is
            always kept as well).
        lock_timeout: seconds to wait for another process holding a user's lock.
        key: 16/24/32-byte AES key to encrypt every delta at rest (needs ``cryptography``).

    Example:
        >>> import numpy as np, tempfile
        >>> from bitfit.sdk.delta import Delta
        >>> store = DeltaStore(tempfile.mkdtemp(), retention=2)
        >>> [store.save("bob", Delta({"b": np.full(1, i)}, "sha256:00")) for i in range(3)]
        [1, 2, 3]
        >>> store.versions("bob"), store.rollback("bob"), store.current_version("bob")
        ([2, 3], 2, 2)
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        *,
        retention: int = 5,
        lock_timeout: float = 30.0,
        key: bytes | None = None,
    ) -> None:
        if root is None:
            import platformdirs

            root = Path(platformdirs.user_data_dir("bitfit")) / "deltas"
        if type(retention) is not int or retention < 1:
            raise InvalidArgumentError(f"retention must be an int >= 1, got {retention!r}")
        if isinstance(lock_timeout, bool) or not isinstance(lock_timeout, (int, float)) or not lock_timeout >= 0:
            raise InvalidArgumentError(f"lock_timeout must be a number of seconds >= 0, got {lock_timeout!r}")
        self.root = Path(os.path.abspath(Path(root).expanduser()))
        self.retention = retention
        self.lock_timeout = float(lock_timeout)
        self._key = None if key is None else validate_key(key)

    def __repr__(self) -> str:
        return f"DeltaStore({str(self.root)!r}, retention={self.retention}, encrypted={self._key is not None})"

    def uses_key(self, key: bytes | None) -> bool:
        """Whether this store encrypts with exactly ``key`` (None: whether it does not encrypt).

        Example:
            >>> DeltaStore("/tmp/s", key=bytes(32)).uses_key(bytes(32)), DeltaStore("/tmp/s").uses_key(bytes(32))
            (True, False)
        """
        return self._key == (None if key is None else validate_key(key))

    # ------------------------------------------------------------------ public API

    def path_for(self, user: str) -> Path:
        """The directory of ``user``'s deltas (it may not exist yet).

        The name is a readable, sanitized prefix of the id plus 32 hex digits of its
        sha256, so any id (``/``, ``..``, NUL, 10k characters) maps to one safe name
        inside the root and two ids never share a directory.

        Example:
            >>> DeltaStore("/tmp/s").path_for("../../etc/passwd").name
            '______etc_passwd-3754d6cb3a38e1185e5b382d5f3ef3f1'
        """
        _check_user(user)
        path = self.root / _dirname(user)
        # The name cannot escape by construction; a symlink planted in the root could.
        if path.is_symlink() or (path.exists() and path.resolve().parent != self.root.resolve()):
            raise DeltaCorruptError(f"{path} is not a plain directory inside the store root; refusing to follow it")
        return path

    def save(self, user: str, delta: Delta) -> int:
        """Store ``delta`` as a new version of ``user`` and make it current.

        Versions beyond ``retention`` are pruned, oldest first, never the current one.

        Returns:
            The new version number.

        Raises:
            StoreWriteError: disk full, read-only, ...; the previous current version is intact.
            StoreBusyError: another process held the user's lock longer than ``lock_timeout``.

        Example:
            >>> import numpy as np, tempfile
            >>> from bitfit.sdk.delta import Delta
            >>> DeltaStore(tempfile.mkdtemp()).save("carol", Delta({"b": np.zeros(1)}, "sha256:00"))
            1
        """
        if not isinstance(delta, Delta):
            raise InvalidArgumentError(f"save needs a Delta, got {type(delta).__name__}")
        directory = self.path_for(user)
        with self._locked(directory, create=True):
            self._ensure_user_file(directory, user)
            self._remove_leftovers(directory)
            state = self._state(directory)
            version = state.latest + 1
            path = directory / _version_name(version)
            write_file_atomic(path, encode_delta(delta, key=self._key, context=_context(directory, version)))
            try:
                self._write_head(directory, version, version)
            except StoreWriteError:
                with contextlib.suppress(OSError):
                    path.unlink()
                raise
            self._prune(directory, current=version, versions=[*state.versions, version])
        return version

    def load(self, user: str, version: int | None = None) -> Delta:
        """Load ``user``'s current delta, or a given version.

        Raises:
            DeltaNotFoundError: the user has no delta, or not that version.
            DeltaCorruptError: the file is damaged (or the key is wrong).

        Example:
            >>> import numpy as np, tempfile
            >>> from bitfit.sdk.delta import Delta
            >>> store = DeltaStore(tempfile.mkdtemp())
            >>> v = store.save("dan", Delta({"b": np.ones(1)}, "sha256:00", info={"steps": 9}))
            >>> store.load("dan").info
            {'steps': 9}
        """
        directory = self.path_for(user)
        if version is not None:
            _check_version(version)
            state = self._state(directory)
            if version not in state.versions:
                raise _no_version(user, version, state.versions)
            return self._load(directory, version)
        # Lock-free read: a concurrent save may prune the version HEAD named a moment
        # ago, so re-read HEAD when its file vanished.
        for _ in range(5):
            state = self._state(directory)
            if state.current is None:
                raise DeltaNotFoundError(f"user {_show(user)} has no delta yet: personalize first")
            try:
                return self._load(directory, state.current)
            except DeltaNotFoundError:
                continue
        raise StoreBusyError(f"the deltas of user {_show(user)} kept changing while loading; try again")

    def _load(self, directory: Path, version: int) -> Delta:
        path = directory / _version_name(version)
        # A file that exists but cannot be read is StoreReadError, not DeltaCorruptError: recovery
        # skips only damaged files, never one it could not read (an older version would come back).
        return load_delta(path, key=self._key, context=_context(directory, version))

    def current_version(self, user: str) -> int | None:
        """The current version of ``user``, or None if there is none.

        Example:
            >>> import tempfile
            >>> DeltaStore(tempfile.mkdtemp()).current_version("nobody") is None
            True
        """
        return self._state(self.path_for(user)).current

    def versions(self, user: str) -> list[int]:
        """The stored versions of ``user``, ascending (empty if none).

        Example:
            >>> import tempfile
            >>> DeltaStore(tempfile.mkdtemp()).versions("nobody")
            []
        """
        return list(self._state(self.path_for(user)).versions)

    def version_bytes(self, user: str, version: int) -> int:
        """The size on disk of ``user``'s delta ``version``, without reading it.

        Raises:
            DeltaNotFoundError: there is no such version.
            InvalidArgumentError: ``version`` is not an int >= 1.
            StoreReadError: the file cannot be stat'ed (permissions, I/O).

        Example:
            >>> import numpy as np, tempfile
            >>> from bitfit.sdk.delta import Delta
            >>> store = DeltaStore(tempfile.mkdtemp())
            >>> v = store.save("gil", Delta({"b": np.ones(3)}, "sha256:00", encoding="fp32"))
            >>> store.version_bytes("gil", v) > 0
            True
        """
        _check_version(version)
        path = self.path_for(user) / _version_name(version)
        try:
            return path.stat().st_size
        except FileNotFoundError:
            raise _no_version(user, version, self.versions(user)) from None
        except OSError as err:
            raise read_error(path, err) from err

    def users(self) -> list[str]:
        """The original ids of every user with a directory in the store, sorted.

        Raises:
            StoreReadError: the root or a user's ``user.json`` cannot be read (permissions, I/O);
                never an empty or partial list instead.

        Example:
            >>> import tempfile
            >>> DeltaStore(tempfile.mkdtemp()).users()
            []
        """
        found: list[str] = []
        entries = _list_dir(self.root)
        for entry in entries or []:  # None: no store yet
            # Only names a user id maps to: a foreign directory (lost+found, ...) is none of ours to read.
            if not _USERDIR_RE.fullmatch(entry.name) or not entry.is_dir(follow_symlinks=False):
                continue
            user = _read_user_file(Path(entry.path))
            if user is not None and _dirname(user) == entry.name:
                found.append(user)
        return sorted(found)

    def info(self, user: str) -> list[dict[str, Any]]:
        """One dict per version of ``user`` (for ``bitfit deltas list/show``).

        Keys: version, bytes, current, and (if the file decodes) created, encoding,
        base_fingerprint, info — or ``error`` with the reason it does not.

        Example:
            >>> import numpy as np, tempfile
            >>> from bitfit.sdk.delta import Delta
            >>> store = DeltaStore(tempfile.mkdtemp())
            >>> _ = store.save("eve", Delta({"b": np.ones(3)}, "sha256:00", encoding="fp32"))
            >>> row = store.info("eve")[0]
            >>> row["version"], row["current"], row["encoding"]
            (1, True, 'fp32')
        """
        directory = self.path_for(user)
        state = self._state(directory)
        rows: list[dict[str, Any]] = []
        for version in state.versions:
            path = directory / _version_name(version)
            row: dict[str, Any] = {"version": version, "current": version == state.current}
            try:
                row["bytes"] = path.stat().st_size
                delta = self._load(directory, version)
            except (OSError, DeltaNotFoundError, DeltaCorruptError) as err:
                row["error"] = str(err)
            else:
                row.update(
                    created=delta.created,
                    encoding=delta.encoding,
                    base_fingerprint=delta.base_fingerprint,
                    tensors=len(delta.tensors),
                    info=delta.info,
                )
            rows.append(row)
        return rows

    def rollback(self, user: str, version: int | None = None) -> int:
        """Make an earlier version current (None: the one before the current).

        The next save still gets a new number above every version ever written.

        Returns:
            The version that is now current.

        Raises:
            DeltaNotFoundError: no such version, or none before the current.
            DeltaCorruptError: the target version's file is damaged.

        Example:
            >>> import numpy as np, tempfile
            >>> from bitfit.sdk.delta import Delta
            >>> store = DeltaStore(tempfile.mkdtemp())
            >>> _ = [store.save("fay", Delta({"b": np.zeros(1)}, "sha256:00")) for _ in range(2)]
            >>> store.rollback("fay"), store.save("fay", Delta({"b": np.zeros(1)}, "sha256:00"))
            (1, 3)
        """
        directory = self.path_for(user)
        if version is not None:
            _check_version(version)
        with self._locked(directory, create=False, user=user):
            state = self._state(directory)
            if version is None:
                earlier = [v for v in state.versions if state.current is not None and v < state.current]
                if not earlier:
                    raise DeltaNotFoundError(
                        f"user {_show(user)} has no version before the current one ({state.current}) to roll back to"
                    )
                version = earlier[-1]
            elif version not in state.versions:
                raise _no_version(user, version, state.versions)
            self._load(directory, version)  # refuse a damaged target
            self._write_head(directory, version, state.latest)
        return version

    def delete(self, user: str, version: int | None = None) -> None:
        """Delete one version of ``user``, or (None) everything the store has about the user.

        Deleting the current version makes the previous one current (or, if none, the
        newest remaining one).

        Raises:
            DeltaNotFoundError: the user or the version does not exist.

        Example:
            >>> import numpy as np, tempfile
            >>> from bitfit.sdk.delta import Delta
            >>> store = DeltaStore(tempfile.mkdtemp())
            >>> _ = [store.save("gus", Delta({"b": np.zeros(1)}, "sha256:00")) for _ in range(2)]
            >>> store.delete("gus", 2); store.current_version("gus")
            1
            >>> store.delete("gus"); store.users()
            []
        """
        directory = self.path_for(user)
        if version is not None:
            _check_version(version)
        with self._locked(directory, create=False, user=user):
            if version is None:
                # Rename the directory away, then remove it. The rename is atomic: a crash leaves the
                # user as before or with no delta at all, and a writer waiting on .lock finds no lock
                # file at the path and starts again (removed in place, a waiter that re-opens the path
                # while it polls, as filelock does, would re-create .lock in the half-removed directory).
                self._state(directory)  # refuse (StoreReadError) a user whose files cannot be read
                doomed = self.root / f"{_DOOMED_PREFIX}{directory.name}-{os.urandom(4).hex()}"
                try:
                    os.rename(directory, doomed)
                except OSError as err:
                    raise StoreWriteError(f"could not delete {directory}: {err.strerror or err}; nothing was deleted") from err
                for leftover in [doomed, *self.root.glob(f"{_DOOMED_PREFIX}{directory.name}-*")]:
                    try:
                        shutil.rmtree(leftover)
                    except FileNotFoundError:
                        pass
                    except OSError as err:
                        raise StoreWriteError(
                            f"user {_show(user)} is deleted, but {leftover} could not be removed: {err.strerror or err}; "
                            "remove it by hand"
                        ) from err
                return
            state = self._state(directory)
            if version not in state.versions:
                raise _no_version(user, version, state.versions)
            if version == state.current:
                rest = [v for v in state.versions if v != version]
                earlier = [v for v in rest if v < version]
                current = earlier[-1] if earlier else (rest[-1] if rest else None)
                self._write_head(directory, current, state.latest)  # move HEAD first: a crash keeps a valid HEAD
            try:
                (directory / _version_name(version)).unlink()
            except OSError as err:
                raise StoreWriteError(f"could not delete version {version}: {err.strerror or err}") from err

    # ------------------------------------------------------------------ internals

    @contextlib.contextmanager
    def _locked(self, directory: Path, *, create: bool, user: str | None = None) -> Iterator[None]:
        """Hold ``directory``'s lock; a lock file deleted or replaced while waiting is retried.

        ``delete(user)`` removes the directory, ``.lock`` included, under the lock; a waiter
        then holds a lock on a file nobody else will open. filelock's public ``on_acquired``
        hands over the locked descriptor, whose identity (device, inode) is compared with the
        file now at the path: a mismatch or a vanished path means "start again".
        """
        import filelock
        from filelock import FileLock, Timeout

        lock_path = directory / LOCK_NAME
        for _ in range(5):
            if create:
                try:
                    make_dir_durable(directory)  # a new user's directory entry survives a power cut too
                except OSError as err:
                    raise StoreWriteError(
                        f"could not create {directory}: {err.strerror or err}; check that the store root is writable"
                    ) from err
            elif not directory.is_dir():
                raise DeltaNotFoundError(f"user {_show(user or '')} has no deltas in {self.root}")
            held: list[os.stat_result] = []
            try:
                lock = FileLock(str(lock_path), timeout=self.lock_timeout, on_acquired=lambda fd: held.append(os.fstat(fd)))
            except TypeError as err:  # on_acquired is filelock >= 3.30
                raise MissingDependencyError(
                    f"filelock {filelock.__version__} cannot report which file it locked (no on_acquired), so the "
                    "store cannot make sure a deleted user's lock is not shared: pip install 'filelock>=3.30'"
                ) from err
            try:
                lock.acquire()
            except Timeout as err:
                raise StoreBusyError(
                    f"another process has held {lock_path} for over {self.lock_timeout:g}s; "
                    "try again later or raise lock_timeout"
                ) from err
            except FileNotFoundError:
                continue  # the directory was deleted while we waited: start again
            except OSError as err:
                raise StoreWriteError(
                    f"could not lock {lock_path}: {err.strerror or err}; check the directory's permissions, and that "
                    "its filesystem supports file locks (flock; some network filesystems do not): use a local disk"
                ) from err
            try:
                if not held:  # the guard cannot work: refuse rather than run unguarded
                    raise StoreWriteError(
                        f"filelock {filelock.__version__} locked {lock_path} without calling on_acquired, so the store "
                        "cannot check that it holds the lock on the file at that path; nothing was changed: "
                        "install a filelock release whose on_acquired works (pip install -U filelock)"
                    )
                if _holds(held[-1], lock_path):
                    break
            except BaseException:
                lock.release()
                raise
            lock.release()  # the directory was deleted (and maybe re-created) while we waited
        else:
            raise StoreBusyError(f"{directory} kept being deleted and re-created; try again")
        try:
            yield
        finally:
            lock.release()

    def _state(self, directory: Path) -> _State:
        files = _version_files(directory)
        head = _read_head(directory)
        if head is not None and (head[0] is None or head[0] in files):
            current, latest = head
            return _State(current, latest, sorted(v for v in files if v <= latest))
        # HEAD missing, invalid or naming a lost file: the newest version that decodes is current.
        # (A HEAD or version file that exists but cannot be read raised StoreReadError instead:
        # guessing the current version then could undo a rollback.)
        latest = max([*files, head[1] if head else 0], default=0)
        current = None
        for version in sorted(files, reverse=True):
            try:
                self._load(directory, version)
            except (DeltaCorruptError, DeltaNotFoundError):
                continue
            current = version
            break
        return _State(current, latest, sorted(files))

    def _write_head(self, directory: Path, current: int | None, latest: int) -> None:
        write_file_atomic(directory / HEAD_NAME, json.dumps({"current": current, "latest": latest}).encode())

    def _ensure_user_file(self, directory: Path, user: str) -> None:
        """Write the user file if it is missing or names someone else. Called by ``save`` just
        before the version write, whose directory fsync makes this rename durable too; a crash
        before that leaves no committed version, and the next save writes the file again."""
        if _read_user_file(directory) != user:
            # ensure_ascii keeps lone surrogates (allowed in ids) representable in UTF-8.
            write_file_atomic(directory / USER_FILE, json.dumps({"user": user}, ensure_ascii=True).encode(),
                              sync_directory=False)

    def _remove_leftovers(self, directory: Path) -> None:
        """Remove temp files of writers that crashed, and version files HEAD never committed."""
        head = _read_head(directory)
        for entry in _list_dir(directory) or []:
            match = _VERSION_RE.fullmatch(entry.name)
            stray = entry.name.startswith(TEMP_PREFIX) or (head is not None and match and int(match[1]) > head[1])
            if stray:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)

    def _prune(self, directory: Path, *, current: int, versions: list[int]) -> None:
        keep = set(sorted(versions)[-self.retention :]) | {current}
        for version in versions:
            if version not in keep:
                # A failed prune costs disk space only; the save itself succeeded.
                with contextlib.suppress(OSError):
                    (directory / _version_name(version)).unlink()


def _check_user(user: Any) -> None:
    if not isinstance(user, str):
        raise InvalidArgumentError(f"user id must be a str, got {type(user).__name__}")
    if not user:
        raise InvalidArgumentError("user id must not be empty")


def _context(directory: Path, version: int) -> bytes:
    """What an encrypted version file is bound to: its user directory and version number.

    A valid encrypted file copied to another user, or over another version, then fails to
    authenticate (``DecryptionError``) instead of being served.
    """
    return f"{directory.name}/{_version_name(version)}".encode()


def _check_version(version: Any) -> None:
    if type(version) is not int or version < 1:
        raise InvalidArgumentError(f"version must be an int >= 1, got {version!r}")


def _no_version(user: str, version: int, versions: list[int]) -> DeltaNotFoundError:
    return DeltaNotFoundError(f"user {_show(user)} has no version {version} (has {versions or 'none'})")


def _show(user: str) -> str:
    return repr(user if len(user) <= 60 else user[:57] + "...")


def _dirname(user: str) -> str:
    digest = hashlib.sha256(user.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_CHARS]
    prefix = re.sub(r"[^A-Za-z0-9_-]", "_", user[:_PREFIX_CHARS])
    # A leading "-" reads as an option to shell tools; "." never occurs, so no hidden names.
    prefix = "_" + prefix[1:] if prefix.startswith("-") else prefix
    return f"{prefix}-{digest}"


def _version_name(version: int) -> str:
    return f"v{version:06d}.delta"


def _version_files(directory: Path) -> dict[int, Path]:
    files = {}
    for entry in _list_dir(directory) or []:  # None: the user has no directory
        match = _VERSION_RE.fullmatch(entry.name)
        if match and entry.is_file(follow_symlinks=False) and int(match[1]) >= 1:
            files[int(match[1])] = Path(entry.path)
    return files


def _read_if_present(path: Path) -> bytes | None:
    """The file's bytes, or None if it does not exist; any other failure is a StoreReadError."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise read_error(path, err) from err


def _read_head(directory: Path) -> tuple[int | None, int] | None:
    """HEAD's (current, latest); None if it is missing or invalid (then the store recovers).

    Any other failure to read it raises StoreReadError: recovering from a HEAD that is only
    unreadable (permissions, I/O) could make a rolled-back version current again.
    """
    raw = _read_if_present(directory / HEAD_NAME)
    if raw is None:
        return None
    try:
        head = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(head, dict):
        return None
    current, latest = head.get("current"), head.get("latest")
    if type(latest) is not int or latest < 0:
        return None
    if current is not None and (type(current) is not int or not 1 <= current <= latest):
        return None
    return current, latest


def _read_user_file(directory: Path) -> str | None:
    """The original user id in ``user.json``; None if the file is missing or invalid.

    Raises:
        StoreReadError: the file exists but cannot be read.
    """
    raw = _read_if_present(directory / USER_FILE)
    if raw is None:
        return None
    try:
        user = json.loads(raw).get("user")
    except (ValueError, AttributeError, RecursionError):
        return None
    return user if isinstance(user, str) and user else None


def _holds(held: os.stat_result, lock_path: Path) -> bool:
    """True if ``held`` (the locked descriptor's stat) is the file now at ``lock_path``, not one
    deleted or replaced while we waited."""
    try:
        on_disk = os.stat(lock_path)
    except FileNotFoundError:
        return False
    except OSError as err:
        raise read_error(lock_path, err) from err
    return os.path.samestat(held, on_disk)


def _list_dir(directory: Path) -> list[os.DirEntry] | None:
    """The entries of ``directory``; None if it does not exist.

    Raises:
        StoreReadError: it exists but cannot be listed (permissions, not a directory, I/O).
    """
    try:
        with os.scandir(directory) as entries:
            return list(entries)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise read_error(directory, err) from err
