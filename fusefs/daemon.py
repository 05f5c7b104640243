"""The mount daemon's entry point: ``python -m jbl.fusefs.daemon --store S --mountpoint M``.

Started by ``mount.spawn`` in a new session with stdout/stderr on its log (``--log``:
``STORE/run/mount.log``, or the user's own directory when the store's is not writable; see
fusefs/mounttab.py). Log lines go through ``BoundedLog``, which rotates the file at
``mounttab.LOG_MAX`` so it never grows without bound. It
reports readiness on ``--ready-fd`` (one line: ``ready`` or ``error <reason>``) and then
serves until SIGTERM/SIGINT, an unmount, or (``--parent-pid``) the death of its parent, or
(``--linger S --lock L --hold H``: the runner's lingering view, fusefs/linger.py) once no job
has held ``H`` for S seconds. ``--detach`` forks once more before anything else, so the
daemon is nobody's child (a lingering view outlives the ``jbl run`` that started it, which
must not have to reap it); it stays in the process group ``spawn`` created.
Exit status: 0 after a clean unmount, the MountError exit code if mounting failed.

Thread-safety: a process of its own; see fusefs/mount.py.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

from jbl.store.errors import ExitCode, JblError, UnsafeStorePath
from jbl.store.settings import REMOVED_HOLD_LIMIT

from . import mount
from .linger import IdleWatch
from .mounttab import log_dir, open_log, rotate_log


class BoundedLog(logging.Handler):
    """Appends each line to ``path`` (O_APPEND: several daemons share a store's log),
    rotating at LOG_MAX. After a rotation, stdout/stderr (tracebacks that bypass logging)
    are pointed at the new file too. The log's directory is opened once, without following
    a link, and kept (mounttab.log_dir): a ``run/`` swapped for a link later changes
    nothing."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.dir_fd: int | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = (self.format(record) + "\n").encode(errors="replace")
            try:
                if self.dir_fd is None:
                    self.dir_fd = log_dir(self.path, make_dir=False)
                rotated = rotate_log(self.path, dir_fd=self.dir_fd)
                fd = open_log(self.path, dir_fd=self.dir_fd)
            except (FileNotFoundError, UnsafeStorePath):
                # the store (or its run/) was removed under us: never recreate it (a
                # create in a removed directory is ENOENT); a planted run/ is never
                # followed. The line goes where spawn() pointed stderr.
                os.write(2, line)
                return
            try:
                os.write(fd, line)
                if rotated:
                    os.dup2(fd, 1)
                    os.dup2(fd, 2)
            finally:
                os.close(fd)
        except Exception:
            self.handleError(record)


class _Formatter(argparse.HelpFormatter):
    """A fixed width: argparse's own default asks ``shutil`` (and with it zlib, bz2 and lzma,
    ~2 ms of the daemon's start) for the terminal's, which a daemon's log does not have."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="jbl-mount-daemon", formatter_class=_Formatter)
    p.add_argument("--store", required=True, type=Path)
    p.add_argument("--mountpoint", required=True, type=Path)
    p.add_argument("--ready-fd", type=int)
    p.add_argument("--allow-other", action="store_true")
    p.add_argument("--private", action="store_true")
    p.add_argument("--parent-pid", type=int)
    p.add_argument("--debug", action="store_true")
    p.add_argument("--engine", choices=mount.ENGINES, default=mount.DEFAULT_ENGINE)
    p.add_argument("--log", type=Path, help="log file (default: stderr)")
    p.add_argument("--linger", type=float)
    p.add_argument("--lock", type=Path)
    p.add_argument("--hold", type=Path)
    p.add_argument("--detach", action="store_true")
    p.add_argument("--removed-hold-limit", default=None,
                   help="seconds, or never (config removed_hold_limit, resolved by the CLI)")
    a = p.parse_args(argv)
    # `jbl run` blocks job-control signals before starting a private view (so only its
    # supervisor takes them), and a child inherits the mask across exec: unblock, or the
    # daemon would ignore the SIGTERM that asks it to unmount and be SIGKILLed 10 s later.
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    if a.detach and os.fork() != 0:  # single-threaded here: nothing but this thread runs
        os._exit(0)
    handler: logging.Handler = (BoundedLog(a.log) if a.log is not None
                                else logging.StreamHandler(sys.stderr))
    logging.basicConfig(level=logging.DEBUG if a.debug else logging.INFO, handlers=[handler],
                        format=f"%(asctime)s jbl-mount[{os.getpid()}] %(levelname)s %(message)s")
    logging.getLogger("pyfuse3").setLevel(logging.WARNING)

    def ready(reason: str | None) -> None:
        if a.ready_fd is None:
            return
        line = "ready\n" if reason is None else f"error {reason}\n"
        try:
            os.write(a.ready_fd, line.encode())
            os.close(a.ready_fd)
        except OSError:
            pass
        a.ready_fd = None

    idle = None
    try:
        if a.linger is not None and a.lock is not None and a.hold is not None:
            idle = IdleWatch(a.lock, a.hold, a.linger)
        mount.serve(a.store, a.mountpoint, allow_other=a.allow_other, ready=ready,
                    private=a.private, parent_pid=a.parent_pid, engine=a.engine, idle=idle,
                    hold_limit=_hold_limit(a.removed_hold_limit))
    except JblError as e:
        ready(str(e))
        logging.error("%s", e)
        return int(e.exit_code)
    except Exception as e:
        ready(f"{type(e).__name__}: {e}")
        logging.exception("mount daemon failed")
        return int(ExitCode.MOUNT)
    finally:
        if a.private:
            with contextlib.suppress(OSError):
                a.mountpoint.rmdir()
        if idle is not None:  # a lingering view leaves nothing behind (fusefs/linger.py)
            idle.forget(a.mountpoint)
    return 0


def _hold_limit(text: str | None) -> float | None:
    if text is None:
        return REMOVED_HOLD_LIMIT
    return None if text == "never" else float(text)


if __name__ == "__main__":
    sys.exit(main())
