"""What the store holds and what it costs: the numbers behind ``list``, ``info`` and ``df``.

Definitions (used in the CLI and docs/registry.md; keep them true):

* logical bytes of a version: the sum of its regular files' sizes (``versions.logical_size``),
  what the tree takes extracted.
* stored bytes of a version: the on-disk (``blobs.stored_size``) bytes of every distinct blob
  its files reference; shared blobs count fully for each version that uses them. Cached in
  ``versions.stored_size`` by ``record_stored_size`` after an install (immutable after).
* bytes unique to a version / a runtime: the stored bytes of the blobs referenced ONLY by that
  version / by versions of that runtime: what removing it would free. Every version row
  counts as a referrer, including 'removed' ones a live job or mount still holds.
* physical bytes (``df``): the blob files as ``du`` counts them (allocated blocks) + the
  index files (``index.db`` and its WAL/SHM).

All functions but ``record_stored_size`` only read; nothing counts references (a scan each
time, see schema.py). Same thread rule as the Store they are given.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections import defaultdict
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from typing import Any

from .db import INDEX_NAME
from .manifest import jsonable, parse_manifest, source_present
from .store import Store, VersionInfo

# (version_id, blob_id) pairs, each once: the blobs a version references.
_VERSION_BLOBS = """
SELECT DISTINCT e.version_id AS version_id, c.blob_id AS blob_id
FROM entries e JOIN chunks c ON c.content_id = e.content_id
WHERE e.content_id IS NOT NULL {where}
"""


def stored_by_version(store: Store, version_id: int | None = None) -> dict[int, int]:
    """version id -> stored bytes of the distinct blobs it references."""
    where, params = ("AND e.version_id = ?", (version_id,)) if version_id is not None else ("", ())
    rows = store.db.query(
        f"SELECT vb.version_id, SUM(b.stored_size) FROM ({_VERSION_BLOBS.format(where=where)}) vb "
        "JOIN blobs b ON b.id = vb.blob_id GROUP BY vb.version_id", params)
    return {r[0]: int(r[1] or 0) for r in rows}


def unique_to_version(store: Store, version_id: int) -> int:
    """Stored bytes of the blobs no other version row references."""
    return int(store.db.scalar(
        f"SELECT COALESCE(SUM(b.stored_size), 0) FROM "
        f"({_VERSION_BLOBS.format(where='AND e.version_id = ?1')}) vb "
        "JOIN blobs b ON b.id = vb.blob_id WHERE NOT EXISTS ("
        "  SELECT 1 FROM chunks c2 JOIN entries e2 ON e2.content_id = c2.content_id"
        "  WHERE c2.blob_id = vb.blob_id AND e2.version_id <> ?1)", (version_id,)) or 0)


@dataclass
class Sharing:
    """One scan over every referenced blob: who holds it alone."""

    by_version: dict[int, int] = field(default_factory=dict)  # version id -> unique bytes
    by_runtime: dict[str, int] = field(default_factory=dict)  # name -> unique bytes
    referenced_blobs: int = 0
    referenced_bytes: int = 0


def sharing(store: Store) -> Sharing:
    s = Sharing()
    by_version: dict[int, int] = defaultdict(int)
    by_runtime: dict[str, int] = defaultdict(int)
    rows = store.db.iter(
        "SELECT b.stored_size, MIN(e.version_id), MAX(e.version_id), MIN(v.name), MAX(v.name) "
        "FROM entries e JOIN chunks c ON c.content_id = e.content_id "
        "JOIN versions v ON v.id = e.version_id JOIN blobs b ON b.id = c.blob_id "
        "WHERE e.content_id IS NOT NULL GROUP BY c.blob_id")
    for size, vmin, vmax, nmin, nmax in rows:
        s.referenced_blobs += 1
        s.referenced_bytes += size
        if vmin == vmax:
            by_version[vmin] += size
        if nmin == nmax:
            by_runtime[nmin] += size
    s.by_version, s.by_runtime = dict(by_version), dict(by_runtime)
    return s


def record_stored_size(store: Store, version_id: int) -> int:
    """Compute a version's stored bytes and cache them in ``versions.stored_size``.

    Called right after an install commits, so ``list`` reads one column instead of scanning
    every entry of every version (1,000 versions x 1,000 files: 1.3 s -> milliseconds).
    """
    size = stored_by_version(store, version_id).get(version_id, 0)
    with store.db.write():
        store.db.execute("UPDATE versions SET stored_size = ? WHERE id = ?", (size, version_id))
    return size


def stored_sizes(store: Store, version_id: int | None = None) -> dict[int, int]:
    """version id -> stored bytes: the cached column, computed (not saved) where it is NULL."""
    out: dict[int, int] = {}
    sql = "SELECT id, stored_size FROM versions"
    params: tuple[int, ...] = ()
    if version_id is not None:
        sql, params = sql + " WHERE id = ?", (version_id,)
    for vid, size in store.db.query(sql, params):
        out[vid] = size if size is not None else stored_by_version(store, vid).get(vid, 0)
    return out


# --- list / info -----------------------------------------------------------------------------
LIST_KEYS = ("name", "version", "files", "logical_bytes", "stored_bytes", "installed_at",
             "last_used_at", "pinned")  # a list row: also a subset of every info dict


def list_rows(store: Store) -> list[dict[str, Any]]:
    stored = stored_sizes(store)
    return [{"name": v.name, "version": v.version, "files": v.file_count,
             "logical_bytes": v.logical_size, "stored_bytes": stored.get(v.id, 0),
             "installed_at": v.installed_at, "last_used_at": v.last_used_at,
             "pinned": v.pinned} for v in store.versions()]


def manifest_fields(v: VersionInfo, missing: Collection[str] = ()
                    ) -> tuple[list[dict[str, Any]], dict[str, str], dict[str, Any]]:
    """(mounts, environment, other fields) of a version's runtime.yml, as info shows them:
    each mount with ``present`` (False: a source the runtime lacks, in ``missing``, that
    jobs skip), the other fields as bounded JSON data (``manifest.jsonable``)."""
    try:
        m = parse_manifest(v.manifest_text)
        mounts = [{**asdict(x), "present": x.source not in missing} for x in m.mounts]
        return mounts, dict(m.environment), {k: jsonable(x) for k, x in m.extra.items()}
    except Exception:  # an index from an older jbl with laxer rules: show what we have
        return [], {}, {}


def missing_sources(store: Store, v: VersionInfo) -> list[str]:
    """The mount sources of ``v``'s runtime.yml that its tree lacks (jobs skip them)."""
    try:
        m = parse_manifest(v.manifest_text)
    except Exception:  # as manifest_fields: nothing to say about a manifest we cannot read
        return []

    def lookup(parent: int, name: str) -> tuple[int, str, str] | None:
        row = store.db.one("SELECT id, kind, target FROM entries WHERE version_id = ? AND "
                           "parent_id = ? AND name = ?", (v.id, parent, name.encode()))
        if row is None:
            return None
        kind = {stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink"}.get(row[1], "file")
        return row[0], kind, bytes(row[2] or b"").decode("utf-8", "replace")

    return [x.source for x in m.mounts if not source_present(lookup, v.root_id, x.source)]


def entry_kinds(store: Store, version_id: int | None = None) -> dict[int, dict[int, int]]:
    """version id -> {file type: count} of the entries *in* each version (or one version).

    The runtime's own directory (and any top directory above it) is not "in" it.
    """
    where, params = ("AND e.version_id = ?", (version_id,)) if version_id is not None else ("", ())
    out: dict[int, dict[int, int]] = defaultdict(dict)
    for vid, kind, n in store.db.query(
            "SELECT e.version_id, e.kind, COUNT(*) FROM entries e JOIN versions v "
            "ON v.id = e.version_id WHERE e.parent_id IS NOT NULL AND e.id <> v.root_id "
            f"{where} GROUP BY e.version_id, e.kind", params):
        out[vid][kind] = n
    return dict(out)


def version_facts(v: VersionInfo, *, kinds: dict[int, int], stored: int,
                  unique: int, missing: Collection[str] = ()) -> dict[str, Any]:
    """What ``info`` shows of one version apart from its live users: one place for the keys,
    shared by the live report and the published summary (snapshot.py). ``missing``: its
    mount sources the tree lacks (``missing_sources``)."""
    mounts, env, extra = manifest_fields(v, missing)
    return {
        "name": v.name, "version": v.version, "description": v.description,
        "mounts": mounts, "environment": env, "manifest_extra": extra,
        "files": v.file_count, "directories": kinds.get(stat.S_IFDIR, 0),
        "symlinks": kinds.get(stat.S_IFLNK, 0),
        "logical_bytes": v.logical_size,
        "stored_bytes": stored,
        "unique_bytes": unique,
        "installed_at": v.installed_at, "last_used_at": v.last_used_at,
        "source": v.source, "checksum": v.checksum, "pinned": v.pinned,
        "manifest": v.manifest_text,
    }


def info(store: Store, v: VersionInfo) -> dict[str, Any]:
    users = [lease for lease in store.live_leases() if lease[1] == v.id]
    d = version_facts(v, kinds=entry_kinds(store, v.id).get(v.id, {}),
                      stored=stored_sizes(store, v.id).get(v.id, 0),
                      unique=unique_to_version(store, v.id),
                      missing=missing_sources(store, v))
    d["in_use_by"] = [{"kind": kind, "pid": pid} for _, _, kind, pid in users]
    d["owners"] = recorded_owners(store, v.id)
    return d


def recorded_owners(store: Store, version_id: int) -> list[dict[str, int]]:
    """The uid:gid pairs the tarball gave the version's entries, most used first. They are
    kept as recorded; the mount shows every file as root's (fusefs/tree.py, OWNER_UID)."""
    return [{"uid": uid, "gid": gid, "entries": n} for uid, gid, n in store.db.query(
        "SELECT uid, gid, COUNT(*) FROM entries WHERE version_id = ? GROUP BY uid, gid "
        "ORDER BY COUNT(*) DESC, uid, gid", (version_id,))]


# --- df --------------------------------------------------------------------------------------
def _du(path: str) -> tuple[int, int, int]:
    """(files, apparent bytes, allocated bytes) of the regular files under ``path``."""
    n = size = alloc = 0
    stack = [path]
    while stack:
        try:
            it = os.scandir(stack.pop())
        except OSError:
            continue
        with it:
            for d in it:
                try:
                    if d.is_dir(follow_symlinks=False):
                        stack.append(d.path)
                    elif d.is_file(follow_symlinks=False):
                        st = d.stat(follow_symlinks=False)
                        n, size, alloc = n + 1, size + st.st_size, alloc + st.st_blocks * 512
                except OSError:
                    continue  # a blob unlinked by a concurrent gc
    return n, size, alloc


def disk_usage(store: Store, share: Sharing | None = None) -> dict[str, Any]:
    installed = store.versions()
    logical = sum(v.logical_size for v in installed)
    share = sharing(store) if share is None else share
    blob_rows, blob_row_bytes = store.db.one(
        "SELECT COUNT(*), COALESCE(SUM(stored_size), 0) FROM blobs") or (0, 0)
    files, apparent, allocated = _du(str(store.blobs.root))
    index_bytes = 0
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            index_bytes += os.stat(store.dir / (INDEX_NAME + suffix)).st_size
    physical = allocated + index_bytes
    per_runtime: dict[str, dict[str, Any]] = {}
    for v in installed:
        r = per_runtime.setdefault(v.name, {"name": v.name, "versions": 0, "logical_bytes": 0,
                                            "unique_bytes": share.by_runtime.get(v.name, 0)})
        r["versions"] += 1
        r["logical_bytes"] += v.logical_size
    removed = store.db.scalar("SELECT COUNT(*) FROM versions WHERE state = 'removed'") or 0
    return {
        "runtimes": len(per_runtime), "versions": len(installed),
        "logical_bytes": logical,
        "physical_bytes": physical,
        "blob_files": files, "blob_bytes": apparent, "blob_allocated_bytes": allocated,
        "index_bytes": index_bytes,
        "ratio": (physical / logical) if logical else None,
        "saved_bytes": max(logical - physical, 0),
        "referenced_blobs": share.referenced_blobs,
        "referenced_bytes": share.referenced_bytes,
        # rows nothing references and files without rows: what `jbl store gc` would sweep
        "unreferenced_blobs": max(blob_rows - share.referenced_blobs, 0),
        "unreferenced_bytes": max(blob_row_bytes - share.referenced_bytes, 0)
        + max(apparent - blob_row_bytes, 0),
        "removed_in_use_versions": removed,
        "removed_held": removed_held(store),
        "per_runtime": sorted(per_runtime.values(), key=lambda r: -r["unique_bytes"]),
    }


def removed_held(store: Store) -> list[dict[str, Any]]:
    """Removed versions a live lease still keeps from gc, each with who holds it: ``kind``
    and ``holder_pid`` of the lease, and for a mount the ``uid``/``pid`` of the last request
    it saw for the version (None when unknown). A mount lets go at ``removed_hold_limit``."""
    return [{"version": f"{n}@{v}", "removed_at": at, "kind": kind, "holder_pid": hpid,
             "uid": uid, "pid": pid}
            for n, v, at, kind, hpid, uid, pid in store.removed_holders()]


def held_line(h: dict[str, Any]) -> str:
    """One line for a ``removed_held`` item, for people."""
    import datetime as dt
    import pwd

    when = dt.datetime.fromtimestamp(h["removed_at"]).isoformat(sep=" ", timespec="minutes")
    if h["uid"] is not None:
        try:
            user = f"{pwd.getpwuid(h['uid']).pw_name} (uid {h['uid']})"
        except KeyError:
            user = f"uid {h['uid']}"
        who = f"{user}, pid {h['pid']}, through the mount of pid {h['holder_pid']}"
    else:
        who = f"the {h['kind']} of pid {h['holder_pid']}"
    return f"{h['version']} (removed {when}) is still held by {who}"
