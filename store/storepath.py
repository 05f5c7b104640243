"""Whether a path can be a store, and one line saying why not when it cannot.

A mistyped or unusable ``--store`` is an everyday mistake, not a bug: the store under
``/proc``, on a read-only filesystem, a path that is a file, a directory under another
user's 0700 home. This module owns turning those into one line that names the path, says
what is wrong and what to do, with the exit code of the error class (store/errors.py):

    has_index(path)             is it a store (False: not yet), for commands that read one
    require_store(path, what)   an existing store, for commands that never create one (mount,
                                verify, gc, ...): "no jbl store at PATH"        exit 10
    make_dir(path)              create a new store's directory (``mkdir -p``)
    not_a_directory(path)       the path exists and is not a directory           exit 10
    from_oserror(e, path, doing)  an OSError about the store path, as one line:
                                EACCES/EPERM -> PermissionDenied (exit 8), the rest -> StoreError
                                (exit 10)
    identity(path)              (device, inode) of the store directory, None if it is gone:
                                a long-lived holder (a mount daemon) compares it before writing
                                anything new there, so a store an admin removed stays removed

Thread-safety: plain functions over the filesystem; any thread.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from .errors import JblError, PermissionDenied, StoreError

INDEX_NAME = "index.db"  # the file whose presence makes a directory a store (db.py)
_CHOOSE = "choose a directory you may write with --store DIR or JBL_STORE"


def identity(path: Path | str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


def not_a_directory(path: Path | str) -> StoreError | None:
    """A StoreError if ``path`` exists but is not a directory (a file, a device...)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if stat.S_ISDIR(st.st_mode):
        return None
    return StoreError(f"the store path {path} is a file, not a directory",
                      hint="check --store / JBL_STORE: a store is a directory")


def has_index(path: Path | str) -> bool:
    """Whether ``path`` is a store (holds its index); False when it does not exist yet. A
    path that is a file, or that the caller may not look into, is one line instead."""
    err = not_a_directory(path)
    if err is not None:
        raise err
    try:
        os.stat(Path(path) / INDEX_NAME)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as e:
        raise from_oserror(e, Path(path), "read") from None
    return True


def require_store(path: Path | str, what: str) -> None:
    """Refuse, with the reason, a ``path`` that holds no store: ``what`` (e.g. "mount")
    never creates one, so a typo in ``--store`` must not look like an empty store."""
    if has_index(path):
        return
    if not os.path.exists(path):
        raise StoreError(f"no jbl store at {path}: the directory does not exist, so there is "
                         f"nothing to {what}",
                         hint="check --store / JBL_STORE for a typo; `jbl store install` "
                              "creates a store")
    raise StoreError(f"no jbl store at {path}: the directory holds no {INDEX_NAME}, so there "
                     f"is nothing to {what}",
                     hint="check --store / JBL_STORE; `jbl store install` creates a store")


def make_dir(path: Path) -> None:
    """``mkdir -p path`` for a new store; a path that cannot be one is one line."""
    err = not_a_directory(path)
    if err is not None:
        raise err
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise from_oserror(e, path, "create") from None


def _first_file(path: Path) -> Path | None:
    """The first component of ``path`` that exists and is not a directory."""
    for p in (*reversed(path.absolute().parents), path.absolute()):
        try:
            if not stat.S_ISDIR(os.stat(p).st_mode):
                return p
        except OSError:
            return None
    return None


def from_oserror(e: OSError, path: Path, doing: str) -> JblError:
    """One line for an OSError met while ``doing`` ("create", "read", "write") the store at
    ``path``: what failed and why, naming the file the kernel named, and what to do."""
    name = e.filename if isinstance(e.filename, str) and e.filename else ""
    where = str(path / name) if name else str(path)  # a relative name is inside the store
    why = e.strerror or str(e)
    code = e.errno
    if code in (errno.EACCES, errno.EPERM):
        return PermissionDenied(f"cannot {doing} the store at {path}: {where}: {why}",
                                hint=_CHOOSE + ", or ask whoever owns it for access")
    if code == errno.EROFS:
        return StoreError(f"cannot {doing} the store at {path}: it is on a read-only "
                          "filesystem", hint=_CHOOSE)
    if code in (errno.EEXIST, errno.ENOTDIR):
        blocker = _first_file(Path(where)) or Path(where)
        return StoreError(f"cannot {doing} the store at {path}: {blocker} is a file, "
                          "not a directory", hint="check --store / JBL_STORE for a typo")
    if code == errno.ENOENT and doing == "create":
        # mkdir -p met ENOENT: a filesystem that refuses new directories (/proc, /sys), or a
        # parent that vanished meanwhile
        return StoreError(f"cannot create the store at {path}: the filesystem there does not "
                          "allow new directories", hint=_CHOOSE)
    if code == errno.ENOSPC:
        return StoreError(f"cannot {doing} the store at {path}: no space left on the device",
                          hint="free some space (`jbl store gc`) or use another --store")
    return StoreError(f"cannot {doing} the store at {path}: {where}: {why}", hint=_CHOOSE)
