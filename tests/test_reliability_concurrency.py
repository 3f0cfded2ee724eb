"""Concurrency across processes: two writers personalizing the same user, and readers
predicting while a writer saves (and prunes) versions.

Every process records what it got: writers the versions they were given (all distinct,
each writer's increasing); readers check the current version before and after each
prediction themselves (never decreasing, never an exception, never a fallback) and report
only problems. The store is consistent at the end.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

import reliability_fixtures as rf
from bitfit.sdk.personalizer import Personalizer
from bitfit.sdk.store import DeltaStore

FIXTURES = Path(rf.__file__)
ROUNDS = 30 if rf.stress() else 6
SECONDS = 15.0 if rf.stress() else 3.0

text_bundle = rf.session_bundle("text")


def _spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(FIXTURES), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _ready(proc: subprocess.Popen) -> subprocess.Popen:
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise AssertionError(f"child did not start: {line!r} {proc.stderr.read()[-3000:]}")
    return proc


def _start(*args: str) -> subprocess.Popen:
    return _ready(_spawn(*args))


def _finish(proc: subprocess.Popen, timeout: float = 120) -> list[str]:
    # Through the text wrappers (not communicate()): readline() of "ready" may have buffered more.
    out, err = proc.stdout.read(), proc.stderr.read()
    proc.wait(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out.splitlines()


def _writer_versions(lines: list[str]) -> list[int]:
    versions = [int(line.split()[1]) for line in lines]
    assert all(line.split()[0] == "saved" for line in lines)
    assert versions == sorted(versions) and len(set(versions)) == len(versions), versions
    return versions


def _check_reader(lines: list[str]) -> int:
    """The reader's own checks found nothing; returns how many predictions it made."""
    problems = [line for line in lines if not line.startswith("done ")]
    assert not problems, problems[:10]
    _, count, versions = lines[-1].split()
    assert int(count) > 0
    return int(count)


def _check_final(bundle: Path, root: Path, user: str, every_version: list[int]) -> None:
    store = DeltaStore(root)
    rows = store.info(user)
    assert rows and all("error" not in row for row in rows)
    assert store.current_version(user) == max(every_version)
    assert set(store.versions(user)) <= set(every_version)
    assert not [f for f in root.rglob("*") if f.name.startswith(".tmp-")]
    prediction = Personalizer(bundle, store).predict(["good flight", "awful seat"], user=user)
    assert prediction.fallbacks == {} and np.all(np.isfinite(prediction.logits))


def test_two_processes_personalize_the_same_user_while_a_third_predicts(text_bundle, tmp_path):
    root = tmp_path / "store"
    user = "shared/../user"
    reader = _start("predict", str(text_bundle), str(root), user, str(SECONDS + 1))
    # Both spawned before either is waited for, so their rounds overlap.
    writers = [_ready(w) for w in [_spawn("personalize", str(text_bundle), str(root), user, str(seed), str(ROUNDS))
                                   for seed in (1, 2)]]
    got = [_writer_versions(_finish(w)) for w in writers]
    assert all(len(v) == ROUNDS for v in got)
    every = got[0] + got[1]
    assert len(set(every)) == len(every) == 2 * ROUNDS, "two writers were given the same version"
    assert sorted(every) == list(range(1, 2 * ROUNDS + 1))
    reads = _check_reader(_finish(reader))
    assert reads > 0
    _check_final(text_bundle, root, user, every)
    print(f"\nwriters got {got}, reader predicted {reads} times")


def test_readers_predict_while_a_writer_saves_and_prunes(text_bundle, tmp_path):
    root = tmp_path / "store"
    user = "busy"
    # One version first, so the readers always have a delta to apply.
    Personalizer(text_bundle, root).personalize(rf.text_data(8), user=user, epochs=1)
    readers = [_start("predict", str(text_bundle), str(root), user, str(SECONDS + 1)) for _ in range(2)]
    writer = _start("save-bundle-loop", str(text_bundle), str(root), user, "7", str(SECONDS))
    versions = _writer_versions(_finish(writer))
    assert len(versions) > 10
    reads = [_check_reader(_finish(r)) for r in readers]
    assert all(n > 0 for n in reads)
    _check_final(text_bundle, root, user, [1, *versions])
    assert len(DeltaStore(root).versions(user)) <= 2 + 1
    print(f"\nwriter saved {len(versions)} versions, readers predicted {reads} times")


def test_personalize_and_predict_from_threads_of_one_process(text_bundle, tmp_path):
    """The same store from several threads: distinct versions, no exception."""
    from concurrent.futures import ThreadPoolExecutor

    root = tmp_path / "store"
    users = ["t0", "t1", "shared"]

    def work(i: int) -> tuple[str, int]:
        p = Personalizer(text_bundle, root)
        user = users[i % len(users)]
        result = p.personalize(rf.text_data(6, seed=i), user=user, epochs=1, seed=i)
        p.predict(["good day"], user=user)
        return user, result.version

    with ThreadPoolExecutor(max_workers=3) as pool:
        done = list(pool.map(work, range(9)))
    for user in users:
        versions = sorted(v for u, v in done if u == user)
        assert versions == list(range(1, len(versions) + 1)), (user, versions)
