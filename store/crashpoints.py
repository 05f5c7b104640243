"""Named crash points: ``JBL_CRASH_AT=<name>`` makes the process SIGKILL itself there.

Tests use them to prove that a kill at every step of install and gc leaves a store that
``verify`` passes and that the next install/gc completes. Names in use (keep this list true):

    ingest.blobs-written      all blobs of the version written, before syncfs
    ingest.before-commit      blobs synced, rows not yet committed
    ingest.after-commit       rows committed, before temp files/leases are cleaned
    gc.after-mark             reachable set computed, nothing deleted yet
    gc.rows-deleted           unreferenced blob rows deleted (committed), files not unlinked
    gc.mid-unlink             half of the unreferenced files unlinked
    rm.rows-deleted           a removed version's rows committed, its blobs not swept

Cost when unset: one dict lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "JBL_CRASH_AT"


def crashpoint(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
