"""Why a mount daemon stops serving, for both engines: ``Stop``.

The serve skeleton (``mount.serve``) owns one ``Stop`` per mount. A signal (SIGTERM, SIGINT,
SIGHUP: the skeleton's handlers) calls ``request``; the engine calls ``check`` about once a
second, which also asks the polled conditions: the parent's death (the runner's per-job view:
no event fires when a parent dies, PDEATHSIG follows the parent *thread*) and the idle watch
(the lingering view, fusefs/linger.py: flock has no event to wait for). The first reason
wins and is logged once. An engine that sleeps in a loop of its own registers a ``wake``
callback so a signal ends it at once rather than at its next check.

Thread-safety: ``request`` may run in a signal handler (main thread) while the engine's loop
is between two statements; it only sets a field and calls the wake callbacks, which must be
signal-safe (the raw engine: a flag; trio: ``TrioToken.run_sync_soon``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from .linger import IdleWatch

log = logging.getLogger("jbl.fusefs")


class Stop:
    def __init__(self, parent_pid: int | None = None, idle: IdleWatch | None = None) -> None:
        self.parent_pid = parent_pid
        self.idle = idle
        self.reason: str | None = None
        self.wake: list[Callable[[], None]] = []

    def request(self, why: str) -> None:
        if self.reason is not None:
            return
        self.reason = why
        log.info("%s: unmounting", why)
        for fn in self.wake:
            fn()

    def check(self) -> bool:
        """True once serving should end (asking the polled conditions first)."""
        if self.reason is None:
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                self.request(f"parent {self.parent_pid} exited (the private view)")
            elif self.idle is not None and self.idle.expired():
                self.request(f"no job for {self.idle.seconds:g} s (the lingering view)")
        return self.reason is not None
