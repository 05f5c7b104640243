"""Mount lifecycle: serve a store on a mountpoint, start it as a daemon, find, stop, recover.

    serve(...)          in this process: mount, run the trio loop, unmount on SIGTERM/SIGINT
    spawn(...)          start ``python -m jbl.fusefs.daemon`` detached; return once the mount
                        is ready (a line on a pipe), or raise MountError with the reason
    status(store_dir)   every mount recorded under STORE/run/ (pid, since, alive)
    unmount(mp)         stop the daemon (SIGTERM) or, if it died, detach the stale mount
    view_root(store)    a directory with <name>/<version>/ for the runner: a live `jbl mount`
                        of that store, or a private daemon mounted for the caller's lifetime

Status files: ``STORE/run/mount-<hash of mountpoint>.json``, written after the mount is up,
removed at clean exit. A file whose pid is gone, or whose mountpoint answers ENOTCONN, is a
stale mount: ``jbl umount`` or the next ``jbl mount`` on that mountpoint cleans it.

Thread-safety: functions here run in the CLI's (or the runner's) main thread; ``serve`` owns
its process (pyfuse3 allows one mount per process).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from jbl.store.errors import MountError
from jbl.store.store import pid_alive, proc_starttime

log = logging.getLogger("jbl.fusefs")

FSTYPE = "fuse.jbl"
ENGINES = ("raw", "pyfuse3")
DEFAULT_ENGINE = "raw"  # docs/mount.md: measured, passes every mount test
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
MNT_DETACH = 2


@dataclass
class MountStatus:
    mountpoint: str
    store: str
    pid: int
    pid_start: int
    since: float
    allow_other: bool
    private: bool
    engine: str = "pyfuse3"
    alive: bool = False      # daemon running AND the mount answers
    state: str = "unknown"   # 'mounted' | 'stale' (daemon gone or not answering) | 'gone'


# --- where things are -------------------------------------------------------------------
def run_dir(store_dir: Path) -> Path:
    return Path(store_dir) / "run"


def log_path(store_dir: Path) -> Path:
    return run_dir(store_dir) / "mount.log"


def status_path(store_dir: Path, mountpoint: Path, *, resolved: bool = False) -> Path:
    # ``resolved``: the path is already real; do not stat it (our own mount may not be
    # serving yet, and a stat would wait for it forever).
    mp = os.fspath(mountpoint) if resolved else os.path.realpath(mountpoint)
    h = hashlib.sha256(os.fsencode(mp)).hexdigest()[:16]
    return run_dir(store_dir) / f"mount-{h}.json"


def _unescape(field: str) -> str:
    # /proc/self/mountinfo octal-escapes space, tab, newline and backslash
    for code, ch in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, ch)
    return field


def _mount_at(mountpoint: Path | str) -> tuple[str, str] | None:
    """(fstype, major:minor) of the topmost mount exactly at ``mountpoint``. Reads only
    /proc/self/mountinfo: never touches the mount itself (which may hang or be stale)."""
    target = os.fspath(mountpoint)
    found = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if _unescape(fields[4]) == target:
                    found = (right.split()[0], fields[2])
    except OSError:
        return None
    return found


def mount_fstype(mountpoint: Path | str) -> str | None:
    """The fstype mounted exactly at ``mountpoint`` (topmost), None if nothing is."""
    m = _mount_at(mountpoint)
    return None if m is None else m[0]


def jbl_mounts() -> list[str]:
    """Every fuse.jbl mountpoint in this mount namespace."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split()[0] == FSTYPE:
                out.append(_unescape(left.split()[4]))
    return out


def answers(mountpoint: Path | str) -> bool:
    """True if the mount responds (a dead daemon's mount gives ENOTCONN)."""
    try:
        os.stat(mountpoint)
        return True
    except OSError:
        return False


def is_stale(mountpoint: Path | str) -> bool:
    return mount_fstype(mountpoint) == FSTYPE and not answers(mountpoint)


def force_unmount(mountpoint: Path | str) -> None:
    """Detach a (possibly stale) FUSE mount: fusermount3 -u -z, else umount2(MNT_DETACH)."""
    mp = os.fspath(mountpoint)
    r = subprocess.run(["fusermount3", "-u", "-z", mp], capture_output=True, text=True)
    if r.returncode == 0 or mount_fstype(mp) is None:
        return
    libc = ctypes.CDLL("libc.so.6", use_errno=True)  # glibc; find_library forks ldconfig
    if libc.umount2(os.fsencode(mp), MNT_DETACH) != 0:
        e = ctypes.get_errno()
        raise MountError(f"cannot unmount {mp}: {r.stderr.strip() or os.strerror(e)}",
                         hint="run as root or as the user who mounted it")


# --- status files -----------------------------------------------------------------------
def _read_status(path: Path) -> MountStatus | None:
    try:
        st = MountStatus(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None
    running = pid_alive(st.pid, st.pid_start)
    mounted = mount_fstype(st.mountpoint) == FSTYPE
    st.alive = running and mounted and answers(st.mountpoint)
    st.state = "mounted" if st.alive else ("stale" if mounted else "gone")
    return st


def status(store_dir: Path) -> list[MountStatus]:
    d = run_dir(store_dir)
    if not d.is_dir():
        return []
    out = [s for p in sorted(d.glob("mount-*.json")) if (s := _read_status(p)) is not None]
    return sorted(out, key=lambda s: s.since)


def _write_status(store_dir: Path, st: MountStatus) -> Path:
    path = status_path(store_dir, Path(st.mountpoint), resolved=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    d = asdict(st)
    del d["alive"], d["state"]
    tmp.write_text(json.dumps(d, indent=1))
    os.replace(tmp, path)
    return path


# --- serving ----------------------------------------------------------------------------
def check_mountpoint(mountpoint: Path) -> None:
    """Refuse what cannot be mounted; recover a stale jbl mount left by a dead daemon."""
    if is_stale(mountpoint):
        log.warning("%s: stale jbl mount (its daemon died); detaching it", mountpoint)
        force_unmount(mountpoint)
    if not mountpoint.is_dir():
        raise MountError(f"mountpoint {mountpoint} is not a directory",
                         hint="create it first: mkdir -p " + str(mountpoint))
    if mount_fstype(mountpoint) == FSTYPE:
        raise MountError(f"{mountpoint} is already a jbl mount",
                         hint="see `jbl mount --status`; `jbl umount` it first")


def serve(store_dir: Path, mountpoint: Path, *, allow_other: bool = False,
          ready: Callable[[str | None], None] | None = None, private: bool = False,
          parent_pid: int | None = None, engine: str = DEFAULT_ENGINE) -> None:
    """Mount ``store_dir`` on ``mountpoint`` and serve until SIGTERM/SIGINT or unmount.

    ``ready(None)`` is called once requests are being served; ``ready(reason)`` if mounting
    failed (then MountError is raised too). With ``parent_pid``, the mount ends when that
    process does (the runner's private view). ``engine``: "raw" (rawfs.py, /dev/fuse
    spoken directly) or "pyfuse3" (ops.py)."""
    if engine not in ENGINES:
        raise MountError(f"unknown mount engine {engine!r}", hint="use raw or pyfuse3")
    if engine == "raw":
        return _serve_raw(store_dir, mountpoint, allow_other=allow_other, ready=ready,
                          private=private, parent_pid=parent_pid)
    import pyfuse3
    import trio
    from jbl.store.store import Store
    from jbl.store.view import View

    from .leases import LeaseKeeper
    from .ops import JblOperations

    mountpoint = Path(os.path.realpath(mountpoint))
    store_dir = Path(os.path.realpath(store_dir))
    try:
        check_mountpoint(mountpoint)
        if not (store_dir / "index.db").exists():
            Store.open(store_dir, create=True).close()  # an empty store mounts as an empty tree
        store = Store.open(store_dir, readonly=True)
    except Exception as e:
        if ready:
            ready(str(e))
        raise
    leases = LeaseKeeper(store_dir)
    ops = JblOperations(View(store), leases)
    opts = {"fsname=jbl", "subtype=jbl", "ro", "default_permissions"}
    if allow_other:
        opts.add("allow_other")
    try:
        pyfuse3.init(ops, str(mountpoint), opts)
    except Exception as e:
        store.close()
        reason = f"cannot mount {mountpoint}: {e} (see {log_path(store_dir)})"
        if ready:
            ready(reason)
        raise MountError(reason) from None
    ops.mounted = True
    our_dev = (_mount_at(mountpoint) or ("", ""))[1]
    st = MountStatus(str(mountpoint), str(store_dir), os.getpid(),
                     proc_starttime(os.getpid()) or 0, time.time(), allow_other, private)
    status_file = _write_status(store_dir, st)
    log.info("mounted %s on %s (pid %d)", store_dir, mountpoint, os.getpid())

    async def main() -> None:
        async with trio.open_nursery() as n:
            await n.start(leases.run)
            n.start_soon(pyfuse3.main)
            n.start_soon(ops.watch)
            n.start_soon(_until_signal, n.cancel_scope)
            if parent_pid is not None:
                n.start_soon(_until_parent_dies, parent_pid, n.cancel_scope)
            if ready:
                ready(None)

    try:
        trio.run(main)
        log.info("unmounting %s", mountpoint)
    except BaseException:
        log.exception("the mount loop failed; unmounting %s", mountpoint)
        raise
    finally:
        # Unmount only if the mount at the path is still ours: after a lazy detach someone
        # may have mounted a new daemon there.
        still_ours = (_mount_at(mountpoint) or ("", ""))[1] == our_dev
        with contextlib.suppress(Exception):
            pyfuse3.close(unmount=still_ours)
        with contextlib.suppress(OSError):
            status_file.unlink()
        store.close()
        log.info("stopped; served %s", ops.stats)


def _open_store(store_dir: Path, mountpoint: Path,
                ready: Callable[[str | None], None] | None) -> object:
    from jbl.store.store import Store

    try:
        check_mountpoint(mountpoint)
        if not (store_dir / "index.db").exists():
            Store.open(store_dir, create=True).close()  # an empty store mounts as an empty tree
        return Store.open(store_dir, readonly=True)
    except Exception as e:
        if ready:
            ready(str(e))
        raise


def _serve_raw(store_dir: Path, mountpoint: Path, *, allow_other: bool,
               ready: Callable[[str | None], None] | None, private: bool,
               parent_pid: int | None) -> None:
    from .rawmount import serve_raw

    mountpoint = Path(os.path.realpath(mountpoint))
    store_dir = Path(os.path.realpath(store_dir))
    store = _open_store(store_dir, mountpoint, ready)

    def started() -> Callable[[], None]:
        st = MountStatus(str(mountpoint), str(store_dir), os.getpid(),
                         proc_starttime(os.getpid()) or 0, time.time(), allow_other, private,
                         "raw")
        path = _write_status(store_dir, st)
        return lambda: path.unlink(missing_ok=True)

    serve_raw(store_dir, mountpoint, allow_other=allow_other, ready=ready, private=private,
              parent_pid=parent_pid, store=store, started=started)


async def _until_signal(scope: object) -> None:
    import trio

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
        async for s in sigs:
            log.info("signal %d: unmounting", s)
            scope.cancel()  # type: ignore[attr-defined]
            return


async def _until_parent_dies(parent_pid: int, scope: object) -> None:
    import trio

    # No event fires when a parent dies (PDEATHSIG follows the parent *thread*): poll.
    while os.getppid() == parent_pid:  # noqa: ASYNC110
        await trio.sleep(0.5)
    log.info("parent %d exited: unmounting the private view", parent_pid)
    scope.cancel()  # type: ignore[attr-defined]


# --- the daemon, from the caller's side -------------------------------------------------
def spawn(store_dir: Path, mountpoint: Path, *, allow_other: bool = False,
          private: bool = False, timeout: float = READY_TIMEOUT,
          engine: str = DEFAULT_ENGINE) -> subprocess.Popen[bytes]:
    """Start a detached daemon serving ``store_dir`` on ``mountpoint``; return it once the
    mount is ready. Its output goes to STORE/run/mount.log, never this terminal. A caller that
    outlives the daemon should ``wait()`` for it (it is our child until we exit)."""
    store_dir = Path(os.path.realpath(store_dir))
    mountpoint = Path(os.path.realpath(mountpoint))
    check_mountpoint(mountpoint)  # fail fast, in the user's terminal, with the reason
    run_dir(store_dir).mkdir(parents=True, exist_ok=True)
    r, w = os.pipe()
    argv = [sys.executable, "-m", "jbl.fusefs.daemon", "--store", str(store_dir),
            "--mountpoint", str(mountpoint), "--ready-fd", str(w), "--engine", engine]
    if allow_other:
        argv.append("--allow-other")
    if private:
        argv += ["--private", "--parent-pid", str(os.getpid())]
    with open(log_path(store_dir), "ab") as logf:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                pass_fds=(w,), start_new_session=True, cwd="/")
    os.close(w)
    try:
        msg = _read_line(r, timeout)
    finally:
        os.close(r)
    if msg == "ready":
        return proc
    if proc.poll() is None and not msg:
        proc.terminate()
    reason = msg.removeprefix("error ") if msg else _log_tail(store_dir)
    raise MountError(reason or f"the mount daemon exited with status {proc.wait()}",
                     hint=f"see {log_path(store_dir)}")


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


def _log_tail(store_dir: Path) -> str:
    try:
        lines = log_path(store_dir).read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1] if lines else ""


def unmount(mountpoint: Path, store_dir: Path | None = None,
            timeout: float = STOP_TIMEOUT) -> str:
    """Unmount ``mountpoint``; returns what was done ('stopped', 'detached stale mount')."""
    mp = Path(os.path.realpath(mountpoint))
    st = _read_status(status_path(store_dir, mp)) if store_dir is not None else None
    mounted = mount_fstype(mp) == FSTYPE
    if not mounted and st is None:
        if mount_fstype(mp) is not None:
            raise MountError(f"{mp} is not a jbl mount ({mount_fstype(mp)})")
        raise MountError(f"{mp} is not mounted")
    done = "nothing to do"
    if st is not None and pid_alive(st.pid, st.pid_start):
        os.kill(st.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while pid_alive(st.pid, st.pid_start) and time.monotonic() < deadline:
            time.sleep(0.05)
        done = "stopped"
    if mount_fstype(mp) == FSTYPE:
        force_unmount(mp)
        done = "detached stale mount" if done == "nothing to do" else "stopped (detached)"
    if store_dir is not None:
        with contextlib.suppress(OSError):
            status_path(store_dir, mp).unlink()
    return done


@contextlib.contextmanager
def view_root(store_dir: Path | str, *, timeout: float = READY_TIMEOUT,
              engine: str | None = None) -> Iterator[Path]:
    """A directory holding ``<name>/<version>/`` for every installed version of the store.

    Reuses a live ``jbl mount`` of this store; otherwise mounts a private one (a daemon that
    unmounts when this block exits, is interrupted, or this process dies). The caller still
    takes ``store.lease(version_id, "job")`` for the version it uses."""
    store_dir = Path(os.path.realpath(store_dir))
    for st in status(store_dir):
        if st.alive and not st.private and os.path.realpath(st.store) == str(store_dir):
            yield Path(st.mountpoint)
            return
    mp = Path(tempfile.mkdtemp(prefix="jbl-view-"))
    try:
        proc = spawn(store_dir, mp, allow_other=os.geteuid() == 0, private=True,
                     timeout=timeout, engine=engine or os.environ.get("JBL_MOUNT_ENGINE")
                     or DEFAULT_ENGINE)
        try:
            yield mp
        finally:
            proc.terminate()  # the daemon unmounts on SIGTERM; reap it (it is our child)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if mount_fstype(mp) == FSTYPE:
                force_unmount(mp)
    finally:
        with contextlib.suppress(OSError):
            mp.rmdir()
