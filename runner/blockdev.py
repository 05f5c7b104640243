"""Which block device a host path's filesystem lives on, for ``--max-iobps``.

``disk_of(path)`` returns the ``MAJ:MIN`` the kernel's block throttle accepts for the
filesystem holding ``path``, or None when that filesystem has no block device (tmpfs, proc,
overlay, FUSE, NFS: nothing to throttle). The kernel throttles whole disks only: cgroup v1
``blkio.throttle.*_device`` and v2 ``io.max`` refuse a partition (ENODEV), so a partition
(``8:1``) is mapped to its disk (``8:0``) through sysfs; a device-mapper or loop device is a
disk of its own and is throttled as itself. Filesystems whose ``st_dev`` is an anonymous
device (btrfs subvolumes) are found through the mount table's source device.

Reads only sysfs, ``/proc/self/mountinfo`` and ``stat``; thread-safe.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

SYS_BLOCK = Path("/sys/dev/block")


def _whole_disk(majmin: str) -> str | None:
    """The disk of a block device ``MAJ:MIN`` (itself when it is no partition)."""
    node = SYS_BLOCK / majmin
    if not node.exists():
        return None
    if (node / "partition").exists():  # .../block/sda/sda1: the parent directory is the disk
        try:
            return (node.resolve().parent / "dev").read_text().strip()
        except OSError:
            return None
    return majmin


def _mount_source_dev(dev: int) -> str | None:
    """For an anonymous st_dev: the block device named as the source of a mount with it."""
    want = f"{os.major(dev)}:{os.minor(dev)}"
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split(" ")
        if len(fields) < 10 or fields[2] != want:
            continue
        sep = fields.index("-", 6)
        source = fields[sep + 2]
        if source.startswith("/dev/"):
            try:
                st = os.stat(source)
            except OSError:
                continue
            if stat.S_ISBLK(st.st_mode):
                return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    return None


def disk_of(path: str | os.PathLike[str]) -> str | None:
    """``MAJ:MIN`` of the whole disk ``path``'s filesystem is on, or None (no block device)."""
    dev = os.stat(path).st_dev
    majmin = f"{os.major(dev)}:{os.minor(dev)}"
    if (SYS_BLOCK / majmin).exists():
        return _whole_disk(majmin)
    found = _mount_source_dev(dev)
    return _whole_disk(found) if found else None
