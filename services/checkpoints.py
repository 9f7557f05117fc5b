"""The checkpoint store: crash-safe writes, checksummed reads, garbage collection.

The trainer writes a model every few hundred records while the scorer hot-swaps whatever the registry
points at, so a reader must never load a half-written directory.  The protocol (nanochat's "manifest
is written last"):

1. the caller's ``writer(tmpdir)`` fills a temporary directory inside the store (same filesystem);
2. ``metadata.json`` is added, every file is hashed (sha256) and fsynced;
3. the directory is renamed into place, ``<root>/<name>/<version>/``;
4. ``manifest.json`` (every file's size and sha256) is written last by atomic rename, then the
   directory is fsynced.

Readers trust only directories with a manifest whose checksums match (:meth:`CheckpointStore.verify`);
a crash at any step leaves a directory without a manifest, which listings ignore and ``gc`` removes.

Versions: any string of ``[A-Za-z0-9._-]`` works; :meth:`CheckpointStore.next_version` hands out
``v000001``, ``v000002``... and ordering sorts ``v<digits>`` numerically, others after them by name.

Stores are chosen by URL scheme: ``CheckpointStore("file:///ckpt")`` or a plain path is this module's
local store; ``s3://bucket/prefix`` is :mod:`services.checkpoints_s3` (the same protocol on objects, read
through a local cache).  A backend registers itself in ``_SCHEMES`` and implements the same methods.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Mapping
from urllib.parse import unquote, urlparse

from services.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
METADATA = "metadata.json"
MANIFEST_FORMAT = 1
#: Files a trainer writes into a checkpoint that record how it was trained, not what the model is
#: (metadata, optimizer moments, live weights, replay reservoir, evaluation records, the offline run's
#: summary).  They differ between every two checkpoints of a lineage; the scorer ignores them when it
#: decides whether a new version is the same model with other weights (scorer/runners.py).  The
#: trainer's own names for them are checked against this set in tests/unit/test_scorer_reload.py.
TRAINING_STATE_FILES = frozenset({METADATA, "optimizer.pt", "live_weights.safetensors", "replay.jsonl",
                                  "replay_counts.json", "eval_topic.jsonl", "prefstream_training.json"})
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_NUMBERED_RE = re.compile(r"^v(\d+)$")
_HASH_CHUNK = 1 << 20


class CorruptCheckpointError(FailedPrecondition):
    """A checkpoint directory fails verification: no manifest, a checksum mismatch, a missing or extra file."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(f"checkpoint {path} is corrupt: {reason}")
        self.path = Path(path)
        self.reason = reason


class CheckpointExistsError(AlreadyExists):
    """A complete checkpoint with this name and version is already in the store."""


@dataclass(frozen=True)
class CheckpointRef:
    """Where one checkpoint lives: ``uri`` is what the registry and ModelUpdate events carry."""

    name: str
    version: str
    uri: str
    path: Path


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    """The list of files (relative POSIX paths) of a checkpoint with their sizes and checksums."""

    name: str
    version: str
    created_at: float
    files: dict[str, FileEntry] = field(default_factory=dict)
    format: int = MANIFEST_FORMAT

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "name": self.name,
            "version": self.version,
            "created_at": self.created_at,
            "total_bytes": self.total_bytes,
            "files": {p: {"sha256": f.sha256, "size": f.size} for p, f in sorted(self.files.items())},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Manifest":
        files = d["files"]
        if not isinstance(files, Mapping):
            raise TypeError("files must be a mapping")
        return cls(
            name=str(d["name"]),
            version=str(d["version"]),
            created_at=float(d["created_at"]),
            files={str(p): FileEntry(sha256=str(f["sha256"]), size=int(f["size"])) for p, f in files.items()},
            format=int(d.get("format", MANIFEST_FORMAT)),
        )


def version_sort_key(version: str) -> tuple[int, int, str]:
    """``v<digits>`` versions sort numerically and before any other name; others sort by name."""
    m = _NUMBERED_RE.match(version)
    return (0, int(m.group(1)), version) if m else (1, 0, version)


def is_valid_name(value: str) -> bool:
    """Whether ``value`` can name a model or version (a folder of the checkpoint store)."""
    return isinstance(value, str) and bool(_NAME_RE.match(value)) and value not in (".", "..")


def validate_name(value: str, field_name: str) -> str:
    if not is_valid_name(value):
        raise InvalidArgument(field_name, f"{value!r} is not a valid {field_name}; use 1-128 characters of "
                              "letters, digits, '.', '_' or '-', starting with a letter or digit")
    return value


_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_WORDS = ("No space left on device", "Disk quota exceeded", f"os error {errno.ENOSPC}", f"os error {errno.EDQUOT}")


def is_store_full(exc: BaseException) -> bool:
    """Whether a write failed because the store's filesystem or quota is full: an OSError with ENOSPC or
    EDQUOT, or a library's error wrapping one (safetensors raises ``SafetensorError('... No space left
    on device (os error 28)')``, with no errno), anywhere in its cause chain."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _FULL_ERRNOS:
            return True
        if any(w in str(seen) for w in _FULL_WORDS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _walk_files(root: Path) -> Iterable[Path]:
    """Every regular file under root (sorted); symlinks are refused so a checkpoint is self-contained."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if p.is_symlink():
                raise CorruptCheckpointError(root, f"{p.relative_to(root).as_posix()} is a symlink; checkpoints "
                                             "must hold regular files only")
            yield p
        for d in dirnames:
            if (Path(dirpath) / d).is_symlink():
                raise CorruptCheckpointError(root, f"{(Path(dirpath) / d).relative_to(root).as_posix()} is a "
                                             "symlinked directory; checkpoints must hold regular files only")


def _write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` via a temporary file, fsync, os.replace and fsync of the directory."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def read_manifest(path: str | os.PathLike) -> Manifest:
    """The manifest of a checkpoint directory, or CorruptCheckpointError when absent or unreadable."""
    p = Path(path)
    mpath = p / MANIFEST
    if not mpath.is_file():
        raise CorruptCheckpointError(p, f"no {MANIFEST} (the write did not finish)")
    try:
        return Manifest.from_dict(json.loads(mpath.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise CorruptCheckpointError(p, f"{MANIFEST} is unreadable ({type(e).__name__}: {e})") from None


def verify_dir(path: str | os.PathLike) -> Manifest:
    """Re-hash every file of a checkpoint directory against its manifest.

    Raises CorruptCheckpointError naming the first problem: missing manifest, missing file, extra
    file, size or checksum mismatch.
    """
    p = Path(path)
    if not p.is_dir():
        raise CorruptCheckpointError(p, "the directory does not exist")
    manifest = read_manifest(p)
    actual = {f.relative_to(p).as_posix() for f in _walk_files(p)} - {MANIFEST}
    expected = set(manifest.files)
    if missing := sorted(expected - actual):
        raise CorruptCheckpointError(p, f"missing file(s): {', '.join(missing[:5])}")
    if extra := sorted(actual - expected):
        raise CorruptCheckpointError(p, f"file(s) not in the manifest: {', '.join(extra[:5])}")
    for rel, entry in sorted(manifest.files.items()):
        fp = p / rel
        size = fp.stat().st_size
        if size != entry.size:
            raise CorruptCheckpointError(p, f"{rel} has {size} bytes, the manifest says {entry.size}")
        if sha256_file(fp) != entry.sha256:
            raise CorruptCheckpointError(p, f"{rel} does not match its sha256 checksum")
    return manifest


def path_from_uri(uri: str) -> Path:
    """The local directory of a ``file://`` URI or plain path (what ModelUpdate.uri carries)."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(unquote(parsed.path) if parsed.scheme else uri).expanduser()
    raise InvalidArgument("uri", f"cannot open checkpoint URI scheme {parsed.scheme!r}; supported: file://, s3://")


def _is_object_store(uri: str) -> bool:
    return urlparse(str(uri)).scheme in _LAZY_SCHEMES


def open_checkpoint(uri: str, *, verify: bool = True) -> Path:
    """A verified local directory for a checkpoint URI, without knowing the store root (scorer side);
    an object-store checkpoint is downloaded into the local cache first."""
    if _is_object_store(uri):
        from services.checkpoints_s3 import open_uri

        return open_uri(uri, verify=verify)
    path = path_from_uri(uri)
    if verify:
        verify_dir(path)
    elif not (path / MANIFEST).is_file():
        raise CorruptCheckpointError(path, f"no {MANIFEST} (the write did not finish)")
    return path


def read_checkpoint_metadata(uri: str) -> dict[str, Any]:
    """``metadata.json`` of a finished checkpoint, by URI, without downloading its files."""
    if _is_object_store(uri):
        from services.checkpoints_s3 import read_metadata_uri

        return read_metadata_uri(uri)
    return _read_metadata_dir(path_from_uri(uri))


def _read_metadata_dir(path: Path) -> dict[str, Any]:
    read_manifest(path)
    try:
        return json.loads((path / METADATA).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CorruptCheckpointError(path, f"missing {METADATA}") from None
    except json.JSONDecodeError as e:
        raise CorruptCheckpointError(path, f"{METADATA} is not valid JSON ({e.msg})") from None


# Backends in modules of their own, imported on first use (their client libraries are heavy).
_LAZY_SCHEMES = {"s3": "services.checkpoints_s3"}


class CheckpointStore:
    """Versioned checkpoints under a URL; ``CheckpointStore(url)`` returns the backend for its scheme."""

    _SCHEMES: ClassVar[dict[str, type["CheckpointStore"]]] = {}

    def __new__(cls, url: str | os.PathLike, **_backend_options: Any) -> "CheckpointStore":
        if cls is not CheckpointStore:
            return super().__new__(cls)
        scheme = urlparse(str(url)).scheme
        if len(scheme) == 1:  # a Windows drive letter, not a scheme
            scheme = ""
        if scheme in _LAZY_SCHEMES and scheme not in cls._SCHEMES:
            import importlib

            importlib.import_module(_LAZY_SCHEMES[scheme])
        backend = cls._SCHEMES.get(scheme)
        if backend is None:
            raise InvalidArgument("checkpoint_url", f"unsupported checkpoint store scheme {scheme!r} in {url!r}; "
                                  f"supported: a local path or {', '.join(s + '://' for s in sorted({*cls._SCHEMES, *_LAZY_SCHEMES}) if s)}")
        return super().__new__(backend)

    @classmethod
    def register_scheme(cls, scheme: str, backend: type["CheckpointStore"]) -> None:
        cls._SCHEMES[scheme] = backend

    # The interface every backend implements (see LocalCheckpointStore for the semantics).
    def next_version(self, name: str) -> str:
        """A version string no checkpoint of ``name`` has taken yet (finished or not), sorting after them."""
        raise NotImplementedError

    def write(self, name: str, version: str, writer: Callable[[Path], None], metadata: Mapping[str, Any]) -> CheckpointRef:
        raise NotImplementedError

    def verify(self, ref_or_path: CheckpointRef | str | os.PathLike) -> Manifest:
        raise NotImplementedError

    def list(self, name: str) -> list[CheckpointRef]:
        raise NotImplementedError

    def latest(self, name: str, *, verify: bool = False) -> CheckpointRef | None:
        """The highest finished version; with ``verify``, the highest one whose checksums also match
        (written once here, from ``list`` and ``verify``)."""
        for ref in reversed(self.list(name)):
            if not verify:
                return ref
            try:
                self.verify(ref)
                return ref
            except CorruptCheckpointError as e:
                log.error("skipping corrupt checkpoint: %s", e)
        return None

    def get(self, name: str, version: str) -> CheckpointRef:
        raise NotImplementedError

    def read_metadata(self, ref: CheckpointRef) -> dict[str, Any]:
        raise NotImplementedError

    def read_manifest(self, ref: CheckpointRef) -> Manifest:
        raise NotImplementedError

    def open(self, ref: CheckpointRef, *, verify: bool = True) -> Path:
        raise NotImplementedError

    def gc(self, name: str, keep: int, protected: Iterable[str] = ()) -> list[str]:
        raise NotImplementedError

    def discard_unfinished(self, name: str) -> list[str]:
        """Remove every unfinished write of ``name`` (a crashed writer's leftovers); only its one
        writer may call this, at start-up, before writing.  Returns what was removed."""
        raise NotImplementedError


class LocalCheckpointStore(CheckpointStore):
    """Checkpoints in a local (or network-mounted) directory: ``<root>/<name>/<version>/``."""

    def __init__(self, url: str | os.PathLike) -> None:
        self.root = path_from_uri(str(url)).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = self.root.as_uri()

    def __repr__(self) -> str:
        return f"LocalCheckpointStore({str(self.root)!r})"

    def ref(self, name: str, version: str) -> CheckpointRef:
        path = self.root / validate_name(name, "name") / validate_name(version, "version")
        return CheckpointRef(name=name, version=version, uri=path.as_uri(), path=path)

    def _path(self, ref_or_path: CheckpointRef | str | os.PathLike) -> Path:
        if isinstance(ref_or_path, CheckpointRef):
            return ref_or_path.path
        s = str(ref_or_path)
        return path_from_uri(s) if s.startswith("file://") else Path(s)

    # -- writing ---------------------------------------------------------------------------------

    def next_version(self, name: str) -> str:
        """``v%06d`` one above the highest numbered version present (finished or not)."""
        d = self.root / validate_name(name, "name")
        highest = 0
        if d.is_dir():
            for child in d.iterdir():
                m = _NUMBERED_RE.match(child.name)
                if m:
                    highest = max(highest, int(m.group(1)))
        return f"v{highest + 1:06d}"

    def write(self, name: str, version: str, writer: Callable[[Path], None], metadata: Mapping[str, Any]) -> CheckpointRef:
        """Write a checkpoint atomically; returns its ref once the manifest is durable.

        ``writer(tmpdir)`` writes the model files (save_pretrained...) into a fresh directory.
        ``metadata`` (JSON-serialisable: step, records seen, Kafka offsets, eval metrics, base model,
        loss config...) is stored as ``metadata.json``.  The caller must not write ``manifest.json``.
        """
        ref = self.ref(name, version)
        try:
            meta_text = json.dumps(dict(metadata), indent=2, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise InvalidArgument("metadata", f"must be JSON-serialisable with finite numbers ({e})") from None
        parent = ref.path.parent
        parent.mkdir(parents=True, exist_ok=True)
        if ref.path.exists():
            if (ref.path / MANIFEST).exists():
                raise CheckpointExistsError(f"checkpoint {name}/{version} already exists at {ref.path}; "
                                            "pick a new version (next_version())")
            log.warning("removing unfinished checkpoint directory %s before rewriting it", ref.path)
            self._remove(ref.path)

        tmp = parent / f"{_TMP_PREFIX}{version}-{uuid.uuid4().hex[:12]}"
        tmp.mkdir()
        try:
            writer(tmp)
            if (tmp / MANIFEST).exists():
                raise InvalidArgument("writer", f"must not write {MANIFEST}; the store writes it last")
            (tmp / METADATA).write_text(meta_text, encoding="utf-8")
            files: dict[str, FileEntry] = {}
            for fp in _walk_files(tmp):
                with open(fp, "rb") as f:
                    os.fsync(f.fileno())
                files[fp.relative_to(tmp).as_posix()] = FileEntry(sha256=sha256_file(fp), size=fp.stat().st_size)
            for dirpath, _, _ in os.walk(tmp):
                _fsync_path(Path(dirpath))
            try:
                os.rename(tmp, ref.path)
            except OSError as e:  # a concurrent writer won the race for this version
                raise CheckpointExistsError(f"checkpoint {name}/{version} appeared while writing ({e.strerror}); "
                                            "pick a new version") from None
            _fsync_path(parent)
        except BaseException:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        manifest = Manifest(name=name, version=version, created_at=time.time(), files=files)
        _write_json_atomic(ref.path / MANIFEST, manifest.to_dict())
        log.info("wrote checkpoint %s/%s (%d files, %d bytes)", name, version, len(files), manifest.total_bytes)
        return ref

    # -- reading ---------------------------------------------------------------------------------

    def verify(self, ref_or_path: CheckpointRef | str | os.PathLike) -> Manifest:
        """Re-hash every file against the manifest; CorruptCheckpointError names what is wrong."""
        return verify_dir(self._path(ref_or_path))

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _NAME_RE.match(p.name))

    def list(self, name: str) -> list[CheckpointRef]:
        """Finished checkpoints of ``name`` (manifest present and readable), oldest first."""
        d = self.root / validate_name(name, "name")
        if not d.is_dir():
            return []
        out = []
        for child in d.iterdir():
            if not child.is_dir() or not _NAME_RE.match(child.name):
                continue
            try:
                m = read_manifest(child)
            except CorruptCheckpointError:
                continue  # unfinished: ignored until gc removes it
            if (m.name, m.version) != (name, child.name):
                log.warning("ignoring %s: its manifest says %s/%s", child, m.name, m.version)
                continue
            out.append(self.ref(name, child.name))
        return sorted(out, key=lambda r: version_sort_key(r.version))

    def get(self, name: str, version: str) -> CheckpointRef:
        """The ref of a finished checkpoint, or NotFound."""
        ref = self.ref(name, version)
        if not (ref.path / MANIFEST).is_file():
            raise NotFound(f"no finished checkpoint {name}/{version} in {self.root}", field="version")
        return ref

    def read_metadata(self, ref: CheckpointRef | str | os.PathLike) -> dict[str, Any]:
        return _read_metadata_dir(self._path(ref))

    def read_manifest(self, ref: CheckpointRef | str | os.PathLike) -> Manifest:
        return read_manifest(self._path(ref))

    def open(self, ref: CheckpointRef | str | os.PathLike, *, verify: bool = True) -> Path:
        """The local directory to load from, verified first unless ``verify=False``."""
        path = self._path(ref)
        if verify:
            verify_dir(path)
        else:
            read_manifest(path)
        return path

    # -- deleting --------------------------------------------------------------------------------

    def _remove(self, path: Path) -> None:
        """Rename out of sight first (listings never see half-deleted dirs), then delete."""
        trash = path.parent / f"{_TRASH_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}"
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def delete(self, name: str, version: str) -> None:
        ref = self.ref(name, version)
        if not ref.path.exists():
            raise NotFound(f"no checkpoint {name}/{version} in {self.root}", field="version")
        self._remove(ref.path)

    def gc(self, name: str, keep: int, protected: Iterable[str] = (), *, stale_after_s: float = 3600.0) -> list[str]:
        """Delete all but the newest ``keep`` finished versions, never one in ``protected``.

        Also removes unfinished directories (no manifest, temp, trash) older than ``stale_after_s``
        so a crash's leftovers do not pile up; younger ones may belong to a write in progress.
        Returns the finished versions deleted.
        """
        if keep < 1:
            raise InvalidArgument("keep", f"must be at least 1 (the newest version is always kept), got {keep}")
        protected = set(protected)
        finished = self.list(name)
        doomed = [r for r in finished[:-keep] if r.version not in protected] if len(finished) > keep else []
        for ref in doomed:
            self._remove(ref.path)
            log.info("gc removed checkpoint %s/%s", name, ref.version)
        d = self.root / name
        if d.is_dir():
            finished_names = {r.version for r in finished}
            now = time.time()
            for child in d.iterdir():
                if child.name in finished_names or not child.is_dir() or child.name in protected:
                    continue
                try:
                    age = now - child.stat().st_mtime
                except FileNotFoundError:
                    continue
                if age >= stale_after_s:
                    log.warning("gc removing unfinished checkpoint directory %s", child)
                    shutil.rmtree(child, ignore_errors=True)
        return [r.version for r in doomed]

    def discard_unfinished(self, name: str) -> list[str]:
        d = self.root / name
        if not d.is_dir():
            return []
        removed = []
        for child in d.iterdir():
            if child.is_dir() and (child.name.startswith(_TMP_PREFIX) or
                                   (_NUMBERED_RE.match(child.name) and not (child / MANIFEST).exists())):
                log.warning("removing the unfinished checkpoint write %s (left by a writer that stopped mid-write)", child)
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child.name)
        return sorted(removed)


CheckpointStore.register_scheme("", LocalCheckpointStore)
CheckpointStore.register_scheme("file", LocalCheckpointStore)
