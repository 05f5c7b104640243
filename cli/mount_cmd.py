"""``jbl mount MOUNTPOINT`` / ``jbl mount --status`` / ``jbl umount MOUNTPOINT``.

Argument parsing and output only; the lifecycle is fusefs/mount.py.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import logging
import os
import sys
from pathlib import Path
from typing import Any

from jbl.store.errors import MountError, UsageError
from jbl.store.storepath import require_store

from . import output


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "mount", parents=parents, help="browse every installed runtime version read-only",
        description="Serve the store read-only at MOUNTPOINT: MOUNTPOINT/<name>/<version>/ is "
                    "each installed version, MOUNTPOINT/<name>/latest the highest release. "
                    "Returns once the mount is ready; the daemon logs to STORE/run/mount.log "
                    "(or, if that is not writable, beside your mount records).")
    p.add_argument("mountpoint", nargs="?", type=Path, metavar="MOUNTPOINT")
    p.add_argument("--foreground", "-f", action="store_true",
                   help="stay in front; Ctrl-C or SIGTERM unmounts")
    p.add_argument("--allow-other", action="store_true",
                   help="let every user read the trees (file modes enforced); needs root "
                        "or user_allow_other in /etc/fuse.conf")
    p.add_argument("--nonempty", action="store_true",
                   help="mount over a directory that is not empty (its files are hidden "
                        "while mounted)")
    p.add_argument("--status", action="store_true",
                   help="list the live or stale mounts of the store, and where")
    p.add_argument("--all", action="store_true",
                   help="with --status: the jbl mounts of every store on this host")
    p.add_argument("--engine", choices=("raw", "pyfuse3"), default=None,
                   help="raw: speak /dev/fuse directly (default; kernel-cached opens and "
                        "listings); pyfuse3: the libfuse-based engine. Default from "
                        "JBL_MOUNT_ENGINE, else raw")
    p.set_defaults(func=cmd_mount)

    u = sub.add_parser("umount", parents=parents, help="unmount a jbl mount (also a stale one)",
                       description="Stop the mount daemon serving MOUNTPOINT, or detach the "
                                   "mount if its daemon died. MOUNTPOINT alone is enough: "
                                   "no --store needed.")
    u.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    u.set_defaults(func=cmd_umount)


def cmd_mount(args: argparse.Namespace) -> int:
    from jbl.fusefs import mount, mounttab

    if args.status:
        if args.mountpoint is not None:
            raise UsageError("--status takes no MOUNTPOINT")
        if args.nonempty:
            raise UsageError("--nonempty goes with a MOUNTPOINT, not --status")
        return _status(args)
    if args.all:
        raise UsageError("--all goes with --status")
    if args.mountpoint is None:
        raise UsageError("jbl mount needs a MOUNTPOINT (or --status)")
    mp = Path(os.path.realpath(args.mountpoint))
    # a stale mount (its daemon died) answers ENOTCONN to stat: spawn() recovers it
    if not mounttab.is_stale(mp) and not os.path.isdir(mp):
        raise MountError(f"mountpoint {args.mountpoint} does not exist or is not a directory",
                         hint=f"create it: mkdir -p {args.mountpoint}")
    # before anything is started or written (the log lives in the store): a mistyped
    # --store is not an empty store, and a mount must not silently hide a directory's files
    require_store(args.store, "mount")
    mount.check_mountpoint(mp, nonempty=args.nonempty)
    if args.allow_other and os.geteuid() != 0 and not _user_allow_other():
        raise MountError("--allow-other needs root or 'user_allow_other' in /etc/fuse.conf")
    engine = args.engine or args.settings.mount_engine or mount.DEFAULT_ENGINE
    if engine not in mount.ENGINES:
        raise UsageError(f"JBL_MOUNT_ENGINE={engine!r}: use raw or pyfuse3")
    hold = args.settings.config.removed_hold_limit  # a malformed config: one line, exit 2
    if args.foreground:
        logging.getLogger().setLevel(logging.DEBUG if args.debug else logging.INFO)
        logging.getLogger("pyfuse3").setLevel(logging.WARNING)
        with contextlib.suppress(KeyboardInterrupt):
            mount.serve(args.store, mp, allow_other=args.allow_other, engine=engine,
                        hold_limit=hold)
        return 0
    proc = mount.spawn(args.store, mp, allow_other=args.allow_other, engine=engine,
                       hold_limit=hold)
    proc.returncode = 0  # detached on purpose: it outlives us (and Popen must not warn)
    output.note(args, f"mounted {args.store} on {mp} (pid {proc.pid}, {engine} engine; "
                      f"log {mounttab.log_path(args.store)})")
    return 0


def _status(args: argparse.Namespace) -> int:
    from jbl.fusefs import mount, mounttab

    found = (mounttab.records() + mounttab.unrecorded()) if args.all else \
        mount.status(args.store)
    rows = []
    for st in found:
        since = (dt.datetime.fromtimestamp(st.since).isoformat(timespec="seconds")
                 if st.since else "?")
        rows.append({"mountpoint": st.mountpoint, "store": st.store, "pid": st.pid or None,
                     "since": since, "alive": st.alive, "state": st.state,
                     "allow_other": st.allow_other, "private": st.private,
                     "engine": st.engine})
    output.emit(args, rows, [("mountpoint", "MOUNTPOINT"), ("store", "STORE"), ("pid", "PID"),
                             ("since", "SINCE"), ("state", "STATE"),
                             ("allow_other", "ALLOW_OTHER"), ("private", "PRIVATE"),
                             ("engine", "ENGINE")],
                empty="no jbl mounts" if args.all else
                f"nothing of {args.store} is mounted (--all: every store)")
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    from jbl.fusefs import mount

    done = mount.unmount(args.mountpoint)
    output.note(args, f"{os.path.realpath(args.mountpoint)}: {done}")
    return 0


def _user_allow_other() -> bool:
    try:
        with open("/etc/fuse.conf") as f:
            return any(line.strip() == "user_allow_other" for line in f)
    except OSError:
        return False


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: jbl mount")
