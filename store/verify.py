"""``jbl store verify``: check the index against the blob files, and optionally the bytes.

Checks (each failure is one ``Problem``, one line naming the blob/content and the versions
that use it):

* every ``blobs`` row has its file, of exactly ``stored_size`` bytes, with a known codec;
* every chunk names an existing blob and content; every content is the concatenation of
  ``nchunks`` chunks numbered 0..n-1 whose decoded sizes sum to its size, all but the last
  exactly ``chunk_size``;
* every regular-file entry names an existing content of its size (or is a hardlink to an
  entry that does); every entry's version exists and its parent is a directory of the same
  version; every version's root entry exists and belongs to it;
* no orphan blob file (no row) or ``blobs/tmp`` file older than ``grace`` — younger ones may
  belong to a running install; files named by gc's unlink journal are a killed gc's leftovers
  that the next gc removes, not damage;
* ``data=True``: every blob file is read, decoded and re-hashed against its digest, on a
  thread pool (zstd and hashlib release the GIL, so this uses every core);
* nothing is a link: a blob file that is not a regular file, a shard or ``blobs/tmp`` that
  is not a directory (planted by someone who may write the store) is reported and never
  followed (files are reached only through ``BlobStore``, which opens nothing by path).

Unreferenced rows (a version removed, not yet swept) are garbage, not damage: gc sweeps them.

Thread-safety: ``verify`` uses its Store from the calling thread only; pool workers touch
files, never the index.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from . import safepath
from .blobs import CODECS, BlobStore
from .crashpoints import crashpoint
from .errors import IntegrityError, JblError, UnsafeStorePath
from .gc import read_journal
from .policy import DEFAULT_GRACE
from .recompress import pending_sizes
from .store import Store
from .units import format_duration

MAX_NAMED_VERSIONS = 5  # a blob shared by 200 versions: name a few, count the rest


@dataclass(frozen=True)
class Problem:
    kind: str  # 'missing' | 'size' | 'corrupt' | 'orphan' | 'temp' | 'reference' | 'content'
    #            | 'unsafe' (a shard or blobs/tmp that is a link or not a directory)
    subject: str  # "blob <hex>", "content <id>", "entry <id>", "version N@V", a path
    message: str
    versions: tuple[str, ...] = ()
    blob_id: int | None = None  # for --repair

    def line(self) -> str:
        used = f" (used by {', '.join(self.versions)})" if self.versions else ""
        return f"{self.subject}: {self.message}{used}"


@dataclass
class VerifyResult:
    problems: list[Problem] = field(default_factory=list)
    blobs: int = 0
    contents: int = 0
    entries: int = 0
    versions: int = 0
    bytes_hashed: int = 0
    young_orphans: int = 0  # orphans within the grace period (fine: an install may run)
    pending_unlinks: int = 0  # files a killed gc left for the next gc
    data: bool = False
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        what = (f"{self.versions} versions, {self.entries} entries, {self.contents} contents, "
                f"{self.blobs} blobs" + (" (data re-hashed)" if self.data else ""))
        if self.ok:
            extra = ""
            if self.young_orphans or self.pending_unlinks:
                extra = (f"; {self.young_orphans + self.pending_unlinks} leftover files "
                         "the next gc removes")
            return f"store OK: {what} checked in {format_duration(self.seconds)}{extra}"
        kinds: dict[str, int] = {}
        for p in self.problems:
            kinds[p.kind] = kinds.get(p.kind, 0) + 1
        detail = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
        return f"store verify found {len(self.problems)} problems ({detail}) in {what}"


class _Names:
    """Which versions use a blob/content: only asked for the (few) damaged ones."""

    def __init__(self, store: Store) -> None:
        self.db = store.db

    def _fmt(self, rows: list[tuple[Any, ...]]) -> tuple[str, ...]:
        names = sorted({f"{n}@{v}" + ("" if s == "installed" else f" [{s}]")
                        for n, v, s in rows})
        if len(names) > MAX_NAMED_VERSIONS:
            more = len(names) - MAX_NAMED_VERSIONS
            names = names[:MAX_NAMED_VERSIONS] + [f"{more} more"]
        return tuple(names)

    def of_blob(self, blob_id: int) -> tuple[str, ...]:
        return self._fmt(self.db.query(
            "SELECT DISTINCT v.name, v.version, v.state FROM chunks c "
            "JOIN entries e ON e.content_id = c.content_id JOIN versions v ON v.id = e.version_id "
            "WHERE c.blob_id=?", (blob_id,)))

    def of_content(self, content_id: int) -> tuple[str, ...]:
        return self._fmt(self.db.query(
            "SELECT DISTINCT v.name, v.version, v.state FROM entries e "
            "JOIN versions v ON v.id = e.version_id WHERE e.content_id=?", (content_id,)))

    def of_version(self, version_id: int) -> tuple[str, ...]:
        return self._fmt(self.db.query("SELECT name, version, state FROM versions WHERE id=?",
                                       (version_id,)))


def _check_blob_data(blobs: BlobStore, digest: bytes, codec: int, size: int) -> str | None:
    """None if the blob decodes to bytes hashing to ``digest``, else what is wrong."""
    try:
        data = blobs.read(digest, codec, size)
    except FileNotFoundError:
        return "missing (vanished while verifying)"
    except IntegrityError as e:
        return e.message.split(": ", 1)[-1]
    except JblError as e:  # e.g. its shard is a planted link
        return e.message
    except OSError as e:
        return f"unreadable ({e.strerror})"
    if hashlib.sha256(data).digest() != digest:
        return "content does not match its digest (bit rot or tampering)"
    return None


def _batched(it: Iterator[tuple[Any, ...]], n: int) -> Iterator[list[tuple[Any, ...]]]:
    batch: list[tuple[Any, ...]] = []
    for row in it:
        batch.append(row)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def verify(store: Store, *, data: bool = False, grace: float = DEFAULT_GRACE,
           workers: int | None = None, progress: Callable[[int], None] | None = None,
           now: float | None = None) -> VerifyResult:
    t0 = time.monotonic()
    now = time.time() if now is None else now
    db = store.db
    names = _Names(store)
    res = VerifyResult(data=data)
    add = res.problems.append
    res.versions = int(db.scalar("SELECT COUNT(*) FROM versions"))
    res.entries = int(db.scalar("SELECT COUNT(*) FROM entries"))
    res.contents = int(db.scalar("SELECT COUNT(*) FROM contents"))

    # The layout itself: a link where a directory belongs is never followed.
    for where, what in store.blobs.unsafe_items():
        add(Problem("unsafe", where, f"is {what}, not a directory (never followed; "
                    f"{safepath.FIX_HINT})"))
    present, known = _check_blob_files(store, names, res)
    _check_orphans(store, known, res, now, grace)
    _check_references(store, names, add)
    if data:
        _check_data(store, names, res, present, workers, progress)
    res.seconds = time.monotonic() - t0
    return res


# (id, digest, codec, size) of a blob whose file is there, to re-hash under --data
_Present = tuple[int, bytes, int, int]


def _check_blob_files(store: Store, names: _Names,
                      res: VerifyResult) -> tuple[list[_Present], set[bytes]]:
    """Blob rows <-> files: each row's file exists, is a regular file of its stored size.
    Returns the blobs to re-hash and every digest with a row."""
    add = res.problems.append
    present: list[_Present] = []
    known: set[bytes] = set()
    recompressing = pending_sizes(store.dir)
    for bid, digest, size, stored_size, codec in store.db.iter(
            "SELECT id, digest, size, stored_size, codec FROM blobs"):
        res.blobs += 1
        if res.blobs == 1:
            crashpoint("verify.first-blob")  # the index snapshot is taken: tests race it
        known.add(digest)
        subject = f"blob {digest.hex()}"
        if codec not in CODECS:
            add(Problem("corrupt", subject, f"unknown codec {codec}", names.of_blob(bid), bid))
            continue
        try:
            st = store.blobs.stat(digest)
        except UnsafeStorePath:
            st = None  # in a shard that is a link: reported above, never followed
        if st is None:
            add(Problem("missing", subject, "file missing", names.of_blob(bid), bid))
            continue
        if not stat.S_ISREG(st.st_mode):
            add(Problem("corrupt", subject, "is not a regular file but " +
                        store.blobs.describe(digest) + " (never followed)",
                        names.of_blob(bid), bid))
            continue
        if st.st_size != stored_size:
            why = ("an interrupted `gc --recompress`: `jbl store gc` completes it"
                   if recompressing.get(digest) == st.st_size else "truncated or overwritten")
            add(Problem("size", subject, f"file has {st.st_size} bytes, index says "
                        f"{stored_size} ({why})", names.of_blob(bid), bid))
            continue
        present.append((bid, digest, codec, size))
    _recheck_changed(store, res)
    return present, known


def _recheck_changed(store: Store, res: VerifyResult) -> None:
    """Drop 'missing'/'size' problems that were a change seen half: the loop above reads one
    snapshot of the index while a gc may unlink (after deleting the rows) and a cold pass
    rename (before its rows commit). Each is looked at again now, after that snapshot."""
    def still(p: Problem) -> bool:
        if p.kind not in ("missing", "size") or p.blob_id is None:
            return True
        row = store.db.one("SELECT digest, stored_size FROM blobs WHERE id=?", (p.blob_id,))
        if row is None:
            return False  # gone from the index since: gc removed it
        try:
            st = store.blobs.stat(bytes(row[0]))
        except UnsafeStorePath:
            return True
        return st is None or not stat.S_ISREG(st.st_mode) or st.st_size != row[1]
    res.problems[:] = [p for p in res.problems if still(p)]


def _check_orphans(store: Store, known: set[bytes], res: VerifyResult, now: float,
                   grace: float) -> None:
    """Blob files without a row and stale temp files (young ones may be a running install)."""
    add = res.problems.append
    pending = read_journal(store.dir)
    for digest, entry in store.blobs.scan():
        if digest in known:
            continue
        if digest in pending:
            res.pending_unlinks += 1
            continue
        try:
            est = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        age = now - est.st_mtime
        if not stat.S_ISREG(est.st_mode):
            add(Problem("orphan", f"blob {digest.hex()}", "not a regular file but " +
                        store.blobs.describe(digest) + ", without an index row (never "
                        "followed; run `jbl store gc`)"))
        elif age < grace:
            res.young_orphans += 1
        else:
            add(Problem("orphan", f"blob {digest.hex()}", f"file without an index row, "
                        f"{format_duration(age)} old (run `jbl store gc`)"))
    try:
        for name, st in store.blobs.iter_tmp():
            age = now - st.st_mtime
            if not stat.S_ISREG(st.st_mode) or age >= grace:
                add(Problem("temp", str(store.blobs.tmp_shown(name)),
                            f"stale temporary file, {format_duration(age)} old "
                            "(run `jbl store gc`)"))
            else:
                res.young_orphans += 1
    except UnsafeStorePath:
        pass  # blobs/tmp is a link: reported above with the other unsafe items


def _check_data(store: Store, names: _Names, res: VerifyResult, present: list[_Present],
                workers: int | None, progress: Callable[[int], None] | None) -> None:
    """``--data``: re-hash every present blob on a thread pool."""
    nworkers = workers or os.cpu_count() or 2
    with ThreadPoolExecutor(max_workers=nworkers, thread_name_prefix="verify") as pool:
        for batch in _batched(iter(present), 256):
            results = pool.map(lambda r: _check_blob_data(store.blobs, r[1], r[2], r[3]),
                               batch)
            for (bid, digest, _codec, size), err in zip(batch, results, strict=True):
                res.bytes_hashed += size
                if err is not None:
                    res.problems.append(Problem("corrupt", f"blob {digest.hex()}", err,
                                                names.of_blob(bid), bid))
                if progress is not None:
                    progress(size)


def _check_references(store: Store, names: _Names, add: Callable[[Problem], None]) -> None:
    db = store.db
    chunk_size = store.chunk_size
    for cid, seq, bid in db.iter(
            "SELECT c.content_id, c.seq, c.blob_id FROM chunks c "
            "LEFT JOIN blobs b ON b.id = c.blob_id WHERE b.id IS NULL"):
        add(Problem("reference", f"content {cid}", f"chunk {seq} names blob id {bid}, which "
                    "has no row", names.of_content(cid)))
    for cid, seq in db.iter(
            "SELECT c.content_id, c.seq FROM chunks c LEFT JOIN contents ct "
            "ON ct.id = c.content_id WHERE ct.id IS NULL"):
        add(Problem("reference", f"content {cid}", f"chunk {seq} belongs to no content row"))
    for cid, size, nchunks, count, total, top in db.iter(
            "SELECT ct.id, ct.size, ct.nchunks, COUNT(c.seq), COALESCE(SUM(b.size), 0), "
            "COALESCE(MAX(c.seq), -1) FROM contents ct "
            "LEFT JOIN chunks c ON c.content_id = ct.id LEFT JOIN blobs b ON b.id = c.blob_id "
            "GROUP BY ct.id HAVING COUNT(c.seq) != ct.nchunks "
            "OR COALESCE(SUM(b.size), 0) != ct.size OR COALESCE(MAX(c.seq), -1) != ct.nchunks - 1"):
        add(Problem("content", f"content {cid}", f"{count} chunks (0..{top}) of {total} bytes, "
                    f"index says {nchunks} chunks of {size} bytes", names.of_content(cid)))
    for cid, seq, digest, size in db.iter(
            "SELECT c.content_id, c.seq, b.digest, b.size FROM chunks c "
            "JOIN contents ct ON ct.id = c.content_id JOIN blobs b ON b.id = c.blob_id "
            "WHERE c.seq < ct.nchunks - 1 AND b.size != ?", (chunk_size,)):
        add(Problem("content", f"content {cid}", f"chunk {seq} (blob {digest.hex()}) has "
                    f"{size} bytes, not the chunk size {chunk_size}", names.of_content(cid)))
    reg = stat.S_IFREG
    for eid, vid in db.iter(
            "SELECT e.id, e.version_id FROM entries e WHERE e.kind=? AND e.content_id IS NULL "
            "AND (e.link_id IS NULL OR NOT EXISTS (SELECT 1 FROM entries l "
            "WHERE l.id = e.link_id AND l.content_id IS NOT NULL))", (reg,)):
        add(Problem("reference", f"entry {eid}", "regular file without content",
                    names.of_version(vid)))
    for eid, vid, cid, esize, csize in db.iter(
            "SELECT e.id, e.version_id, e.content_id, e.size, ct.size FROM entries e "
            "LEFT JOIN contents ct ON ct.id = e.content_id "
            "WHERE e.content_id IS NOT NULL AND (ct.id IS NULL OR ct.size != e.size)"):
        msg = (f"names content {cid}, which has no row" if csize is None
               else f"is {esize} bytes, its content {cid} is {csize}")
        add(Problem("reference", f"entry {eid}", msg, names.of_version(vid)))
    for (vid,) in db.iter("SELECT DISTINCT version_id FROM entries "
                          "WHERE version_id NOT IN (SELECT id FROM versions)"):
        add(Problem("reference", f"version id {vid}", "entries of a version with no row"))
    for eid, vid in db.iter(
            "SELECT e.id, e.version_id FROM entries e LEFT JOIN entries p ON p.id = e.parent_id "
            "WHERE e.parent_id IS NOT NULL AND (p.id IS NULL OR p.version_id != e.version_id "
            "OR p.kind != ?)", (stat.S_IFDIR,)):
        add(Problem("reference", f"entry {eid}", "parent is missing, not a directory, or of "
                    "another version", names.of_version(vid)))
    for name, version in db.iter(
            "SELECT v.name, v.version FROM versions v LEFT JOIN entries e "
            "ON e.id = v.root_id WHERE e.id IS NULL OR e.version_id != v.id"):
        add(Problem("reference", f"version {name}@{version}", "root entry missing"))
