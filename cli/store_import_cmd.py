"""``jbl store import TARBALL [--name N] [--version V]``: install a local runtime tarball.

A thin adapter over ``store.ingest.ingest``: argv in, one summary line (or a JSON record)
out, a progress bar over the tarball's bytes on a terminal, warnings as notes on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any

from jbl.store.errors import NotFound, UsageError
from jbl.store.ingest import IngestResult, Limits, ingest
from jbl.store.store import Store
from jbl.store.units import format_size, parse_size

from . import output

MAX_WARNINGS_SHOWN = 10  # a Debian rootfs can carry dozens of setgid dirs: say how many


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("import", parents=parents, help="install a runtime from a local tarball",
                       description="Install a runtime from a local .tar, .tar.gz, .tar.zst "
                                   "(or .tar.xz/.tar.bz2). runtime.yml may sit at the archive "
                                   "root or under a single top directory.")
    p.add_argument("tarball", metavar="TARBALL", type=Path)
    p.add_argument("--name", help="install under this name instead of runtime.yml's")
    p.add_argument("--version", help="install as this version instead of runtime.yml's")
    p.add_argument("--checksum", metavar="sha256:HEX",
                   help="refuse the tarball unless its sha256 matches")
    p.add_argument("--force", action="store_true",
                   help="replace an installed NAME@VERSION (a different tarball is otherwise "
                        "refused; a job using the old copy keeps it)")
    add_limit_options(p)
    p.set_defaults(func=run)


def add_limit_options(p: argparse.ArgumentParser) -> None:
    """Limits on an untrusted tarball (store/limits.py has the defaults and their reasons)."""
    g = p.add_argument_group("limits (a tarball over any of them is refused, exit 6)")
    g.add_argument("--max-total-size", metavar="SIZE", help="sum of file sizes (default 32G)")
    g.add_argument("--max-file-size", metavar="SIZE", help="one file (default 16G)")
    g.add_argument("--max-entries", metavar="N", type=int, help="members (default 2000000)")
    g.add_argument("--max-depth", metavar="N", type=int, help="path components (default 128)")
    g.add_argument("--max-window-log", metavar="N", type=int,
                   help="zstd window, log2 bytes (default 27 = 128 MiB)")
    g.add_argument("--max-ratio", metavar="N", type=int,
                   help="decompressed/compressed bytes (default 1000)")


def limits_from_args(args: argparse.Namespace) -> Limits:
    changes: dict[str, int] = {}
    for opt, key in (("max_total_size", "max_total_size"), ("max_file_size", "max_file_size")):
        if getattr(args, opt, None) is not None:
            changes[key] = parse_size(getattr(args, opt), what=f"--{opt.replace('_', '-')}")
    for opt, key in (("max_entries", "max_entries"), ("max_depth", "max_depth"),
                     ("max_window_log", "max_window_log"), ("max_ratio", "max_compression_ratio")):
        v = getattr(args, opt, None)
        if v is not None:
            if v <= 0:
                raise UsageError(f"--{opt.replace('_', '-')} must be positive")
            changes[key] = v
    return dataclasses.replace(Limits(), **changes)


def result_record(r: IngestResult) -> dict[str, Any]:
    return {"name": r.version.name, "version": r.version.version, "created": r.created,
            "files": r.files, "logical_bytes": r.logical_bytes, "new_blobs": r.new_blobs,
            "new_stored_bytes": r.new_stored_bytes, "dedup_files": r.dedup_files,
            "dedup_bytes": r.dedup_bytes, "checksum": r.version.checksum,
            "source": r.version.source, "warnings": r.warnings}


def summary(r: IngestResult) -> str:
    if not r.created:
        return f"{r.version.spec} is already installed"
    pct = 100.0 * r.dedup_bytes / r.logical_bytes if r.logical_bytes else 0.0
    return (f"installed {r.version.spec} ({r.files} files, {format_size(r.logical_bytes)} "
            f"logical, {format_size(r.new_stored_bytes)} new on disk, {pct:.0f}% deduplicated)")


def show_warnings(args: argparse.Namespace, warnings: list[str]) -> None:
    for w in warnings[:MAX_WARNINGS_SHOWN]:
        output.note(args, f"jbl: warning: {w}")
    if len(warnings) > MAX_WARNINGS_SHOWN:
        output.note(args, f"jbl: warning: … and {len(warnings) - MAX_WARNINGS_SHOWN} more "
                          "(see --json)")


def run(args: argparse.Namespace) -> int:
    path: Path = args.tarball
    limits = limits_from_args(args)  # bad options fail before the store is touched
    if not path.exists():
        raise NotFound(f"no such tarball: {path}")
    if path.is_dir():
        raise UsageError(f"{path} is a directory; make a tarball first: jbl pack {path} -o "
                         f"{path.name}.tar.gz")
    size = os.stat(path).st_size
    with Store.open(args.store, create=True, action=args.settings.action) as store, \
            output.progress(args, size, f"importing {path.name}") as bar:
        r = ingest(store, path, source=str(path.resolve()), expected_checksum=args.checksum,
                   name=args.name, version=args.version, progress=bar.advance,
                   limits=limits, force=args.force)
    if args.json:
        output.print_json(result_record(r))
    else:
        show_warnings(args, r.warnings)
        print(summary(r))
    return 0
