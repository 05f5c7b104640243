"""The sandbox helper: carries a plan out with system calls, in its own exec'd process.

Started by ``supervise.py`` in one of two ways: forked from a single-threaded supervisor
(``run_forked(plan, STATUS_FD, PARENT_PID)``, the plan already in memory), or exec'd as
``python -I -S sandbox.py PLAN_FD STATUS_FD PARENT_PID`` reading the plan (``marshal`` data,
see ``plan.Plan.to_wire``) from PLAN_FD (docs/runner.md, "Start-up"). Either way it executes
the steps in order. Three processes come out of it::

    helper (host PID ns) --ForkInit--> init (PID 1: mounts, pivot_root) --ForkJob--> job (exec)

The helper and init stay behind as relays: they forward the signals in FORWARD to their child
and exit with its status (128+N for a signal). Both die with their parent
(``PR_SET_PDEATHSIG``); when init dies the kernel kills everything in the PID namespace. The
helper leaves the caller's session first and the job makes its own (``new_session``), so no
terminal signals either of them directly and nothing in the job can signal the caller's
process group: every signal the job gets comes through ``jbl`` (or its own pty).

A failing step writes one line ``<step>: <strerror>`` to STATUS_FD and exits with status 12;
STATUS_FD is close-on-exec, so a successful ``execve`` of the job closes it with nothing written.

This module uses the standard library only and nothing that starts slowly (no ``json``,
``signal``, ``socket``, ``re``): its start-up is on every job's critical path. Not importable
for use in a threaded process; it forks.
"""

from __future__ import annotations

import _signal
import ctypes
import errno
import fcntl
import gc
import marshal
import os
import sys
from typing import Any, NoReturn

SETUP_FAILED = 12  # jbl.store.errors.ExitCode.JOB_SETUP (not imported: stdlib only here)
COMMAND_NOT_EXECUTABLE, COMMAND_NOT_FOUND = 126, 127  # ExitCode.COMMAND_*, as shells use
CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC = 0x20000, 0x2000000, 0x4000000, 0x8000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND = 32, 1024, 2048, 4096
MS_REC, MS_PRIVATE, MS_SLAVE, MS_RELATIME = 0x4000, 1 << 18, 1 << 19, 1 << 21
MNT_DETACH = 2
# statvfs f_flag bits -> mount flags that must be kept on a bind remount (locked in a userns)
ST_TO_MS = ((1, MS_RDONLY), (2, MS_NOSUID), (4, MS_NODEV), (8, MS_NOEXEC),
            (1024, MS_NOATIME), (2048, MS_NODIRATIME), (4096, MS_RELATIME))
PR_SET_PDEATHSIG, PR_CAPBSET_READ, PR_CAPBSET_DROP = 1, 23, 24
PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 38, 47, 4
SYS_CAPSET, SYS_PIVOT_ROOT, SYS_KEYCTL, SYS_CLOSE_RANGE = 126, 155, 250, 436  # x86_64
CLOSE_RANGE_CLOEXEC = 4
KEYCTL_JOIN_SESSION_KEYRING = 1
TIOCSCTTY = 0x540E
SIGCHLD, SIGKILL, SIGPIPE, SIGXFSZ = _signal.SIGCHLD, _signal.SIGKILL, _signal.SIGPIPE, 25
FORWARD = {_signal.SIGHUP, _signal.SIGINT, _signal.SIGQUIT, _signal.SIGTERM, _signal.SIGUSR1,
           _signal.SIGUSR2, _signal.SIGCONT, _signal.SIGWINCH}
OLD, NEW = "/oldroot", "/newroot"

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                       ctypes.c_char_p]
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                       ctypes.c_ulong]


class StepFailed(Exception):
    pass


def check(ret: int, what: str) -> int:
    if ret < 0:
        raise StepFailed(f"{what}: {os.strerror(ctypes.get_errno())}")
    return ret


def mount(src: str | None, dst: str, fstype: str | None, flags: int, data: str | None,
          what: str) -> None:
    def b(s: str | None) -> bytes | None:
        return None if s is None else os.fsencode(s)
    check(libc.mount(b(src), b(dst), b(fstype), flags, b(data)), what)


def prctl(option: int, arg: int, what: str) -> int:
    return check(libc.prctl(option, arg, 0, 0, 0), what)


def J(path: str) -> str:
    """A job path, seen from the helper's staging root."""
    return NEW + path if path != "/" else NEW


def H(path: str) -> str:
    """A host path, seen from the helper's staging root."""
    return OLD + path


class Layers:
    """The job's private overlay layers (runtime.yml ``readonly: false`` mounts, and mount
    points made inside read-only runtime directories). Their upper and work directories
    live in the staging tmpfs under LAYER_DIR: only this job's mount namespace reaches
    them, and they vanish with it, so nothing a job writes persists or is seen by another."""

    userns = False  # set by op_unshare: a user namespace mounts overlayfs with userxattr
    count = 0
    readonly: list[str] = []  # mount-point layers, remounted read-only by op_root_readonly


LAYER_DIR = "/layers"
ETC_DIR = "/etc-files"  # in the staging tmpfs: the files jbl writes for the job's /etc


def overlay(lower: str, at: str, what: str, uid: int = -1, gid: int = -1) -> None:
    """Mount overlayfs at staging path ``at``: ``lower`` (a staging path, may be ``at``
    itself: the overlay stacks on top of it) under a fresh private upper directory that has
    the lower directory's mode (and, for root --user, the job user as owner)."""
    Layers.count += 1
    base = f"{LAYER_DIR}/{Layers.count}"
    try:
        os.makedirs(base + "/upper", 0o755)
        os.mkdir(base + "/work", 0o700)
        os.chmod(base + "/upper", os.stat(lower).st_mode & 0o7777)
        if uid >= 0:
            os.chown(base + "/upper", uid, gid)
    except OSError as e:
        raise StepFailed(f"{what}: overlay layer: {e.strerror}") from None
    esc = lower.replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")
    data = f"lowerdir={esc},upperdir={base}/upper,workdir={base}/work"
    if Layers.userns and libc.mount(b"overlay", os.fsencode(at), b"overlay",
                                    MS_NOSUID | MS_NODEV, (data + ",userxattr").encode()) == 0:
        return  # user.* xattrs: the trusted.* ones overlayfs prefers need the host's root
    mount("overlay", at, "overlay", MS_NOSUID | MS_NODEV, data, f"{what}: overlayfs")


def make_target(path: str, what: str, kind: str = "dir") -> str:
    """Create the mount point ``path`` (a job path) without following any symlink. A
    component missing from a read-only runtime directory is created in a private overlay
    layer over that directory, remounted read-only before the job runs (``Layers``)."""
    cur = NEW
    parts = [p for p in path.split("/") if p]
    for i, part in enumerate(parts):
        prev, cur = cur, cur + "/" + part
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            try:
                _create(cur, i == len(parts) - 1 and kind == "file")
            except OSError as e:
                if e.errno != errno.EROFS or prev == NEW:
                    raise StepFailed(f"{what}: mkdir {path}: {e.strerror}") from None
                overlay(prev, prev, f"{what}: layer over {prev[len(NEW):]}")
                Layers.readonly.append(prev)
                try:
                    _create(cur, i == len(parts) - 1 and kind == "file")
                except OSError as e2:
                    raise StepFailed(f"{what}: mkdir {path}: {e2.strerror}") from None
            continue
        if (st.st_mode & 0o170000) == 0o120000:
            shown = "/" + "/".join(parts[:i + 1])
            raise StepFailed(f"{what}: {shown}: a path component is a symlink")
    return cur


def _create(path: str, file: bool) -> None:
    if file:
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW, 0o644))
    else:
        os.mkdir(path, 0o755)


def mount_flags(path: str) -> int:
    f = os.statvfs(path).f_flag
    return sum(ms for st, ms in ST_TO_MS if f & st)


def submounts(top: str) -> list[str]:
    """Mount points at or below ``top`` (from mountinfo), for a recursive read-only remount."""
    out = []
    with open(H("/proc/self/mountinfo"), "rb") as fh:  # host procfs: ours is not up yet
        for line in fh:
            mp = unescape(line.split(b" ")[4])
            if mp == top or mp.startswith(top + "/"):
                out.append(mp)
    return out


def unescape(field: bytes) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal ``\\ooo``."""
    for esc, ch in ((b"\\040", b" "), (b"\\011", b"\t"), (b"\\012", b"\n"),
                    (b"\\134", b"\\")):
        field = field.replace(esc, ch)
    return os.fsdecode(field)


def bind(src: str, dst: str, readonly: bool, what: str, remount: bool = True) -> None:
    try:
        is_dir = os.path.isdir(H(src))
        os.stat(H(src))
    except OSError as e:
        raise StepFailed(f"{what}: {src}: {e.strerror}") from None
    target = make_target(dst, what, "dir" if is_dir else "file")
    mount(H(src), target, None, MS_BIND | MS_REC, None, what)
    if not remount:
        return
    extra = (MS_RDONLY if readonly else 0) | MS_NOSUID | MS_NODEV
    for mp in submounts(target) if readonly else [target]:
        mount(None, mp, None, MS_BIND | MS_REMOUNT | mount_flags(mp) | extra, None,
              f"{what}: remount {mp[len(NEW):] or '/'}")


# ---- steps --------------------------------------------------------------------------------

class Sandbox:
    def __init__(self, status_fd: int, job_id: str) -> None:
        self.status_fd = status_fd
        self.job_id = job_id
        self.env: dict[str, str] = {}
        self.cwd = "/"
        self.sock_fd = -1  # a helper made ahead: its line to the job process (init keeps it)

    def run(self, steps: list[dict[str, Any]]) -> NoReturn:
        self.fail(self.carry_out(steps) or "plan ended without exec")

    def carry_out(self, steps: list[dict[str, Any]]) -> str | None:
        """Carry ``steps`` out; the first failure's message (None: they all worked)."""
        op = "setup"
        try:
            for step in steps:
                op = step.pop("op")
                getattr(self, "op_" + op)(**step)
        except StepFailed as e:
            return str(e)
        except OSError as e:  # a step that did not name itself: name the call
            return f"{op}: {e.filename or ''}: {e.strerror}"
        except Exception as e:  # a bug in the helper: still one line, still named
            return f"{op}: internal error: {type(e).__name__}: {e}"
        return None

    def fail(self, message: str, status: int = SETUP_FAILED) -> NoReturn:
        try:
            os.write(self.status_fd, message.encode("utf-8", "replace") + b"\n")
        finally:
            os._exit(status)

    def op_new_session(self, ctty: bool) -> None:
        try:
            os.setsid()
            if ctty:  # fd 0 is the pty jbl made for this job, nobody's terminal yet
                fcntl.ioctl(0, TIOCSCTTY, 0)
        except OSError as e:
            raise StepFailed(f"new session: {e.strerror}") from None

    def op_no_new_privs(self) -> None:
        prctl(PR_SET_NO_NEW_PRIVS, 1, "no_new_privs")

    def op_join_cgroup(self, procs_files: list[str]) -> None:
        pid = str(os.getpid()).encode()
        for f in procs_files:
            try:
                fd = os.open(f, os.O_WRONLY)
                try:
                    os.write(fd, pid)
                finally:
                    os.close(fd)
            except OSError as e:
                raise StepFailed(f"join cgroup {f}: {e.strerror}") from None

    def op_unshare(self, user: bool, net: bool, mount: bool = True) -> None:
        flags = CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWCGROUP
        flags |= (CLONE_NEWUSER if user else 0) | (CLONE_NEWNET if net else 0)
        check(libc.unshare(flags | (CLONE_NEWNS if mount else 0)), "unshare")
        Layers.userns = user

    def op_unshare_late(self, mount: bool, net: bool) -> None:
        flags = (CLONE_NEWNS if mount else 0) | (CLONE_NEWNET if net else 0)
        check(libc.unshare(flags), "unshare (init)")

    def op_id_map(self, uid: int, gid: int) -> None:
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1\n"),
                           ("gid_map", f"{gid} {gid} 1\n")):
            try:
                with open(f"/proc/self/{name}", "w") as fh:
                    fh.write(text)
            except OSError as e:
                raise StepFailed(f"write /proc/self/{name}: {e.strerror}") from None

    def op_fork_init(self) -> None:
        pid = os.fork()
        if pid:
            for fd in (self.status_fd, self.sock_fd):  # init's now (-1: not here yet)
                if fd >= 0:
                    os.close(fd)
            relay(pid)
        prctl(PR_SET_PDEATHSIG, SIGKILL, "init: set parent-death signal")

    def op_root_tmpfs(self) -> None:
        mount(None, "/", None, MS_REC | MS_SLAVE, None, "make / a slave mount")
        base = "/tmp"
        mount("tmpfs", base, "tmpfs", MS_NODEV | MS_NOSUID, "mode=0755", "mount staging tmpfs")
        os.chdir(base)
        os.mkdir("newroot", 0o755)
        os.mkdir("oldroot", 0o755)
        check(libc.syscall(SYS_PIVOT_ROOT, b".", b"oldroot"), "pivot_root to staging root")
        os.chdir("/")
        mount("tmpfs", NEW, "tmpfs", MS_NODEV | MS_NOSUID, "mode=0755", "mount root tmpfs")

    def op_bind_ro(self, source: str, target: str) -> None:
        bind(source, target, True, f"bind {target} (read-only)")

    def op_bind(self, source: str, target: str) -> None:
        bind(source, target, False, f"bind {target}")

    def op_overlay(self, source: str, target: str, uid: int, gid: int) -> None:
        if not os.path.isdir(H(source)):  # overlayfs layers are directories
            bind(source, target, True, f"bind {target} (read-only: not a directory)")
            return
        at = make_target(target, f"overlay {target}")
        overlay(H(source), at, f"overlay {target}", uid, gid)

    def op_tmpfs(self, target: str, mode: int, uid: int, gid: int) -> None:
        path = make_target(target, f"mount tmpfs {target}")
        mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, f"mode={mode:o}",
              f"mount tmpfs {target}")
        if uid >= 0:
            os.chown(path, uid, gid)

    def op_proc(self, target: str) -> None:
        mount("proc", make_target(target, f"mount {target}"), "proc",
              MS_NOSUID | MS_NODEV | MS_NOEXEC, None, f"mount {target}")

    def op_protect_proc(self, paths: list[str]) -> None:
        for p in paths:
            path = J("/proc/" + p)
            if os.path.exists(path):
                mount(path, path, None, MS_BIND | MS_REC, None, f"bind /proc/{p}")
                mount(None, path, None, MS_BIND | MS_REMOUNT | MS_RDONLY | mount_flags(path),
                      None, f"remount /proc/{p} read-only")

    def op_dev(self, target: str, nodes: list[str]) -> None:
        dev = make_target(target, f"mount {target}")
        mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755", f"mount {target}")
        for n in nodes:
            bind(f"/dev/{n}", f"{target}/{n}", False, f"bind {target}/{n}", remount=False)
        for name, to in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"),
                         ("ptmx", "pts/ptmx")):
            os.symlink(to, f"{dev}/{name}")
        os.mkdir(f"{dev}/shm")
        mount("tmpfs", f"{dev}/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777",
              f"mount {target}/shm")
        os.mkdir(f"{dev}/pts")
        mount("devpts", f"{dev}/pts", "devpts", MS_NOSUID | MS_NOEXEC,
              "newinstance,ptmxmode=0666,mode=620", f"mount {target}/pts")

    def op_bind_dev(self, source: str, target: str) -> None:
        what = f"bind {target}"
        try:
            if (os.lstat(H(source)).st_mode & 0o170000) != 0o020000:
                raise StepFailed(f"{what}: {source}: not a character device")
        except OSError as e:
            raise StepFailed(f"{what}: {source}: {e.strerror}") from None
        path = make_target(target, what, "file")
        mount(H(source), path, None, MS_BIND, None, what)
        # usable (no nodev, even from a nodev source mount), never setuid or executable
        flags = (mount_flags(path) & ~(MS_NODEV | MS_RDONLY)) | MS_NOSUID | MS_NOEXEC
        mount(None, path, None, MS_BIND | MS_REMOUNT | flags, None, f"{what}: remount")

    def op_symlink(self, link: str, target: str) -> None:
        try:
            os.symlink(link, J(target))
        except OSError as e:
            raise StepFailed(f"symlink {target}: {e.strerror}") from None

    def op_mkdir(self, target: str, mode: int) -> None:
        os.chmod(make_target(target, f"mkdir {target}"), mode)

    def op_copy_in(self, source: str, target: str, uid: int, gid: int, groups: list[int],
                   contents: bool, max_bytes: int, max_entries: int, max_depth: int) -> None:
        what = f"upload {source}"
        budget = Budget(what, max_bytes, max_entries, max_depth)
        saved = os.getgroups()
        if uid >= 0:  # root --user: read and write with the job user's rights, not root's
            os.setgroups(groups)
            libc.setfsgid(gid)
            libc.setfsuid(uid)
            if libc.setfsuid(-1) != uid:  # -1 changes nothing and returns the current fsuid
                raise StepFailed(f"{what}: cannot take the job user's identity")
        try:
            copy_in(OLD, source, J(target), contents, budget)
        finally:
            if uid >= 0:
                libc.setfsuid(0)
                libc.setfsgid(0)
                os.setgroups(saved)

    def op_loopback_up(self) -> None:
        fd = check(libc.socket(2, 2 | os.O_CLOEXEC, 0), "bring up lo: socket")
        try:
            ifr = bytearray(40)
            ifr[0:2] = b"lo"
            fcntl.ioctl(fd, 0x8913, ifr)  # SIOCGIFFLAGS
            flags = int.from_bytes(ifr[16:18], "little") | 1  # IFF_UP
            ifr[16:18] = flags.to_bytes(2, "little")
            fcntl.ioctl(fd, 0x8914, ifr)  # SIOCSIFFLAGS
        except OSError as e:
            raise StepFailed(f"bring up lo: {e.strerror}") from None
        finally:
            os.close(fd)

    def op_net_ready(self, fd: int) -> None:
        try:
            os.write(fd, b"n")
        except OSError as e:
            raise StepFailed(f"network: tell jbl the namespace exists: {e.strerror}") from None

    def op_await_net(self, fd: int) -> None:
        try:
            got = os.read(fd, 1)
        except OSError as e:
            raise StepFailed(f"network: wait for slirp4netns: {e.strerror}") from None
        finally:
            os.close(fd)
        if got != b"g":  # jbl gave up (and says why) or died
            raise StepFailed("network: slirp4netns did not configure the job's network")

    def op_etc_files(self, files: list[tuple[str, bytes]], how: str) -> None:
        """Write ``files`` into the staging tmpfs (gone from every path once the staging
        root is detached; the binds keep them) and place them read-only in the job's /etc."""
        what = "/etc"
        try:
            os.mkdir(ETC_DIR, 0o755)
            for name, data in files:
                what = f"/etc/{name}"
                fd = os.open(f"{ETC_DIR}/{name}", os.O_WRONLY | os.O_CREAT | os.O_EXCL
                             | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                finally:
                    os.close(fd)
        except OSError as e:
            raise StepFailed(f"write {what}: {e.strerror}") from None
        flags = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV
        if how == "files":  # each one over the runtime's own regular file
            for name, _ in files:
                target = make_target(f"/etc/{name}", f"bind /etc/{name}", "file")
                mount(f"{ETC_DIR}/{name}", target, None, MS_BIND, None, f"bind /etc/{name}")
                mount(None, target, None, flags | mount_flags(target), None,
                      f"remount /etc/{name} read-only")
        elif how == "dir":  # the runtime has no /etc: these files are all of it
            target = make_target("/etc", "bind /etc")
            mount(ETC_DIR, target, None, MS_BIND, None, "bind /etc")
            mount(None, target, None, flags | mount_flags(target), None,
                  "remount /etc read-only")
        else:  # one read-only overlay (no upper layer): ours on top of the runtime's /etc
            target = make_target("/etc", "overlay /etc")
            mount("overlay", target, "overlay", MS_RDONLY | MS_NOSUID | MS_NODEV,
                  f"lowerdir={ETC_DIR}:{target}", "overlay /etc")

    def op_root_readonly(self) -> None:
        for layer in Layers.readonly:  # mount points made in the runtime: read-only again
            mount(None, layer, None, MS_BIND | MS_REMOUNT | MS_RDONLY | mount_flags(layer),
                  None, f"remount {layer[len(NEW):]} read-only")
        mount(None, NEW, None, MS_BIND | MS_REMOUNT | MS_RDONLY | mount_flags(NEW), None,
              "remount / read-only")

    def op_pivot_root(self) -> None:
        mount(None, OLD, None, MS_REC | MS_PRIVATE, None, "make old root private")
        check(libc.umount2(OLD.encode(), MNT_DETACH), "detach old root")
        os.chdir(NEW)
        check(libc.syscall(SYS_PIVOT_ROOT, b".", b"."), "pivot_root")
        check(libc.umount2(b".", MNT_DETACH), "detach staging root")
        os.chdir("/")

    def op_hostname(self, name: str) -> None:
        raw = name.encode()
        check(libc.sethostname(raw, len(raw)), "sethostname")

    def op_fork_job(self) -> None:
        pid = os.fork()
        if pid:
            os.close(self.status_fd)
            relay(pid)

    def op_set_user(self, uid: int, gid: int, groups: list[int]) -> None:
        drop_bounding_set()
        try:
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
        except OSError as e:
            raise StepFailed(f"set user {uid}:{gid}: {e.strerror}") from None

    def op_new_keyring(self) -> None:
        if libc.syscall(SYS_KEYCTL, KEYCTL_JOIN_SESSION_KEYRING, None) < 0:
            err = ctypes.get_errno()
            # No keyrings at all (ENOSYS), or keyctl refused by a seccomp filter (EPERM, as
            # in a container): the job, under the same filter, cannot reach any keyring either.
            if err not in (errno.ENOSYS, errno.EPERM):
                raise StepFailed(f"new session keyring: {os.strerror(err)}")

    def op_drop_caps(self) -> None:
        drop_bounding_set()
        prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, "clear ambient capabilities")
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, self
        data = (ctypes.c_uint32 * 6)()
        check(libc.syscall(SYS_CAPSET, header, data), "capset")

    def op_env(self, vars: list[list[str]]) -> None:
        self.env = {k: v for k, v in vars}

    def op_chdir(self, target: str) -> None:
        try:
            os.chdir(target)
        except OSError as e:
            raise StepFailed(f"chdir {target}: {e.strerror}") from None

    def op_exec(self, argv: list[str]) -> None:
        # every fd >= 3 (STATUS_FD included) closes at exec; the status pipe reports failure
        check(libc.syscall(SYS_CLOSE_RANGE, 3, 0xFFFFFFFF, CLOSE_RANGE_CLOEXEC), "close fds")
        for sig in (SIGPIPE, SIGXFSZ):  # Python ignores these; the job must not inherit that
            _signal.signal(sig, _signal.SIG_DFL)
        _signal.pthread_sigmask(_signal.SIG_SETMASK, [])
        try:
            os.execvpe(argv[0], argv, self.env)
        except OSError as e:
            self.fail(*exec_failure(argv[0], e, self.env.get("PATH", "")))


def exec_failure(cmd: str, e: OSError, path: str) -> tuple[str, int]:
    """The message and status for a command that could not be started, as shells and
    container runners say it: 127 not found (also a script whose interpreter is missing),
    126 found but not executable."""
    if e.errno in (errno.ENOENT, errno.ENOTDIR):
        if "/" not in cmd:
            return (f"{cmd}: command not found in the runtime (PATH={path})",
                    COMMAND_NOT_FOUND)
        if os.path.lexists(cmd):
            return (f"{cmd}: {e.strerror} (its #! interpreter or its loader is not in the "
                    "runtime)", COMMAND_NOT_FOUND)
        return f"{cmd}: no such file in the runtime", COMMAND_NOT_FOUND
    return f"{cmd}: cannot execute: {e.strerror}", COMMAND_NOT_EXECUTABLE


# ---- uploads: a bounded copy that never follows a link -------------------------------------

O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
O_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
S_IFMT, S_IFDIR, S_IFREG, S_IFLNK = 0o170000, 0o040000, 0o100000, 0o120000
KINDS = {0o010000: "a named pipe", 0o140000: "a socket", 0o020000: "a character device",
         0o060000: "a block device"}


class Budget:
    """What one upload may still take; ``take`` fails the step past a bound."""

    def __init__(self, what: str, max_bytes: int, max_entries: int, max_depth: int) -> None:
        self.what, self.max_bytes, self.max_entries = what, max_bytes, max_entries
        self.max_depth = max_depth
        self.bytes = self.entries = 0

    def take(self, nbytes: int, entries: int = 0) -> None:
        self.bytes += nbytes
        self.entries += entries
        if self.entries > self.max_entries:
            raise StepFailed(f"{self.what}: more than {self.max_entries} entries "
                             "(the upload limit)")
        if self.bytes > self.max_bytes:
            raise StepFailed(f"{self.what}: more than {self.max_bytes} bytes (the upload limit)")


def open_nofollow(root: str, path: str, what: str) -> int:
    """Open host ``path`` (absolute) below ``root`` one component at a time, following no
    link (O_PATH for the directories on the way: search permission is enough there)."""
    parts = [p for p in path.split("/") if p]
    fd = os.open(root or "/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            flags = O_FILE if last else os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                nfd = os.open(part, flags, dir_fd=fd)
            except OSError as e:
                shown = "/" + "/".join(parts[:i + 1])
                if e.errno == errno.ELOOP or (e.errno == errno.ENOTDIR and not last
                                              and os.path.islink(f"{root}{shown}")):
                    raise StepFailed(f"{what}: {shown}: a path component is a symlink") from None
                raise StepFailed(f"{what}: {shown}: {e.strerror}") from None
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


def copy_in(root: str, source: str, dst: str | None, contents: bool, budget: Budget) -> None:
    """Copy host ``source`` (a file or a directory) to ``dst``, or its entries into the
    existing directory ``dst`` when ``contents``; ``dst`` None only measures (the CLI's
    check before the job starts). Links are copied as links, never followed; pipes,
    sockets and devices are refused; setuid/setgid bits are dropped."""
    fd = open_nofollow(root, source, budget.what)
    try:
        st = os.fstat(fd)
        kind = st.st_mode & S_IFMT
        if kind not in (S_IFDIR, S_IFREG):
            raise StepFailed(f"{budget.what}: {KINDS.get(kind, 'not a file')}: only files, "
                             "directories and links are uploaded")
        if contents and kind != S_IFDIR:
            raise StepFailed(f"{budget.what}: not a directory")
        if contents:
            dfd = None if dst is None else os.open(dst, O_DIR)
            try:
                _copy_dir(fd, dfd, budget, 1, source)
            finally:
                if dfd is not None:
                    os.close(dfd)
            return
        budget.take(st.st_size if dst is None and kind == S_IFREG else 0, 1)
        if dst is None and kind == S_IFREG:
            return
        parent = None if dst is None else os.open(os.path.dirname(dst), O_DIR)
        try:
            name = os.path.basename(dst or "x")
            if kind == S_IFREG:
                _copy_file(fd, st, parent, name, budget)  # type: ignore[arg-type]
            else:
                if parent is not None:
                    os.mkdir(name, 0o700, dir_fd=parent)
                dfd = None if parent is None else os.open(name, O_DIR, dir_fd=parent)
                try:
                    _copy_dir(fd, dfd, budget, 1, source)
                finally:
                    if dfd is not None:
                        os.chmod(dfd, st.st_mode & 0o777)
                        os.close(dfd)
        finally:
            if parent is not None:
                os.close(parent)
    except OSError as e:
        raise StepFailed(f"{budget.what}: {e.strerror}") from None
    finally:
        os.close(fd)


def _copy_dir(src: int, dst: int | None, budget: Budget, depth: int, shown: str) -> None:
    if depth > budget.max_depth:
        raise StepFailed(f"{budget.what}: {shown}: more than {budget.max_depth} levels deep "
                         "(the upload limit)")
    with os.scandir(src) as it:
        for entry in it:
            name = entry.name
            st = os.stat(name, dir_fd=src, follow_symlinks=False)
            kind = st.st_mode & S_IFMT
            if kind == S_IFLNK:
                link = os.readlink(name, dir_fd=src)
                budget.take(len(link), 1)
                if dst is not None:
                    os.symlink(link, name, dir_fd=dst)
            elif kind == S_IFREG:
                budget.take(st.st_size if dst is None else 0, 1)
                if dst is not None:
                    fd = os.open(name, O_FILE, dir_fd=src)
                    try:
                        _copy_file(fd, os.fstat(fd), dst, name, budget)
                    finally:
                        os.close(fd)
            elif kind == S_IFDIR:
                budget.take(0, 1)
                fd = os.open(name, O_DIR, dir_fd=src)
                dfd = None
                try:
                    if dst is not None:
                        os.mkdir(name, 0o700, dir_fd=dst)
                        dfd = os.open(name, O_DIR, dir_fd=dst)
                    _copy_dir(fd, dfd, budget, depth + 1, f"{shown}/{name}")
                finally:
                    os.close(fd)
                    if dfd is not None:
                        os.chmod(dfd, st.st_mode & 0o777)
                        os.close(dfd)
            else:
                raise StepFailed(f"{budget.what}: {shown}/{name} is {KINDS.get(kind, '?')}: "
                                 "only files, directories and links are uploaded")


def _copy_file(fd: int, st: os.stat_result, dst: int, name: str, budget: Budget) -> None:
    if st.st_mode & S_IFMT != S_IFREG:  # swapped since it was listed
        raise StepFailed(f"{budget.what}: {name}: not a regular file any more")
    out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                  st.st_mode & 0o777, dir_fd=dst)
    try:
        while True:  # the actual bytes count, not the size listed: a file may grow meanwhile
            n = os.sendfile(out, fd, None, min(1 << 20, budget.max_bytes - budget.bytes + 1))
            if n == 0:
                break
            budget.take(n)
        os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
    finally:
        os.close(out)


def drop_bounding_set() -> None:
    cap = 0
    while True:
        have = libc.prctl(PR_CAPBSET_READ, cap, 0, 0, 0)
        if have < 0:
            return  # EINVAL: past the last capability
        if have:
            prctl(PR_CAPBSET_DROP, cap, f"drop capability {cap}")
        cap += 1


def relay(child: int) -> NoReturn:
    """Forward signals to ``child``, reap every child, exit with ``child``'s status."""
    while True:
        info = _signal.sigwaitinfo(FORWARD | {SIGCHLD})
        if info.si_signo == SIGCHLD:
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    os._exit(SETUP_FAILED)
                if pid == 0:
                    break
                if pid == child:
                    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status)
                             else 128 + os.WTERMSIG(status))
        else:  # no terminal signals us (own session): this came from jbl, pass it on
            try:  # noqa: SIM105 (contextlib would cost start-up time here)
                os.kill(child, info.si_signo)
            except ProcessLookupError:
                pass


def prepare_helper(status_fd: int, parent: int) -> Sandbox:
    """The helper's first moves, in either start: signals, parent-death signal.
    ``status_fd`` -1: a helper made ahead, whose status pipe comes with its plan."""
    if status_fd >= 0:
        os.set_inheritable(status_fd, False)
    _signal.pthread_sigmask(_signal.SIG_SETMASK, FORWARD | {SIGCHLD})
    for sig in FORWARD:  # a handler (not SIG_DFL) so PID 1 is not immune from the parent ns
        _signal.signal(sig, lambda *_: None)
    box = Sandbox(status_fd, "")
    if libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) < 0 or os.getppid() != parent:
        box.fail("helper: parent went away")
    return box


def run_forked(plan: dict[str, Any], status_fd: int, parent: int) -> NoReturn:
    """The helper when ``supervise`` forked it (single-threaded parent, see docs/runner.md):
    the plan is already here. Every fd but STATUS_FD, a step's ``fd`` (the network's
    socket) and stdio is closed first, so the
    relays (helper, init) hold nothing of the parent's (its index, its pipes) for the job's
    lifetime, as an exec'd helper would not; the cyclic GC is off so no finaliser of a
    parent object can close a descriptor number reused here."""
    try:
        gc.disable()
        keep = sorted({status_fd} | {s["fd"] for s in plan["steps"] if s.get("fd", -1) >= 0})
        for lo, hi in zip([3] + [k + 1 for k in keep], [k - 1 for k in keep] + [0xFFFFFFFF],
                          strict=True):
            if lo <= hi:
                libc.syscall(SYS_CLOSE_RANGE, lo, hi, 0)
        box = prepare_helper(status_fd, parent)
        box.job_id = plan["job_id"]
        box.run(plan["steps"])
    finally:
        os._exit(SETUP_FAILED)  # never return into the supervisor's code


READY, READY_NET = b"R", b"N"  # a waiting helper's word (runner/warm.py): up; up, in a new
# network namespace with its loopback up


def wait_main(sock_fd: int, parent: int, net: bool) -> NoReturn:
    """A helper exec'd *ahead* of its job (``python -I -S sandbox.py --wait SOCK PARENT
    [--net]``, runner/warm.py). With ``--net`` it first moves into a network namespace of
    its own and brings its loopback up (what ``unshare`` and ``loopback_up`` would do for a
    job without network, the slowest of its steps). It says READY (or READY_NET) on the
    stream socket SOCK, then reads two messages (``Inbox``). The first, sent once it is in
    the job's cgroup, holds the steps that do not depend on the request (``{"steps"}``):
    carried out at once, up to the fork of init (the helper then only relays, as after any
    ``fork_init``); a failure is kept and reported in the plan's place. The second, read
    by init, is the rest of the plan (``{"umask", "plan"}``) with the status pipe and the
    job's stdio; then it goes on as ``run_forked``. EOF instead of either: nobody needs us
    (exit 0; the namespaces go with us)."""
    inbox = Inbox(sock_fd)
    box = prepare_helper(-1, parent)
    word = READY
    if net and libc.unshare(CLONE_NEWNET) == 0:
        try:
            box.op_loopback_up()
            word = READY_NET
        except StepFailed:
            os._exit(0)  # a network namespace without its loopback: never used
    try:
        inbox.sock.sendall(word)
    except OSError:
        os._exit(0)
    ahead, _ = inbox.next(0)
    box.sock_fd = sock_fd
    failed = box.carry_out(ahead["steps"])  # in init from fork_init on
    msg, fds = inbox.next(4)
    inbox.sock.close()
    box.sock_fd = -1
    status_fd = fds[0]
    for target, fd in enumerate(fds[1:]):
        os.dup2(fd, target)
    for fd in fds[1:]:
        if fd > 2 and fd != status_fd:
            os.close(fd)
    os.set_inheritable(status_fd, False)
    box.status_fd = status_fd
    if failed:
        box.fail(failed)
    os.umask(msg["umask"])
    plan = msg["plan"]
    box.job_id = plan["job_id"]
    box.run(plan["steps"])


class Inbox:
    """Messages from the job process on a stream socket: each a 4-byte length, then
    ``marshal`` data, its descriptors passed on its first byte (one read may hold the end of
    one message and the start of the next, with the next one's descriptors)."""

    def __init__(self, fd: int) -> None:
        import _socket

        self.sock = _socket.socket(fileno=fd)
        self.space = _socket.CMSG_SPACE(4 * 4)
        self.data = b""
        self.fds: list[int] = []

    def next(self, nfds: int) -> tuple[dict[str, Any], list[int]]:
        """The next message and its ``nfds`` descriptors. EOF before it: exit 0 (nobody
        needs us); a message cut short, or with other descriptors: exit SETUP_FAILED."""
        while len(self.data) < 4 or len(self.data) < 4 + int.from_bytes(self.data[:4], "big"):
            if not self._more():
                os._exit(SETUP_FAILED if self.data else 0)
        size = 4 + int.from_bytes(self.data[:4], "big")
        msg, self.data = marshal.loads(self.data[4:size]), self.data[size:]
        fds, self.fds = self.fds[:nfds], self.fds[nfds:]
        if len(fds) != nfds:
            os._exit(SETUP_FAILED)
        return msg, fds

    def _more(self) -> bool:
        import _socket

        try:
            data, anc, flags, _ = self.sock.recvmsg(1 << 20, self.space)
        except OSError:
            return False
        if flags & _socket.MSG_CTRUNC:
            os._exit(SETUP_FAILED)
        self.fds += [int.from_bytes(payload[i:i + 4], sys.byteorder, signed=True)
                     for level, kind, payload in anc
                     if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS
                     for i in range(0, len(payload) - len(payload) % 4, 4)]
        self.data += data
        return bool(data)


def main(argv: list[str]) -> NoReturn:
    """The helper as its own exec'd interpreter (``python -I -S sandbox.py ...``)."""
    if argv[1] == "--wait":
        wait_main(int(argv[2]), int(argv[3]), argv[4:] == ["--net"])
    plan_fd, status_fd, parent = int(argv[1]), int(argv[2]), int(argv[3])
    box = prepare_helper(status_fd, parent)
    chunks = []
    while chunk := os.read(plan_fd, 1 << 16):
        chunks.append(chunk)
    os.close(plan_fd)
    plan = marshal.loads(b"".join(chunks))
    box.job_id = plan["job_id"]
    box.run(plan["steps"])


if __name__ == "__main__":
    main(sys.argv)
