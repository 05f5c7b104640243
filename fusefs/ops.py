"""pyfuse3 Operations over ``store.view``: a thin, read-only adapter. No SQL here.

    MOUNT/                      ROOT: one directory per installed runtime name
    MOUNT/<name>/               NAME_DIR: one directory per installed version + ``latest``
    MOUNT/<name>/<version>/     the version's root entry: the tree as its tarball held it
    MOUNT/<name>/latest         LATEST: symlink to the highest release (versions.latest)

Speed (docs/mount.md): entries and attributes are immutable, so the kernel may cache them for
a day (``TIMEOUT``) and negative lookups below a version are cached as long; the top two
levels change with installs, so their negative entries and attributes live ``TOP_TIMEOUT``
and positive ones are invalidated (``invalidate_entry_async``) when the index changes
(``PRAGMA data_version``, polled by ``watch``). ``open`` answers ``keep_cache`` so the page
cache survives opens; flush/fsync/xattrs are left ENOSYS so the kernel stops asking.
``readdir`` is READDIRPLUS (pyfuse3 always does it): attributes travel with the names.
Lookups are synchronous SQLite on the trio thread (indexed, microseconds); a read that would
wait for the disk or decompress a big chunk goes to a worker thread (``read_limiter``).

Errors: every handler is ``guarded`` (fusefs/errors.py); every modifying op is EROFS.

Thread-safety: trio thread only; worker threads run ``View.read_piece`` and nothing else.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pyfuse3
import trio
from jbl.store import versions as versions_mod
from jbl.store.errors import IntegrityError
from jbl.store.view import ChunkRef, Entry, VersionRoot, View

from .errors import erofs, guarded
from .inodes import (
    ENTRY,
    LATEST,
    NAME_DIR,
    ROOT,
    ROOT_INODE,
    Inode,
    InodeTable,
    Node,
    entry_key,
)
from .leases import LeaseKeeper

log = logging.getLogger("jbl.fusefs")

TIMEOUT = 86400.0    # entries/attrs below a version: immutable content
TOP_TIMEOUT = 1.0    # the top two levels' attrs, `latest`, and their negative entries
WATCH_PERIOD = 1.0   # how often the index is checked for installs/removals
READDIR_BATCH = 32  # a READDIRPLUS reply holds ~25 entries (4 KiB): fetch about that many
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT


def make_attr(ino: int, kind: int, mode: int, nlink: int, uid: int, gid: int, size: int,
              mtime_ns: int, timeout: float, entry_timeout: float | None = None
              ) -> pyfuse3.EntryAttributes:
    a = pyfuse3.EntryAttributes()
    a.st_ino = ino
    a.generation = 0
    a.entry_timeout = timeout if entry_timeout is None else entry_timeout
    a.attr_timeout = timeout
    a.st_mode = kind | (mode & 0o7777)
    a.st_nlink = nlink
    a.st_uid = uid
    a.st_gid = gid
    a.st_rdev = 0
    a.st_size = size
    a.st_blksize = 4096
    a.st_blocks = (size + 511) // 512
    a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = mtime_ns
    return a


@dataclass(slots=True)
class Handle:
    node: Node
    version_id: int | None
    listing: list[tuple[bytes, Callable[[], Node]]] | None = None  # top-level dirs


class JblOperations(pyfuse3.Operations):
    def __init__(self, view: View, leases: LeaseKeeper | None = None,
                 read_threads: int = 4) -> None:
        super().__init__()
        self.view = view
        self.leases = leases
        self.table = InodeTable()
        self.handles: dict[int, Handle] = {}
        self._next_fh = 1
        self.read_limiter = trio.CapacityLimiter(read_threads)
        self.mounted = False  # True once serving a kernel: then invalidations are sent
        self.top: dict[str, dict[str, VersionRoot]] = {}
        self.latest: dict[str, str] = {}
        self.stats = {"lookup": 0, "open": 0, "read": 0, "read_thread": 0, "readdir": 0}
        root = Node(ROOT_INODE, ROOT, stat.S_IFDIR, None, nlookup=1)
        self.table.add(("root", None), root)
        self._refresh_top(force=True)

    # --- the top two levels -------------------------------------------------------------
    def _refresh_top(self, force: bool = False) -> None:
        """Re-read installed versions if the index changed; invalidate what moved."""
        if not self.view.changed() and not force:
            return
        old, old_latest = self.top, self.latest
        self.top = self.view.installed()
        self.latest = {n: lt for n, vs in self.top.items()
                       if (lt := versions_mod.latest(vs)) is not None and "latest" not in vs}
        now_ns = time.time_ns()
        root = self.table.nodes[ROOT_INODE]
        root.attr = make_attr(ROOT_INODE, stat.S_IFDIR, 0o755, 2 + len(self.top), 0, 0, 0,
                              now_ns, TOP_TIMEOUT)
        for name, vs in self.top.items():
            node = self.table.find(("name", name))
            if node is not None:
                node.attr = self._name_attr(node.inode, vs)
        if not self.mounted:
            return
        for name in set(old) ^ set(self.top):
            self._invalidate(ROOT_INODE, name)
        for name in set(old) & set(self.top):
            node = self.table.find(("name", name))
            if node is None:
                continue
            for ver in set(old[name]) ^ set(self.top[name]):
                self._invalidate(node.inode, ver)
            for ver in set(old[name]) & set(self.top[name]):
                if old[name][ver] != self.top[name][ver]:  # removed and re-imported
                    self._invalidate(node.inode, ver)
            if old_latest.get(name) != self.latest.get(name):
                self._invalidate(node.inode, "latest")

    def _invalidate(self, parent: int, name: str) -> None:
        try:
            pyfuse3.invalidate_entry_async(Inode(parent), name.encode(), ignore_enoent=True)
        except Exception as e:  # never let cache hygiene take a handler down
            log.warning("invalidate %s in inode %d: %s", name, parent, e)

    async def watch(self) -> None:
        """Poll the index for installs/removals so the kernel forgets stale top entries."""
        while True:
            await trio.sleep(WATCH_PERIOD)
            try:
                self._refresh_top()
            except Exception as e:
                log.warning("checking the index for changes: %s", e)

    @staticmethod
    def _name_attr(ino: int, vs: dict[str, VersionRoot]) -> pyfuse3.EntryAttributes:
        mtime = max((v.installed_at for v in vs.values()), default=0.0)
        return make_attr(ino, stat.S_IFDIR, 0o755, 2 + len(vs), 0, 0, 0, int(mtime * 1e9),
                         TOP_TIMEOUT, TIMEOUT)

    def _name_node(self, name: str) -> Node:
        key = ("name", name)
        node = self.table.find(key)
        if node is None:
            ino = self.table.number(key)
            node = self.table.add(key, Node(ino, NAME_DIR, stat.S_IFDIR,
                                            self._name_attr(ino, self.top.get(name, {})),
                                            name=name))
        return node

    def _latest_node(self, name: str, target: str) -> Node:
        key = ("latest", (name, target))
        node = self.table.find(key)
        if node is None:
            ino = self.table.number(key)
            at = self.top.get(name, {}).get(target)
            mtime = int((at.installed_at if at else 0) * 1e9)
            t = target.encode()
            node = self.table.add(key, Node(
                ino, LATEST, stat.S_IFLNK,
                make_attr(ino, stat.S_IFLNK, 0o777, 1, 0, 0, len(t), mtime, TOP_TIMEOUT),
                name=name, target=t))
        return node

    def _version_node(self, name: str, version: str) -> Node | None:
        vr = self.top.get(name, {}).get(version)
        if vr is None:
            return None
        e = self.view.entry(vr.root_id)
        return None if e is None else self._entry_node(e)

    def _entry_node(self, e: Entry) -> Node:
        key = entry_key(e)
        node = self.table.find(key)
        if node is not None:
            node.entry = e  # the most recently seen version holding it (for its lease)
            return node
        ino = self.table.number(key)
        size = len(e.target or b"") if e.kind == stat.S_IFLNK else e.size
        attr = make_attr(ino, e.kind, e.mode, e.nlink, e.uid, e.gid, size, e.mtime_ns, TIMEOUT)
        return self.table.add(key, Node(ino, ENTRY, e.kind, attr, entry=e))

    def _node(self, inode: int) -> Node:
        node = self.table.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)  # an inode the kernel should have forgotten
        return node

    @staticmethod
    def _negative(timeout: float) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = 0  # a negative entry the kernel caches for entry_timeout
        a.entry_timeout = timeout
        return a

    def _listing(self, node: Node) -> list[tuple[bytes, Callable[[], Node]]]:
        self._refresh_top()
        if node.role == ROOT:
            return [(n.encode(), lambda n=n: self._name_node(n)) for n in sorted(self.top)]
        vs = self.top.get(node.name, {})
        out: list[tuple[bytes, Callable[[], Node]]] = []
        for ver in versions_mod.sort_versions(vs):
            vr = vs[ver]

            def make(vr: VersionRoot = vr) -> Node:
                e = self.view.entry(vr.root_id)
                if e is None:
                    raise pyfuse3.FUSEError(errno.ENOENT)
                return self._entry_node(e)
            out.append((ver.encode(), make))
        lt = self.latest.get(node.name)
        if lt is not None:
            out.append((b"latest", lambda lt=lt: self._latest_node(node.name, lt)))
        return out

    # --- lookups and attributes ---------------------------------------------------------
    @guarded
    async def lookup(self, parent_inode: int, name: bytes, ctx: object = None
                     ) -> pyfuse3.EntryAttributes:
        self.stats["lookup"] += 1
        parent = self._node(parent_inode)
        node: Node | None
        if parent.role == ENTRY:
            if parent.kind != stat.S_IFDIR:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            assert parent.entry is not None
            e = self.view.lookup(parent.entry.id, name)
            if e is None:
                return self._negative(TIMEOUT)
            node = self._entry_node(e)
        else:
            self._refresh_top()
            text = name.decode("utf-8", "surrogateescape")
            if parent.role == ROOT:
                node = self._name_node(text) if text in self.top else None
            elif text == "latest" and parent.name in self.latest:
                node = self._latest_node(parent.name, self.latest[parent.name])
            else:
                node = self._version_node(parent.name, text)
            if node is None:
                return self._negative(TOP_TIMEOUT)
        node.nlookup += 1
        return node.attr  # type: ignore[return-value]

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, n in inode_list:  # cannot fail; must not raise
            self.table.forget(inode, n)

    @guarded
    async def getattr(self, inode: int, ctx: object = None) -> pyfuse3.EntryAttributes:
        return self._node(inode).attr  # type: ignore[return-value]

    @guarded
    async def readlink(self, inode: int, ctx: object = None) -> bytes:
        node = self._node(inode)
        if node.kind != stat.S_IFLNK:
            raise pyfuse3.FUSEError(errno.EINVAL)
        if node.role == LATEST:
            return node.target
        assert node.entry is not None
        return View.readlink(node.entry)

    @guarded
    async def statfs(self, ctx: object = None) -> pyfuse3.StatvfsData:
        size, files = self.view.totals()
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = (size + 4095) // 4096
        s.f_bfree = s.f_bavail = 0  # read-only: nothing can be written
        s.f_files = files
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # --- directories --------------------------------------------------------------------
    @guarded
    async def opendir(self, inode: int, ctx: object = None) -> int:
        node = self._node(inode)
        if node.kind != stat.S_IFDIR:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        listing = None if node.role == ENTRY else self._listing(node)
        return await self._open_handle(Handle(node, node.version_id, listing))

    @guarded
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        self.stats["readdir"] += 1
        h = self.handles.get(fh)
        if h is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        if h.listing is not None:
            for i in range(start_id, len(h.listing)):
                name, make = h.listing[i]
                try:
                    node = make()
                except pyfuse3.FUSEError:
                    continue  # removed since opendir
                if not self._reply(token, name, node, i + 1):
                    return
            return
        assert h.node.entry is not None
        after = start_id
        while True:
            batch = self.view.readdir(h.node.entry.id, after, READDIR_BATCH)
            for e in batch:
                if not self._reply(token, e.name, self._entry_node(e), e.id):
                    return
            if len(batch) < READDIR_BATCH:
                return
            after = batch[-1].id

    def _reply(self, token: pyfuse3.ReaddirToken, name: bytes, node: Node, next_id: int) -> bool:
        if pyfuse3.readdir_reply(token, name, node.attr, next_id):
            node.nlookup += 1  # READDIRPLUS: the kernel now holds a reference
            return True
        self.table.maybe_drop(node)
        return False

    @guarded
    async def releasedir(self, fh: int) -> None:
        self._close_handle(fh)

    # --- files --------------------------------------------------------------------------
    @guarded
    async def open(self, inode: int, flags: int, ctx: object = None) -> pyfuse3.FileInfo:
        self.stats["open"] += 1
        if flags & _WRITE_FLAGS:
            raise pyfuse3.FUSEError(errno.EROFS)
        node = self._node(inode)
        if node.kind != stat.S_IFREG or node.entry is None:
            raise pyfuse3.FUSEError(errno.EISDIR if node.kind == stat.S_IFDIR else errno.EINVAL)
        # Lease first, then read the chunk list: a removal that committed before our lease
        # shows up as missing rows (ENOENT), never as blobs swept under an open file.
        fh = await self._open_handle(Handle(node, node.version_id))
        try:
            if node.refs is None:
                node.refs = self._load_refs(node.entry)
        except BaseException:
            self._close_handle(fh)
            raise
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    def _load_refs(self, e: Entry) -> tuple[ChunkRef, ...]:
        refs = self.view.chunks(e.content_id) if e.content_id is not None else ()
        cs = self.view.chunk_size
        if len(refs) != (e.size + cs - 1) // cs:
            if self.view.entry(e.id) is None:  # its version was removed (and purged)
                raise pyfuse3.FUSEError(errno.ENOENT)
            raise IntegrityError(f"entry {e.id} ({e.name!r}): {len(refs)} chunks in the "
                                 f"index for {e.size} bytes")
        return refs

    @guarded
    async def read(self, fh: int, off: int, size: int) -> bytes:
        self.stats["read"] += 1
        h = self.handles.get(fh)
        if h is None or h.node.refs is None or h.node.entry is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        view = self.view
        out = []
        for p in view.plan_read(h.node.refs, h.node.entry.size, off, size):
            data = view.read_piece_nowait(p)
            if data is None:
                self.stats["read_thread"] += 1
                data = await trio.to_thread.run_sync(view.read_piece, p,
                                                     limiter=self.read_limiter)
            out.append(data)
        return out[0] if len(out) == 1 else b"".join(out)

    @guarded
    async def release(self, fh: int) -> None:
        self._close_handle(fh)

    async def _open_handle(self, h: Handle) -> int:
        h.node.nopen += 1
        try:
            if self.leases is not None and h.version_id is not None:
                await self.leases.acquire(h.version_id)
        except BaseException:
            h.node.nopen -= 1
            raise
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = h
        return fh

    def _close_handle(self, fh: int) -> None:
        h = self.handles.pop(fh, None)
        if h is None:
            return
        h.node.nopen -= 1
        if self.leases is not None and h.version_id is not None:
            self.leases.release(h.version_id)
        self.table.maybe_drop(h.node)

    # --- everything that would modify the tree: EROFS ----------------------------------
    setattr = erofs
    mknod = erofs
    mkdir = erofs
    unlink = erofs
    rmdir = erofs
    symlink = erofs
    rename = erofs
    link = erofs
    write = erofs
    create = erofs
    setxattr = erofs
    removexattr = erofs
