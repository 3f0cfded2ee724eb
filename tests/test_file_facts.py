"""What Bundle.open remembers between openings (sdk/file_facts.py): a fact is reused only
while its file is provably unchanged, and a changed file is always checked again."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

import bitfit.sdk.bundle as bundle_module
import bitfit.sdk.file_facts as file_facts
from bitfit.sdk.bundle import Bundle, forget_checked_files
from bitfit.sdk.errors import BundleInvalidError
from bitfit.sdk.file_facts import FileFacts

from sdk_fixtures import *  # noqa: F401,F403  (the tiny exported bundles)


SETTLE = 0.05  # seconds; the real rule wants a file's times 2 s old


@pytest.fixture
def settled(monkeypatch):
    """Files count as settled SETTLE s after they were written (call settle() after writing:
    a later rewrite then falls in another tick of the file clock, as in real use)."""
    monkeypatch.setattr(file_facts, "SETTLED_SECONDS", SETTLE)
    forget_checked_files()
    yield
    forget_checked_files()


def settle() -> None:
    time.sleep(2 * SETTLE)


def _counting(calls: list[Path]) -> FileFacts[bytes]:
    return FileFacts(lambda path: calls.append(path) or path.read_bytes())


def test_an_unchanged_settled_file_is_computed_once(tmp_path, settled):
    path, calls = tmp_path / "f", []
    path.write_bytes(b"abc")
    settle()
    facts = _counting(calls)
    assert facts.get(path) == facts.get(tmp_path / "." / "f") == b"abc"  # the same file by another spelling
    assert len(calls) == 1


@pytest.mark.parametrize("change", ["same-size rewrite, times put back", "replaced by rename", "appended"])
def test_a_changed_file_is_computed_again(tmp_path, settled, change):
    path, calls = tmp_path / "f", []
    path.write_bytes(b"abc")
    settle()
    facts = _counting(calls)
    assert facts.get(path) == b"abc"
    assert facts.get(path) == b"abc" and len(calls) == 1  # remembered
    st = path.stat()
    if change.startswith("same-size"):
        path.write_bytes(b"abd")
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime forged back; ctime cannot be
    elif change == "replaced by rename":
        (tmp_path / "g").write_bytes(b"xyz")
        os.replace(tmp_path / "g", path)
    else:
        with open(path, "ab") as fh:
            fh.write(b"!")
    assert facts.get(path) == path.read_bytes() != b"abc"
    assert len(calls) == 2


def test_a_freshly_written_file_is_not_remembered(tmp_path):
    """Its times are within the clock's tick of the computation: a same-size rewrite in that
    tick would keep its identity, so nothing is kept (git's racy-clean rule)."""
    path, calls = tmp_path / "f", []
    path.write_bytes(b"abc")
    facts = _counting(calls)
    facts.get(path)
    facts.get(path)
    assert len(calls) == 2


def test_a_failed_computation_keeps_nothing_and_forget_drops_everything(tmp_path, settled):
    path, calls = tmp_path / "f", []
    path.write_bytes(b"abc")
    settle()
    failing = FileFacts(lambda p: calls.append(p) or 1 / 0)
    for _ in range(2):
        with pytest.raises(ZeroDivisionError):
            failing.get(path)
    assert len(calls) == 2
    facts = _counting(calls := [])
    facts.get(path)
    facts.forget()
    facts.get(path)
    assert len(calls) == 2


def test_only_the_most_recent_files_are_kept(tmp_path, settled):
    calls: list[Path] = []
    facts = FileFacts(lambda p: calls.append(p) or p.name, max_files=2)
    paths = [tmp_path / name for name in "abc"]
    for p in paths:
        p.write_text(p.name)
    settle()
    for p in paths:
        facts.get(p)
    facts.get(paths[2])
    facts.get(paths[0])  # evicted by c
    assert [p.name for p in calls] == ["a", "b", "c", "a"]


def test_reopening_an_unchanged_bundle_skips_hashing_and_parsing(numeric_bundle, tmp_path, settled, monkeypatch):
    bundle_dir = tmp_path / "b"
    shutil.copytree(numeric_bundle, bundle_dir)
    settle()
    hashed, parsed = [], []
    monkeypatch.setattr(bundle_module, "_FILE_SHA256", FileFacts(lambda p: hashed.append(p) or bundle_module.sha256_file(p)))
    monkeypatch.setattr(bundle_module, "_FILE_EXTERNAL_REFS",
                        FileFacts(lambda p: parsed.append(p) or bundle_module._external_refs(p)))
    first = Bundle.open(bundle_dir)
    files, onnx_files = len(first.manifest.files), sum(e.path.endswith(".onnx") for e in first.manifest.files.values())
    assert (len(hashed), len(parsed)) == (files, onnx_files)
    Bundle.open(bundle_dir)
    assert (len(hashed), len(parsed)) == (files, onnx_files)  # nothing again


def test_a_byte_flipped_after_an_opening_is_still_refused(numeric_bundle, tmp_path, settled):
    """The point of the rule: same size, modification time forged back, content changed."""
    bundle_dir = tmp_path / "b"
    shutil.copytree(numeric_bundle, bundle_dir)
    settle()
    Bundle.open(bundle_dir)  # remembered as intact
    weights = bundle_dir / "weights.safetensors"
    st = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert weights.stat().st_size == st.st_size
    with pytest.raises(BundleInvalidError, match="does not match its sha256"):
        Bundle.open(bundle_dir)


def test_nothing_is_remembered_where_ctime_is_not_the_status_change_time(tmp_path, settled, monkeypatch):
    """Windows: st_ctime is the creation time, kept by a rewrite with its mtime forged back."""
    monkeypatch.setattr(file_facts, "REMEMBERS", False)
    path, calls = tmp_path / "f", []
    path.write_bytes(b"abc")
    settle()
    facts = _counting(calls)
    facts.get(path)
    facts.get(path)
    assert len(calls) == 2
