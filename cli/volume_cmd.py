"""``jbl volume create|list|remove``: the caller's named volumes (``runner/volumes.py``).

A volume is a plain directory of the user who created it; ``jbl run --volume=NAME`` mounts
it read-write at ``/volumes/NAME``. Where they live is resolved here, once
(``volumes_root``: ``JBL_VOLUMES``, else root's ``/var/lib/jbl-volumes`` or the user's
``$XDG_DATA_HOME/jbl-volumes``).
"""

from __future__ import annotations

import argparse
from typing import Any

from jbl.store.errors import UsageError


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("volume", parents=parents, help="named volumes for jobs",
                       description="Named volumes: directories of yours that jobs mount at "
                                   "/volumes/NAME with --volume=NAME.")
    vs = p.add_subparsers(dest="volume_command", metavar="COMMAND")
    vs.required = True
    c = vs.add_parser("create", parents=parents, help="create an empty volume")
    c.add_argument("name", metavar="NAME")
    c.add_argument("--size", metavar="SIZE", help=argparse.SUPPRESS)  # Joblet's; refused
    c.add_argument("--type", metavar="TYPE", help=argparse.SUPPRESS)  # Joblet's; refused
    c.set_defaults(func=create)
    ls = vs.add_parser("list", aliases=["ls"], parents=parents, help="your volumes")
    ls.set_defaults(func=list_)
    rm = vs.add_parser("remove", aliases=["rm"], parents=parents,
                       help="delete a volume and everything in it")
    rm.add_argument("name", metavar="NAME")
    rm.set_defaults(func=remove)


def volumes(args: argparse.Namespace) -> Any:
    from jbl.runner.volumes import Volumes, volumes_root

    return Volumes(volumes_root(args.settings))


def create(args: argparse.Namespace) -> int:
    if args.size is not None:
        raise UsageError(f"invalid --size {args.size!r}: jbl volumes are plain directories "
                         "without a size limit; create it without --size")
    if args.type not in (None, "filesystem"):
        raise UsageError(f"invalid --type {args.type!r}: jbl volumes are directories on disk "
                         "(filesystem); for memory use the job's own /tmp")
    path = volumes(args).create(args.name)
    if args.json:
        from jbl.cli.output import print_json

        print_json({"name": args.name, "path": str(path)})
    elif not args.quiet:
        print(f"created volume {args.name} ({path}); mount it with --volume={args.name}")
    return 0


def list_(args: argparse.Namespace) -> int:
    from jbl.cli.output import emit
    from jbl.store.units import format_size

    found = volumes(args).list()
    if args.json:
        rows = [{"name": v.name, "path": str(v.path), "size": v.size,
                 "size_complete": v.complete, "mtime": v.mtime} for v in found]
    else:
        rows = [{"name": v.name, "size": format_size(v.size) + ("" if v.complete else "+"),
                 "path": str(v.path)} for v in found]
    emit(args, rows, [("name", "NAME"), ("size", "SIZE"), ("path", "PATH")],
         empty="no volumes (jbl volume create NAME)")
    return 0


def remove(args: argparse.Namespace) -> int:
    path = volumes(args).remove(args.name)
    if args.json:
        from jbl.cli.output import print_json

        print_json({"name": args.name, "path": str(path), "removed": True})
    elif not args.quiet:
        print(f"removed volume {args.name} ({path})")
    return 0
