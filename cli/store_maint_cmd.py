"""``jbl store gc | verify | pin | unpin``: keeping the store's disk use in check and its data true.

Argument parsing and printing only; the work is in ``store/gc.py``, ``store/policy.py`` and
``store/verify.py``. Single-threaded.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from jbl.store import access
from jbl.store import gc as gc_mod
from jbl.store import policy as policy_mod
from jbl.store import recompress as recompress_mod
from jbl.store import verify as verify_mod
from jbl.store.blobs import COLD_LEVEL, ZSTD_LEVEL
from jbl.store.errors import IntegrityError, UsageError
from jbl.store.store import Store
from jbl.store.units import format_size, parse_duration

from . import output

_POLICY_OPTS = ("keep_latest", "unused_for", "max_size", "grace")
DEFAULT_MIN_AGE = "1d"  # installs of the day stay at the fast level: they may be replaced
DEFAULT_MAX_TIME = "1h"  # a cron run's bound: ~10 GB decoded per core at level 19 (3 MB/s)


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "gc", parents=parents, help="remove versions by retention policy; free unused blobs",
        description="Remove the versions a retention policy selects (never pinned ones, never "
                    "ones a running job or mount uses), then delete every blob no remaining "
                    "version references. Without policy options it only sweeps. Options "
                    "override the config file's gc: section (keep_latest, unused_for, "
                    "max_size, grace).")
    p.add_argument("--dry-run", action="store_true", help="show what would go; change nothing")
    p.add_argument("--keep-latest", metavar="N", help="keep the N highest versions per runtime")
    p.add_argument("--unused-for", metavar="DURATION",
                   help="remove versions not used (or installed) within DURATION, e.g. 30d")
    p.add_argument("--max-size", metavar="SIZE",
                   help="remove least recently used versions until the store fits in SIZE")
    p.add_argument("--grace", metavar="DURATION",
                   help="leave orphan blob/temp files younger than this (default 1h)")
    p.add_argument("--recompress", action="store_true",
                   help="after the sweep, rewrite zstd blobs stored longer than --min-age at "
                        "a higher zstd level (smaller; resumable; skips blobs in use)")
    p.add_argument("--min-age", metavar="DURATION", default=DEFAULT_MIN_AGE,
                   help=f"--recompress: only blobs stored at least this long "
                        f"(default {DEFAULT_MIN_AGE})")
    p.add_argument("--level", metavar="N", default=str(COLD_LEVEL),
                   help=f"--recompress: the zstd level, 2-22 (default {COLD_LEVEL}; installs "
                        f"write level {ZSTD_LEVEL})")
    p.add_argument("--max-time", metavar="DURATION", default=DEFAULT_MAX_TIME,
                   help="--recompress: stop after about this long; the next run resumes "
                        f"(default {DEFAULT_MAX_TIME})")
    p.set_defaults(func=cmd_gc)

    p = sub.add_parser("verify", parents=parents, help="check the index against the blob files",
                       description="Check that every blob the index names is present with the "
                                   "right size, that every reference resolves and that no old "
                                   "orphan files lie around. Exit 5 if anything is wrong.")
    p.add_argument("--data", action="store_true",
                   help="also re-read and re-hash every blob (reads the whole store)")
    p.add_argument("--repair", action="store_true",
                   help="rewrite damaged blobs from the versions' recorded source tarballs "
                        "(implies --data: a blob is only known good once re-hashed)")
    p.add_argument("--grace", metavar="DURATION",
                   help="orphan files younger than this are not problems (default 1h)")
    p.set_defaults(func=cmd_verify)

    for name, pinned in (("pin", True), ("unpin", False)):
        p = sub.add_parser(name, parents=parents,
                           help="protect a version from gc" if pinned else "undo pin",
                           description=("A pinned version is never removed by gc policies."
                                        if pinned else "Let gc policies remove the version."))
        p.add_argument("spec", metavar="NAME@VERSION")
        p.set_defaults(func=cmd_pin, pinned=pinned)


def _policy(args: argparse.Namespace) -> policy_mod.Policy:
    cfg = args.settings.config
    origin = str(cfg.files[-1]) if cfg.files else "config"
    base = policy_mod.policy_from_config(cfg.gc, origin)
    given = [k for k in _POLICY_OPTS if getattr(args, k, None) is not None]
    values: dict[str, Any] = {k: getattr(args, k, None) for k in _POLICY_OPTS}  # str or None
    cli = policy_mod.parse_policy(**values)
    return policy_mod.merge(base, cli, given)


def _when(ts: float | None) -> str:
    return "never" if ts is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def cmd_gc(args: argparse.Namespace) -> int:
    policy = _policy(args)
    cold = _cold_args(args)
    if not args.dry_run:
        access.require_admin("gc", args.store)
    from jbl.store.report import held_line, removed_held

    with Store.open(args.store) as store:
        res = gc_mod.collect(store, policy, dry_run=args.dry_run)
        held = removed_held(store)  # what gc could not free, and who keeps it
        cold_out = _recompress(store, args.dry_run, *cold) if cold else None
    deferred = set(res.deferred)
    rows = [{"version": s.info.spec, "reason": s.reason,
             "last_used": _when(s.info.last_used_at), "installed": _when(s.info.installed_at),
             "status": "deferred (in use)" if s.info.spec in deferred
             else ("would remove" if res.dry_run else "removed")} for s in res.selected]
    sw = res.sweep
    if args.json:
        output.print_json({
            "dry_run": res.dry_run, "policy": res.policy, "versions": rows,
            "removed": res.removed, "deferred": res.deferred, "in_use": res.in_use,
            "removed_held": held,
            "purged": sw.purged,
            "contents": sw.contents, "blobs": sw.blobs, "orphans": sw.orphans,
            "temp_files": sw.temp_files, "freed_bytes": sw.freed_bytes,
            **({"recompress": cold_out[0]} if cold_out else {})})
        return 0
    output.emit(args, rows, [("version", "VERSION"), ("status", "STATUS"),
                             ("last_used", "LAST USED"), ("reason", "REASON")])
    verb = "would free" if res.dry_run else "freed"
    parts = [f"{len(res.removed)} versions {'to remove' if res.dry_run else 'removed'}"]
    if res.deferred:
        parts.append(f"{len(res.deferred)} in use (freed by a later gc once unused)")
    if sw.purged:
        parts.append(f"{len(sw.purged)} earlier removed versions no longer in use dropped")
    parts.append(f"{sw.blobs} blobs" + (f" + {sw.orphans + sw.temp_files} orphan files"
                                         if sw.orphans or sw.temp_files else ""))
    print(f"gc ({res.policy}): {', '.join(parts)}; {verb} {format_size(sw.freed_bytes)}")
    if res.in_use:
        print(f"kept while in use by a job or a mount: {', '.join(res.in_use)} "
              "(a later gc takes them once released)")
    for h in held:
        print(f"removed but held: {held_line(h)}")
    if cold_out:
        print(cold_out[1])
    return 0


def _cold_args(args: argparse.Namespace) -> tuple[float, float, int] | None:
    """(min_age, max_time, level) of --recompress, parsed before anything is touched."""
    if not args.recompress:
        return None
    level = int(args.level) if str(args.level).isdigit() else 0
    if not ZSTD_LEVEL < level <= 22:
        raise UsageError(f"invalid --level {args.level!r}: expected a zstd level from "
                         f"{ZSTD_LEVEL + 1} to 22 (installs already write level {ZSTD_LEVEL})")
    return (parse_duration(args.min_age, what="--min-age"),
            parse_duration(args.max_time, what="--max-time"), level)


def _recompress(store: Store, dry_run: bool, min_age: float, max_time: float,
                level: int) -> tuple[dict[str, object], str]:
    """The cold pass after the sweep (store/recompress.py): its JSON and its summary line."""
    if dry_run:
        n, stored = recompress_mod.pending(store, min_age)
        return ({"dry_run": True, "candidates": n, "stored_bytes": stored},
                f"recompress: {n} blobs ({format_size(stored)}) older than the minimum age "
                f"would be rewritten at zstd level {level}")
    r = recompress_mod.recompress(store, min_age=min_age, max_time=max_time, level=level)
    left = (f"; {r.remaining} left for the next run" if r.remaining else "; all done") + (
        " (the store stayed busy with installs)" if r.busy else "")
    extra = "".join(f", {n} {what}" for n, what in (
        (r.in_use, "in use (skipped)"), (r.damaged, "damaged (run `jbl store verify`)"),
        (r.finished, "finished from an interrupted run")) if n)
    return (dict(vars(r)),
            f"recompress: {r.rewritten} blobs rewritten at zstd level {level}, "
            f"{r.settled} kept (not smaller){extra}; saved {format_size(r.saved_bytes)}{left}")


def cmd_verify(args: argparse.Namespace) -> int:
    grace = _policy(args).grace
    # A repair that did not re-hash would call a corrupt blob of the right size "OK".
    args.data = args.data or args.repair
    if args.repair:
        access.require_admin("verify --repair", args.store)
    index = args.store / "index.db"
    if index.exists() and not access.may_open_index(args.store):
        # verify reads the index and every blob; neither is open to ordinary users (the
        # summary they read has no per-file rows to check), so say so in one line.
        access.require_admin("verify", args.store)
    readonly = index.exists() and not os.access(index, os.W_OK)
    with Store.open(args.store, readonly=readonly and not args.repair) as store:
        total = 0
        if args.data:
            total = int(store.db.scalar("SELECT COALESCE(SUM(size), 0) FROM blobs"))
        with output.progress(args, total if args.data else None, "verify") as bar:
            res = verify_mod.verify(store, data=args.data, grace=grace, progress=bar.advance)
        repaired: list[str] = []
        if args.repair and not res.ok:
            from jbl.store import repair as repair_mod

            from .store_install_cmd import _client  # the download bounds, resolved once
            with _client(args, None) as client:
                rep = repair_mod.repair(store, res.problems, client)
            repaired = rep.lines
            res = verify_mod.verify(store, data=args.data, grace=grace)
    if args.json:
        output.print_json({"ok": res.ok, "summary": res.summary(), "data": res.data,
                           "problems": [{"kind": p.kind, "subject": p.subject,
                                         "message": p.message, "versions": list(p.versions)}
                                        for p in res.problems],
                           "repair": repaired,
                           "counts": {"versions": res.versions, "entries": res.entries,
                                      "contents": res.contents, "blobs": res.blobs,
                                      "bytes_hashed": res.bytes_hashed}})
    else:
        for line in repaired:
            print(line)
        for p in res.problems:
            print(p.line())
    if not res.ok:
        raise IntegrityError(res.summary(), hint="`jbl store verify --repair` reinstalls "
                             "damaged blobs when the source is still available")
    if not args.json and not args.quiet:
        print(res.summary())
    return 0


def cmd_pin(args: argparse.Namespace) -> int:
    access.require_admin("pin" if args.pinned else "unpin", args.store)
    with Store.open(args.store) as store:
        info = gc_mod.set_pinned(store, args.spec, args.pinned)
    if args.json:
        output.print_json({"version": info.spec, "pinned": args.pinned})
    else:
        output.note(args, f"{info.spec} {'pinned' if args.pinned else 'unpinned'}")
    return 0
