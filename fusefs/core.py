"""The rules every request follows, for both engines, as typed results: ``Core``.

An engine (``rawfs.py``: raw /dev/fuse, ``ops.py``: pyfuse3) decodes a request, asks the core,
and encodes what it returns; everything in between is here, once:

    lookup(parent, name)     a ``Node`` (counted as a kernel reference) or a ``Negative``
                             with the timeout the kernel may cache it for (fusefs/tree.py)
    node / readlink          the node behind an inode (ENOENT for one the kernel should have
                             forgotten), a link's target (EINVAL for anything else)
    directory / file         the node if it is one (ENOTDIR; EISDIR or EINVAL)
    statfs()                 ``StatFs``: the store's logical size and file count, nothing free
    entries(dir, after, n)   a directory below a version, page by page: ``Entry`` rows in id
                             order; an entry's id is the offset of the next one
    top_listing / top_page   the top two levels: the listing (polled first) and its page from
                             an offset (index + 1 is the next offset; removed children skipped)
    read_plan(node, off, n)  the pieces a READ needs (EISDIR/EINVAL for a non-file, ENOENT for
                             a version removed and purged meanwhile, IntegrityError for rows
                             that do not add up)
    poll()                   the index polling: re-read the top two levels when
                             ``PRAGMA data_version`` moved and hand the change to the engine's
                             ``on_change`` (its invalidations) once it serves a kernel (``live``)

    hands_out(node) / forgotten(node)
                             the lease policy, one state per version top directory: LEASED
                             from the reply that hands its inode to the kernel (LOOKUP,
                             READDIRPLUS) until the FORGET that ends it, UNLEASED otherwise.
                             Why per top inode and not per open handle: the raw engine never
                             sees opens (no-open mode), and the kernel cannot reach a file
                             without holding the directories above it (a dentry pins its
                             parent), so "the kernel holds the version's top inode" covers
                             every open file, a shell's cwd and a cached path, in both
                             engines. The lease itself (linger, removed_hold_limit, holder
                             notes) is fusefs/leases.py's ``ThreadLeaseKeeper``.

Expected errors are ``Errno`` (fusefs/errnos.py).

Thread-safety: the engine's request thread only (pyfuse3: the trio thread), like the tree.
"""

from __future__ import annotations

import errno
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from jbl.store.view import Entry, Piece, View

from .errnos import Errno
from .inodes import ENTRY, Node
from .tree import AttrMaker, Listing, TopChange, Tree


@dataclass(frozen=True, slots=True)
class Negative:
    """No such name: the kernel may cache that for ``timeout`` seconds."""

    timeout: int


@dataclass(frozen=True, slots=True)
class StatFs:
    blocks: int          # of BSIZE bytes: the store's logical size, rounded up
    files: int
    bsize: int = 4096
    namemax: int = 255   # read-only: no free blocks or inodes


class Core:
    def __init__(self, view: View, attr: AttrMaker,
                 on_change: Callable[[TopChange], None] | None = None) -> None:
        self.view = view
        self.tree = Tree(view, attr)
        self.table = self.tree.table
        self.on_change = on_change
        self.live = False  # True once a kernel is served: then changes are handed on
        self.leased: dict[int, int] = {}  # inode of a version's top dir -> version id

    def poll(self) -> None:
        """Re-read installed versions if the index changed; report what moved."""
        change = self.tree.refresh_top()
        if change is not None and self.live and self.on_change is not None:
            self.on_change(change)

    def node(self, inode: int) -> Node:
        return self.tree.node(inode)

    def lookup(self, parent_inode: int, name: bytes) -> Node | Negative:
        parent = self.tree.node(parent_inode)
        if parent.role != ENTRY:
            self.poll()  # the top two levels change with installs
        node = self.tree.lookup(parent, name)
        return Negative(self.tree.negative_timeout(parent)) if node is None else node

    def readlink(self, inode: int) -> bytes:
        return self.tree.readlink(self.tree.node(inode))

    def statfs(self) -> StatFs:
        size, files = self.view.totals()
        return StatFs((size + 4095) // 4096, files)

    def directory(self, inode: int) -> Node:
        node = self.tree.node(inode)
        if node.kind != stat.S_IFDIR:
            raise Errno(errno.ENOTDIR)
        return node

    def file(self, inode: int) -> Node:
        """The regular file behind ``inode`` (EISDIR for a directory, EINVAL otherwise)."""
        node = self.tree.node(inode)
        if node.kind != stat.S_IFREG or node.entry is None:
            raise Errno(errno.EISDIR if node.kind == stat.S_IFDIR else errno.EINVAL)
        return node

    def entries(self, node: Node, after: int, batch: int) -> Iterator[Entry]:
        """``node``'s entries after offset ``after``, fetched ``batch`` at a time."""
        assert node.role == ENTRY and node.entry is not None
        while True:
            rows = self.view.readdir(node.entry.id, after, batch)
            yield from rows
            if len(rows) < batch:
                return
            after = rows[-1].id

    def top_listing(self, node: Node) -> Listing:
        self.poll()
        return self.tree.listing(node)

    @staticmethod
    def top_page(listing: Listing, off: int) -> Iterator[tuple[bytes, Node, int]]:
        """(name, child, next offset) from offset ``off``; children removed meanwhile are
        skipped."""
        for i in range(off, len(listing)):
            name, make = listing[i]
            child = make()
            if child is not None:
                yield name, child, i + 1

    def read_plan(self, node: Node, off: int, size: int) -> list[Piece]:
        refs = self.tree.refs(node)
        assert node.entry is not None
        return self.view.plan_read(refs, node.entry.size, off, size)

    # --- the lease policy ---------------------------------------------------------------
    def hands_out(self, node: Node) -> int | None:
        """``node`` is being handed to the kernel: the version id to lease before the reply
        goes out, if it is a version's top directory not leased yet (it is LEASED from
        now on)."""
        e = node.entry
        if e is None or e.parent_id is not None or node.inode in self.leased:
            return None
        vid: int = e.version_id
        self.leased[node.inode] = vid
        return vid

    def forgotten(self, node: Node | None) -> int | None:
        """The kernel forgot ``node`` (``InodeTable.forget`` returned it): the version id
        whose lease to release, if it was a leased top directory (UNLEASED again)."""
        return None if node is None else self.leased.pop(node.inode, None)
