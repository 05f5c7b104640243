"""One job's cgroup, on cgroup v2 or v1: create, limit, measure, kill, remove.

``JobCgroup.create(job_id, limits)`` finds where this process may create cgroups and makes
one for the job (v2: one directory; v1: one per controller: memory, cpu, cpuset, pids,
freezer, and blkio for ``--max-iobps``). The sandbox helper joins it by writing its pid to
``procs_files`` before it forks anything, so the whole job tree is inside. Limits that
cannot be enforced (no delegation for a non-root user, a controller missing) are returned in
``unenforced``; the caller decides whether that is a note or an error.

Where the job cgroup lives:
- v2, root: ``/sys/fs/cgroup/jbl/<job>`` (a top-level parent, because the caller's own cgroup
  usually holds processes and so cannot enable controllers for children).
- v2, not root: next to the caller's own cgroup, when its parent is delegated to the user
  (writable ``cgroup.procs`` and ``cgroup.subtree_control``, as under ``systemd-run --user
  --scope``); otherwise no cgroup at all.
- v1 (root only): ``<controller>/<own cgroup>/jbl/<job>`` for each controller.
``JBL_CGROUP_PARENT`` (``parent``, passed down from the CLI's settings) overrides the v2
parent. Job cgroups left over by a killed ``jbl`` are removed by the next job (empty ones
older than a minute). Not thread-safe; one per job.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .plan import DEV_NODES, Limits

ROOT = Path("/sys/fs/cgroup")
CPU_PERIOD_US = 100_000
STALE_AFTER = 60.0
EXTRA_PIDS = 2  # the helper and init (PID 1) are in the job's cgroup too


def _read(p: Path) -> str:
    return p.read_text().strip()


def _write(p: Path, value: str) -> None:
    with open(p, "w") as fh:
        fh.write(value)


def own_cgroups() -> dict[str, str]:
    """controller (or '' for v2) -> this process's cgroup path, from /proc/self/cgroup."""
    out: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        for c in ctrls.split(",") if ctrls else [""]:
            out[c] = path
    return out


def v2_root() -> Path | None:
    """The unified hierarchy when it carries the controllers jbl uses (a pure v2 host)."""
    if (ROOT / "cgroup.controllers").exists():
        return ROOT
    return None


def _sweep_stale(parent: Path) -> None:
    try:
        children = list(parent.iterdir())
    except OSError:
        return
    now = time.time()
    for d in children:
        try:
            if d.is_dir() and d.name.startswith("job-") and now - d.stat().st_mtime > STALE_AFTER:
                d.rmdir()  # EBUSY while anything is inside: then it is not stale
        except OSError:
            pass


@dataclass
class JobCgroup:
    version: int  # 2 or 1; 0 = no cgroup (nothing enforceable)
    dirs: dict[str, Path] = field(default_factory=dict)  # controller ('' on v2) -> directory
    unenforced: list[str] = field(default_factory=list)
    why: str = ""  # why limits are unenforced
    enabled: set[str] = field(default_factory=set)  # v2: the parent's subtree_control

    @property
    def procs_files(self) -> list[str]:
        return [str(d / "cgroup.procs") for d in self.dirs.values()]

    @classmethod
    def create(cls, job_id: str, limits: Limits, devices: Sequence[str] | None = None,
               parent: str | None = None) -> JobCgroup:
        """``devices``: a GPU job's allow-list (``c 195:0 rw`` lines) on top of the standard
        nodes, everything else denied; v1 only (on v2 the job's /dev simply lacks the other
        nodes: a BPF device program is not attempted)."""
        root = v2_root()
        if root is not None:
            return cls._create_v2(root, job_id, limits, parent)
        if os.geteuid() != 0:
            return cls(0, unenforced=limits.requested(),
                       why="cgroup v1 is not delegated to users")
        return cls._create_v1(job_id, limits, devices)

    # ---- v2 ----
    @classmethod
    def _create_v2(cls, root: Path, job_id: str, limits: Limits,
                   override: str | None) -> JobCgroup:
        if override:
            parent = root / override.lstrip("/")
        elif os.geteuid() == 0:
            parent = root / "jbl"
        else:
            own = root / own_cgroups().get("", "/").lstrip("/")
            parent = own.parent
            if not (os.access(parent / "cgroup.procs", os.W_OK)
                    and os.access(parent / "cgroup.subtree_control", os.W_OK)
                    and os.access(parent, os.W_OK)):
                return cls(0, unenforced=limits.requested(),
                           why=f"no delegated cgroup v2 subtree at {parent}")
        want = {"memory", "pids", "cpu"} | ({"cpuset"} if limits.cpu_cores else set())
        want |= {"io"} if _throttles(limits) else set()
        try:
            parent.mkdir(exist_ok=True)
            _sweep_stale(parent)
            enabled = _enable_v2(parent, want)
            d = parent / job_id
            d.mkdir()
        except OSError as e:
            if os.geteuid() != 0:
                return cls(0, unenforced=limits.requested(), why=f"{parent}: {e.strerror}")
            raise
        cg = cls(2, {"": d}, enabled=enabled)
        try:
            cg.limit(limits)
        except OSError:
            cg.remove()
            raise
        return cg

    def limit(self, limits: Limits, devices: Sequence[str] | None = None) -> None:
        """Write ``limits`` (and a GPU job's ``devices``, v1) into this job's cgroup, made
        by ``create`` (with these limits, or with none ahead of its job: runner/warm.py, whose
        ``fits`` says when that may be done); ``unenforced`` says what could not be."""
        if self.version == 2:
            self._limit_v2(limits)
        elif self.version == 1:
            self._limit_v1(limits, devices)
        else:
            self.unenforced = limits.requested()

    def fits(self, limits: Limits, devices: Sequence[str] | None, parent: str | None) -> bool:
        """Does this cgroup, made with no limits and the default parent, have every
        controller that ``create(…, limits, devices, parent)`` would have made?"""
        if parent or devices is not None:
            return False
        return self.version == 0 or (not limits.cpu_cores and not _throttles(limits))

    def _limit_v2(self, limits: Limits) -> None:
        d, enabled = self.dirs[""], self.enabled
        missing = {"memory": "memory", "cpu": "cpu", "cpu-cores": "cpuset", "pids": "pids",
                   "iobps": "io"}
        self.unenforced = [k for k in limits.requested() if missing[k] not in enabled]
        if self.unenforced:
            self.why = f"controllers not available in {d.parent}"
        if limits.memory is not None and "memory" in enabled:
            _write(d / "memory.max", str(limits.memory))
            if (d / "memory.swap.max").exists():
                _write(d / "memory.swap.max", "0")
            _write_if_exists(d / "memory.oom.group", "1")
        if limits.cpu_percent is not None and "cpu" in enabled:
            quota = max(1000, int(limits.cpu_percent * CPU_PERIOD_US / 100))
            _write(d / "cpu.max", f"{quota} {CPU_PERIOD_US}")
        if limits.cpu_cores is not None and "cpuset" in enabled:
            _write(d / "cpuset.cpus", limits.cpu_cores)
        if limits.pids is not None and "pids" in enabled:
            _write(d / "pids.max", str(limits.pids + EXTRA_PIDS))
        if _throttles(limits) and "io" in enabled:
            for dev in limits.io_devices:  # one line per device, both directions
                _write(d / "io.max", f"{dev} rbps={limits.iobps} wbps={limits.iobps}")

    # ---- v1 ----
    @classmethod
    def _create_v1(cls, job_id: str, limits: Limits,
                   devices: Sequence[str] | None = None) -> JobCgroup:
        own = own_cgroups()
        cg = cls(1)
        want = ["memory", "pids", "freezer", "cpu"] + (["cpuset"] if limits.cpu_cores else [])
        # CPU time (cpu_time): cpuacct, unless it is mounted together with cpu (one hierarchy)
        want += ["cpuacct"] if (ROOT / "cpuacct").resolve() != (ROOT / "cpu").resolve() else []
        want += ["devices"] if devices is not None else []
        want += ["blkio"] if _throttles(limits) else []
        try:
            for ctrl in want:
                mnt = ROOT / ctrl
                if not (mnt / "cgroup.procs").exists():
                    continue
                parent = mnt / own.get(ctrl, "/").lstrip("/") / "jbl"
                parent.mkdir(exist_ok=True)
                _sweep_stale(parent)
                if ctrl == "cpuset":  # an empty cpuset.mems/cpus refuses tasks
                    for f in ("cpuset.cpus", "cpuset.mems"):
                        if not _read(parent / f):
                            _write(parent / f, _read(parent.parent / f))
                d = parent / job_id
                d.mkdir()
                cg.dirs[ctrl] = d
            cg.limit(limits, devices)
        except OSError:
            cg.remove()
            raise
        return cg

    def _limit_v1(self, limits: Limits, devices: Sequence[str] | None) -> None:
        dirs = self.dirs
        if limits.memory is not None and "memory" in dirs:
            _write(dirs["memory"] / "memory.limit_in_bytes", str(limits.memory))
            _write_if_exists(dirs["memory"] / "memory.memsw.limit_in_bytes",
                             str(limits.memory))
        if limits.cpu_percent is not None and "cpu" in dirs:
            quota = max(1000, int(limits.cpu_percent * CPU_PERIOD_US / 100))
            _write(dirs["cpu"] / "cpu.cfs_period_us", str(CPU_PERIOD_US))
            _write(dirs["cpu"] / "cpu.cfs_quota_us", str(quota))
        if "cpuset" in dirs:
            _write(dirs["cpuset"] / "cpuset.mems", _read(dirs["cpuset"].parent /
                                                         "cpuset.mems"))
            _write(dirs["cpuset"] / "cpuset.cpus", limits.cpu_cores or "")
        if limits.pids is not None and "pids" in dirs:
            _write(dirs["pids"] / "pids.max", str(limits.pids + EXTRA_PIDS))
        if _throttles(limits) and "blkio" in dirs:
            for dev in limits.io_devices:  # each write adds (or replaces) one device's rule
                for f in ("blkio.throttle.read_bps_device", "blkio.throttle.write_bps_device"):
                    _write(dirs["blkio"] / f, f"{dev} {limits.iobps}")
        if devices is not None and "devices" in dirs:
            _write(dirs["devices"] / "devices.deny", "a")  # then one rule per write
            for rule in (*standard_device_rules(), *devices):
                _write(dirs["devices"] / "devices.allow", rule)
        need = {"memory": "memory", "cpu": "cpu", "cpu-cores": "cpuset", "pids": "pids",
                "iobps": "blkio"}
        self.unenforced = [k for k in limits.requested() if need[k] not in dirs]
        if devices is not None and "devices" not in dirs:
            self.unenforced.append("devices")
        if self.unenforced:
            self.why = "cgroup v1 controllers not mounted"

    # ---- measuring ----
    def peak_memory(self) -> int | None:
        try:
            if self.version == 2:
                return int(_read(self.dirs[""] / "memory.peak"))
            if self.version == 1 and "memory" in self.dirs:
                return int(_read(self.dirs["memory"] / "memory.max_usage_in_bytes"))
        except (OSError, ValueError):
            pass
        return None

    def cpu_time(self) -> float | None:
        """CPU seconds (user + system) of everything that ran in the cgroup: v2
        ``cpu.stat`` ``usage_usec`` (there without the cpu controller), v1
        ``cpuacct.usage`` (ns); None without either."""
        try:
            if self.version == 2:
                for line in _read(self.dirs[""] / "cpu.stat").splitlines():
                    k, _, v = line.partition(" ")
                    if k == "usage_usec":
                        return int(v) / 1e6
            for ctrl in ("cpuacct", "cpu"):  # cpu: when cpuacct is mounted with it
                if ctrl in self.dirs and (self.dirs[ctrl] / "cpuacct.usage").exists():
                    return int(_read(self.dirs[ctrl] / "cpuacct.usage")) / 1e9
        except (OSError, ValueError):
            pass
        return None

    def oom_kills(self) -> int:
        try:
            if self.version == 2:
                text = _read(self.dirs[""] / "memory.events")
            elif self.version == 1 and "memory" in self.dirs:
                text = _read(self.dirs["memory"] / "memory.oom_control")
            else:
                return 0
        except OSError:
            return 0
        for line in text.splitlines():
            k, _, v = line.partition(" ")
            if k == "oom_kill":
                return int(v)
        return 0

    def pids(self) -> list[int]:
        d = self.dirs.get("") or self.dirs.get("pids") or self.dirs.get("freezer") or next(
            iter(self.dirs.values()), None)
        if d is None:
            return []
        try:
            return [int(x) for x in _read(d / "cgroup.procs").split()]
        except OSError:
            return []

    # ---- ending ----
    def kill(self) -> None:
        """SIGKILL every process in the cgroup (cgroup.kill on v2, freeze + kill on v1)."""
        if self.version == 2:
            try:
                _write(self.dirs[""] / "cgroup.kill", "1")
                return
            except OSError:
                pass  # kernel < 5.14: fall through to the loop
        freezer = self.dirs.get("freezer")
        if freezer is not None:
            try:
                _write(freezer / "freezer.state", "FROZEN")
            except OSError:
                freezer = None
        for _ in range(50):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
            if freezer is not None:
                _write(freezer / "freezer.state", "THAWED")  # frozen tasks die only thawed
            time.sleep(0.002)

    def remove(self) -> None:
        """Kill what is left and remove the directories (retrying while tasks exit)."""
        if not self.dirs:
            return
        if self.pids():
            self.kill()
        deadline = time.monotonic() + 2.0
        for d in list(self.dirs.values()):
            while True:
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY or time.monotonic() > deadline:
                        break
                    time.sleep(0.005)
        self.dirs.clear()


def standard_device_rules() -> list[str]:
    """Allow rules for the nodes every job's /dev has (plan.DEV_NODES, numbers from the
    host's own nodes), its pty master and the pty slaves of its devpts."""
    rules = []
    for name in DEV_NODES:
        with contextlib.suppress(OSError):
            rdev = os.stat(f"/dev/{name}").st_rdev
            rules.append(f"c {os.major(rdev)}:{os.minor(rdev)} rw")
    rules.append("c 5:2 rw")  # /dev/pts/ptmx
    rules += [f"c {major}:* rw" for major in range(136, 144)]  # Unix98 pty slaves
    return rules


def _throttles(limits: Limits) -> bool:
    return limits.iobps is not None and bool(limits.io_devices)


def _write_if_exists(p: Path, value: str) -> None:
    if p.exists():
        _write(p, value)


def _enable_v2(parent: Path, want: set[str]) -> set[str]:
    """Enable ``want`` for ``parent``'s children (and on the way from the root); return the set
    that is enabled in the end."""
    chain = [parent]
    while chain[-1] != ROOT and chain[-1].parent != chain[-1]:
        chain.append(chain[-1].parent)
    for d in reversed(chain):
        available = set(_read(d / "cgroup.controllers").split())
        enabled = set(_read(d / "cgroup.subtree_control").split())
        todo = (want & available) - enabled
        if todo:
            try:
                _write(d / "cgroup.subtree_control", " ".join("+" + c for c in sorted(todo)))
            except OSError:
                for c in todo:  # one by one: a busy or threaded one must not stop the rest
                    with contextlib.suppress(OSError):
                        _write(d / "cgroup.subtree_control", "+" + c)
    return set(_read(parent / "cgroup.subtree_control").split())
