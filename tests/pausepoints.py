"""Forcing races with the store's pause points (``JBL_PAUSE_AT``, store/crashpoints.py).

A process started with ``Pauses.env(point)`` stops at that crash point's place, creates
``DIR/<point>.<pid>`` and waits until the file is removed. ``wait`` returns the flags once
the wanted processes are held there (failing fast if one of them exited instead), so a test
can run a competitor while they are held and then ``release`` them: the race happens, every
time, and the test knows it did.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from jbl.store.crashpoints import PAUSE_ENV


class Pauses:
    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory

    def env(self, point: str) -> dict[str, str]:
        return {PAUSE_ENV: f"{point}={self.dir}"}

    def wait(self, point: str, procs: list[subprocess.Popen[str]],
             timeout: float = 120) -> list[Path]:
        """Wait until every one of ``procs`` is held at ``point``; return their flags."""
        want = {p.pid for p in procs}
        deadline = time.monotonic() + timeout
        while True:
            flags = [f for f in self.dir.glob(f"{point}.*") if int(f.suffix[1:]) in want]
            if len(flags) == len(want):
                return flags
            dead = [p for p in procs if p.poll() is not None]
            assert not dead, [(p.args, p.returncode, p.communicate()) for p in dead]
            assert time.monotonic() < deadline, f"not all held at {point} in {timeout}s"
            time.sleep(0.01)

    @staticmethod
    def release(flags: list[Path]) -> None:
        for f in flags:
            f.unlink()
