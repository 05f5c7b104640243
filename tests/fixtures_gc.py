"""Helpers for gc/verify/crash tests: small stores made fast, readers, lease holders.

``add_version`` writes a version the way an install does (store lock SHARED, blobs written and
synced, then all rows in one transaction, file-level dedup against committed contents) but
from an in-memory ``{path: bytes}`` tree, so a test can make dozens of versions in a second.
``hash_version`` reads every file of a version back through rows + BlobStore (as the view
does) and returns {path: sha256}. ``lease_holder`` starts a real process holding a lease.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from jbl.store import rows
from jbl.store.blobs import BlobStore
from jbl.store.db import DB
from jbl.store.store import Store

MANIFEST = ("name: {name}\nversion: {version}\ndescription: synthetic\n"
            "mounts:\n  - source: isolated\n    target: /\n    readonly: true\n")


def files_for(version: str, shared: int = 20, own: int = 5, big: bool = False) -> dict[str, bytes]:
    """A tree: ``shared`` files identical in every version, ``own`` unique to ``version``."""
    files = {f"isolated/lib/shared{i}.py": f"shared {i}\n".encode() * 50 for i in range(shared)}
    files.update({f"isolated/app/v{i}.txt": f"{version} file {i}\n".encode() * 40
                  for i in range(own)})
    if big:  # spans several chunks when the store's chunk size is small
        files["isolated/data/big.bin"] = hashlib.sha256(version.encode()).digest() * 100_000
    return files


def add_version(store_dir: Path, name: str, version: str, files: dict[str, bytes] | None = None,
                *, installed_at: float | None = None, last_used_at: float | None = None,
                pinned: bool = False) -> int:
    """Install a synthetic version; returns its id."""
    files = files_for(version) if files is None else files
    with Store.open(store_dir, create=True) as store:
        cs = store.chunk_size
        db = store.db
        manifest = MANIFEST.format(name=name, version=version)
        tree = {"runtime.yml": manifest.encode(), **files}
        with store.install_lock():
            new_blobs: dict[bytes, tuple[int, int, int]] = {}
            bodies: dict[bytes, list[bytes]] = {}
            for data in tree.values():
                cd = hashlib.sha256(data).digest()
                if cd in bodies or db.scalar("SELECT 1 FROM contents WHERE digest=?", (cd,)):
                    continue
                chunks = [data[i:i + cs] for i in range(0, len(data), cs)]
                digests = []
                for ch in chunks:
                    bd = hashlib.sha256(ch).digest()
                    digests.append(bd)
                    if bd in new_blobs or db.scalar("SELECT 1 FROM blobs WHERE digest=?", (bd,)):
                        continue
                    codec, stored = BlobStore.encode(ch)
                    store.blobs.write(bd, stored)
                    new_blobs[bd] = (len(ch), len(stored), codec)
                bodies[cd] = digests
            store.blobs.sync()
            with db.write():
                vid = _commit_rows(db, name, version, tree, new_blobs, bodies,
                                   installed_at=installed_at, last_used_at=last_used_at,
                                   pinned=pinned)
        return vid


def _commit_rows(db: DB, name: str, version: str, tree: dict[str, bytes],
                 new_blobs: dict[bytes, tuple[int, int, int]], bodies: dict[bytes, list[bytes]],
                 *, installed_at: float | None, last_used_at: float | None,
                 pinned: bool) -> int:
    """Every row of a synthetic version, through the store's one row writer."""
    now = time.time()
    blob_ids = {bytes(d): i for d, i in db.query("SELECT digest, id FROM blobs")}
    blob_rows = []
    for bd, (size, ssize, codec) in new_blobs.items():
        if bd not in blob_ids:  # another install may have committed it meanwhile
            blob_ids[bd] = rows.next_id(db, "blobs") + len(blob_rows)
            blob_rows.append(rows.BlobRow(blob_ids[bd], bd, size, ssize, codec, now))
    rows.insert_blobs(db, blob_rows)
    content_ids = {bytes(d): i for d, i in db.query("SELECT digest, id FROM contents")}
    contents: list[rows.ContentRow] = []
    chunks: list[rows.ChunkRow] = []
    for data in tree.values():
        cd = hashlib.sha256(data).digest()
        if cd not in content_ids:
            cid = content_ids[cd] = rows.next_id(db, "contents") + len(contents)
            contents.append(rows.ContentRow(cid, cd, len(data), len(bodies[cd])))
            chunks.extend(rows.ChunkRow(cid, seq, blob_ids[bd])
                          for seq, bd in enumerate(bodies[cd]))
    rows.insert_contents(db, contents, chunks)
    entries: list[rows.EntryRow] = []
    first = rows.next_id(db, "entries")
    mtime = time.time_ns()

    def entry(parent: int | None, name: bytes, kind: int, size: int = 0,
              content_id: int | None = None) -> int:
        mode = 0o755 if kind == stat.S_IFDIR else 0o644
        entries.append(rows.EntryRow(first + len(entries), parent, name, kind, mode,
                                     mtime_ns=mtime, size=size, content_id=content_id))
        return entries[-1].id

    dirs: dict[str, int] = {"": entry(None, b"", stat.S_IFDIR)}
    for path in sorted(tree):
        parent = ""
        for part in path.split("/")[:-1]:
            here = f"{parent}/{part}" if parent else part
            if here not in dirs:
                dirs[here] = entry(dirs[parent], part.encode(), stat.S_IFDIR)
            parent = here
        data = tree[path]
        entry(dirs[parent], path.rsplit("/", 1)[-1].encode(), stat.S_IFREG, len(data),
              content_ids[hashlib.sha256(data).digest()])
    version_row = rows.VersionRow(
        name, version, MANIFEST.format(name=name, version=version), installed_at or now,
        source="synthetic", file_count=len(tree), logical_size=sum(map(len, tree.values())),
        last_used_at=last_used_at, pinned=pinned)
    return rows.insert_version_tree(db, version_row, entries)


def hash_version(store: Store, version_id: int) -> dict[str, str]:
    """{path: sha256 hex} of every regular file of a version, read through rows + blobs."""
    db = store.db
    out: dict[str, str] = {}
    paths: dict[int, str] = {}
    for eid, parent, name, kind, cid in db.query(
            "SELECT id, parent_id, name, kind, content_id FROM entries WHERE version_id=? "
            "ORDER BY id", (version_id,)):
        path = "" if parent is None else (paths[parent] + "/" + name.decode()).lstrip("/")
        paths[eid] = path
        if kind != stat.S_IFREG:
            continue
        h = hashlib.sha256()
        for digest, size, codec in db.query(
                "SELECT b.digest, b.size, b.codec FROM chunks c JOIN blobs b ON b.id = c.blob_id "
                "WHERE c.content_id=? ORDER BY c.seq", (cid,)):
            h.update(store.blobs.read(digest, codec, size))
        out[path] = h.hexdigest()
    return out


def expected_hashes(files: dict[str, bytes], name: str, version: str) -> dict[str, str]:
    tree = {"runtime.yml": MANIFEST.format(name=name, version=version).encode(), **files}
    return {p: hashlib.sha256(d).hexdigest() for p, d in tree.items()}


def lease_holder(store_dir: Path, spec: str) -> subprocess.Popen[str]:
    """A real process that leases ``spec`` (as a job would) until its stdin closes."""
    code = textwrap.dedent(f"""
        import sys
        from jbl.store.store import Store
        with Store.open({str(store_dir)!r}) as s:
            info = s.resolve_installed({spec!r})
            with s.lease(info.id, "job"):
                print("leased", flush=True)
                sys.stdin.read()
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    try:
        assert p.stdout.readline().strip() == "leased"
    except BaseException:
        with p:  # pipes closed, process waited for
            p.kill()
        raise
    return p


def age(path: Path, seconds: float) -> None:
    """Make a file look ``seconds`` old."""
    t = time.time() - seconds
    os.utime(path, (t, t))


def make_runtime_dir(dest: Path, name: str, version: str, files: dict[str, bytes]) -> Path:
    """A small Joblet-format runtime directory (runtime.yml + isolated/...)."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "runtime.yml").write_text(MANIFEST.format(name=name, version=version))
    for rel, data in files.items():
        p = dest / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return dest


def make_tarball(base: Path, name: str, version: str, files: dict[str, bytes]) -> Path:
    """``base/NAME-VERSION.tar.gz`` of a small runtime (runtime.yml under one top dir)."""
    top = f"{name}-{version}"
    make_runtime_dir(base / "src" / top, name, version, files)
    out = base / f"{top}.tar.gz"
    subprocess.run(["tar", "-C", str(base / "src"), "-czf", str(out), top], check=True)
    return out
