"""Ingest: an untrusted runtime tarball -> blobs + one transaction of index rows.

Nothing is extracted onto the host. ``tarstream.TarReader`` checks the container and each
member; this module checks the *tree* (duplicates, members under a symlink or a file,
hardlinks to anything but an earlier regular file), neutralises what a runtime must not carry
(device nodes and FIFOs are dropped, setuid/setgid cleared: each with a warning), streams
every regular file body into content-addressed chunk blobs, and finally records blobs,
contents, chunks, entries and the version row in ONE transaction.

The pipeline (docs/store-format.md has the numbers): the calling thread reads and
decompresses (zlib/zstd release the GIL) and parses headers; each chunk of a body goes to a
small worker pool that hashes it, looks its digest up among *committed* blob rows (a hit
skips compression and the write entirely), else zstd-encodes it when that saves space and
writes the blob file. The whole-body sha256 of a multi-chunk file is computed in order on
one extra thread. Queues are bounded (``_INFLIGHT`` chunks), so memory stays flat.

Durability and concurrency: the shared install lock (``Store.install_lock``) is held from
before the first dedup lookup through the commit, so a gc sweep (exclusive lock) can neither
delete a row we deduplicated against nor unlink a blob we just wrote. Order: write blobs ->
``BlobStore.sync()`` (syncfs, on its own thread while the rows are inserted) -> COMMIT (which
waits for that syncfs). Any rejection or crash before the commit leaves
no rows; blob files written so far are orphans that gc sweeps.

Thread-safety: ``ingest()`` uses the Store from the calling thread only; its workers use
their own read-only index connection (under a lock) and BlobStore (stateless).
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import zstandard

from . import rows
from . import tarstream as ts
from .blobs import ZSTD_LEVEL, BlobStore, is_enospc
from .crashpoints import crashpoint
from .db import open_db
from .digest import EMPTY, HashingReader, parse_checksum
from .errors import (
    AlreadyExists,
    BuildRecipe,
    ChecksumMismatch,
    LimitExceeded,
    NotFound,
    StoreBusy,
    StoreError,
    UnsafeArchive,
    UsageError,
)
from .limits import Limits
from .manifest import (
    MANIFEST_NAME,
    ROOTFS_DIR,
    Manifest,
    arch_mismatch,
    check_name,
    load_yaml,
    parse_manifest,
    source_present,
)
from .store import Store, VersionInfo, pid_alive

log = logging.getLogger(__name__)

__all__ = ["Limits", "IngestResult", "Inspection", "ingest", "inspect"]

_WORKERS = 2              # two cores: the decode thread + two workers keep both busy
_INFLIGHT = 16            # batches queued or being processed at most (bounded memory)
_BATCH_BYTES = 512 << 10  # a batch closes at this many body bytes…
_BATCH_ITEMS = 128        # …or this many chunks (one IN (...) query each)
_MAX_MANIFEST = 1 << 20   # runtime.yml is read into memory: a few KiB in practice
RECIPE_MANIFEST = "manifest.yaml"  # Joblet's build recipes: read to name the runtime
_IMPLIED_DIR_MODE = 0o755
_DROPPED = "dropped"
_DEFAULT_LIMITS = Limits()  # frozen: safe to share as the default



@dataclass
class IngestResult:
    version: VersionInfo          # from store.store
    created: bool                 # False = that name@version was already installed (no-op)
    files: int
    logical_bytes: int
    new_blobs: int
    new_stored_bytes: int         # what this install added to disk
    dedup_files: int
    dedup_bytes: int              # file bodies already in the store
    warnings: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------ the tree
@dataclass(eq=False, slots=True)
class _Body:
    size: int
    digests: list[bytes]                         # chunk digests, filled in by the workers
    digest: Future[bytes] | bytes | None = None  # whole-body sha256 (multi-chunk: a future)
    committed_id: int | None = None  # a committed contents row with this body (workers)
    content_id: int | None = None


@dataclass(eq=False, slots=True)
class _Node:
    kind: str
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    explicit: bool = True
    children: dict[str, _Node] | None = None
    body: _Body | None = None
    target: bytes | None = None
    primary: _Node | None = None     # hardlinks: the group's first regular file
    nlink: int = 1
    id: int = 0


class _Tree:
    """The archive's tree as it streams in; rejects what cannot be a sane directory tree."""

    def __init__(self) -> None:
        self.root = _Node(ts.DIR, _IMPLIED_DIR_MODE, 0, 0, 0, explicit=False, children={})
        self.max_mtime = 0
        self.warnings: list[str] = []

    def _walk(self, parts: list[str], path: str, create: bool) -> _Node | None:
        node = self.root
        for p in parts:
            assert node.children is not None
            child = node.children.get(p)
            if child is None:
                if not create:
                    return None
                child = _Node(ts.DIR, _IMPLIED_DIR_MODE, 0, 0, 0, explicit=False, children={})
                node.children[p] = child
            elif child.kind == ts.SYMLINK:
                raise UnsafeArchive("member under a symlink", path)
            elif child.kind != ts.DIR:
                raise UnsafeArchive("member under a non-directory", path)
            node = child
        return node

    def add(self, m: ts.Member) -> _Node:
        self.max_mtime = max(self.max_mtime, m.mtime_ns)
        mode = m.mode
        if m.kind == ts.DIR and (same := self._same_directory(m)) is not None:
            return same  # the same directory listed twice, identically: one entry
        if m.mtime_clamped:
            self.warnings.append(f"mtime out of range, clamped to {_when(m.mtime_ns)}: "
                                 f"{m.path!r}")
        if m.kind in (ts.REG, ts.DIR) and mode & (stat.S_ISUID | stat.S_ISGID):
            mode &= ~(stat.S_ISUID | stat.S_ISGID)
            self.warnings.append(f"setuid/setgid bits cleared: {m.path!r}")
        if m.kind == ts.HARDLINK:
            assert m.link is not None
            target_path = m.link.decode()
            tparts = target_path.split("/") if target_path else []
            try:
                parent = self._walk(tparts[:-1], m.path, create=False)
            except UnsafeArchive:
                parent = None
            tgt = parent.children.get(tparts[-1]) if parent and parent.children and tparts \
                else None
            if tgt is not None and tgt.primary is not None:
                tgt = tgt.primary
            if tgt is None or tgt.kind != ts.REG:
                raise UnsafeArchive(f"hardlink to {target_path!r}, which is not an earlier "
                                    "regular file", m.path)
            node = _Node(ts.REG, tgt.mode, tgt.uid, tgt.gid, tgt.mtime_ns, body=tgt.body,
                         primary=tgt)
        elif m.kind == ts.DIR:
            node = _Node(ts.DIR, mode, m.uid, m.gid, m.mtime_ns, children={})
        elif m.kind == ts.SYMLINK:
            node = _Node(ts.SYMLINK, 0o777, m.uid, m.gid, m.mtime_ns, target=m.link)
        elif m.kind == ts.REG:
            node = _Node(ts.REG, mode, m.uid, m.gid, m.mtime_ns)
        else:  # device node or FIFO: dropped, but kept here so paths under it still fail
            node = _Node(_DROPPED, 0, 0, 0, m.mtime_ns)
            self.warnings.append(f"{m.kind} dropped: {m.path!r}")
        parts = m.path.split("/") if m.path else []
        if not parts:  # './': the archive root itself
            if node.kind != ts.DIR:
                raise UnsafeArchive("the archive root is not a directory", ".")
            if self.root.explicit:
                raise UnsafeArchive("duplicate path", ".")
            node.children = self.root.children
            self.root = node
            return node
        parent = self._walk(parts[:-1], m.path, create=True)
        assert parent is not None and parent.children is not None
        old = parent.children.get(parts[-1])
        if old is not None:
            if old.kind == ts.DIR and not old.explicit and node.kind == ts.DIR:
                node.children = old.children  # a directory listed after its contents
            else:
                raise UnsafeArchive("duplicate path", m.path)
        parent.children[parts[-1]] = node
        if node.primary is not None:
            node.primary.nlink += 1
        return node

    def _same_directory(self, m: ts.Member) -> _Node | None:
        """The explicit directory ``m`` repeats exactly (a directory named twice to ``tar
        --no-recursion``, or added again by ``tar -r``), else None; anything that differs
        stays a "duplicate path"."""
        parts = m.path.split("/") if m.path else []
        node: _Node | None = self.root
        for p in parts:
            if node is None or node.kind != ts.DIR or node.children is None:
                return None
            node = node.children.get(p)
        if node is None or node.kind != ts.DIR or not node.explicit:
            return None
        mode = m.mode & ~(stat.S_ISUID | stat.S_ISGID)  # as add() stores it
        if (node.mode, node.uid, node.gid, node.mtime_ns) != (mode, m.uid, m.gid, m.mtime_ns):
            return None
        return node


def _when(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ns // 1_000_000_000))


# ------------------------------------------------------------------------------ workers
class _Pipeline:
    """Hash, dedup-check, encode and write chunks on a small pool, in batches.

    Small bodies travel in batches (up to ``_BATCH_BYTES``/``_BATCH_ITEMS``) so that a
    runtime of 100k small files costs 1k thread hand-offs and 1k index queries, not 100k.
    Each (body, seq) slot is written by exactly one worker and read only after ``close()``.
    """

    def __init__(self, store: Store, chunk_size: int) -> None:
        self.blobs = BlobStore(store.dir, keep_shards=True)
        self.chunk_size = chunk_size
        self.pool = ThreadPoolExecutor(_WORKERS, thread_name_prefix="jbl-ingest")
        self.hasher = ThreadPoolExecutor(1, thread_name_prefix="jbl-bodyhash")
        self.slots = threading.BoundedSemaphore(_INFLIGHT)
        self.hash_slots = threading.BoundedSemaphore(_INFLIGHT)
        self.lock = threading.Lock()
        self.db_lock = threading.Lock()
        # A separate read connection: dedup is trusted only against committed rows. The
        # install lock is held, so no committed row can vanish before our commit, and rows
        # other installs commit meanwhile have ids above these marks (see _commit).
        self.rdb = open_db(store.dir, readonly=True)
        self.blob_mark = self.rdb.scalar("SELECT max(id) FROM blobs") or 0
        self.content_mark = self.rdb.scalar("SELECT max(id) FROM contents") or 0
        self.claimed: dict[bytes, int | None] = {}   # digest -> committed blob id or None
        self.new_blobs: dict[bytes, tuple[int, int, int]] = {}  # digest -> size, stored, codec
        self.futures: list[Future[None]] = []
        self.local = threading.local()
        self.aborted = False
        self._batch: list[tuple[_Body, int, bytes | memoryview]] = []
        self._batch_bytes = 0

    def _cctx(self) -> zstandard.ZstdCompressor:
        c = getattr(self.local, "cctx", None)
        if c is None:
            c = self.local.cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        return c

    def _lookup(self, table: str, digests: list[bytes]) -> dict[bytes, int]:
        marks = ",".join("?" * len(digests))
        with self.db_lock:
            return {bytes(d): i for d, i in self.rdb.query(
                f"SELECT digest, id FROM {table} WHERE digest IN ({marks})", tuple(digests))}

    def _run_batch(self, items: list[tuple[_Body, int, bytes | memoryview]]) -> None:
        try:
            digests = [hashlib.sha256(data).digest() for _, _, data in items]
            with self.lock:
                mine = [i for i, d in enumerate(digests)
                        if d not in self.claimed and self.claimed.setdefault(d, None) is None]
            found = self._lookup("blobs", [digests[i] for i in mine]) if mine else {}
            for i in mine:
                d = digests[i]
                if d in found:
                    with self.lock:
                        self.claimed[d] = found[d]
                    continue
                if self.aborted:
                    return
                data = items[i][2]
                codec, stored = BlobStore.encode(data, self._cctx())
                try:
                    self.blobs.write(d, stored)
                except OSError as e:
                    if is_enospc(e):
                        raise StoreError(f"no space left writing blobs under "
                                         f"{self.blobs.root}") from None
                    raise StoreError(f"cannot write blob under {self.blobs.root}: {e}") from None
                with self.lock:
                    self.new_blobs[d] = (len(data), len(stored), codec)
            # File-level dedup for one-chunk bodies (body digest == chunk digest): asked for
            # every such body, claimed or not, so that each gets an authoritative answer.
            singles = [(body, d) for (body, _, _), d in zip(items, digests, strict=True)
                       if body.size <= self.chunk_size]
            if singles:
                have = self._lookup("contents", [d for _, d in singles])
                for body, d in singles:
                    body.committed_id = have.get(d)
            for (body, seq, _), d in zip(items, digests, strict=True):
                body.digests[seq] = d
        finally:
            self.slots.release()

    def add(self, body: _Body, seq: int, data: bytes | memoryview) -> None:
        self._batch.append((body, seq, data))
        # A view pins its whole decoded piece: count that, so memory stays bounded.
        pinned = data.obj if isinstance(data, memoryview) else data
        self._batch_bytes += len(pinned) if isinstance(pinned, bytes) else len(data)
        if self._batch_bytes >= _BATCH_BYTES or len(self._batch) >= _BATCH_ITEMS:
            self.flush()

    def flush(self) -> None:
        if not self._batch:
            return
        items, self._batch, self._batch_bytes = self._batch, [], 0
        self.slots.acquire()
        try:
            self.futures.append(self.pool.submit(self._run_batch, items))
        except BaseException:
            self.slots.release()
            raise

    def hash_update(self, h: hashlib._Hash, data: bytes | memoryview) -> None:
        def run() -> None:
            try:
                h.update(data)
            finally:
                self.hash_slots.release()
        self.hash_slots.acquire()
        self.hasher.submit(run)

    def close(self, abort: bool) -> None:
        self.aborted = abort
        if not abort:
            self.flush()
        self.pool.shutdown(wait=True, cancel_futures=abort)
        self.hasher.shutdown(wait=True, cancel_futures=abort)
        self.rdb.close()
        self.blobs.close()
        if not abort:
            for f in self.futures:
                f.result()  # the first worker error, if any


# ------------------------------------------------------------------------------ ingest
def _read_archive(reader: ts.TarReader, tree: _Tree, pipe: _Pipeline | None, chunk_size: int,
                  early_check: Callable[[str, bytes], bool]) -> dict[str, bytes]:
    """Stream every member into the tree and the pipeline; return runtime.yml candidates.
    Stops early (returns with ``'__installed__'``) when ``early_check`` says so. Without a
    pipeline (``inspect``) bodies are skipped, runtime.yml candidates apart."""
    manifests: dict[str, bytes] = {}
    for m in reader.members():
        node = tree.add(m)
        if m.kind != ts.REG:
            continue
        body = _Body(m.size, [])
        node.body = body
        base = m.path.rsplit("/", 1)[-1]
        is_manifest = base in (MANIFEST_NAME, RECIPE_MANIFEST) and m.path.count("/") <= 1 \
            and m.size <= _MAX_MANIFEST
        if pipe is None:
            if is_manifest:
                manifests[m.path] = b"".join(reader.body(m, chunk_size))
            continue
        kept: list[bytes | memoryview] = []
        nchunks = -(-m.size // chunk_size)
        body.digests = [b""] * nchunks
        if m.size == 0:
            body.digest = EMPTY
        elif nchunks == 1:
            for data in reader.body(m, chunk_size):
                pipe.add(body, 0, data)
                if is_manifest:
                    kept.append(data)
        else:
            h = hashlib.sha256()
            for seq, data in enumerate(reader.body(m, chunk_size)):
                pipe.add(body, seq, data)
                pipe.hash_update(h, data)
            body.digest = pipe.hasher.submit(h.digest)
        if is_manifest:
            manifests[m.path] = b"".join(kept)
            if base == MANIFEST_NAME and early_check(m.path, manifests[m.path]):
                manifests["__installed__"] = b""
                return manifests
    return manifests


def _runtime_manifest(tree: _Tree, manifests: dict[str, bytes]
                      ) -> tuple[_Node, bytes, Manifest]:
    """The runtime directory's node, its runtime.yml bytes and the parsed manifest."""
    root, prefix = _runtime_root(tree, manifests)
    text = manifests.get(prefix + MANIFEST_NAME)
    if text is None:
        raise LimitExceeded(f"{MANIFEST_NAME} is larger than {_MAX_MANIFEST} bytes",
                            prefix + MANIFEST_NAME)
    manifest = parse_manifest(text, source=prefix + MANIFEST_NAME)
    missing = [m.source for m in manifest.mounts
               if not source_present(_tree_lookup, root, m.source)]
    if missing:  # once per import, not per source: Joblet's fixed mount tables list many
        tree.warnings.append(f"{prefix}{MANIFEST_NAME} mounts sources the runtime lacks: "
                             f"{', '.join(missing)} (jobs skip them, as Joblet does; "
                             "`jbl store info` lists them)")
    return root, text, manifest


def _tree_lookup(node: _Node, name: str) -> tuple[_Node, str, str] | None:
    """``manifest.source_present``'s view of the archive tree."""
    child = (node.children or {}).get(name)
    if child is None or child.kind == _DROPPED:
        return None
    kind = {ts.DIR: "dir", ts.SYMLINK: "symlink"}.get(child.kind, "file")
    return child, kind, (child.target or b"").decode("utf-8", "replace")


def _recipe(tree: _Tree, manifests: dict[str, bytes]) -> BuildRecipe | None:
    """Joblet's published registry tarballs are build recipes (``NAME/manifest.yaml``,
    ``setup.sh``/``setup-<os>-<arch>.sh``, ``versions.lock``; no runtime.yml, no isolated/):
    say so, and how to make a runtime of one, instead of calling the archive unsafe."""
    kids = tree.root.children or {}
    top, prefix = tree.root, ""
    if len(kids) == 1 and (only := next(iter(kids.values()))).kind == ts.DIR:
        top, prefix = only, next(iter(kids)) + "/"
    names = top.children or {}
    scripts = sorted(n for n, c in names.items() if c.kind == ts.REG and n.startswith("setup")
                     and n.endswith(".sh"))
    if RECIPE_MANIFEST not in names or not scripts or ROOTFS_DIR in names:
        return None
    name = prefix.rstrip("/") or None
    try:
        doc = load_yaml(manifests.get(prefix + RECIPE_MANIFEST, b""), source=RECIPE_MANIFEST)
        if isinstance(doc, dict) and isinstance(doc.get("name"), str):
            name = check_name(doc["name"])
    except (UnsafeArchive, UsageError):
        pass  # the directory's name, then: the message needs no more than a name
    what = f"runtime {name}" if name else "a runtime"
    plat = next((n[len("setup-"):-len(".sh")] for n in scripts if n.startswith("setup-")),
                "<os>-<arch>")
    return BuildRecipe(
        f"this is a Joblet build recipe of {what} ({prefix}{RECIPE_MANIFEST}, "
        f"{', '.join(scripts[:3])}{'…' if len(scripts) > 3 else ''}), not a runtime root "
        f"({MANIFEST_NAME} + {ROOTFS_DIR}/)",
        hint=f"build it on a machine of its platform with its setup script (e.g. "
             f"setup-{plat}.sh), which writes {MANIFEST_NAME} and {ROOTFS_DIR}/; then "
             f"`jbl pack RUNTIME_DIR -o {name or 'NAME'}.tar.gz` and import or publish that")


def _runtime_root(tree: _Tree, manifests: dict[str, bytes] | None = None
                  ) -> tuple[_Node, str]:
    kids = tree.root.children or {}
    if MANIFEST_NAME in kids:
        root, prefix = tree.root, ""
    elif len(kids) == 1 and (top := next(iter(kids.values()))).kind == ts.DIR and \
            MANIFEST_NAME in (top.children or {}):
        root, prefix = top, next(iter(kids)) + "/"
    else:
        if (recipe := _recipe(tree, manifests or {})) is not None:
            raise recipe
        raise UnsafeArchive(f"no {MANIFEST_NAME} at the archive root or under a single top "
                            "directory")
    mnode = (root.children or {})[MANIFEST_NAME]
    if mnode.kind != ts.REG or mnode.primary is not None:
        raise UnsafeArchive(f"{MANIFEST_NAME} is not a regular file", prefix + MANIFEST_NAME)
    return root, prefix


def _open_source(src: Path | BinaryIO) -> tuple[BinaryIO, bool]:
    if isinstance(src, (str, os.PathLike)):
        p = Path(src)
        try:
            return open(p, "rb"), True
        except FileNotFoundError:
            raise NotFound(f"no such tarball: {p}") from None
        except IsADirectoryError:
            raise UsageError(f"{p} is a directory; pack it first with: jbl pack {p} -o "
                             f"{p.name}.tar.gz") from None
        except OSError as e:
            raise UsageError(f"cannot read {p}: {e.strerror}") from None
    return src, False


def check_same_tarball(have: VersionInfo, actual: str, source: str) -> None:
    """The "already installed" rule: ``have`` (same name@version) is a no-op only if it was
    installed from these very bytes; a different tarball is AlreadyExists naming both
    digests (``--force`` replaces it). A version recorded without a checksum cannot be
    compared and counts as the same."""
    if have.checksum and have.checksum != actual:
        raise AlreadyExists(f"{have.spec} is already installed from a different tarball "
                            f"(installed {have.checksum}, {source} is {actual})",
                            hint="pass --force to replace it")


def _already_installed(have: VersionInfo, actual: str, expected: str | None, source: str,
                       warnings: list[str]) -> IngestResult:
    """The no-op result for an installed name@version, after every check: a given
    ``--checksum`` first (exit 5), then the installed tarball's digest (exit 4)."""
    if expected is not None and actual != expected:
        raise ChecksumMismatch(source, expected, actual)
    check_same_tarball(have, actual, source)
    return IngestResult(have, False, have.file_count, have.logical_size, 0, 0, 0, 0, warnings)


def _rest_checksum(raw: HashingReader) -> str:
    """Read what is left of the raw stream (the digest is over every byte)."""
    while raw.read(1 << 20):
        pass
    return raw.checksum()


def ingest(store: Store, src: Path | BinaryIO, *, source: str,
           expected_checksum: str | None = None, name: str | None = None,
           version: str | None = None, limits: Limits = _DEFAULT_LIMITS,
           progress: Callable[[int], None] | None = None, force: bool = False,
           check_arch: bool = True) -> IngestResult:
    """Install the runtime tarball ``src`` into ``store`` (see the module docstring).

    An installed name@version is a no-op only for the same tarball (``check_same_tarball``);
    ``force`` replaces it instead, in the commit's transaction (a job using the old copy
    keeps it: the old row becomes 'removed', as ``jbl store rm`` leaves it).
    ``check_arch=False`` is for a publisher's scratch store (store/caspublish.py), which
    holds runtimes of any architecture and runs none."""
    if name is not None:
        check_name(name)
    if version is not None:
        check_name(version, "version")
    if expected_checksum is not None:
        expected_checksum = parse_checksum(expected_checksum)
    f, owned = _open_source(src)
    if name is not None and version is not None and not force and \
            (have := store.get_version(name, version)) is not None:
        try:
            return _already_installed(have, _rest_checksum(HashingReader(f, progress)),
                                      expected_checksum, source, [])
        finally:
            if owned:
                f.close()
    written: list[dict[bytes, Any]] = []  # the pipeline's new blobs, for cleanup on failure
    try:
        with store.install_lock():
            return _ingest_locked(store, f, source, expected_checksum, name, version, limits,
                                  progress, written, force, check_arch)
    except BaseException:
        if written:
            discard_uncommitted(store, list(written[0]))
        raise
    finally:
        if owned:
            f.close()


def discard_uncommitted(store: Store, digests: list[bytes]) -> None:
    """A failed install removes the blob files it wrote, so a disk that filled up gets its
    space back at once and the store is exactly as before.

    Only under the exclusive store lock, and only if it is free right now (never waited
    for): another install may have written the same blob and be about to commit it. A digest
    with a committed row is kept. Anything left behind is an orphan that gc sweeps.
    """
    if not digests:
        return
    try:
        with store.sweep_lock(blocking=False):
            for d in digests:
                if store.db.one("SELECT 1 FROM blobs WHERE digest=?", (d,)) is None:
                    store.blobs.unlink(d)
    except StoreBusy:
        log.info("another install or gc is running: left %d blob files for gc", len(digests))


def _ingest_locked(store: Store, f: BinaryIO, source: str, expected: str | None,
                   name: str | None, version: str | None, limits: Limits,
                   progress: Callable[[int], None] | None,
                   written: list[dict[bytes, Any]], force: bool = False,
                   check_arch: bool = True) -> IngestResult:
    reader = ts.TarReader(f, limits, progress)
    tree = _Tree()
    installed: list[VersionInfo] = []

    def early_check(path: str, text: bytes) -> bool:
        # runtime.yml at the root, or under the only top directory seen so far: if that
        # name@version is installed, the rest of the archive need only be hashed.
        if force or ("/" in path and len(tree.root.children or {}) != 1):
            return False
        try:
            m = parse_manifest(text, source=path)
        except UnsafeArchive:
            return False  # reported properly once the whole archive is read
        have = store.get_version(name or m.name, version or m.version)
        if have is not None:
            installed.append(have)
        return have is not None

    pipe = _Pipeline(store, store.chunk_size)
    written.append(pipe.new_blobs)
    ok = False
    # Only regular-file chunks travel through the pool; the reader thread itself decodes.
    try:
        manifests = _read_archive(reader, tree, pipe, store.chunk_size, early_check)
        if installed:
            ok = True
            reader.close()  # stops the decoding thread: the rest of the raw bytes are ours
            return _already_installed(installed[0], _rest_checksum(reader.raw), expected,
                                      source, tree.warnings)
        actual = reader.checksum()
        if expected is not None and actual != expected:
            raise ChecksumMismatch(source, expected, actual)
        root, text, manifest = _runtime_manifest(tree, manifests)
        name = name or manifest.name
        version = version or manifest.version
        if check_arch:
            check_architecture(manifest)
        ok = True
    finally:
        reader.close()
        pipe.close(abort=not ok)
    _resolve_bodies(root)
    crashpoint("ingest.blobs-written")
    synced = _Sync(store.blobs)
    try:
        crashpoint("ingest.before-commit")
        result = _commit(store, tree, root, pipe, name, version, manifest.description,
                         text.decode("utf-8", "replace"), source, actual, force, synced.wait)
    finally:
        synced.join()
    crashpoint("ingest.after-commit")
    if not result.created:  # a concurrent install of the same name@version won
        check_same_tarball(result.version, actual, source)
    if result.created:
        # A version's stored size never changes: cache it once so `list` stays fast.
        from .report import record_stored_size

        record_stored_size(store, result.version.id)
    return result


class _Sync:
    """``BlobStore.sync()`` (one syncfs, mostly waiting on the disk) on its own thread, so
    that the commit's planning and inserts overlap it. The commit calls ``wait`` before its
    COMMIT: rows still never become durable before the blobs they name."""

    def __init__(self, blobs: BlobStore) -> None:
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(blobs,), name="jbl-syncfs",
                                        daemon=True)
        self._thread.start()

    def _run(self, blobs: BlobStore) -> None:
        try:
            blobs.sync()
        except BaseException as e:  # raised in the committing thread, by wait()
            self._error = e

    def join(self) -> None:
        self._thread.join()

    def wait(self) -> None:
        self.join()
        if self._error is not None:
            raise self._error


def check_architecture(manifest: Manifest) -> None:
    """runtime.yml's ``requirements.architectures`` is checked like a registry entry's
    platforms, at install (exit 3, nothing stored) rather than at every run: a store serves
    one host. ``inspect`` (publishing with ``jbl registry add``) does not check it."""
    from .regformat import host_arch

    why = arch_mismatch(manifest, host_arch())
    if why is not None:
        raise NotFound(why, hint="install a version built for this host's architecture")


@dataclass(frozen=True)
class Inspection:
    manifest: Manifest
    manifest_text: str
    checksum: str            # sha256:<hex> of the raw tarball bytes
    size: int                # raw tarball bytes
    compression: str
    files: int
    logical_bytes: int
    warnings: list[str]


def inspect(src: Path | BinaryIO, *, limits: Limits = _DEFAULT_LIMITS) -> Inspection:
    """Read a whole tarball with every check ingest makes, store nothing: what a publisher
    (``jbl registry add``) runs so that it never publishes a tarball jbl would refuse."""
    f, owned = _open_source(src)
    try:
        reader = ts.TarReader(f, limits)
        tree = _Tree()
        try:
            manifests = _read_archive(reader, tree, None, 1 << 20, lambda _p, _t: False)
        finally:
            reader.close()
        root, text, manifest = _runtime_manifest(tree, manifests)
        files = logical = 0
        stack = [root]
        while stack:
            n = stack.pop()
            stack.extend((n.children or {}).values())
            if n.kind == ts.REG:
                files += 1
                if n.primary is None and n.body is not None:
                    logical += n.body.size
        return Inspection(manifest, text.decode("utf-8", "replace"), reader.checksum(),
                          reader.raw.count, reader.compression, files, logical, tree.warnings)
    finally:
        if owned:
            f.close()


def _resolve_bodies(root: _Node) -> None:
    """After the workers are done: every body's whole digest."""
    stack = [root]
    while stack:
        n = stack.pop()
        if n.children:
            stack.extend(n.children.values())
        elif n.body is not None and n.primary is None:
            if isinstance(n.body.digest, Future):
                n.body.digest = n.body.digest.result()
            elif n.body.digest is None:
                n.body.digest = n.body.digests[0]


# (node, its parent, its name) in the order entry ids are handed out.
_Placed = tuple[_Node, _Node | None, bytes]
_KIND = {ts.DIR: stat.S_IFDIR, ts.REG: stat.S_IFREG, ts.SYMLINK: stat.S_IFLNK}


@dataclass
class _ContentPlan:
    """What the contents step decided: new rows, and the counts IngestResult reports."""
    contents: list[rows.ContentRow] = field(default_factory=list)
    chunks: list[rows.ChunkRow] = field(default_factory=list)
    files: int = 0
    logical: int = 0
    dedup_files: int = 0
    dedup_bytes: int = 0


def _commit(store: Store, tree: _Tree, root: _Node, pipe: _Pipeline, name: str, version: str,
            description: str, manifest_text: str, source: str, checksum: str,
            force: bool, synced: Callable[[], None]) -> IngestResult:
    """Every row of the install in ONE transaction; ``synced()`` returns once the blobs are
    on disk (or raises), and is called before the COMMIT."""
    db = store.db
    now = time.time()
    order = _preorder(root)
    with db.write():
        have = store.get_version(name, version)
        if have is not None and not force:  # a concurrent install won
            return IngestResult(have, False, have.file_count, have.logical_size, 0, 0, 0, 0,
                                tree.warnings)
        retire(store, name, version, have, now)
        blob_ids, blob_rows = _plan_blobs(store, pipe, now)
        rows.insert_blobs(db, blob_rows)
        plan = _plan_contents(store, pipe, order, blob_ids)
        rows.insert_contents(db, plan.contents, plan.chunks)
        version_id = rows.insert_version_tree(
            db, rows.VersionRow(name, version, manifest_text, now, description, source,
                                checksum, plan.files, plan.logical),
            _entry_rows(tree, order, rows.next_id(db, "entries")))
        synced()
    info = store.version_by_id(version_id)
    assert info is not None
    return IngestResult(info, True, plan.files, plan.logical, len(blob_rows),
                        sum(r.stored_size for r in blob_rows), plan.dedup_files,
                        plan.dedup_bytes, tree.warnings)


def _preorder(root: _Node) -> list[_Placed]:
    """Nodes in DFS preorder with children sorted by name: ids in readdir order."""
    order: list[_Placed] = []
    stack: list[_Placed] = [(root, None, b"")]
    while stack:
        node, parent, nm = stack.pop()
        if node.kind == _DROPPED:
            continue
        order.append((node, parent, nm))
        if node.children:
            kids = sorted(((k.encode(), v) for k, v in node.children.items()), reverse=True)
            stack.extend((v, node, k) for k, v in kids)
    return order


def retire(store: Store, name: str, version: str, have: VersionInfo | None,
            now: float) -> None:
    """Make room for name@version: ``--force`` retires the installed copy exactly as `rm`
    would, and older removed copies are dropped or renamed out of the way."""
    db = store.db
    if have is not None:
        rows.mark_removed(db, have.id, now)
    for (gone,) in db.query("SELECT id FROM versions WHERE name=? AND version=? "
                            "AND state='removed'", (name, version)):
        # Reinstalling a version that `rm` left in place because a job still used it: if
        # that job has ended, drop the old rows now; if it still runs, rename the old row
        # out of the way (it keeps serving that job by id; gc drops it later).
        if any(pid_alive(pid, start) for pid, start in db.query(
                "SELECT pid, pid_start FROM leases WHERE version_id=?", (gone,))):
            db.execute("UPDATE versions SET version = version || '~removed.' || id "
                       "WHERE id=?", (gone,))
        else:
            rows.drop_version_rows(db, gone)


def _plan_blobs(store: Store, pipe: _Pipeline,
                now: float) -> tuple[dict[bytes, int], list[rows.BlobRow]]:
    """Every chunk digest's blob id, and the rows of the blobs this install adds."""
    db = store.db
    # Rows other installs committed since our workers' lookups (ids above the marks:
    # nothing is deleted while we hold the install lock). Usually none.
    other_blobs = {bytes(d): i for d, i in db.query(
        "SELECT digest, id FROM blobs WHERE id > ?", (pipe.blob_mark,))}
    blob_ids: dict[bytes, int] = {d: i for d, i in pipe.claimed.items() if i is not None}
    next_blob = rows.next_id(db, "blobs")
    new_rows: list[rows.BlobRow] = []
    for d in sorted(pipe.new_blobs):  # digest order: index inserts stay local
        if d in other_blobs:
            blob_ids[d] = other_blobs[d]
            continue
        size, stored, codec = pipe.new_blobs[d]
        blob_ids[d] = next_blob
        new_rows.append(rows.BlobRow(next_blob, d, size, stored, codec, now))
        next_blob += 1
    missing = [d for d in pipe.claimed if d not in blob_ids]
    if missing:  # cannot happen unless the pool was aborted: never commit a hole
        raise StoreError(f"internal: {len(missing)} chunks were not stored; try again")
    return blob_ids, new_rows


def _plan_contents(store: Store, pipe: _Pipeline, order: list[_Placed],
                   blob_ids: dict[bytes, int]) -> _ContentPlan:
    """File-level dedup against committed rows, then within this archive; sets every
    primary body's ``content_id``."""
    db = store.db
    other_contents = {bytes(d): i for d, i in db.query(
        "SELECT digest, id FROM contents WHERE id > ?", (pipe.content_mark,))}
    plan = _ContentPlan()
    bodies: dict[bytes, _Body] = {}   # digest -> first body with it (new ones only)
    local: dict[bytes, int] = {}      # digest -> committed content id
    for node, _p, _n in order:
        if node.kind != ts.REG:
            continue
        plan.files += 1
        body = node.body
        assert body is not None
        if node.primary is not None:
            continue
        plan.logical += body.size
        digest = body.digest
        assert isinstance(digest, bytes)
        cid = body.committed_id
        if cid is None:
            cid = other_contents.get(digest) or local.get(digest)
        if cid is None and (body.size > store.chunk_size or body.size == 0):
            # Not looked up by a worker (multi-chunk or empty): ask now.
            cid = db.scalar("SELECT id FROM contents WHERE digest=?", (digest,))
        if cid is not None:
            local[digest] = cid
            plan.dedup_files += 1
            plan.dedup_bytes += body.size
        else:
            bodies.setdefault(digest, body)
    next_content = rows.next_id(db, "contents")
    for digest in sorted(bodies):
        body = bodies[digest]
        cid = local[digest] = next_content
        next_content += 1
        plan.contents.append(rows.ContentRow(cid, digest, body.size, len(body.digests)))
        plan.chunks.extend(rows.ChunkRow(cid, seq, blob_ids[d])
                           for seq, d in enumerate(body.digests))
    for node, _p, _n in order:
        if node.kind == ts.REG and node.primary is None:
            assert node.body is not None and isinstance(node.body.digest, bytes)
            node.body.content_id = local[node.body.digest]
    return plan


def _entry_rows(tree: _Tree, order: list[_Placed], first_id: int) -> list[rows.EntryRow]:
    """One entry per node, ids from ``first_id`` in ``order``; hardlinks take their group's
    attributes and body from its primary."""
    for i, (node, _p, _n) in enumerate(order):
        node.id = first_id + i
    out: list[rows.EntryRow] = []
    for node, parent, nm in order:
        kind = _KIND[node.kind]
        pid = parent.id if parent else None
        src = node.primary or node
        mtime = node.mtime_ns if node.explicit else tree.max_mtime
        if node.kind == ts.DIR:
            nlink = 2 + sum(1 for c in (node.children or {}).values() if c.kind == ts.DIR)
            out.append(rows.EntryRow(node.id, pid, nm, kind, node.mode, node.uid, node.gid,
                                     mtime, 0, nlink=nlink))
        elif node.kind == ts.SYMLINK:
            assert node.target is not None
            out.append(rows.EntryRow(node.id, pid, nm, kind, 0o777, node.uid, node.gid, mtime,
                                     len(node.target), target=node.target))
        else:
            assert src.body is not None
            out.append(rows.EntryRow(node.id, pid, nm, kind, src.mode, src.uid, src.gid,
                                     src.mtime_ns, src.body.size, src.body.content_id,
                                     link_id=src.id if src.nlink > 1 else None,
                                     nlink=src.nlink))
    return out
