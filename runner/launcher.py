"""The resident launcher: one process per (user, scope) that keeps ``jbl run``'s code loaded
and starts each job in a forked child, so a job does not pay for Python's start and jbl's
imports. ``runner/launchproto.py`` owns the wire format, the scope and the client;
docs/runner.md ("The resident launcher") the prose.

Files, all in the user's own 0700 ``launcher_dir()`` (checked with fusefs/trust.owned_dir,
opened relative to its fd, never following links)::

    K.lock   flock EX, held by the serving launcher for its whole life (so one per scope)
    K.sock   its listening socket (bound under a temporary name, then renamed into place)

Processes, for one ``jbl run`` (the relay is forked *ahead* of its request, as the "spare":
it waits in ``accept`` on the launcher's listener, turns away other uids, and on a request
of its own uid tells the launcher, which forks the next spare)::

    launcher ──fork, ahead──▶ spare relay: accept; SO_PEERCRED == our uid; reads the
                              request, checks the scope, answers "ok"/"no", forwards
                              signal bytes, reports "exit N"
                              └─fork─▶ job process: adopts fds 0-2, cwd, umask,
                                       environment; runs jbl.cli.main.main(argv)

The job process is exactly an in-process ``jbl run`` (records, views, limits, pty relay,
``--detach``), single-threaded, so the runner forks its helper as usual. It owns the job and
its record: a SIGKILLed launcher takes nothing with it (the relay and the job process are
not its threads); a SIGKILLed relay sends the job process SIGHUP (parent-death signal), as
a client that goes away does (EOF), which the runner treats as a hang-up: the job is
stopped and recorded. No launcher state outlives a job: a dead job process is the runner's
usual "lost" case (runner/jobstore.py).

Lifetime: the launcher exits once no relay of its own is alive (its idle spare aside) and
nothing has connected
for ``JBL_VIEW_LINGER`` (the views' idle rule; 0 = it serves nothing), at SIGTERM
(``jbl launcher stop``), or when jbl's code on disk changes (its token; checked every
``TICK``). Exiting, it unlinks its socket, then serves what is already queued on it, then
goes; the lock goes with the process. Closing the spare's stop pipe (or the launcher dying)
ends an idle spare; a spare that took a request relays it to the end.

Not thread-safe and never starts a thread: each child must stay single-threaded.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import signal
import socket
import stat
import sys
import time
from pathlib import Path

from . import launchproto as proto
from .launchrelay import JobSpare, Relay

TICK = 10.0  # seconds between checks of the code token while idle
LOCK_WAIT = 3  # seconds a starting launcher waits for one that is exiting to let go
PRELOAD = ("jbl.cli.main", "jbl.cli.run_cmd", "jbl.cli.job_cmd", "jbl.cli.job_options",
           "jbl.cli.joblet_cmd", "jbl.cli.options", "jbl.cli.output", "jbl.runner.supervise",
           "jbl.runner.jobstore", "jbl.runner.detach", "jbl.fusefs.broker",
           "jbl.store.store", "jbl.store.snapshot", "jbl.store.access", "jbl.store.units",
           "jbl.store.config", "jbl.store.rnxconfig", "resource", "apsw")


class Launcher:
    """The serving process: its directory fd, lock, socket and children."""

    def __init__(self, dfd: int, scope_text: str, linger: float,
                 claimed: str | None = None) -> None:
        self.dfd = dfd
        self.scope = scope_text
        self.claimed = claimed or scope_text  # what "older code" answers (tests only)
        self.key = proto.key(scope_text)
        self.token = scope_text.partition("\n")[0]
        self.linger = linger
        self.lock_fd = -1
        self.listener: socket.socket | None = None
        self.sock_ino = 0
        self.children: set[int] = set()
        self.served = 0
        self.stopping = False
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.taken_r, self.taken_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.spare = 0  # pid of the relay forked ahead, waiting in accept (0: none)
        self.spare_stop = -1  # our end of its stop pipe: closing it ends an idle spare

    # ---- start: lock, then socket -------------------------------------------------------

    def lock(self) -> bool:
        """Take ``K.lock`` (EX), waiting at most LOCK_WAIT for a launcher that is exiting;
        False when another one serves this scope."""
        fd = os.open(f"{self.key}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                     | os.O_CLOEXEC, 0o600, dir_fd=self.dfd)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            os.close(fd)
            return False
        old = signal.signal(signal.SIGALRM, _timed_out)
        signal.alarm(LOCK_WAIT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except TimeoutError:
            os.close(fd)
            return False
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
        self.lock_fd = fd
        return True

    def bind(self) -> None:
        """Listen on ``K.sock``: bound under a temporary name, renamed over a stale one."""
        tmp = f".{self.key}.{os.getpid()}.sock"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=self.dfd)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.bind(f"/proc/self/fd/{self.dfd}/{tmp}")  # any directory path length
        os.chmod(tmp, 0o600, dir_fd=self.dfd)  # ours, just made, in our 0700 directory
        s.listen(64)
        s.setblocking(False)
        self.sock_ino = os.stat(tmp, dir_fd=self.dfd, follow_symlinks=False).st_ino
        os.rename(tmp, f"{self.key}.sock", src_dir_fd=self.dfd, dst_dir_fd=self.dfd)
        self.listener = s

    # ---- the loop ------------------------------------------------------------------------

    def serve(self) -> int:
        assert self.listener is not None
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGINT, self._stop)
        last = time.monotonic()
        checked = last
        self._fork_spare()
        while not self.stopping:
            self._reap()
            now = time.monotonic()
            if self.children:
                last = now
            elif now - last >= self.linger:
                break
            if now - checked >= TICK:
                checked = now
                if proto.token() != self.token:
                    break  # jbl was edited or upgraded: new requests name another scope
            wait = min(TICK, max(0.0, self.linger - (now - last)))
            poller = select.poll()
            poller.register(self.wake_r, select.POLLIN)
            poller.register(self.taken_r, select.POLLIN)
            if not self.spare:  # no spare (it died, or fork failed): accept here
                poller.register(self.listener, select.POLLIN)
            for fd, _ev in poller.poll(wait * 1000):
                if fd == self.wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self.wake_r, 512)
                elif fd == self.taken_r:
                    last = self._taken() or last
                else:
                    last = self._accept_all() or last
        self._close()
        return 0

    # ---- the spare: a relay forked ahead of its request -----------------------------------

    def _fork_spare(self) -> None:
        """Fork the next relay now, so a request's critical path has one fork (the job
        process) instead of two. It waits in ``accept`` on our listener; taking a
        connection of our own uid it writes a byte to ``taken`` and becomes that request's
        relay (then we fork the next one). Turned-away peers never leave it."""
        stop_r, stop_w = os.pipe2(os.O_CLOEXEC)
        try:
            pid = os.fork()
        except OSError:
            os.close(stop_r)
            os.close(stop_w)
            return  # no spare: the loop accepts itself
        if pid == 0:
            os.close(stop_w)
            self._spare(stop_r)  # never returns
        os.close(stop_r)
        self.spare, self.spare_stop = pid, stop_w

    def _spare(self, stop_r: int) -> None:
        code = 1
        try:
            self._forget_launcher()
            assert self.listener is not None
            # its job process, forked ahead too: it prepares while we wait (runner/warm.py)
            job = JobSpare.fork((self.listener.fileno(), self.taken_w, stop_r))
            poller = select.poll()
            poller.register(self.listener, select.POLLIN)
            poller.register(stop_r, select.POLLIN)
            while True:
                ready = dict(poller.poll())
                if stop_r in ready:
                    os._exit(0)  # the launcher is exiting; it serves what is queued
                try:
                    conn, _ = self.listener.accept()
                except (BlockingIOError, InterruptedError):
                    continue  # the launcher, draining at its exit, took it
                if _own_peer(conn):
                    break
                conn.close()
            os.write(self.taken_w, b"1")
            self.listener.close()
            os.close(self.taken_w)
            os.close(stop_r)
            conn.setblocking(True)
            code = Relay(conn, self.claimed, os.getppid(), self.served + 1, job).run()
        except BaseException:
            code = 1
        finally:
            os._exit(code)

    def _taken(self) -> float | None:
        """The spare took a request: it is a relay now; fork the next spare."""
        try:
            n = len(os.read(self.taken_r, 512))
        except BlockingIOError:
            return None
        if n and self.spare:
            self.served += n
            self.children.add(self.spare)
            os.close(self.spare_stop)
            self.spare, self.spare_stop = 0, -1
            self._fork_spare()
        return time.monotonic()

    def _stop(self, _sig: int, _frame: object) -> None:
        self.stopping = True

    def _reap(self) -> None:
        if self.spare:
            with contextlib.suppress(ChildProcessError):
                done, _ = os.waitpid(self.spare, os.WNOHANG)
                if done:  # died idle (killed?): from now on the loop accepts itself
                    self._taken()  # unless it took a request first
                    if self.spare == done:
                        os.close(self.spare_stop)
                        self.spare, self.spare_stop = 0, -1
        for pid in list(self.children):
            with contextlib.suppress(ChildProcessError):
                done, _ = os.waitpid(pid, os.WNOHANG)
                if not done:
                    continue
            self.children.discard(pid)

    def _accept_all(self) -> float | None:
        """Serve everything queued; the time of the last one, or None."""
        assert self.listener is not None
        when = None
        while True:
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return when
            except OSError as e:  # EMFILE and friends: the client falls back in-process
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    return when
                raise
            when = time.monotonic()
            with conn:
                if not _own_peer(conn):
                    continue
                self.served += 1
                try:
                    pid = os.fork()
                except OSError:
                    continue  # the client gets EOF before "ok": it runs the job itself
                if pid == 0:
                    self._child(conn)  # never returns
                self.children.add(pid)

    def _child(self, conn: socket.socket) -> None:
        code = 1
        try:
            self._forget_launcher()
            assert self.listener is not None
            self.listener.close()
            os.close(self.taken_w)
            conn.setblocking(True)
            code = Relay(conn, self.claimed, os.getppid(), self.served).run()
        except BaseException:
            code = 1
        finally:
            os._exit(code)

    def _forget_launcher(self) -> None:
        """In a forked child: none of the launcher's signal handling or files (the lock,
        above all: a child holding it would keep the next launcher out)."""
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        for fd in (self.wake_r, self.wake_w, self.lock_fd, self.dfd, self.taken_r):
            os.close(fd)
        if self.spare_stop >= 0:
            os.close(self.spare_stop)

    def _close(self) -> None:
        """Unlink our socket (only ours), serve what was already queued, then go."""
        assert self.listener is not None
        with contextlib.suppress(OSError):
            st = os.stat(f"{self.key}.sock", dir_fd=self.dfd, follow_symlinks=False)
            if st.st_ino == self.sock_ino:
                os.unlink(f"{self.key}.sock", dir_fd=self.dfd)
        self.stopping = False
        if self.spare:  # an idle spare exits; one that took a request relays it to the end
            os.close(self.spare_stop)
        self._accept_all()
        self.listener.close()


def _own_peer(conn: socket.socket) -> bool:
    """Is the peer our own uid? Anyone else (root included) is told no and turned away."""
    cred = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    if int.from_bytes(cred[4:8], sys.byteorder) == os.geteuid():
        return True
    with contextlib.suppress(OSError):
        conn.send(b"no this launcher serves only its own user\n")
    return False


def _timed_out(_sig: int, _frame: object) -> None:
    raise TimeoutError  # a handler that returns would let PEP 475 retry flock forever


def _directory(path: str) -> int | None:
    """An fd on our own 0700 launcher directory (made if missing), or None if unsafe."""
    from jbl.fusefs import trust

    # root's /run/jbl is read by everyone (the shared mount's records); a user's state
    # directory is theirs alone (the job records expect 0700 if we are first to make it)
    return trust.own_dir(Path(path), 0o755 if os.geteuid() == 0 else 0o700)


def preload() -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    import grp
    import pwd

    from jbl.cli.main import build_parser, keep_parsers

    # the name service's modules (NSS), loaded by the first lookup: the job records and
    # the job's /etc/passwd name the user
    with contextlib.suppress(KeyError):
        pwd.getpwuid(os.geteuid())
        grp.getgrgid(os.getegid())
    keep_parsers()
    # once, and argparse's lazily imported parts and regular expressions with it
    build_parser(["run"]).parse_known_args(["run", "--runtime-dir", "/", "--", "true"])
    import gc

    # Everything loaded so far lives as long as the launcher: out of the collector's sight,
    # a forked child's collections do not write to (and so copy) the pages it shares.
    gc.freeze()


def serve_main(claim_token: str | None = None) -> int:
    """``python -m jbl.runner.launcher serve``: become this scope's launcher, or exit 0 at
    once when one already serves or when nothing may linger."""
    scope_text = proto.scope()  # before any import: code changed since is never claimed
    from jbl.store.errors import JblError
    from jbl.store.settings import resolve

    try:
        settings = resolve(os.environ, action="run")
        linger = settings.view_linger
    except JblError:
        return 2
    if linger <= 0 or not proto.switches()[0]:
        return 0
    dfd = _directory(proto.launcher_dir())
    if dfd is None:
        return 1
    claimed = None
    if claim_token is not None:  # tests: a launcher that says it runs other code
        claimed = claim_token + "\n" + scope_text.partition("\n")[2]
    me = Launcher(dfd, scope_text, linger, claimed)
    if not me.lock():
        return 0
    preload()
    me.bind()
    return me.serve()


def main(argv: list[str]) -> int:
    if argv[:1] == ["serve"]:
        claim = argv[2] if argv[1:2] == ["--claim-token"] and len(argv) > 2 else None
        return serve_main(claim)
    print("usage: python -m jbl.runner.launcher serve", file=sys.stderr)
    return 2


if __name__ == "__main__":
    status = main(sys.argv[1:])
    sys.stderr.flush()
    os._exit(status)  # the lock goes with the process: now, not after every module's teardown
