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
  does from then on. Being small, its forks (init, the job) are cheap.
* **The plan's first steps**, those that depend on no request (``ahead_steps``), asked
  for last (their forks and mounts would only slow the rest here on a busy host) and once
  in the cgroup (so init and the job are in it, and the cgroup namespace's root is the
  job's cgroup): the helper leaves the session, sets no_new_privs, makes the PID, IPC, UTS
  and cgroup namespaces (a user's: in a user namespace, its ids mapped to themselves) and
  forks init. A plan that starts otherwise (``Helper.remaining``: other namespaces,
  another order) does not take the helper. Init makes the mount namespace with the request
  (``UnshareLate``): made ahead, it would be a copy of the host's mounts as they were then,
  and the host's ``/`` is private here (a view or volume mounted since would be missing).
  The network namespace is not made ahead either (``--network host`` has none): root's
  helper makes one before it says it is up (its loopback too), a user's init makes it with
  the mount namespace.
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
        self.ahead: tuple[Any, ...] = ()  # the plan steps it carried out ahead (ahead_steps)

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

    def go_ahead(self) -> bool:
        """Have it carry out ``ahead_steps`` now (it is in the cgroup); False: it is gone."""
        self.ahead = ahead_steps(os.geteuid(), os.getegid())
        try:
            self._send({"steps": [s.to_wire() for s in self.ahead]})
        except OSError:
            return False
        return True

    def remaining(self, steps: tuple[Any, ...]) -> list[Any] | None:
        """What is left of a plan's ``steps`` for this helper, or None if it does not
        fit: the plan must start with the steps done ahead (its cgroup aside: the helper is
        in it already), then init makes the namespaces left to it (``UnshareLate``: the
        mount namespace, and the network namespace when the plan has one and the helper
        has not) and goes on with the plan."""
        from .plan import JoinCgroup, LoopbackUp, Unshare, UnshareLate

        rest = [s for s in steps if not isinstance(s, JoinCgroup)]
        unshare = next((s for s in rest if isinstance(s, Unshare)), None)
        if unshare is None or not unshare.mount or (self.netns and not unshare.net):
            return None
        rest = [Unshare(unshare.user, False, False) if s is unshare else s for s in rest]
        if rest[:len(self.ahead)] != list(self.ahead):
            return None
        rest = rest[len(self.ahead):]
        if self.netns:  # its network namespace is made, its loopback up
            rest = [s for s in rest if not isinstance(s, LoopbackUp)]
        return [UnshareLate(mount=True, net=unshare.net and not self.netns), *rest]

    def launch(self, plan: Any, status_w: int, stdio: tuple[int, int, int]) -> int:
        """Hand the helper what is left of ``plan`` (``remaining``; it was taken for it),
        the status pipe's write end and the job's stdio; it runs them as a forked helper
        would. Its pid."""
        umask = os.umask(0o022)
        os.umask(umask)
        rest = self.remaining(plan.steps)
        if rest is None:
            raise OSError("the helper made ahead does not fit the plan")
        wire = {"job_id": plan.job_id, "steps": [s.to_wire() for s in rest]}
        self._send({"umask": umask, "plan": wire}, [status_w, *stdio])
        self.sock.close()
        return self.pid

    def _send(self, msg: dict[str, Any], fds: list[int] | None = None) -> None:
        """One message (sandbox.Inbox): a 4-byte length, ``marshal`` data, ``fds``."""
        import socket

        body = marshal.dumps(msg)
        data = len(body).to_bytes(4, "big") + body
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds))] if fds else []
        sent = self.sock.sendmsg([data], anc)
        if sent < len(data):
            self.sock.sendall(data[sent:])

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


def ahead_steps(uid: int, gid: int) -> tuple[Any, ...]:
    """The steps a waiting helper of user ``uid`` carries out before its request: the
    plan's (plan.build_plan) up to the fork of init, but for the mount and network
    namespaces. The mount namespace would be a copy of the host's mounts as they were
    then (the host's ``/`` is private here: nothing mounted since, a view or a volume's
    filesystem, would reach it), so init makes it with the request (``UnshareLate``)."""
    from .plan import ForkInit, IdMap, NewSession, NoNewPrivs, Unshare

    user = uid != 0  # root: --user keeps it out of a user namespace too
    ids = [IdMap(uid, gid)] if user else []
    return (NewSession(), NoNewPrivs(), Unshare(user=user, net=False, mount=False), *ids,
            ForkInit())


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
    # last: its forks and mounts would only slow what is prepared here on a busy host
    if warm.helper is not None and not warm.helper.go_ahead():
        warm.helper.discard()
        warm.helper = None
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


def take_helper(plan: Any, parent: str | None) -> Helper | None:
    """The prepared helper and its cgroup, when they fit ``plan`` (its job id, limits,
    devices and steps) under cgroup ``parent``; otherwise they are discarded now (the job
    makes its own, under the same name)."""
    w = _mine()
    if w is None or w.helper is None:
        return None
    helper, w.helper = w.helper, None
    if plan.job_id == w.job_id and helper.cgroup.fits(plan.limits, plan.devices, parent) \
            and helper.remaining(plan.steps) is not None:
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
