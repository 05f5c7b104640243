"""The pyfuse3 engine as the serve skeleton (``mount.serve``) runs it: ``Pyfuse3Engine``.

Mounts through libfuse (``pyfuse3.init``) and runs ``ops.JblOperations`` and its index watch in
one trio nursery; leases are written by the lease worker both engines use
(``leases.ThreadLeaseKeeper``). The skeleton's ``Stop`` ends the
nursery: a signal at once (``TrioToken.run_sync_soon``, which is signal-safe), the polled
conditions within half a second. Importing this module imports pyfuse3 and trio: the raw
engine never does (tests/test_mount_no_pyfuse3.py).

Thread-safety: ``run`` owns the process's trio loop (pyfuse3 allows one mount per process).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import trio
from jbl.store.store import Store
from jbl.store.view import View

from .leases import ThreadLeaseKeeper
from .ops import JblOperations
from .stop import Stop

STOP_POLL = 0.5  # seconds between two looks at the polled stop conditions


class Pyfuse3Engine:
    name = "pyfuse3"

    def __init__(self, store: Store, store_dir: Path, hold_limit: float | None) -> None:
        self.store_dir, self.hold_limit = store_dir, hold_limit
        self.leases: ThreadLeaseKeeper | None = None
        self.ops = JblOperations(View(store))
        self.stats = self.ops.stats
        self.mounted = False

    def busy(self) -> dict[str, int]:
        c = self.ops.view.cache  # per opcode: not measured in this engine
        return {**self.ops.view.spent_ns, "cache_hits": c.hits, "cache_misses": c.misses,
                "cache_bytes": c.bytes}

    def mount(self, mountpoint: Path, allow_other: bool, source: str) -> None:
        opts = {f"fsname={source}", "subtype=jbl", "ro", "default_permissions"}
        if allow_other:
            opts.add("allow_other")
        pyfuse3.init(self.ops, str(mountpoint), opts)
        self.mounted = self.ops.core.live = True
        self.leases = self.ops.leases = ThreadLeaseKeeper(self.store_dir,
                                                          hold_limit=self.hold_limit)

    def run(self, stop: Stop, ready: Callable[[], None]) -> None:
        ops = self.ops

        async def until_stopped(scope: trio.CancelScope) -> None:
            while not stop.check():  # noqa: ASYNC110 - parent death, flock: no event
                await trio.sleep(STOP_POLL)
            scope.cancel()

        wakes: list[Callable[[], None]] = []

        async def main() -> None:
            async with trio.open_nursery() as n:
                token = trio.lowlevel.current_trio_token()

                def wake() -> None:
                    with contextlib.suppress(trio.RunFinishedError):
                        token.run_sync_soon(n.cancel_scope.cancel)

                wakes.append(wake)
                stop.wake.append(wake)
                n.start_soon(pyfuse3.main)
                n.start_soon(ops.watch)
                n.start_soon(until_stopped, n.cancel_scope)
                ready()

        try:
            trio.run(main)
        finally:
            for fn in wakes:
                stop.wake.remove(fn)

    def close(self, unmount: bool) -> None:
        if self.mounted:
            with contextlib.suppress(Exception):
                pyfuse3.close(unmount=unmount)
        if self.leases is not None:
            self.leases.stop()
