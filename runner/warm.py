"""What a launcher's job process makes ready before its request arrives, so a short job's
start pays only for what depends on the request (runner/launcher.py, launchrelay.py).

* **The job id**, and **a cgroup** named for it, made with no limits; the request's limits
  are written into it (``JobCgroup.limit``) when they fit (``JobCgroup.fits``: the default
  parent, no cpuset, io or device rules).
* **The sandbox helper**, exec'd ahead as a small interpreter of its own
  (``python -I -S sandbox.py --wait``, ``sandbox.wait_main``) and moved into that cgroup
  once it is up. Moving a process into a cgroup waits for an RCU grace period (~10 ms
  here, v1 and v2 alike): the largest single cost of a short job's start, now paid while
  idle. Its start-up pages stay charged where they were; the job's limits count what it
  does from its plan on. Being small, its forks (init, the job) are cheap.
* **The job-record database**, open (``JobStore.open_own``), for the records directory the
  launcher's environment names; a request that names another one opens its own.
* **The store and its view** for ``jbl run --runtime NAME`` (runner/warmview.py): the
  index open, the view found; a request checks both before it uses them.

Anything the request does not use is discarded at the end (``discard``): the helper gets
EOF and exits, its cgroup is removed. Failing to prepare a part only means the request does
that part itself, as an in-process ``jbl run`` always does (``current`` is None there).
Everything here belongs to the process that prepared it (``owner``): a process forked from
it (``jbl run`` with a terminal, runner/foreground.py) finds nothing.
"""

from __future__ import annotations

import contextlib
import marshal
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # socket and select only where a launcher's job process uses them
    import socket

READY_WAIT = 5.0  # s a helper may take to start before it is given up


class Helper:
    """A sandbox helper waiting for its plan, and the cgroup it is in."""

    def __init__(self, pid: int, sock: socket.socket, cgroup: Any) -> None:
        self.pid = pid
        self.sock = sock
        self.cgroup = cgroup
        self.netns = False  # in a network namespace of its own, loopback up (root only)

    @classmethod
    def start(cls, job_id: str) -> Helper | None:
        import select
        import socket

        from .cgroups import JobCgroup
        from .plan import Limits
        from .supervise import SANDBOX

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            os.set_inheritable(theirs.fileno(), True)
            net = ["--net"] if os.geteuid() == 0 else []  # a user's needs a user namespace
            pid = os.posix_spawn(sys.executable, [
                sys.executable, "-I", "-S", SANDBOX, "--wait", str(theirs.fileno()),
                str(os.getpid()), *net], {})
        except OSError:
            ours.close()
            return None
        finally:
            theirs.close()
        me = cls(pid, ours, None)
        try:
            ready, _, _ = select.select([ours], [], [], READY_WAIT)
            word = ours.recv(1) if ready else b""
            if word not in (b"R", b"N"):
                raise OSError("the helper did not start")
            me.netns = word == b"N"
            me.cgroup = JobCgroup.create(job_id, Limits())
            for f in me.cgroup.procs_files:
                fd = os.open(f, os.O_WRONLY | os.O_CLOEXEC)
                try:
                    os.write(fd, str(pid).encode())
                finally:
                    os.close(fd)
        except OSError:
            me.discard()
            return None
        return me

    def launch(self, wire: dict[str, Any], status_w: int, stdio: tuple[int, int, int]) -> int:
        """Hand the helper its plan (``Plan.to_wire``), the status pipe's write end and the
        job's stdio; it runs the plan as a forked helper would. Its pid."""
        import socket

        umask = os.umask(0o022)
        os.umask(umask)
        if self.netns:  # its network namespace is made, its loopback up
            steps = [dict(s, net=False) if s["op"] == "unshare" else s
                     for s in wire["steps"] if s["op"] != "loopback_up"]
            wire = dict(wire, steps=steps)
        body = marshal.dumps({"umask": umask, "plan": wire})
        data = len(body).to_bytes(4, "big") + body
        fds = [status_w, *stdio]
        sent = self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                           b"".join(fd.to_bytes(4, sys.byteorder)
                                                    for fd in fds))])
        if sent < len(data):
            self.sock.sendall(data[sent:])
        self.sock.close()
        return self.pid

    def discard(self) -> None:
        """Not needed: EOF ends the helper; then its cgroup goes."""
        self.sock.close()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        if self.cgroup is not None:
            self.cgroup.remove()


class Warm:
    """What one job process made ready (not a dataclass: ~0.5 ms of every start)."""

    def __init__(self, owner: int, job_id: str) -> None:
        self.owner = owner
        self.job_id = job_id
        self.helper: Helper | None = None
        self.records: Any = None  # runner.jobstore.JobStore, open
        self.records_dir: Path | None = None  # what it was opened for (None: state dir)
        self.records_ino = (0, 0)
        self.runtime: Any = None  # runner.warmview.Ahead

    def discard(self) -> None:
        if self.runtime is not None:
            self.runtime.close()
            self.runtime = None
        if self.helper is not None:
            self.helper.discard()
            self.helper = None
        if self.records is not None:
            with contextlib.suppress(Exception):
                self.records.close()
            self.records = None


current: Warm | None = None
relay: socket.socket | None = None  # a job spare's line to its relay (report_exit)


def prepare() -> None:
    """In a launcher's job process, before its request: make ``current``."""
    global current
    from .plan import new_job_id

    warm = Warm(os.getpid(), new_job_id())
    warm.helper = Helper.start(warm.job_id)
    with contextlib.suppress(Exception):
        from jbl.store.settings import resolve

        from .jobstore import DB_NAME, JobStore, chosen_dir

        warm.records_dir = chosen_dir(resolve(os.environ).var("JBL_JOBS_DIR"))
        warm.records = JobStore.open_own(warm.records_dir)
        st = os.stat(warm.records.where / DB_NAME)
        warm.records_ino = (st.st_dev, st.st_ino)
        _rehearse(warm.records)
    with contextlib.suppress(Exception):
        from . import warmview

        warm.runtime = warmview.prepare()
    current = warm


def _rehearse(store: Any) -> None:
    """Write a record and its end, then roll both back: the schema is read and both
    statements are compiled (and kept) now, not on the job's path (~1 ms)."""
    conn = store.conn
    conn.execute("BEGIN IMMEDIATE")
    try:
        rec = {"id": "job-rehearsal", "runtime": "-", "command": [], "supervisor_pid": 0,
               "supervisor_start": 0}
        store.begin(rec)
        store.finish(rec["id"], exit_status=0, reason="exited")
    finally:
        conn.execute("ROLLBACK")


def _mine() -> Warm | None:
    return current if current is not None and current.owner == os.getpid() else None


def job_id() -> str | None:
    """The id the prepared parts are named for, or None (then the request makes one)."""
    w = _mine()
    return w.job_id if w is not None else None


def take_helper(job: str, limits: Any, devices: Any, parent: str | None,
                network: str) -> Helper | None:
    """The prepared helper and its cgroup, when they fit job ``job`` with these limits and
    this ``--network``; otherwise they are discarded now (the job makes its own, under the
    same name)."""
    w = _mine()
    if w is None or w.helper is None:
        return None
    helper, w.helper = w.helper, None
    if job == w.job_id and helper.cgroup.fits(limits, devices, parent) and (
            network == "none" or not helper.netns):
        return helper
    helper.discard()
    return None


def take_records(directory: Path | None) -> Any:
    """The open job-record database for ``directory`` (None: the state directory), if it
    is the one prepared and still the same file; else None."""
    w = _mine()
    if w is None or w.records is None:
        return None
    store, w.records = w.records, None
    from .jobstore import DB_NAME

    try:
        st = os.stat(store.where / DB_NAME)
        if directory == w.records_dir and (st.st_dev, st.st_ino) == w.records_ino:
            return store
    except OSError:
        pass
    store.close()
    return None


def take_runtime() -> Any:
    """The prepared store and view (runner.warmview.Ahead), or None; once."""
    w = _mine()
    if w is None:
        return None
    ahead, w.runtime = w.runtime, None
    return ahead


def discard() -> None:
    """At the job process's end: whatever it did not use."""
    w = _mine()
    if w is not None:
        w.discard()


def report_exit(code: int) -> None:
    """The job's exit status, to the relay now (it tells the client at once), ahead of
    this process's own teardown; once. Call it only after the record says the job ended."""
    global relay
    if relay is not None and current is not None and current.owner == os.getpid():
        with contextlib.suppress(OSError):
            relay.sendall(f"exit {int(code)}\n".encode())
        relay.close()
        relay = None


def fast_exit() -> bool:
    """Does this process end with ``os._exit`` right after its job (a launcher's job
    process)? Then closing what the kernel closes anyway can be skipped (an SQLite
    connection: its commits are in the WAL already)."""
    return _mine() is not None
