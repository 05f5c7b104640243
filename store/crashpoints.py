"""Named crash points: ``JBL_CRASH_AT=<name>`` makes the process SIGKILL itself there.

Tests use them to prove that a kill at every step of install and gc leaves a store that
``verify`` passes and that the next install/gc completes. Names in use (keep this list true):

    ingest.blobs-written      all blobs of the version written, before syncfs
    ingest.before-commit      blobs written and synced (a tarball install: syncfs under way,
                              its COMMIT waits for it), rows not yet committed
    ingest.after-commit       rows committed, before temp files/leases are cleaned
                              (the three ingest.* points also mark a tree install's steps)
    casinstall.half-fetched   a tree install has written half of its packs/objects
    gc.after-mark             reachable set computed, nothing deleted yet
    gc.rows-deleted           unreferenced blob rows deleted (committed), files not unlinked
    gc.mid-unlink             half of the unreferenced files unlinked
    rm.rows-deleted           a removed version's rows committed, its blobs not swept
    recompress.files-written  a cold-pass batch encoded into blobs/tmp and synced, no rename
    recompress.renamed        the batch's files renamed over their blobs, rows not committed
    verify.first-blob         verify has read the first blob row (its index snapshot is taken)

``JBL_PAUSE_AT=<name>=<dir>`` makes the process pause there instead: it creates
``<dir>/<name>.<pid>`` and waits until that file is removed. Tests use it to force a race
(hold one install just before its commit while another commits) and to see that it happened.

The CLI arms them once from its settings (``arm``, cli/main.py); this module never reads the
environment itself. Cost when unset: two string compares.
"""

from __future__ import annotations

import os
import signal
import time

ENV = "JBL_CRASH_AT"
PAUSE_ENV = "JBL_PAUSE_AT"
_armed = ["", ""]  # [crash point, "pause point=dir"]: process-wide, set once by the CLI


def arm(crash_at: str, pause_at: str) -> None:
    """Set this process's crash and pause points (the values of JBL_CRASH_AT, JBL_PAUSE_AT)."""
    _armed[:] = [crash_at, pause_at]


def crashpoint(name: str) -> None:
    if _armed[0] == name:
        os.kill(os.getpid(), signal.SIGKILL)
    pause = _armed[1]
    if pause and pause.partition("=")[0] == name:
        _pause(name, pause.partition("=")[2])


def _pause(name: str, directory: str) -> None:
    flag = os.path.join(directory, f"{name}.{os.getpid()}")
    with open(flag, "x"):
        pass
    while os.path.exists(flag):  # a test-only wait: polling keeps it free of any protocol
        time.sleep(0.005)
