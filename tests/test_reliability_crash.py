"""Crash safety: child processes that save or personalize are killed with SIGKILL at random
points; after every kill the store loads the last committed version of every user, nothing
is corrupt, and crash debris (``.tmp-`` files, uncommitted versions) is invisible and cleaned
by the next save.

Each child is cheap on purpose: ``save-loop`` children import only the store and the delta
format and save in a tight loop (the kill lands inside a save: writing, fsync, rename,
HEAD, pruning); ``personalize`` children run the real ``Personalizer.personalize`` (the kill
lands in training or in the save). Counts: 50 + 12 kills normally, 300 + 40 with
``BITFIT_STRESS=1``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import reliability_fixtures as rf
from bitfit.sdk.store import DeltaStore

FIXTURES = Path(rf.__file__)
SAVE_KILLS = 300 if rf.stress() else 50
PERSONALIZE_KILLS = 40 if rf.stress() else 12
USERS = ["alice", "../../etc/passwd", "bob/../../x", "ünïcødé 用户", "x" * 300]

text_bundle = rf.session_bundle("text")


@dataclass
class Kills:
    """What the kills did, for the assertions and the summary line."""

    count: int = 0
    saves_seen: int = 0
    debris_seen: int = 0          # .tmp- files found right after a kill
    uncommitted_seen: int = 0     # version files above HEAD.latest found right after a kill
    ahead: int = 0                # kills that landed after a commit but before the child said so


def _start(*args: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, str(FIXTURES), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise AssertionError(f"child did not start: {line!r} {proc.stderr.read()[-2000:]}")
    return proc


def _kill(proc: subprocess.Popen, delay: float) -> list[str]:
    """SIGKILL after ``delay`` seconds; the lines the child printed before dying."""
    time.sleep(delay)
    if proc.poll() is not None:
        raise AssertionError(f"child exited on its own ({proc.returncode}): {proc.stderr.read()[-2000:]}")
    os.kill(proc.pid, signal.SIGKILL)
    # Not communicate(): it reads the pipe's file descriptor directly and would miss lines that
    # readline() of "ready" already pulled into the text wrapper's buffer.
    out, err = proc.stdout.read(), proc.stderr.read()
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert "Traceback" not in err, err[-2000:]
    return out.splitlines()


def _debris(store: DeltaStore, user: str) -> tuple[int, int]:
    """(.tmp- files, version files above HEAD.latest) in the user's directory."""
    directory = store.path_for(user)
    if not directory.is_dir():
        return 0, 0
    names = os.listdir(directory)
    try:
        latest = json.loads((directory / "HEAD").read_text())["latest"]
    except (OSError, ValueError, KeyError):
        latest = None
    tmp = sum(n.startswith(".tmp-") for n in names)
    above = sum(1 for n in names if n.startswith("v") and n.endswith(".delta") and latest is not None
                and int(n[1:-6]) > latest)
    return tmp, above


def _check_store(store: DeltaStore, user: str, committed_version: int) -> int:
    """The invariants after a kill; returns the current version."""
    current = store.current_version(user)
    versions = store.versions(user)
    # The kill may land after HEAD moved but before the child printed: at most one ahead.
    if committed_version == 0:
        assert current in (None, 1), (user, current)
    else:
        assert current in (committed_version, committed_version + 1), (user, current, committed_version)
    assert user in store.users() or current is None  # debris never shows up as a user or a version
    for row in store.info(user):
        assert "error" not in row, (user, row)  # every listed version decodes: nothing corrupt
    assert versions == sorted(set(versions)) and (current is None or current == versions[-1])
    return current or 0


def test_sigkill_during_save_loses_no_committed_delta(tmp_path):
    root = tmp_path / "store"
    rng = random.Random(1234)
    committed: dict[int, tuple[int, int]] = {}  # user index -> (i, version) the child reported
    stats = Kills()
    started = time.monotonic()
    for kill in range(SAVE_KILLS):
        proc = _start("save-loop", str(root), json.dumps(USERS), str(kill + 1))
        lines = _kill(proc, rng.uniform(0.0, 0.25))
        for line in lines:
            kind, u, i, version = line.split()
            assert kind == "saved"
            u, i, version = int(u), int(i), int(version)
            assert version > committed.get(u, (0, 0))[1], "versions must grow across processes"
            committed[u] = (i, version)
            stats.saves_seen += 1
        stats.count += 1

        store = DeltaStore(root)
        for u, user in enumerate(USERS):
            tmp, above = _debris(store, user)
            stats.debris_seen += tmp
            stats.uncommitted_seen += above
            i, version = committed.get(u, (0, 0))
            current = _check_store(store, user, version)
            if current == 0:
                continue
            delta = store.load(user)
            stats.ahead += current > version
            if current == version:
                assert delta.info["i"] == i, (user, delta.info, i)  # exactly the committed content
            else:
                assert delta.info["i"] > i
            # The content matches the version's own record (no torn or mixed file).
            np.testing.assert_array_equal(delta.tensors["a.bias"], np.full(64, float(delta.info["i"] % 60000)))
            np.testing.assert_array_equal(delta.tensors["b.bias"], np.full(16, float(u)))
            if current > version:
                committed[u] = (delta.info["i"], current)  # the next child continues from it

    # The next save cleans every leftover of the crashes (and prunes what a kill cut short).
    store = DeltaStore(root, retention=3)
    from bitfit.sdk.delta import Delta

    for user in USERS:
        store.save(user, Delta({"a.bias": np.zeros(64), "b.bias": np.zeros(16)}, "sha256:" + "ab" * 32, "fp32"))
        assert _debris(store, user) == (0, 0), user
        assert len(store.versions(user)) <= 3
    assert sorted(store.users()) == sorted(USERS)
    assert not [p for p in root.iterdir() if p.name.startswith(".")]
    seconds = time.monotonic() - started
    print(f"\nsave kills: {stats.count}, saves seen {stats.saves_seen}, .tmp files left by kills {stats.debris_seen}, "
          f"uncommitted versions left {stats.uncommitted_seen}, committed-but-unreported {stats.ahead}, {seconds:.1f}s")
    assert stats.count >= 50
    assert stats.saves_seen > stats.count  # the kills landed while saves were happening


def test_sigkill_during_personalize_keeps_the_last_committed_delta(text_bundle, tmp_path):
    from bitfit.sdk.personalizer import Personalizer

    root = tmp_path / "store"
    user = "crash/../user"
    rng = random.Random(99)
    committed = 0
    kills = 0
    debris_seen = 0
    started = time.monotonic()
    for kill in range(PERSONALIZE_KILLS):
        proc = _start("personalize", str(text_bundle), str(root), user, str(kill), "0")
        lines = _kill(proc, rng.uniform(0.0, 1.2))
        for line in lines:
            kind, version = line.split()
            assert kind == "saved" and int(version) > committed
            committed = int(version)
        kills += 1
        store = DeltaStore(root)
        current = _check_store(store, user, committed)
        # Each save first removes what earlier kills left, so debris never piles up: at most the
        # temp files of this child's writes in flight (user.json and the version or HEAD) and one
        # version file HEAD never committed.
        tmp, above = _debris(store, user)
        assert tmp <= 2 and above <= 1, (tmp, above)
        debris_seen += tmp + above
        committed = max(committed, current)
        if current:
            # The committed delta belongs to the bundle and serves predictions.
            p = Personalizer(text_bundle, store, verify="none")
            assert p.current_delta(user) is not None
            prediction = p.predict(["good flight", "awful seat"], user=user)
            assert prediction.fallbacks == {}
            assert np.all(np.isfinite(prediction.logits))
    assert committed >= 1, "no child lived long enough to commit a version; raise the kill delays"
    # One personalize that runs to the end cleans every leftover of the kills and commits the next version.
    result = Personalizer(text_bundle, DeltaStore(root), verify="none").personalize(
        rf.text_data(12), user=user, epochs=1, batch_size=4, progress_bar=False)
    assert result.version > committed
    assert _debris(store, user) == (0, 0)
    print(f"\npersonalize kills: {kills}, last committed version {committed}, debris files seen {debris_seen}, "
          f"{time.monotonic() - started:.1f}s")
    assert kills >= 10


def test_a_delete_cut_short_by_a_crash_does_not_bring_the_user_back(tmp_path, monkeypatch):
    """``delete(user)`` renames the user's directory away, then removes it with rmtree. A crash in
    the rmtree (even one that had already removed HEAD) must not leave older versions to be
    "recovered" as current: the user is gone from the moment of the rename."""
    import shutil

    from bitfit.sdk import store as store_module
    from bitfit.sdk.delta import Delta
    from bitfit.sdk.errors import DeltaNotFoundError, StoreWriteError

    store = DeltaStore(tmp_path / "store")
    for i in range(3):
        store.save("gone", Delta({"b": np.full(2, float(i))}, "sha256:00"))
    real_rmtree = shutil.rmtree

    def crash_after_head(path, *args, **kwargs):
        # The worst order for a crash: HEAD and user.json go first, then the process dies.
        for name in ("HEAD", "user.json"):
            (Path(path) / name).unlink(missing_ok=True)
        raise OSError(5, "simulated crash in the middle of rmtree")

    monkeypatch.setattr(store_module.shutil, "rmtree", crash_after_head)
    with pytest.raises(StoreWriteError, match="'gone' is deleted, but .* could not be removed: simulated crash in the middle"):
        store.delete("gone")
    monkeypatch.setattr(store_module.shutil, "rmtree", real_rmtree)
    fresh = DeltaStore(tmp_path / "store")
    assert fresh.current_version("gone") is None
    with pytest.raises(DeltaNotFoundError):
        fresh.load("gone")
    assert fresh.users() == []
    assert fresh.save("gone", Delta({"b": np.zeros(2)}, "sha256:00")) == 1  # a new start, nothing recovered


@pytest.mark.parametrize("files_removed_before_crash", [0, 1, 2, 3])
def test_a_delete_cut_short_keeps_the_current_version_or_nothing(tmp_path, monkeypatch, files_removed_before_crash):
    """A delete that dies at the rename keeps the user as before (its current version, after a
    rollback); one that dies while removing the renamed directory leaves no user: never another
    version made current."""
    import shutil

    from bitfit.sdk import store as store_module
    from bitfit.sdk.delta import Delta
    from bitfit.sdk.errors import StoreWriteError

    store = DeltaStore(tmp_path / "store")
    for i in range(4):
        store.save("gone", Delta({"b": np.full(2, float(i))}, "sha256:00"))
    store.rollback("gone", 2)  # the current version is not the newest: the hard case
    real_rmtree = shutil.rmtree

    def crash_midway(path, *args, **kwargs):
        for victim in sorted(Path(path).glob("v*.delta"))[:files_removed_before_crash]:
            victim.unlink()
        raise OSError(5, "simulated crash")

    monkeypatch.setattr(store_module.shutil, "rmtree", crash_midway)
    with pytest.raises(StoreWriteError, match="could not be removed: simulated crash"):
        store.delete("gone")
    monkeypatch.undo()
    fresh = DeltaStore(tmp_path / "store")
    assert fresh.current_version("gone") is None and fresh.users() == []

    for i in range(2):
        fresh.save("kept", Delta({"b": np.full(2, float(i))}, "sha256:00"))
    fresh.rollback("kept", 1)

    def rename_fails(*args, **kwargs):
        raise OSError(5, "simulated crash at the rename")

    monkeypatch.setattr(store_module.os, "rename", rename_fails)
    with pytest.raises(StoreWriteError, match="could not delete .*simulated crash at the rename; nothing was deleted"):
        fresh.delete("kept")
    monkeypatch.undo()
    again = DeltaStore(tmp_path / "store")
    assert again.current_version("kept") == 1 and again.load("kept").tensors["b"].tolist() == [0.0, 0.0]
