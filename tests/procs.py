"""Ending a test's subprocesses whatever fails: ``reap`` in a ``finally``.

A failed assertion must not leave a process running or its pipes open: an unclosed pipe is
a ResourceWarning at garbage collection, which ``filterwarnings = error`` turns into the
failure of some later, unrelated test.
"""

from __future__ import annotations

import contextlib
import subprocess
from typing import Any


def reap(p: subprocess.Popen[Any]) -> None:
    """Kill ``p`` if it still runs, wait for it and close its pipes. The pipes are closed,
    not read (unlike ``communicate``): a job's stray child may hold their other ends. Harmless
    after ``communicate`` or a second time."""
    if p.poll() is None:
        p.kill()
    for f in (p.stdin, p.stdout, p.stderr):
        if f is not None:
            with contextlib.suppress(OSError):  # stdin's unflushed bytes, reader gone
                f.close()
    p.wait()
