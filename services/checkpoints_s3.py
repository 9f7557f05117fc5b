"""Checkpoints in S3-compatible object storage: ``s3://<bucket>/<prefix>``.

The same protocol as the local store (see :mod:`services.checkpoints`), mapped onto objects:

1. ``writer(tmpdir)`` fills a local temporary directory; ``metadata.json`` is added and every file hashed;
2. every file is uploaded to ``<prefix>/<name>/<version>/<file>`` (leftovers of an earlier, crashed
   write of that version are deleted first);
3. ``manifest.json`` is uploaded last.  Every object is put with ``If-None-Match: *``, so a second writer
   of the same version fails instead of overwriting the first one's files or manifest.

A version is finished exactly when its manifest object exists; listings ignore every other prefix and
``gc`` / ``discard_unfinished`` remove them.  Readers get a *local* directory: :meth:`S3CheckpointStore.open`
downloads a version into a cache (``PREFSTREAM_CHECKPOINT_CACHE_DIR``, default
``~/.cache/prefstream/checkpoints``) through a temporary directory renamed into place, checks the remote
object list against the manifest (missing, extra or resized objects) and re-hashes the files.  A cached copy
is reused while its manifest is byte-identical to the remote one and its files still hash right, so a
scorer replica downloads each version once.

Endpoint and credentials come from the standard AWS settings boto3 reads (``AWS_ENDPOINT_URL_S3`` or
``AWS_ENDPOINT_URL`` for an S3-compatible server, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, instance
or pod roles, ``AWS_DEFAULT_REGION``), so nothing S3-specific enters the services' configs.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping
from urllib.parse import urlparse

from services.checkpoints import (MANIFEST, METADATA, _NUMBERED_RE, _TMP_PREFIX, CheckpointExistsError,
                                  CheckpointRef, CheckpointStore, CorruptCheckpointError, FileEntry, Manifest,
                                  _walk_files, read_manifest, sha256_file, validate_name, verify_dir,
                                  version_sort_key)
from services.errors import InvalidArgument, NotFound, Unavailable

log = logging.getLogger(__name__)

CACHE_ENV = "PREFSTREAM_CHECKPOINT_CACHE_DIR"
CACHED_VERSIONS_KEPT = 3  # per model name: the one being opened and the newest others (a rollback's target)
_DELETE_BATCH = 1000  # DeleteObjects takes at most 1000 keys


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "prefstream" / "checkpoints").expanduser()


def split_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ("bucket", "a/b"); a clear error naming ``checkpoint_url`` otherwise."""
    parsed = urlparse(str(url))
    if parsed.scheme != "s3" or not parsed.netloc:
        raise InvalidArgument("checkpoint_url", f"{url!r} is not an s3://<bucket>/<prefix> URL")
    if parsed.query or parsed.fragment:
        raise InvalidArgument("checkpoint_url", f"{url!r} carries a query or fragment; the endpoint and credentials "
                              "come from AWS_ENDPOINT_URL_S3 / AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
    return parsed.netloc, parsed.path.strip("/")


@functools.lru_cache(maxsize=8)
def _client(endpoint: str | None):
    import boto3
    from botocore.config import Config

    # Standard retries ride out a throttled or restarting server; the endpoint may also come from the env.
    cfg = Config(retries={"mode": "standard", "max_attempts": 5}, connect_timeout=5, read_timeout=60)
    return boto3.client("s3", endpoint_url=endpoint or None, config=cfg)


def _error_code(e: Exception) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))


_TRANSIENT_CODES = {"500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown", "Throttling",
                    "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed"}


@contextlib.contextmanager
def _transient(url: str) -> Iterator[None]:
    """An unreachable or overloaded object store is Unavailable (retry later), never a corrupt checkpoint:
    the scorer must not refuse a good version because S3 hiccuped."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except BotoCoreError as e:
        raise Unavailable(f"object store for {url} is unreachable ({type(e).__name__}: {e}); retry later") from None
    except ClientError as e:
        if _error_code(e) in _TRANSIENT_CODES:
            raise Unavailable(f"object store for {url} answered {_error_code(e)}; retry later") from None
        raise


class S3CheckpointStore(CheckpointStore):
    """Versioned checkpoints under ``s3://<bucket>/<prefix>/<name>/<version>/``."""

    def __init__(self, url: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
                 endpoint_url: str | None = None) -> None:
        self.bucket, self.prefix = split_s3_url(str(url))
        self.url = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.client = _client(endpoint_url)
        self.cache_root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.cache_root = self.cache_root / self.bucket / self.prefix
        self._check_bucket()

    def __repr__(self) -> str:
        return f"S3CheckpointStore({self.url!r})"

    def _check_bucket(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as e:
            code = _error_code(e)
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise InvalidArgument("checkpoint_url", f"bucket {self.bucket!r} of {self.url} does not exist; "
                                      "create it (aws s3 mb s3://" + self.bucket + ") or fix the URL") from None
            if code in ("403", "AccessDenied"):
                raise InvalidArgument("checkpoint_url", f"access to bucket {self.bucket!r} is denied; check "
                                      "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the pod's role") from None
            raise Unavailable(f"object store for {self.url} answered {code or e}") from None
        except BotoCoreError as e:
            raise Unavailable(f"cannot reach the object store for {self.url}: {e}; check AWS_ENDPOINT_URL_S3") from None

    # -- keys ------------------------------------------------------------------------------------

    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def ref(self, name: str, version: str) -> CheckpointRef:
        validate_name(name, "name")
        validate_name(version, "version")
        return CheckpointRef(name=name, version=version, uri=f"{self.url}/{name}/{version}",
                             path=self.cache_root / name / version)

    def _ref_of(self, ref_or_uri: CheckpointRef | str | os.PathLike) -> CheckpointRef:
        if isinstance(ref_or_uri, CheckpointRef):
            return ref_or_uri
        s = str(ref_or_uri)
        if not s.startswith(self.url + "/"):
            raise InvalidArgument("uri", f"{s!r} is not a checkpoint of {self.url}")
        name, _, version = s[len(self.url) + 1:].strip("/").partition("/")
        return self.ref(name, version)

    def _objects(self, prefix: str) -> dict[str, dict[str, Any]]:
        """Every object under ``prefix`` (a key ending in '/'): relative key -> {size, mtime}."""
        out: dict[str, dict[str, Any]] = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                out[obj["Key"][len(prefix):]] = {"size": int(obj["Size"]), "mtime": obj["LastModified"].timestamp()}
        return out

    def _versions(self, name: str) -> dict[str, dict[str, dict[str, Any]]]:
        """version -> its objects (relative key -> {size, mtime}), finished or not."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for rel, info in self._objects(self._key(validate_name(name, "name")) + "/").items():
            version, _, file = rel.partition("/")
            if file:
                out.setdefault(version, {})[file] = info
        return out

    def _get(self, key: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None

    def _delete_keys(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        for i in range(0, len(keys), _DELETE_BATCH):
            batch = [{"Key": k} for k in keys[i:i + _DELETE_BATCH]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    def _delete_version(self, name: str, version: str, files: Iterable[str]) -> None:
        """Manifest first, so no reader sees a finished version with objects missing."""
        files = set(files)
        if MANIFEST in files:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(name, version, MANIFEST))
        self._delete_keys(self._key(name, version, f) for f in sorted(files - {MANIFEST}))
        shutil.rmtree(self.cache_root / name / version, ignore_errors=True)

    # -- writing ---------------------------------------------------------------------------------

    def next_version(self, name: str) -> str:
        highest = 0
        for version in self._versions(name):
            if m := _NUMBERED_RE.match(version):
                highest = max(highest, int(m.group(1)))
        return f"v{highest + 1:06d}"

    def write(self, name: str, version: str, writer: Callable[[Path], None], metadata: Mapping[str, Any]) -> CheckpointRef:
        ref = self.ref(name, version)
        try:
            meta_text = json.dumps(dict(metadata), indent=2, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise InvalidArgument("metadata", f"must be JSON-serialisable with finite numbers ({e})") from None
        existing = self._objects(self._key(name, version) + "/")
        if MANIFEST in existing:
            raise CheckpointExistsError(f"checkpoint {name}/{version} already exists at {ref.uri}; "
                                        "pick a new version (next_version())")
        if existing:
            log.warning("removing the unfinished upload %s (%d objects) before rewriting it", ref.uri, len(existing))
            self._delete_version(name, version, existing)
        self.cache_root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f"{_TMP_PREFIX}{version}-", dir=self.cache_root) as tmp_s:
            tmp = Path(tmp_s)
            writer(tmp)
            if (tmp / MANIFEST).exists():
                raise InvalidArgument("writer", f"must not write {MANIFEST}; the store writes it last")
            (tmp / METADATA).write_text(meta_text, encoding="utf-8")
            files = {fp.relative_to(tmp).as_posix(): FileEntry(sha256=sha256_file(fp), size=fp.stat().st_size)
                     for fp in _walk_files(tmp)}
            uploaded: list[str] = []
            try:
                # Every object is written only if absent, so a second writer of this version (there should
                # be one writer per model) fails instead of overwriting the first one's files.
                for rel in sorted(files):
                    with open(tmp / rel, "rb") as fh:
                        self.client.put_object(Bucket=self.bucket, Key=self._key(name, version, rel), Body=fh,
                                               IfNoneMatch="*")
                    uploaded.append(rel)
                manifest = Manifest(name=name, version=version, created_at=time.time(), files=files)
                body = json.dumps(manifest.to_dict(), indent=2, sort_keys=True).encode()
                self.client.put_object(Bucket=self.bucket, Key=self._key(name, version, MANIFEST), Body=body,
                                       ContentType="application/json", IfNoneMatch="*")
            except Exception as e:
                # Leave nothing of ours half-uploaded (best effort; gc and discard_unfinished catch the rest).
                try:
                    self._delete_keys(self._key(name, version, rel) for rel in uploaded)
                except Exception:  # noqa: BLE001 - the original error is the one to report
                    log.warning("could not remove the partial upload of %s", ref.uri)
                if _error_code(e) in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                    raise CheckpointExistsError(f"checkpoint {name}/{version} is being written or was finished by "
                                                "another writer; pick a new version (next_version())") from None
                raise
        log.info("wrote checkpoint %s (%d files, %d bytes)", ref.uri, len(files), manifest.total_bytes)
        return ref

    # -- reading ---------------------------------------------------------------------------------

    def _remote_manifest(self, ref: CheckpointRef) -> tuple[Manifest, bytes]:
        body = self._get(self._key(ref.name, ref.version, MANIFEST))
        if body is None:
            raise CorruptCheckpointError(ref.uri, f"no {MANIFEST} (the write did not finish)")
        try:
            manifest = Manifest.from_dict(json.loads(body))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
            raise CorruptCheckpointError(ref.uri, f"{MANIFEST} is unreadable ({type(e).__name__}: {e})") from None
        if (manifest.name, manifest.version) != (ref.name, ref.version):
            raise CorruptCheckpointError(ref.uri, f"its manifest says {manifest.name}/{manifest.version}")
        return manifest, body

    def _check_objects(self, ref: CheckpointRef, manifest: Manifest) -> None:
        """The remote object list against the manifest: what is missing, extra or of the wrong size."""
        objects = self._objects(self._key(ref.name, ref.version) + "/")
        objects.pop(MANIFEST, None)
        if missing := sorted(set(manifest.files) - set(objects)):
            raise CorruptCheckpointError(ref.uri, f"missing file(s): {', '.join(missing[:5])}")
        if extra := sorted(set(objects) - set(manifest.files)):
            raise CorruptCheckpointError(ref.uri, f"file(s) not in the manifest: {', '.join(extra[:5])}")
        for rel, entry in sorted(manifest.files.items()):
            if objects[rel]["size"] != entry.size:
                raise CorruptCheckpointError(ref.uri, f"{rel} has {objects[rel]['size']} bytes, the manifest says {entry.size}")

    def _cached(self, ref: CheckpointRef, body: bytes, *, verify: bool) -> bool:
        try:
            if (ref.path / MANIFEST).read_bytes() != body:
                return False
            if verify:
                verify_dir(ref.path)
            return True
        except (OSError, CorruptCheckpointError):
            return False

    def _download(self, ref: CheckpointRef, manifest: Manifest, body: bytes, *, verify: bool) -> Path:
        parent = ref.path.parent
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{ref.version}-", dir=parent))
        try:
            for rel in sorted(manifest.files):
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                self.client.download_file(self.bucket, self._key(ref.name, ref.version, rel), str(tmp / rel))
            (tmp / MANIFEST).write_bytes(body)
            if verify:
                try:
                    verify_dir(tmp)
                except CorruptCheckpointError as e:
                    raise CorruptCheckpointError(ref.uri, e.reason) from None
            else:
                read_manifest(tmp)
            if ref.path.exists():  # a stale or broken copy: out of sight first, then gone
                trash = parent / f".trash-{ref.version}-{uuid.uuid4().hex[:8]}"
                try:
                    os.rename(ref.path, trash)
                    shutil.rmtree(trash, ignore_errors=True)
                except FileNotFoundError:
                    pass
            try:
                os.rename(tmp, ref.path)
            except OSError:  # another process on this host installed it first: use theirs if it is right
                if not self._cached(ref, body, verify=verify):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._prune_cache(ref)
        return ref.path

    def _prune_cache(self, keep: CheckpointRef) -> None:
        d = keep.path.parent
        try:
            cached = sorted((p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".") and p != keep.path),
                            key=lambda p: version_sort_key(p.name))
        except FileNotFoundError:
            return
        for old in cached[:max(0, len(cached) - (CACHED_VERSIONS_KEPT - 1))]:
            shutil.rmtree(old, ignore_errors=True)

    def verify(self, ref_or_path: CheckpointRef | str | os.PathLike) -> Manifest:
        """Check the remote objects against the manifest and re-hash a fresh download (left in the cache)."""
        ref = self._ref_of(ref_or_path)
        with _transient(self.url):
            manifest, body = self._remote_manifest(ref)
            self._check_objects(ref, manifest)
            self._download(ref, manifest, body, verify=True)
        return manifest

    def open(self, ref: CheckpointRef | str | os.PathLike, *, verify: bool = True) -> Path:
        """A local directory holding the version: the cached copy while it matches, else a fresh download."""
        ref = self._ref_of(ref)
        with _transient(self.url):
            manifest, body = self._remote_manifest(ref)
            if verify:
                self._check_objects(ref, manifest)
            if self._cached(ref, body, verify=verify):
                return ref.path
            return self._download(ref, manifest, body, verify=verify)

    def names(self) -> list[str]:
        prefix = self._key() + "/" if self.prefix else ""
        names = set()
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix, Delimiter="/"):
            for cp in page.get("CommonPrefixes", []):
                names.add(cp["Prefix"][len(prefix):].rstrip("/"))
        return sorted(n for n in names if n)

    def list(self, name: str) -> list[CheckpointRef]:
        refs = [self.ref(name, v) for v, files in self._versions(name).items()
                if MANIFEST in files and not v.startswith(".")]
        return sorted(refs, key=lambda r: version_sort_key(r.version))

    def get(self, name: str, version: str) -> CheckpointRef:
        ref = self.ref(name, version)
        if self._get(self._key(name, version, MANIFEST)) is None:
            raise NotFound(f"no finished checkpoint {name}/{version} in {self.url}", field="version")
        return ref

    def read_manifest(self, ref: CheckpointRef | str | os.PathLike) -> Manifest:
        return self._remote_manifest(self._ref_of(ref))[0]

    def read_metadata(self, ref: CheckpointRef | str | os.PathLike) -> dict[str, Any]:
        ref = self._ref_of(ref)
        self._remote_manifest(ref)
        body = self._get(self._key(ref.name, ref.version, METADATA))
        if body is None:
            raise CorruptCheckpointError(ref.uri, f"missing {METADATA}")
        try:
            return json.loads(body)
        except json.JSONDecodeError as e:
            raise CorruptCheckpointError(ref.uri, f"{METADATA} is not valid JSON ({e.msg})") from None

    # -- deleting --------------------------------------------------------------------------------

    def delete(self, name: str, version: str) -> None:
        ref = self.ref(name, version)
        files = self._objects(self._key(name, version) + "/")
        if not files:
            raise NotFound(f"no checkpoint {name}/{version} in {self.url}", field="version")
        self._delete_version(ref.name, ref.version, files)

    def gc(self, name: str, keep: int, protected: Iterable[str] = (), *, stale_after_s: float = 3600.0) -> list[str]:
        if keep < 1:
            raise InvalidArgument("keep", f"must be at least 1 (the newest version is always kept), got {keep}")
        protected = set(protected)
        versions = self._versions(name)
        finished = sorted((v for v, f in versions.items() if MANIFEST in f and not v.startswith(".")), key=version_sort_key)
        doomed = [v for v in finished[:-keep] if v not in protected] if len(finished) > keep else []
        for v in doomed:
            self._delete_version(name, v, versions[v])
            log.info("gc removed checkpoint %s/%s/%s", self.url, name, v)
        now = time.time()
        for v, files in versions.items():
            if v in finished or v in protected:
                continue
            if now - max(f["mtime"] for f in files.values()) >= stale_after_s:
                log.warning("gc removing the unfinished upload %s/%s/%s", self.url, name, v)
                self._delete_keys(self._key(name, v, f) for f in files)
        return doomed

    def discard_unfinished(self, name: str) -> list[str]:
        removed = []
        for v, files in self._versions(name).items():
            if MANIFEST in files:
                continue
            if v.startswith(_TMP_PREFIX) or _NUMBERED_RE.match(v):
                log.warning("removing the unfinished upload %s/%s/%s (left by a writer that stopped mid-write)",
                            self.url, name, v)
                self._delete_keys(self._key(name, v, f) for f in files)
                removed.append(v)
        return sorted(removed)


@functools.lru_cache(maxsize=16)
def store_for(url: str) -> S3CheckpointStore:
    """One store (and client) per store URL in a process: the scorer opens every swap through it."""
    return S3CheckpointStore(url)


def open_uri(uri: str, *, verify: bool = True) -> Path:
    """A local, verified directory for ``s3://bucket/<prefix>/<name>/<version>`` (no store root needed)."""
    bucket, key = split_s3_url(uri)
    parts = key.split("/")
    if len(parts) < 2:
        raise InvalidArgument("uri", f"{uri!r} does not name a checkpoint (s3://<bucket>/<prefix>/<name>/<version>)")
    root = f"s3://{bucket}/{'/'.join(parts[:-2])}".rstrip("/")
    return store_for(root).open(store_for(root).ref(parts[-2], parts[-1]), verify=verify)


def read_metadata_uri(uri: str) -> dict[str, Any]:
    bucket, key = split_s3_url(uri)
    parts = key.split("/")
    root = f"s3://{bucket}/{'/'.join(parts[:-2])}".rstrip("/")
    return store_for(root).read_metadata(store_for(root).ref(parts[-2], parts[-1]))


CheckpointStore.register_scheme("s3", S3CheckpointStore)
