"""The job's fds 0, 1 and 2, and the relay that feeds them while the supervisor waits.

What the job gets (``docs/runner.md``, "Terminals"):

``JobStdio.open(pty)``: ``pty`` is ``terminal.wants_pty(mode)``, decided once by the
supervisor (the plan needs it too: the job takes the pty as its controlling terminal).

* **pty** (``--tty``, or by default when stdin and stdout are both terminals): a fresh
  pseudo-terminal; its slave is the job's stdin, stdout (and stderr, unless the caller's
  stderr is not a terminal: then that file or pipe, as is). The caller's stdin terminal goes
  raw and its bytes (Ctrl-C too: the job's own line discipline signals the job) go to the
  master; the master's output goes to the caller's stdout. Window size follows SIGWINCH.
* **pipes** (``--no-tty``, or output redirected): each of the caller's fds 0/1/2 is handed
  over as it is, except a terminal, which is replaced by a pipe that ``jbl`` relays.

Not a terminal and not relayed: the job's fd is the caller's own (no copying, no cost).

Leaving (``runner/foreground.py``): when ``jbl run``'s supervisor runs behind a front process
(``LEAVE`` is set), the detach keys typed on a pty (``DETACH_KEYS``: Ctrl-P Ctrl-Q, as
docker's; a lone Ctrl-P is held until the next key says whether it was one) or a SIGHUP
(``supervise.py``) call ``detach()``: the caller's terminal gets its modes back, its input is
no longer read (a job's stdin pipe ends; a pty just gets no more keys), and ``LEAVE`` makes
fds 1 and 2 the log's pipes, where the output pumps go on writing.

The relay runs in the supervisor's only thread: ``wait(timeout)`` polls the relayed fds and
a signalfd for the supervisor's blocked signals, so it returns as soon as a signal is
pending, and ``drain()`` copies what is left once the job is gone. The caller's descriptors
are never made non-blocking (that flag is shared with the shell): they are read after
POLLIN and written at most PIPE_BUF bytes after POLLOUT. The caller's stdin is read only
while ``jbl`` is in its terminal's foreground group (SIGTTIN is blocked: a read from the
background gives EIO, not a stop), so ``jbl run … &`` leaves the shell's input alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import signal
import time
from collections.abc import Callable, Iterable
from typing import Literal

from . import terminal
from .terminal import RawMode

# Blocked while relaying: a background read of the caller's terminal then fails with EIO and
# a background write passes, instead of stopping jbl (see the module docstring).
TTY_STOPS = {signal.SIGTTIN, signal.SIGTTOU}

CHUNK = 4096  # <= PIPE_BUF: one write after POLLOUT does not block on a pipe
BUFFER_MAX = 1 << 16  # per direction; the reader waits while the writer is behind
RECHECK = 0.5  # s: how often a background jbl looks whether it is in the foreground again
DRAIN_IDLE = 2.0  # s: drain() gives up after this long without progress
SIGSET_WORDS = 16  # glibc's sigset_t: 1024 bits
EOT = b"\x04"  # a pty's VEOF: "end of input" to a reader in canonical mode
DETACH_KEYS = b"\x10\x11"  # Ctrl-P Ctrl-Q

# Set in a supervisor behind a front process (foreground.split): leaves the caller, True once
# left. None: this jbl run cannot be left (no terminal, or jbl run --detach already).
LEAVE: Callable[[], bool] | None = None

_libc = ctypes.CDLL(None, use_errno=True)


def signal_fd(signals: Iterable[int]) -> int:
    """A signalfd that polls readable while one of ``signals`` (blocked) is pending. It is
    never read: ``sigtimedwait`` takes the signal."""
    mask = (ctypes.c_ulong * SIGSET_WORDS)()
    for sig in signals:
        mask[(sig - 1) // 64] |= 1 << ((sig - 1) % 64)
    fd = int(_libc.signalfd(-1, mask, os.O_NONBLOCK | os.O_CLOEXEC))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"signalfd: {os.strerror(err)}")
    return fd


class Pump:
    """Copies bytes from ``src`` to ``dst`` through a bounded buffer."""

    def __init__(self, src: int, dst: int, *, job_input: bool = False,
                 gate: Callable[[], bool] | None = None,
                 at_eof: Literal["close", "eot"] | None = None, keys: bytes = b"") -> None:
        self.src, self.dst = src, dst
        self.job_input = job_input  # caller -> job: stops (reads no more) at the job's end
        self.gate = gate  # may src be read now? (the caller's terminal: only in foreground)
        # at the caller's end of input: close the job's pipe once the buffer is out, or send
        # the pty's end-of-input character (the job's pty cannot be half-closed)
        self.at_eof = at_eof
        self.buf = bytearray()
        self.reading = True
        self.dst_ok = True
        self.keys = keys  # the detach keys, taken out of the caller's input
        self.held = 0  # how many of them were typed last
        self.detach_seen = False

    def wants_read(self) -> bool:
        return (self.reading and len(self.buf) < BUFFER_MAX
                and (self.gate is None or self.gate()))

    def read(self) -> bool:
        """Read what is there; False at end of input."""
        try:
            data = os.read(self.src, BUFFER_MAX)
        except BlockingIOError:
            return True
        except OSError as e:
            # EIO: a pty master whose slave is closed everywhere (the job is gone), or the
            # caller's terminal read from the background (gated: tried again in foreground)
            if e.errno == errno.EIO and self.gate is not None:
                return True
            data = b""
        if not data:
            self.reading = False
            if self.at_eof == "eot" and self.dst_ok:
                self.buf += EOT
            return False
        if self.keys:
            data = self._take_keys(data)
        if self.dst_ok:
            self.buf += data
        return True

    def _take_keys(self, data: bytes) -> bytes:
        """``data`` without the detach keys; what follows them is dropped (typed to jbl,
        not to the job). A partial sequence is held until the next key decides."""
        keys = self.keys
        if not self.held and keys[0] not in data:
            return data
        out = bytearray()
        for b in data:
            if b == keys[self.held]:
                self.held += 1
                if self.held == len(keys):
                    self.held = 0
                    self.detach_seen = True
                    return bytes(out)
                continue
            out += keys[:self.held]
            self.held = 0
            if b == keys[0]:
                self.held = 1
            else:
                out.append(b)
        return bytes(out)

    def write(self) -> None:
        try:
            n = os.write(self.dst, self.buf[:CHUNK])
        except BlockingIOError:
            return
        except OSError:
            # the reader went away (EPIPE): the job's output is dropped from now on (the
            # job must not block on a full pty), or the caller's input is no longer read
            self.dst_ok = False
            self.buf.clear()
            if self.job_input:
                self.reading = False
            return
        del self.buf[:n]


class JobStdio:
    """What the job's fds 0/1/2 are, and the pumps between them and the caller's."""

    def __init__(self) -> None:
        self.child_fds: tuple[int, int, int] = (0, 1, 2)
        self.ours: list[int] = []  # every descriptor we opened
        self.job_ends: list[int] = []  # the job's sides: closed once the helper has them
        self.pumps: list[Pump] = []
        self.master: int | None = None
        self.raw: RawMode | None = None
        self.sigfd = -1
        self.left = False  # detach() happened: output goes to the job's log

    @property
    def pty(self) -> bool:
        return self.master is not None

    @classmethod
    def open(cls, pty: bool) -> JobStdio:
        self = cls()
        try:
            if pty:
                self._open_pty()
            else:
                self._open_pipes()
        except BaseException:
            self.close()
            raise
        return self

    def _open_pty(self) -> None:
        master, slave = terminal.open_pty()
        self.ours += [master, slave]
        self.job_ends.append(slave)
        self.master = master
        err = slave if os.isatty(2) or not _is_open(2) else 2
        self.child_fds = (slave, slave, err)
        gate = None
        if os.isatty(0):
            self.raw = RawMode(0)
            gate = self._foreground_gate(0)
        if _is_open(0):
            keys = DETACH_KEYS if LEAVE is not None and self.raw is not None else b""
            self.pumps.append(Pump(0, master, job_input=True, gate=gate, at_eof="eot",
                                   keys=keys))
        self.pumps.append(Pump(master, 1))

    def _open_pipes(self) -> None:
        fds = [0, 1, 2]
        for fd in (0, 1, 2):
            if not os.isatty(fd):
                continue  # a file, a pipe, /dev/null: the job may have it as it is
            r, w = os.pipe()
            self.ours += [r, w]
            if fd == 0:
                os.set_blocking(w, False)
                fds[0] = r
                self.job_ends.append(r)
                self.pumps.append(Pump(0, w, job_input=True, gate=self._foreground_gate(0),
                                       at_eof="close"))
            else:
                os.set_blocking(r, False)
                fds[fd] = w
                self.job_ends.append(w)
                self.pumps.append(Pump(r, fd))
        self.child_fds = (fds[0], fds[1], fds[2])

    def _foreground_gate(self, fd: int) -> Callable[[], bool]:
        return lambda: terminal.is_foreground(fd)

    def started(self, signals: Iterable[int]) -> None:
        """The helper has its copies: drop ours of the job's ends (so the job's exit is
        EOF here), and watch ``signals`` while relaying."""
        for fd in self.job_ends:
            self._close(fd)
        self.job_ends = []
        if self.pumps:
            self.sigfd = signal_fd(signals)
            self.ours.append(self.sigfd)

    def wait(self, timeout: float | None) -> None:
        """Relay until one of the watched signals is pending or ``timeout`` (s) passed."""
        if not self.pumps:
            return  # the caller waits with sigtimedwait itself
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.raw:
                self.raw.enter_if_foreground()
            left = None if end is None else max(0.0, end - time.monotonic())
            if (self.raw and self.raw.saved is None) or any(
                    p.gate and p.reading and not p.gate() for p in self.pumps):
                left = RECHECK if left is None else min(left, RECHECK)  # back to foreground?
            ready = self._poll([self.sigfd], left)
            if any(p.detach_seen for p in self.pumps):
                for p in self.pumps:
                    p.detach_seen = False
                self.detach()
            if self.sigfd in ready or (end is not None and time.monotonic() >= end):
                return

    def drain(self) -> None:
        """The job is gone: copy what it left, stop reading the caller, restore the
        terminal."""
        for p in self.pumps:
            if p.job_input:
                p.reading = False
                p.buf.clear()
        idle_since = time.monotonic()
        while any(p.reading or (p.buf and p.dst_ok) for p in self.pumps):
            if self._poll([], DRAIN_IDLE / 4):
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > DRAIN_IDLE:
                break  # something outside the job still holds a write end
        if self.raw:
            self.raw.restore()

    def detach(self) -> bool:
        """Leave the caller (see the module docstring): False when this job cannot be
        left, True when it was left (now or before)."""
        if self.left:
            return True
        if LEAVE is None:
            return False
        if self.raw:
            self.raw.restore()  # before fd 0 is the caller's terminal no more
        if not LEAVE():
            return False  # still attached: raw again at the next wake-up
        self.raw = None
        for p in self.pumps:
            p.keys, p.held = b"", 0
            if p.job_input:
                p.reading = False
                p.buf.clear()
                if p.at_eof == "close":
                    self._close(p.dst)
                    p.dst_ok = False
            else:
                p.dst_ok = True  # a closed terminal made it drop output; the log takes it
        self.left = True
        return True

    def window_changed(self) -> None:
        if self.master is not None:
            terminal.copy_window_size(terminal.window_source(), self.master)

    def close(self) -> None:
        if self.raw:
            self.raw.restore()
        for fd in list(self.ours):
            self._close(fd)

    # ---- internals ------------------------------------------------------------------------

    def _poll(self, extra: list[int], timeout: float | None) -> list[int]:
        """One poll over the pumps' fds and ``extra``; moves what is ready. Returns the fds
        that were ready (``extra`` included)."""
        masks: dict[int, int] = dict.fromkeys(extra, select.POLLIN)
        for p in self.pumps:
            if p.wants_read():
                masks[p.src] = masks.get(p.src, 0) | select.POLLIN
            if p.buf and p.dst_ok:
                masks[p.dst] = masks.get(p.dst, 0) | select.POLLOUT
        poller = select.poll()
        for fd, mask in masks.items():
            poller.register(fd, mask)
        ms = None if timeout is None else int(timeout * 1000)
        events = dict(poller.poll(ms))
        for p in self.pumps:
            ev = events.get(p.src, 0)
            if ev and masks.get(p.src, 0) & select.POLLIN and p.wants_read():
                p.read()
            ev = events.get(p.dst, 0)
            if ev and p.buf and p.dst_ok:
                if ev & select.POLLOUT:
                    p.write()
                elif ev & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                    p.dst_ok = False
                    p.buf.clear()
            if p.at_eof == "close" and not p.reading and not p.buf and p.dst in self.ours:
                self._close(p.dst)
                p.dst_ok = False
        return list(events)

    def _close(self, fd: int) -> None:
        if fd in self.ours:
            self.ours.remove(fd)
            with contextlib.suppress(OSError):
                os.close(fd)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True
