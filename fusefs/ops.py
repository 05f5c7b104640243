"""pyfuse3 Operations over ``store.view``: a thin, read-only adapter. No SQL here.

The tree itself (the top two levels, inodes, lookups, listings, chunk lists) is
``fusefs/tree.py``, and the rules a request follows are ``fusefs/core.py``, both shared with
the raw engine; this module is the pyfuse3 protocol: prebuilt
``EntryAttributes``, file handles, invalidations, the trio loop; leases follow core.py's
policy (per version top directory the kernel holds), written by ``leases.ThreadLeaseKeeper``.

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
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import pyfuse3
import trio
from jbl.store.view import View

from .core import Core, Negative
from .errors import erofs, guarded
from .inodes import ENTRY, Inode, Node
from .leases import ThreadLeaseKeeper, Who
from .tree import WATCH_PERIOD, Listing, TopChange

log = logging.getLogger("jbl.fusefs")

READDIR_BATCH = 32  # a READDIRPLUS reply holds ~25 entries (4 KiB): fetch about that many
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT


def make_attr(ino: int, kind: int, mode: int, nlink: int, uid: int, gid: int, size: int,
              mtime_ns: int, attr_timeout: int, entry_timeout: int) -> pyfuse3.EntryAttributes:
    """The tree's ``AttrMaker`` for this engine: built once per node."""
    a = pyfuse3.EntryAttributes()
    a.st_ino = Inode(ino)
    a.generation = 0
    a.entry_timeout = entry_timeout
    a.attr_timeout = attr_timeout
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
    listing: Listing | None = None  # top-level dirs: the children when opened


class JblOperations(pyfuse3.Operations):
    def __init__(self, view: View, leases: ThreadLeaseKeeper | None = None,
                 read_threads: int = 4) -> None:
        super().__init__()
        self.view = view
        self.leases = leases
        self.core = Core(view, make_attr, self._on_change)
        self.tree = self.core.tree
        self.handles: dict[int, Handle] = {}
        self._next_fh = 1
        self.read_limiter = trio.CapacityLimiter(read_threads)
        self.stats = {"lookup": 0, "open": 0, "read": 0, "read_thread": 0, "readdir": 0}

    # --- the top two levels -------------------------------------------------------------
    def _on_change(self, change: TopChange) -> None:
        """The index changed (``Core.poll``, once mounted): invalidate what moved."""
        for name in change.names:
            self._invalidate(pyfuse3.ROOT_INODE, name)
        for ino, moved in change.moved.items():
            for ver in moved:
                self._invalidate(ino, ver)

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
                self.core.poll()
            except Exception as e:
                log.warning("checking the index for changes: %s", e)

    @staticmethod
    def _attr(node: Node) -> pyfuse3.EntryAttributes:
        return cast(pyfuse3.EntryAttributes, node.attr)

    @staticmethod
    def _negative(timeout: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = Inode(0)  # a negative entry the kernel caches for entry_timeout
        a.entry_timeout = timeout
        return a

    # --- lookups and attributes ---------------------------------------------------------
    @guarded
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
                     ) -> pyfuse3.EntryAttributes:
        self.stats["lookup"] += 1
        node = self.core.lookup(parent_inode, name)
        if isinstance(node, Negative):
            return self._negative(node.timeout)
        vid = self._hands_out(node)
        if vid is not None:  # held before the kernel has the inode: gc cannot slip in
            await self._lease(vid, (ctx.uid, ctx.pid))
        return self._attr(node)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, n in inode_list:  # cannot fail; must not raise
            vid = self.core.forgotten(self.tree.table.forget(inode, n))
            if vid is not None and self.leases is not None:
                self.leases.release(vid)

    @guarded
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext
                      ) -> pyfuse3.EntryAttributes:
        return self._attr(self.tree.node(inode))

    @guarded
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return self.core.readlink(inode)

    @guarded
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        fs = self.core.statfs()
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = fs.bsize
        s.f_blocks = fs.blocks
        s.f_bfree = s.f_bavail = 0  # read-only: nothing can be written
        s.f_files = fs.files
        s.f_ffree = s.f_favail = 0
        s.f_namemax = fs.namemax
        return s

    # --- directories --------------------------------------------------------------------
    @guarded
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileHandleT:
        node = self.core.directory(inode)
        listing = self.core.top_listing(node) if node.role != ENTRY else None
        return self._open_handle(Handle(node, listing))

    @guarded
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        self.stats["readdir"] += 1
        h = self.handles.get(fh)
        if h is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        vids: list[int] = []
        self._fill(h, start_id, token, vids)
        for vid in vids:  # the reply goes out when we return: lease what it hands out first
            await self._lease(vid, None)

    def _fill(self, h: Handle, start_id: int, token: pyfuse3.ReaddirToken,
              vids: list[int]) -> None:
        if h.listing is not None:
            for name, node, next_off in self.core.top_page(h.listing, start_id):
                if not self._reply(token, name, node, next_off, vids):
                    return
            return
        for e in self.core.entries(h.node, start_id, READDIR_BATCH):
            if not self._reply(token, e.name, self.tree.entry_node(e), e.id, vids):
                return

    def _reply(self, token: pyfuse3.ReaddirToken, name: bytes, node: Node, next_id: int,
               vids: list[int]) -> bool:
        if pyfuse3.readdir_reply(token, name, self._attr(node), next_id):
            node.nlookup += 1  # READDIRPLUS: the kernel now holds a reference
            vid = self._hands_out(node)
            if vid is not None:
                vids.append(vid)
            return True
        self.tree.table.maybe_drop(node)
        return False

    @guarded
    async def releasedir(self, fh: int) -> None:
        self._close_handle(fh)

    # --- files --------------------------------------------------------------------------
    @guarded
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext
                   ) -> pyfuse3.FileInfo:
        self.stats["open"] += 1
        if flags & _WRITE_FLAGS:
            raise pyfuse3.FUSEError(errno.EROFS)
        node = self.core.file(inode)
        # The version is leased (the kernel holds its top directory: core.py); a removal
        # that committed before that lease shows up as missing rows (ENOENT), never as
        # blobs swept under an open file.
        fh = self._open_handle(Handle(node))
        try:
            self.tree.refs(node)
        except BaseException:
            self._close_handle(fh)
            raise
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @guarded
    async def read(self, fh: int, off: int, size: int) -> bytes:
        self.stats["read"] += 1
        h = self.handles.get(fh)
        if h is None or h.node.refs is None or h.node.entry is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        view = self.view
        out = []
        for p in self.core.read_plan(h.node, off, size):
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

    def _hands_out(self, node: Node) -> int | None:
        return None if self.leases is None else self.core.hands_out(node)

    async def _lease(self, vid: int, who: Who | None) -> None:
        """Hold ``vid`` (the lease worker's thread writes it; we wait without blocking
        the trio loop)."""
        assert self.leases is not None
        done = threading.Event()
        self.leases.acquire(vid, done.set, who)
        await trio.to_thread.run_sync(done.wait)

    def _open_handle(self, h: Handle) -> pyfuse3.FileHandleT:
        h.node.nopen += 1
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = h
        return pyfuse3.FileHandleT(fh)

    def _close_handle(self, fh: int) -> None:
        h = self.handles.pop(fh, None)
        if h is None:
            return
        h.node.nopen -= 1
        self.tree.table.maybe_drop(h.node)

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
