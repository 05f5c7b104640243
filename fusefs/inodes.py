"""Inode numbers for the mounted tree, and the in-memory nodes the kernel currently knows.

The scheme (docs/mount.md explains why):

    1                         the mount root (pyfuse3.ROOT_INODE)
    [2, 2**32)                synthetic nodes: one directory per runtime name, one ``latest``
                              symlink per (name, target); numbered in order of first use
    2**32 + entry id          directories, symlinks, and hardlinked regular files (by the id of
                              the first entry of the link group, so every link is one inode with
                              the group's ``nlink``)
    [2**62, 2**63)            other regular files: a 62-bit hash of (content id, mode, uid, gid,
                              mtime_ns), so the same file in every version is the same inode and
                              shares the kernel page cache; a collision (never seen, ~n**2/2**63)
                              probes to the next free number

A ``Node`` carries everything a handler needs (attributes, the entry, the chunk list once
opened), so a version removed while the kernel still holds its inodes keeps working from
memory. Nodes live while the kernel's lookup count or an open handle refers to them.

Thread-safety: the engine's request thread only (pyfuse3: the trio thread); no locks.
"""

from __future__ import annotations

import hashlib
import stat
from dataclasses import dataclass, field
from typing import NewType, cast

from jbl.store.view import ChunkRef, Entry

Inode = NewType("Inode", int)

ROOT_INODE = Inode(1)
SYNTH_LIMIT = 1 << 32
ENTRY_BASE = 1 << 32
CONTENT_BASE = 1 << 62
_CONTENT_MASK = (1 << 62) - 1

# Kinds of node, beyond the entry kinds (stat.S_IFDIR/S_IFREG/S_IFLNK) a node may carry.
ROOT = "root"
NAME_DIR = "name"
LATEST = "latest"
ENTRY = "entry"


@dataclass(slots=True)
class Node:
    inode: Inode
    role: str                     # ROOT | NAME_DIR | LATEST | ENTRY
    kind: int                     # stat.S_IFDIR | S_IFREG | S_IFLNK
    attr: object                  # pyfuse3.EntryAttributes (ops.py) or packed replies
                                  # (rawfs.py), built once (content is immutable)
    entry: Entry | None = None    # ENTRY: the most recently seen entry with this inode
    name: str = ""                # NAME_DIR/LATEST: the runtime name
    target: bytes = b""           # LATEST: the symlink target (a version string)
    nlookup: int = 0              # the kernel's lookup count
    nopen: int = 0                # open file/dir handles
    refs: tuple[ChunkRef, ...] | None = field(default=None)  # chunk list, loaded on open

    @property
    def version_id(self) -> int | None:
        return self.entry.version_id if self.entry is not None else None


def entry_key(e: Entry) -> tuple[str, object]:
    """What makes two entries the same inode."""
    if e.kind == stat.S_IFREG and e.nlink <= 1:
        return ("c", (e.content_id, e.mode, e.uid, e.gid, e.mtime_ns))
    return ("e", e.link_id or e.id)


class InodeTable:
    def __init__(self) -> None:
        self.nodes: dict[int, Node] = {}
        self._by_key: dict[tuple[str, object], Inode] = {}
        self._key_of: dict[int, tuple[str, object]] = {}
        self._next_synth = 2

    def get(self, inode: int) -> Node | None:
        return self.nodes.get(inode)

    def find(self, key: tuple[str, object]) -> Node | None:
        ino = self._by_key.get(key)
        return None if ino is None else self.nodes.get(ino)

    def number(self, key: tuple[str, object]) -> Inode:
        """The inode for ``key``: the existing one, or a fresh one by the scheme above."""
        ino = self._by_key.get(key)
        if ino is not None:
            return ino
        tag, val = key
        if tag == "e":
            ino = Inode(ENTRY_BASE + cast(int, val))
        elif tag == "c":
            h = int.from_bytes(hashlib.blake2b(repr(val).encode(), digest_size=8).digest(),
                               "little")
            n = CONTENT_BASE | (h & _CONTENT_MASK)
            while n in self._key_of:
                n = CONTENT_BASE | ((n + 1) & _CONTENT_MASK)
            ino = Inode(n)
        else:
            ino = Inode(self._next_synth)
            self._next_synth += 1
            if self._next_synth >= SYNTH_LIMIT:  # pragma: no cover - 4 billion names
                raise OverflowError("synthetic inode space exhausted")
        self._by_key[key] = ino
        self._key_of[ino] = key
        return ino

    def peek(self, key: tuple[str, object]) -> int:
        """The number ``key`` has or would get, without reserving it (plain READDIR's ``ino``:
        the kernel takes no reference, so nothing must be kept). Synthetic keys: 0."""
        ino = self._by_key.get(key)
        if ino is not None:
            return ino
        tag, val = key
        if tag == "e":
            return ENTRY_BASE + cast(int, val)
        if tag == "c":
            h = int.from_bytes(hashlib.blake2b(repr(val).encode(), digest_size=8).digest(),
                               "little")
            n = CONTENT_BASE | (h & _CONTENT_MASK)
            while n in self._key_of:
                n = CONTENT_BASE | ((n + 1) & _CONTENT_MASK)
            return n
        return 0

    def add(self, key: tuple[str, object], node: Node) -> Node:
        self.nodes[node.inode] = node
        self._by_key[key] = node.inode
        self._key_of[node.inode] = key
        return node

    def forget(self, inode: int, n: int) -> Node | None:
        """Drop ``n`` kernel references; returns the node if it is now gone."""
        node = self.nodes.get(inode)
        if node is None or inode == ROOT_INODE:
            return None
        node.nlookup = max(0, node.nlookup - n)
        return self.maybe_drop(node)

    def maybe_drop(self, node: Node) -> Node | None:
        if node.nlookup > 0 or node.nopen > 0 or node.inode == ROOT_INODE:
            return None
        self.nodes.pop(node.inode, None)
        key = self._key_of.pop(node.inode, None)
        if key is not None and self._by_key.get(key) == node.inode:
            del self._by_key[key]
        return node
