"""``jbl pack DIR -o TARBALL`` and ``jbl registry add TARBALL… --registry DIR``.

Thin adapters over ``store.pack``: how a publisher (the demo, the tests, a lab admin) makes
runtime tarballs and an offline registry. One line per result, or ``--json`` records.
"""

from __future__ import annotations

import argparse
import errno
import os
from pathlib import Path
from typing import Any

from jbl.store import pack as packmod
from jbl.store.errors import JblError, PermissionDenied, UsageError
from jbl.store.regformat import host_platforms
from jbl.store.units import format_size

from . import output


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("pack", parents=parents, help="make a runtime tarball from a directory",
                       description="Pack a runtime directory (runtime.yml + isolated/) into a "
                                   "deterministic tarball: the same directory always gives the "
                                   "same bytes.")
    p.add_argument("dir", metavar="DIR", type=Path)
    p.add_argument("-o", "--output", metavar="TARBALL", type=Path, required=True)
    p.add_argument("--compress", choices=sorted(packmod.COMPRESSIONS), default=None,
                   help="gz (default; or from the -o suffix .tar.zst / .tar), zst or none")
    p.set_defaults(func=run_pack)

    r = sub.add_parser("registry", parents=parents, help="publish tarballs in a registry dir",
                       description="Manage a local registry directory (registry.json in "
                                   "Joblet's format).")
    rsub = r.add_subparsers(dest="registry_command", metavar="SUBCOMMAND")
    rsub.required = True
    a = rsub.add_parser("add", parents=parents, help="add tarballs to DIR/registry.json",
                        description="Write or update DIR/registry.json with each tarball's "
                                    "name, version, checksum, size and platforms; tarballs "
                                    "outside DIR are copied into it.")
    a.add_argument("tarballs", metavar="TARBALL", type=Path, nargs="+")
    a.add_argument("--registry", metavar="DIR|s3://BUCKET/PREFIX", type=_registry_place,
                   required=True)
    a.add_argument("--platform", dest="platforms", action="append", metavar="PLATFORM",
                   help="e.g. ubuntu-amd64 (repeatable; default: this host's architecture, "
                        f"{', '.join(host_platforms())})")
    a.add_argument("--base-url", metavar="URL",
                   help="absolute download_url prefix (default: relative to registry.json)")
    a.set_defaults(func=run_registry_add)


def _compression(args: argparse.Namespace) -> str:
    if args.compress:
        return str(args.compress)
    name = args.output.name
    if name.endswith((".tar.zst", ".tzst")):
        return "zst"
    if name.endswith(".tar"):
        return "none"
    return "gz"


def _cannot(e: OSError, doing: str, path: Path, hint: str) -> JblError:
    """One line for an OSError about a path the user named (exit 8 when it is a matter of
    permissions, else 2: the path given was wrong)."""
    cls = PermissionDenied if e.errno in (errno.EACCES, errno.EPERM) else UsageError
    why = "read-only file system" if e.errno == errno.EROFS else (e.strerror or str(e))
    if e.errno in (errno.ENOENT, errno.ENOTDIR) and doing.startswith("write") and \
            not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        why = f"{os.path.dirname(os.path.abspath(path))} is not a directory you can write in"
    return cls(f"cannot {doing} {path}: {why}", hint=hint)


def _writes(path: Path, e: OSError) -> bool:
    """Whether ``e`` is about writing ``path`` (its temp file beside it, or the rename)."""
    names = [n for n in (e.filename, e.filename2) if isinstance(n, str)]
    return any(os.path.dirname(os.path.abspath(n)) == os.path.dirname(os.path.abspath(path))
               for n in names)


def run_pack(args: argparse.Namespace) -> int:
    if args.output.is_dir():
        raise UsageError(f"-o {args.output} is a directory",
                         hint=f"name the tarball, e.g. -o {args.output / 'NAME-VERSION.tar.gz'}")
    try:
        res = packmod.pack(args.dir, args.output, _compression(args))
    except OSError as e:
        if _writes(args.output, e):
            raise _cannot(e, "write", args.output, "choose another -o in a directory you may "
                          "write") from None
        raise _cannot(e, "read", Path(e.filename or args.dir), "jbl pack reads every file "
                      "of the runtime directory") from None
    for w in res.warnings:
        output.note(args, f"jbl: warning: {w}")
    if args.json:
        output.print_json({"path": str(res.path), "name": res.manifest.name,
                           "version": res.manifest.version, "checksum": res.checksum,
                           "size": res.size, "entries": res.entries, "warnings": res.warnings})
    else:
        print(f"packed {res.manifest.name}@{res.manifest.version} into {res.path} "
              f"({res.entries} entries, {format_size(res.size)}, {res.checksum})")
    return 0


def _registry_place(text: str) -> Path | str:
    """``--registry``: a directory, or an S3 bucket's ``s3://BUCKET/PREFIX`` (kept a str)."""
    return text if text.startswith("s3://") else Path(text)


def _registry_add_bucket(args: argparse.Namespace) -> list[dict[str, Any]]:
    from jbl.store.bucketpublish import registry_add_bucket
    from jbl.store.transport import transport_settings

    cfg = args.settings.config
    return registry_add_bucket(args.registry, args.tarballs, endpoint=cfg.s3_endpoint,
                               transport=transport_settings(cfg, args.settings.env),
                               platforms=args.platforms, base_url=args.base_url)


def run_registry_add(args: argparse.Namespace) -> int:
    if isinstance(args.registry, str):
        return _report_added(args, _registry_add_bucket(args), f"{args.registry}/"
                             f"{packmod.REGISTRY_FILE}")
    try:
        added = packmod.registry_add(args.registry, args.tarballs, platforms=args.platforms,
                                     base_url=args.base_url)
    except OSError as err:
        if err.filename is None or _writes(args.registry / packmod.REGISTRY_FILE, err) or \
                os.path.abspath(err.filename) == os.path.abspath(args.registry):
            raise _cannot(err, "write the registry", args.registry, "choose a --registry "
                          "directory you may write") from None
        raise _cannot(err, "read", Path(err.filename), "check the TARBALL paths") from None
    return _report_added(args, added, str(args.registry / packmod.REGISTRY_FILE))


def _report_added(args: argparse.Namespace, added: list[dict[str, Any]], where: str) -> int:
    if args.json:
        output.print_json(added)
    else:
        for e in added:
            new = e["published"]
            print(f"added {e['name']}@{e['version']} to {where}"
                  f" ({e['download_url']}, {format_size(e['size'])}, "
                  f"{', '.join(e['platforms'])}); content-addressed: {new['objects']} new "
                  f"objects, {new['packs']} new packs, {format_size(new['bytes'])}")
    return 0
