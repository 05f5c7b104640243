"""The tree both FUSE engines serve, without the engine: inodes, the top two levels, nodes.

    MOUNT/                      ROOT: one directory per installed runtime name
    MOUNT/<name>/               NAME_DIR: one directory per installed version + ``latest``
    MOUNT/<name>/<version>/     the version's root entry: the tree as its tarball held it
    MOUNT/<name>/latest         LATEST: symlink to the highest release (versions.latest)

``Tree`` owns the ``InodeTable``, the installed-versions map of the top two levels (re-read
when ``PRAGMA data_version`` moves, reporting what changed so the engine can tell the
kernel), lookups, top-level listings and chunk lists. The engines (``ops.py``: pyfuse3,
``rawfs.py``: raw /dev/fuse) keep only the protocol: how attributes are packed (the
``attr`` callback builds them once per node: content is immutable), how errors and
invalidations travel, file handles, leases.

Timeouts (docs/mount.md): below a version everything is immutable, so entries, attributes
and negative lookups live ``TIMEOUT``; the top two levels change with installs, so their
attributes and negative entries live ``TOP_TIMEOUT`` (positive entries are invalidated).

Errors: an expected error is ``Errno`` (fusefs/errnos.py), answered as is, without a log line.

Thread-safety: the engine's request thread (pyfuse3: the trio thread) only; no locks.
"""

from __future__ import annotations

import errno
import functools
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from jbl.store import versions as versions_mod
from jbl.store.errors import IntegrityError
from jbl.store.limits import clamp_mtime_ns
from jbl.store.view import ChunkRef, Entry, VersionRoot, View

from .errnos import Errno
from .inodes import ENTRY, LATEST, NAME_DIR, ROOT, ROOT_INODE, InodeTable, Node, entry_key

TIMEOUT = 86400     # entries/attrs/negative lookups below a version: immutable content
# Every file of a version is shown as root's, whatever uid/gid its tarball recorded: on a
# shared server a tarball's numbers are not host identities (uid 1005 in the tarball is not
# the host's user 1005, who must not get the owner's rights to a 0600 file). The recorded
# owners stay in the index (``jbl store info``). With these, the kernel's mode checks give
# the tarball's "other" bits to every user, and owner/group bits to root only.
OWNER_UID = OWNER_GID = 0
TOP_TIMEOUT = 1     # the top two levels' attrs, `latest`, and their negative entries
WATCH_PERIOD = 1.0  # how often the engines check the index for installs/removals

# (ino, kind, mode, nlink, uid, gid, size, mtime_ns, attr_timeout, entry_timeout) -> the
# engine's prebuilt attributes (pyfuse3.EntryAttributes, or packed replies), kept in Node.attr
AttrMaker = Callable[[int, int, int, int, int, int, int, int, int, int], object]
Listing = list[tuple[bytes, Callable[[], Node | None]]]


@dataclass
class TopChange:
    """What an index change moved, for the engine's kernel-cache invalidations."""

    names: set[str] = field(default_factory=set)          # came or went (entries of ROOT)
    moved: dict[int, set[str]] = field(default_factory=dict)  # name-dir inode -> versions
                                                           # (and "latest") that came, went
                                                           # or were re-imported


class Tree:
    def __init__(self, view: View, attr: AttrMaker) -> None:
        self.view = view
        self.attr = attr
        self.table = InodeTable()
        self.top: dict[str, dict[str, VersionRoot]] = {}
        self.latest: dict[str, str] = {}
        self.table.add(("root", None), Node(ROOT_INODE, ROOT, stat.S_IFDIR, None, nlookup=1))
        self.refresh_top(force=True)

    # --- the top two levels -------------------------------------------------------------
    def refresh_top(self, force: bool = False) -> TopChange | None:
        """Re-read installed versions if the index changed (None if it did not)."""
        if not self.view.changed() and not force:
            return None
        old, old_latest = self.top, self.latest
        self.top = self.view.installed()
        self.latest = {n: lt for n, vs in self.top.items()
                       if (lt := versions_mod.latest(vs)) is not None and "latest" not in vs}
        self.table.nodes[ROOT_INODE].attr = self.attr(
            ROOT_INODE, stat.S_IFDIR, 0o755, 2 + len(self.top), 0, 0, 0, time.time_ns(),
            TOP_TIMEOUT, TOP_TIMEOUT)
        change = TopChange(names=set(old) ^ set(self.top))
        for name, vs in self.top.items():
            node = self.table.find(("name", name))
            if node is None:
                continue
            node.attr = self._name_attr(node.inode, vs)
            was = old.get(name, {})
            moved = {v for v in set(was) | set(vs) if was.get(v) != vs.get(v)}
            if old_latest.get(name) != self.latest.get(name):
                moved.add("latest")
            if moved and name in old:
                change.moved[node.inode] = moved
        return change

    def _name_attr(self, ino: int, vs: dict[str, VersionRoot]) -> object:
        mtime = max((v.installed_at for v in vs.values()), default=0.0)
        return self.attr(ino, stat.S_IFDIR, 0o755, 2 + len(vs), 0, 0, 0, int(mtime * 1e9),
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
            t = target.encode()
            attr = self.attr(ino, stat.S_IFLNK, 0o777, 1, 0, 0, len(t),
                             int((at.installed_at if at else 0) * 1e9), TOP_TIMEOUT, TOP_TIMEOUT)
            node = self.table.add(key, Node(ino, LATEST, stat.S_IFLNK, attr, name=name,
                                            target=t))
        return node

    def _version_node(self, name: str, version: str) -> Node | None:
        vr = self.top.get(name, {}).get(version)
        if vr is None:
            return None
        e = self.view.entry(vr.root_id)
        return None if e is None else self.entry_node(e)

    # --- nodes ------------------------------------------------------------------------
    def entry_node(self, e: Entry) -> Node:
        key = entry_key(e)
        node = self.table.find(key)
        if node is not None:
            node.entry = e  # the most recently seen version holding it (for its lease)
            return node
        ino = self.table.number(key)
        size = len(e.target or b"") if e.kind == stat.S_IFLNK else e.size
        # Owners are presented, never taken from the tarball (docs/mount.md, "Owners"); the
        # mtime clamp guards rows an older ingest wrote without it.
        attr = self.attr(ino, e.kind, e.mode, e.nlink, OWNER_UID, OWNER_GID, size,
                         clamp_mtime_ns(e.mtime_ns), TIMEOUT, TIMEOUT)
        return self.table.add(key, Node(ino, ENTRY, e.kind, attr, entry=e))

    def node(self, inode: int) -> Node:
        node = self.table.get(inode)
        if node is None:
            raise Errno(errno.ENOENT)  # an inode the kernel should have forgotten
        return node

    def lookup(self, parent: Node, name: bytes) -> Node | None:
        """``name`` in ``parent``, counted as a kernel reference; None: a negative entry,
        to be cached ``negative_timeout(parent)``. The caller refreshes the top levels
        first when ``parent`` is one of them."""
        node: Node | None
        if parent.role == ENTRY:
            if parent.kind != stat.S_IFDIR:
                raise Errno(errno.ENOTDIR)
            assert parent.entry is not None
            e = self.view.lookup(parent.entry.id, name)
            node = None if e is None else self.entry_node(e)
        else:
            text = name.decode("utf-8", "surrogateescape")
            if parent.role == ROOT:
                node = self._name_node(text) if text in self.top else None
            elif text == "latest" and parent.name in self.latest:
                node = self._latest_node(parent.name, self.latest[parent.name])
            else:
                node = self._version_node(parent.name, text)
        if node is not None:
            node.nlookup += 1
        return node

    @staticmethod
    def negative_timeout(parent: Node) -> int:
        return TIMEOUT if parent.role == ENTRY else TOP_TIMEOUT

    def listing(self, node: Node) -> Listing:
        """A top-level directory's children in a stable order; each maker returns None if
        the child was removed meanwhile."""
        if node.role == ROOT:
            return [(n.encode("utf-8", "surrogateescape"), functools.partial(self._name_node, n))
                    for n in sorted(self.top)]
        vs = self.top.get(node.name, {})
        out: Listing = [(v.encode("utf-8", "surrogateescape"),
                         functools.partial(self._version_node, node.name, v))
                        for v in versions_mod.sort_versions(vs)]
        lt = self.latest.get(node.name)
        if lt is not None:
            out.append((b"latest", functools.partial(self._latest_node, node.name, lt)))
        return out

    def readlink(self, node: Node) -> bytes:
        if node.kind != stat.S_IFLNK:
            raise Errno(errno.EINVAL)
        if node.role == LATEST:
            return node.target
        assert node.entry is not None
        return bytes(View.readlink(node.entry))

    # --- files --------------------------------------------------------------------------
    def refs(self, node: Node) -> tuple[ChunkRef, ...]:
        """A regular file's chunk list, loaded once (the engine holds its lease first)."""
        if node.refs is None:
            e = node.entry
            if node.kind != stat.S_IFREG or e is None:
                raise Errno(errno.EISDIR if node.kind == stat.S_IFDIR else errno.EINVAL)
            refs = self.view.chunks(e.content_id) if e.content_id is not None else ()
            cs = self.view.chunk_size
            if len(refs) != (e.size + cs - 1) // cs:
                if self.view.entry(e.id) is None:  # its version was removed (and purged)
                    raise Errno(errno.ENOENT)
                raise IntegrityError(f"entry {e.id} ({e.name!r}): {len(refs)} chunks in the "
                                     f"index for {e.size} bytes")
            node.refs = refs
        return node.refs
