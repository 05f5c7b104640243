"""The content-addressed form of a published version: layout, the tree document, packs.

Beside a registry's tarballs, ``jbl registry add`` publishes (docs/fleet.md, "Format"):

* ``objects/<hex[:2]>/<hex>``: one blob exactly as a store keeps it (raw, or one zstd
  frame), named by the sha256 of its DECODED bytes, so a node checks it by decoding and
  hashing and writes it into its blobs without recompressing;
* ``packs/<hex>.pack``: immutable concatenations of small objects' stored bytes (at most
  ``PACK_MAX`` bytes), named by the sha256 of the pack file; which object lies where is in
  the trees that use the pack;
* ``trees/<hex>``: one zstd-compressed JSON document per version, named by the sha256 of its
  compressed bytes: every entry with its attributes, every body's chunk objects, the packs
  holding its small objects (each listed in the pack it was first published in: the delta
  packs) and, when those would make a cold install dear, a *full set*: packs of all its small
  objects and nothing else (OSTree's "from scratch" deltas; ``needs_full``).

This module owns those names, the tree's encoding (``dump_tree``) and its reading
(``parse_tree``), which bounds sizes, counts and depth and applies the rules tarball ingest
applies to members (store/tarstream.py ``check_name``: no ``..``, no ``/`` in a name, no
control characters, no whiteouts; only directories, regular files and symlinks; no
setuid/setgid), and the fetch plan (``plan_fetch``: whole packs or single objects, never a
range; the delta packs or the full set, whichever costs less). Pure: no network, no files;
thread-safe.
"""

from __future__ import annotations

import hashlib
import json
import re
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import zstandard

from . import tarstream as ts
from .blobs import CODEC_RAW, CODEC_ZSTD, MAX_WINDOW_LOG
from .digest import EMPTY
from .errors import IntegrityError, LimitExceeded, UnsafeArchive
from .limits import ID_MAX, MTIME_MAX_NS, Limits
from .manifest import MANIFEST_NAME
from .regformat import MAX_TREE_SIZE

FORMAT = 1
OBJECTS = "objects"
PACKS = "packs"
TREES = "trees"
PACK_MAX = 4 << 20          # stock squid stores no object above 4 MB
TREE_LEVEL = 9              # trees are fetched by every node: worth a denser frame
MAX_TREE_STORED = MAX_TREE_SIZE  # a tree's compressed bytes (registry.json's "size" too)
# Its JSON, held in memory while it is checked: ~250 bytes a file (entry, body, object), so
# a runtime of 1M files fits; far more than any real runtime, far less than a host's memory.
MAX_TREE_DECODED = 256 << 20
# What one request costs in bytes' worth of transfer when choosing a whole pack over the
# single objects lacking from it (latency + headers; OSTree/Flatpak measured 3-15x slower
# object-by-object pulls): a pack is fetched when its size is below the lacking objects'
# bytes plus this much per object saved.
REQUEST_COST = 128 << 10
# A version gets a full set when a cold install through the packs its small objects are
# listed in (old delta packs, full of objects later versions dropped) would cost more than
# this times the full set: the 10-version series' cold installs went from up to 2.27x the
# tarball to <= 1.11x, at ~0.7x a tarball of origin storage per version (docs/fleet.md).
FULL_TRIGGER = 1.05
_HEX_RE = re.compile(r"[0-9a-f]{64}")
_KINDS = {"d": stat.S_IFDIR, "f": stat.S_IFREG, "l": stat.S_IFLNK}
_LETTER = {v: k for k, v in _KINDS.items()}
_MAX_MANIFEST = 1 << 20  # as ingest: runtime.yml is read into memory


def object_path(digest: bytes) -> str:
    h = digest.hex()
    return f"{OBJECTS}/{h[:2]}/{h}"


def pack_path(digest: bytes) -> str:
    return f"{PACKS}/{digest.hex()}.pack"


def tree_path(digest: bytes) -> str:
    return f"{TREES}/{digest.hex()}"


# ------------------------------------------------------------------------------ the model
@dataclass(frozen=True, slots=True)
class Obj:
    digest: bytes       # sha256 of the decoded bytes
    size: int           # decoded bytes
    stored_size: int    # bytes as published (and as written into the blobs)
    codec: int          # blobs.CODEC_*


@dataclass(frozen=True, slots=True)
class Body:
    digest: bytes               # sha256 of the whole body
    size: int
    chunks: tuple[int, ...]     # indexes into Tree.objects, in order


@dataclass(frozen=True, slots=True)
class Entry:
    parent: int         # index of its directory in Tree.entries; -1 for the root only
    name: bytes
    kind: int           # stat.S_IFDIR | S_IFREG | S_IFLNK
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    size: int
    body: int = -1              # regular files: index into Tree.bodies
    link: int = -1              # a hardlink: the index of its group's first entry
    target: bytes | None = None  # symlinks


@dataclass(frozen=True, slots=True)
class Pack:
    digest: bytes
    size: int
    members: tuple[tuple[int, int], ...]  # (object index, offset); length = stored_size


@dataclass
class Tree:
    name: str
    version: str
    checksum: str       # the version's tarball ("sha256:<hex>"): recorded as a tarball install
    chunk_size: int
    objects: list[Obj] = field(default_factory=list)
    bodies: list[Body] = field(default_factory=list)
    entries: list[Entry] = field(default_factory=list)
    packs: list[Pack] = field(default_factory=list)
    full: list[Pack] = field(default_factory=list)  # all small objects again, or none

    def nlinks(self) -> list[int]:
        """Each entry's link count as ingest records it: a directory 2 + its subdirectories,
        a regular file its link group's size, a symlink 1."""
        n = [2 if e.kind == stat.S_IFDIR else 1 for e in self.entries]
        for e in self.entries:
            if e.kind == stat.S_IFDIR and e.parent >= 0:
                n[e.parent] += 1
            if e.link >= 0:
                n[e.link] += 1
        for i, e in enumerate(self.entries):
            if e.link >= 0:
                n[i] = n[e.link]
        return n

    def manifest_entry(self) -> int:
        """The index of the root's runtime.yml (checked by ``parse_tree`` to exist)."""
        for i, e in enumerate(self.entries):
            if e.parent == 0 and e.name == MANIFEST_NAME.encode():
                return i
        raise UnsafeArchive(f"no {MANIFEST_NAME} at the tree's root")


# ------------------------------------------------------------------------------ writing
def dump_tree(tree: Tree) -> bytes:
    """The tree's published bytes (zstd JSON; deterministic for the same tree)."""
    doc = {
        "jbl_tree": FORMAT, "name": tree.name, "version": tree.version,
        "checksum": tree.checksum, "chunk_size": tree.chunk_size,
        "objects": [[o.digest.hex(), o.size, o.stored_size, o.codec] for o in tree.objects],
        "bodies": [[b.digest.hex(), b.size, list(b.chunks)] for b in tree.bodies],
        "entries": [[e.parent, e.name.decode("utf-8", "surrogateescape"), _LETTER[e.kind],
                     e.mode, e.uid, e.gid, e.mtime_ns, e.size,
                     e.target.decode("utf-8", "surrogateescape") if e.target is not None
                     else [e.body, e.link] if e.kind == stat.S_IFREG else None]
                    for e in tree.entries],
        "packs": [[p.digest.hex(), p.size, [list(m) for m in p.members]] for p in tree.packs],
    }
    if tree.full:  # absent otherwise: a tree published before full sets reads the same
        doc["full"] = [[p.digest.hex(), p.size, [list(m) for m in p.members]]
                       for p in tree.full]
    text = json.dumps(doc, separators=(",", ":")).encode()
    return zstandard.ZstdCompressor(level=TREE_LEVEL).compress(text)


# Where a published small object already lies: its pack's digest and size, and its offset.
Known = dict[bytes, tuple[bytes, int, int]]


Reader = Callable[[bytes], bytes]  # an object's stored bytes by digest


def group_packs(objects: list[Obj], indexes: Iterable[int]) -> list[list[int]]:
    """``indexes`` in order, cut into packs of at most PACK_MAX stored bytes."""
    groups: list[list[int]] = []
    size = PACK_MAX
    for i in indexes:
        if size + objects[i].stored_size > PACK_MAX:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += objects[i].stored_size
    return groups


def fill_pack(objects: list[Obj], read: Reader, group: list[int]) -> tuple[Pack, bytes]:
    """One pack of the objects ``group`` (their stored bytes, in order) and its bytes."""
    members, parts, off = [], [], 0
    for i in group:
        members.append((i, off))
        parts.append(read(objects[i].digest))
        off += objects[i].stored_size
    data = b"".join(parts)
    return Pack(hashlib.sha256(data).digest(), len(data), tuple(members)), data


def build_packs(objects: list[Obj], read: Reader, known: Known,
                indexes: Iterable[int]) -> tuple[list[Pack], dict[bytes, bytes]]:
    """Packs for the small objects ``indexes`` (in that order, so that one directory's files
    share a pack): an object already in a published pack (``known``) is listed there; the
    rest (the objects new since the versions published before) fill new packs of at most
    PACK_MAX bytes. Returns every pack the tree lists (in the order of their first objects,
    so that a version published again gets the same tree) and the new packs' bytes by
    digest."""
    old: dict[bytes, tuple[int, list[tuple[int, int]]]] = {}
    fresh: list[int] = []
    indexes = list(indexes)
    for i in indexes:
        o = objects[i]
        if o.digest in known:
            pd, psize, off = known[o.digest]
            old.setdefault(pd, (psize, []))[1].append((i, off))
        else:
            fresh.append(i)
    packs = [Pack(d, psize, tuple(m)) for d, (psize, m) in old.items()]
    new: dict[bytes, bytes] = {}
    for group in group_packs(objects, fresh):
        pack, data = fill_pack(objects, read, group)
        new[pack.digest] = data
        packs.append(pack)
    rank = {i: n for n, i in enumerate(indexes)}
    return sorted(packs, key=lambda p: rank[p.members[0][0]]), new


def needs_full(tree: Tree, small: list[int]) -> list[list[int]]:
    """The groups of a full set for ``tree`` (its ``small`` objects in order), or [] when a
    cold install through ``tree.packs`` costs at most FULL_TRIGGER times the full set (by
    bytes plus REQUEST_COST a request, as ``plan_fetch`` weighs them)."""
    groups = group_packs(tree.objects, small)
    via = _cheapest(tree, tree.packs, set(small))
    full = sum(tree.objects[i].stored_size for i in small) + REQUEST_COST * len(groups)
    return groups if via.cost > FULL_TRIGGER * full else []


def known_packs(tree: Tree) -> Known:
    """Where ``tree``'s packed objects lie in its delta packs (a publisher's view of what is
    published; full sets are not reused: a version re-published gets the tree it got)."""
    return {tree.objects[i].digest: (p.digest, p.size, off)
            for p in tree.packs for i, off in p.members}


# ------------------------------------------------------------------------------ reading
def _fail(why: str, what: str | None = None) -> UnsafeArchive:
    return UnsafeArchive(f"content-addressed tree: {why}", what)


def _int(v: Any, lo: int, hi: int, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _fail(f"{what} must be an integer in {lo}..{hi} (got {str(v)[:40]!r})")
    return v


def _list(v: Any, most: int, what: str) -> list[Any]:
    if not isinstance(v, list):
        raise _fail(f"{what} must be a list")
    if len(v) > most:
        raise LimitExceeded(f"content-addressed tree: more than {most} {what}")
    return v


def _hex(v: Any, what: str) -> bytes:
    if not isinstance(v, str) or not _HEX_RE.fullmatch(v):
        raise _fail(f"{what} must be 64 lowercase hex digits")
    return bytes.fromhex(v)


def decode_tree(data: bytes) -> dict[str, Any]:
    """The JSON document inside a tree's published bytes, bounded (decoded size, window)."""
    try:
        dctx = zstandard.ZstdDecompressor(max_window_size=1 << MAX_WINDOW_LOG)
        with dctx.stream_reader(data) as r:
            text = r.read(MAX_TREE_DECODED + 1)
    except zstandard.ZstdError as e:
        raise _fail(f"not a zstd frame ({e})") from None
    if len(text) > MAX_TREE_DECODED:
        raise LimitExceeded(f"content-addressed tree: more than {MAX_TREE_DECODED} bytes "
                            "decoded")
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise _fail(f"not JSON ({str(e)[:120]})") from None
    if not isinstance(doc, dict) or doc.get("jbl_tree") != FORMAT:
        raise _fail(f"not a jbl tree of format {FORMAT}")
    return doc


def parse_tree(data: bytes, limits: Limits) -> Tree:
    """Read and check a tree's published bytes (its digest is checked by the caller)."""
    doc = decode_tree(data)
    name, version, checksum = doc.get("name"), doc.get("version"), doc.get("checksum")
    if not all(isinstance(x, str) and len(x) <= 200 for x in (name, version, checksum)):
        raise _fail("name, version and checksum must be strings")
    assert isinstance(name, str) and isinstance(version, str) and isinstance(checksum, str)
    chunk = _int(doc.get("chunk_size"), 4096, 64 << 20, "chunk_size")
    tree = Tree(name, version, checksum, chunk)
    most = limits.max_entries
    tree.objects = [_object(o, chunk) for o in _list(doc.get("objects"), 4 * most, "objects")]
    tree.bodies = [_body(b, tree) for b in _list(doc.get("bodies"), most, "bodies")]
    # Ingest's bounds on what a runtime's bodies may add up to, before anything is fetched.
    if any(b.size > limits.max_file_size for b in tree.bodies):
        raise LimitExceeded(f"content-addressed tree: a file larger than "
                            f"{limits.max_file_size} bytes")
    if sum(b.size for b in tree.bodies) > limits.max_total_size:
        raise LimitExceeded(f"content-addressed tree: files larger than "
                            f"{limits.max_total_size} bytes in all")
    if len({o.digest for o in tree.objects}) != len(tree.objects) or \
            len({b.digest for b in tree.bodies}) != len(tree.bodies):
        raise _fail("an object or body digest is listed twice")
    _entries(tree, _list(doc.get("entries"), most, "entries"), limits)
    tree.packs = [_pack(p, tree) for p in _list(doc.get("packs"), 4 * most, "packs")]
    tree.full = [_pack(p, tree) for p in _list(doc.get("full", []), 4 * most, "full packs")]
    m = tree.entries[tree.manifest_entry()]
    if m.kind != stat.S_IFREG or m.link >= 0 or m.size > _MAX_MANIFEST:
        raise _fail(f"{MANIFEST_NAME} is not a regular file of at most {_MAX_MANIFEST} bytes")
    return tree


def _object(o: Any, chunk: int) -> Obj:
    o = _list(o, 4, "object fields")
    if len(o) != 4:
        raise _fail("an object is [digest, size, stored_size, codec]")
    size = _int(o[1], 0, chunk, "an object's size")
    codec = _int(o[3], CODEC_RAW, CODEC_ZSTD, "an object's codec")
    # A zstd frame of N bytes is at most N + N/128 + 512 (ZSTD_compressBound, generously).
    most = size if codec == CODEC_RAW else size + (size >> 7) + 512
    return Obj(_hex(o[0], "an object's digest"), size,
               _int(o[2], 0, most, "an object's stored_size"), codec)


def _body(b: Any, tree: Tree) -> Body:
    b = _list(b, 3, "body fields")
    if len(b) != 3:
        raise _fail("a body is [digest, size, [object indexes]]")
    digest = _hex(b[0], "a body's digest")
    size = _int(b[1], 0, 1 << 62, "a body's size")
    chunks = tuple(_int(i, 0, len(tree.objects) - 1, "a chunk's object index")
                   for i in _list(b[2], -(-size // tree.chunk_size), "chunks of a body"))
    sizes = [tree.objects[i].size for i in chunks]
    if sum(sizes) != size or len(chunks) != -(-size // tree.chunk_size) or \
            any(s != tree.chunk_size for s in sizes[:-1]):
        raise _fail(f"body {digest.hex()}: its chunks do not add up to {size} bytes of "
                    f"{tree.chunk_size}-byte chunks")
    if (size == 0 and digest != EMPTY) or \
            (len(chunks) == 1 and digest != tree.objects[chunks[0]].digest):
        raise _fail(f"body {digest.hex()}: its digest is not its only chunk's")
    return Body(digest, size, chunks)


def _pack(p: Any, tree: Tree) -> Pack:
    p = _list(p, 3, "pack fields")
    if len(p) != 3:
        raise _fail("a pack is [digest, size, [[object index, offset]...]]")
    size = _int(p[1], 1, PACK_MAX, "a pack's size")
    members = []
    for m in _list(p[2], PACK_MAX, "objects in a pack"):
        m = _list(m, 2, "pack member fields")
        if len(m) != 2:
            raise _fail("a pack member is [object index, offset]")
        i = _int(m[0], 0, len(tree.objects) - 1, "a pack member's object index")
        members.append((i, _int(m[1], 0, size - tree.objects[i].stored_size,
                                "a pack member's offset")))
    return Pack(_hex(p[0], "a pack's digest"), size, tuple(members))


def _entries(tree: Tree, raw: list[Any], limits: Limits) -> None:
    if not raw:
        raise _fail("no entries")
    seen: set[tuple[int, bytes]] = set()
    depth = [0] * len(raw)
    for i, e in enumerate(raw):
        e = _list(e, 9, "entry fields")
        if len(e) != 9:
            raise _fail("an entry is [parent, name, kind, mode, uid, gid, mtime_ns, size, "
                        "extra]")
        parent = _int(e[0], -1 if i == 0 else 0, i - 1, "an entry's parent")
        if not isinstance(e[1], str) or not isinstance(e[2], str) or e[2] not in _KINDS:
            raise _fail(f"entry {i}: name must be a string and kind one of d, f, l "
                        "(no devices, FIFOs or sockets)")
        name = _bytes(e[1], i)
        kind = _KINDS[e[2]]
        shown = _shown(tree, parent, name)
        if i == 0:
            if name or kind != stat.S_IFDIR:
                raise _fail("the first entry must be the root directory, named ''")
        else:
            _check_name(tree, parent, name, shown, limits)
            depth[i] = depth[parent] + 1
            if depth[i] > limits.max_depth:
                raise LimitExceeded(f"path deeper than {limits.max_depth} components", shown)
            if (parent, name) in seen:
                raise _fail("duplicate path", shown)
            seen.add((parent, name))
        tree.entries.append(_entry(tree, parent, name, kind, e, shown))


def _bytes(text: str, i: int) -> bytes:
    """A name or target as dumped (``surrogateescape``); a lone surrogate of any other
    kind is no byte at all."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise _fail(f"entry {i}: a name or target that encodes no bytes") from None


def _shown(tree: Tree, parent: int, name: bytes) -> str:
    parts = [name]
    while parent > 0:
        parts.append(tree.entries[parent].name)
        parent = tree.entries[parent].parent
    return b"/".join(reversed(parts)).decode("utf-8", "backslashreplace")


def _check_name(tree: Tree, parent: int, name: bytes, shown: str, limits: Limits) -> None:
    """A name as tarball ingest would accept it as one path component, under a directory."""
    if tree.entries[parent].kind != stat.S_IFDIR:
        raise _fail("entry under a non-directory", shown)
    if name in (b"", b".", b"..") or b"/" in name:
        raise _fail("an entry's name must be one path component (no '/', '.', '..')", shown)
    if ts.check_name(name, limits) != name.decode():
        raise _fail("an entry's name is not in normal form", shown)
    ts._check_whiteout(name.decode(), shown)  # the very rule ingest applies to members


def _entry(tree: Tree, parent: int, name: bytes, kind: int, e: list[Any], shown: str) -> Entry:
    mode = _int(e[3], 0, 0o7777, "an entry's mode")
    uid, gid = _int(e[4], 0, ID_MAX, "an entry's uid"), _int(e[5], 0, ID_MAX, "an entry's gid")
    mtime = _int(e[6], 0, MTIME_MAX_NS, "an entry's mtime_ns")
    size = _int(e[7], 0, 1 << 62, "an entry's size")
    if mode & (stat.S_ISUID | stat.S_ISGID):
        raise _fail("setuid/setgid bits (jbl publishes none)", shown)
    if kind == stat.S_IFDIR:
        if e[8] is not None or size:
            raise _fail("a directory has no size or extra field", shown)
        return Entry(parent, name, kind, mode, uid, gid, mtime, 0)
    if kind == stat.S_IFLNK:
        if not isinstance(e[8], str) or mode != 0o777:
            raise _fail("a symlink has mode 0777 and a target string", shown)
        target = _bytes(e[8], len(tree.entries))
        if not target or len(target) != size or len(target) > 4096:
            raise _fail("a symlink's size is its target's length (1..4096 bytes)", shown)
        return Entry(parent, name, kind, mode, uid, gid, mtime, size, target=target)
    extra = _list(e[8], 2, "a file's extra fields")
    if len(extra) != 2:
        raise _fail("a file's extra field is [body index, link index]", shown)
    body = _int(extra[0], 0, len(tree.bodies) - 1, "a file's body index")
    link = _int(extra[1], -1, len(tree.entries) - 1, "a file's link index")
    if tree.bodies[body].size != size:
        raise _fail(f"size {size} is not its body's {tree.bodies[body].size}", shown)
    if link >= 0:
        first = tree.entries[link]
        if first.kind != stat.S_IFREG or first.link >= 0 or first.body != body or \
                (first.mode, first.uid, first.gid, first.mtime_ns) != (mode, uid, gid, mtime):
            raise _fail("a hardlink must name an earlier regular file with its body and "
                        "attributes", shown)
    return Entry(parent, name, kind, mode, uid, gid, mtime, size, body, link)


# ------------------------------------------------------------------------------ checking
def check_object(obj: Obj, stored: bytes) -> bool:
    """Whether ``stored`` is ``obj``: its size, its codec's frame, its decoded digest."""
    from .blobs import BlobStore

    if len(stored) != obj.stored_size:
        return False
    try:
        data = BlobStore.decode(stored, obj.codec, obj.size)
    except IntegrityError:
        return False
    return hashlib.sha256(data).digest() == obj.digest


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def named_by(digest: bytes) -> Callable[[bytes], bool]:
    """A check that bytes hash to ``digest`` (packs and trees are named by their bytes)."""
    return lambda data: hashlib.sha256(data).digest() == digest


# ------------------------------------------------------------------------------ fetching
@dataclass
class Plan:
    packs: list[Pack] = field(default_factory=list)   # fetched whole
    singles: list[int] = field(default_factory=list)  # object indexes fetched alone
    fetch_bytes: int = 0

    @property
    def requests(self) -> int:
        return len(self.packs) + len(self.singles)

    @property
    def cost(self) -> int:
        return self.fetch_bytes + REQUEST_COST * self.requests


def plan_fetch(tree: Tree, lacking: set[int]) -> Plan:
    """Whole packs or single objects for the ``lacking`` object indexes: through the tree's
    packs, or through its full set when it has one, whichever costs less (bytes plus
    REQUEST_COST a request). A cold install takes the full set (the version's own small
    objects, no superseded ones); an update the delta packs of what is new."""
    plan = _cheapest(tree, tree.packs, lacking)
    if tree.full:
        other = _cheapest(tree, tree.full, lacking)
        if other.cost < plan.cost:
            return other
    return plan


def _cheapest(tree: Tree, packs: list[Pack], lacking: set[int]) -> Plan:
    """Per pack by cost: a pack is fetched when its bytes are below the lacking objects'
    bytes plus ``REQUEST_COST`` for each request it saves. Packs lacking the most bytes are
    decided first; an object is fetched once; the rest are single objects."""
    plan = Plan()
    todo = set(lacking)

    def lacking_bytes(p: Pack) -> int:
        return sum(tree.objects[i].stored_size for i in {i for i, _ in p.members} & todo)
    for p in sorted(packs, key=lacking_bytes, reverse=True):
        mine = {i for i, _ in p.members} & todo
        if not mine:
            continue
        alone = sum(tree.objects[i].stored_size for i in mine)
        if p.size < alone + REQUEST_COST * (len(mine) - 1):
            plan.packs.append(p)
            plan.fetch_bytes += p.size
            todo -= mine
    plan.singles = sorted(todo)
    plan.fetch_bytes += sum(tree.objects[i].stored_size for i in plan.singles)
    return plan
