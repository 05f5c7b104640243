"""``jbl setup --system``: make this machine a shared jbl server, idempotently.

What it puts in place (docs/shared-server.md explains each choice):

    admin group      G (default jbl-admin): its members may install, remove and gc
    STORE            root:G 2775; index.db (+ -wal, -shm kept), lock, publish.lock root:G 0660
                     (only admins may open, hence lock, them); public/ root:G 2775 with the
                     summary everyone else reads; blobs/ and its 256 shard dirs root:G 2770
                     (users read runtimes only through the mount); cache/, run/ root:G 2775.
                     Nothing in it is writable by others.
    /etc/fuse.conf   ``user_allow_other``
    units            /etc/systemd/system/jbl-mount.service (jbl mount --foreground --allow-other
                     MOUNTPOINT), jbl-gc.service + jbl-gc.timer (daily ``jbl store gc``),
                     jbl-jobs-admin.service (``jbl job serve-admin``: runner/jobadmin.py)
    alias            /opt/joblet/runtimes -> MOUNTPOINT (with --joblet-alias)
    tun device       /dev/net/tun 0666 (Debian's default), so users' jobs may use
                     ``--network isolated`` (slirp4netns); only if it is the char device 10:200
    GPU locks        /run/jbl/gpus 0755 and one gpu-<bus id>.lock 0644 per GPU the driver
                     reports, all root's, so every user's ``jbl run --gpu`` can take them
                     (runner/gpu.py); nothing without GPUs

Every step checks first and only changes what differs, so a second run changes nothing and
says so. ``--dry-run`` changes nothing and prints what it would do. When systemd is not
running (containers, CI) the unit files are still written and the output says how to start
the mount by hand. ``--root DIR`` writes the fixed system files (fuse.conf, units, alias)
and looks for the tun device under DIR instead of ``/`` (for building images, and for
tests); the store and mountpoint are used as given, the GPU locks go under the GPU driver
root (``/``; ``JBL_GPU_DRIVER_ROOT`` in tests).

Thread-safety: a command handler; runs once per process.
"""

from __future__ import annotations

import argparse
import errno
import grp
import os
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jbl.store import safepath
from jbl.store.access import DEFAULT_ADMIN_GROUP, configured_group
from jbl.store.errors import JblError, PermissionDenied, UnsafeStorePath, UsageError
from jbl.store.settings import Settings

from .output import print_json, table

DEFAULT_MOUNTPOINT = Path("/run/jbl/runtimes")
JOBLET_ALIAS = Path("opt/joblet/runtimes")
UNIT_DIR = Path("etc/systemd/system")
FUSE_CONF = Path("etc/fuse.conf")
TUN = Path("dev/net/tun")
TUN_DEVICE = (10, 200)  # misc major, TUN_MINOR
TUN_MODE = 0o666
_GROUP_RE = re.compile(r"[a-z_][a-z0-9_-]{0,30}\$?")  # fullmatch: `$` allows a final newline

DIR_MODE = 0o2775     # setgid: files made by any admin stay in the admin group
BLOB_DIR_MODE = 0o2770  # no access for others: runtimes are read through the mount only
FILE_MODE = 0o660     # index, lock: admins only; whoever may open a file may lock it


@dataclass
class Plan:
    """Carries out (or, dry, only records) idempotent steps; one row per step."""

    dry: bool
    rows: list[dict[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # said after the table

    def step(self, what: str, path: str | Path, needed: bool, action: str,
             do: Any = None) -> bool:
        if not needed:
            self.rows.append({"step": what, "path": str(path), "result": "ok"})
            return False
        if not self.dry and do is not None:
            try:
                do()
            except OSError as e:  # a path that cannot be used: one line naming the step
                why = "a file is in the way" if e.errno == errno.EEXIST else \
                    (e.strerror or str(e))
                where = f" ({e.filename})" if e.filename and str(e.filename) != str(path) \
                    else ""
                raise JblError(f"{what} {path}: cannot {action}: {why}{where}",
                               hint="fix it and run jbl setup --system again: the steps "
                                    "before it are done and will say ok") from None
        done = _PAST.get(action, action + "d")
        self.rows.append({"step": what, "path": str(path),
                          "result": f"would {action}" if self.dry else done})
        return True


_PAST = {"run": "ran", "change": "changed", "replace": "replaced"}


def _jbl_exe() -> str:
    me = Path(sys.argv[0])
    if me.name == "jbl" and me.is_file():
        return str(me.absolute())
    cand = Path(sys.executable).with_name("jbl")
    return str(cand) if cand.exists() else (shutil.which("jbl") or "jbl")


# --- steps ----------------------------------------------------------------------------------
def ensure_group(plan: Plan, name: str) -> int | None:
    try:
        gid = grp.getgrnam(name).gr_gid
    except KeyError:
        pass
    else:
        plan.step("admin group", name, False, "create")
        return gid
    plan.step("admin group", name, True, "create",
              lambda: subprocess.run(["groupadd", "--system", name], check=True,
                                     capture_output=True))
    return None if plan.dry else grp.getgrnam(name).gr_gid


def _open(path: Path, at: int | None) -> int:
    """An fd of ``path``: with ``at`` (a directory fd), ``path.name`` inside it, never through a
    link and only a directory or regular file (store/safepath.py); without, by its own path
    (root's own choice: the store directory and the mountpoint themselves)."""
    if at is None:
        return os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    st = safepath.lstat(at, path.name)
    if st is not None and stat.S_ISDIR(st.st_mode):
        return safepath.open_dir(at, path.name, shown=str(path))
    return safepath.open_file(at, path.name, shown=str(path))


def _fix(plan: Plan, what: str, path: Path, mode: int, gid: int | None,
         uid: int | None = 0, *, at: int | None = None) -> None:
    """Make ``path`` have exactly ``mode`` and owner uid:gid (None = leave), through its fd:
    a name swapped for a link after a check is still never followed (``_open``)."""
    with safepath.opened(_open(path, at)) as fd:
        st = os.fstat(fd)
        want_uid = st.st_uid if uid is None else uid
        want_gid = st.st_gid if gid is None else gid
        needed = (stat.S_IMODE(st.st_mode) != mode
                  or (st.st_uid, st.st_gid) != (want_uid, want_gid))

        def do() -> None:
            os.fchown(fd, want_uid, want_gid)
            os.fchmod(fd, mode)  # after chown: chown clears setgid
        plan.step(what, path, needed, "change", do)


def _mkdir(plan: Plan, what: str, path: Path, mode: int, gid: int | None, *,
           at: int | None = None) -> None:
    """Create (or fix) directory ``path``; with ``at``, ``path.name`` inside that directory fd,
    a planted link in its place replaced first (``_planted``)."""
    exists = _planted(plan, at, path, want_dir=True) if at is not None else path.is_dir()
    if not exists:
        def do() -> None:
            if at is None:
                path.mkdir(parents=True, exist_ok=True)
            else:
                os.mkdir(path.name, 0o700, dir_fd=at)  # 0700 until it has its owner and mode
            with safepath.opened(_open(path, at)) as fd:
                os.fchown(fd, 0, -1 if gid is None else gid)
                os.fchmod(fd, mode)
        plan.step(what, path, True, "create", do)
        return
    _fix(plan, what, path, mode, gid, at=at)


# --- links planted in the store -----------------------------------------------------------
# Admin-group members may write the store, so one of them may leave a link (or a FIFO, …) where
# jbl's own file or directory belongs, hoping root's setup chowns or chmods its target. Setup
# never follows one: where jbl owns what belongs there (lock, -wal/-shm, the gc journal,
# cache/, run/, public/, the shards, blobs/tmp) the planted item is removed (unlinkat: the link
# itself) and replaced, with a warning naming it and its owner; where it is data jbl cannot
# recreate (index.db, blobs/) setup refuses with one line and changes nothing there.
_REFUSE_PLANTED = frozenset({"index.db", "blobs"})
_PLANTABLE_FILES = ("index.db-wal", "index.db-shm", "lock", "publish.lock", "gc-pending",
                    "gc-pending.tmp")


def _planted(plan: Plan, at: int | None, path: Path, *, want_dir: bool) -> bool:
    """True if ``path.name`` in ``at`` is what belongs there (a directory or a regular file);
    False if absent, or if it was something else (a link, FIFO, …), now removed."""
    if at is None:  # dry run of a store that does not exist yet
        return path.is_dir() if want_dir else path.is_file()
    st = safepath.lstat(at, path.name)
    if st is None:
        return False
    if stat.S_ISDIR(st.st_mode) if want_dir else stat.S_ISREG(st.st_mode):
        return True
    what = safepath.describe(at, path.name)
    kind = "a directory" if want_dir else "a regular file"
    if path.name in _REFUSE_PLANTED or stat.S_ISDIR(st.st_mode):
        raise UnsafeStorePath(
            f"{path} is {what}, not {kind}: jbl never follows links in the store",
            hint="if it is yours, move what it points to into its place; else remove it, then "
                 "run jbl setup --system again")
    plan.warnings.append(f"warning: {path} is {what}, not {kind}: "
                         f"{'would replace' if plan.dry else 'replaced'} it (nothing it points "
                         "to is touched)")
    plan.step("planted item", path, True, "replace",
              lambda: safepath.unlink(at, path.name))
    return False


def ensure_store(plan: Plan, store: Path, gid: int | None) -> None:
    from jbl.store.db import INDEX_NAME
    from jbl.store.store import Store

    _mkdir(plan, "store directory", store, DIR_MODE, gid)
    # Everything inside the store is reached through this fd, never through a link. (Not
    # closed on an error: the command ends there anyway.)
    sfd = safepath.open_store(store) if store.is_dir() else None
    # Before SQLite or a lock opens anything: a link where -wal, -shm or a lock file belongs
    # is replaced (index.db and blobs/ as links are refused: see _planted).
    for name in (INDEX_NAME, *_PLANTABLE_FILES):
        _planted(plan, sfd, store / name, want_dir=False)
    for name in ("blobs", "cache", "run", "public"):
        _planted(plan, sfd, store / name, want_dir=True)
    index = store / INDEX_NAME
    if not index.exists():
        def create() -> None:
            old = os.umask(0o022)  # SQLite creates the index with mode & ~umask
            try:
                Store.open(store, create=True).close()
            finally:
                os.umask(old)
        plan.step("store index", index, True, "create", create)
    elif not plan.dry:
        # Opening read-write once migrates an old index and, with db.py's persistent WAL,
        # (re)creates -wal and -shm; publishing rewrites the users' summary only if it differs.
        with Store.open(store) as opened:
            opened.publish()
    for name in (INDEX_NAME, f"{INDEX_NAME}-wal", f"{INDEX_NAME}-shm", "lock", "publish.lock"):
        p = store / name
        if sfd is None or safepath.lstat(sfd, name) is None:
            if name != "lock" or plan.dry or sfd is None:
                continue
            os.close(safepath.open_file(sfd, name, os.O_WRONLY | os.O_CREAT, FILE_MODE,
                                        shown=str(p)))
        _fix(plan, "store file", p, FILE_MODE, gid, at=sfd)
    for sub in ("cache", "run", "public"):
        _mkdir(plan, "store directory", store / sub, DIR_MODE, gid, at=sfd)
    cache_st = None if sfd is None else safepath.lstat(sfd, "cache")
    if sfd is not None and cache_st is not None and stat.S_ISDIR(cache_st.st_mode):
        # the registry cache skips a planted cache/registries (store/registry.py); replace it
        with safepath.opened(safepath.open_dir(sfd, "cache", shown=str(store / "cache"))) \
                as cfd:
            _planted(plan, cfd, store / "cache" / "registries", want_dir=True)
    blobs = store / "blobs"
    _mkdir(plan, "blob directory", blobs, BLOB_DIR_MODE, gid, at=sfd)
    bfd = None if sfd is None or plan.dry and not blobs.is_dir() else \
        safepath.open_dir(sfd, "blobs", shown=str(blobs))
    # Pre-create every shard: a directory an admin's `mkdir` made with umask 022 would not be
    # writable by the other admins (setgid gives the group, not the group's write bit).
    shards = [f"{i:02x}" for i in range(256)] + ["tmp"]
    todo = 0
    for s in shards:
        d = blobs / s
        if bfd is None or not _planted(plan, bfd, d, want_dir=True):
            todo += 1
            if plan.dry or bfd is None:
                continue
            os.mkdir(s, 0o700, dir_fd=bfd)  # 0700 until it has its owner and mode
        if plan.dry:
            continue
        with safepath.opened(safepath.open_dir(bfd, s, shown=str(d))) as fd:
            st = os.fstat(fd)
            if stat.S_IMODE(st.st_mode) != BLOB_DIR_MODE or (gid is not None
                                                             and st.st_gid != gid):
                os.fchown(fd, 0, st.st_gid if gid is None else gid)
                os.fchmod(fd, BLOB_DIR_MODE)
                todo += 1
            if gid is not None:  # blobs written before setup: same group, so admins can gc
                for f in os.scandir(fd):
                    fst = f.stat(follow_symlinks=False)
                    # regular files only, changed by name in the shard's fd with
                    # AT_SYMLINK_NOFOLLOW: a link planted among the blobs is left alone
                    if stat.S_ISREG(fst.st_mode) and fst.st_gid != gid:
                        os.chown(f.name, -1, gid, dir_fd=fd, follow_symlinks=False)
                        todo += 1
    for fd_ in (bfd, sfd):
        if fd_ is not None:
            os.close(fd_)
    plan.step("blob shards", blobs / "00..ff", bool(todo), "normalise")


def ensure_fuse_conf(plan: Plan, path: Path) -> None:
    text = path.read_text() if path.exists() else ""
    lines = text.splitlines()
    if any(ln.strip() == "user_allow_other" for ln in lines):
        plan.step("fuse.conf user_allow_other", path, False, "enable")
        return
    if "#user_allow_other" in [ln.strip() for ln in lines]:
        lines = ["user_allow_other" if ln.strip() == "#user_allow_other" else ln
                 for ln in lines]
    else:
        lines.append("user_allow_other")
    plan.step("fuse.conf user_allow_other", path, True, "enable",
              lambda: _write_atomic(path, "\n".join(lines) + "\n", 0o644))


def _write_atomic(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.jbl-tmp")
    tmp.write_text(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def unit_texts(jbl: str, store: Path, mountpoint: Path, group: str = "") -> dict[str, str]:
    head = "# Written by `jbl setup --system`; rerun it rather than editing this file.\n"
    return {
        "jbl-mount.service": head + f"""[Unit]
Description=jbl: every installed runtime, read-only, at {mountpoint}
Documentation=file://{Path(__file__).resolve().parents[1]}/docs/shared-server.md
After=local-fs.target

[Service]
Type=simple
ExecStartPre=/bin/mkdir -p {mountpoint}
# a mount left by a crashed daemon would make the next mount fail
ExecStartPre=-{jbl} umount {mountpoint}
ExecStart={jbl} --store {store} mount --foreground --allow-other {mountpoint}
ExecStopPost=-{jbl} umount {mountpoint}
Restart=on-failure
RestartSec=2

[Install]
WantedBy=multi-user.target
""",
        "jbl-gc.service": head + f"""[Unit]
Description=jbl: collect unneeded runtimes and blobs, recompress cold ones (/etc/jbl/config.yaml)

[Service]
Type=oneshot
ExecStart={jbl} --store {store} store gc --quiet --recompress --max-time 1h
Nice=10
IOSchedulingClass=idle
""",
        "jbl-jobs-admin.service": head + f"""[Unit]
Description=jbl: root reads and stops any user's jobs for the admin group (runner/jobadmin.py)
Documentation=file://{Path(__file__).resolve().parents[1]}/docs/shared-server.md

[Service]
Type=simple
ExecStart={jbl} job serve-admin{f" --group {group}" if group else ""}
Restart=on-failure
RestartSec=2

[Install]
WantedBy=multi-user.target
""",
        "jbl-gc.timer": head + """[Unit]
Description=jbl: daily garbage collection of the runtime store

[Timer]
OnCalendar=daily
RandomizedDelaySec=1h
Persistent=true

[Install]
WantedBy=timers.target
""",
    }


def ensure_units(plan: Plan, unit_dir: Path, units: dict[str, str]) -> bool:
    changed = False
    for name, text in units.items():
        p = unit_dir / name
        old = p.read_text() if p.exists() else None
        changed |= plan.step("systemd unit", p, old != text,
                             "create" if old is None else "update",
                             lambda p=p, text=text: _write_atomic(p, text, 0o644))
    return changed


def ensure_alias(plan: Plan, alias: Path, mountpoint: Path) -> None:
    if alias.is_symlink():
        if Path(os.readlink(alias)) == mountpoint:
            plan.step("joblet alias", alias, False, "create")
            return

        def relink() -> None:
            alias.unlink()
            alias.symlink_to(mountpoint)
        plan.step("joblet alias", alias, True, "update", relink)
        return
    if alias.exists():
        raise JblError(f"{alias} exists and is not a symlink (a Joblet install?)",
                       hint="move it aside, then run jbl setup --system --joblet-alias again")

    def link() -> None:
        alias.parent.mkdir(parents=True, exist_ok=True)
        alias.symlink_to(mountpoint)
    plan.step("joblet alias", alias, True, "create", link)


def ensure_tun(plan: Plan, root: Path) -> bool:
    """``ROOT/dev/net/tun`` mode 0666, so ordinary users' slirp4netns can open it. Reached
    through directory fds without following links; changed only once ``fstat`` of an
    ``O_PATH`` descriptor (which opens nothing) shows the char device 10:200. False when
    there is no tun device."""
    path = root / TUN
    nofollow = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = -1
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # root's own choice
        for part in TUN.parts[:-1]:
            nfd = os.open(part, nofollow, dir_fd=fd)
            os.close(fd)
            fd = nfd
        nfd = os.open(TUN.name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        os.close(fd)
        fd = nfd
    except FileNotFoundError:
        if fd >= 0:
            os.close(fd)
        return False
    except OSError as e:
        if fd >= 0:
            os.close(fd)
        raise JblError(f"tun device {path}: {e.strerror}: setup leaves it alone",
                       hint="make it the tun device (char 10:200) or remove what is in the "
                            "way, then run jbl setup --system again") from None
    with safepath.opened(fd):
        st = os.fstat(fd)
        if not stat.S_ISCHR(st.st_mode) or (os.major(st.st_rdev),
                                             os.minor(st.st_rdev)) != TUN_DEVICE:
            kind = "a symlink" if stat.S_ISLNK(st.st_mode) else \
                f"char device {os.major(st.st_rdev)}:{os.minor(st.st_rdev)}" \
                if stat.S_ISCHR(st.st_mode) else "not a char device"
            raise JblError(f"tun device {path} is {kind}, not the tun device (char 10:200): "
                           "setup leaves it alone",
                           hint="remove it (modprobe tun makes the real one), then run jbl "
                                "setup --system again")
        # fchmod refuses an O_PATH fd; its /proc/self/fd link is that very inode
        plan.step("tun device (--network isolated)", path,
                  stat.S_IMODE(st.st_mode) != TUN_MODE, "change",
                  lambda: os.chmod(f"/proc/self/fd/{fd}", TUN_MODE))
    return True


def ensure_gpu_locks(plan: Plan, settings: Settings) -> None:
    """The GPU lock directory and files for the GPUs the driver reports (none: no step)."""
    from jbl.runner import gpu

    root = gpu.resolve_driver_root(settings)
    gpus = gpu.discover(root)
    if not gpus:
        return
    for path, action in gpu.ensure_locks(root, gpus, dry=plan.dry):
        what = "GPU lock directory" if path.name == "gpus" else "GPU lock file"
        plan.step(what, path, action is not None, action or "create")


def unreachable_for_others(path: str) -> str | None:
    """The first of ``path`` (resolved) and its directories that other users cannot reach."""
    real = Path(os.path.realpath(path))
    for p in [*reversed(real.parents), real]:
        try:
            mode = p.stat().st_mode
        except OSError:
            return str(p)
        if not mode & stat.S_IXOTH:
            return str(p)
    return None


# --- the command ----------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    if not args.system:
        raise UsageError("say what to set up: jbl setup --system (a shared server)")
    group: str = args.group or configured_group()
    if not _GROUP_RE.fullmatch(group):
        raise UsageError(f"bad group name {group!r}")
    mountpoint = Path(args.mountpoint)
    if not mountpoint.is_absolute():
        raise UsageError(f"--mountpoint must be an absolute path, not {args.mountpoint!r}")
    if os.geteuid() != 0 and not args.dry_run:
        raise PermissionDenied("setup --system needs root", hint="try --dry-run to see the plan")
    root = Path(args.root)
    store = Path(args.store).absolute()
    plan = Plan(dry=args.dry_run)
    jbl = _jbl_exe()

    gid = ensure_group(plan, group)
    ensure_store(plan, store, gid)
    ensure_fuse_conf(plan, root / FUSE_CONF)
    if not mountpoint.is_mount():  # a live mount's root mode is the filesystem's, not ours
        _mkdir(plan, "mountpoint", mountpoint, 0o755, None)
    units_changed = ensure_units(plan, root / UNIT_DIR, unit_texts(jbl, store, mountpoint, group))
    if args.joblet_alias:
        ensure_alias(plan, root / JOBLET_ALIAS, mountpoint)
    has_tun = ensure_tun(plan, root)
    ensure_gpu_locks(plan, args.settings)

    nxt: list[str] = list(plan.warnings)
    if not has_tun and root == Path("/"):
        nxt.append(f"note: no {TUN} here, so no job can use --network isolated until the "
                   "tun module is loaded (modprobe tun)")
    systemd_up = root == Path("/") and Path("/run/systemd/system").is_dir()
    services = ["jbl-mount.service", "jbl-gc.timer", "jbl-jobs-admin.service"]
    if systemd_up:
        cmds = ([["systemctl", "daemon-reload"]] if units_changed else []) + \
            [["systemctl", "enable", "--now", *services]]
        for cmd in cmds:
            plan.step("systemd", " ".join(cmd), True, "run",
                      lambda cmd=cmd: subprocess.run(cmd, check=True, capture_output=True))
    else:
        nxt.append("systemd is not running here: the unit files are written but not started.")
        nxt.append(f"  start the mount now:  {jbl} --store {store} mount --allow-other "
                   f"{mountpoint}")
        nxt.append("  once systemd runs:    systemctl daemon-reload && "
                   f"systemctl enable --now {' '.join(services)}")
    bad = unreachable_for_others(jbl) or unreachable_for_others(os.path.realpath(sys.executable))
    if bad:
        nxt.append(f"warning: other users cannot run jbl: {bad} is not reachable by them "
                   "(run `make install` as root in jbl's clone: /opt/jbl on the system "
                   "Python and /usr/local/bin/jbl, then use /usr/local/bin/jbl)")
    nxt.append(f"admins: usermod -aG {group} NAME (then log in again) to let NAME install, "
               "remove and gc")

    if args.json:
        print_json({"dry_run": plan.dry, "group": group, "store": str(store),
                    "mountpoint": str(mountpoint), "systemd": systemd_up,
                    "steps": plan.rows, "next": nxt})
    else:
        table(plan.rows, [("result", "RESULT"), ("step", "STEP"), ("path", "PATH")])
        if not args.quiet:
            print()
            print("\n".join(nxt))
    return 0


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "setup", parents=parents, help="set this machine up as a shared jbl server",
        description="Set up a shared server: the store (default /var/lib/jbl) owned by root "
                    "and writable by an admin group, user_allow_other in /etc/fuse.conf, "
                    "systemd units that keep `jbl mount --allow-other` serving and run gc "
                    "daily. Idempotent; prints what it did.")
    p.add_argument("--system", action="store_true", help="set up the shared server (required)")
    p.add_argument("--mountpoint", default=str(DEFAULT_MOUNTPOINT), metavar="DIR",
                   help=f"where every user sees the runtimes (default {DEFAULT_MOUNTPOINT})")
    p.add_argument("--joblet-alias", action="store_true",
                   help="also link /opt/joblet/runtimes to the mountpoint")
    p.add_argument("--group", default=None, metavar="NAME",
                   help=f"admin group whose members may install/rm/gc (default "
                        f"admin_group from /etc/jbl/config.yaml, else {DEFAULT_ADMIN_GROUP})")
    p.add_argument("--dry-run", action="store_true", help="change nothing; print the plan")
    p.add_argument("--root", default="/", metavar="DIR",
                   help="write /etc and /opt files under DIR instead of / (images, tests)")
    p.set_defaults(func=run)
