"""Publishing a version's content-addressed form (store/casformat.py) beside its tarball.

``Publisher`` ingests each tarball into a scratch store of its own (on /dev/shm when it has
room, else in $TMPDIR; removed once published) with the store's own chunker and codec rules
(store/ingest.py: the very checks an install makes, so nothing a node would refuse is
published), exports the version from the scratch index, and writes through a ``Target``:
objects first, then packs, then the tree; ``jbl registry add`` writes ``registry.json``
last, so no cache ever stores a "not found" for something about to exist. An object, pack
or tree already published is not written again (a later version uploads only what is new),
and small objects already in a published pack are listed in that pack rather than packed
again: only the objects new since the versions published before go into new packs
(OSTree's static deltas). When a cold install through those packs would be dear (old packs
full of objects this version dropped; ``casformat.needs_full``), the version also gets a full
set: packs of all its small objects, which a cold install fetches instead (OSTree's "from
scratch" deltas). Full sets are never reused by later versions, so a version re-published
gets the very tree it got (nothing new is written).

Targets (a directory, an S3 bucket) and the Fetcher that reads back the trees already
published are store/transport.py's. Not for concurrent use on one registry (as
``registry_add``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any

from . import casformat as cf
from .errors import JblError, UsageError
from .ingest import ingest
from .limits import Limits
from .store import Store
from .transport import Fetcher, Target

# A tmpfs for the scratch store when it has room: a version's blobs are written, read back
# once and removed, and on a disk each of those thousands of files costs a metadata write
# twice (ML runtime, 9,600 objects: ~20 s of a 60 s publish went to removing them).
SHM = "/dev/shm"
_SHM_FACTOR = 8  # decoded bytes are ~3x a .tar.gz, stored ~1.2x: 8x leaves a wide margin


def _scratch_parent(tarball: Path) -> str | None:
    """/dev/shm when it is a directory with room for the tarball's scratch store (and then
    some), else None (the temp directory, $TMPDIR)."""
    try:
        st = os.statvfs(SHM)
        size = tarball.stat().st_size
    except OSError:
        return None
    room = st.f_bavail * st.f_frsize
    return SHM if room >= _SHM_FACTOR * size + (256 << 20) else None


class Publisher:
    """Publishes versions through ``target``, each through a scratch store of its own
    (removed once the version is published); a context manager."""

    def __init__(self, target: Target, published: Fetcher) -> None:
        self.target = target
        self.published = published  # reads what the target holds (old trees)
        self.known: cf.Known = {}
        self.written = {"objects": 0, "packs": 0, "trees": 0, "bytes": 0}  # by this publisher

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        pass  # each scratch store is gone when its publish() returns

    def learn(self, doc: dict[str, Any]) -> None:
        """Remember which packs the registry's published trees list (``doc`` is its
        registry.json), so that objects already packed are not packed again. A tree that
        is missing or unreadable is only not reused."""
        for vers in doc.get("runtimes", {}).values():
            for e in vers.values():
                ref = e.get("tree") if isinstance(e, dict) else None
                if not isinstance(ref, dict) or not isinstance(ref.get("url"), str):
                    continue
                try:
                    data = self.published.get(ref["url"], max_size=cf.MAX_TREE_STORED)
                    self.known.update(cf.known_packs(cf.parse_tree(data, Limits())))
                except JblError:
                    continue  # missing or unreadable: its packs are only not reused

    def _put(self, relpath: str, data: Callable[[], bytes], kind: str) -> None:
        if not self.target.exists(relpath):
            body = data()
            self.target.put(relpath, body, immutable=True)
            self.written[kind] += 1
            self.written["bytes"] += len(body)

    def publish(self, tarball: Path) -> dict[str, Any]:
        """Publish one tarball's version; return registry.json's ``tree`` value for it
        (``written`` counts what was new)."""
        tmp = Path(tempfile.mkdtemp(prefix="jbl-publish-", dir=_scratch_parent(tarball)))
        try:
            with Store.open(tmp / "store", create=True) as scratch:
                return self._publish(scratch, tarball)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _publish(self, scratch: Store, tarball: Path) -> dict[str, Any]:
        res = ingest(scratch, tarball, source=str(tarball), check_arch=False)
        tree = export(scratch, res.version.id, res.version.checksum)
        read = scratch.blobs.read_stored
        for o in tree.objects:
            self._put(cf.object_path(o.digest), partial(read, o.digest), "objects")
        small = [i for i in _first_use(tree) if tree.objects[i].size < tree.chunk_size]
        tree.packs, new = cf.build_packs(tree.objects, read, self.known, small)
        for digest, data in new.items():
            self._put(cf.pack_path(digest), partial(bytes, data), "packs")
        for group in cf.needs_full(tree, small):  # one pack in memory at a time
            pack, data = cf.fill_pack(tree.objects, read, group)
            self._put(cf.pack_path(pack.digest), partial(bytes, data), "packs")
            tree.full.append(pack)
        data = cf.dump_tree(tree)
        digest = cf.sha256(data)
        self._put(cf.tree_path(digest), partial(bytes, data), "trees")
        self.known.update(cf.known_packs(tree))
        return {"url": cf.tree_path(digest), "sha256": digest.hex(), "size": len(data)}


def _first_use(tree: cf.Tree) -> list[int]:
    """Object indexes in the order the entries use them (one directory's files together)."""
    seen: dict[int, None] = {}
    for e in tree.entries:
        if e.body >= 0 and e.link < 0:
            for i in tree.bodies[e.body].chunks:
                seen.setdefault(i, None)
    return list(seen)


def export(store: Store, version_id: int, checksum: str) -> cf.Tree:
    """A version of ``store`` as a tree: its entries in id order (the readdir order an
    install recreates), its bodies and their chunk objects, each in first-use order."""
    db = store.db
    v = db.one("SELECT name, version FROM versions WHERE id=?", (version_id,))
    if v is None:
        raise UsageError(f"internal: version {version_id} vanished from the scratch store")
    tree = cf.Tree(str(v[0]), str(v[1]), checksum, store.chunk_size)
    index: dict[int, int] = {}
    bodies: dict[int, int] = {}
    objects: dict[bytes, int] = {}
    for (eid, parent, name, kind, mode, uid, gid, mtime, size, cid, target,
         link) in db.query("SELECT id, parent_id, name, kind, mode, uid, gid, mtime_ns, size, "
                           "content_id, target, link_id FROM entries WHERE version_id=? "
                           "ORDER BY id", (version_id,)):
        index[eid] = len(tree.entries)
        body = -1
        if cid is not None and cid not in bodies:
            bodies[cid] = len(tree.bodies)
            tree.bodies.append(_export_body(store, cid, tree, objects))
        if cid is not None:
            body = bodies[cid]
        tree.entries.append(cf.Entry(
            -1 if parent is None else index[parent], bytes(name), kind, mode, uid, gid, mtime,
            size, body, -1 if link is None or link == eid else index[link],
            None if target is None else bytes(target)))
    return tree


def _export_body(store: Store, content_id: int, tree: cf.Tree,
                 objects: dict[bytes, int]) -> cf.Body:
    row = store.db.one("SELECT digest, size FROM contents WHERE id=?", (content_id,))
    assert row is not None  # the entry's content row, in the same database
    digest, size = row
    chunks = []
    for d, bsize, stored, codec in store.db.query(
            "SELECT b.digest, b.size, b.stored_size, b.codec FROM chunks c JOIN blobs b "
            "ON b.id = c.blob_id WHERE c.content_id=? ORDER BY c.seq", (content_id,)):
        d = bytes(d)
        if d not in objects:
            objects[d] = len(tree.objects)
            tree.objects.append(cf.Obj(d, bsize, stored, codec))
        chunks.append(objects[d])
    return cf.Body(bytes(digest), size, tuple(chunks))
