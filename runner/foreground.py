"""A foreground job its caller can leave: the front process, the supervisor behind it, and
the detach that turns the one into a detached job.

``split()`` is called by ``jbl run`` (a terminal among its fds 0-2, before any thread) and
forks:

* the **front** (the original process: the one the shell waits for) keeps only the caller's
  view: it waits for the supervisor and passes its exit status back, and passes on the
  signals sent to it alone (``kill PID``). When the supervisor says it has left (``leave``),
  the front prints the job id and exits 0;
* the **supervisor** (the child, in the front's process group: the terminal's foreground
  group, so it reads the terminal and takes the terminal's own signals, Ctrl-C in pipes mode,
  SIGWINCH, SIGHUP, directly, as ``jbl run`` always did) runs the job and relays its stdio to
  the caller's terminal with no extra hop (``stdio.py``). A parent-death signal (SIGTERM)
  ends the job if the front is killed while attached.

A signal sent to the whole group (the shell's ``kill %1``, systemd) reaches both: the front
does not pass on the terminal's (``SI_KERNEL``), and the supervisor takes a copy that comes
through the front within ``ECHO_WINDOW`` of the same signal sent to it directly (or the other
way round) as one signal (``echo``): a second SIGTERM would skip the job's grace period.

Leaving (``leave``), in the supervisor, on the detach keys (Ctrl-P Ctrl-Q on a pty,
``stdio.DETACH_KEYS``) or on SIGHUP (``kill -HUP`` of ``jbl run``, or its terminal closing):
the terminal's modes are restored (``stdio.JobStdio.detach``), a **logger** is started
(``detach.py``'s, exec'd: the supervisor may have threads), fds 1 and 2 become the logger's
pipes and fd 0 ``/dev/null``, the record becomes a detached job's (its log, its logger), the
parent-death signal is dropped, the supervisor leaves the terminal's session (``setsid``),
and then the front is told. From then on the job is a detached job: ``jbl job log/stop``
work on it; its supervisor ignores SIGHUP.

Module state (``_armed``, ``_last``) is per process: only a supervisor made by ``split`` has
it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import stdio
from .stdio import signal_fd

TERMINATE = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT}  # supervise's
FORWARDED = TERMINATE | {signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH, signal.SIGCONT}
PR_SET_PDEATHSIG = 1
LEFT = b"d"  # supervisor -> front: the job is detached
SI_KERNEL = 0x80  # si_code of a signal the kernel sent (a terminal's), not a process
ECHO_WINDOW = 3.0  # s: the same signal directly and through the front within it is one
# (a loaded machine may take a second to run the front; a second signal that comes
# the same way as the first is never taken for an echo)


@dataclass
class _Armed:
    job_id: str
    directory: Path | None
    log_limit: int
    front: int  # the front's pid
    tell: int  # write end of the pipe the front waits on
    left: bool = False


_armed: _Armed | None = None
_last: tuple[int, bool, float] | None = None  # the supervisor's last signal: number, from
# the front, when


def can_leave() -> bool:
    """Is there a terminal to leave (one of fds 0-2)? Without one, nothing is relayed and
    nothing would reach a log: ``jbl run --detach`` is the way."""
    return any(os.isatty(fd) for fd in (0, 1, 2))


def split(job_id: str, directory: Path | None, log_limit: int, *,
          as_json: bool = False) -> int | None:
    """Fork the supervisor. Returns None in the supervisor (which goes on to run the job) and,
    in the front, the exit status for ``jbl run``: the supervisor's, or 0 once it left."""
    global _armed
    sys.stdout.flush()
    sys.stderr.flush()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED | {signal.SIGCHLD})
    told_r, told_w = os.pipe()
    front = os.getpid()
    pid = os.fork()
    if pid == 0:
        os.close(told_r)
        # as jbl run had them: the job-control signals stay blocked (run() blocks them anyway
        # before any thread or view daemon starts, which inherit the mask), the others not
        signal.pthread_sigmask(signal.SIG_SETMASK, set(old) | TERMINATE)
        _set_pdeathsig(signal.SIGTERM)
        if os.getppid() != front:  # the front died before the line above
            os._exit(128 + signal.SIGTERM)
        _armed = _Armed(job_id, directory, log_limit, front, told_w)
        stdio.LEAVE = leave
        return None
    os.close(told_w)
    try:
        return _front(pid, job_id, told_r, as_json)
    finally:
        os.close(told_r)
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _front(pid: int, job_id: str, told: int, as_json: bool) -> int:
    """Wait for the supervisor ``pid``, passing signals on; its status, or 0 once it left."""
    sigfd = signal_fd(FORWARDED | {signal.SIGCHLD})
    try:
        poller = select.poll()
        poller.register(sigfd, select.POLLIN)
        poller.register(told, select.POLLIN)
        while True:
            for fd, _ev in poller.poll():
                if fd == told:
                    if os.read(told, 1) == LEFT:
                        _say_left(job_id, as_json)
                        return 0
                    poller.unregister(told)  # it ended without leaving: its status follows
                    continue
                info = signal.sigtimedwait(FORWARDED | {signal.SIGCHLD}, 0)
                if info is None:
                    continue
                if info.si_signo != signal.SIGCHLD:
                    if info.si_code != SI_KERNEL:  # the terminal's reached the supervisor
                        _kill(pid, info.si_signo)
                    continue
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    code = os.waitstatus_to_exitcode(status)
                    return code if code >= 0 else 128 - code
    finally:
        os.close(sigfd)


def _say_left(job_id: str, as_json: bool) -> None:
    """The id on stdout (a closed terminal: nothing to say it to, and no error)."""
    try:
        if as_json:
            print(f'{{"job_id": "{job_id}", "detached": true}}', flush=True)
        else:
            print(job_id, flush=True)
        print(f"jbl: detached from {job_id}: it runs on; its output is in its log "
              f"(jbl job log {job_id}, jbl job stop {job_id})", file=sys.stderr, flush=True)
    except OSError:
        pass


def leave() -> bool:
    """In the supervisor: become a detached job (see the module docstring). False when this
    process is no ``split`` supervisor, or its records cannot be written (it stays
    attached); True when it left, now or before."""
    a = _armed
    if a is None:
        return False
    if a.left:
        return True
    from .jobstore import JobStore, process_start

    try:  # both fail before fds 0-2 are touched: the job stays attached, with a note
        store = JobStore.open_own(a.directory)
        assert store is not None  # open_own creates it
        try:
            logger = _start_logger(a)
        except BaseException:
            store.close()
            raise
    except Exception as e:  # noqa: BLE001 - whatever it was: stay attached, say why
        print(f"jbl: note: cannot detach from {a.job_id}: {e}", file=sys.stderr)
        return False
    try:  # left already (fds 1-2 are the log's): a record not updated is said there
        with store.conn:
            store.conn.execute("UPDATE jobs SET detached=1, logger_pid=?, logger_start=? "
                               "WHERE id=?", (logger, process_start(logger) or 0, a.job_id))
    except Exception as e:  # noqa: BLE001
        print(f"jbl: note: job {a.job_id} left, but its record is not updated: {e}",
              file=sys.stderr)
    finally:
        store.close()
    _set_pdeathsig(0)
    os.setsid()  # no terminal, no process group of the caller's: nothing of theirs reaches it
    a.left = True
    with contextlib.suppress(OSError):  # the front is gone already (killed): none to tell
        os.write(a.tell, LEFT)
    os.close(a.tell)
    return True


def echo(info: signal.struct_siginfo) -> bool:
    """In the supervisor: is ``info`` a second copy of one signal, once sent to it directly
    and once passed on by the front (see the module docstring)?"""
    global _last
    if _armed is None:
        return False
    from_front = info.si_pid == _armed.front and info.si_code != SI_KERNEL
    now = time.monotonic()
    prev, _last = _last, (info.si_signo, from_front, now)
    if (prev is not None and prev[0] == info.si_signo and prev[1] != from_front
            and now - prev[2] < ECHO_WINDOW):
        _last = None  # one pair: a third is a signal of its own
        return True
    return False


def _start_logger(a: _Armed) -> int:
    """The logger (exec'd), reading two new pipes that become this process's fds 1 and 2;
    fd 0 becomes /dev/null. Its pid."""
    import subprocess

    from .jobstore import state_dir

    sys.stdout.flush()
    sys.stderr.flush()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    directory = a.directory or state_dir(os.geteuid())
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-m", "jbl.runner.detach", a.job_id, str(directory),
             str(a.log_limit), str(out_r), str(err_r)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            pass_fds=(out_r, err_r), start_new_session=True, cwd="/",
            env={"PATH": os.defpath})  # none of jbl run's (its -s secrets come from there)
        proc.returncode = 0  # never waited for here: it ends after this process
    except BaseException:
        os.close(out_w)
        os.close(err_w)
        raise
    finally:
        os.close(out_r)
        os.close(err_r)
    null = os.open(os.devnull, os.O_RDWR)
    for src, dst in ((null, 0), (out_w, 1), (err_w, 2)):
        os.dup2(src, dst)
        os.close(src)
    return proc.pid


def _set_pdeathsig(sig: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
