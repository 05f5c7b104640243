"""``jbl store verify --repair``: rewrite damaged blobs from the versions' own source tarballs.

A damaged blob (missing, wrong size, bytes not matching its digest) is rewritten from the
tarball a version using it was installed from — only when that tarball can still be had *and*
its sha256 is the ``checksum`` recorded at install (so the bytes are the ones installed):
``versions.source`` is the tarball's path, a ``file://`` URL, or the http(s) download URL
its registry gave (downloaded by ``RegistryClient.fetch_tarball``: bounded by
``download.max_size``, abandoned by the stall rule, into an unnamed file that vanishes on
any failure). The tarball is read with the strict ``tarstream`` reader (nothing is
extracted); every regular file's body is cut into ``chunk_size`` chunks exactly as ingest
does, and a chunk whose sha256 names a damaged blob is encoded and written again, then its
row's codec/stored size updated. Anything else gets an honest "cannot repair" line.

Blob writes happen under the install lock (SHARED) like an install's, synced before the row
update, so a concurrent gc never sees a half-repaired blob. A blob file replaced by a link
(planted by someone who may write the store) is rewritten like any damaged blob: the new file
is renamed over the link, which is never followed (``BlobStore.write``). A local source tarball,
named by the index (which admins may write), is opened once without blocking, must be a
regular file, and is hashed and then read through that same open file. Single-threaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

from . import rows
from .blobs import BlobStore
from .errors import JblError
from .limits import Limits
from .regformat import RegistryEntry
from .registry import RegistryClient
from .store import Store
from .tarstream import REG, TarReader
from .verify import Problem

_REPAIRABLE = {"missing", "size", "corrupt"}


@dataclass
class RepairResult:
    lines: list[str] = field(default_factory=list)
    repaired: set[bytes] = field(default_factory=set)


@contextlib.contextmanager
def _tarball(store: Store, client: RegistryClient, spec: tuple[str, str], source: str,
             checksum: str) -> Iterator[BinaryIO]:
    """An open local copy of ``source`` whose sha256 is ``checksum``, rewound; raises
    JblError why not. An http(s) source is downloaded by ``client.fetch_tarball``, with the
    bounds every download has (``max_size``, the stall rule, the timeouts) into an unnamed
    file in ``blobs/tmp`` that vanishes when closed, whatever happens."""
    if not source or not checksum.startswith("sha256:"):
        raise JblError("no recorded source tarball and checksum")
    if source.startswith(("http://", "https://")):
        name, version = spec
        # size unknown (not recorded at install): bounded by download.max_size
        entry = RegistryEntry(name=name, version=version, description="",
                              download_url=source, checksum=checksum, size=None,
                              platforms=(), registry=source)
        with client.fetch_tarball(entry, store.blobs.tmp) as f:
            yield f
        return
    path = Path(unquote(urlsplit(source).path) if source.startswith("file:") else source)
    try:
        f = _open_regular(path)
    except OSError as e:
        raise JblError(f"source {source} is not readable ({e.strerror})") from None
    with f:
        h = hashlib.sha256()
        while block := f.read(1 << 20):
            h.update(block)
        if "sha256:" + h.hexdigest() != checksum:
            raise JblError(f"source {source} no longer has the installed checksum "
                           f"{checksum}")
        f.seek(0)
        yield f


def _open_regular(path: Path) -> BinaryIO:
    """``path`` opened for reading without blocking (a FIFO cannot hang us); only a regular
    file is accepted (not /dev/zero, a FIFO, a directory)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(0, "not a regular file")
    return os.fdopen(fd, "rb")


def _chunks(reader: TarReader, size: int, chunk_size: int, m: object) -> Iterator[bytes]:
    buf = bytearray()
    for piece in reader.body(m, chunk_size):  # type: ignore[arg-type]
        buf += piece
        while len(buf) >= chunk_size:
            yield bytes(buf[:chunk_size])
            del buf[:chunk_size]
    if buf or size == 0:
        yield bytes(buf)


def repair(store: Store, problems: list[Problem],
           client: RegistryClient | None = None) -> RepairResult:
    """Rewrite the repairable blobs among ``problems``. ``client`` downloads http(s)
    sources with the CLI's download settings (config ``download:``); default bounds
    without one."""
    if client is None:
        with RegistryClient(None) as own:
            return repair(store, problems, own)
    res = RepairResult()
    damaged = {p.blob_id for p in problems if p.kind in _REPAIRABLE and p.blob_id is not None}
    other = [p for p in problems if p.blob_id is None and p.kind not in ("orphan", "temp")]
    for p in other:
        res.lines.append(f"cannot repair {p.subject}: index damage is not repairable from "
                         "tarballs (remove and reinstall the versions named)")
    if not damaged:
        return res
    wanted = {bytes(d): bid for bid, d in store.db.query(
        f"SELECT id, digest FROM blobs WHERE id IN ({','.join('?' * len(damaged))})",
        tuple(damaged))}
    # versions using a damaged blob, with their sources
    users = store.db.query(
        "SELECT DISTINCT v.id, v.name, v.version, v.source, v.checksum FROM chunks c "
        "JOIN entries e ON e.content_id = c.content_id JOIN versions v ON v.id = e.version_id "
        f"WHERE c.blob_id IN ({','.join('?' * len(damaged))}) ORDER BY v.id", tuple(damaged))
    for _vid, name, version, source, checksum in users:
        if not (set(wanted) - res.repaired):
            break
        try:
            with _tarball(store, client, (name, version), source, checksum) as f:
                n = _rewrite_from(store, f, {d for d in wanted if d not in res.repaired})
        except JblError as e:
            res.lines.append(f"cannot repair {name}@{version}: {e.message}")
            continue
        res.repaired |= n
        if n:
            res.lines.append(f"repaired {len(n)} blobs of {name}@{version} from {source}")
    return res


def _rewrite_from(store: Store, f: BinaryIO, wanted: set[bytes]) -> set[bytes]:
    found: dict[bytes, tuple[int, int, int]] = {}
    with store.install_lock():
        reader = TarReader(f, Limits())
        for m in reader.members():
            if m.kind != REG:
                continue
            for chunk in _chunks(reader, m.size, store.chunk_size, m):
                d = hashlib.sha256(chunk).digest()
                if d in wanted and d not in found:
                    codec, stored = BlobStore.encode(chunk)
                    store.blobs.write(d, stored)
                    found[d] = (codec, len(stored), len(chunk))
        if found:
            store.blobs.sync()
            with store.db.write():
                rows.reencode_blobs(store.db, ((d, codec, stored_size)
                                               for d, (codec, stored_size, _size) in found.items()))
    return set(found)
