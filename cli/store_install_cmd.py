"""``jbl store install / available / list / info / rm / df``: argv in, tables/JSON out.

Only parsing and printing live here; the work is in store/registry.py (resolve, download,
verify), store/ingest.py, store/report.py (sizes) and store/gc.py (removal). Registry
sources: ``--registry`` (repeatable, tried in order) or the config's ``registries:``.
Single-threaded, one Store per command.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jbl.store.access import may_open_index
from jbl.store.config import RegistrySource
from jbl.store.errors import JblError, NotInstalled, PermissionDenied, UsageError
from jbl.store.snapshot import Summary
from jbl.store.snapshot import load as load_summary
from jbl.store.store import Store, VersionInfo
from jbl.store.storepath import has_index
from jbl.store.units import format_size
from jbl.store.versions import Spec, parse_spec, sort_versions

from .output import emit, note, print_json, progress

if TYPE_CHECKING:  # the registry client pulls in httpx: only install/available need it
    from jbl.store.registry import RegistryClient

log = logging.getLogger("jbl")


# --- helpers ---------------------------------------------------------------------------------
def _when(ts: float | None) -> str:
    return "never" if ts is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def _sources(args: argparse.Namespace) -> list[RegistrySource]:
    if args.registry:
        return [RegistrySource(r, origin="--registry") for r in args.registry]
    cfg = args.settings.config
    if not cfg.registries:
        raise UsageError("no registry given: pass --registry URL|PATH|OWNER/REPO or list "
                         "`registries:` in ~/.config/jbl/config.yaml or /etc/jbl/config.yaml "
                         "(or Joblet's `runtimes:` block in ~/.rnx/config.yaml)")
    return list(cfg.registries)


def _client(args: argparse.Namespace, store_dir: Path | None) -> RegistryClient:
    from jbl.store.registry import RegistryClient, download_settings
    from jbl.store.transport import mirrors_for, transport_settings

    # The one place the download bounds are resolved: config `download:` + JBL_HTTP_TIMEOUT
    # (and where OWNER/REPO registries live: config github_raw_base, JBL_GITHUB_RAW_BASE).
    cfg = args.settings.config
    settings = download_settings(cfg.download, args.settings.env)
    return RegistryClient(store_dir, refresh=getattr(args, "refresh", False),
                          warn=lambda msg: log.warning(msg), settings=settings,
                          github_raw_base=cfg.github_raw_base,
                          user_cache=args.settings.registry_cache,
                          transport=transport_settings(cfg, args.settings.env, settings),
                          mirrors=lambda url: mirrors_for(cfg, url))


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM ends an install like Ctrl-C: as KeyboardInterrupt, so every ``finally`` runs
    (the download file closes and vanishes, locks are released, nothing is committed) and
    jbl says "interrupted" (exit 130) instead of dying mid-write."""
    def handler(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _open(args: argparse.Namespace, *, write: bool = False,
          create: bool = False) -> Store | None:
    """The store; None when there is none yet and ``create`` is False (an empty store)."""
    if not create and not has_index(args.store):  # a file, another's 0700 home: one line
        return None
    try:
        return Store.open(args.store, readonly=not (write or create), create=create,
                          action=args.settings.action)
    except PermissionError as e:
        raise PermissionDenied(f"cannot {'write' if write or create else 'read'} the store at "
                               f"{args.store}: {e.strerror}",
                               hint="run as root or pass --store DIR") from None


def _read(args: argparse.Namespace) -> Store | Summary | None:
    """What ``list``/``info``/``df`` read: the index for those who may write it, else the
    published summary (ordinary users never open the index: snapshot.py); None: no store."""
    if not has_index(args.store):
        return None
    if may_open_index(args.store):
        return _open(args)
    return load_summary(args.store)


def _specs(texts: list[str]) -> list[Spec]:
    out: list[Spec] = []
    for t in texts:
        s = parse_spec(t)
        if s not in out:
            out.append(s)
    return out


# --- install -------------------------------------------------------------------------------
def cmd_install(args: argparse.Namespace) -> int:
    from jbl.store.registry import install_entry

    specs = _specs(args.specs)
    sources = _sources(args)
    if getattr(args, "dry_run", False):  # Joblet's `runtime install` has no --dry-run
        return _dry_run(args, specs, sources)
    store = _open(args, create=True)
    assert store is not None
    results: list[dict[str, Any]] = []
    with _sigterm_interrupts(), store, _client(args, store.dir) as client:
        entries = [client.find(s, sources) for s in specs]  # resolve all before any download
        for entry in entries:
            # one bar (rich allows one live display); install_entry sets its total: the
            # bytes to fetch, or twice a tarball's size (downloaded, then read by ingest)
            with progress(args, None, f"{entry.spec}") as bar:
                out = install_entry(store, client, entry, force=args.force,
                                    download_progress=bar.advance,
                                    ingest_progress=bar.advance, total=bar.total,
                                    already=bar.already)
            results.append(out)
            if not args.json:
                print(_install_line(out))
                sys.stdout.flush()
    if args.json:
        print_json(results)
    return 0


def _dry_run(args: argparse.Namespace, specs: list[Spec],
             sources: list[RegistrySource]) -> int:
    """``install --dry-run``: what each install would fetch (as ``desync info`` says it);
    the store is only read, and only if it exists."""
    from jbl.store.casinstall import dry_run

    store = _open(args)
    out: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        if store is not None:
            stack.enter_context(store)
        client = stack.enter_context(_client(args, Path(args.store) if store else None))
        for entry in [client.find(s, sources) for s in specs]:
            have = store.get_version(entry.name, entry.version) if store else None
            r: dict[str, Any] = {"name": entry.name, "version": entry.version}
            if have is not None and not args.force:
                r["status"] = "already installed"
            elif entry.tree is not None:
                r.update(status="would fetch", form="tree",
                         **dry_run(store, client, entry, entry.tree))
            else:
                r.update(status="would download", form="tarball", fetch_bytes=entry.size)
            out.append(r)
    if args.json:
        print_json(out)
        return 0
    for r in out:
        spec = f"{r['name']}@{r['version']}"
        if r["status"] == "already installed":
            print(f"{spec} is already installed")
        elif r["form"] == "tarball":
            size = "?" if r["fetch_bytes"] is None else format_size(r["fetch_bytes"])
            print(f"{spec}: would download its tarball ({size}; the registry offers no "
                  "content-addressed form)")
        else:
            print(f"{spec}: would fetch {r['lacking']} of {r['objects']} objects in "
                  f"{r['packs']} packs and {r['single_objects']} single objects, "
                  f"{format_size(r['fetch_bytes'])} in {r['requests'] + 1} requests "
                  f"(tree included); {format_size(r['present_bytes'])} already here")
    return 0


def _install_line(r: dict[str, Any]) -> str:
    if r["status"] == "already installed":
        return f"{r['name']}@{r['version']} is already installed"
    if r.get("form") == "tree":
        return (f"{r['status']} {r['name']}@{r['version']}: {r['files']} files, "
                f"{format_size(r['logical_bytes'])} logical, "
                f"{format_size(r['fetched_bytes'])} fetched, "
                f"{format_size(r['present_bytes'])} already here ({r['requests']} requests) "
                f"in {r['seconds']:.1f}s")
    return (f"{r['status']} {r['name']}@{r['version']}: {r['files']} files, "
            f"{format_size(r['logical_bytes'])} logical, {format_size(r['new_stored_bytes'])} "
            f"new on disk ({format_size(r['dedup_bytes'])} deduplicated) in {r['seconds']:.1f}s")


# --- available -----------------------------------------------------------------------------
def cmd_available(args: argparse.Namespace) -> int:
    from jbl.store.registry import offered_summary

    sources = _sources(args)
    store_dir = Path(args.store) if Path(args.store).is_dir() else None
    rows: list[dict[str, Any]] = []
    served: set[str] = set()
    with _client(args, store_dir) as client:
        for src in sources:
            for row in offered_summary(client.load(src)):
                row["served"] = row["name"] not in served  # first registry with a name wins
                served.add(row["name"])
                rows.append(row)
    if args.json:
        print_json(rows)
        return 0
    table = [{**r, "versions": ", ".join(r["versions"]), "latest": r["latest"] or "-",
              "platforms": ", ".join(r["platforms"]) or "any",
              "registry": r["registry"] + ("" if r["served"] else " (shadowed)")} for r in rows]
    emit(args, table, [("name", "NAME"), ("versions", "VERSIONS"), ("latest", "LATEST"),
                       ("platforms", "PLATFORMS"), ("registry", "REGISTRY")],
         empty="the registry offers no runtimes")
    return 0


# --- list / info ---------------------------------------------------------------------------
def cmd_list(args: argparse.Namespace) -> int:
    from jbl.store.report import list_rows

    store = _read(args)
    if isinstance(store, Summary):
        rows = store.list_rows()
    else:
        rows = [] if store is None else list_rows(store)
        if store is not None:
            store.close()
    if args.json:
        print_json(rows)
        return 0
    table = [{**r, "logical": format_size(r["logical_bytes"]),
              "stored": format_size(r["stored_bytes"]), "installed": _when(r["installed_at"]),
              "last_used": _when(r["last_used_at"]), "pinned": "yes" if r["pinned"] else ""}
             for r in rows]
    emit(args, table, [("name", "NAME"), ("version", "VERSION"), ("files", "FILES"),
                       ("logical", "LOGICAL"), ("stored", "STORED"), ("installed", "INSTALLED"),
                       ("last_used", "LAST USED"), ("pinned", "PINNED")],
         empty="no runtimes installed (jbl store install NAME --registry URL)")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from jbl.store.report import info

    spec = parse_spec(args.spec)
    store = _read(args)
    if store is None:
        raise NotInstalled(f"runtime {spec} is not installed (the store {args.store} is empty)",
                           hint=f"install it with: jbl store install {spec}")
    if isinstance(store, Summary):
        d = store.resolve(spec)
    else:
        with store:
            d = info(store, store.resolve_installed(spec))
    if args.json:
        print_json(d)
        return 0
    lines = [
        ("name", d["name"]), ("version", d["version"]), ("description", d["description"]),
        ("files", f"{d['files']} files, {d['directories']} directories, "
                  f"{d['symlinks']} symlinks"),
        ("logical size", format_size(d["logical_bytes"])),
        ("stored size", f"{format_size(d['stored_bytes'])} (shared blobs counted fully)"),
        ("unique to it", f"{format_size(d['unique_bytes'])} (what removing it frees)"),
        ("installed", _when(d["installed_at"])), ("last used", _when(d["last_used_at"])),
        ("pinned", "yes" if d["pinned"] else "no"),
        ("in use by", "(shown to admins only)" if d["in_use_by"] is None else
         ", ".join(f"{u['kind']} {u['pid']}" for u in d["in_use_by"]) or "-"),
        ("owners", "(shown to admins only)" if d.get("owners") is None else
         ", ".join(f"{o['uid']}:{o['gid']} ({o['entries']})" for o in d["owners"])
         + " as recorded (the mount shows root:root)"),
        ("source", d["source"]), ("checksum", d["checksum"]),
    ]
    if d.get("manifest_hidden"):
        lines.append(("runtime.yml", "not shown: other users may not read it in this version"))
    for m in d["mounts"]:
        lines.append(("mount", f"{m['source']} -> {m['target']}"
                               f"{' (ro)' if m['readonly'] else ' (rw: a per-job layer)'}"
                               + ("" if m.get("present", True) else
                                  " - not in the runtime: skipped (as Joblet does)")))
    for k, v in d["environment"].items():
        lines.append(("env", f"{k}={v}"))
    for k, v in d["manifest_extra"].items():  # bounded already (report.manifest_fields)
        lines.append((k, v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)))
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        print(f"{k + ':':<{width + 1}} {v}")
    return 0


# --- rm ------------------------------------------------------------------------------------
def _to_remove(store: Store, texts: list[str]) -> tuple[list[VersionInfo], list[str]]:
    """(versions, names removed whole). ``NAME`` = all versions; ``NAME@V`` must be exact."""
    chosen: list[VersionInfo] = []
    whole: list[str] = []
    for text in texts:
        spec = parse_spec(text)
        have = store.versions(spec.name)
        if not have:
            raise NotInstalled(f"runtime {spec.name} is not installed")
        if "@" not in text:
            whole.append(spec.name)
            picked = have
        elif spec.version is None:  # NAME@latest: only the highest release installed
            picked = [store.resolve_installed(spec)]
        else:
            v = store.get_version(spec.name, spec.version)
            if v is None:
                raise NotInstalled(f"{spec} is not installed", hint="installed versions: "
                                   + ", ".join(sort_versions(x.version for x in have))
                                   + "; rm needs an exact version")
            picked = [v]
        chosen += [v for v in picked if v.id not in {c.id for c in chosen}]
    return chosen, whole


def cmd_rm(args: argparse.Namespace) -> int:
    from jbl.store.gc import remove_versions

    store = _open(args, write=True)
    if store is None:
        raise NotInstalled(f"nothing is installed in {args.store}")
    with store:
        infos, whole = _to_remove(store, args.specs)
        if whole and not args.yes and sys.stdin.isatty() and sys.stderr.isatty():
            listing = ", ".join(v.spec for v in infos)
            print(f"remove {len(infos)} version(s): {listing}? [y/N] ", end="", file=sys.stderr,
                  flush=True)
            if sys.stdin.readline().strip().lower() not in ("y", "yes"):
                raise JblError("aborted: nothing removed")
        res = remove_versions(store, infos)
    if args.json:
        print_json({"removed": res.removed, "deferred": res.deferred,
                    "freed_bytes": res.freed_bytes, "swept": res.swept})
        return 0
    for spec in res.removed:
        print(f"removed {spec}")
    for spec in res.deferred:
        print(f"removed {spec} (still in use: hidden now, freed when its last user ends)")
    if res.swept:
        note(args, f"freed {format_size(res.freed_bytes)}")
    else:
        note(args, "the store is busy; the next `jbl store gc` frees the space")
    return 0


# --- df ------------------------------------------------------------------------------------
def cmd_df(args: argparse.Namespace) -> int:
    from jbl.store.report import disk_usage

    store = _read(args)
    if store is None:
        d: dict[str, Any] = {"runtimes": 0, "versions": 0, "logical_bytes": 0,
                             "physical_bytes": 0, "ratio": None, "per_runtime": []}
        if args.json:
            print_json(d)
        else:
            print(f"no runtimes installed in {args.store}")
        return 0
    if isinstance(store, Summary):
        d = store.df
    else:
        with store:
            d = disk_usage(store)
    if args.json:
        print_json(d)
        return 0
    ratio = "-" if d["ratio"] is None else f"{d['ratio']:.2f}x"
    rows = [
        ("logical", format_size(d["logical_bytes"]),
         f"{d['versions']} version{'s' * (d['versions'] != 1)} of {d['runtimes']} "
         f"runtime{'s' * (d['runtimes'] != 1)}, extracted"),
        ("physical", format_size(d["physical_bytes"]),
         f"on disk: {d['blob_files']} blob files {format_size(d['blob_allocated_bytes'])}"
         f" + index {format_size(d['index_bytes'])}"),
        ("ratio", ratio, f"physical / logical (saves {format_size(d['saved_bytes'])})"),
    ]
    if d["unreferenced_bytes"]:
        rows.append(("garbage", format_size(d["unreferenced_bytes"]),
                     "referenced by no version: `jbl store gc` frees it"))
    w = max(len(r[1]) for r in rows)
    for label, size, what in rows:
        print(f"{label:<9} {size:>{w}}  {what}")
    if d.get("removed_held"):
        from jbl.store.report import held_line

        for h in d["removed_held"]:
            print(f"held      {held_line(h)}")
    if d["per_runtime"]:
        print()
        emit(args, [{**r, "logical": format_size(r["logical_bytes"]),
                     "unique": format_size(r["unique_bytes"])} for r in d["per_runtime"]],
             [("name", "RUNTIME"), ("versions", "VERSIONS"), ("logical", "LOGICAL"),
              ("unique", "ALONE HOLDS")])
    return 0


# --- argv ----------------------------------------------------------------------------------
def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    def registry_opts(p: argparse.ArgumentParser) -> None:
        p.add_argument("--registry", action="append", metavar="URL|PATH",
                       help="registry.json, or a directory/URL holding one, or a GitHub "
                            "OWNER/REPO (repeatable; default: the config's registries)")
        p.add_argument("--refresh", action="store_true",
                       help="refetch registry indexes instead of using the 1 h cache")

    p = sub.add_parser("install", parents=parents, help="install runtimes from a registry",
                       description="Install NAME (highest release), NAME@1.3 (highest 1.3.x) "
                                   "or NAME@1.3.2 from a registry.")
    p.add_argument("specs", nargs="+", metavar="NAME[@VERSION]")
    p.add_argument("--force", action="store_true",
                   help="reinstall even if installed, replacing the installed copy (a job "
                        "using it keeps its files)")
    p.add_argument("--dry-run", action="store_true",
                   help="print what would be fetched (objects, packs, bytes); change nothing")
    registry_opts(p)
    p.set_defaults(func=cmd_install)

    p = sub.add_parser("available", parents=parents, help="what the registries offer")
    registry_opts(p)
    p.set_defaults(func=cmd_available)

    p = sub.add_parser("list", parents=parents, help="installed runtime versions")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("info", parents=parents, help="details of one installed version")
    p.add_argument("spec", metavar="NAME[@VERSION]")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("rm", parents=parents, help="remove installed versions",
                       description="Remove NAME@VERSION, or every version of NAME (asks on a "
                                   "terminal unless --yes).")
    p.add_argument("specs", nargs="+", metavar="NAME[@VERSION]")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("df", parents=parents,
                       help="disk use: logical vs physical, and what each runtime alone holds")
    p.set_defaults(func=cmd_df)
