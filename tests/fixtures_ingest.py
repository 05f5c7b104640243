"""Helpers for the ingest and pack tests: tarballs made by GNU tar (not by jbl), and a
version's tree read back from index rows + blob files (not through the FUSE view), as
``path -> attributes`` dicts that compare directly with a source directory's."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import apsw
from jbl.store.blobs import BlobStore


def gnu_tar(src: Path, out: Path, *, top: str | None = None, compress: str = "-z") -> Path:
    """A tarball made by GNU tar (pax format: nanosecond mtimes), not by jbl."""
    args = ["tar", "--format=posix", "--numeric-owner", "--sort=name", compress, "-cf", str(out)]
    if top is None:
        args += ["-C", str(src), "."]
    else:
        args += ["-C", str(src.parent), f"--transform=s,^{src.name},{top},", src.name]
    subprocess.run(args, check=True)
    return out


def stored_tree(store: Path, name: str, version: str) -> dict[str, dict[str, Any]]:
    """path -> attributes (and bytes) of one installed version, read from rows + blobs."""
    con = apsw.Connection(str(store / "index.db"), flags=apsw.SQLITE_OPEN_READONLY)
    blobs = BlobStore(store)
    try:
        root_id, vid = next(con.execute("SELECT root_id, id FROM versions WHERE name=? AND "
                                        "version=?", (name, version)))
        rows = {r[0]: r for r in con.execute(
            "SELECT id, parent_id, name, kind, mode, uid, gid, mtime_ns, size, content_id, "
            "target, link_id, nlink FROM entries WHERE version_id=?", (vid,))}
        out: dict[str, dict[str, Any]] = {}
        for eid, row in rows.items():
            parts, cur = [], row
            while cur[0] != root_id:
                parts.append(bytes(cur[2]).decode())
                cur = rows[cur[1]]
            path = "/".join(reversed(parts))
            a = dict(kind=stat.S_IFMT(row[3]), mode=row[4], uid=row[5], gid=row[6],
                     mtime_ns=row[7], size=row[8], nlink=row[12], link_id=row[11], id=eid)
            if row[3] == stat.S_IFLNK:
                a["target"] = bytes(row[10])
            if row[3] == stat.S_IFREG:
                data = b"".join(blobs.read(bytes(d), codec, size) for d, codec, size in
                                con.execute("SELECT b.digest, b.codec, b.size FROM chunks c "
                                            "JOIN blobs b ON b.id = c.blob_id WHERE "
                                            "c.content_id=? ORDER BY c.seq", (row[9],)))
                a["data"] = data
            out[path] = a
        return out
    finally:
        con.close()


def source_tree(src: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for dirpath, dirnames, filenames in os.walk(src):
        for n in [""] + dirnames + filenames if dirpath == str(src) else dirnames + filenames:
            p = Path(dirpath) / n if n else Path(dirpath)
            st = p.lstat()
            rel = str(p.relative_to(src)) if p != src else ""
            a = dict(kind=stat.S_IFMT(st.st_mode), mode=stat.S_IMODE(st.st_mode), uid=st.st_uid,
                     gid=st.st_gid, mtime_ns=st.st_mtime_ns, nlink=st.st_nlink)
            if stat.S_ISLNK(st.st_mode):
                a["target"] = os.readlink(p).encode()
                a["mode"] = 0o777
            elif stat.S_ISREG(st.st_mode):
                a["data"] = p.read_bytes()
            out[rel] = a
    return out
