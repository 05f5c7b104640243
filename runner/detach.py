"""Detached jobs: the fork that leaves the caller, the job's own session, and its logger.

``spawn(supervise)`` forks the supervisor and returns its pid at once; the child, first of
all, calls ``setsid()``: a session of its own with no controlling terminal, so closing the
terminal that started it (SIGHUP to that session) never reaches it or the job (the terminal's
signals are blocked across the fork, and one that came before ``setsid`` is dropped: it was
the caller's). It then waits until the caller has written the job's record (``release``),
and:

1. forks the **logger**: it reads the two pipes that are the supervisor's (and so the job's)
   stdout and stderr and appends what it reads to the job's log (``JobStore.append_log``: a
   sequence number and a timestamp per chunk, streams apart, bounded); it ends at EOF on
   both, which comes when the supervisor and every job process are gone (SIGKILL included);
2. makes ``/dev/null`` its stdin and the pipes its stdout/stderr, records the logger's pid
   (so ``jbl job log --follow`` knows when the log is complete), runs ``supervise()`` and
   ends with its status (``os._exit``: nothing of the caller's runs twice).

Not thread-safe: call ``spawn`` before any thread exists (a forked child gets only the
calling thread). A process that may have threads runs the logger as a program instead:
``python -m jbl.runner.detach JOB_ID DIRECTORY LIMIT OUT_FD ERR_FD`` (``foreground.py``, when
a foreground job is detached).
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .jobstore import JobStore, process_start

READ_MAX = 64 << 10  # bytes per read: one chunk at most this big
TERMINAL_SIGNALS = {signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTSTP}


def spawn(job_id: str, directory: Path, log_limit: int,
          supervise: Callable[[], int]) -> tuple[int, int]:
    """Fork the detached supervisor; returns (its pid, the fd to ``release`` it with)."""
    sys.stdout.flush()
    sys.stderr.flush()
    go_r, go_w = os.pipe()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, TERMINAL_SIGNALS)
    pid = os.fork()
    if pid:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        os.close(go_r)
        return pid, go_w
    code = 1
    try:
        os.setsid()
        while signal.sigtimedwait(TERMINAL_SIGNALS, 0) is not None:
            pass  # sent to the caller's session before it was ours alone
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        os.close(go_w)
        if os.read(go_r, 1) != b"1":  # the caller died before the record existed
            os._exit(1)
        os.close(go_r)
        code = _supervisor(job_id, directory, log_limit, supervise)
    except BaseException as e:  # never return into the caller's code in the child
        try:
            print(f"jbl: error: detached job {job_id}: {e}", file=sys.stderr)
        finally:
            code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def release(go_w: int) -> None:
    """The record is written: let the detached supervisor start."""
    os.write(go_w, b"1")
    os.close(go_w)


def _supervisor(job_id: str, directory: Path, log_limit: int,
                supervise: Callable[[], int]) -> int:
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    logger = os.fork()
    if logger == 0:
        code = 1
        try:
            os.close(out_w)
            os.close(err_w)
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.close(null)
            _log_loop(job_id, directory, log_limit, out_r, err_r)
            code = 0
        finally:
            os._exit(code)
    os.close(out_r)
    os.close(err_r)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    for fd in (null, out_w, err_w):
        os.close(fd)
    store = JobStore.open_own(directory)
    assert store is not None
    try:
        with store.conn:
            store.conn.execute("UPDATE jobs SET logger_pid=?, logger_start=? WHERE id=?",
                               (logger, process_start(logger) or 0, job_id))
    finally:
        store.close()
    return supervise()


def _log_loop(job_id: str, directory: Path, limit: int, out_r: int, err_r: int) -> None:
    store = JobStore.open_own(directory)
    assert store is not None
    streams = {out_r: 1, err_r: 2}
    poller = select.poll()
    for fd in streams:
        poller.register(fd, select.POLLIN)
    try:
        while streams:
            batch: list[tuple[int, float, bytes]] = []
            for fd, _ev in poller.poll():
                data = os.read(fd, READ_MAX) if fd in streams else b""
                if data:
                    batch.append((streams[fd], time.time(), data))
                elif fd in streams:
                    poller.unregister(fd)
                    os.close(fd)
                    del streams[fd]
            store.append_log(job_id, batch, limit)
    finally:
        store.close()


def main(argv: list[str]) -> int:
    """The logger as a program (see the module docstring); its fds 0-2 are /dev/null."""
    job_id, directory, limit, out_r, err_r = argv
    _log_loop(job_id, Path(directory), int(limit), int(out_r), int(err_r))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
