"""The per-host table of jbl mounts: which daemon serves which mountpoint from which store.

    mountinfo     what the kernel says is mounted (``/proc/self/mountinfo``, never touching
                  the mount itself): fstype ``fuse.jbl``, device, the mounting uid
    records       what each daemon says about itself: one JSON file per mount, written once
                  the mount is up, removed at clean exit, in its user's own directory:

                      root        /run/jbl/mounts/                 (0755: every user reads it)
                      a user      $XDG_RUNTIME_DIR/jbl/mounts/     (if set and the user's own)
                                  else ~/.local/state/jbl/mounts/

So ``jbl umount MNT`` needs only MNT: the kernel names the mount's owner (``user_id=`` in
mountinfo), the owner's directory holds ``mount-<hash of MNT>.json``, the record's ``dev``
must be the device mounted at MNT now, and its ``pid``/``pid_start`` say whether the daemon
still runs. A record is believed only about a process owned by the record's user (a user
cannot make root signal someone else's process by writing a file).

What a record must be to be believed at all (issue 10; the reading rules are
fusefs/trust.py): a regular file of at most 64 KiB, owned by the user whose directory holds
it, in a directory only that user (or root) can write; its fields of the right types; its
``uid`` that user's. And the mount it names must be what it says: mountinfo shows a
``fuse.jbl`` mount at its mountpoint whose ``user_id=`` (set by the kernel or fusermount3,
not by the user) is the record's user and whose source is ``fs_source(store)``, the store
the record names. A record that fails any of this is skipped, never deleted (it may be
someone else's). ``usable_views(store)`` goes further for the runner: only the caller's own
and root's mounts, never another user's, and root's jobs only root's.

States: ``mounted`` (daemon running, mount answers), ``not answering`` (daemon running,
``statvfs`` fails), ``stale`` (the daemon is dead: its pid is gone or a zombie, or the kernel
says the connection is gone: ENOTCONN), ``gone`` (neither mount nor daemon: the record is
deleted when read, so ``--status`` never lists dead private views).

The daemon log: ``STORE/run/mount.log`` when the caller may write there, else ``mount.log``
beside the caller's records; rotated to ``mount.log.1`` at ``LOG_MAX`` bytes. ``run/`` is
group-writable on a shared server and the daemon may be root, so the log is never reached
by a path through it: ``run/`` is opened without following a link (``log_dir``: a link
or a file there is refused, UnsafeStorePath, exit 10), the daemon keeps that directory fd
for its whole life, and the log file is opened, rotated (``renameat``) and read relative to
it; a link, FIFO or hard link planted as ``mount.log`` is replaced (the item itself is
removed, never what it points to) with a WARNING line in the new log naming it.

Thread-safety: plain functions over files; any thread. Records are written atomically
(temp file + rename), so readers never see half a record.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import logging
import os
import pwd
import re
import stat
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from jbl.store import safepath
from jbl.store.errors import MountError, UnsafeStorePath
from jbl.store.store import pid_alive

from . import trust

log = logging.getLogger("jbl.fusefs")

FSTYPE = "fuse.jbl"
MNT_DETACH = 2
ROOT_RECORDS = Path("/run/jbl/mounts")
LOG_MAX = 4 << 20  # bytes; one generation (mount.log.1) is kept
OTHERS_TIMEOUT = 2.0  # seconds for anything on another user's paths or mount (trust.within)


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
    dev: str = ""            # major:minor of the mount it made (mountinfo)
    uid: int = -1            # the daemon's user
    linger: float = 0.0      # a private view shared by its user's jobs: seconds it outlives
                             # the last one (fusefs/linger.py); 0 = mounted for one job
    alive: bool = False      # daemon running AND the mount answers
    state: str = "unknown"   # mounted | not answering | stale | gone (module docstring)


# --- mountinfo ----------------------------------------------------------------------------
def _unescape(field: str) -> str:
    # /proc/self/mountinfo octal-escapes space, tab, newline and backslash
    for code, ch in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, ch)
    return field


@dataclass(frozen=True)
class MountInfo:
    mountpoint: str
    fstype: str
    dev: str              # major:minor
    uid: int | None       # FUSE's user_id= (who mounted it), None for other filesystems
    source: str = ""      # the mount source (FUSE: fsname); jbl's is fs_source(store)


def _mountinfo() -> list[MountInfo]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields_ = left.split()
            fstype, src, opts = (right.split() + ["", ""])[:3]
            uid = None
            for o in opts.split(","):
                if o.startswith("user_id="):
                    uid = int(o[8:])
            out.append(MountInfo(_unescape(fields_[4]), fstype, fields_[2], uid,
                                 _unescape(src)))
    return out


_PLAIN_PATH = re.compile(r"/[A-Za-z0-9._/+@-]{0,200}")


def fs_source(store_dir: Path | str) -> str:
    """The mount source (fsname) of a jbl mount of ``store_dir`` (its real path): how
    mountinfo says which store a mount serves. A path with characters mount options or
    mountinfo would mangle (``,``, spaces, ...) or a long one is named by its hash."""
    path = os.fspath(store_dir)
    if _PLAIN_PATH.fullmatch(path):
        return f"jbl:{path}"
    return "jbl:sha256:" + hashlib.sha256(os.fsencode(path)).hexdigest()[:32]


def mount_info(mountpoint: Path | str) -> MountInfo | None:
    """The topmost mount exactly at ``mountpoint``; None if nothing is mounted there."""
    target = os.fspath(mountpoint)
    try:
        found = [m for m in _mountinfo() if m.mountpoint == target]
    except OSError:
        return None
    return found[-1] if found else None


def mount_at(mountpoint: Path | str) -> tuple[str, str] | None:
    """(fstype, major:minor) of the topmost mount exactly at ``mountpoint``."""
    m = mount_info(mountpoint)
    return None if m is None else (m.fstype, m.dev)


def mount_fstype(mountpoint: Path | str) -> str | None:
    """The fstype mounted exactly at ``mountpoint`` (topmost), None if nothing is."""
    m = mount_info(mountpoint)
    return None if m is None else m.fstype


def jbl_mounts() -> list[str]:
    """Every fuse.jbl mountpoint in this mount namespace."""
    return [m.mountpoint for m in _mountinfo() if m.fstype == FSTYPE]


def answers(mountpoint: Path | str) -> bool:
    """True if the mount's daemon responds (a dead daemon's mount gives ENOTCONN)."""
    return _probe(mountpoint) == 0


# What a FUSE mount answers once its daemon closed /dev/fuse (died): ECONNABORTED to the
# request that was in flight, ENOTCONN to every later one.
DEAD = frozenset({errno.ENOTCONN, errno.ECONNABORTED})


def _probe(mountpoint: Path | str) -> int:
    """0 if the mount's daemon answers, else the errno (EIO for a non-errno failure).

    ``statvfs`` first: the kernel answers ``stat`` of the root from its attribute cache for
    up to a second after the daemon died, but asks the daemon for STATFS. Then ``stat``: to
    a caller the mount does not allow (no allow_other) the kernel fakes an empty STATFS
    answer, and only ``stat`` says EACCES."""
    try:
        os.statvfs(mountpoint)
        os.stat(mountpoint)
    except OSError as e:
        return e.errno or errno.EIO
    return 0


def connection_dead(mountpoint: Path | str) -> bool:
    """The kernel says the FUSE connection is gone (its daemon closed /dev/fuse: died)."""
    return _probe(mountpoint) in DEAD


def daemon_running(pid: int, start: int) -> bool:
    """The process ``pid`` started at ``start`` runs: not gone, not a reused pid, and not a
    zombie (a killed daemon stays one until it is reaped, its mount already dead)."""
    if not pid_alive(pid, start):
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read(4096)
    except OSError:
        return False
    return data[data.rindex(b")") + 2:][:1] not in (b"Z", b"X")


def is_stale(mountpoint: Path | str) -> bool:
    return mount_fstype(mountpoint) == FSTYPE and connection_dead(mountpoint)


def force_unmount(mountpoint: Path | str) -> None:
    """Detach a (possibly stale) FUSE mount: fusermount3 -u -z, else umount2(MNT_DETACH)."""
    import subprocess  # here, not at import: the mount daemon starts without it

    mp = os.fspath(mountpoint)
    r = subprocess.run(["fusermount3", "-u", "-z", mp], capture_output=True, text=True)
    if r.returncode == 0 or mount_fstype(mp) is None:
        return
    libc = ctypes.CDLL("libc.so.6", use_errno=True)  # glibc; find_library forks ldconfig
    if libc.umount2(os.fsencode(mp), MNT_DETACH) != 0:
        e = ctypes.get_errno()
        raise MountError(f"cannot unmount {mp}: {r.stderr.strip() or os.strerror(e)}",
                         hint="run as root or as the user who mounted it")


# --- where records and logs live -----------------------------------------------------------
def _home(uid: int) -> str | None:
    if uid == os.geteuid():
        return os.path.expanduser("~")
    try:
        return pwd.getpwuid(uid).pw_dir
    except KeyError:
        return None


def records_dir() -> Path:
    """Where the daemons of this process's user record their mounts."""
    uid = os.geteuid()
    if uid == 0:
        return ROOT_RECORDS
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    if xdg and os.path.isabs(xdg):
        with contextlib.suppress(OSError):
            if os.stat(xdg).st_uid == uid:  # root's env leaking into `runuser` is not ours
                return Path(xdg) / "jbl/mounts"
    return Path(_home(uid) or "/nonexistent") / ".local/state/jbl/mounts"


def _dirs_of(uid: int) -> list[Path]:
    """Every place a daemon of ``uid`` may have recorded its mounts."""
    if uid == 0:
        return [ROOT_RECORDS]
    out = [Path(f"/run/user/{uid}/jbl/mounts")]
    if uid == os.geteuid():
        out.append(records_dir())
    home = _home(uid)
    if home:
        out.append(Path(home) / ".local/state/jbl/mounts")
    return list(dict.fromkeys(out))


def record_path(mountpoint: Path | str, directory: Path | None = None) -> Path:
    """The record for a (real) mountpoint: the path is hashed as given, never stat()ed (our
    own mount may not be serving yet, and a stat would wait for it forever)."""
    h = hashlib.sha256(os.fsencode(mountpoint)).hexdigest()[:16]
    return (directory or records_dir()) / f"mount-{h}.json"


def _writable_dir(d: Path) -> bool:
    if d.is_dir():
        return os.access(d, os.W_OK | os.X_OK)
    return d.parent.is_dir() and os.access(d.parent, os.W_OK | os.X_OK)


def log_path(store_dir: Path | str) -> Path:
    """Where a daemon started by this process logs: STORE/run/mount.log if we may write
    there (admins look for it beside the store), else beside our own records."""
    run = Path(store_dir) / "run"
    if os.geteuid() != 0 and not _writable_dir(run):
        return records_dir().parent / "mount.log"
    return run / "mount.log"


def log_dir(path: Path, *, make_dir: bool = True) -> int:
    """An fd of the directory holding the log ``path`` (``STORE/run``, or the user's own
    state dir). Its parent (the store directory or the user's own) is trusted like the
    store's own path; the directory itself is opened without following a link
    (UnsafeStorePath if it is not a real directory). ``make_dir=False``: a directory that is
    gone stays gone (FileNotFoundError), e.g. a store removed under a running daemon."""
    if make_dir:
        path.parent.parent.mkdir(parents=True, exist_ok=True)
    with safepath.opened(safepath.open_store(path.parent.parent)) as pfd:
        return safepath.open_dir(pfd, path.parent.name, shown=str(path.parent),
                                 create_mode=0o777 if make_dir else None)  # less the umask


@contextlib.contextmanager
def _at(path: Path, dir_fd: int | None, make_dir: bool) -> Iterator[int]:
    """``dir_fd``, or the log's directory opened for the block (``log_dir``)."""
    if dir_fd is not None:
        yield dir_fd
        return
    with safepath.opened(log_dir(path, make_dir=make_dir)) as fd:
        yield fd


def rotate_log(path: Path, *, dir_fd: int | None = None) -> bool:
    """Move ``path`` to ``path.1`` once it reaches LOG_MAX, within its directory's fd (two
    daemons rotating at once may lose one generation: acceptable for a log of starts, stops
    and errors). Only the log's own regular file is rotated, never a planted link."""
    try:
        with _at(path, dir_fd, make_dir=False) as dfd:
            st = safepath.lstat(dfd, path.name)
            if st is None or not stat.S_ISREG(st.st_mode) or st.st_size < LOG_MAX:
                return False
            os.rename(path.name, f"{path.name}.1", src_dir_fd=dfd, dst_dir_fd=dfd)
            return True
    except (OSError, UnsafeStorePath):
        return False


def open_log(path: Path, *, make_dir: bool = True, dir_fd: int | None = None) -> int:
    """An O_APPEND fd on the log, created if need be, relative to ``dir_fd`` (default: the
    log's directory, opened by ``log_dir``). Never follows a symlink and never blocks on a
    FIFO; anything but the log's own regular file there is replaced (module docstring)."""
    with _at(path, dir_fd, make_dir) as dfd:
        rotate_log(path, dir_fd=dfd)
        return _open_log_file(dfd, path)


_LOG_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | safepath.FILE_FLAGS


def _open_log_file(dfd: int, path: Path) -> int:
    name = path.name
    for _attempt in range(3):
        fd = -1
        try:
            fd = os.open(name, _LOG_FLAGS, 0o644, dir_fd=dfd)
        except OSError as e:  # ELOOP: a link; ENXIO: a FIFO nobody reads; EISDIR
            if e.errno not in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
                raise
        if fd >= 0:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:  # not a hard link to another
                return fd
            os.close(fd)
        there = safepath.lstat(dfd, name)
        if there is not None and stat.S_ISDIR(there.st_mode):
            raise UnsafeStorePath(f"{path} is a directory, not a regular file: refusing to "
                                  "use it as the mount log", hint=safepath.FIX_HINT)
        what = safepath.describe(dfd, name)
        safepath.unlink(dfd, name)  # the planted item itself, never what it points to
        try:
            fd = os.open(name, _LOG_FLAGS | os.O_EXCL, 0o644, dir_fd=dfd)
        except FileExistsError:
            continue  # another daemon made a new log meanwhile: check that one
        os.write(fd, (f"{time.strftime('%Y-%m-%d %H:%M:%S')} jbl-mount[{os.getpid()}] "
                      f"WARNING replaced {path}: it was {what}, not the log's own regular "
                      "file (removed the item itself, never what it points to)\n").encode())
        return fd
    raise UnsafeStorePath(f"{path} keeps being replaced by something else: refusing to use "
                          "it as the mount log", hint=safepath.FIX_HINT)


def read_log_tail(path: Path, limit: int = 64 << 10) -> str:
    """The last line of the log (of its last ``limit`` bytes), read relative to its
    directory's fd without following a link or blocking; "" if it cannot be read."""
    try:
        with safepath.opened(log_dir(path, make_dir=False)) as dfd, \
                safepath.opened(safepath.open_file(dfd, path.name, shown=str(path))) as fd:
            size = os.fstat(fd).st_size
            data = os.pread(fd, limit, max(0, size - limit))
    except (OSError, UnsafeStorePath):
        return ""
    lines = data.decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else ""


# --- records -----------------------------------------------------------------------------
def write_record(st: MountStatus) -> Path:
    """Record a mount that is up (atomically; 0644 so other users can find root's)."""
    d = records_dir()
    trust.make_dirs(d)
    path = record_path(st.mountpoint, d)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data = asdict(st)
    del data["alive"], data["state"]
    tmp.write_text(json.dumps(data, indent=1))
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def _proc_uid(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


# field -> the types a record may give it (bool is an int to Python: checked first)
_TYPES: dict[str, tuple[type, ...]] = {
    "mountpoint": (str,), "store": (str,), "pid": (int,), "pid_start": (int,),
    "since": (int, float), "allow_other": (bool,), "private": (bool,), "engine": (str,),
    "dev": (str,), "uid": (int,), "linger": (int, float),
}
_REQUIRED = {"mountpoint", "store", "pid", "pid_start", "since", "allow_other", "private"}


def parse_record(data: bytes) -> MountStatus | None:
    """A record's fields, or None unless every one has its type and the paths are absolute
    (a record is another process's word: nothing in it is taken on trust)."""
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if not isinstance(raw, dict) or not raw.keys() >= _REQUIRED:
        return None
    vals: dict[str, Any] = {}
    for k, types in _TYPES.items():
        if k not in raw:
            continue
        v = raw[k]
        if (isinstance(v, bool) and bool not in types) or not isinstance(v, types):
            return None
        vals[k] = v
    for k in ("mountpoint", "store"):
        if not vals[k].startswith("/") or "\0" in vals[k] or len(vals[k]) > 4096:
            return None
    if vals["pid"] <= 0:
        return None
    return MountStatus(**vals)


def _load(dfd: int, name: str, owner: int, mounts: dict[str, MountInfo]) -> MountStatus | None:
    """Read the record ``name`` in the directory ``dfd`` of ``owner`` and work out its
    state; None if it is not to be believed (module docstring). A ``gone`` record in our
    own directory is deleted."""
    data = trust.read_small(dfd, name, owner)
    st = None if data is None else parse_record(data)
    if st is None or st.uid != owner:
        return None
    # A process that is not the record's user's is not its daemon (pid reuse, or a forgery);
    # a pid we cannot see (hidepid) is not running either.
    running = daemon_running(st.pid, st.pid_start) and _proc_uid(st.pid) == owner
    m = mounts.get(st.mountpoint)
    mounted = m is not None and m.fstype == FSTYPE and (not st.dev or m.dev == st.dev)
    if not mounted:
        st.state = "gone"
        if not running and owner == os.geteuid():
            # neither daemon nor mount: nothing will ever clean this up but us
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=dfd)
        return st
    assert m is not None
    if m.uid != owner or m.source != fs_source(st.store):
        return None  # the mount there is not the one the record describes
    probe = _probe(st.mountpoint) if owner in (0, os.geteuid()) else \
        trust.within(OTHERS_TIMEOUT, lambda: _probe(st.mountpoint))
    if not running or probe in DEAD:
        st.state = "stale"
    elif probe == 0:
        st.state, st.alive = "mounted", True
    elif probe == errno.EACCES:  # a user's mount without allow_other (to root): not usable
        st.state = "mounted"
    else:  # an errno, or None: no answer within OTHERS_TIMEOUT
        st.state = "not answering"
    return st


def _read_dir(d: Path, uid: int, mounts: dict[str, MountInfo],
              only: str | None = None) -> list[MountStatus]:
    """The believable records in ``d`` (a directory of ``uid``); ``only``: that name."""
    dfd = trust.owned_dir(d, uid)
    if dfd is None:
        return []
    try:
        wanted = [only] if only is not None else trust.names(dfd, "mount-", ".json")
        return [st for n in wanted if (st := _load(dfd, n, uid, mounts)) is not None]
    finally:
        os.close(dfd)


def _records_of(uid: int, mounts: dict[str, MountInfo],
                only: str | None = None) -> list[tuple[Path, MountStatus]]:
    """(path, record) of every record ``uid``'s daemons left; another user's paths are read
    under a deadline (their home may be on a FUSE mount that never answers)."""
    def read() -> list[tuple[Path, MountStatus]]:
        out = []
        for d in _dirs_of(uid):
            for st in _read_dir(d, uid, mounts, only):
                out.append((record_path(st.mountpoint, d), st))
        return out

    if uid in (0, os.geteuid()):
        return read()
    return trust.within(OTHERS_TIMEOUT, read) or []


def records(uids: set[int] | None = None) -> list[MountStatus]:
    """Every live or stale mount recorded by the daemons of ``uids`` (default: ours and
    root's; as root, also those of every user who has a jbl mount now). ``gone`` records
    are pruned (our own) or skipped, never returned."""
    mounts = {m.mountpoint: m for m in _mountinfo()}
    if uids is None:
        uids = {0, os.geteuid()}
        if os.geteuid() == 0:
            uids |= {m.uid for m in mounts.values() if m.fstype == FSTYPE and m.uid is not None}
    out: dict[tuple[int, str], MountStatus] = {}
    for uid in sorted(uids):
        for _p, st in _records_of(uid, mounts):
            if st.state != "gone":
                out.setdefault((uid, st.mountpoint), st)
    return sorted(out.values(), key=lambda s: s.since)


def usable_views(store_dir: Path | str) -> list[MountStatus]:
    """The live, shared (not private) mounts of ``store_dir`` a job of this user may use:
    its own and root's (root's only when they allow other users, for a user), never another
    user's; root's jobs use root's alone. Checked against mountinfo by ``_load``."""
    real = os.path.realpath(store_dir)
    me = os.geteuid()
    out = []
    for st in records({0, me}):
        if not st.alive or st.private or st.store != real:
            continue
        if st.uid != me and not (st.uid == 0 and st.allow_other):
            continue
        out.append(st)
    return out


def unrecorded() -> list[MountStatus]:
    """jbl mounts nobody has a record of (a daemon that could not write one, or a user's
    record root cannot find): daemon unknown, state from the mount alone."""
    known = {s.mountpoint for s in records()}
    out = []
    me = os.geteuid()
    for m in _mountinfo():
        if m.fstype != FSTYPE or m.mountpoint in known:
            continue
        st = MountStatus(m.mountpoint, "?", 0, 0, 0.0, False, False, "?", m.dev,
                         -1 if m.uid is None else m.uid)
        mp = m.mountpoint
        probe = _probe(mp) if m.uid in (0, me) else \
            trust.within(OTHERS_TIMEOUT, functools.partial(_probe, mp))
        st.alive = probe == 0
        st.state = ("stale" if probe in DEAD
                    else "mounted" if probe in (0, errno.EACCES) else "not answering")
        out.append(st)
    return out


def find(mountpoint: Path | str) -> tuple[Path, MountStatus] | None:
    """The record of the daemon serving (or that served) the mount at ``mountpoint``."""
    mp = os.fspath(mountpoint)
    m = mount_info(mp)
    uids = {os.geteuid(), 0}
    if m is not None and m.uid is not None:
        uids.add(m.uid)
    mounts = {mp: m} if m is not None else {}
    name = record_path(mp, Path("/")).name
    for uid in sorted(uids, key=lambda u: u != (m.uid if m else -1)):  # the owner's first
        for p, st in _records_of(uid, mounts, only=name):
            if st.state != "gone" and st.mountpoint == mp:
                return p, st
    return None
