"""A job request and the plan that carries it out: pure data, no system calls.

``build_plan(req, manifest, rootfs_entries, ids)`` turns a :class:`JobRequest` into a
:class:`Plan`: a tuple of small frozen steps in bubblewrap's fixed order ::

    NewSession, NoNewPrivs, JoinCgroup, Unshare, IdMap, NetReady,  (helper, host PID ns)
    ForkInit,                                          (-> PID 1 of the new PID namespace)
    RootTmpfs, Bind/BindRO/Overlay/Symlink/Mkdir/Tmpfs/Proc/DevNodes/CopyIn, LoopbackUp,
    EtcFiles (after the runtime's mounts), ProtectProc, RootReadonly, PivotRoot, Hostname,
    AwaitNet (--network isolated), ForkJob,            (-> the job's process)
    NewSession (its own, with its pty as controlling terminal when it has one),
    SetUser (drops the bounding set first), NewKeyring, DropCaps, Env, Chdir, Exec

Paths in steps: ``source`` is a host path, ``target`` a path inside the job. The plan goes
to the sandbox helper as ``marshal`` data (``Plan.to_wire``); the helper (``sandbox.py``)
interprets it with the standard library only. Everything here is pure and thread-safe, so
it is tested without root.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, dataclass_transform

from jbl.store.errors import UsageError
from jbl.store.manifest import Manifest

# "tty" is the device 5:0, "my controlling terminal", resolved per process at open: the job
# is in its own session, so it opens the job's own pty, or fails with ENXIO when it has none.
# It never names the caller's terminal (bubblewrap binds the same node).
DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")
# Top-level names of a runtime's rootfs that a job always gets fresh (never the runtime's).
JOB_OWNED = frozenset({"proc", "dev", "tmp"})
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"
# /proc files a uid-0 job could write without any capability; bound read-only (as runc does).
PROC_READONLY = ("sys", "sysrq-trigger", "irq", "bus")
# Bounds of one --upload/--upload-dir copy (checked by the CLI first, enforced while copying):
UPLOAD_MAX_BYTES = 1 << 30  # the work directory is a tmpfs: in memory
UPLOAD_MAX_ENTRIES = 100_000
UPLOAD_MAX_DEPTH = 64
VOLUMES_AT = "/volumes"  # a named volume NAME is mounted at /volumes/NAME


def new_job_id() -> str:
    """A short id that is also a valid hostname."""
    return "job-" + os.urandom(4).hex()  # what secrets.token_hex does, without hashlib's import


# ---- frozen records ----------------------------------------------------------------------
#
# The steps and most other records here are frozen records. For the type checker they are
# dataclasses; at run time ``record`` builds the same behaviour (positional/keyword __init__
# with defaults, frozen, __eq__/__hash__ by type and values, __repr__) from shared generic
# methods, because ``@dataclass`` compiles six methods per class with ``exec``: ~0.45 ms a
# class, ~17 ms for the 39 records, on the start-up path of every job (docs/runner.md,
# "Start-up"). JobRequest and Limits stay dataclasses: callers ``dataclasses.replace`` and
# ``asdict`` them.

_S = TypeVar("_S")


class _FrozenRecord:
    _fields: ClassVar[tuple[str, ...]] = ()
    __slots__ = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        names = type(self)._fields
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__}() takes {len(names)} arguments")
        for name, value in zip(names, args, strict=False):
            if name in kwargs:
                raise TypeError(f"{type(self).__name__}() got two values for {name!r}")
            kwargs[name] = value
        for name in names:
            if name in kwargs:
                object.__setattr__(self, name, kwargs.pop(name))
            elif not hasattr(type(self), name):  # a class attribute is the default
                raise TypeError(f"{type(self).__name__}() missing argument {name!r}")
        if kwargs:
            raise TypeError(f"{type(self).__name__}() got unexpected {sorted(kwargs)}")

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, n) for n in type(self)._fields)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._values()))

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}={getattr(self, n)!r}" for n in type(self)._fields)
        return f"{type(self).__name__}({inner})"

    def __setattr__(self, name: str, value: object) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")


@dataclass_transform(frozen_default=True)
def record(cls: type[_S]) -> type[_S]:
    """Turn an annotated ``_FrozenRecord`` subclass into a frozen record (see above); fields
    in definition order, the base classes' first, ``ClassVar`` annotations skipped."""
    names: list[str] = []
    for klass in reversed(cls.__mro__):
        for name, ann in vars(klass).get("__annotations__", {}).items():
            if not str(ann).startswith("ClassVar") and name not in names:
                names.append(name)
    cls._fields = tuple(names)  # type: ignore[attr-defined]
    return cls


@record
class Volume(_FrozenRecord):
    source: Path  # absolute host path (resolved)
    target: str  # clean absolute path in the job
    readonly: bool = False


@dataclass(frozen=True)
class Limits:
    """Resource limits; None means "not limited". Applied through cgroups by the supervisor."""

    memory: int | None = None  # bytes
    cpu_percent: float | None = None  # 100 = one core
    cpu_cores: str | None = None  # cpuset list, e.g. "0-1,3"
    pids: int | None = None
    iobps: int | None = None  # bytes/s, read and write, on each of io_devices
    io_devices: tuple[str, ...] = ()  # "MAJ:MIN" of the whole disks the job's volumes live on

    def requested(self) -> list[str]:
        names = {"memory": self.memory, "cpu": self.cpu_percent,
                 "cpu-cores": self.cpu_cores, "pids": self.pids,
                 "iobps": self.iobps if self.io_devices else None}
        return [k for k, v in names.items() if v is not None]


@dataclass(frozen=True)
class JobRequest:
    runtime_dir: Path  # the version directory: runtime.yml + isolated/
    argv: tuple[str, ...]
    job_id: str = field(default_factory=new_job_id)
    env: tuple[tuple[str, str], ...] = ()  # --env, on top of runtime.yml's environment
    # --secret-env, last: in the job's environment only, never in a repr, record or message
    secret_env: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    workdir: str = "/work"
    network: Literal["none", "isolated", "host"] = "none"
    # isolated only, test-only (JBL_SLIRP_HOST_LOOPBACK=1): the job may reach the host's
    # loopback through slirp's 10.0.2.2; off by default (runner/network.py)
    slirp_host_loopback: bool = False
    # JBL_CGROUP_PARENT (Settings.cgroup_parent): the cgroup v2 parent of the job's cgroup;
    # None = runner/cgroups.py's default
    cgroup_parent: str | None = None
    uploads: tuple[Path, ...] = ()
    upload_dirs: tuple[Path, ...] = ()  # --upload-dir: each one's contents into the workdir
    volumes: tuple[Volume, ...] = ()
    limits: Limits = Limits()
    timeout: float | None = None  # seconds
    kill_after: float = 5.0  # grace between SIGTERM and SIGKILL of the cgroup
    user: str | None = None  # root only: run the job as this user
    require_limits: bool = False  # unenforceable limits are an error instead of a note
    runtime_label: str = ""  # "name@version" for messages and --json
    # auto: a fresh pty when the caller's stdin and stdout are both terminals; tty: always;
    # pipes: never (runner/stdio.py). Either way the job never gets the caller's terminal.
    terminal: Literal["auto", "tty", "pipes"] = "auto"
    gpus: int = 0  # --gpu: whole GPUs to allocate (runner/gpu.py)
    gpu_memory: int | None = None  # --gpu-memory: bytes each of them must have at least
    gpu_driver_root: str = "/"  # test-only: a fake driver tree (JBL_GPU_DRIVER_ROOT)


@record
class Ids(_FrozenRecord):
    """Who runs the helper and who the job is: decided by the caller from the host."""

    euid: int
    egid: int
    userns: bool  # non-root: map euid/egid to themselves in a user namespace
    job_uid: int | None = None  # root --user: drop to this uid/gid/groups before exec
    job_gid: int | None = None
    job_groups: tuple[int, ...] = ()


@record
class JobEtc(_FrozenRecord):
    """What jbl writes into the job's /etc (runner/identity.py, runner/network.py) and what
    the runtime's /etc is, as the supervisor found it: ``runtime_etc`` is "dir", "absent"
    or "other" (a symlink or anything else: nothing is placed, docs/runner.md);
    ``regular`` names the files the runtime's /etc holds as regular files."""

    files: tuple[tuple[str, bytes], ...] = ()
    runtime_etc: Literal["dir", "absent", "other"] = "dir"
    regular: frozenset[str] = frozenset()

    def step(self) -> EtcFiles | None:
        """The cheapest placement: a bind per file when each replaces a runtime file, one
        read-only overlay when a file is new to the runtime's /etc (a read-only directory
        has no mount point for it), the files as /etc when the runtime has none."""
        if not self.files or self.runtime_etc == "other":
            return None
        if self.runtime_etc == "absent":
            return EtcFiles(self.files, "dir")
        if all(name in self.regular for name, _ in self.files):
            return EtcFiles(self.files, "files")
        return EtcFiles(self.files, "overlay")


@record
class RootfsEntry(_FrozenRecord):
    """A top-level entry of a rootfs mounted at ``/``: kind is 'dir', 'file' or 'symlink'."""

    name: str
    kind: Literal["dir", "file", "symlink"]
    link: str = ""


@record
class GpuGrant(_FrozenRecord):
    """What a job with GPUs gets, as runner/gpu.py found it on the host: ``devices`` (host
    node, name under /dev), ``files`` (host file, job path) bound read-only, ``links`` (link
    text, job path), ``env`` (CUDA_VISIBLE_DEVICES, …), the driver's ``lib_dir``/``bin_dir``
    in the job (put first on LD_LIBRARY_PATH, last on PATH) and ``device_rules``: the
    cgroup v1 ``devices.allow`` lines of its nodes (cgroups.py adds the standard ones)."""

    devices: tuple[tuple[str, str], ...] = ()
    files: tuple[tuple[str, str], ...] = ()
    links: tuple[tuple[str, str], ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    lib_dir: str = ""
    bin_dir: str = ""
    device_rules: tuple[str, ...] = ()


# ---- steps -------------------------------------------------------------------------------

@record
class Step(_FrozenRecord):
    op: ClassVar[str] = ""

    def to_wire(self) -> dict[str, Any]:
        d: dict[str, Any] = {"op": self.op}
        for name in self._fields:
            v = getattr(self, name)
            d[name] = list(v) if isinstance(v, tuple) else v
        return d


@record
class NewSession(Step):
    """setsid(): out of the caller's session and process group (no signal, no TIOCSTI back
    into them); with ``ctty`` the job's fd 0, a fresh pty, becomes its controlling tty."""
    op = "new_session"
    ctty: bool = False


@record
class NoNewPrivs(Step):
    op = "no_new_privs"


@record
class JoinCgroup(Step):
    op = "join_cgroup"
    procs_files: tuple[str, ...] = ()


@record
class Unshare(Step):
    op = "unshare"
    user: bool = False
    net: bool = True
    mount: bool = True  # False only for a helper made ahead (runner/warm.py, UnshareLate)


@record
class UnshareLate(Step):
    """The namespaces a helper made ahead of the request (runner/warm.py) leaves to init,
    made with the request: the mount namespace (a copy of the host's mounts as they are
    then, views and volumes mounted since included) and a user's network namespace."""
    op = "unshare_late"
    mount: bool = True
    net: bool = False


@record
class IdMap(Step):
    op = "id_map"
    uid: int = 0  # mapped to itself
    gid: int = 0


@record
class ForkInit(Step):
    op = "fork_init"


@record
class RootTmpfs(Step):
    op = "root_tmpfs"


@record
class BindRO(Step):
    op = "bind_ro"
    source: str = ""
    target: str = ""


@record
class Bind(Step):
    op = "bind"
    source: str = ""
    target: str = ""


@record
class Overlay(Step):
    """runtime.yml's ``readonly: false``: the runtime directory ``source`` (the FUSE view) as
    the lower layer of an overlayfs at ``target`` whose upper and work directories are in
    the job's private staging tmpfs: the job writes, nothing reaches the store or another
    job, and it all goes with the job's mount namespace. ``uid``/``gid`` >= 0 (root --user):
    the layer's top belongs to the job's user. A source that is not a directory is bound
    read-only instead (overlayfs layers are directories)."""
    op = "overlay"
    source: str = ""
    target: str = ""
    uid: int = -1
    gid: int = -1


@record
class Tmpfs(Step):
    op = "tmpfs"
    target: str = ""
    mode: int = 0o755
    uid: int = -1  # chown the new tmpfs root (root --user); -1 leaves it
    gid: int = -1


@record
class Proc(Step):
    op = "proc"
    target: str = "/proc"


@record
class DevNodes(Step):
    op = "dev"
    target: str = "/dev"
    nodes: tuple[str, ...] = DEV_NODES


@record
class BindDev(Step):
    """Bind one host device node (a GPU's) into the job's /dev, usable (no ``nodev``)."""
    op = "bind_dev"
    source: str = ""
    target: str = ""


@record
class Symlink(Step):
    op = "symlink"
    link: str = ""  # what the link points to
    target: str = ""  # where the link is created


@record
class Mkdir(Step):
    op = "mkdir"
    target: str = ""
    mode: int = 0o755


@record
class CopyIn(Step):
    """Copy host path ``source`` to ``target`` (``contents``: a directory's entries into the
    existing ``target``), never following a link, within the UPLOAD_MAX_* bounds. With
    ``uid`` >= 0 (root --user) it reads and writes as that user (fsuid, groups)."""
    op = "copy_in"
    source: str = ""
    target: str = ""
    uid: int = -1
    gid: int = -1
    groups: tuple[int, ...] = ()
    contents: bool = False
    max_bytes: int = UPLOAD_MAX_BYTES
    max_entries: int = UPLOAD_MAX_ENTRIES
    max_depth: int = UPLOAD_MAX_DEPTH


@record
class LoopbackUp(Step):
    op = "loopback_up"


@record
class NetReady(Step):
    """The helper tells the supervisor (one byte on ``fd``) that the job's network
    namespace exists and its ids are mapped, so slirp4netns can join it (runner/network.py)."""
    op = "net_ready"
    fd: int = -1


@record
class AwaitNet(Step):
    """Init waits (one byte on ``fd``) until slirp4netns has configured the job's network,
    so the job never starts without it; EOF means the supervisor gave up."""
    op = "await_net"
    fd: int = -1


@record
class EtcFiles(Step):
    """Files jbl wrote for the job's /etc (name -> content), placed read-only without
    touching the runtime: ``how`` is "files" (each bound over the runtime's own regular
    file), "overlay" (a read-only overlay of the runtime's /etc, these files on top) or
    "dir" (the runtime has no /etc: these files are the job's /etc)."""
    op = "etc_files"
    files: tuple[tuple[str, bytes], ...] = ()
    how: str = "files"


@record
class ProtectProc(Step):
    op = "protect_proc"
    paths: tuple[str, ...] = PROC_READONLY


@record
class RootReadonly(Step):
    op = "root_readonly"


@record
class PivotRoot(Step):
    op = "pivot_root"


@record
class Hostname(Step):
    op = "hostname"
    name: str = ""


@record
class ForkJob(Step):
    op = "fork_job"


@record
class SetUser(Step):
    op = "set_user"
    uid: int = 0
    gid: int = 0
    groups: tuple[int, ...] = ()


@record
class NewKeyring(Step):
    """A new, empty session keyring: the caller's (Kerberos caches, tokens) stays out of reach."""
    op = "new_keyring"


@record
class DropCaps(Step):
    op = "drop_caps"


@record
class Env(Step):
    op = "env"
    vars: tuple[tuple[str, str], ...] = ()

    def to_wire(self) -> dict[str, Any]:
        return {"op": self.op, "vars": [list(kv) for kv in self.vars]}

    def __repr__(self) -> str:  # values may be --secret-env's: names only
        return f"Env(vars=<{', '.join(k for k, _ in self.vars)}>)"


@record
class Chdir(Step):
    op = "chdir"
    target: str = "/"


@record
class Exec(Step):
    op = "exec"
    argv: tuple[str, ...] = ()


@record
class Plan(_FrozenRecord):
    steps: tuple[Step, ...]
    limits: Limits
    job_id: str
    devices: tuple[str, ...] | None = None  # cgroup devices allow-list (GPU jobs); None: all

    def to_wire(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "steps": [s.to_wire() for s in self.steps]}

    def with_cgroup(self, procs_files: Sequence[str]) -> Plan:
        """Fill in the JoinCgroup step once the supervisor has created the cgroup."""
        steps = tuple(JoinCgroup(tuple(procs_files)) if isinstance(s, JoinCgroup) else s
                      for s in self.steps)
        return Plan(steps, self.limits, self.job_id, self.devices)

    def with_net_fd(self, fd: int) -> Plan:
        """Fill in the descriptor NetReady and AwaitNet use (runner/network.py)."""
        steps = tuple(type(s)(fd) if isinstance(s, NetReady | AwaitNet) else s
                      for s in self.steps)
        return Plan(steps, self.limits, self.job_id, self.devices)

    def find(self, kind: type[Step]) -> list[Step]:
        return [s for s in self.steps if isinstance(s, kind)]


# ---- the planner -------------------------------------------------------------------------

def clean_job_path(path: str, what: str) -> str:
    """An absolute, normalised path inside the job; '..' and relative paths are refused."""
    if not path.startswith("/") or "\0" in path:
        raise UsageError(f"invalid {what} {path!r}: must be an absolute path inside the job")
    if any(p == ".." for p in path.split("/")):
        raise UsageError(f"invalid {what} {path!r}: '..' is not allowed")
    return posixpath.normpath(path).replace("//", "/")


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def build_plan(req: JobRequest, manifest: Manifest,
               rootfs_entries: Mapping[str, Sequence[RootfsEntry]], ids: Ids,
               host_env: Mapping[str, str] | None = None, ctty: bool = False,
               skip_sources: Collection[str] = (), etc: JobEtc | None = None,
               gpu: GpuGrant | None = None) -> Plan:
    """The whole setup of one job. ``rootfs_entries`` maps each manifest mount source whose
    target is ``/`` to its top-level entries (the caller lists the directory). ``ctty``: the
    job's fd 0 is a pty made for it (runner/stdio.py), to become its controlling terminal.
    ``skip_sources``: manifest mount sources the runtime lacks; they are left out, as Joblet
    does (ingest noted them, ``info`` shows them). ``etc``: the files jbl writes for the
    job's /etc (names, resolvers), placed after the runtime's mounts so a ``--volume`` can
    still cover one.

    Mount points anywhere: a ``--workdir``/``--volume`` target inside a runtime directory
    that lacks it (``/opt/x``) is created by the helper in a private overlay layer over the
    nearest existing directory, remounted read-only before the job starts (sandbox.py,
    ``make_target``); only a target that *is* a top-level name replaces the runtime's.
    ``gpu``: the job's GPU devices, driver files and environment (runner/gpu.py)."""
    if not req.argv:
        raise UsageError("no command given: jbl run --runtime NAME -- CMD [ARGS...]")
    workdir = clean_job_path(req.workdir, "--workdir")
    if workdir == "/" or any(_under(workdir, "/" + n) for n in JOB_OWNED):
        raise UsageError(f"invalid --workdir {workdir!r}: must not be /, /proc, /dev or /tmp")
    rt = Path(req.runtime_dir)
    steps: list[Step] = [NewSession(), NoNewPrivs(), JoinCgroup(),
                         Unshare(user=ids.userns, net=req.network != "host")]
    if ids.userns:
        steps.append(IdMap(ids.euid, ids.egid))
    if req.network == "isolated":  # after the id map: slirp4netns joins the user namespace
        steps.append(NetReady())
    steps += [ForkInit(), RootTmpfs()]

    volume_targets = {clean_job_path(v.target, "--volume target") for v in req.volumes}
    own_tops = {"/" + n for n in JOB_OWNED} | {
        t for t in volume_targets | {workdir} if t.count("/") == 1}
    if gpu is not None:  # the driver's files get a top-level directory of their own
        own_tops |= {"/" + p.split("/")[1] for _, p in gpu.files}
    layer_owner = (-1, -1) if ids.job_uid is None else (
        ids.job_uid, ids.job_gid if ids.job_gid is not None else ids.job_uid)
    for m in manifest.default_mounts():
        if m.source in skip_sources:
            continue
        src = str(rt / m.source)
        if m.target == "/":
            for e in rootfs_entries.get(m.source, ()):
                target = "/" + e.name
                if e.name in JOB_OWNED or (target in own_tops and e.kind != "symlink"):
                    continue
                if e.kind == "symlink":
                    steps.append(Symlink(e.link, target))
                elif m.readonly or e.kind != "dir":
                    steps.append(BindRO(f"{src}/{e.name}", target))
                else:
                    steps.append(Overlay(f"{src}/{e.name}", target, *layer_owner))
        elif not any(_under(m.target, "/" + n) for n in JOB_OWNED):
            steps.append(BindRO(src, m.target) if m.readonly else
                         Overlay(src, m.target, *layer_owner))

    etc_step = etc.step() if etc is not None else None
    if etc_step is not None:
        steps.append(etc_step)
    steps += [Proc(), DevNodes(), Tmpfs("/tmp", 0o1777)]
    if workdir not in volume_targets:
        steps.append(Tmpfs(workdir, 0o755, -1 if ids.job_uid is None else ids.job_uid,
                           -1 if ids.job_gid is None else ids.job_gid))
    for v in sorted(req.volumes, key=lambda v: v.target.count("/")):
        target = clean_job_path(v.target, "--volume target")
        if target == "/" or any(_under(target, "/" + n) for n in ("proc", "dev")):
            raise UsageError(f"invalid --volume target {target!r}")
        steps.append((BindRO if v.readonly else Bind)(str(v.source), target))
    who: tuple[int, int, tuple[int, ...]] = (-1, -1, ()) if ids.job_uid is None else (
        ids.job_uid, ids.job_gid if ids.job_gid is not None else ids.job_uid, ids.job_groups)
    for up in req.uploads:
        steps.append(CopyIn(str(up), posixpath.join(workdir, Path(up).name), *who))
    for updir in req.upload_dirs:
        steps.append(CopyIn(str(updir), workdir, *who, contents=True))
    if gpu is not None:
        steps += [BindDev(src, f"/dev/{name}") for src, name in gpu.devices]
        steps += [BindRO(src, target) for src, target in gpu.files]
        steps += [Symlink(text, target) for text, target in gpu.links]
    if req.network != "host":
        steps.append(LoopbackUp())
    if not ids.userns:
        steps.append(ProtectProc())
    steps += [RootReadonly(), PivotRoot(), Hostname(req.job_id)]
    if req.network == "isolated":  # the job starts with its network configured
        steps.append(AwaitNet())
    steps += [ForkJob(), NewSession(ctty)]
    if ids.job_uid is not None:  # before DropCaps: setuid needs CAP_SETUID
        steps.append(SetUser(ids.job_uid, ids.job_gid if ids.job_gid is not None else ids.job_uid,
                             ids.job_groups))
    # after SetUser, so the new keyring belongs to the job's user
    steps += [NewKeyring(), DropCaps(), Env(job_env(req, manifest, workdir, host_env, gpu)),
              Chdir(workdir), Exec(tuple(req.argv))]
    return Plan(tuple(steps), req.limits, req.job_id,
                gpu.device_rules if gpu is not None else None)


def job_env(req: JobRequest, manifest: Manifest, workdir: str,
            host_env: Mapping[str, str] | None = None,
            gpu: GpuGrant | None = None) -> tuple[tuple[str, str], ...]:
    """A clean environment: defaults, then runtime.yml's ``environment``, then the GPU
    variables (the driver's libraries first on LD_LIBRARY_PATH, its bin last on PATH), then
    ``--env``, then ``--secret-env``."""
    env: dict[str, str] = {"PATH": DEFAULT_PATH, "HOME": workdir, "HOSTNAME": req.job_id,
                           "JBL_JOB_ID": req.job_id}
    if host_env and host_env.get("TERM"):
        env["TERM"] = host_env["TERM"]
    env.update(manifest.environment)
    if gpu is not None:
        env.update(dict(gpu.env))
        if gpu.lib_dir:
            old = env.get("LD_LIBRARY_PATH")
            env["LD_LIBRARY_PATH"] = gpu.lib_dir + (":" + old if old else "")
        if gpu.bin_dir:
            env["PATH"] = env.get("PATH", DEFAULT_PATH) + ":" + gpu.bin_dir
    env.update(dict(req.env))
    env.update(dict(req.secret_env))
    return tuple(env.items())
