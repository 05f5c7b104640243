"""Installing a version from its content-addressed form (store/casformat.py).

``install_tree`` fetches the version's tree (checked against the digest in registry.json),
works out which of its objects the store lacks (by digest, among committed blob rows),
fetches only those — whole packs or single objects by ``casformat.plan_fetch``, never a
range, through the registry client's Fetcher (store/transport.py: mirrors, then the origin,
concurrently, with its failure sequence for bad copies) — checks each against its digest
before writing it, writes blobs exactly as ingest
does (``BlobStore.write``: O_TMPFILE + linkat; one ``syncfs``), checks runtime.yml as ingest
does, and commits blobs, contents, chunks, entries and the version row in ONE transaction
through store/rows.py, with the very values a tarball install of the same version records
(``source`` and ``checksum`` are the entry's tarball's).

Durability and resumption: the install lock is held from the first look at the index to the
commit (gc cannot sweep what was found). Objects written but not committed are blob files
without rows: the next try re-uses each that still decodes to its digest instead of fetching
it again, and gc's orphan rule sweeps them after its grace if no try comes. A failure that
the next try can get past (the network, an interruption) keeps them; any other (a hostile or
broken tree) removes them as ingest does (``discard_uncommitted``).

Untrusted input: the tree is bounded and checked by ``casformat.parse_tree``; every object is
decoded and hashed before it is written; a multi-chunk body's digest (file-level dedup's key)
is recomputed from its chunks before a row names it, so a tree cannot poison later dedup.
Thread-safety: one Store, from the calling thread.
"""

from __future__ import annotations

import hashlib
import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from . import casformat as cf
from . import rows
from .blobs import is_enospc
from .crashpoints import crashpoint
from .db import DB
from .errors import IntegrityError, RegistryError, StoreError, UnsafeArchive
from .ingest import check_architecture, discard_uncommitted, retire
from .limits import Limits
from .manifest import MANIFEST_NAME, parse_manifest, source_present
from .regformat import RegistryEntry, TreeRef
from .registry import RegistryClient
from .store import Store, VersionInfo
from .transport import Check, Fetcher

Progress = Callable[[int], None]
_BATCH = 500  # digests per IN (...) query
_WORKERS = 2  # check + write threads (two cores; the fetcher has its own)
_INFLIGHT = 8  # fetched files (packs <= 4 MiB, objects <= 1 MiB) held before writing


# ------------------------------------------------------------------------------ fetching
def fetch_tree(fetcher: Fetcher, entry: RegistryEntry, ref: TreeRef) -> cf.Tree:
    """The entry's tree, checked against registry.json's digest and against the entry."""
    data = fetcher.get(cf.tree_path(ref.sha256), check=cf.named_by(ref.sha256),
                       max_size=ref.size)
    tree = cf.parse_tree(data, Limits())
    if (tree.name, tree.version, tree.checksum) != (entry.name, entry.version, entry.checksum):
        raise IntegrityError(f"{entry.spec}: its tree names {tree.name}@{tree.version} "
                             f"({tree.checksum}), not the registry's entry")
    return tree


# ------------------------------------------------------------------------------ planning
@dataclass
class Survey:
    """What the store holds of a tree: object index -> codec of the blob file on disk."""
    committed: dict[int, int] = field(default_factory=dict)
    reusable: dict[int, int] = field(default_factory=dict)  # verified orphans of a past try

    def present_bytes(self, tree: cf.Tree) -> int:
        return sum(tree.objects[i].size for i in (*self.committed, *self.reusable))


def _by_digest(db: DB, table: str, cols: str, digests: list[bytes]) -> dict[bytes, tuple[int, ...]]:
    out: dict[bytes, tuple[int, ...]] = {}
    for at in range(0, len(digests), _BATCH):
        part = digests[at:at + _BATCH]
        for row in db.query(f"SELECT digest, {cols} FROM {table} WHERE digest IN "
                            f"({','.join('?' * len(part))})", tuple(part)):
            out[bytes(row[0])] = tuple(row[1:])
    return out


def survey(store: Store | None, tree: cf.Tree) -> Survey:
    s = Survey()
    if store is None:
        return s
    have = _by_digest(store.db, "blobs", "codec", [o.digest for o in tree.objects])
    for i, o in enumerate(tree.objects):
        if o.digest in have:
            s.committed[i] = have[o.digest][0]
        elif store.blobs.exists(o.digest):
            try:
                if cf.check_object(o, store.blobs.read_stored(o.digest, o.stored_size)):
                    s.reusable[i] = o.codec
            except (OSError, IntegrityError):
                continue  # not usable: fetched again and written over
    return s


def dry_run(store: Store | None, client: RegistryClient, entry: RegistryEntry,
            ref: TreeRef) -> dict[str, object]:
    """What installing ``entry`` would fetch; changes nothing."""
    with client.fetcher(entry.registry) as fetcher:
        tree = fetch_tree(fetcher, entry, ref)
    s = survey(store, tree)
    lacking = set(range(len(tree.objects))) - set(s.committed) - set(s.reusable)
    plan = cf.plan_fetch(tree, lacking)
    return {"objects": len(tree.objects), "lacking": len(lacking), "packs": len(plan.packs),
            "single_objects": len(plan.singles),
            "requests": plan.requests, "fetch_bytes": plan.fetch_bytes,
            "present_bytes": s.present_bytes(tree), "tree_bytes": ref.size}


# ------------------------------------------------------------------------------ installing
@dataclass
class CasResult:
    created: bool
    version: VersionInfo | None = None  # set once committed (or the one found installed)
    files: int = 0
    logical_bytes: int = 0
    new_blobs: int = 0
    new_stored_bytes: int = 0
    dedup_files: int = 0
    dedup_bytes: int = 0
    fetched_bytes: int = 0
    present_bytes: int = 0
    requests: int = 0
    warnings: list[str] = field(default_factory=list)


def install_tree(store: Store, client: RegistryClient, entry: RegistryEntry, ref: TreeRef, *,
                 force: bool = False, progress: Progress | None = None,
                 total: Callable[[int | None], None] | None = None,
                 already: Callable[[int], None] | None = None) -> CasResult | None:
    """Install ``entry`` from its tree; None when the caller is to install the tarball: the
    tree's chunk size is not the store's (its objects would not be this store's blobs), or
    every source answered that the tree is not there (a registry.json naming a tree that was
    never uploaded, or that a source lacks: one warning; a source that is down is exit 7)."""
    with client.fetcher(entry.registry) as fetcher:
        try:
            tree = fetch_tree(fetcher, entry, ref)
        except RegistryError as e:
            if fetcher.any_down:
                raise
            client.warn(f"{entry.spec}: its content-addressed form is not served ({e}); "
                        "installing its tarball instead")
            return None
        return _install(store, fetcher, entry, tree, force, progress, total, already)


def _install(store: Store, fetcher: Fetcher, entry: RegistryEntry, tree: cf.Tree, force: bool,
             progress: Progress | None,
             total: Callable[[int | None], None] | None,
             already: Callable[[int], None] | None) -> CasResult | None:
    if tree.chunk_size != store.chunk_size:
        return None
    written: list[bytes] = []
    try:
        with store.install_lock():
            s = survey(store, tree)
            codecs = {**s.committed, **s.reusable}
            plan = cf.plan_fetch(tree, set(range(len(tree.objects))) - set(codecs))
            if total is not None:
                total(plan.fetch_bytes)
            if already is not None:
                already(s.present_bytes(tree))
            _fetch(store, tree, fetcher, plan, codecs, written, progress or (lambda _n: None))
            crashpoint("ingest.blobs-written")
            text, warnings = _check_manifest(store, tree, codecs)
            _check_bodies(store, tree, codecs)
            store.blobs.sync()
            crashpoint("ingest.before-commit")
            res = _commit(store, tree, entry, codecs, text, force)
            crashpoint("ingest.after-commit")
    except (RegistryError, KeyboardInterrupt):
        raise  # the verified objects stay for the next try (module docstring)
    except BaseException:
        discard_uncommitted(store, written)
        raise
    res.fetched_bytes, res.requests = fetcher.bytes_fetched, fetcher.requests
    res.present_bytes = s.present_bytes(tree)
    res.warnings = warnings
    if res.created and res.version is not None:
        from .report import record_stored_size

        record_stored_size(store, res.version.id)
    return res


class _Writer:
    """Checks and writes the objects of fetched packs and single objects on a small pool
    (decoding, hashing and writing release the GIL: two cores, as ingest's workers), each
    object once; ``codecs`` and ``written`` are updated under the lock."""

    def __init__(self, store: Store, tree: cf.Tree, codecs: dict[int, int],
                 written: list[bytes]) -> None:
        self.store, self.tree, self.codecs, self.written = store, tree, codecs, written
        self.lock = threading.Lock()
        self.claimed = set(codecs)

    def run(self, relpath: str, data: bytes, members: list[tuple[int, int]],
            checked: bool) -> None:
        for i, off in members:
            with self.lock:
                if i in self.claimed:
                    continue
                self.claimed.add(i)
            o = self.tree.objects[i]
            stored = data[off:off + o.stored_size]
            # A single object was checked by the fetcher; a pack only as a whole (by its
            # name): each of its objects here, or a tree that lies would slip through.
            if not checked and not cf.check_object(o, stored):
                raise IntegrityError(f"object {o.digest.hex()} in {relpath}: its bytes do not "
                                     "match its digest", hint="the registry's tree and pack "
                                     "disagree; tell its publisher")
            try:
                self.store.blobs.write(o.digest, stored)
            except OSError as e:
                root = self.store.blobs.root
                if is_enospc(e):
                    raise StoreError(f"no space left writing blobs under {root}") from None
                raise StoreError(f"cannot write blob under {root}: {e}") from None
            with self.lock:
                self.written.append(o.digest)
                self.codecs[i] = o.codec


def _fetch(store: Store, tree: cf.Tree, fetcher: Fetcher, plan: cf.Plan,
           codecs: dict[int, int], written: list[bytes], progress: Progress) -> None:
    """Fetch the plan's packs and objects (concurrently: the fetcher's ``get_many``) and
    write each lacking object once checked, at most ``_INFLIGHT`` fetched files in hand."""
    units: dict[str, tuple[list[tuple[int, int]], bool]] = {}  # relpath -> members, checked
    items: list[tuple[str, Check | None, int]] = []
    for p in plan.packs:
        units[cf.pack_path(p.digest)] = (list(p.members), False)
        items.append((cf.pack_path(p.digest), cf.named_by(p.digest), p.size))
    for i in plan.singles:
        o = tree.objects[i]
        units[cf.object_path(o.digest)] = ([(i, 0)], True)
        items.append((cf.object_path(o.digest), _checker(o), o.stored_size))
    writer = _Writer(store, tree, codecs, written)
    half = len(items) // 2
    with ThreadPoolExecutor(_WORKERS, thread_name_prefix="jbl-casinstall") as pool:
        pending: set[Future[None]] = set()
        try:
            for n, (relpath, data) in enumerate(fetcher.get_many(items), 1):
                pending.add(pool.submit(writer.run, relpath, data, *units[relpath]))
                progress(len(data))
                if len(pending) >= _INFLIGHT or n == half:
                    done, pending = wait(pending, return_when=ALL_COMPLETED if n == half
                                         else FIRST_COMPLETED)
                    for f in done:
                        f.result()
                if n == half:  # every object of the first half written
                    crashpoint("casinstall.half-fetched")
            for f in pending:
                f.result()
        finally:
            for f in pending:
                f.cancel()
    missing = set(range(len(tree.objects))) - set(codecs)
    if missing:  # a pack the plan chose lists objects the tree does not: never a hole
        raise IntegrityError(f"{len(missing)} objects of the tree were in none of its packs")


def _checker(o: cf.Obj) -> Check:
    return lambda data: cf.check_object(o, data)


def _read_body(store: Store, tree: cf.Tree, body: cf.Body,
               codecs: dict[int, int]) -> Iterator[bytes]:
    for i in body.chunks:
        o = tree.objects[i]
        yield store.blobs.read(o.digest, codecs[i], o.size)


def _check_manifest(store: Store, tree: cf.Tree,
                    codecs: dict[int, int]) -> tuple[str, list[str]]:
    """runtime.yml's text, after ingest's checks (parse, architecture); the warning ingest
    gives for mount sources the runtime lacks."""
    m = tree.entries[tree.manifest_entry()]
    raw = b"".join(_read_body(store, tree, tree.bodies[m.body], codecs))
    manifest = parse_manifest(raw, source=MANIFEST_NAME)
    if (manifest.name, manifest.version) != (tree.name, tree.version):
        raise UnsafeArchive(f"{MANIFEST_NAME} names {manifest.name}@{manifest.version}, "
                            f"the tree {tree.name}@{tree.version}")
    check_architecture(manifest)
    children: dict[int, dict[str, int]] = {}
    for i, e in enumerate(tree.entries):
        if e.parent >= 0:
            children.setdefault(e.parent, {})[e.name.decode("utf-8", "replace")] = i

    def lookup(node: int, name: str) -> tuple[int, str, str] | None:
        i = children.get(node, {}).get(name)
        if i is None:
            return None
        e = tree.entries[i]
        kind = {stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink"}.get(e.kind, "file")
        return i, kind, (e.target or b"").decode("utf-8", "replace")

    missing = [x.source for x in manifest.mounts if not source_present(lookup, 0, x.source)]
    warnings = [f"{MANIFEST_NAME} mounts sources the runtime lacks: {', '.join(missing)} "
                "(jobs skip them, as Joblet does; `jbl store info` lists them)"] if missing \
        else []
    return raw.decode("utf-8", "replace"), warnings


def _check_bodies(store: Store, tree: cf.Tree, codecs: dict[int, int]) -> None:
    """A multi-chunk body's digest is the dedup key of a whole file: recompute it from its
    chunks before a contents row names it (unless a committed row already has it)."""
    multi = [b for b in tree.bodies if len(b.chunks) > 1]
    have = _by_digest(store.db, "contents", "size", [b.digest for b in multi])
    for b in multi:
        if b.digest in have:
            continue
        h = hashlib.sha256()
        for data in _read_body(store, tree, b, codecs):
            h.update(data)
        if h.digest() != b.digest:
            raise IntegrityError(f"body {b.digest.hex()}: its chunks hash to "
                                 f"{h.hexdigest()}")


def _commit(store: Store, tree: cf.Tree, entry: RegistryEntry, codecs: dict[int, int],
            manifest_text: str, force: bool) -> CasResult:
    """Every row of the install in ONE transaction (the blobs are already synced)."""
    db = store.db
    now = time.time()
    with db.write():
        have = store.get_version(entry.name, entry.version)
        if have is not None and not force:  # a concurrent install won
            return CasResult(False, have, have.file_count, have.logical_size)
        retire(store, entry.name, entry.version, have, now)
        blob_ids = {d: int(v[0]) for d, v in _by_digest(
            db, "blobs", "id", [o.digest for o in tree.objects]).items()}
        new_blobs: list[rows.BlobRow] = []
        nxt = rows.next_id(db, "blobs")
        for o in sorted(tree.objects, key=lambda o: o.digest):
            if o.digest not in blob_ids:
                blob_ids[o.digest] = nxt
                new_blobs.append(rows.BlobRow(nxt, o.digest, o.size, o.stored_size, o.codec,
                                              now))
                nxt += 1
        rows.insert_blobs(db, new_blobs)
        content_ids, res = _insert_contents(db, tree, blob_ids)
        nlinks = tree.nlinks()
        first = rows.next_id(db, "entries")
        entries = []
        for i, e in enumerate(tree.entries):
            reg = e.kind == stat.S_IFREG
            entries.append(rows.EntryRow(
                first + i, None if e.parent < 0 else first + e.parent, e.name, e.kind, e.mode,
                e.uid, e.gid, e.mtime_ns, e.size,
                content_ids[tree.bodies[e.body].digest] if reg else None, e.target,
                first + (e.link if e.link >= 0 else i) if reg and nlinks[i] > 1 else None,
                nlinks[i]))
            if reg:
                res.files += 1
                res.logical_bytes += e.size if e.link < 0 else 0
        manifest = parse_manifest(manifest_text.encode(), source=MANIFEST_NAME)
        version_id = rows.insert_version_tree(
            db, rows.VersionRow(entry.name, entry.version, manifest_text, now,
                                manifest.description, entry.download_url, entry.checksum,
                                res.files, res.logical_bytes), entries)
    info = store.version_by_id(version_id)
    assert info is not None
    res.version = info
    res.new_blobs = len(new_blobs)
    res.new_stored_bytes = sum(r.stored_size for r in new_blobs)
    return res


def _insert_contents(db: DB, tree: cf.Tree,
                     blob_ids: dict[bytes, int]) -> tuple[dict[bytes, int], CasResult]:
    """Content rows for the bodies the store lacks (committed ones are shared, after a size
    check); returns body digest -> content id, and a result counting what was shared."""
    have = _by_digest(db, "contents", "id, size", [b.digest for b in tree.bodies])
    res = CasResult(True)
    ids: dict[bytes, int] = {}
    new_contents: list[rows.ContentRow] = []
    chunks: list[rows.ChunkRow] = []
    nxt = rows.next_id(db, "contents")
    for b in sorted(tree.bodies, key=lambda b: b.digest):
        if b.digest in have:
            cid, size = have[b.digest]
            if size != b.size:
                raise IntegrityError(f"body {b.digest.hex()}: {b.size} bytes in the tree, "
                                     f"{size} in the store")
            ids[b.digest] = cid
            continue
        ids[b.digest] = nxt
        new_contents.append(rows.ContentRow(nxt, b.digest, b.size, len(b.chunks)))
        chunks.extend(rows.ChunkRow(nxt, seq, blob_ids[tree.objects[i].digest])
                      for seq, i in enumerate(b.chunks))
        nxt += 1
    rows.insert_contents(db, new_contents, chunks)
    for e in tree.entries:
        if e.kind == stat.S_IFREG and e.link < 0 and tree.bodies[e.body].digest in have:
            res.dedup_files += 1
            res.dedup_bytes += e.size
    return ids, res
