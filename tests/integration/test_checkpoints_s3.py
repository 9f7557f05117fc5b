"""The object-store checkpoint backend against a real S3-compatible server on loopback.

The backend-neutral contract of ``tests/unit/test_checkpoints.py`` runs here unchanged, with ``tamper``
reaching into the bucket; the tests below it cover what only an object store has: conditional writes,
the local download cache, and the server's errors.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from services import checkpoints_s3
from services.checkpoints import (MANIFEST, CheckpointExistsError, CheckpointStore, CorruptCheckpointError,
                                  open_checkpoint, read_checkpoint_metadata)
from services.checkpoints_s3 import CACHE_ENV, S3CheckpointStore
from services.errors import InvalidArgument
from services.stack.s3 import LocalS3
from tests.unit.test_checkpoints import CONTRACT, FILES, _writer

globals().update({t.__name__: t for t in CONTRACT})  # collected here as tests of the S3 backend


@pytest.fixture(scope="session")
def local_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalS3]:
    with LocalS3(tmp_path_factory.mktemp("s3")) as s3:
        saved = {k: os.environ.get(k) for k in s3.env}
        os.environ.update(s3.env)
        checkpoints_s3._client.cache_clear()
        checkpoints_s3.store_for.cache_clear()
        try:
            yield s3
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            checkpoints_s3._client.cache_clear()
            checkpoints_s3.store_for.cache_clear()


@pytest.fixture
def store(local_s3: LocalS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> S3CheckpointStore:
    bucket = f"ckpt-{uuid.uuid4().hex[:12]}"
    local_s3.create_bucket(bucket)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    checkpoints_s3.store_for.cache_clear()  # open_checkpoint's stores pick up this test's cache dir
    s = CheckpointStore(f"s3://{bucket}/prefstream/runs")
    assert isinstance(s, S3CheckpointStore)
    return s


class S3Tamper:
    def __init__(self, store: S3CheckpointStore) -> None:
        self.store = store
        self.client = store.client

    def read(self, ref, rel: str) -> bytes:
        return self.client.get_object(Bucket=self.store.bucket, Key=self.store._key(ref.name, ref.version, rel))["Body"].read()

    def put(self, ref, rel: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.store.bucket, Key=self.store._key(ref.name, ref.version, rel), Body=data)

    def remove(self, ref, rel: str) -> None:
        self.client.delete_object(Bucket=self.store.bucket, Key=self.store._key(ref.name, ref.version, rel))

    def leave_unfinished(self, name: str, dirname: str, files: dict[str, bytes]) -> None:
        for rel, data in files.items():
            self.client.put_object(Bucket=self.store.bucket, Key=self.store._key(name, dirname, rel), Body=data)

    def entries(self, name: str) -> list[str]:
        return sorted(self.store._versions(name))

    def pass_time(self, seconds: float) -> None:
        time.sleep(seconds)  # the server stamps objects itself


@pytest.fixture
def tamper(store: S3CheckpointStore) -> S3Tamper:
    return S3Tamper(store)


# -- what only the object store has ----------------------------------------------------------------


def test_the_s3_backend_implements_the_whole_interface() -> None:
    declared = {n for n, v in vars(CheckpointStore).items() if callable(v) and not n.startswith("_")}
    for name in declared - {"register_scheme", "latest"}:  # latest is the interface's own, from list + verify
        assert getattr(S3CheckpointStore, name) is not getattr(CheckpointStore, name), name


def test_manifest_is_uploaded_last_and_every_object_only_if_absent(store, monkeypatch: pytest.MonkeyPatch) -> None:
    puts: list[tuple[str, str | None]] = []
    real_put = store.client.put_object

    def put_object(**kw):
        puts.append((kw["Key"].rsplit("/", 1)[-1], kw.get("IfNoneMatch")))
        return real_put(**kw)

    monkeypatch.setattr(store.client, "put_object", put_object)
    store.write("rm", "v000001", _writer(FILES), {"step": 1})
    assert puts[-1] == (MANIFEST, "*")
    assert sorted(k for k, _ in puts[:-1]) == sorted(["model.safetensors", "config.json", "vocab.txt", "metadata.json"])
    assert all(cond == "*" for _, cond in puts)


def test_a_second_writer_of_the_same_version_fails_without_touching_the_first(store, tamper) -> None:
    other = CheckpointStore(store.url)

    def racing_writer(d: Path) -> None:
        _writer(FILES)(d)
        other.write("rm", "v000001", _writer({"mine.bin": b"other writer"}), {"by": "other"})  # wins the race

    with pytest.raises(CheckpointExistsError, match="another writer"):
        store.write("rm", "v000001", racing_writer, {"by": "first"})
    assert store.read_metadata(store.get("rm", "v000001")) == {"by": "other"}
    assert set(store.verify(store.get("rm", "v000001")).files) == {"mine.bin", "metadata.json"}


def test_open_downloads_once_and_again_when_the_version_changed(store, monkeypatch: pytest.MonkeyPatch) -> None:
    downloads: list[str] = []
    real_download = store.client.download_file
    monkeypatch.setattr(store.client, "download_file",
                        lambda b, k, f, **kw: (downloads.append(k), real_download(b, k, f, **kw))[1])
    ref = store.write("rm", "v000001", _writer(FILES), {"step": 1})
    first = store.open(ref)
    assert len(downloads) == len(FILES) + 1  # + metadata.json
    assert store.open(ref) == first and open_checkpoint(ref.uri) == first
    assert len(downloads) == len(FILES) + 1  # served from the verified cache
    # The version is deleted and rewritten with other content: the stale cached copy is replaced.
    store.delete("rm", "v000001")
    store.write("rm", "v000001", _writer({"w.bin": b"new"}), {"step": 2})
    again = store.open(ref)
    assert (again / "w.bin").read_bytes() == b"new" and not (again / "config.json").exists()
    # A cached file damaged on local disk is caught and downloaded afresh.
    (again / "w.bin").write_bytes(b"bad")
    assert (store.open(ref) / "w.bin").read_bytes() == b"new"
    assert read_checkpoint_metadata(ref.uri) == {"step": 2}


def test_the_cache_keeps_only_the_newest_versions(store) -> None:
    for i in range(1, 6):
        store.open(store.write("rm", f"v{i:06d}", _writer({"w.bin": bytes([i])}), {}))
    cached = sorted(p.name for p in (store.cache_root / "rm").iterdir() if not p.name.startswith("."))
    assert cached == ["v000003", "v000004", "v000005"]


def test_a_missing_bucket_or_a_malformed_url_names_checkpoint_url(store) -> None:
    with pytest.raises(InvalidArgument, match="bucket 'no-such-bucket-here'.*does not exist") as e:
        CheckpointStore("s3://no-such-bucket-here/x")
    assert e.value.field == "checkpoint_url"
    with pytest.raises(InvalidArgument, match="s3://<bucket>/<prefix>"):
        CheckpointStore("s3:///no-bucket")
    with pytest.raises(CorruptCheckpointError, match="no manifest.json"):
        open_checkpoint(f"{store.url}/rm/v000009")  # a version never written


def test_trainer_killed_9_resumes_from_the_object_store_and_the_scorer_loads_what_it_published(
    store, tmp_path: Path, kafka_bootstrap: str, redis_url: str
) -> None:
    """The whole path with no shared volume: a trainer process writes to the bucket, is killed -9 after its
    first checkpoint, resumes from the bucket with every record trained once, publishes an s3:// URI, and
    the scorer's loader downloads, verifies and scores with it."""
    from scorer.runners import load_reward, open_published
    from services.registry import ModelRegistry
    from tests.integration.test_trainer import kill_9_then_resume

    name, _ = kill_9_then_resume(tmp_path, kafka_bootstrap, redis_url, store.url)
    target = ModelRegistry(__import__("redis").Redis.from_url(redis_url)).target(name)
    assert target.uri.startswith(store.url + "/")
    served = load_reward(open_published(target.uri), device="cpu", dtype="float32", warmup=False)
    offline = load_reward(str(store.open(store.get(name, target.version))), device="cpu", dtype="float32", warmup=False)
    prompt = [{"role": "user", "content": "question number 1"}]
    got = served.model.score([prompt], ["sure , this works well"])[0].reward
    assert got == pytest.approx(offline.model.score([prompt], ["sure , this works well"])[0].reward, abs=1e-6)


def test_an_unreachable_store_is_unavailable_not_a_corrupt_checkpoint(local_s3: LocalS3, tmp_path: Path) -> None:
    """The scorer refuses (and records in the registry) corrupt versions only; an S3 outage is a retry."""
    from services.errors import Unavailable

    with LocalS3(tmp_path / "s3") as s3:
        s3.create_bucket("outage")
        s = S3CheckpointStore("s3://outage/x", endpoint_url=s3.endpoint, cache_dir=tmp_path / "cache")
        ref = s.write("rm", "v000001", _writer(FILES), {})
    # the server is gone now
    with pytest.raises(Unavailable, match="unreachable"):
        s.open(ref)
    with pytest.raises(Unavailable):
        S3CheckpointStore("s3://outage/x", endpoint_url=s3.endpoint)
