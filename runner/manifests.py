"""runtime.yml for ``jbl run``, parsed once per content and cached per user, so a job's
start-up does not import ``yaml`` (~12 ms, more than bubblewrap's whole run).

``load_manifest(runtime_dir)`` reads ``runtime.yml`` and looks its exact bytes up in
``<cache>/manifests/<crc32>-<length>.marshal``, a ``marshal`` record ``(bytes, document)``
written by an earlier job of the same user; on a miss it parses with ``yaml`` and stores the
document when it is plain data (``marshal`` refuses anything else, e.g. YAML timestamps in
free-form keys: those manifests are simply parsed every time).

What is trusted: only the cached *document*, and only when the record's bytes equal the file's
bytes and the record is a regular file owned by us in a directory owned by us and not
writable by others. The document is validated again (``manifest_from_doc``) on every use,
exactly as a freshly parsed one, so a cache entry can never make a manifest that
``parse_manifest`` would refuse. Any error on the cache path (no home, read-only, full disk)
falls back to parsing; the cache is an optimisation, never a source of failure.

The cache lives in ``$XDG_CACHE_HOME/jbl`` (else ``~/.cache/jbl``). Thread-safe: files are
written to a unique temporary name and renamed into place.
"""

from __future__ import annotations

import contextlib
import marshal
import os
import stat
import zlib
from pathlib import Path
from typing import Any

from jbl.store.errors import UsageError
from jbl.store.manifest import MANIFEST_NAME, Manifest, load_yaml, manifest_from_doc

MAX_CACHED = 1 << 20  # a runtime.yml larger than this is parsed every time
# In the file name: records of an older loader (v1 read `version: 1.10` as the float 1.1)
# are never looked at again.
CACHE_FORMAT = "v2"


def cache_dir() -> Path | None:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    if not base or not os.path.isabs(base):
        return None
    return Path(base) / "jbl" / "manifests"


def load_manifest(runtime_dir: Path) -> Manifest:
    """The validated manifest of ``runtime_dir`` (a UsageError if it has none)."""
    path = runtime_dir / MANIFEST_NAME
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UsageError(f"{runtime_dir}: not a runtime directory ({MANIFEST_NAME}: "
                         f"{e.strerror})") from None
    return parse_cached(data, source=str(path))


def parse_cached(data: bytes, *, source: str = MANIFEST_NAME) -> Manifest:
    d = cache_dir()
    entry = None if d is None or len(data) > MAX_CACHED else (
        d / f"{zlib.crc32(data):08x}-{len(data)}.{CACHE_FORMAT}.marshal")
    if entry is not None:
        doc = _read(entry, data)
        if doc is not None:
            return manifest_from_doc(doc, source=source)
    doc = load_yaml(data, source=source)
    manifest = manifest_from_doc(doc, source=source)  # only a valid manifest is cached
    if entry is not None:
        _write(entry, data, doc)
    return manifest


def _owned(st: os.stat_result) -> bool:
    return st.st_uid == os.geteuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _read(entry: Path, data: bytes) -> Any:
    try:
        fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) and _owned(st) and _owned(os.stat(entry.parent))):
            return None
        raw = os.read(fd, st.st_size + 1)
        cached, doc = marshal.loads(raw)
    except (OSError, ValueError, EOFError, TypeError):
        return None
    finally:
        os.close(fd)
    return doc if cached == data else None


def _write(entry: Path, data: bytes, doc: Any) -> None:
    try:
        raw = marshal.dumps((data, doc))
    except ValueError:  # not plain data: parse it every time
        return
    tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
    try:
        entry.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, raw)
        finally:
            os.close(fd)
        os.replace(tmp, entry)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
