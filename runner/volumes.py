"""Named volumes: plain directories a user keeps between jobs, mounted at ``/volumes/NAME``.

Each user has their own set, in a directory only they can write: root's in
``/var/lib/jbl-volumes``, a user's in ``$XDG_DATA_HOME/jbl-volumes`` (else
``~/.local/share/jbl-volumes``); ``JBL_VOLUMES`` names another (``volumes_root``). A volume
is the directory ``ROOT/NAME`` (mode 0700, owned by its creator). A user cannot name, use,
list or remove another user's volume: names are looked up in the caller's own directory
only, and that directory and each volume are opened relative to a directory fd without
following links, checked for type and owner (``fstat``) before use.

A running job holds a shared ``flock`` on its volume's directory (the supervisor's fd,
close-on-exec, never the job's); ``remove`` takes it exclusively without waiting, so a
volume in use is never deleted under a job. Only the owner can open the directory (0700 in a
0700 parent), so nobody else can take that lock. Not thread-safe; one call at a time.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from jbl.store.errors import AlreadyExists, NotFound, StoreBusy, UnsafeStorePath, UsageError
from jbl.store.settings import Settings

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
NAME_FORM = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
ROOT_DEFAULT = Path("/var/lib/jbl-volumes")
O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
SIZE_WALK_LIMIT = 1_000_000  # entries counted for `list`'s size before it says "at least"


def volumes_root(settings: Settings) -> Path:
    """Where the caller's volumes live (from the CLI's settings: ``JBL_VOLUMES``, else the
    default for root or this user)."""
    if settings.var("JBL_VOLUMES"):
        return Path(settings.var("JBL_VOLUMES"))
    if settings.euid == 0:
        return ROOT_DEFAULT
    xdg = settings.env.get("XDG_DATA_HOME") or os.path.join(settings.home, ".local/share")
    return Path(xdg) / "jbl-volumes"


def check_name(name: str, what: str = "volume name") -> str:
    if not NAME_RE.fullmatch(name):
        raise UsageError(f"invalid {what} {name!r}: expected {NAME_FORM}")
    return name


@dataclass(frozen=True)
class VolumeInfo:
    name: str
    path: Path
    size: int  # bytes of the files in it (links not followed)
    complete: bool  # False: more than SIZE_WALK_LIMIT entries, size is a lower bound
    mtime: float


class Volumes:
    """The caller's named volumes under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(os.path.abspath(root))
        self.euid = os.geteuid()

    # ---- the base directory ----
    def _check_owned(self, fd: int, what: Path) -> os.stat_result:
        st = os.fstat(fd)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != self.euid or st.st_mode & 0o022:
            raise UnsafeStorePath(
                f"{what} is not a directory of yours alone (owner uid {st.st_uid}, mode "
                f"{stat.S_IMODE(st.st_mode):o})",
                hint="it must be owned by you and not writable by others")
        return st

    def _open_root(self, create: bool) -> int | None:
        if create:
            os.makedirs(self.root.parent, 0o700, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                os.mkdir(self.root, 0o700)
        try:
            fd = os.open(self.root, O_DIR)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise UnsafeStorePath(f"volumes directory {self.root}: {e.strerror}") from None
        try:
            self._check_owned(fd, self.root)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _open_volume(self, base: int, name: str) -> int:
        try:
            fd = os.open(name, O_DIR, dir_fd=base)
        except FileNotFoundError:
            raise NotFound(f"no volume named {name!r}",
                           hint=f"jbl volume create {name}; jbl volume list shows yours") from None
        except OSError as e:
            raise UnsafeStorePath(f"volume {name}: {e.strerror}") from None
        try:
            self._check_owned(fd, self.root / name)
        except BaseException:
            os.close(fd)
            raise
        return fd

    # ---- commands ----
    def create(self, name: str) -> Path:
        check_name(name)
        base = self._open_root(create=True)
        assert base is not None
        try:
            os.mkdir(name, 0o700, dir_fd=base)
        except FileExistsError:
            raise AlreadyExists(f"volume {name!r} exists ({self.root / name})") from None
        finally:
            os.close(base)
        return self.root / name

    def list(self) -> list[VolumeInfo]:
        base = self._open_root(create=False)
        if base is None:
            return []
        out = []
        try:
            for name in sorted(os.listdir(base)):
                if not NAME_RE.fullmatch(name):
                    continue
                try:
                    fd = self._open_volume(base, name)
                except (NotFound, UnsafeStorePath):
                    continue  # not a volume of ours (a stray file or link): not listed
                try:
                    size, complete = _du(fd)
                    out.append(VolumeInfo(name, self.root / name, size, complete,
                                          os.fstat(fd).st_mtime))
                finally:
                    os.close(fd)
        finally:
            os.close(base)
        return out

    def remove(self, name: str) -> Path:
        check_name(name)
        base = self._open_root(create=False)
        if base is None:
            raise NotFound(f"no volume named {name!r}", hint="jbl volume list shows yours")
        try:
            fd = self._open_volume(base, name)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise StoreBusy(f"volume {name!r} is in use by a running job",
                                    hint="remove it when the job has ended") from None
                shutil.rmtree(name, dir_fd=base)  # fd-based: follows no link inside
            finally:
                os.close(fd)
        finally:
            os.close(base)
        return self.root / name

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[Path]:
        """The volume's directory, held (shared lock) until the context ends."""
        check_name(name, "--volume")
        base = self._open_root(create=False)
        if base is None:
            raise UsageError(f"invalid --volume {name!r}: no volume of that name "
                             f"(create it with: jbl volume create {name})")
        try:
            try:
                fd = self._open_volume(base, name)
            except NotFound:
                raise UsageError(f"invalid --volume {name!r}: no volume of that name "
                                 f"(create it with: jbl volume create {name})") from None
        finally:
            os.close(base)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreBusy(f"volume {name!r} is being removed") from None
            yield self.root / name
        finally:
            os.close(fd)


def _du(top: int) -> tuple[int, bool]:
    """Bytes in the tree under directory fd ``top`` (no link followed), bounded in entries."""
    total, seen = 0, 0
    stack = [os.dup(top)]
    try:
        while stack:
            fd = stack.pop()
            try:
                with os.scandir(fd) as it:
                    for e in it:
                        seen += 1
                        if seen > SIZE_WALK_LIMIT:
                            return total, False
                        st = e.stat(follow_symlinks=False)
                        if stat.S_ISREG(st.st_mode):
                            total += st.st_blocks * 512
                        elif stat.S_ISDIR(st.st_mode):
                            with contextlib.suppress(OSError):
                                stack.append(os.open(e.name, O_DIR, dir_fd=fd))
            except OSError:
                pass
            finally:
                os.close(fd)
    finally:
        for fd in stack:
            os.close(fd)
    return total, True
