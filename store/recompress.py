"""The cold pass: recompressing old zstd blobs at ``COLD_LEVEL`` (``jbl store gc --recompress``).

Installs write zstd at the fast level (blobs.ZSTD_LEVEL, CPU-bound on two cores); once a blob
has been stored longer than ``min_age`` this pass rewrites it at blobs.COLD_LEVEL (about a
fifth smaller, and faster to decode), keeping its name (the digest of its DECODED bytes), its
row and every reference. Raw blobs stay raw (they were not worth compressing at all).

One batch at a time (at most BATCH_BLOBS blobs / BATCH_BYTES decoded bytes):

  1. encode   (no lock, no transaction; a thread per core: zstd releases the GIL)  read the
              file, decode it and check its sha256 against the name (a damaged blob is left
              for ``verify``), compress at COLD_LEVEL; if smaller, write it to ``blobs/tmp``.
  2. sync     ``syncfs``: every new file is on disk before any name points to it.
              -> crash point ``recompress.files-written``
  3. commit   (flock EXCLUSIVE, like a sweep, + one write transaction) write the journal
              ``STORE/recompress-pending`` (digest and new size per line, fsync'd); re-read
              each row (still the size and codec we read? gc may have deleted it, repair
              rewritten it) and the live leases; rename each new file over its blob and set
              ``stored_size``, ``codec = CODEC_ZSTD_COLD``; commit; drop the journal.
              -> crash point ``recompress.renamed`` (renamed, not committed)

Readers never see a torn file: a rename is atomic, so opening the name gives the old file or
the new one, whole, and an open fd keeps the old inode. What a reader must not have is a chunk
list read before the commit (its ``stored_size`` is the old one) used on the new file; the
mount reads chunk lists only while it holds a lease on the version, and jobs hold one too, so
a blob any version with a live lease references is skipped (the leases are read inside the
transaction, which a new lease waits for). It is picked up by a later pass.

A kill between the renames and the commit leaves files whose size is not their row's: the
journal names them, and the next pass or sweep (gc) finishes the commit (``finish_pending``:
a file of exactly the journal's size can only be the renamed one; its bytes were checked
before it was written). A kill anywhere else leaves a consistent store; ``blobs/tmp`` files
of an unfinished batch are swept by gc after its grace. The codec value makes the pass
resumable: settled blobs (rewritten, or not smaller at COLD_LEVEL) are never looked at again.

``max_time`` is checked between batches (a batch is a few seconds of CPU at COLD_LEVEL).
The flock is taken without blocking (retried until the deadline): a long install is never
waited for with the lock queued, and installs wait at most one batch's commit (renames and a
transaction: milliseconds).

Thread-safety: ``recompress`` owns its Store (one thread); the encoder threads touch blob
files and ``blobs/tmp`` only, never the index.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import zstandard

from . import rows, safepath
from .blobs import CODEC_ZSTD, CODEC_ZSTD_COLD, COLD_LEVEL, BlobStore
from .crashpoints import crashpoint
from .errors import IntegrityError, StoreBusy, UnsafeStorePath
from .store import Store

JOURNAL = "recompress-pending"
JOURNAL_MAX = 1 << 20  # BATCH_BLOBS lines of ~75 bytes; a bigger journal is not ours
BATCH_BLOBS = 256
BATCH_BYTES = 16 << 20  # decoded: ~3 s of one core at level 19 (2.6 MB/s measured)
LOCK_RETRY = 0.1  # seconds between non-blocking tries of the store lock


@dataclass
class RecompressResult:
    rewritten: int = 0      # blobs replaced by a smaller COLD_LEVEL frame
    settled: int = 0        # not smaller at COLD_LEVEL: marked, file unchanged
    in_use: int = 0         # skipped: a version with a live lease references them
    damaged: int = 0        # skipped: the file does not decode to its digest (see verify)
    saved_bytes: int = 0    # stored bytes freed
    remaining: int = 0      # candidates left when the pass stopped (0: all done)
    finished: int = 0       # rows an interrupted earlier pass had left (journal) completed
    busy: bool = False      # stopped because the store lock stayed taken until the deadline


@dataclass
class _Cand:
    id: int
    digest: bytes
    size: int
    stored: int


@dataclass
class _Done:
    cand: _Cand
    new_size: int | None  # None: settle only (not smaller, file unchanged)
    tmp: str | None       # the staged file in blobs/tmp


def _encode(blobs: BlobStore, c: _Cand, level: int) -> _Done | None:
    """Read, decode, check and recompress one blob; stage it if smaller. None if damaged."""
    try:
        data = blobs.read(c.digest, CODEC_ZSTD, c.size)
    except (IntegrityError, FileNotFoundError):
        return None
    if hashlib.sha256(data).digest() != c.digest:
        return None
    new = zstandard.ZstdCompressor(level=level).compress(data)
    if len(new) >= c.stored:
        return _Done(c, None, None)
    return _Done(c, len(new), blobs.stage(c.digest, new))


@contextmanager
def _store_lock(store: Store, deadline: float) -> Iterator[bool]:
    """The store lock EXCLUSIVE, tried without blocking until ``deadline``; yields whether
    it was had (False: the caller stops; never waits queued behind a long install)."""
    with ExitStack() as stack:
        while True:
            try:
                stack.enter_context(store.sweep_lock(blocking=False))
                break
            except StoreBusy:
                if time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(LOCK_RETRY)
        yield True


def _write_journal(store_dir: Path, done: list[_Done]) -> None:
    tmp = JOURNAL + ".tmp"
    with safepath.opened(safepath.open_store(store_dir)) as sfd:
        safepath.unlink(sfd, tmp)
        fd = safepath.open_file(sfd, tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w") as f:
            f.writelines(f"{d.cand.digest.hex()} {d.new_size}\n" for d in done)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, JOURNAL, src_dir_fd=sfd, dst_dir_fd=sfd)
        os.fsync(sfd)


def _read_journal(store_dir: Path) -> list[tuple[bytes, int]]:
    try:
        with safepath.opened(safepath.open_store(store_dir)) as sfd:
            text = safepath.read_small(sfd, JOURNAL, JOURNAL_MAX,
                                       shown=str(Path(store_dir) / JOURNAL))
    except (FileNotFoundError, UnsafeStorePath):
        return []  # none, or not ours (a link or FIFO an admin planted): nothing to finish
    out = []
    for line in text.decode("ascii", "replace").splitlines():
        hexd, _, size = line.partition(" ")
        try:
            out.append((bytes.fromhex(hexd), int(size)))
        except ValueError:
            continue  # a torn last line: the kill came before the journal was renamed in
    return out


def pending_sizes(store_dir: Path) -> dict[bytes, int]:
    """digest -> new stored size of each blob an interrupted pass renamed (for verify)."""
    return dict(_read_journal(store_dir))


def _drop_journal(store_dir: Path) -> None:
    with safepath.opened(safepath.open_store(store_dir)) as sfd:
        safepath.unlink(sfd, JOURNAL)


def finish_pending(store: Store) -> int:
    """Complete the rows of a pass killed between its renames and its commit. The caller
    holds the store lock EXCLUSIVE (gc's sweep, or a pass). Returns the rows updated."""
    pending = _read_journal(store.dir)
    n = 0
    if pending:
        def renamed(digest: bytes, size: int) -> bool:
            st = store.blobs.stat(digest)
            return st is not None and stat.S_ISREG(st.st_mode) and st.st_size == size

        with store.db.write():
            n = rows.reencode_blobs(store.db, [(d, CODEC_ZSTD_COLD, size)
                                               for d, size in pending if renamed(d, size)])
    _drop_journal(store.dir)
    return n


def _in_use(store: Store, ids: list[int]) -> set[int]:
    """Which of blob ``ids`` a version with a live lease references (inside the txn)."""
    live = sorted({vid for _lid, vid, _kind, _pid in store.live_leases()})
    if not live or not ids:
        return set()
    q = (f"SELECT DISTINCT c.blob_id FROM chunks c JOIN entries e ON e.content_id = "
         f"c.content_id WHERE c.blob_id IN ({','.join('?' * len(ids))}) "
         f"AND e.version_id IN ({','.join('?' * len(live))})")
    return {int(r[0]) for r in store.db.query(q, (*ids, *live))}


def _commit(store: Store, done: list[_Done], res: RecompressResult) -> list[str]:
    """Step 3 under the lock: rename and update the rows still as we read them. Returns the
    staged names that were not used (the caller removes them)."""
    unused: list[str] = []
    renames = [d for d in done if d.tmp is not None]
    if renames:
        _write_journal(store.dir, renames)
    try:
        _apply(store, done, res, unused)
    except BaseException:
        finish_pending(store)  # renamed files whose rows rolled back: their rows follow now
        raise
    _drop_journal(store.dir)
    return unused


def _apply(store: Store, done: list[_Done], res: RecompressResult, unused: list[str]) -> None:
    db, blobs = store.db, store.blobs
    settled: list[tuple[bytes, int, int]] = []  # (digest, codec, stored_size) for rows.py
    with db.write():
        busy = _in_use(store, [d.cand.id for d in done])
        for d in done:
            row = db.one("SELECT stored_size, codec FROM blobs WHERE id=? AND digest=?",
                         (d.cand.id, d.cand.digest))
            if row != (d.cand.stored, CODEC_ZSTD) or d.cand.id in busy:
                res.in_use += d.cand.id in busy
                if d.tmp is not None:
                    unused.append(d.tmp)
                continue
            if d.tmp is not None and d.new_size is not None:
                try:
                    blobs.replace(d.tmp, d.cand.digest)
                except FileNotFoundError:
                    unused.append(d.tmp)  # our staged file or the blob went (gc, --grace 0)
                    continue
                settled.append((d.cand.digest, CODEC_ZSTD_COLD, d.new_size))
                res.rewritten += 1
                res.saved_bytes += d.cand.stored - d.new_size
            else:
                settled.append((d.cand.digest, CODEC_ZSTD_COLD, d.cand.stored))
                res.settled += 1
        rows.reencode_blobs(db, settled)
        crashpoint("recompress.renamed")


def _next_batch(store: Store, after_id: int, cutoff: float) -> list[_Cand]:
    """The next candidates in id order after ``after_id``: at most BATCH_BLOBS blobs and
    BATCH_BYTES decoded (at least one). Paged, so a store of a million blobs is never
    listed in memory at once."""
    batch: list[_Cand] = []
    size = 0
    for i, d, n, s in store.db.iter(
            "SELECT id, digest, size, stored_size FROM blobs WHERE codec=? AND created_at<=? "
            "AND id>? ORDER BY id LIMIT ?", (CODEC_ZSTD, cutoff, after_id, BATCH_BLOBS)):
        if batch and size + int(n) > BATCH_BYTES:
            break
        batch.append(_Cand(int(i), bytes(d), int(n), int(s)))
        size += int(n)
    return batch


def pending(store: Store, min_age: float, now: float | None = None) -> tuple[int, int]:
    """(blobs, stored bytes) a pass would look at now (``--dry-run``)."""
    now = time.time() if now is None else now
    row = store.db.one("SELECT COUNT(*), COALESCE(SUM(stored_size), 0) FROM blobs WHERE "
                       "codec=? AND created_at<=?", (CODEC_ZSTD, now - min_age))
    return (int(row[0]), int(row[1])) if row else (0, 0)


def recompress(store: Store, *, min_age: float, max_time: float, level: int = COLD_LEVEL,
               threads: int | None = None, now: float | None = None) -> RecompressResult:
    """Rewrite zstd blobs older than ``min_age`` seconds at ``level``, for at most about
    ``max_time`` seconds (checked between batches); resumable (see the module docstring)."""
    deadline = time.monotonic() + max_time
    now = time.time() if now is None else now
    res = RecompressResult()
    with _store_lock(store, deadline) as got:
        if not got:
            res.busy = True
            return res
        res.finished = finish_pending(store)
    res.remaining = pending(store, min_age, now)[0]
    after_id = 0
    workers = threads or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="recompress") as pool:
        while time.monotonic() < deadline:
            batch = _next_batch(store, after_id, now - min_age)
            if not batch:
                break
            after_id = batch[-1].id
            done = [d for d in pool.map(lambda c: _encode(store.blobs, c, level), batch)
                    if d is not None]
            res.damaged += len(batch) - len(done)
            store.blobs.sync()
            crashpoint("recompress.files-written")
            with _store_lock(store, deadline) as got:
                unused = _commit(store, done, res) if got else [d.tmp for d in done if d.tmp]
            for name in unused:
                if name is not None:
                    store.blobs.unlink_tmp(name)
            if not got:
                res.busy = True
                break
            res.remaining -= len(batch)
    return res
