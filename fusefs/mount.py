"""Mount lifecycle: serve a store on a mountpoint, start it as a daemon, find, stop, recover.

    serve(...)          in this process: the one serve skeleton of both engines (mount, run
                        the engine, stop on a signal / the parent's death / idleness:
                        fusefs/stop.py, unmount only if the mount is still ours)
    spawn(...)          start the daemon (fusefs/daemon.py) detached; return once the mount
                        is ready (a line on a pipe), or raise MountError with the reason
    status(store_dir)   the live or stale mounts of one store (pid, since, state)
    unmount(mp)         stop the daemon (SIGTERM) or, if it died, detach the stale mount

Which daemon serves which mountpoint is the per-host mount table (fusefs/mounttab.py): each
daemon records itself in its user's own directory (root: /run/jbl/mounts) once the mount is
up and removes the record at clean exit, so a mountpoint alone finds its daemon. A record
whose daemon is dead while the mount is still there is a stale mount: ``jbl umount`` or the
next ``jbl mount`` on that mountpoint cleans it; a record with neither is deleted when read.

Thread-safety: functions here run in the CLI's (or the runner's) main thread; ``serve`` owns
its process (pyfuse3 allows one mount per process).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from jbl.store.errors import MountError
from jbl.store.settings import REMOVED_HOLD_LIMIT
from jbl.store.store import Store, pid_alive, proc_starttime
from jbl.store.storepath import require_store

from . import linger as lingermod
from .linger import IdleWatch
from .mounttab import (
    FSTYPE,
    MountStatus,
    force_unmount,
    fs_source,
    is_stale,
    log_path,
    mount_at,
    mount_fstype,
    open_log,
    read_log_tail,
    write_record,
)
from .mounttab import find as find_record
from .mounttab import records as all_records
from .stop import Stop

if TYPE_CHECKING:
    import subprocess  # imported by spawn(): the daemon itself never needs it (~2 ms)

log = logging.getLogger("jbl.fusefs")

ENGINES = ("raw", "pyfuse3")
DEFAULT_ENGINE = "raw"  # docs/mount.md: measured, passes every mount test
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


def status(store_dir: Path | str) -> list[MountStatus]:
    """The live or stale mounts serving ``store_dir`` (dead ones are pruned on the way)."""
    real = os.path.realpath(store_dir)
    return [s for s in all_records() if os.path.realpath(s.store) == real]


def _record(store_dir: Path, mountpoint: Path, allow_other: bool, private: bool,
            engine: str, idle: IdleWatch | None = None) -> Path:
    pid = os.getpid()
    st = MountStatus(str(mountpoint), str(store_dir), pid, proc_starttime(pid) or 0,
                     time.time(), allow_other, private, engine,
                     (mount_at(mountpoint) or ("", ""))[1], os.geteuid(),
                     idle.seconds if idle is not None else 0.0)
    return write_record(st)


# --- serving ----------------------------------------------------------------------------
def check_mountpoint(mountpoint: Path, *, nonempty: bool = True) -> None:
    """Refuse what cannot be mounted; recover a stale jbl mount left by a dead daemon.
    ``nonempty=False``: also refuse a directory with something in it, which the mount would
    hide (``jbl mount`` without ``--nonempty``, as fusermount3 without ``-o nonempty``)."""
    if is_stale(mountpoint):
        log.warning("%s: stale jbl mount (its daemon died); detaching it", mountpoint)
        force_unmount(mountpoint)
    if not mountpoint.is_dir():
        raise MountError(f"mountpoint {mountpoint} is not a directory",
                         hint="create it first: mkdir -p " + str(mountpoint))
    if mount_fstype(mountpoint) == FSTYPE:
        raise MountError(f"{mountpoint} is already a jbl mount",
                         hint="see `jbl mount --status`; `jbl umount` it first")
    if not nonempty:
        try:
            with os.scandir(mountpoint) as it:
                first = next(it, None)
        except OSError as e:
            raise MountError(f"cannot list mountpoint {mountpoint}: {e.strerror}") from None
        if first is not None:
            raise MountError(f"mountpoint {mountpoint} is not empty (it holds {first.name!r}, "
                             "which the mount would hide)",
                             hint="use an empty directory, or --nonempty to mount over it")


class Engine(Protocol):
    """What the serve skeleton needs from an engine (rawmount.RawEngine: /dev/fuse spoken
    directly; pyfuse3mount.Pyfuse3Engine: libfuse through pyfuse3). An engine decodes
    requests and encodes replies; the skeleton owns everything around that."""

    name: str
    stats: dict[str, int]

    def busy(self) -> dict[str, int]:
        """Nanoseconds spent so far per opcode and per kind of read work, and the chunk
        cache's counters (``kill -USR1``: docs/mount.md, "Where the time goes")."""

    def mount(self, mountpoint: Path, allow_other: bool, source: str) -> None:
        """Mount ``mountpoint``; raise (anything) if that failed, having undone it."""

    def run(self, stop: Stop, ready: Callable[[], None]) -> None:
        """Serve until ``stop.check()`` or the kernel ends the mount; ``ready()`` once
        requests are being served."""

    def close(self, unmount: bool) -> None:
        """Release everything; detach the mount too when ``unmount``."""


def _engine(name: str, store: Store, store_dir: Path, hold_limit: float | None) -> Engine:
    if name == "raw":
        from .rawmount import RawEngine

        return RawEngine(store, store_dir, hold_limit)
    try:
        from .pyfuse3mount import Pyfuse3Engine
    except ImportError as e:  # an optional engine: say so, and name the one that works
        raise MountError(f"the pyfuse3 mount engine is not available here ({e})",
                         hint="use the raw engine: --engine raw (the default)") from None
    return Pyfuse3Engine(store, store_dir, hold_limit)


def serve(store_dir: Path, mountpoint: Path, *, allow_other: bool = False,
          ready: Callable[[str | None], None] | None = None, private: bool = False,
          parent_pid: int | None = None, engine: str = DEFAULT_ENGINE,
          idle: IdleWatch | None = None,
          hold_limit: float | None = REMOVED_HOLD_LIMIT) -> None:
    """Mount ``store_dir`` on ``mountpoint`` and serve until SIGTERM/SIGINT/SIGHUP or unmount:
    the one serve skeleton of both engines (``engine``: "raw" or "pyfuse3").

    ``ready(None)`` is called once requests are being served; ``ready(reason)`` if mounting
    failed (then MountError is raised too). With ``parent_pid``, the mount ends when that
    process does (the runner's per-job view); with ``idle``, once no job has held it for
    ``idle.seconds`` (the lingering view, fusefs/linger.py): fusefs/stop.py. ``hold_limit``:
    seconds a removed version stays held for whoever still uses it (fusefs/leases.py; None:
    forever). At the end the mount is detached only if the one at the path is still ours."""
    def failed(reason: str) -> None:
        if ready:
            ready(reason)

    if engine not in ENGINES:
        failed(f"unknown mount engine {engine!r}")
        raise MountError(f"unknown mount engine {engine!r}", hint="use raw or pyfuse3")
    mountpoint = Path(os.path.realpath(mountpoint))
    store_dir = Path(os.path.realpath(store_dir))
    try:
        check_mountpoint(mountpoint)
        require_store(store_dir, "mount")  # never create one (a typo'd --store, a removed one)
        store = Store.open(store_dir, readonly=True)
    except Exception as e:
        failed(str(e))
        raise
    try:
        eng = _engine(engine, store, store_dir, hold_limit)
        eng.mount(mountpoint, allow_other, fs_source(store_dir))
    except Exception as e:
        store.close()
        reason = str(e) if isinstance(e, MountError) else f"cannot mount {mountpoint}: {e}"
        failed(reason)
        if isinstance(e, MountError):
            raise
        raise MountError(reason) from None
    our_dev = (mount_at(mountpoint) or ("", ""))[1]
    status_file = _record(store_dir, mountpoint, allow_other, private, engine, idle)
    stop = Stop(parent_pid, idle)

    def on_signal(signum: int, _frame: object) -> None:
        stop.request(f"signal {signum}")

    def dump(_signum: int, _frame: object) -> None:
        log.info("requests so far: %s", eng.stats)  # `kill -USR1 PID`: what reached us
        log.info("time spent so far (ns), chunk cache: %s", eng.busy())

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT,
                                                    signal.SIGHUP)}
    old[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, dump)
    try:
        log.info("mounted %s on %s (pid %d, %s engine)", store_dir, mountpoint, os.getpid(),
                 engine)
        eng.run(stop, lambda: ready(None) if ready else None)
        log.info("unmounting %s", mountpoint)
    except BaseException:
        log.exception("the request loop failed; unmounting %s", mountpoint)
        raise
    finally:
        # Unmount only if the mount at the path is still ours: after a lazy detach someone
        # may have mounted a new daemon there.
        still_ours = (mount_at(mountpoint) or ("", ""))[1] == our_dev
        try:
            eng.close(unmount=still_ours)
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)
            with contextlib.suppress(OSError):
                status_file.unlink()
            store.close()
            log.info("stopped; served %s", eng.stats)


# --- the daemon, from the caller's side -------------------------------------------------
# The daemon imports jbl the way its parent did: a parent started through a wrapper that added
# site directories (another user running the venv's jbl with the system python) passes them
# on, since ``python -m`` in a fresh interpreter would not find them.
_BOOT = ("import json, site, sys; [site.addsitedir(d) for d in json.loads(sys.argv.pop(1))]; "
         "from jbl.fusefs.daemon import main; sys.exit(main())")


def spawn(store_dir: Path, mountpoint: Path, *, allow_other: bool = False,
          private: bool = False, timeout: float = READY_TIMEOUT,
          engine: str = DEFAULT_ENGINE, linger: float = 0.0,
          view: lingermod.ViewFiles | None = None,
          hold_limit: float | None = REMOVED_HOLD_LIMIT) -> subprocess.Popen[bytes]:
    """Start a detached daemon serving ``store_dir`` on ``mountpoint``; return it once the
    mount is ready. Its output goes to ``log_path(store_dir)``, never this terminal. A caller
    that outlives the daemon should ``wait()`` for it (it is our child until we exit).

    With ``view`` (a lingering private view, fusefs/linger.py) the daemon forks away from
    us (the returned process has already exited) and lives until no job has held
    ``view.hold`` for ``linger`` seconds."""
    return start(store_dir, mountpoint, allow_other=allow_other, private=private,
                 timeout=timeout, engine=engine, linger=linger, view=view,
                 hold_limit=hold_limit).wait()


class Starting:
    """A daemon ``start`` launched; ``wait()``: the process once its mount is ready, else
    MountError (exactly what ``spawn`` returns or raises). Wait exactly once."""

    def __init__(self, proc: subprocess.Popen[bytes], ready_fd: int, timeout: float,
                 detached: bool, logp: Path) -> None:
        self.proc, self.ready_fd, self.timeout = proc, ready_fd, timeout
        self.detached, self.logp = detached, logp

    def wait(self) -> subprocess.Popen[bytes]:
        proc, logp = self.proc, self.logp
        try:
            msg = _read_line(self.ready_fd, self.timeout)
        finally:
            os.close(self.ready_fd)
        if msg == "ready":
            if self.detached:
                proc.wait()  # the intermediate of --detach, gone already
            return proc
        if not msg and self.detached:  # hung: the detached daemon is in proc's group
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGTERM)
        elif proc.poll() is None and not msg:
            proc.terminate()
        reason = msg.removeprefix("error ") if msg else _log_tail(logp)
        raise MountError(reason or f"the mount daemon exited with status {proc.wait()}",
                         hint=f"see {logp}")


def start(store_dir: Path, mountpoint: Path, *, allow_other: bool = False,
          private: bool = False, timeout: float = READY_TIMEOUT,
          engine: str = DEFAULT_ENGINE, linger: float = 0.0,
          view: lingermod.ViewFiles | None = None,
          hold_limit: float | None = REMOVED_HOLD_LIMIT) -> Starting:
    """``spawn`` without the wait for readiness: the caller does other work meanwhile (a
    job's first view starts beside its preparation: fusefs/broker.py), then ``wait()``s."""
    store_dir = Path(os.path.realpath(store_dir))
    mountpoint = Path(os.path.realpath(mountpoint))
    check_mountpoint(mountpoint)  # fail fast, in the user's terminal, with the reason
    logp = log_path(store_dir)
    try:
        logfd = open_log(logp)
    except OSError as e:
        raise MountError(f"cannot write the mount log {logp}: {e.strerror}") from None
    import subprocess

    sites = json.dumps([p for p in sys.path if p.endswith(("site-packages", "dist-packages"))])
    r, w = os.pipe()
    argv = [sys.executable, "-c", _BOOT, sites, "--store", str(store_dir),
            "--mountpoint", str(mountpoint), "--ready-fd", str(w), "--engine", engine,
            "--log", str(logp)]
    if allow_other:
        argv.append("--allow-other")
    argv += ["--removed-hold-limit", "never" if hold_limit is None else repr(hold_limit)]
    if private and view is not None:
        argv += ["--private", "--linger", repr(linger), "--lock", str(view.lock),
                 "--hold", str(view.hold), "--detach"]
    elif private:
        argv += ["--private", "--parent-pid", str(os.getpid())]
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logfd, stderr=logfd,
                                pass_fds=(w,), start_new_session=True, cwd="/")
    finally:
        os.close(logfd)
    os.close(w)
    return Starting(proc, r, timeout, view is not None, logp)


def _read_line(fd: int, timeout: float) -> str:
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return ""
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    return buf.decode(errors="replace").strip()


def _log_tail(path: Path) -> str:
    return read_log_tail(path)  # relative to run/'s fd, no link followed (mounttab)


def unmount(mountpoint: Path, store_dir: Path | None = None,
            timeout: float = STOP_TIMEOUT) -> str:
    """Unmount ``mountpoint``, found from the mountpoint alone (``store_dir`` is not needed;
    kept for callers that have it). Returns what was done, for the user."""
    mp = Path(os.path.realpath(mountpoint))
    fstype = mount_fstype(mp)
    found = find_record(mp)
    if fstype != FSTYPE and found is None:
        if fstype is not None:
            raise MountError(f"{mp} is not a jbl mount ({fstype})")
        raise MountError(f"{mp} is not mounted")
    done = ""
    if found is not None:
        path, st = found
        if st.state != "stale":  # its daemon runs: ask it to unmount and exit
            try:
                os.kill(st.pid, signal.SIGTERM)
            except PermissionError:
                raise MountError(f"{mp} is served by pid {st.pid} of another user",
                                 hint="run as root or as the user who mounted it") from None
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + timeout
            while pid_alive(st.pid, st.pid_start) and time.monotonic() < deadline:
                time.sleep(0.05)
            done = f"stopped (pid {st.pid})"
            if pid_alive(st.pid, st.pid_start):
                done = f"detached; pid {st.pid} did not stop within {timeout:.0f} s"
        else:
            done = f"detached stale mount (its daemon, pid {st.pid}, is dead)"
    if mount_fstype(mp) == FSTYPE:
        if not done:  # nobody recorded this mount: the kernel alone tells dead from alive
            done = ("detached stale mount (its daemon is dead)" if is_stale(mp) else
                    "detached (no record of its daemon; it exits once unmounted)")
        force_unmount(mp)
    if found is not None:
        with contextlib.suppress(OSError):
            found[0].unlink()
    return done or "nothing to do"
