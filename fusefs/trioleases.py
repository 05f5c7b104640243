"""The pyfuse3 engine's lease keeper (per open handle), on trio: ``LeaseKeeper``.

The policy (lease on first open, dropped ``LINGER`` seconds after the last release, none
for a version removed over ``hold_limit`` ago) and the lease steps are fusefs/leases.py's;
this module only runs them on trio: writes go through a separate read-write Store used
only from worker threads, one at a time (a CapacityLimiter of 1), so the event loop never
waits on SQLite's write lock. The first open of a version does wait for its lease (so gc
cannot slip in between the open and the lease).

Thread-safety: the public methods run on the trio thread; the Store belongs to the workers.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import trio
from jbl.store.store import Store

from .leases import LINGER, check_period, overdue, take_lease

log = logging.getLogger("jbl.fusefs")


class LeaseKeeper:
    def __init__(self, store_dir: Path, linger: float = LINGER,
                 hold_limit: float | None = None) -> None:
        self.store_dir = store_dir
        self.linger = linger
        self.hold_limit = hold_limit
        self._expired: set[int] = set()  # removed versions held past hold_limit: never again
        self.counts: dict[int, int] = {}
        self._held: dict[int, contextlib.ExitStack] = {}
        self._pending: dict[int, trio.Event] = {}
        self._store: Store | None = None
        self._limiter = trio.CapacityLimiter(1)
        self._nursery: trio.Nursery | None = None
        self._failed: dict[int, float] = {}  # version -> when taking its lease last failed

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the linger timers; on exit (cancelled) drop every lease."""
        try:
            async with trio.open_nursery() as n:
                self._nursery = n
                task_status.started()
                while True:
                    await trio.sleep(check_period(self.hold_limit))
                    await self._release_overdue()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True):
                for vid in list(self._held):
                    await self._drop(vid)
                if self._store is not None:
                    await trio.to_thread.run_sync(self._store.close, limiter=self._limiter)

    def held(self) -> list[int]:
        return sorted(self._held)

    async def _release_overdue(self) -> None:
        held = self.held()
        if self.hold_limit is None or not held or self._store is None:
            return
        import time

        store = self._store
        try:
            late = await trio.to_thread.run_sync(
                lambda: overdue(store, held, self.hold_limit, time.time()),
                limiter=self._limiter)
        except Exception as e:
            log.warning("looking for removed versions held too long: %s", e)
            return
        for vid in late:
            log.info("version %d was removed over removed_hold_limit (%gs) ago: releasing it "
                     "while still in use", vid, self.hold_limit)
            self._expired.add(vid)
            await self._drop(vid)

    async def acquire(self, version_id: int) -> None:
        self.counts[version_id] = self.counts.get(version_id, 0) + 1
        if version_id in self._held or version_id in self._expired:
            return
        if trio.current_time() - self._failed.get(version_id, -1e9) < self.linger:
            return  # do not retry (and wait on SQLite) for every open after a failure
        ev = self._pending.get(version_id)
        if ev is not None:
            await ev.wait()
            return
        ev = self._pending[version_id] = trio.Event()
        try:
            stack = await trio.to_thread.run_sync(self._enter, version_id, limiter=self._limiter)
            if stack is not None:
                self._held[version_id] = stack
            else:
                self._failed[version_id] = trio.current_time()
        finally:
            del self._pending[version_id]
            ev.set()

    def release(self, version_id: int) -> None:
        n = self.counts.get(version_id, 0) - 1
        if n > 0:
            self.counts[version_id] = n
            return
        self.counts.pop(version_id, None)
        if version_id in self._held and self._nursery is not None:
            self._nursery.start_soon(self._linger, version_id)

    async def _linger(self, version_id: int) -> None:
        await trio.sleep(self.linger)
        if self.counts.get(version_id, 0) == 0 and version_id in self._held:
            await self._drop(version_id)

    async def _drop(self, version_id: int) -> None:
        stack = self._held.pop(version_id, None)
        if stack is not None:
            try:
                await trio.to_thread.run_sync(stack.close, limiter=self._limiter)
            except Exception as e:  # the row stays; a dead pid's lease is ignored by gc
                log.warning("could not drop the mount lease on version %d: %s", version_id, e)

    def _enter(self, version_id: int) -> contextlib.ExitStack | None:
        """Worker thread: take the lease. None (logged) if the store would not let us."""
        stack, self._store = take_lease(self.store_dir, self._store, version_id)
        return stack
