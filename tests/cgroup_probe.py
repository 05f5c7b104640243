"""What the host says about a job's cgroups, read without jbl's own helpers.

The job itself sees only ``/`` in ``/proc/self/cgroup`` (it runs in a cgroup namespace), so
the tests find the job's processes from the host — the descendants of the ``jbl run``
process — and read *their* ``/proc/PID/cgroup``. That is the positive control the
cgroup-removal tests need: the directories exist (and hold the job) while it runs, and are
gone after. ``limits_enforceable_for`` decides from the host alone (cgroup version, write
access of the user) whether ``jbl run`` as that user can enforce limits.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")


def descendants(pid: int) -> list[int]:
    """Every living descendant of ``pid`` (children of every thread, recursively)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = list(Path(f"/proc/{p}/task").iterdir())
        except OSError:
            continue
        for t in tasks:
            try:
                kids = [int(x) for x in (t / "children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def cgroup_dirs_of(pid: int) -> set[Path]:
    """The host directories of ``pid``'s cgroups that lie under a ``jbl`` parent."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return set()
    out = set()
    for line in text.splitlines():
        _, ctrls, path = line.split(":", 2)
        if "/jbl/" not in path + "/":
            continue
        base = ROOT if not ctrls else ROOT / ctrls  # v2 unified, or the v1 controller mount
        out.add(base / path.lstrip("/"))
    return out


def job_cgroup_dirs(jbl_pid: int) -> set[Path]:
    """The job cgroup directories of every process ``jbl run`` (``jbl_pid``) started."""
    out: set[Path] = set()
    for p in descendants(jbl_pid):
        out |= cgroup_dirs_of(p)
    return out


def is_v2() -> bool:
    return (ROOT / "cgroup.controllers").exists()


def limits_enforceable_for(user: str) -> bool:
    """Can ``jbl run`` started by ``user`` put a job in a cgroup with limits? Decided from
    the host: on cgroup v1 never (jbl uses v1 as root only: a v1 hierarchy has no safe
    delegation, and an ordinary user has no writable directory in it); on v2 the parent of
    the user's own cgroup must be writable by the user (cgroup.procs, cgroup.subtree_control
    and the directory), as systemd delegates."""
    if not is_v2():
        return False  # v1: root's hierarchy; jbl never creates v1 cgroups for a user
    mine = subprocess.run(["runuser", "-u", user, "--", "cat", "/proc/self/cgroup"],
                          capture_output=True, text=True, check=True).stdout
    path = next(ln.split(":", 2)[2] for ln in mine.splitlines() if ln.startswith("0::"))
    parent = (ROOT / path.lstrip("/")).parent
    checks = [parent, parent / "cgroup.procs", parent / "cgroup.subtree_control"]
    return all(subprocess.run(["runuser", "-u", user, "--", "test", "-w", str(p)]).returncode
               == 0 for p in checks)


def pids_running(*argv: str) -> list[int]:
    """Host processes whose argv is exactly ``argv`` (not a shell or a ``jbl run`` whose
    command line merely mentions it)."""
    want = b"\0".join(a.encode() for a in argv) + b"\0"
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "cmdline").read_bytes() == want:
                    out.append(int(d.name))
            except OSError:
                continue
    return out
