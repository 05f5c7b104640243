"""Joblet's client config, ``~/.rnx/config.yaml``: where it is and reading it safely.

jbl takes one block from that file, ``runtimes: {registries: [{name, url, enabled}]}``, which
store/config.py parses exactly as it parses the same block in jbl's own files; the rest of
the file (Joblet's nodes, addresses, certificates) is never looked at.

The file is read only when it is the reader's own, so root never reads what another user
wrote (root whose ``HOME`` points into someone's home directory gets a warning, not their
registries): the directory ``~/.rnx`` must be owned by the effective uid and writable by
nobody else, and ``config.yaml`` must be a regular file owned by the effective uid. For root
both are opened without following links, the file relative to the directory's fd; ordinary
users may link them (dotfile managers do), they can only read what they may read anyway.
Opens never block (a FIFO is refused, not waited on) and the read is bounded by the caller's
limit. A file jbl will not read is skipped with one warning (once per process); a
missing one is silence. Pure apart from reading the file and that warning; thread-safe.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Mapping
from pathlib import Path

from .errors import UsageError

log = logging.getLogger("jbl")
_warned: set[str] = set()  # one warning per file and reason, however often the config is read


def rnx_config_path(env: Mapping[str, str]) -> Path:
    """``$HOME/.rnx/config.yaml`` (the home of the account when HOME is unset)."""
    home = env.get("HOME") or os.path.expanduser("~")
    return Path(home) / ".rnx" / "config.yaml"


def _skip(path: Path, why: str) -> None:
    if f"{path}\0{why}" in _warned:
        return
    _warned.add(f"{path}\0{why}")
    log.warning("ignoring %s: %s (jbl reads only the runtimes block of your own Joblet "
                "config)", path, why)


def _mine(st: os.stat_result, euid: int) -> str | None:
    """Why a file or directory with this status is not the reader's own, or None."""
    if st.st_uid != euid:
        return f"owned by uid {st.st_uid}, not by you (uid {euid})"
    return None


def read_own(path: Path, max_bytes: int) -> str | None:
    """The text of ``path`` (Joblet's config) when it is safely the reader's own; None when
    it is missing or refused (refusals warn). Over ``max_bytes`` or not UTF-8: UsageError."""
    euid = os.geteuid()
    nofollow = os.O_NOFOLLOW if euid == 0 else 0
    try:
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | nofollow)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        _skip(path, "its directory is a symbolic link" if e.errno == errno.ELOOP
              else f"{path.parent}: {e.strerror}")
        return None
    try:
        dst = os.fstat(dfd)
        why = _mine(dst, euid)
        if why is None and dst.st_mode & 0o022:
            why = "its directory is writable by others"
        if why is not None:
            _skip(path, f"{path.parent} is {why}" if "owned" in why else why)
            return None
        try:
            fd = os.open(path.name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | nofollow,
                         dir_fd=dfd)
        except FileNotFoundError:
            return None
        except OSError as e:
            _skip(path, "it is a symbolic link" if e.errno == errno.ELOOP else str(e.strerror))
            return None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            why = "it is not a regular file" if not stat.S_ISREG(st.st_mode) else _mine(st, euid)
            if why is not None:
                _skip(path, why)
                return None
            data = f.read(max_bytes + 1)
    finally:
        os.close(dfd)
    if len(data) > max_bytes:
        raise UsageError(f"config {path} is larger than {max_bytes >> 20} MiB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"config {path} is not UTF-8") from None
