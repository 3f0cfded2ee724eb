"""DeltaStore: versions, rollback, retention, hostile user ids, locks, write failures, crashes."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from bitfit.sdk.delta import Delta, encode_delta
from bitfit.sdk.errors import (
    DecryptionError,
    DeltaCorruptError,
    DeltaNotFoundError,
    InvalidArgumentError,
    InvalidUserDataError,
    MissingDependencyError,
    StoreBusyError,
    StoreReadError,
    StoreWriteError,
)
from bitfit.sdk.store import DeltaStore

FP = "sha256:" + "cd" * 32
KEY = bytes(range(32))


def delta(i: int = 0, encoding: str = "fp32") -> Delta:
    return Delta({"a.bias": np.full(3, float(i)), "b.bias": np.arange(4.0) + i}, FP, encoding, info={"i": i})


def marker(store: DeltaStore, user: str, version: int | None = None) -> int:
    return store.load(user, version).info["i"]


@pytest.fixture
def store(tmp_path) -> DeltaStore:
    return DeltaStore(tmp_path / "store")


# ------------------------------------------------------------------------------ versions


def test_save_load_versions(store):
    assert store.current_version("u") is None and store.versions("u") == [] and store.users() == []
    with pytest.raises(DeltaNotFoundError, match="personalize first"):
        store.load("u")
    assert [store.save("u", delta(i)) for i in range(3)] == [1, 2, 3]
    assert store.current_version("u") == 3 and store.versions("u") == [1, 2, 3]
    assert marker(store, "u") == 2 and marker(store, "u", 1) == 0
    with pytest.raises(DeltaNotFoundError, match="no version 9"):
        store.load("u", 9)
    with pytest.raises(InvalidArgumentError):
        store.load("u", 0)
    names = sorted(p.name for p in store.path_for("u").iterdir())
    assert names == [".lock", "HEAD", "user.json", "v000001.delta", "v000002.delta", "v000003.delta"]
    assert json.loads((store.path_for("u") / "HEAD").read_text()) == {"current": 3, "latest": 3}


def test_version_bytes_is_the_file_size_without_reading_it(store):
    assert [store.save("u", delta(i, enc)) for i, enc in enumerate(("fp32", "fp16"))] == [1, 2]
    for version in (1, 2):
        assert store.version_bytes("u", version) == (store.path_for("u") / f"v{version:06d}.delta").stat().st_size
        assert store.version_bytes("u", version) == store.info("u")[version - 1]["bytes"]
    assert store.version_bytes("u", 2) < store.version_bytes("u", 1)  # fp16 halves the payload
    with pytest.raises(DeltaNotFoundError, match=r"no version 3 \(has \[1, 2\]\)"):
        store.version_bytes("u", 3)
    with pytest.raises(InvalidArgumentError):
        store.version_bytes("u", 0)


def test_retention_prunes_oldest_but_never_current(tmp_path):
    store = DeltaStore(tmp_path, retention=2)
    for i in range(4):
        store.save("u", delta(i))
    assert store.versions("u") == [3, 4]
    store.rollback("u", 3)
    store.save("u", delta(9))  # v5: keeps the newest two (4, 5)
    assert store.versions("u") == [4, 5]
    store = DeltaStore(tmp_path, retention=1)
    store.save("w", delta(0))
    store.save("w", delta(1))
    with pytest.raises(DeltaNotFoundError, match="no version before"):
        store.rollback("w")
    with pytest.raises(InvalidArgumentError):
        DeltaStore(tmp_path, retention=0)
    with pytest.raises(InvalidArgumentError):
        DeltaStore(tmp_path, lock_timeout=-1)


def test_rollback_and_monotonic_numbers(store):
    for i in range(3):
        store.save("u", delta(i))
    assert store.rollback("u") == 2 and marker(store, "u") == 1
    assert store.rollback("u") == 1 and marker(store, "u") == 0
    with pytest.raises(DeltaNotFoundError, match="no version before"):
        store.rollback("u")
    assert store.rollback("u", 3) == 3
    store.rollback("u", 1)
    assert store.save("u", delta(7)) == 4  # never reuses 2 or 3
    assert store.versions("u") == [1, 2, 3, 4] and marker(store, "u") == 7
    with pytest.raises(DeltaNotFoundError):
        store.rollback("u", 99)
    with pytest.raises(DeltaNotFoundError):
        store.rollback("nobody")


def test_delete_version_and_user(store):
    for i in range(3):
        store.save("u", delta(i))
    store.save("other", delta(5))
    store.delete("u", 3)  # the current one: the previous becomes current
    assert store.current_version("u") == 2 and store.versions("u") == [1, 2]
    store.delete("u", 1)
    assert store.current_version("u") == 2
    store.rollback("u", 2)
    assert store.save("u", delta(4)) == 4  # still above the deleted 3
    store.rollback("u")
    store.delete("u", 2)  # current, nothing earlier: the newest remaining
    assert store.current_version("u") == 4
    store.delete("u", 4)
    assert store.current_version("u") is None and store.versions("u") == []
    assert store.save("u", delta(0)) == 5
    with pytest.raises(DeltaNotFoundError):
        store.delete("u", 1)
    store.delete("u")
    assert not store.path_for("u").exists() and store.users() == ["other"]
    assert store.save("u", delta(0)) == 1  # a deleted user starts over
    with pytest.raises(DeltaNotFoundError):
        store.delete("nobody")
    assert marker(store, "other") == 5


def test_info_rows(store):
    store.save("u", delta(0, "int8"))
    store.save("u", delta(1, "fp16"))
    (store.path_for("u") / "v000001.delta").write_bytes(b"broken")
    rows = store.info("u")
    assert [r["version"] for r in rows] == [1, 2] and [r["current"] for r in rows] == [False, True]
    assert "error" in rows[0] and rows[0]["bytes"] == 6
    assert rows[1]["encoding"] == "fp16" and rows[1]["info"] == {"i": 1} and rows[1]["bytes"] > 0
    assert rows[1]["base_fingerprint"] == FP and rows[1]["created"]


def test_default_root_and_home_expansion(tmp_path, monkeypatch):
    import platformdirs

    monkeypatch.setattr(platformdirs, "user_data_dir", lambda name: str(tmp_path / "data" / name))
    assert DeltaStore().root == tmp_path / "data" / "bitfit" / "deltas"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert DeltaStore("~/s").root == tmp_path / "s"


# ------------------------------------------------------------------------------ user ids

HOSTILE = [
    "alice",
    "Alice",
    "ALICE",
    "a/b",
    "a_b",
    "a\\b",
    "a:b",
    "..",
    ".",
    "../..",
    "../../etc/passwd",
    "/etc/passwd",
    "C:\\Windows",
    "nul\x00byte",
    "\x00",
    "x" * 10_000,
    "x" * 10_001,
    "ünïcødé 用户 🚀",
    "\ud800lone surrogate",
    "-rf",
    "~",
    ".hidden",
    "CON",
    " ",
    "\n",
]


def test_hostile_user_ids_stay_inside_root_and_never_collide(tmp_path):
    store = DeltaStore(tmp_path / "store")
    dirs = {}
    for i, user in enumerate(HOSTILE):
        path = store.path_for(user)
        assert path.parent == store.root
        assert len(path.name) <= 80 and not path.name.startswith((".", "-"))
        assert all(c.isalnum() or c in "_-" for c in path.name) and path.name.isascii()
        dirs[user] = path.name.lower()  # distinct even on a case-insensitive filesystem
        assert store.save(user, delta(i)) == 1
    assert len(set(dirs.values())) == len(HOSTILE)
    assert sorted(os.listdir(tmp_path)) == ["store"]  # nothing escaped
    for i, user in enumerate(HOSTILE):
        assert marker(store, user) == i
    assert store.users() == sorted(HOSTILE)


@pytest.mark.parametrize("user", ["", None, 5, b"alice", ["a"]])
def test_invalid_user_ids_are_refused(store, user):
    with pytest.raises(InvalidArgumentError):
        store.save(user, delta())
    with pytest.raises(InvalidArgumentError):
        store.load(user)


def test_planted_symlink_is_not_followed(tmp_path):
    store = DeltaStore(tmp_path / "store")
    store.save("x", delta())
    outside = tmp_path / "outside"
    outside.mkdir()
    store.root.joinpath(store.path_for("victim").name).symlink_to(outside, target_is_directory=True)
    with pytest.raises(DeltaCorruptError, match="refusing"):
        store.save("victim", delta())
    assert list(outside.iterdir()) == []


def test_users_ignores_foreign_directories(store):
    store.save("real", delta())
    (store.root / "junk").mkdir()
    (store.root / "fake-0123").mkdir()
    (store.root / "fake-0123" / "user.json").write_text('{"user": "someone"}')
    assert store.users() == ["real"]


# ------------------------------------------------------------------------------ locking

HOLD_LOCK = textwrap.dedent(
    """
    import sys, time
    from filelock import FileLock
    lock = FileLock(sys.argv[1])
    lock.acquire()
    print("locked", flush=True)
    sys.stdin.readline()
    """
)


def test_lock_held_by_another_process_raises_store_busy(tmp_path):
    store = DeltaStore(tmp_path, lock_timeout=0.3)
    store.save("u", delta(0))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(store.path_for("u") / ".lock")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        with pytest.raises(StoreBusyError, match="lock_timeout"):
            store.save("u", delta(1))
        assert time.monotonic() - started >= 0.25
        with pytest.raises(StoreBusyError):
            store.rollback("u", 1)
        assert marker(store, "u") == 0  # reads do not wait for the lock
        assert store.save("other", delta(2)) == 1  # other users are not blocked
    finally:
        holder.communicate("\n", timeout=10)
    assert store.save("u", delta(1)) == 2


def _hold_lock_in_a_subprocess(lock_path: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(lock_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def _in_a_thread(call) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def work() -> None:
        try:
            out["value"] = call()
        except Exception as err:  # noqa: BLE001 - handed to the test
            out["error"] = err

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread, out


def test_writer_waiting_while_the_user_is_deleted_starts_again(tmp_path, monkeypatch):
    store = DeltaStore(tmp_path, lock_timeout=10)
    for i in range(2):
        store.save("u", delta(i))
    removing, real_rename = threading.Event(), os.rename

    def slow_rename(src, dst, *args, **kwargs):
        removing.set()
        time.sleep(0.5)  # delete() holds the lock; the writers below wait on it
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", slow_rename)
    deleter, deleted = _in_a_thread(lambda: store.delete("u"))
    assert removing.wait(10)
    saver, saved = _in_a_thread(lambda: store.save("u", delta(7)))
    roller, rolled = _in_a_thread(lambda: store.rollback("u", 1))
    time.sleep(0.2)
    assert saver.is_alive() and roller.is_alive()  # waiting on the lock of the directory being deleted
    for thread in (deleter, saver, roller):
        thread.join(20)
    assert deleted == {"value": None}, deleted
    # The saver started again on a fresh directory (a deleted user starts over at 1); the rollback
    # found no user, or that fresh version 1: never an error about the lock file.
    assert saved == {"value": 1}, saved
    assert rolled.get("value") == 1 or isinstance(rolled.get("error"), DeltaNotFoundError), rolled
    assert store.versions("u") == [1] and marker(store, "u") == 7
    assert sorted(p.name for p in store.root.iterdir()) == [store.path_for("u").name]


def test_lock_on_a_file_no_longer_at_the_path_is_not_trusted(store, monkeypatch):
    """The guard: a lock whose descriptor is not the file now at ``.lock`` is released and retaken."""
    import filelock

    store.save("u", delta(1))
    directory = store.path_for("u")
    (directory / "stale.lock").write_bytes(b"")
    stale = os.open(directory / "stale.lock", os.O_RDONLY)
    real, calls = filelock.FileLock, []

    def stale_lock(times: int):
        class Stale(real):  # hands over a descriptor of another file, the first `times` acquires
            def __init__(self, *args, on_acquired, **kwargs):
                def report(fd):
                    calls.append(fd)
                    on_acquired(stale if len(calls) <= times else fd)

                super().__init__(*args, on_acquired=report, **kwargs)

        return Stale

    try:
        monkeypatch.setattr(filelock, "FileLock", stale_lock(2))
        assert store.save("u", delta(2)) == 2 and len(calls) == 3  # two retries, then the real one
        calls.clear()
        monkeypatch.setattr(filelock, "FileLock", stale_lock(99))
        with pytest.raises(StoreBusyError, match="kept being deleted"):
            store.save("u", delta(3))
        assert len(calls) == 5
    finally:
        os.close(stale)
    monkeypatch.undo()
    assert store.versions("u") == [1, 2] and marker(store, "u") == 2
    assert store.save("u", delta(4)) == 3  # every refused lock was released


def test_lock_guard_that_cannot_work_fails_loudly(store, monkeypatch):
    import filelock

    store.save("u", delta(1))
    real = filelock.FileLock

    class Old(real):  # a filelock from before on_acquired (3.30)
        def __init__(self, *args, on_acquired=None, **kwargs):
            if on_acquired is not None:
                raise TypeError("__init__() got an unexpected keyword argument 'on_acquired'")
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(filelock, "FileLock", Old)
    with pytest.raises(MissingDependencyError, match=r"pip install 'filelock>=3\.30'"):
        store.save("u", delta(2))

    class Silent(real):  # accepts on_acquired but never calls it
        def __init__(self, *args, on_acquired=None, **kwargs):
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(filelock, "FileLock", Silent)
    with pytest.raises(StoreWriteError, match="without calling on_acquired"):
        store.rollback("u", 1)
    monkeypatch.undo()
    assert store.versions("u") == [1] and marker(store, "u") == 1
    assert store.save("u", delta(3)) == 2  # the refused lock was released


def test_concurrent_saves_get_distinct_versions(tmp_path):
    store = DeltaStore(tmp_path, retention=100)
    got: list[int] = []

    def work(k: int) -> None:
        for i in range(5):
            got.append(store.save("u", delta(k * 10 + i)))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(1, 21))
    assert store.versions("u") == list(range(1, 21)) and store.current_version("u") == 20


# ------------------------------------------------------------------------------ write failures


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_keeps_the_previous_version(store, monkeypatch):
    store.save("u", delta(1))
    monkeypatch.setattr(os, "replace", _no_space)
    with pytest.raises(StoreWriteError, match="disk is full"):
        store.save("u", delta(2))
    monkeypatch.undo()
    assert marker(store, "u") == 1 and store.versions("u") == [1]
    assert not [p for p in store.path_for("u").iterdir() if p.name.startswith(".tmp-")]
    assert store.save("u", delta(3)) == 2


def test_failed_head_write_leaves_no_orphan_version(store, monkeypatch):
    store.save("u", delta(1))
    real_replace = os.replace

    def fail_on_head(src, dst, *args, **kwargs):
        if Path(dst).name == "HEAD":
            _no_space()
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", fail_on_head)
    with pytest.raises(StoreWriteError):
        store.save("u", delta(2))
    monkeypatch.undo()
    assert marker(store, "u") == 1 and store.versions("u") == [1]
    assert sorted(p.name for p in store.path_for("u").glob("v*")) == ["v000001.delta"]


def test_read_only_directory_raises_store_write_error(store):
    store.save("u", delta(1))
    directory = store.path_for("u")
    directory.chmod(0o500)
    try:
        if os.access(directory, os.W_OK):
            pytest.skip("running as root: chmod does not stop writes")
        with pytest.raises(StoreWriteError, match="read-only or not writable"):
            store.save("u", delta(2))
        assert marker(store, "u") == 1
    finally:
        directory.chmod(0o700)


def test_permission_denied_raises_store_write_error(store, monkeypatch):
    # The same path as a read-only directory, reachable even when the tests run as root.
    import tempfile

    store.save("u", delta(1))

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(StoreWriteError, match="read-only or not writable"):
        store.save("u", delta(2))
    monkeypatch.undo()
    assert marker(store, "u") == 1 and store.versions("u") == [1]


def test_unwritable_root_raises_store_write_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreWriteError):
        DeltaStore(blocker / "store").save("u", delta())


# ------------------------------------------------------------------------------ read failures
# Running as root, chmod does not stop reads: the reads are made to fail with PermissionError.


def _deny(monkeypatch, names: set[str]) -> None:
    """Path.read_bytes of files with these names raises PermissionError."""
    real = Path.read_bytes

    def read_bytes(self):
        if self.name in names:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)


def _deny_listing(monkeypatch, directory: Path) -> None:
    real = os.scandir

    def scandir(path="."):
        if Path(path) == directory:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


def _rolled_back(store: DeltaStore) -> tuple[Path, bytes]:
    for i in range(3):
        store.save("u", delta(i))
    store.rollback("u", 1)
    head = store.path_for("u") / "HEAD"
    return head, head.read_bytes()


def test_unreadable_head_is_an_error_never_a_recovery(store, monkeypatch):
    head, before = _rolled_back(store)  # HEAD: current 1, latest 3; recovery would pick 3
    _deny(monkeypatch, {"HEAD"})
    for call in (lambda: store.load("u"), lambda: store.current_version("u"), lambda: store.versions("u"),
                 lambda: store.info("u"), lambda: store.save("u", delta(9)), lambda: store.rollback("u"),
                 lambda: store.delete("u", 2), lambda: store.delete("u")):
        with pytest.raises(StoreReadError, match=r"could not read .*HEAD: Permission denied; check") as raised:
            call()
        assert raised.value.errno == errno.EACCES
    monkeypatch.undo()
    assert head.read_bytes() == before  # HEAD not rewritten
    assert store.versions("u") == [1, 2, 3] and store.current_version("u") == 1 and marker(store, "u") == 0
    assert not list(store.path_for("u").glob(".tmp-*")) and not (store.path_for("u") / "v000004.delta").exists()


def test_unreadable_user_file_is_an_error(store, monkeypatch):
    store.save("u", delta(1))
    store.save("w", delta(2))
    user_file = store.path_for("u") / "user.json"
    _deny(monkeypatch, {"user.json"})
    with pytest.raises(StoreReadError, match=r"user\.json: Permission denied"):
        store.users()  # not [] nor a list missing users
    with pytest.raises(StoreReadError, match=r"user\.json"):
        store.save("u", delta(3))
    monkeypatch.undo()
    assert json.loads(user_file.read_text()) == {"user": "u"}
    assert store.users() == ["u", "w"] and store.versions("u") == [1] and marker(store, "u") == 1


def test_unlistable_directories_are_errors(store, monkeypatch):
    head, before = _rolled_back(store)
    _deny_listing(monkeypatch, store.root)
    with pytest.raises(StoreReadError, match="Permission denied"):
        store.users()
    monkeypatch.undo()
    _deny_listing(monkeypatch, store.path_for("u"))
    for call in (lambda: store.versions("u"), lambda: store.load("u"), lambda: store.save("u", delta(9)),
                 lambda: store.rollback("u", 2)):
        with pytest.raises(StoreReadError, match=f"could not read {store.path_for('u')}: Permission denied"):
            call()
    monkeypatch.undo()
    assert head.read_bytes() == before and store.versions("u") == [1, 2, 3] and marker(store, "u") == 0
    assert DeltaStore(store.root / "none-yet").users() == []  # a store not created yet is empty, not an error


def test_unreadable_version_file_is_not_skipped_as_damaged(store, monkeypatch):
    import bitfit.sdk.delta as delta_module

    for i in range(3):
        store.save("u", delta(i))
    directory = store.path_for("u")
    (directory / "HEAD").unlink()  # recovery must pick the newest version, v3
    real_open = open

    def deny_v3(path, *args, **kwargs):
        if Path(path).name == "v000003.delta":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(delta_module, "open", deny_v3, raising=False)
    with pytest.raises(StoreReadError, match="v000003.delta: Permission denied"):
        store.current_version("u")  # not "2": an unreadable file is not a damaged one
    with pytest.raises(StoreReadError):
        store.save("u", delta(9))
    monkeypatch.undo()
    assert not (directory / "HEAD").exists() and store.versions("u") == [1, 2, 3]
    assert store.current_version("u") == 3 and marker(store, "u") == 2


# ------------------------------------------------------------------------------ crash recovery


def test_stray_temp_files_are_ignored_and_cleaned(store):
    store.save("u", delta(1))
    directory = store.path_for("u")
    (directory / ".tmp-abc.part").write_bytes(b"half a delta")
    (directory / ".tmp-HEAD.part").write_bytes(b"{")
    assert store.versions("u") == [1] and marker(store, "u") == 1
    store.save("u", delta(2))
    assert not list(directory.glob(".tmp-*"))


def test_uncommitted_version_file_is_ignored_and_replaced(store):
    store.save("u", delta(1))
    directory = store.path_for("u")
    # a crash after the version file was renamed in but before HEAD moved
    (directory / "v000002.delta").write_bytes(encode_delta(delta(2)))
    assert store.current_version("u") == 1 and store.versions("u") == [1]
    assert store.save("u", delta(3)) == 2 and marker(store, "u") == 3


@pytest.mark.parametrize("head", [None, b"", b"garbage", b'{"current": 7, "latest": 9}', b'{"current": 2, "latest": 1}', b"[]"])
def test_missing_or_corrupt_head_recovers_the_newest_valid_version(store, head):
    for i in range(3):
        store.save("u", delta(i))
    directory = store.path_for("u")
    (directory / "v000003.delta").write_bytes(b"torn")  # newest is damaged too
    if head is None:
        (directory / "HEAD").unlink()
    else:
        (directory / "HEAD").write_bytes(head)
    assert store.current_version("u") == 2 and marker(store, "u") == 1
    new = store.save("u", delta(5))
    assert new >= 4 and marker(store, "u") == 5
    assert json.loads((directory / "HEAD").read_text())["current"] == new


def test_damaged_current_version_raises_corrupt_and_rollback_fixes_it(store):
    store.save("u", delta(1))
    store.save("u", delta(2))
    (store.path_for("u") / "v000002.delta").write_bytes(b"\x00" * 100)
    with pytest.raises(DeltaCorruptError, match="v000002.delta"):
        store.load("u")
    assert store.rollback("u") == 1 and marker(store, "u") == 1
    with pytest.raises(DeltaCorruptError):
        store.rollback("u", 2)  # refuses a damaged target


def _save_forever(root: str, first: int, conn) -> None:
    """Child process: save version after version, reporting each one once it has returned."""
    store = DeltaStore(root, retention=2)
    conn.send("ready")
    i = first
    while True:
        i += 1
        v = store.save("u", Delta({"t": np.full(2000, float(i))}, "sha256:00", "fp32", info={"i": i}))
        conn.send((v, i))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_sigkill_at_any_point_leaves_the_last_committed_version(tmp_path):
    import multiprocessing

    # fork, not spawn: a fresh interpreter would re-import bitfit.sdk (slow) for every kill.
    context = multiprocessing.get_context("fork")
    store = DeltaStore(tmp_path, retention=2)
    store.save("u", Delta({"t": np.zeros(2000)}, "sha256:00", "fp32", info={"i": 0}))
    rng = np.random.default_rng(0)
    last_i, kills_after_a_save = 0, 0
    for _ in range(6):
        parent, child = context.Pipe(duplex=False)
        proc = context.Process(target=_save_forever, args=(str(tmp_path), last_i, child), daemon=True)
        proc.start()
        child.close()
        assert parent.recv() == "ready"
        time.sleep(float(rng.uniform(0.02, 0.15)))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        committed = []
        while parent.poll():
            try:
                committed.append(parent.recv())
            except EOFError:
                break
        loaded = store.load("u")
        i = loaded.info["i"]
        assert np.all(loaded.tensors["t"] == i)
        if committed:
            kills_after_a_save += 1
            # the last reported save is committed; at most one more may have committed unreported
            assert i in (committed[-1][1], committed[-1][1] + 1)
        assert store.current_version("u") == max(store.versions("u"))
        last_i = i + 1
    assert kills_after_a_save >= 3  # the kills really landed mid-loop


# ------------------------------------------------------------------------------ encryption


def test_encrypted_store(tmp_path):
    store = DeltaStore(tmp_path, key=KEY)
    store.save("u", delta(1))
    raw = (store.path_for("u") / "v000001.delta").read_bytes()
    assert raw.startswith(b"BFDELTA-AESGCM1\n")
    assert marker(store, "u") == 1
    with pytest.raises(DeltaCorruptError, match="pass the key"):
        DeltaStore(tmp_path).load("u")
    with pytest.raises(DecryptionError):
        DeltaStore(tmp_path, key=bytes(32)).load("u")
    # an attacker swapping in a plain file is refused
    (store.path_for("u") / "v000001.delta").write_bytes(encode_delta(delta(6)))
    with pytest.raises(DecryptionError, match="not encrypted"):
        store.load("u")
    with pytest.raises(InvalidArgumentError):
        DeltaStore(tmp_path, key=b"short")


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir() or os.name != "posix", reason="reads fsync'd paths from /proc/self/fd")
def test_a_new_users_save_is_durable_in_order(tmp_path, monkeypatch):
    """Every name a save creates is made durable before anything relies on it: the new store
    root and user directory in their parents, each file's data before its rename, the version's
    rename (and the user file's, in the same directory fsync) before HEAD names it, and HEAD's
    rename before save returns. Six fsyncs for a new user, two for the next version."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace, real_mkdir = os.fsync, os.replace, os.mkdir

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, *args, **kwargs):
        events.append(("replace", str(dst)))
        return real_replace(src, dst, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        result = real_mkdir(path, *args, **kwargs)
        events.append(("mkdir", str(path)))
        return result

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "mkdir", mkdir)
    root = (tmp_path / "store").resolve()
    store = DeltaStore(root)
    store.save("ann", delta(1))
    user_dir = str(store.path_for("ann").resolve())

    def at(kind: str, path: str) -> int:
        return events.index((kind, path))

    def synced_after(path: str, start: int) -> int:
        return next(i for i, e in enumerate(events) if i > start and e == ("fsync", path))

    # The root and the user directory: each entry synced in its parent once created.
    assert synced_after(str(tmp_path.resolve()), at("mkdir", str(root))) < at("mkdir", user_dir)
    assert synced_after(str(root), at("mkdir", user_dir)) < at("replace", f"{user_dir}/v000001.delta")
    # Data before each rename; the version's rename durable before HEAD's; HEAD's before return.
    for name in ("user.json", "v000001.delta", "HEAD"):
        renamed = at("replace", f"{user_dir}/{name}")
        assert any(kind == "fsync" and path.startswith(f"{user_dir}/.tmp-") for kind, path in events[renamed - 1:renamed]), name
    assert at("replace", f"{user_dir}/user.json") < at("replace", f"{user_dir}/v000001.delta")
    assert synced_after(user_dir, at("replace", f"{user_dir}/v000001.delta")) < at("replace", f"{user_dir}/HEAD")
    assert synced_after(user_dir, at("replace", f"{user_dir}/HEAD")) < len(events)
    fsyncs = [e for e in events if e[0] == "fsync"]
    assert len([e for e in fsyncs if e[1] != str(tmp_path.resolve())]) == 6, fsyncs
    events.clear()
    store.save("ann", delta(2))  # an existing user: the version and HEAD, each file and the directory
    assert len([e for e in events if e[0] == "fsync"]) == 4, events
