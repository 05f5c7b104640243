"""Leases the mount holds on versions in use (gc roots), for both engines:
``ThreadLeaseKeeper``. Which versions are in use is fusefs/core.py's lease policy (the
kernel holds the version's top directory); this module writes the leases. It needs neither
trio nor pyfuse3.

While a version is in use, the daemon holds ``store.lease(version_id, "mount")``, so gc
keeps that version's rows and blobs even if it is removed meanwhile. The lease is dropped
``LINGER`` seconds after the kernel forgets the version's top directory, so churn costs one
SQLite write per version per linger period, not one per file. The lease also records the
version's last use.

Writes go through a separate read-write Store used only from the worker thread: the request
loop never waits on SQLite's write lock. The request that hands the version out does wait
for its lease (so gc cannot slip in between); a failure to take it is logged and the request
goes ahead (serving beats protecting).

Removed versions are not held forever: once a version has been ``removed`` for
``hold_limit`` seconds (config ``removed_hold_limit``, default 6 h; None = never) the keeper
drops its lease and takes none for it again, even while the kernel still holds its inode (a
shell ``cd``'d into it, a process with a file open). The next ``jbl store gc`` then frees it
and the holder's next access fails (``ENOENT``/``ESTALE``; reads of open files ``EIO``).
Until then ``store df``/``gc`` name the holder: the keeper records, on the lease row,
the uid and pid of the last request it saw for the version (``note_holder``).

Thread-safety: see each keeper; a keeper's Store belongs to its worker(s).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from jbl.store.store import Store

log = logging.getLogger("jbl.fusefs")

LINGER = 30.0  # seconds a lease outlives the last handle into its version
Who = tuple[int, int]  # (uid, pid) of a FUSE request


def take_lease(store_dir: Path, store: Store | None, version_id: int, who: Who | None = None
                ) -> tuple[contextlib.ExitStack | None, Store | None]:
    """Both keepers' lease step: open the write connection on first use, take a 'mount'
    lease (noting ``who`` asked). Returns (the lease to close later, or None if refused —
    logged; the connection). The stack's ``lease_id`` attribute is the row's id."""
    try:
        if store is None:
            store = Store.open(store_dir)
        stack = contextlib.ExitStack()
        lease_id = stack.enter_context(store.lease(version_id, "mount"))
        stack.lease_id = lease_id  # type: ignore[attr-defined]
        if who is not None:
            store.note_holder(lease_id, *who)
        return stack, store
    except Exception as e:
        log.warning("could not take a mount lease on version %d: %s", version_id, e)
        return None, store


def overdue(store: Store, held: list[int], hold_limit: float | None, now: float) -> list[int]:
    """The versions among ``held`` removed at least ``hold_limit`` seconds ago."""
    if hold_limit is None or not held:
        return []
    marks = ",".join("?" * len(held))
    rows = store.db.query(f"SELECT id FROM versions WHERE state='removed' AND removed_at <= ? "
                          f"AND id IN ({marks})", (now - hold_limit, *held))
    return sorted(r[0] for r in rows)


def check_period(hold_limit: float | None) -> float:
    """How often a keeper looks for overdue removed versions."""
    return 3600.0 if hold_limit is None else min(60.0, max(0.5, hold_limit / 4))


class ThreadLeaseKeeper:
    """Both engines' leases: one lease per version whose top directory the kernel holds
    (``Core.hands_out``/``forgotten``: taken at the LOOKUP/READDIRPLUS that hands the inode
    out, dropped ``linger`` seconds after the FORGET that ends it).

    One worker thread owns a read-write Store and does every lease write; the request loop
    only posts to its queue. ``acquire(vid, then)`` runs ``then()`` on the worker once the
    lease is committed (or failed, logged: serving beats protecting): the caller defers its
    reply into ``then`` (the raw engine) or waits for it off its loop (pyfuse3) so gc cannot
    slip in between the lookup and the lease.

    Thread-safety: ``acquire``/``release``/``stop`` from any thread (a queue); the Store and
    the held leases belong to the worker.
    """

    def __init__(self, store_dir: Path, linger: float = LINGER,
                 hold_limit: float | None = None) -> None:
        import queue
        import threading

        self.store_dir = store_dir
        self.linger = linger
        self.hold_limit = hold_limit
        self._q: queue.Queue[tuple[str, int, object, Who | None]] = queue.Queue()
        self._held: dict[int, contextlib.ExitStack] = {}
        self._who: dict[int, Who] = {}     # version -> the last requester noted on its lease
        self._expired: set[int] = set()    # removed versions held past hold_limit
        self._drop_at: dict[int, float] = {}
        self._failed: dict[int, float] = {}
        self._store: Store | None = None
        self._thread = threading.Thread(target=self._run, name="jbl-leases", daemon=True)
        self._thread.start()

    def acquire(self, version_id: int, then: Callable[[], None], who: Who | None = None
                ) -> None:
        """Hold ``version_id``, then call ``then``; ``who`` (uid, pid) made the request."""
        self._q.put(("acquire", version_id, then, who))

    def release(self, version_id: int) -> None:
        self._q.put(("release", version_id, None, None))

    def stop(self, timeout: float = 10.0) -> None:
        """Drop every lease and close the Store (waits for the worker)."""
        self._q.put(("stop", 0, None, None))
        self._thread.join(timeout)

    def held(self) -> list[int]:
        return sorted(self._held)

    def _run(self) -> None:
        import queue
        import time

        next_check = time.monotonic() + check_period(self.hold_limit)
        while True:
            now = time.monotonic()
            wait = min(min(self._drop_at.values(), default=now + 3600), next_check) - now
            try:
                op, vid, then, who = self._q.get(timeout=max(0.0, wait))
            except queue.Empty:
                for v, at in list(self._drop_at.items()):
                    if at <= time.monotonic():
                        del self._drop_at[v]
                        self._drop(v)
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + check_period(self.hold_limit)
                    self._release_overdue()
                continue
            if op == "stop":
                for v in list(self._held):
                    self._drop(v)
                if self._store is not None:
                    self._store.close()
                return
            if op == "release":
                if vid in self._held:
                    self._drop_at[vid] = time.monotonic() + self.linger
                continue
            self._drop_at.pop(vid, None)
            if vid in self._expired:
                pass  # held past removed_hold_limit: served, never leased again
            elif (vid not in self._held
                    and time.monotonic() - self._failed.get(vid, -1e9) >= self.linger):
                stack = self._enter(vid, who)
                if stack is None:
                    self._failed[vid] = time.monotonic()
                else:
                    self._held[vid] = stack
                    if who is not None:
                        self._who[vid] = who
            elif vid in self._held and who is not None and self._who.get(vid) != who:
                self._note(vid, who)
            try:
                then()  # type: ignore[operator]
            except Exception:
                log.exception("replying after the lease on version %d", vid)

    def _enter(self, version_id: int, who: Who | None = None) -> contextlib.ExitStack | None:
        stack, self._store = take_lease(self.store_dir, self._store, version_id, who)
        return stack

    def _note(self, version_id: int, who: Who) -> None:
        """A new requester for a held version: record it on the lease (a rare write: the
        kernel caches the version's top directory, so few requests reach us for it)."""
        stack = self._held[version_id]
        if self._store is None:
            return
        try:
            self._store.note_holder(stack.lease_id, *who)  # type: ignore[attr-defined]
            self._who[version_id] = who
        except Exception as e:
            log.warning("could not note who uses version %d: %s", version_id, e)

    def _release_overdue(self) -> None:
        import time

        if self._store is None or not self._held:
            return
        try:
            late = overdue(self._store, sorted(self._held), self.hold_limit, time.time())
        except Exception as e:
            log.warning("looking for removed versions held too long: %s", e)
            return
        for vid in late:
            who = self._who.get(vid)
            log.info("version %d was removed over removed_hold_limit (%gs) ago: releasing it "
                     "although %s still uses it", vid, self.hold_limit,
                     f"uid {who[0]} pid {who[1]}" if who else "someone")
            self._expired.add(vid)
            self._drop_at.pop(vid, None)
            self._drop(vid)

    def _drop(self, version_id: int) -> None:
        self._who.pop(version_id, None)
        stack = self._held.pop(version_id, None)
        if stack is not None:
            try:
                stack.close()
            except Exception as e:  # the row stays; a dead pid's lease is ignored by gc
                log.warning("could not drop the mount lease on version %d: %s", version_id, e)
