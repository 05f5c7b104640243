"""A job's user has a name: the /etc/passwd and /etc/group a job sees, and reading the
runtime's /etc safely.

A non-root job runs as the caller's uid in a user namespace, and root's ``--user NAME`` as
that user's uid; a runtime's /etc/passwd rarely knows either, so ``whoami``, ``id -un``,
``pip`` or ``ssh`` would find no name. As rootless container tools do, the job gets the
runtime's own entries plus one for its user (and its groups), taken from the *host's*
passwd/group database (NSS); an entry the runtime already has for that uid or gid is kept
as it is. The home directory in the entry is the job's ``$HOME`` (its work directory): the
host's home does not exist inside the job.

Nothing of the runtime is changed: the merged copies are written by the sandbox into the
job's private staging tmpfs and bound read-only (``plan.JobEtc``, ``sandbox.op_etc_files``).
When the runtime already names the job's uid and gid (root's own jobs, nearly always),
nothing is written at all, so the default job pays only for reading two small files.

``read_runtime_etc`` opens the runtime's files one component at a time from the runtime
directory's descriptor without following any link, non-blocking, checks each is a regular
file (``fstat``) and reads at most ``MAX_ETC_FILE`` bytes. The owner is not checked: these
files are the job's own root filesystem, trusted exactly as much as the runtime is, and
their bytes only ever reach that job. Everything else here is pure; thread-safe.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from jbl.store.manifest import Manifest

from .errors import SandboxSetupError

MAX_ETC_FILE = 1 << 20  # a runtime's passwd, group or hosts larger than this is refused
ETC_NAMES = ("passwd", "group", "hosts", "resolv.conf")
# A name that is safe in a passwd/group line: no ':' ',' or newline; what useradd allows
# and then some (NSS sources such as LDAP may hold longer names).
NAME_RE = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.@-]{0,255}\$?")  # always fullmatch
NOBODY, NOGROUP = 65534, 65534  # the overflow ids: what a user namespace shows for unmapped ids
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_O_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY


@dataclass(frozen=True)
class RuntimeEtc:
    """The runtime's /etc as the job would see it: ``kind`` "dir", "absent" (no /etc) or
    "other" (a link or not a directory); ``files``: the regular files among ETC_NAMES."""

    kind: Literal["dir", "absent", "other"]
    files: dict[str, bytes] = field(default_factory=dict)


def etc_source(manifest: Manifest) -> str | None:
    """The runtime-relative directory that becomes the job's /etc, from runtime.yml's mounts
    (a mount at ``/etc`` wins over the ``/etc`` inside a mount at ``/``)."""
    found: str | None = None
    for m in manifest.default_mounts():
        if m.target == "/etc":
            return m.source
        if m.target == "/" and found is None:
            found = f"{m.source}/etc"
    return found


def read_runtime_etc(runtime_dir: Path, manifest: Manifest,
                     names: Iterable[str] = ETC_NAMES) -> RuntimeEtc:
    """Read the runtime's /etc files in ``names`` without following a link (see above)."""
    rel = etc_source(manifest)
    if rel is None:
        return RuntimeEtc("absent")
    try:
        fd = os.open(runtime_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise SandboxSetupError(f"runtime {runtime_dir}: {e.strerror}") from None
    try:
        for part in [p for p in rel.split("/") if p not in ("", ".")]:
            try:
                nfd = os.open(part, _O_DIR, dir_fd=fd)
            except OSError as e:
                if e.errno == errno.ENOENT:
                    return RuntimeEtc("absent")
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    return RuntimeEtc("other")
                raise SandboxSetupError(f"runtime /etc: {e.strerror}") from None
            os.close(fd)
            fd = nfd
        files = {}
        for name in names:
            data = _read_regular(fd, name)
            if data is not None:
                files[name] = data
        return RuntimeEtc("dir", files)
    finally:
        os.close(fd)


def _read_regular(dir_fd: int, name: str) -> bytes | None:
    try:
        fd = os.open(name, _O_FILE, dir_fd=dir_fd)
    except OSError:
        return None  # missing, a link, unreadable: the job gets jbl's copy instead
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        chunks, size = [], 0
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_ETC_FILE:
                raise SandboxSetupError(f"runtime /etc/{name}: larger than {MAX_ETC_FILE} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class JobUser:
    """The job's identity as the kernel will see it inside the job."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()  # supplementary groups (root --user only: real in the job)
    userns: bool = False  # a user namespace: every unmapped id shows as 65534


def _ids(data: bytes) -> set[int]:
    """The ids (third field) named in a passwd or group file."""
    out = set()
    for line in data.splitlines():
        parts = line.split(b":")
        if len(parts) > 2 and parts[2].isdigit():
            out.add(int(parts[2]))
    return out


def _clean(text: str) -> str:
    """A gecos for a passwd line: no field separator, no control characters, bounded."""
    return "".join(c for c in text if c != ":" and c.isprintable())[:256]


def _append(base: bytes, lines: list[str]) -> bytes:
    if base and not base.endswith(b"\n"):
        base += b"\n"
    return base + "".join(line + "\n" for line in lines).encode()


def passwd_group(runtime: RuntimeEtc, user: JobUser, home: str,
                 getpwuid: Callable[[int], tuple[str, str] | None],
                 getgrgid: Callable[[int], str | None]) -> list[tuple[str, bytes]]:
    """The job's /etc/passwd and /etc/group when the runtime's lack the job's ids: the
    runtime's bytes, then the missing entries. ``getpwuid(uid) -> (name, gecos)`` and
    ``getgrgid(gid) -> name`` look at the host's database (None: no such entry, or a name
    unsafe in these files; then the id stays nameless, as before). Empty when the runtime
    already has every id."""
    passwd = runtime.files.get("passwd", b"")
    group = runtime.files.get("group", b"")
    uids, gids = _ids(passwd), _ids(group)
    out: list[tuple[str, bytes]] = []
    users: list[str] = []
    pw = None
    if user.uid not in uids and (pw := getpwuid(user.uid)) is not None:
        name, gecos = pw
        users.append(f"{name}:x:{user.uid}:{user.gid}:{_clean(gecos)}:{home}:/bin/sh")
    groups: list[str] = []
    member = pw[0] if pw else ""
    for gid in dict.fromkeys((user.gid, *user.groups)):
        if gid not in gids and (gname := getgrgid(gid)) is not None:
            members = member if gid != user.gid else ""
            groups.append(f"{gname}:x:{gid}:{members}")
    if user.userns and (users or groups):  # what root-owned files show as in a user ns
        if users and NOBODY not in uids:
            users.append(f"nobody:x:{NOBODY}:{NOGROUP}:nobody:/nonexistent:/usr/sbin/nologin")
        if groups and NOGROUP not in gids:
            groups.append(f"nogroup:x:{NOGROUP}:")
    if users:
        out.append(("passwd", _append(passwd, users)))
    if groups:
        out.append(("group", _append(group, groups)))
    return out


def host_getpwuid(uid: int) -> tuple[str, str] | None:
    """(name, gecos) of ``uid`` in the host's passwd database (NSS), if its name is safe."""
    import pwd

    try:
        pw = pwd.getpwuid(uid)
    except KeyError:
        return None
    return (pw.pw_name, pw.pw_gecos) if NAME_RE.fullmatch(pw.pw_name) else None


def host_getgrgid(gid: int) -> str | None:
    """The name of ``gid`` in the host's group database (NSS), if it is safe."""
    import grp

    try:
        name = grp.getgrgid(gid).gr_name
    except KeyError:
        return None
    return name if NAME_RE.fullmatch(name) else None
