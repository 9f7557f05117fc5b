"""Checkpoint store: atomic writes, checksums, corruption detection, partial dirs, gc.

The tests that take ``store`` and ``tamper`` are the contract every backend passes: here against the
local store, and in ``tests/integration/test_checkpoints_s3.py`` the very same functions against the
object-store backend on a real S3-compatible server.  ``tamper`` reaches behind the store's back the way
a crash, a bad disk or an operator would."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from services.checkpoints import (MANIFEST, METADATA, CheckpointExistsError, CheckpointStore, CorruptCheckpointError,
                                  LocalCheckpointStore, open_checkpoint, sha256_file, version_sort_key)
from services.errors import InvalidArgument, NotFound


def _writer(files: dict[str, bytes]):
    def write(d: Path) -> None:
        for rel, data in files.items():
            (d / rel).parent.mkdir(parents=True, exist_ok=True)
            (d / rel).write_bytes(data)
    return write


FILES = {"model.safetensors": b"\x00\x01weights" * 100, "config.json": b'{"a": 1}', "tok/vocab.txt": b"a\nb\n"}


class LocalTamper:
    def __init__(self, store: LocalCheckpointStore) -> None:
        self.store = store

    def read(self, ref, rel: str) -> bytes:
        return (ref.path / rel).read_bytes()

    def put(self, ref, rel: str, data: bytes) -> None:
        (ref.path / rel).parent.mkdir(parents=True, exist_ok=True)
        (ref.path / rel).write_bytes(data)

    def remove(self, ref, rel: str) -> None:
        (ref.path / rel).unlink()

    def leave_unfinished(self, name: str, dirname: str, files: dict[str, bytes]) -> None:
        d = self.store.root / name / dirname
        d.mkdir(parents=True)
        _writer(files)(d)

    def entries(self, name: str) -> list[str]:
        d = self.store.root / name
        return sorted(p.name for p in d.iterdir()) if d.is_dir() else []

    def pass_time(self, seconds: float) -> None:
        """Everything written so far becomes ``seconds`` older."""
        for p in self.store.root.glob("*/*"):
            st = p.stat()
            os.utime(p, (st.st_atime - seconds, st.st_mtime - seconds))


@pytest.fixture
def store(tmp_path: Path) -> LocalCheckpointStore:
    s = CheckpointStore(tmp_path / "ckpt")
    assert isinstance(s, LocalCheckpointStore)
    return s


@pytest.fixture
def tamper(store: LocalCheckpointStore) -> LocalTamper:
    return LocalTamper(store)


# -- the contract, for every backend -------------------------------------------------------------


def test_write_produces_manifest_with_checksums_of_every_file(store, tamper) -> None:
    meta = {"step": 12, "records_seen": 3400, "offsets": {"prefstream.preferences": {"0": 17, "1": 9}}}
    ref = store.write("rm", "v000001", _writer(FILES), meta)
    assert ref.uri.startswith(store.url) and ref.uri.endswith("/rm/v000001")
    manifest = store.read_manifest(ref)
    assert set(manifest.files) == {*FILES, METADATA}
    for rel, entry in manifest.files.items():
        data = tamper.read(ref, rel)
        assert entry.sha256 == hashlib.sha256(data).hexdigest() and entry.size == len(data)
    assert store.verify(ref).version == "v000001"
    assert store.read_metadata(ref) == meta
    opened = store.open(ref)
    assert opened == ref.path and all((opened / rel).read_bytes() == data for rel, data in FILES.items())
    assert open_checkpoint(ref.uri) == opened
    # No temp files are left behind beside the checkpoint or inside it.
    assert tamper.entries("rm") == ["v000001"]
    assert not [p for p in opened.iterdir() if p.name.startswith(".")]


def test_flipped_byte_is_detected(store, tamper) -> None:
    ref = store.write("rm", "v000001", _writer(FILES), {})
    data = bytearray(tamper.read(ref, "model.safetensors"))
    data[10] ^= 0xFF
    tamper.put(ref, "model.safetensors", bytes(data))
    with pytest.raises(CorruptCheckpointError, match="model.safetensors does not match its sha256") as e:
        store.verify(ref)
    assert "rm/v000001" in str(e.value)
    with pytest.raises(CorruptCheckpointError):
        store.open(ref)


def test_deleted_extra_and_resized_files_are_detected(store, tamper) -> None:
    ref = store.write("rm", "v000001", _writer(FILES), {})
    tamper.remove(ref, "tok/vocab.txt")
    with pytest.raises(CorruptCheckpointError, match="missing file.*tok/vocab.txt"):
        store.verify(ref)

    ref2 = store.write("rm", "v000002", _writer(FILES), {})
    tamper.put(ref2, "stray.bin", b"x")
    with pytest.raises(CorruptCheckpointError, match="not in the manifest: stray.bin"):
        store.verify(ref2)

    ref3 = store.write("rm", "v000003", _writer(FILES), {})
    tamper.put(ref3, "config.json", b'{"a": 12}')
    with pytest.raises(CorruptCheckpointError, match="config.json has 9 bytes"):
        store.verify(ref3)


def test_missing_or_garbled_manifest_is_corrupt(store, tamper) -> None:
    ref = store.write("rm", "v000001", _writer(FILES), {})
    tamper.put(ref, MANIFEST, b"{not json")
    with pytest.raises(CorruptCheckpointError, match="unreadable"):
        store.verify(ref)
    tamper.remove(ref, MANIFEST)
    with pytest.raises(CorruptCheckpointError, match="no manifest.json"):
        store.verify(ref)
    with pytest.raises(CorruptCheckpointError):
        open_checkpoint(ref.uri)
    assert store.list("rm") == []


def test_partial_directories_are_ignored_by_list_and_latest(store, tamper) -> None:
    store.write("rm", "v000001", _writer(FILES), {})
    # A crash after the files landed but before the manifest, and a crash mid-write in a temp dir.
    tamper.leave_unfinished("rm", "v000003", FILES)
    tamper.leave_unfinished("rm", ".tmp-v000004-abc", FILES)
    assert [r.version for r in store.list("rm")] == ["v000001"]
    assert store.latest("rm").version == "v000001"
    assert store.next_version("rm") == "v000004"  # never reuses a number a crashed write took
    with pytest.raises(NotFound):
        store.get("rm", "v000003")
    # Rewriting the unfinished version replaces it.
    ref = store.write("rm", "v000003", _writer({"x.bin": b"new"}), {"step": 3})
    assert store.verify(ref).files.keys() == {"x.bin", METADATA}


def test_latest_with_verify_skips_a_corrupt_newest(store, tamper) -> None:
    store.write("rm", "v000001", _writer(FILES), {})
    bad = store.write("rm", "v000002", _writer(FILES), {})
    tamper.put(bad, "config.json", b'{"a": 2}')
    assert store.latest("rm").version == "v000002"
    assert store.latest("rm", verify=True).version == "v000001"
    assert store.latest("other") is None


def test_failed_writer_leaves_nothing(store, tamper) -> None:
    def boom(d: Path) -> None:
        (d / "half.bin").write_bytes(b"x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        store.write("rm", "v000001", boom, {})
    assert tamper.entries("rm") == []


def test_bad_inputs_name_the_field(store) -> None:
    with pytest.raises(InvalidArgument, match="metadata"):
        store.write("rm", "v000001", _writer(FILES), {"loss": float("nan")})
    with pytest.raises(InvalidArgument, match="version"):
        store.write("rm", "../escape", _writer(FILES), {})
    with pytest.raises(InvalidArgument, match="name"):
        store.write("a/b", "v1", _writer(FILES), {})
    with pytest.raises(InvalidArgument, match="writer"):
        store.write("rm", "v000001", _writer({MANIFEST: b"{}"}), {})
    store.write("rm", "v000001", _writer(FILES), {})
    with pytest.raises(CheckpointExistsError, match="already exists"):
        store.write("rm", "v000001", _writer(FILES), {})


def test_version_ordering_is_numeric_for_v_numbers() -> None:
    assert sorted(["v10", "v9", "v000011", "zeta", "alpha"], key=version_sort_key) == ["v9", "v10", "v000011", "alpha", "zeta"]


def test_gc_keeps_newest_and_protected_and_cleans_stale_partials(store, tamper) -> None:
    for i in range(1, 6):
        store.write("rm", f"v{i:06d}", _writer({"w.bin": bytes([i])}), {"step": i})
    tamper.leave_unfinished("rm", ".tmp-v000009-dead", {"w.bin": b"9"})
    tamper.pass_time(4.0)
    tamper.leave_unfinished("rm", ".tmp-v000010-live", {"w.bin": b"10"})
    deleted = store.gc("rm", keep=2, protected={"v000002"}, stale_after_s=3.0)
    assert deleted == ["v000001", "v000003"]
    assert [r.version for r in store.list("rm")] == ["v000002", "v000004", "v000005"]
    assert tamper.entries("rm") == [".tmp-v000010-live", "v000002", "v000004", "v000005"]
    with pytest.raises(InvalidArgument, match="keep"):
        store.gc("rm", keep=0)


def test_every_store_method_the_services_call_is_on_the_interface_and_local_implements_it() -> None:
    """Callers hold a ``CheckpointStore``; a method only the local backend has would break another one."""
    import re

    root = Path(__file__).resolve().parents[2]
    called = set()
    for package in ("trainer", "scorer", "gateway", "services", "bench", "prefstream"):
        for path in (root / package).rglob("*.py"):
            called |= set(re.findall(r"\bstore\.([a-z_]+)\(", path.read_text(encoding="utf-8")))
    assert {"next_version", "write"} <= called
    declared = {n for n, v in vars(CheckpointStore).items() if callable(v) and not n.startswith("_")}
    assert called <= declared, f"not on the CheckpointStore interface: {sorted(called - declared)}"
    for name in declared - {"register_scheme", "latest"}:  # latest is the interface's own, from list + verify
        assert getattr(LocalCheckpointStore, name) is not getattr(CheckpointStore, name), name


def test_next_version_is_part_of_the_interface_a_backend_must_implement(tmp_path: Path) -> None:
    class Partial(CheckpointStore):
        def __init__(self, url: str) -> None:
            self.url = url

    with pytest.raises(NotImplementedError):
        Partial("mem://x").next_version("rm")
    assert CheckpointStore(str(tmp_path)).next_version("rm") == "v000001"


def test_the_writer_discards_a_crashed_writes_leftovers_at_start_up(store, tamper) -> None:
    store.write("rm", "v000001", _writer({"w.bin": b"1"}), {"step": 1})
    tamper.leave_unfinished("rm", ".tmp-v000002-0123456789ab", {"w.bin": b"2"})  # kill -9 mid-write
    tamper.leave_unfinished("rm", "v000003", {"w.bin": b"3"})  # a version without its manifest
    assert store.discard_unfinished("rm") == [".tmp-v000002-0123456789ab", "v000003"]
    assert tamper.entries("rm") == ["v000001"]
    assert [r.version for r in store.list("rm")] == ["v000001"] and store.discard_unfinished("none") == []


# -- the local store only --------------------------------------------------------------------


def test_file_url_and_plain_path_open_the_same_store(tmp_path: Path) -> None:
    a = CheckpointStore(f"file://{tmp_path}/s")
    ref = a.write("rm", "v000001", _writer(FILES), {})
    assert ref.path == a.root / "rm" / "v000001" and ref.uri == ref.path.as_uri()
    b = CheckpointStore(str(tmp_path / "s"))
    assert [r.version for r in b.list("rm")] == ["v000001"]
    assert open_checkpoint(ref.uri) == ref.path


def test_unknown_scheme_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="unsupported checkpoint store scheme 'gs'.*file://, s3://"):
        CheckpointStore("gs://bucket/prefix")
    with pytest.raises(InvalidArgument, match="uri"):
        open_checkpoint("gs://bucket/x")


def test_manifest_is_written_last_and_atomically(store: LocalCheckpointStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Record the order of renames: the directory lands first, then the manifest replaces a temp file."""
    events: list[tuple[str, str, str]] = []
    real_rename, real_replace = os.rename, os.replace
    monkeypatch.setattr(os, "rename", lambda a, b: (events.append(("rename", Path(a).name, Path(b).name)), real_rename(a, b))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", Path(a).name, Path(b).name)), real_replace(a, b))[1])
    ref = store.write("rm", "v000001", _writer(FILES), {})
    assert [e[0] for e in events] == ["rename", "replace"]
    assert events[0][1].startswith(".tmp-v000001") and events[0][2] == "v000001"
    assert events[1][1].startswith(".manifest.json.") and events[1][2] == MANIFEST
    assert store.verify(ref)


#: What tests/integration/test_checkpoints_s3.py runs against the object store.
CONTRACT = (
    test_write_produces_manifest_with_checksums_of_every_file, test_flipped_byte_is_detected,
    test_deleted_extra_and_resized_files_are_detected, test_missing_or_garbled_manifest_is_corrupt,
    test_partial_directories_are_ignored_by_list_and_latest, test_latest_with_verify_skips_a_corrupt_newest,
    test_failed_writer_leaves_nothing, test_bad_inputs_name_the_field,
    test_gc_keeps_newest_and_protected_and_cleans_stale_partials,
    test_the_writer_discards_a_crashed_writes_leftovers_at_start_up,
)
