"""The caller's terminal: whether a job gets a pty, raw mode, the window size.

Used by ``stdio.py`` only, from the supervisor's one thread. The job never gets a descriptor
of the caller's terminal (it could ``ioctl(TIOCSTI)`` keystrokes into the caller's shell, or
keep it after ``jbl`` ended); it gets a fresh pty whose master ``jbl`` relays, or pipes.

Raw mode is entered only while ``jbl`` is in the terminal's foreground process group, so a
``jbl run … &`` neither stops on SIGTTOU nor takes the terminal from the shell, and it is
always restored, also on errors and interruptions (``restore`` in the caller's ``finally``;
only a SIGKILL of ``jbl`` leaves a raw terminal behind, as with ``ssh -t``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import termios
from typing import Any, Literal

Mode = Literal["auto", "tty", "pipes"]
# the tcgetattr list: iflag, oflag, cflag, lflag, ispeed, ospeed, cc
IFLAG, LFLAG, CC = 0, 3, 6


def wants_pty(mode: Mode) -> bool:
    """``auto``: a pty exactly when stdin and stdout are both terminals (interactive use);
    with output redirected (``jbl run … > out.json``) stdout and stderr stay apart."""
    if mode == "auto":
        return os.isatty(0) and os.isatty(1)
    return mode == "tty"


def is_foreground(fd: int) -> bool:
    """Is this process group the foreground one of the terminal ``fd``?"""
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False


def window_source() -> int | None:
    """The first of fds 0, 1, 2 that is a terminal: where the window size comes from."""
    return next((fd for fd in (0, 1, 2) if os.isatty(fd)), None)


def copy_window_size(src: int | None, dst: int) -> None:
    """TIOCGWINSZ of ``src`` to ``dst`` (a pty master: the kernel then sends SIGWINCH to the
    job's foreground group)."""
    if src is None:
        return
    try:
        size = fcntl.ioctl(src, termios.TIOCGWINSZ, b"\0" * 8)
        fcntl.ioctl(dst, termios.TIOCSWINSZ, size)
    except OSError:
        pass  # the caller's terminal went away: the job keeps its last size


def open_pty() -> tuple[int, int]:
    """A fresh pty (master, slave) set up like the caller's terminal: its modes (erase and
    interrupt keys, UTF-8) and its window size. Both close-on-exec; the master
    non-blocking (it is only ever read after poll)."""
    master, slave = os.openpty()
    os.set_blocking(master, False)
    if os.isatty(0):
        with contextlib.suppress(termios.error):  # else the pty keeps its defaults
            termios.tcsetattr(slave, termios.TCSANOW, termios.tcgetattr(0))
    copy_window_size(window_source(), master)
    return master, slave


class RawMode:
    """The caller's stdin terminal in raw mode while the job runs (keys, Ctrl-C included, go
    to the job's pty as bytes), restored after."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.saved: list[Any] | None = None

    def enter_if_foreground(self) -> None:
        """Called on every wake-up of the relay: a ``jbl`` moved to the foreground (``fg``)
        goes raw then."""
        if self.saved is not None or not is_foreground(self.fd):
            return
        try:
            saved = termios.tcgetattr(self.fd)
        except termios.error:
            return
        iflag, oflag, cflag, lflag = (int(x) for x in saved[IFLAG:LFLAG + 1])
        cc = list(saved[CC])
        iflag &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP
                   | termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IXON)
        oflag &= ~termios.OPOST  # the job's pty does the output processing
        lflag &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG
                   | termios.IEXTEN)
        cflag = (cflag & ~(termios.CSIZE | termios.PARENB)) | termios.CS8
        cc[termios.VMIN], cc[termios.VTIME] = 1, 0
        raw = [iflag, oflag, cflag, lflag, saved[4], saved[5], cc]
        self.saved = saved
        # TCSANOW, not TCSAFLUSH: keys typed ahead belong to the job, not to the bin
        self._set(raw)

    def restore(self) -> None:
        if self.saved is not None:
            saved, self.saved = self.saved, None
            self._set(saved)

    def _set(self, attrs: list[Any]) -> None:
        # SIGTTOU blocked: restoring from the background must not stop jbl half-way
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTTOU})
        try:
            termios.tcsetattr(self.fd, termios.TCSANOW, attrs)
        except termios.error:
            pass  # the terminal is gone; nothing left to restore
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
