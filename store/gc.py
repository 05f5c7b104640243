"""Garbage collection: removing versions (``rm``, retention policies) and sweeping blobs.

Roots: every version row (installed, or 'removed' but still held by a live lease). Pins and
leases only matter to *selection* (policy.py): a pinned or leased version is never chosen.
Nothing counts references; each sweep marks from the roots again (schema.py).

Phases of a sweep, and the lock each holds (docs/gc.md has the full story):

  1. purge     (index write txn, no flock)  'removed' versions no live lease holds lose their
               entries + version row. Installs never dedup against entries, so no flock.
  2. mark      (read only, no flock)        candidate contents/blobs nothing references;
               orphan files (no row) and stale ``blobs/tmp`` files older than ``grace``.
               -> crash point ``gc.after-mark``
  3. delete    (flock EXCLUSIVE + one write txn) re-check every candidate inside the
               transaction (an install may have committed a reference since the mark),
               delete chunk/content/blob rows, write the unlink journal, commit.
               -> crash point ``gc.rows-deleted``
  4. unlink    (still EXCLUSIVE) unlink the files, journal last.  -> ``gc.mid-unlink``

Holding the flock EXCLUSIVE through 3-4 means no install is between its first blob write and
its commit (installs hold it SHARED for exactly that span), so a file we unlink cannot be one an
install just wrote, and a row we delete cannot be one it just deduplicated against.

The unlink journal (``STORE/gc-pending``: hex digests, fsync'd before the rows commit) makes a
gc killed between commit and unlink harmless: ``verify`` does not count the files it names as
orphans, and the next sweep unlinks those that still have no row, whatever their age.

Links: gc runs as root (the daily timer) over a store admin-group members can write. It
reaches blob files only through ``BlobStore`` and the journal only through store/safepath.py,
so nothing is followed: a shard or ``blobs/tmp`` replaced by a link is skipped with a warning
(``jbl store verify`` reports it, ``jbl setup --system`` replaces it), and a planted link
itself is removed like any orphan, never what it points to.

Thread-safety: functions take a ``Store`` and follow its rule (one thread at a time); the
unlink step fans out to a private thread pool that touches blob files only, never the index.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from . import safepath
from .blobs import BlobStore
from .crashpoints import crashpoint
from .errors import StoreBusy, UnsafeStorePath
from .policy import DEFAULT_GRACE, Policy, Selected, select
from .recompress import finish_pending
from .rows import drop_version_rows, mark_removed
from .store import Store, VersionInfo, pid_alive

JOURNAL = "gc-pending"
JOURNAL_MAX = 64 << 20  # 1e6 digests; a bigger journal is not ours and is ignored
UNLINK_THREADS = 16

log = logging.getLogger("jbl.gc")


@dataclass
class RemoveResult:
    removed: list[str]  # NAME@VERSION whose rows are gone
    deferred: list[str]  # held by a live lease: marked 'removed', gc frees them later
    freed_bytes: int
    swept: bool = True  # False: another process held the store lock; the next gc sweeps


@dataclass
class SweepResult:
    purged: list[str] = field(default_factory=list)  # 'removed' versions dropped now
    contents: int = 0
    blobs: int = 0
    orphans: int = 0  # blob files without a row, older than grace
    temp_files: int = 0  # stale blobs/tmp/* files
    freed_bytes: int = 0


@dataclass
class GcResult:
    policy: str
    dry_run: bool
    selected: list[Selected]
    removed: list[str]
    deferred: list[str]
    sweep: SweepResult
    in_use: list[str] = field(default_factory=list)  # the policy would take these, but a
    # live job or mount holds them: kept now, a later gc takes them once they are released

    @property
    def freed_bytes(self) -> int:
        return self.sweep.freed_bytes


# --- leases -------------------------------------------------------------------------------
def drop_dead_leases(store: Store) -> int:
    """Delete leases whose holder process is gone (killed jobs, crashed mounts)."""
    with store.db.write():
        dead = [(lid,) for lid, pid, start in store.db.query(
            "SELECT id, pid, pid_start FROM leases") if not pid_alive(pid, start)]
        store.db.executemany("DELETE FROM leases WHERE id=?", dead)
    return len(dead)


def leased_versions(store: Store) -> set[int]:
    return {vid for _lid, vid, _kind, _pid in store.live_leases()}


# --- removal ------------------------------------------------------------------------------
def _remove(store: Store, infos: list[VersionInfo]) -> tuple[list[str], list[str]]:
    """Drop the rows of unleased versions; mark leased ones 'removed'. (removed, deferred)"""
    removed: list[str] = []
    deferred: list[str] = []
    now = time.time()
    with store.db.write():
        # Leases are re-read inside the write transaction: a lease committed before this is
        # seen; a job leasing after it finds the version row gone (or 'removed').
        live = leased_versions(store)
        for info in infos:
            if info.id in live:
                mark_removed(store.db, info.id, now)
                deferred.append(info.spec)
            else:
                drop_version_rows(store.db, info.id)
                removed.append(info.spec)
    crashpoint("rm.rows-deleted")
    return removed, deferred


def remove_versions(store: Store, infos: list[VersionInfo], *, wait: bool = False,
                    grace: float = DEFAULT_GRACE) -> RemoveResult:
    """Remove versions: rows of unleased ones now, leased ones marked 'removed' (deferred).

    Then sweeps what they alone referenced. ``wait=False`` (``jbl store rm``): if an install
    holds the store lock, the sweep is left to the next gc (``swept=False``) rather than
    waiting for the install to finish.
    """
    removed, deferred = _remove(store, infos)
    try:
        res = sweep(store, grace=grace, wait=wait)
    except StoreBusy:
        return RemoveResult(removed, deferred, 0, swept=False)
    return RemoveResult(removed, deferred, res.freed_bytes)


def purge_removed(store: Store) -> list[str]:
    """Drop 'removed' versions that no live lease holds any more."""
    with store.db.write():
        live = leased_versions(store)
        gone = [(vid, f"{n}@{v}") for vid, n, v in store.db.query(
            "SELECT id, name, version FROM versions WHERE state='removed'") if vid not in live]
        for vid, _spec in gone:
            drop_version_rows(store.db, vid)
    return [spec for _vid, spec in gone]


# --- mark ---------------------------------------------------------------------------------
_TEMP = """
CREATE TEMP TABLE IF NOT EXISTS gc_doomed(id INTEGER PRIMARY KEY);
CREATE TEMP TABLE IF NOT EXISTS gc_contents(id INTEGER PRIMARY KEY);
CREATE TEMP TABLE IF NOT EXISTS gc_blobs(id INTEGER PRIMARY KEY);
DELETE FROM temp.gc_doomed; DELETE FROM temp.gc_contents; DELETE FROM temp.gc_blobs;
"""


@dataclass
class _Orphan:
    name: str  # the blobs/tmp file's name (digest None), for a message otherwise
    digest: bytes | None  # None for a blobs/tmp file
    size: int


def _mark(store: Store, doomed: Iterable[int] = ()) -> None:
    """Fill temp.gc_contents/gc_blobs with what nothing outside ``doomed`` references."""
    db = store.db
    db.execute(_TEMP)
    db.executemany("INSERT INTO temp.gc_doomed(id) VALUES (?)", [(d,) for d in doomed])
    db.execute("INSERT INTO temp.gc_contents(id) SELECT ct.id FROM contents ct WHERE NOT EXISTS "
               "(SELECT 1 FROM entries e WHERE e.content_id = ct.id "
               " AND e.version_id NOT IN (SELECT id FROM temp.gc_doomed))")
    db.execute("INSERT INTO temp.gc_blobs(id) SELECT b.id FROM blobs b WHERE NOT EXISTS "
               "(SELECT 1 FROM chunks c WHERE c.blob_id = b.id "
               " AND c.content_id NOT IN (SELECT id FROM temp.gc_contents))")


def _orphans(store: Store, grace: float, now: float) -> list[_Orphan]:
    """Blob files with no row and blobs/tmp files, older than ``grace`` (mtime). A planted
    link counts as a file: removing it (unlinkat) never touches what it points to."""
    known = {d for (d,) in store.db.iter("SELECT digest FROM blobs")}
    out: list[_Orphan] = []
    for digest, entry in store.blobs.scan():
        if digest in known:
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if not stat.S_ISDIR(st.st_mode) and now - st.st_mtime >= grace:
            out.append(_Orphan(entry.name, digest, st.st_size))
    try:
        for name, st in store.blobs.iter_tmp():
            if not stat.S_ISDIR(st.st_mode) and now - st.st_mtime >= grace:
                out.append(_Orphan(name, None, st.st_size))
    except UnsafeStorePath as e:
        log.warning("not sweeping %s", e)
    return out


def _warn_unsafe(blobs: BlobStore) -> None:
    for where, what in blobs.unsafe_items():
        log.warning("skipped %s: it is %s, not a directory (never followed; as root, "
                    "`jbl setup --system` replaces it)", where, what)


def read_journal(store_dir: Path) -> set[bytes]:
    """The digests of gc's unlink journal (empty if there is none, or it is not ours)."""
    try:
        with safepath.opened(safepath.open_store(store_dir)) as sfd:
            text = safepath.read_small(sfd, JOURNAL, JOURNAL_MAX,
                                       shown=str(Path(store_dir) / JOURNAL)).decode("ascii",
                                                                                   "replace")
    except FileNotFoundError:
        return set()
    except UnsafeStorePath as e:
        log.warning("ignoring the gc journal: %s", e)
        return set()
    out = set()
    for line in text.split():
        try:
            out.add(bytes.fromhex(line))
        except ValueError:
            continue  # a torn last line from a crash while writing: harmless
    return out


def _write_journal(store_dir: Path, digests: Iterable[bytes]) -> None:
    """Write the journal through the store's fd: a new file (O_EXCL|O_NOFOLLOW: whatever an
    admin left under the temp name is removed first, never written through), renamed over."""
    tmp = JOURNAL + ".tmp"
    with safepath.opened(safepath.open_store(store_dir)) as sfd:
        safepath.unlink(sfd, tmp)
        fd = safepath.open_file(sfd, tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w") as f:
            f.writelines(d.hex() + "\n" for d in digests)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, JOURNAL, src_dir_fd=sfd, dst_dir_fd=sfd)


def _drop_journal(store_dir: Path) -> None:
    with safepath.opened(safepath.open_store(store_dir)) as sfd:
        safepath.unlink(sfd, JOURNAL)


# --- sweep --------------------------------------------------------------------------------
def sweep(store: Store, *, grace: float = DEFAULT_GRACE, wait: bool = True,
          now: float | None = None) -> SweepResult:
    """Delete every unreferenced content/blob (rows, then files) and old orphan files."""
    now = time.time() if now is None else now
    res = SweepResult(purged=purge_removed(store))
    _warn_unsafe(store.blobs)
    _mark(store)
    orphans = _orphans(store, grace, now)
    crashpoint("gc.after-mark")
    db = store.db
    with store.sweep_lock(blocking=wait):
        finish_pending(store)  # an interrupted `gc --recompress` (its rows follow its files)
        pending = read_journal(store.dir)
        with db.write():
            # Re-check inside the transaction, under the lock: an install may have committed
            # references to a candidate (file-level or chunk-level dedup) since the mark.
            db.execute("DELETE FROM temp.gc_contents WHERE id IN (SELECT content_id FROM "
                       "entries WHERE content_id IS NOT NULL AND content_id IN "
                       "(SELECT id FROM temp.gc_contents))")
            db.execute("DELETE FROM temp.gc_blobs WHERE id IN (SELECT c.blob_id FROM chunks c "
                       "WHERE c.blob_id IN (SELECT id FROM temp.gc_blobs) "
                       "AND c.content_id NOT IN (SELECT id FROM temp.gc_contents))")
            doomed = db.query("SELECT b.digest, b.stored_size FROM blobs b "
                              "JOIN temp.gc_blobs g ON g.id = b.id")
            res.contents = int(db.scalar("SELECT COUNT(*) FROM temp.gc_contents"))
            res.blobs = len(doomed)
            db.execute("DELETE FROM chunks WHERE content_id IN (SELECT id FROM temp.gc_contents)")
            db.execute("DELETE FROM contents WHERE id IN (SELECT id FROM temp.gc_contents)")
            db.execute("DELETE FROM blobs WHERE id IN (SELECT id FROM temp.gc_blobs)")
            # An orphan found at mark time may have been re-written and committed since.
            orphans = [o for o in orphans if o.digest is None or db.scalar(
                "SELECT 1 FROM blobs WHERE digest=?", (o.digest,)) is None]
            pending = {d for d in pending
                       if db.scalar("SELECT 1 FROM blobs WHERE digest=?", (d,)) is None}
            unlink = [d for d, _ in doomed] + [o.digest for o in orphans if o.digest] + \
                list(pending)
            if unlink:
                _write_journal(store.dir, unlink)
        crashpoint("gc.rows-deleted")
        res.freed_bytes = sum(int(s) for _, s in doomed)
        digests = [d for d, _ in doomed]
        digests += sorted(pending - set(digests))
        half = len(digests) // 2
        _unlink_all(store.blobs, digests[:half])
        if half:
            crashpoint("gc.mid-unlink")
        _unlink_all(store.blobs, digests[half:])
        for o in orphans:
            try:
                gone = (store.blobs.unlink_tmp(o.name) if o.digest is None
                        else store.blobs.unlink(o.digest))
            except (UnsafeStorePath, FileNotFoundError):
                gone = False  # its directory was swapped for a link since the mark
            if not gone:
                continue
            res.freed_bytes += o.size
            if o.digest is None:
                res.temp_files += 1
            else:
                res.orphans += 1
        _drop_journal(store.dir)
    return res


def _unlink_all(blobs: BlobStore, digests: list[bytes]) -> None:
    """Unlink blob files on a thread pool: on ext4 with online discard (and most network
    filesystems) one unlink waits ~1 ms for the disk; in parallel they overlap (~10x).
    Sorted, so each batch opens few shard directories."""
    def some(batch: list[bytes]) -> None:
        blobs.unlink_many(batch)  # skips a shard swapped for a link: nothing in it is touched

    if len(digests) < 64:
        some(digests)
        return
    digests = sorted(digests)
    batches = [digests[i:i + 256] for i in range(0, len(digests), 256)]
    with ThreadPoolExecutor(max_workers=UNLINK_THREADS, thread_name_prefix="gc-unlink") as pool:
        for _ in pool.map(some, batches):
            pass


def estimate(store: Store, doomed: Iterable[int], grace: float, now: float) -> SweepResult:
    """What a sweep after removing ``doomed`` would delete (dry run; changes nothing)."""
    doomed = set(doomed)
    live = leased_versions(store)
    purged = [(vid, f"{n}@{v}") for vid, n, v in store.db.query(
        "SELECT id, name, version FROM versions WHERE state='removed'") if vid not in live]
    doomed |= {vid for vid, _ in purged}
    _mark(store, doomed)
    res = SweepResult(purged=[s for _, s in purged])
    res.contents = int(store.db.scalar("SELECT COUNT(*) FROM temp.gc_contents"))
    res.blobs, freed = store.db.one("SELECT COUNT(*), COALESCE(SUM(b.stored_size), 0) FROM "
                                    "blobs b JOIN temp.gc_blobs g ON g.id = b.id") or (0, 0)
    orphans = _orphans(store, grace, now)
    res.orphans = sum(1 for o in orphans if o.digest is not None)
    res.temp_files = len(orphans) - res.orphans
    res.freed_bytes = int(freed) + sum(o.size for o in orphans)
    return res


def collect(store: Store, policy: Policy, *, dry_run: bool = False,
            now: float | None = None) -> GcResult:
    """``jbl store gc``: remove what ``policy`` selects, then sweep."""
    now = time.time() if now is None else now
    if not dry_run:
        drop_dead_leases(store)
    leased = leased_versions(store)
    chosen = select(store, policy, now=now, leased=leased)
    # Said to the admin, so that "0 versions to remove" is not a mystery: what the policy
    # would take if nothing were using it.
    in_use = [s.info.spec for s in select(store, policy, now=now, leased=set())
              if s.info.id in leased] if leased else []
    if dry_run:
        est = estimate(store, (s.info.id for s in chosen), policy.grace, now)
        return GcResult(policy.describe(), True, chosen, [s.info.spec for s in chosen], [], est,
                        in_use)
    removed, deferred = _remove(store, [s.info for s in chosen]) if chosen else ([], [])
    res = sweep(store, grace=policy.grace, wait=True, now=now)
    return GcResult(policy.describe(), False, chosen, removed, deferred, res, in_use)


def set_pinned(store: Store, spec: str, pinned: bool) -> VersionInfo:
    """Pin (never collected by policies) or unpin the installed version ``spec`` names."""
    info = store.resolve_installed(spec)
    with store.db.write():
        store.db.execute("UPDATE versions SET pinned=? WHERE id=?", (int(pinned), info.id))
    return info
