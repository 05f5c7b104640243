"""NVIDIA GPUs: discovery from the driver, whole-GPU allocation to jobs, what a job gets.

Discovery (``discover(root)``) reads ``ROOT/proc/driver/nvidia/gpus/*/information`` (model,
UUID, bus location, device minor; memory when the file names it) and, when present,
``nvidia-smi --query-gpu=…`` (index, memory, name; at most ``SMI_TIMEOUT`` seconds and
``MAX_TEXT`` bytes). ``ROOT`` is ``/``; tests name a fake driver tree instead
(``JBL_GPU_DRIVER_ROOT`` / config ``gpu_driver_root``): the same code then finds
``ROOT/dev/nvidia*``, ``ROOT/etc/ld.so.cache`` and ``ROOT/usr/bin/nvidia-smi``.

Allocation (``allocate``) is first-fit over the GPUs that match, in index order, by one
``flock`` per GPU on ``STATE/gpu-<bus id>.lock``, for root's jobs and every user's alike. The
lock files are root's (``0644``) in a directory only root may write (``/run/jbl/gpus``;
``ROOT/run/jbl/gpus`` for a fake tree), made by ``jbl setup --system`` or root's first GPU job
(``ensure_locks``). Anyone opens one read-only (``O_NOFOLLOW|O_NONBLOCK``, then ``fstat``: a
regular file of root's, one link, writable by root only: nobody can swap it) and takes
``LOCK_EX|LOCK_NB`` (flock needs no write access); nobody ever waits for a lock, root least of
all. A user holding a lock outside a job merely reserves that GPU, as a job running ``sleep``
would (docs/runner.md, "GPUs"). The ``GpuAllocation`` holds the descriptors (close-on-exec,
closed before the sandbox helper starts, see ``supervise``) for the job's life; the kernel
drops a lock when its holder dies, so the GPUs of a SIGKILLed ``jbl`` are free at once.

Who holds a GPU comes from the kernel only (``/proc/locks``: pid by the lock file's inode; the
uid is the owner of ``/proc/PID``). The job id is a record the holder's jbl writes where only
its user can write: root in the lock directory (``0600``: users never read root's job ids), a
user in ``/run/user/UID/jbl/gpus`` or ``~/.local/state/jbl/gpus`` (``0700``). A record is
believed only when its file and directories are the holder's uid's (fusefs/trust.py), its pid
is the kernel's holder, and the caller is that user or root; so a user can neither read
another's job ids nor make root believe a record about someone else's lock.

``grant(alloc)`` turns an allocation into a ``plan.GpuGrant``: the job's device nodes
(``/dev/nvidiaN`` of its GPUs and the control nodes present), the driver's libraries from the
linker cache and ``nvidia-smi`` (bound read-only under ``JOB_DRIVER_DIR``), the environment,
and the cgroup v1 ``devices`` rules. Not thread-safe; one allocation per job.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import platform
import pwd
import re
import stat
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from jbl.store.errors import PermissionDenied
from jbl.store.settings import Settings
from jbl.store.units import format_size

from .errors import GpuUnavailable, JobError, UsageError
from .plan import GpuGrant

DRIVER_ROOT_ENV = "JBL_GPU_DRIVER_ROOT"
NVIDIA_MAJOR = 195  # /dev/nvidiaN, nvidiactl (255), nvidia-modeset (254)
CONTROL_NODES = ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset")
STATE_DIR = "run/jbl/gpus"  # under the driver root
LOCK_MODE = 0o644  # root's; any user opens it read-only to flock it
USER_RECORDS = "jbl/gpus"  # under /run/user/UID, else .local/state/jbl/gpus under the home
RECORD_READ_TIMEOUT = 2.0  # seconds root gives another user's (possibly NFS/FUSE) home
SETUP_HINT = "an admin runs `jbl setup --system` (or root runs one GPU job)"
JOB_DRIVER_DIR = "/nvidia-driver"  # the job's lib/ and bin/ of the host driver
# The driver's user-space libraries, by name prefix (as nvidia-container-toolkit lists them)
LIB_PREFIXES = ("libcuda.so", "libcudadebugger.so", "libnvidia-", "libnvcuvid.so",
                "libnvoptix.so")
BINARIES = ("nvidia-smi",)
BIN_DIRS = ("usr/bin", "usr/local/bin", "usr/sbin", "bin")
SMI_TIMEOUT = 10.0  # nvidia-smi may take seconds to initialise without persistence mode
LDCONFIG_TIMEOUT = 10.0
MAX_TEXT = 1 << 20  # bytes read from any driver file or command
MAX_GPUS = 64
MAX_LIBS = 512
BUS_RE = re.compile(r"^([0-9a-fA-F]{1,8}):([0-9a-fA-F]{2}):([0-9a-fA-F]{2})\.([0-7])$")
MEM_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMGT]i?B)?$", re.I)
LDCACHE_RE = re.compile(r"^\s*(\S+)\s+\(([^)]*)\)\s+=>\s+(/\S+)\s*$")


@dataclass(frozen=True)
class Gpu:
    index: int  # nvidia-smi's index (PCI bus order), else the position by bus id
    minor: int  # /dev/nvidia<minor>
    bus_id: str  # normalised: 0000:01:00.0
    model: str = ""
    uuid: str = ""
    memory: int | None = None  # bytes, when the driver says

    @property
    def node(self) -> str:
        return f"nvidia{self.minor}"


@dataclass(frozen=True)
class Holder:
    pid: int
    uid: int | None
    job_id: str = ""


@dataclass
class GpuAllocation:
    root: Path
    gpus: tuple[Gpu, ...]
    job_id: str
    _fds: list[int] = field(default_factory=list, repr=False)
    _dir_fd: int = -1  # the lock directory
    _rec_fd: int = -1  # the directory of this job's records (-1: none written)

    def release(self) -> None:
        """Drop the locks (the records go first, so no record outlives its lock)."""
        if self._rec_fd >= 0:
            for g in self.gpus:
                with contextlib.suppress(OSError):
                    os.unlink(_record_name(g), dir_fd=self._rec_fd)
            os.close(self._rec_fd)
            self._rec_fd = -1
        for fd in self._fds:
            os.close(fd)  # closing the only descriptor releases the flock
        self._fds.clear()
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1


# ---- settings and discovery ------------------------------------------------------------

def driver_root(env: Mapping[str, str], configured: str | None) -> Path:
    """``/``, or the test-only driver tree (env first, then config). A tree other than ``/``
    must be a directory of the caller's or root's that nobody else can write: its device
    nodes are bound into jobs."""
    text = env.get(DRIVER_ROOT_ENV) or configured or "/"
    root = Path(text)
    if not root.is_absolute():
        raise UsageError(f"invalid {DRIVER_ROOT_ENV} {text!r}: must be an absolute path")
    if root == Path("/"):
        return root
    try:
        st = os.stat(root, follow_symlinks=False)
    except OSError as e:
        raise UsageError(f"GPU driver root {root}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid not in (os.geteuid(), 0) or st.st_mode & 0o022:
        raise UsageError(f"GPU driver root {root}: must be a directory of yours or root's that "
                         "no one else can write")
    return root


def resolve_driver_root(settings: Settings) -> Path:
    """The driver root this command uses: ``JBL_GPU_DRIVER_ROOT``, else the config's
    ``gpu_driver_root``, else ``/`` (Settings.gpu_driver_root; checked by driver_root)."""
    return driver_root(settings.env, settings.gpu_driver_root)


def _under(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


def _read_text(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        return os.read(fd, MAX_TEXT).decode("utf-8", "replace")
    finally:
        os.close(fd)


def normalise_bus_id(text: str) -> str | None:
    """``00000000:01:00.0`` / ``0000:01:00.0`` -> ``0000:01:00.0`` (None if malformed)."""
    m = BUS_RE.match(text.strip())
    if not m:
        return None
    return f"{int(m.group(1), 16):04x}:{m.group(2)}:{m.group(3)}.{m.group(4)}".lower()


def _memory(text: str, default_unit: str = "MiB") -> int | None:
    m = MEM_RE.match(text.strip())
    if not m:
        return None
    unit = (m.group(2) or default_unit).upper().replace("I", "")
    return int(float(m.group(1)) * {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30,
                                    "TB": 1 << 40}[unit])


def parse_information(text: str) -> dict[str, str]:
    """``Key: value`` lines of a ``gpus/<bus>/information`` file."""
    out: dict[str, str] = {}
    for line in text.splitlines()[:200]:
        k, sep, v = line.partition(":")
        if sep:
            out[k.strip()] = v.strip()
    return out


def _proc_gpus(root: Path) -> list[dict[str, str]]:
    top = _under(root, "proc/driver/nvidia/gpus")
    try:
        names = sorted(os.listdir(top))[:MAX_GPUS]
    except OSError:
        return []
    out = []
    for name in names:
        try:
            info = parse_information(_read_text(top / name / "information"))
        except OSError:
            continue
        info.setdefault("Bus Location", name)
        out.append(info)
    return out


def find_binary(root: Path, name: str) -> Path | None:
    for d in BIN_DIRS:
        p = _under(root, d) / name
        with contextlib.suppress(OSError):
            if stat.S_ISREG(os.stat(p).st_mode):
                return p
    return None


def _command(argv: list[str], timeout: float) -> str | None:
    """A command's stdout (bounded in time and size), None if it failed."""
    try:
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0:
        return None
    return r.stdout[:MAX_TEXT].decode("utf-8", "replace")


def _smi_gpus(root: Path) -> dict[str, dict[str, str]]:
    smi = find_binary(root, "nvidia-smi")
    if smi is None:
        return {}
    text = _command([str(smi), "--query-gpu=index,pci.bus_id,memory.total,name,uuid",
                     "--format=csv,noheader,nounits"], SMI_TIMEOUT)
    out: dict[str, dict[str, str]] = {}
    for line in (text or "").splitlines()[:MAX_GPUS]:
        cols = [c.strip() for c in line.split(",")]
        bus = normalise_bus_id(cols[1]) if len(cols) >= 4 else None
        if bus is not None and cols[0].isdigit():
            out[bus] = {"index": cols[0], "memory": cols[2], "name": cols[3],
                        "uuid": cols[4] if len(cols) > 4 else ""}
    return out


def discover(root: Path) -> tuple[Gpu, ...]:
    """The GPUs the driver under ``root`` reports, in index order."""
    proc = {b: info for info in _proc_gpus(root)
            if (b := normalise_bus_id(info.get("Bus Location", ""))) is not None}
    smi = _smi_gpus(root) if proc or _under(root, "proc/driver/nvidia").exists() else {}
    gpus = []
    for pos, bus in enumerate(sorted(set(proc) | set(smi))):
        info, row = proc.get(bus, {}), smi.get(bus, {})
        index = int(row["index"]) if row.get("index", "").isdigit() else pos
        minor_text = info.get("Device Minor", "")
        minor = int(minor_text) if minor_text.isdigit() else index
        memory = _memory(row.get("memory", "")) or _memory(
            info.get("Memory", info.get("FB Memory", info.get("Total Memory", ""))))
        uuid = info.get("GPU UUID", "") or row.get("uuid", "")
        gpus.append(Gpu(index, minor, bus, info.get("Model", "") or row.get("name", ""),
                        uuid if uuid.startswith(("GPU-", "MIG-")) else "", memory))
    return tuple(sorted(gpus, key=lambda g: (g.index, g.bus_id)))


# ---- allocation -------------------------------------------------------------------------

def _lock_name(g: Gpu) -> str:
    return f"gpu-{g.bus_id}.lock"


def _record_name(g: Gpu) -> str:
    return f"gpu-{g.bus_id}.job"


def open_state_dir(root: Path, create: bool) -> int | None:
    """The lock directory, opened without following links and checked: a directory of root's
    that only root can write (each missing component made 0755 by root). None when it does
    not exist and ``create`` is false."""
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        for part in (root / STATE_DIR).parts[1:]:
            made = False
            try:
                nfd = os.open(part, flags, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    return None
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o700, dir_fd=fd)  # 0700 until it has its mode
                    made = True
                nfd = os.open(part, flags, dir_fd=fd)
            os.close(fd)
            fd = nfd
            if made:
                os.fchmod(fd, 0o755)  # not what the umask leaves: users must reach the locks
        st = os.fstat(fd)
        if st.st_uid != 0 or st.st_mode & 0o022:
            raise JobError(f"GPU lock directory {root / STATE_DIR} is not root's alone "
                           f"(owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}); "
                           "remove it and try again")
        result, fd = fd, -1
        return result
    except OSError as e:
        raise JobError(f"GPU lock directory {root / STATE_DIR}: {e.strerror}") from None
    finally:
        if fd >= 0:
            os.close(fd)


def _open_lock(dir_fd: int, root: Path, g: Gpu) -> int:
    """``g``'s lock file, read-only (all flock needs), checked to be root's and writable by
    root only; root creates it (``LOCK_MODE``) or puts its mode right."""
    path = root / STATE_DIR / _lock_name(g)
    is_root = os.geteuid() == 0
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(_lock_name(g), flags | (os.O_CREAT if is_root else 0), LOCK_MODE,
                     dir_fd=dir_fd)
    except FileNotFoundError:
        raise GpuUnavailable(f"GPU {g.index}: no lock file {path}: GPUs are not set up for "
                             "users on this host", hint=SETUP_HINT) from None
    except PermissionError:
        raise GpuUnavailable(f"GPU lock file {path} can be opened by root only (made by an "
                             "older jbl)", hint=SETUP_HINT) from None
    except OSError as e:
        raise JobError(f"GPU lock file {path}: {e.strerror}; remove it and try again") from None
    try:
        st = os.fstat(fd)
        if (not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_nlink != 1
                or (not is_root and st.st_mode & 0o022)):
            raise JobError(f"GPU lock file {path} is not a file of root's that only root can "
                           "write; remove it and try again")
        if is_root and stat.S_IMODE(st.st_mode) != LOCK_MODE:
            os.fchmod(fd, LOCK_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def ensure_locks(root: Path, gpus: tuple[Gpu, ...],
                 dry: bool = False) -> list[tuple[Path, str | None]]:
    """Root (``jbl setup --system``): the lock directory and one lock file per GPU, made or
    put right unless ``dry``. Returns (path, what was or would be done: ``create``,
    ``change`` or None)."""
    top = root / STATE_DIR
    dir_fd = open_state_dir(root, create=False)
    if dir_fd is None:
        if dry:
            return [(top, "create"), *((top / _lock_name(g), "create") for g in gpus)]
        dir_fd = open_state_dir(root, create=True)
        assert dir_fd is not None
        out: list[tuple[Path, str | None]] = [(top, "create")]
    else:
        out = [(top, None)]
    try:
        for g in gpus:
            try:
                st: os.stat_result | None = os.stat(_lock_name(g), dir_fd=dir_fd,
                                                    follow_symlinks=False)
            except FileNotFoundError:
                st = None
            action = ("create" if st is None else
                      "change" if stat.S_IMODE(st.st_mode) != LOCK_MODE or st.st_uid != 0
                      else None)
            if action is not None and not dry:
                os.close(_open_lock(dir_fd, root, g))  # no lock taken: none to drop
            out.append((top / _lock_name(g), action))
    finally:
        os.close(dir_fd)
    return out


def _try_lock(dir_fd: int, root: Path, g: Gpu) -> int | None:
    """The locked descriptor of ``g``'s lock file, or None when someone else holds it."""
    fd = _open_lock(dir_fd, root, g)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def user_record_dirs(uid: int) -> list[tuple[Path, Path]]:
    """(top, records directory) where a user's jbl may have recorded its GPU jobs, in the
    order it tries them: ``top`` must exist and be the user's for it to write there."""
    out = [(Path(f"/run/user/{uid}"), Path(f"/run/user/{uid}") / USER_RECORDS)]
    try:
        home = pwd.getpwuid(uid).pw_dir
    except KeyError:
        home = ""
    if os.path.isabs(home):
        out.append((Path(home), Path(home) / ".local/state" / USER_RECORDS))
    return out


def _own_records_dir() -> int:
    """An fd on this (non-root) user's record directory, made 0700 if need be; -1 when none
    can be had (the jobs then show no job id; nothing else depends on it)."""
    from jbl.fusefs import trust

    uid = os.geteuid()
    for top, d in user_record_dirs(uid):
        try:
            if not stat.S_ISDIR((st := os.stat(top)).st_mode) or st.st_uid != uid:
                continue
            missing = []
            p = d
            while not p.exists() and p != top:
                missing.append(p)
                p = p.parent
            for p in reversed(missing):
                with contextlib.suppress(FileExistsError):
                    p.mkdir(mode=0o700)
                    os.chmod(p, 0o700)  # not what the umask leaves: trust wants it private
        except OSError:
            continue
        fd = trust.owned_dir(d, uid)
        if fd is not None:
            return fd
    return -1


def _write_record(dir_fd: int, g: Gpu, job_id: str) -> None:
    """``PID JOB-ID`` for ``g``, atomically, readable by its writer only."""
    tmp = f".{_record_name(g)}.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=dir_fd)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600, dir_fd=dir_fd)
    try:
        os.write(fd, f"{os.getpid()} {job_id}\n".encode())
    finally:
        os.close(fd)
    os.rename(tmp, _record_name(g), src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def describe(g: Gpu) -> str:
    mem = f" {format_size(g.memory)}" if g.memory else ""
    return f"GPU {g.index}: {g.model or 'unknown model'}{mem}"


def user_name(uid: int | None) -> str:
    if uid is None:
        return ""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _holder_text(g: Gpu, h: Holder | None) -> str:
    if h is None:
        return f"GPU {g.index} taken"
    who = f"pid {h.pid}" + (f", user {user_name(h.uid)}" if h.uid is not None else "")
    return f"GPU {g.index} held by {h.job_id} ({who})" if h.job_id else \
        f"GPU {g.index} held by {who}"


def allocate(root: Path, gpus: tuple[Gpu, ...], count: int, min_memory: int | None,
             job_id: str) -> GpuAllocation:
    """``count`` whole GPUs with at least ``min_memory`` bytes, first-fit, never waiting."""
    if not gpus:
        raise GpuUnavailable(f"--gpu={count}: no NVIDIA GPU on this host (nothing in "
                             f"{_under(root, 'proc/driver/nvidia/gpus')}: no GPU or no driver)")
    fit = [g for g in gpus if min_memory is None or (g.memory or 0) >= min_memory]
    if len(fit) < count:
        want = f" with at least {format_size(min_memory)}" if min_memory else ""
        raise GpuUnavailable(f"--gpu={count}: this host has {len(fit)} GPU(s){want}, not "
                             f"{count} ({'; '.join(describe(g) for g in gpus)})")
    is_root = os.geteuid() == 0
    dir_fd = open_state_dir(root, create=is_root)
    if dir_fd is None:
        raise GpuUnavailable(f"--gpu={count}: GPUs are not set up for users on this host "
                             f"({root / STATE_DIR} is missing)", hint=SETUP_HINT)
    alloc = GpuAllocation(root, (), job_id, _dir_fd=dir_fd)
    got: list[Gpu] = []
    try:
        if is_root:  # root's first GPU job makes every lock file, as setup would
            for g in gpus:
                os.close(_open_lock(dir_fd, root, g))
        for g in fit:
            if _node(root, g) is None:
                continue  # listed by the driver without a device node: not usable
            fd = _try_lock(dir_fd, root, g)
            if fd is not None:
                alloc._fds.append(fd)
                got.append(g)
                if len(got) == count:
                    break
        if len(got) < count:
            taken = holders(root, tuple(fit))
            busy = "; ".join(_holder_text(g, taken.get(g.bus_id)) for g in fit if g not in got)
            raise GpuUnavailable(f"--gpu={count}: only {len(got)} of the {len(fit)} matching "
                                 f"GPUs are free ({busy})",
                                 hint="jbl gpu list shows them; retry when a job ends")
        alloc.gpus = tuple(got)
        alloc._rec_fd = os.dup(dir_fd) if is_root else _own_records_dir()
        if alloc._rec_fd >= 0:
            for g in got:
                _write_record(alloc._rec_fd, g, job_id)
    except BaseException:
        alloc.release()
        raise
    return alloc


def holders(root: Path, gpus: tuple[Gpu, ...], viewer: int | None = None) -> dict[str, Holder]:
    """bus id -> who holds its lock now, from the kernel's lock table; the job id only for
    ``viewer``'s (default: the caller's) own holders, or any when ``viewer`` is root."""
    viewer = os.geteuid() if viewer is None else viewer
    dir_fd = open_state_dir(root, create=False)
    if dir_fd is None:
        return {}
    try:
        by_inode: dict[tuple[int, int, int], Gpu] = {}
        for g in gpus:
            with contextlib.suppress(OSError):
                st = os.stat(_lock_name(g), dir_fd=dir_fd, follow_symlinks=False)
                by_inode[(os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)] = g
        out: dict[str, Holder] = {}
        try:
            table = _read_text(Path("/proc/locks"))
        except OSError:
            return out
        for line in table.splitlines():
            f = line.split()
            # "N: FLOCK ADVISORY WRITE|READ PID MAJ:MIN:INO …"; waiters ("->") and other
            # kinds skipped; a shared lock (any user may take one) holds the GPU as well
            if len(f) < 6 or f[1] != "FLOCK" or f[3] not in ("WRITE", "READ"):
                continue
            try:
                maj, mnr, ino = f[5].split(":")
                held = by_inode.get((int(maj, 16), int(mnr, 16), int(ino)))
                pid = int(f[4])
            except ValueError:
                continue
            if held is not None and held.bus_id not in out:
                uid = _uid_of(pid)
                job = _recorded_job(dir_fd, held, pid, uid) if viewer in (0, uid) else ""
                out[held.bus_id] = Holder(pid, uid, job)
        return out
    finally:
        os.close(dir_fd)


def _uid_of(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def _recorded_job(dir_fd: int, g: Gpu, pid: int, uid: int | None) -> str:
    """The job id the holder's own jbl recorded for ``g``: believed only from a file of the
    holder's uid, in a directory only that uid (or root) can write, naming holder ``pid``."""
    from jbl.fusefs import trust

    if uid is None:
        return ""
    if uid == 0:
        data = trust.read_small(dir_fd, _record_name(g), 0, 256)
    else:
        def read() -> bytes | None:
            for _, d in user_record_dirs(uid):
                rfd = trust.owned_dir(d, uid)
                if rfd is not None:
                    try:
                        found = trust.read_small(rfd, _record_name(g), uid, 256)
                    finally:
                        os.close(rfd)
                    if found is not None:
                        return found
            return None
        # another user's home may hang (NFS, their FUSE mount): root gives it a deadline
        data = read() if uid == os.geteuid() else trust.within(RECORD_READ_TIMEOUT, read)
    words = (data or b"").decode("ascii", "replace").split()
    ok = len(words) == 2 and words[0] == str(pid) and re.fullmatch(r"job-[0-9a-f]{8}", words[1])
    return words[1] if ok else ""


# ---- what the job gets ------------------------------------------------------------------

def _node(root: Path, g: Gpu) -> Path | None:
    return _char_device(_under(root, "dev") / g.node)


def _char_device(p: Path) -> Path | None:
    try:
        return p if stat.S_ISCHR(os.lstat(p).st_mode) else None
    except OSError:
        return None


def driver_libraries(root: Path) -> list[tuple[str, Path]]:
    """(name, real file) of the driver's libraries in the linker cache under ``root``, for
    this host's word size; names are those ``ldconfig -p`` prints (sonames and links)."""
    argv = ["ldconfig", "-p"]
    if root != Path("/"):
        argv += ["-C", str(_under(root, "etc/ld.so.cache"))]
    text = _command(argv, LDCONFIG_TIMEOUT) or ""
    arch = {"x86_64": "x86-64", "aarch64": "AArch64"}.get(platform.machine(), "")
    out: list[tuple[str, Path]] = []
    for line in text.splitlines():
        m = LDCACHE_RE.match(line)
        if not m or not m.group(1).startswith(LIB_PREFIXES) or arch not in m.group(2):
            continue
        real = Path(os.path.realpath(_under(root, m.group(3))))
        if not real.is_relative_to(root):  # a link in a fake tree must not leave it
            continue
        with contextlib.suppress(OSError):
            if stat.S_ISREG(os.stat(real).st_mode):
                out.append((m.group(1), real))
        if len(out) >= MAX_LIBS:
            break
    return out


def _check_usable(node: str) -> None:
    """A device node the calling user may open read-write (NVIDIA's are normally 0666)."""
    if os.access(node, os.R_OK | os.W_OK):
        return
    st = os.stat(node)
    raise PermissionDenied(
        f"GPU device {node} is not usable by you (mode {stat.S_IMODE(st.st_mode):04o}, owner "
        f"{user_name(st.st_uid)}, group {st.st_gid})",
        hint="NVIDIA's device nodes are normally 0666 (the driver's NVreg_DeviceFileMode); "
             "ask an admin")


def grant(alloc: GpuAllocation) -> GpuGrant:
    """Everything the job gets for ``alloc``'s GPUs (host facts; the plan stays pure)."""
    root, dev = alloc.root, _under(alloc.root, "dev")
    devices: list[tuple[str, str]] = []
    for g in alloc.gpus:
        node = _node(root, g)
        if node is None:
            raise JobError(f"GPU {g.index}: device node {node} is gone")
        devices.append((str(node), g.node))
    ctl = _char_device(dev / "nvidiactl")
    if ctl is None:
        raise JobError(f"GPU driver: {dev / 'nvidiactl'} is missing (is the driver loaded?)")
    if os.geteuid() != 0:  # a user's job opens them as that user: say so now, not as EACCES
        for src, _ in devices + [(str(ctl), "nvidiactl")]:
            _check_usable(src)
    devices += [(str(p), n) for n in CONTROL_NODES if (p := _char_device(dev / n)) is not None]
    rules = []
    for src, _ in devices:
        rdev = os.stat(src).st_rdev
        rules.append(f"c {os.major(rdev)}:{os.minor(rdev)} rw")
    files: dict[str, str] = {}
    links: dict[str, str] = {}
    lib_dir, bin_dir = f"{JOB_DRIVER_DIR}/lib", f"{JOB_DRIVER_DIR}/bin"
    for name, real in driver_libraries(root):
        files.setdefault(f"{lib_dir}/{real.name}", str(real))
        if name != real.name and "/" not in name:
            links.setdefault(f"{lib_dir}/{name}", real.name)
    for b in BINARIES:
        if (p := find_binary(root, b)) is not None:
            files[f"{bin_dir}/{b}"] = str(p)
    if all(g.uuid for g in alloc.gpus):
        cuda = nvidia = ",".join(g.uuid for g in alloc.gpus)
    else:  # only its nodes exist in the job, so CUDA numbers them from 0
        cuda = ",".join(str(i) for i in range(len(alloc.gpus)))
        nvidia = ",".join(str(g.index) for g in alloc.gpus)
    env = (("CUDA_VISIBLE_DEVICES", cuda), ("NVIDIA_VISIBLE_DEVICES", nvidia),
           ("CUDA_DEVICE_ORDER", "PCI_BUS_ID"))
    return GpuGrant(devices=tuple(devices),
                    files=tuple((src, dst) for dst, src in sorted(files.items())),
                    links=tuple((text, dst) for dst, text in sorted(links.items())
                                if dst not in files),
                    env=env, lib_dir=lib_dir, bin_dir=bin_dir, device_rules=tuple(rules))
