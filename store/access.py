"""Who may change a store: root, or a member of the store's admin group.

The rule (docs/shared-server.md):

* Opening the index is for those who may change the store (``may_open_index``): the index,
  its ``-wal``/``-shm`` and the ``lock`` file are 0660 root:G, because whoever can open a
  file can lock it and so stall every writer. Everyone else reads the published summary
  (snapshot.py: list, info, df, and the runtime ``jbl run`` resolves) and the mount, where
  the kernel enforces file modes.
* Changing a store (install, import, rm, gc, pin, verify --repair) is allowed to
    - root (euid 0), always;
    - the owner of the store directory, when it is not the system store: a user's own
      ``$XDG_DATA_HOME/jbl`` store keeps working for that user with no setup at all;
    - a member of the store's **admin group**: the group that owns the store directory when
      that directory is group-writable (``jbl setup --system`` makes it ``root:jbl-admin``,
      mode 2775). Membership means the real/effective gid or a supplementary group.
  Everyone else gets ``PermissionDenied("install needs root or membership in group G")``
  (exit 8) *before* anything is opened for writing, so nothing is half-changed.
* A store that is not group-writable has no admin group: only root (or its owner) may change
  it, and the message names the configured group (``admin_group`` in /etc/jbl/config.yaml,
  default ``jbl-admin``) and says how to make one (``jbl setup --system``).

This check is the friendly front door, not the lock: jbl is not setuid, so the enforcement is
the file permissions ``jbl setup --system`` puts on the store (index and lock 0660 root:G,
blobs 2770, nothing writable by others). The check is written to agree with them exactly,
so a user who passes it can really write and a user who fails it could not have.

Thread-safety: pure functions over the filesystem and the group database; safe anywhere.
"""

from __future__ import annotations

import grp
import os
import stat
from pathlib import Path

from .errors import PermissionDenied
from .settings import DEFAULT_ADMIN_GROUP, NO_ACTION, SYSTEM_STORE

__all__ = ["DEFAULT_ADMIN_GROUP", "SYSTEM_STORE", "can_admin", "configured_group",
           "may_open_index", "require_admin"]


def configured_group() -> str:
    """The admin group named in the system config (``admin_group:``), else ``jbl-admin``
    (store/config.py: ``system_admin_group``; only the system file is read)."""
    from .config import system_admin_group

    return system_admin_group()


def _system_store() -> Path:
    return SYSTEM_STORE.resolve()


def is_system_store(store_dir: Path) -> bool:
    return Path(store_dir).resolve() == _system_store()


def _existing(path: Path) -> Path | None:
    """``path`` itself if it exists, else its nearest existing ancestor (for a new store)."""
    p = Path(path).absolute()
    for cand in (p, *p.parents):
        if cand.exists():
            return cand
    return None


def store_admin_group(store_dir: Path) -> str | None:
    """The group whose members administer ``store_dir``: its owning group if group-writable."""
    try:
        st = os.stat(store_dir)
    except OSError:
        return None
    if not st.st_mode & stat.S_IWGRP:
        return None
    try:
        return grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        return str(st.st_gid)


def in_group(group: str) -> bool:
    """Is the calling process a member of ``group`` (primary or supplementary)?"""
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        if not group.isdigit():
            return False
        gid = int(group)
    return gid in {os.getegid(), os.getgid(), *os.getgroups()}


def can_admin(store_dir: Path | str | None = None) -> bool:
    """May the caller change ``store_dir`` (default: the system store)? See the module rule."""
    if os.geteuid() == 0:
        return True
    store = Path(store_dir) if store_dir is not None else SYSTEM_STORE
    if not is_system_store(store):
        anchor = _existing(store)
        # A store that does not exist yet is created by whoever may write its parent: that
        # is the user's own (e.g. a fresh ~/.local/share/jbl).
        if anchor is not None and anchor != store.absolute():
            return os.access(anchor, os.W_OK)
        if anchor is not None and anchor.stat().st_uid == os.geteuid():
            return True
    group = store_admin_group(store)
    return group is not None and in_group(group)


def may_open_index(store_dir: Path | str) -> bool:
    """Should the caller read ``store_dir``'s index itself (rather than its published
    summary)? Only if it may change the store and write the index: a reader who could not
    write it must not open it at all (its locks would stall the writers; docs/concurrency.md)."""
    index = Path(store_dir) / "index.db"
    return can_admin(store_dir) and os.access(index, os.R_OK | os.W_OK)


def require_admin(action: str | None = None, store_dir: Path | str | None = None) -> None:
    """Raise PermissionDenied (exit 8) unless the caller may ``action`` on ``store_dir``.

    ``action`` names the change in the message ("install", "rm", "gc"); the CLI passes the
    running command's (``Settings.action``), else it is "changing the store".
    """
    if can_admin(store_dir):
        return
    action = action or NO_ACTION
    store = Path(store_dir) if store_dir is not None else SYSTEM_STORE
    group = store_admin_group(store)
    if group is not None:
        raise PermissionDenied(f"{action} needs root or membership in group {group}",
                               hint=f"store {store}; an admin can add you with "
                                    f"`usermod -aG {group} {_whoami()}`, then log in again")
    group = configured_group()
    raise PermissionDenied(f"{action} needs root or membership in group {group}",
                           hint=f"store {store} has no admin group yet; an admin can create "
                                f"one with: jbl setup --system --group {group}")


def _whoami() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())
