"""One launcher request, in the launcher's forked child (the *relay*): read and check the
request, fork the *job process* that runs ``jbl run`` exactly as an in-process one would,
forward the client's signal bytes to it, and report its exit status.

The request is bounded (``REQUEST_MAX`` bytes, ``REQUEST_TIMEOUT`` seconds, exactly four
passed fds) and must name this launcher's scope (launchproto.py); anything else is answered
``no <reason>`` before anything starts, and the client runs the job itself.

The job process adopts the caller's fds 0-2 (``dup2``), cwd (``fchdir`` on the passed
``O_PATH`` fd), umask and environment, keeps no other fd of the launcher's, sets a
parent-death signal of SIGHUP (a relay that dies is a caller that hung up), and runs
``jbl.cli.main.main(argv)`` on the main (only) thread; its status, or 128+N if it was
killed by signal N, is what the client exits with.

Not thread-safe; runs in a single-threaded forked child and ends with ``os._exit``.
"""

from __future__ import annotations

import contextlib
import marshal
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable

from . import launchproto as proto

FDS = 4  # 0, 1, 2 and the cwd


class Refused(Exception):
    """The request cannot be served: the reason goes back as ``no <reason>``."""


class JobSpare:
    """The job process forked *ahead* of its request by a spare relay: it prepares what it
    can while idle (runner/warm.py: job id, cgroup, sandbox helper, job records), then waits
    on a socket pair for the request the relay took (``start``); EOF instead means nobody
    needs it (the relay served ``status``, or is an idle spare being ended)."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self.sock = sock

    @classmethod
    def fork(cls, close: tuple[int, ...]) -> JobSpare | None:
        """Fork it; ``close``: the relay's fds the job process must not keep."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        relay = os.getpid()
        try:
            pid = os.fork()
        except OSError:
            ours.close()
            theirs.close()
            return None
        if pid == 0:
            code = 1
            try:
                ours.close()
                for fd in close:
                    os.close(fd)
                _job_spare(theirs, relay)  # never returns
            finally:
                os._exit(code)
        theirs.close()
        return cls(pid, ours)

    def start(self, fds: list[int], caller: int, argv: list[str], env: dict[bytes, bytes],
              umask: int) -> None:
        """Hand it the request and the caller's four fds (0, 1, 2, cwd)."""
        body = marshal.dumps((caller, argv, env, umask))
        data = len(body).to_bytes(4, "big") + body
        sent = self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, b"".join(
            fd.to_bytes(4, sys.byteorder) for fd in fds))])
        if sent < len(data):
            self.sock.sendall(data[sent:])
        self.sock.shutdown(socket.SHUT_WR)  # it may still say its exit status early


def _job_spare(sock: socket.socket, relay: int) -> None:
    """The job spare's life: prepare, wait for the request, then run it as
    ``_job_process`` does; EOF: discard what was prepared and go."""
    from . import warm

    warm.prepare()
    try:
        data, anc, flags, _ = sock.recvmsg(1 << 16, socket.CMSG_SPACE(FDS * 4),
                                           socket.MSG_CMSG_CLOEXEC)
        fds = [int.from_bytes(payload[i:i + 4], sys.byteorder, signed=True)
               for level, kind, payload in anc
               if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
               for i in range(0, len(payload) - len(payload) % 4, 4)]
        size = int.from_bytes(data[:4], "big") if len(data) >= 4 else -1
        while data and (size < 0 or len(data) < 4 + size):
            more = sock.recv(1 << 20)
            if not more:
                break
            data += more
            if size < 0 and len(data) >= 4:
                size = int.from_bytes(data[:4], "big")
    except OSError:
        data = b""
    if not data or size < 0 or len(data) != 4 + size or len(fds) != FDS or \
            flags & socket.MSG_CTRUNC:
        warm.discard()
        os._exit(0)
    caller, argv, env, umask = marshal.loads(data[4:])
    warm.relay = sock  # for report_exit
    _job_process(None, fds, relay, caller, argv, env, umask)  # never returns


class Relay:
    def __init__(self, conn: socket.socket, scope_text: str, launcher_pid: int,
                 served: int, spare: JobSpare | None = None) -> None:
        self.conn = conn
        self.scope = scope_text
        self.launcher_pid = launcher_pid
        self.served = served
        self.fds: list[int] = []
        self.spare = spare

    def run(self) -> int:
        try:
            op, argv, env, umask = self._request()
        except Refused as e:
            self._say(f"no {e}")
            return 0
        finally:
            self.conn.settimeout(None)
        if op == "status":
            self._say(f"ok 0 {self.launcher_pid} {self.served}")
            return 0
        if op == "stop":
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.launcher_pid, signal.SIGTERM)
            self._say(f"ok 0 {self.launcher_pid} {self.served}")
            return 0
        if not self._committed():
            return 0  # the client gave up (and runs the job itself) or went away
        me = os.getpid()
        caller = int.from_bytes(self.conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                     12)[:4], sys.byteorder)
        if self.spare is not None:
            pid = self.spare.pid
            try:
                self.spare.start(self.fds, caller, argv, env, umask)
            except OSError:
                return 0  # it died idle: EOF before "ok", the client runs the job itself
        else:
            pid = os.fork()
            if pid == 0:
                _job_process(self.conn, self.fds, me, caller, argv, env, umask)  # never returns
        for fd in self.fds:  # only the job process holds the caller's files now
            os.close(fd)
        self._say(f"ok {pid} {self.launcher_pid} {self.served}")
        status = self._relay(pid)
        if status is not None:  # else the job process said it early (warm.report_exit)
            self._say(f"exit {status}")
        return 0

    def _committed(self) -> bool:
        """``ready``, then the client's ``g`` within REQUEST_TIMEOUT: only then may the job
        start (a client that timed out before ``ready`` runs it itself)."""
        self._say("ready")
        self.conn.settimeout(proto.REQUEST_TIMEOUT)
        try:
            return self.conn.recv(1) == proto.GO
        except OSError:
            return False
        finally:
            self.conn.settimeout(None)

    def _say(self, line: str) -> None:
        with contextlib.suppress(OSError):
            self.conn.sendall(line.encode("ascii", "replace") + b"\n")

    # ---- the request ------------------------------------------------------------------------

    def _request(self) -> tuple[str, list[str], dict[bytes, bytes], int]:
        deadline = time.monotonic() + proto.REQUEST_TIMEOUT
        data = self._first(deadline)
        while len(data) < 8:
            data += self._recv(deadline, 8 - len(data))
        if data[:4] != proto.PROTO:
            raise Refused("not a launcher request of this version")
        size = int.from_bytes(data[4:8], "big")
        if size > proto.REQUEST_MAX:
            raise Refused(f"request of {size} bytes is over {proto.REQUEST_MAX}")
        body = bytearray(data[8:])
        while len(body) < size:
            body += self._recv(deadline, size - len(body))
        if len(body) != size:
            raise Refused("request longer than it said")
        return self._parse(bytes(body))

    def _first(self, deadline: float) -> bytes:
        self.conn.settimeout(max(0.0, deadline - time.monotonic()))
        try:
            data, anc, flags, _ = self.conn.recvmsg(
                65536, socket.CMSG_SPACE(FDS * 4), socket.MSG_CMSG_CLOEXEC)
        except OSError as e:
            raise Refused(f"request not read: {e}") from None
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % 4
                self.fds.extend(int.from_bytes(payload[i:i + 4], sys.byteorder, signed=True)
                                for i in range(0, usable, 4))
        if flags & socket.MSG_CTRUNC or len(self.fds) != FDS:
            raise Refused(f"expected {FDS} file descriptors")
        return data

    def _recv(self, deadline: float, n: int) -> bytes:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Refused("request not read in time")
        self.conn.settimeout(left)
        try:
            data = self.conn.recv(min(n, 1 << 20))
        except OSError as e:
            raise Refused(f"request not read: {e}") from None
        if not data:
            raise Refused("request cut short")
        return data

    def _parse(self, body: bytes) -> tuple[str, list[str], dict[bytes, bytes], int]:
        fields = body.split(b"\0")
        if len(fields) < 4:
            raise Refused("malformed request")
        op = fields[0].decode("ascii", "replace")
        if op not in ("run", "status", "stop"):
            raise Refused(f"unknown operation {op!r}")
        if fields[1] != self.scope.encode():
            raise Refused("a launcher of other code or another scope")
        try:
            umask, argc = int(fields[2]), int(fields[3])
        except ValueError:
            raise Refused("malformed request") from None
        if not 0 <= argc <= len(fields) - 4 or not 0 <= umask <= 0o777:
            raise Refused("malformed request")
        argv = [os.fsdecode(a) for a in fields[4:4 + argc]]
        env: dict[bytes, bytes] = {}
        for item in fields[4 + argc:]:
            k, eq, v = item.partition(b"=")
            if eq and k:
                env[k] = v
        return op, argv, env, umask

    # ---- while the job process runs -------------------------------------------------------

    def _relay(self, pid: int) -> int | None:
        """Forward signal bytes to ``pid`` until it ends; its exit status (128+N: signal N),
        or None when the job process (a spare's) reported it early: then it was passed on
        at once, before the job process's own teardown. EOF from the client is a hang-up:
        SIGHUP, once."""
        pidfd = os.pidfd_open(pid)
        allowed = {int(s) for s in proto.FORWARD}
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        poller.register(self.conn, select.POLLIN)
        early = self.spare.sock if self.spare is not None else None
        if early is not None:
            poller.register(early, select.POLLIN)
        said = False
        try:
            while True:
                events = dict(poller.poll())
                if pidfd in events:
                    _, wstatus = os.waitpid(pid, 0)
                    code = os.waitstatus_to_exitcode(wstatus)
                    return None if said else code if code >= 0 else 128 - code
                if early is not None and early.fileno() in events:
                    poller.unregister(early)
                    line = b""
                    with contextlib.suppress(OSError):
                        line = early.recv(64)
                    if line.startswith(b"exit ") and line[5:].strip().isdigit():
                        self._say(f"exit {int(line[5:])}")
                        said = True
                    continue
                if events:
                    try:
                        data = self.conn.recv(64)
                    except OSError:
                        data = b""
                    if not data:
                        poller.unregister(self.conn)
                        data = bytes([signal.SIGHUP])
                    for sig in data:
                        if sig in allowed:
                            with contextlib.suppress(ProcessLookupError):
                                signal.pidfd_send_signal(pidfd, sig)
        finally:
            os.close(pidfd)


def _job_process(conn: socket.socket | None, fds: list[int], relay: int, caller: int,
                 argv: list[str], env: dict[bytes, bytes], umask: int) -> None:
    code = 1
    try:
        from .sandbox import PR_SET_PDEATHSIG, libc

        libc.prctl(PR_SET_PDEATHSIG, signal.SIGHUP, 0, 0, 0)
        if conn is not None:
            conn.close()
        if os.getppid() != relay:  # the relay died before the parent-death signal was set
            os._exit(128 + signal.SIGHUP)
        _adopt(fds, env, umask)
        from . import terminal

        # Not in the caller's session, our tcgetpgrp() of its terminal fails: whether the
        # caller is in its terminal's foreground (raw mode, runner/terminal.py) is the
        # caller's own fact, read from its /proc entry on every ask.
        terminal.is_foreground = _foreground_of(caller)  # type: ignore[assignment]
        sys.argv = ["jbl", *argv]
        from jbl.cli.main import main

        try:
            code = main(argv)
        except SystemExit as e:  # argparse's --help, as the console script would exit
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        from . import warm

        warm.discard()  # what the job did not use (a job refused before it started)
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _foreground_of(pid: int) -> Callable[[int], bool]:
    """``terminal.is_foreground`` for the job process: is process ``pid`` (the client) in
    the foreground process group of the terminal ``fd``, its controlling terminal?"""

    def is_foreground(fd: int) -> bool:
        try:
            rdev = os.fstat(fd).st_rdev
            with open(f"/proc/{pid}/stat", "rb") as f:
                data = f.read(4096)
            # after "(comm)": state ppid pgrp session tty_nr tpgid
            fields = data[data.rindex(b")") + 2:].split()
            return int(fields[4]) == rdev and int(fields[5]) == int(fields[2])
        except (OSError, ValueError, IndexError):
            return False

    return is_foreground


def _adopt(fds: list[int], env: dict[bytes, bytes], umask: int) -> None:
    """Become the caller: its fds 0-2, cwd, umask and environment, and Python's stdio on
    them (line-buffered on a terminal, as at start-up)."""
    for target, fd in enumerate(fds[:3]):
        os.dup2(fd, target, inheritable=True)
    os.fchdir(fds[3])
    for fd in fds:
        if fd > 2:
            os.close(fd)
    os.umask(umask)
    os.environb.clear()
    os.environb.update(env)
    enc, errors = sys.stdout.encoding, sys.stdout.errors or "strict"
    sys.stdin = open(0, encoding=enc, errors=errors, closefd=False)  # noqa: SIM115
    sys.stdout = open(1, "w", buffering=1 if os.isatty(1) else -1, encoding=enc,  # noqa: SIM115
                      errors=errors, closefd=False)
    sys.stderr = open(2, "w", buffering=1, encoding=enc, errors="backslashreplace",  # noqa: SIM115
                      closefd=False)
