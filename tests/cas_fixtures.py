"""Runtimes and registries for the content-addressed form's tests (tests/test_cas_*.py).

``tarball(out, version)`` writes a runtime with every shape the form must carry: a body of
several 1 MiB chunks shared by every version and one per version (large objects, fetched
alone), compressible text files (zstd objects, packed), a symlink, a hardlink, nested
directories; ``publish(reg, versions)`` publishes them with the real ``jbl registry add``.
``rewrite_tree`` replaces a published version's tree with a changed copy (hostile trees).
"""

from __future__ import annotations

import hashlib
import json
import random
import sqlite3
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zstandard
from conftest import run_jbl
from fixtures_registry import MTIME, make_tarball
from jbl.store import casformat as cf

NAME = "casrt"
MiB = 1 << 20


def files(version: str) -> dict[str, bytes]:
    text = "".join(f"line {i} of a text file that zstd shrinks well\n" for i in range(400))
    out = {
        "runtime.yml": (f"name: {NAME}\nversion: {version}\ndescription: cas test {version}\n"
                        "mounts:\n  - {source: isolated, target: /, readonly: true}\n").encode(),
        "isolated/bin/hello": f"#!/bin/sh\necho {version}\n".encode(),
        "isolated/etc/version": f"{version}\n".encode(),
        "isolated/lib/big.bin": random.Random("big").randbytes(2 * MiB + MiB // 2),
        f"isolated/lib/big-{version}.bin": random.Random(version).randbytes(MiB + MiB // 2),
    }
    for i in range(30):
        out[f"isolated/share/doc/d{i // 10}/t{i}.txt"] = f"{i}\n{text}".encode()
    out["isolated/share/doc/changes.txt"] = f"{version}\n{text}".encode()
    return out


def tarball(out: Path, version: str) -> Path:
    extra: list[tuple[tarfile.TarInfo, bytes]] = []
    for name, kind, target in (("isolated/lib/big.link", tarfile.SYMTYPE, "big.bin"),
                               ("isolated/bin/hello2", tarfile.LNKTYPE, "isolated/bin/hello"),
                               ("isolated/lib/odd.link", tarfile.SYMTYPE,
                                "caf\udce9"),  # a target that is not UTF-8 (b"caf\xe9")
                               ("isolated/empty.d", tarfile.DIRTYPE, "")):
        ti = tarfile.TarInfo(name)
        ti.type, ti.linkname, ti.mtime, ti.mode = kind, target, MTIME + 7, 0o755
        extra.append((ti, b""))
    # An empty file, a setuid one (ingest clears the bit) and a file whose directory is
    # never listed (an implied directory: ingest gives it the archive's newest mtime).
    for name, mode in (("isolated/etc/empty", 0o644), ("isolated/bin/suid", 0o4755),
                       ("isolated/implied/dir/file", 0o600)):
        data = b"" if name.endswith("empty") else name.encode()
        ti = tarfile.TarInfo(name)
        ti.size, ti.mtime, ti.mode, ti.uid, ti.gid = len(data), MTIME + 9, mode, 1000, 100
        extra.append((ti, data))
    return make_tarball(files(version), out, extra)


def publish(reg: Path, versions: list[str], built: Path) -> None:
    built.mkdir(parents=True, exist_ok=True)
    tbs = [tarball(built / f"{NAME}-{v}.tar.gz", v) for v in versions]
    run_jbl("registry", "add", *tbs, "--registry", reg).ok()


def entry(reg: Path, version: str) -> dict[str, Any]:
    e: dict[str, Any] = json.loads((reg / "registry.json").read_text())["runtimes"][NAME][
        version]
    return e


def tree_doc(reg: Path, version: str) -> dict[str, Any]:
    return cf.decode_tree((reg / entry(reg, version)["tree"]["url"]).read_bytes())


def rewrite_tree(reg: Path, version: str, change: Callable[[dict[str, Any]], None]) -> None:
    """Publish a changed copy of ``version``'s tree and point registry.json at it."""
    doc = tree_doc(reg, version)
    change(doc)
    data = zstandard.ZstdCompressor().compress(json.dumps(doc).encode())
    h = hashlib.sha256(data).hexdigest()
    (reg / "trees" / h).write_bytes(data)
    index = json.loads((reg / "registry.json").read_text())
    index["runtimes"][NAME][version]["tree"] = {"url": f"trees/{h}", "sha256": h,
                                                "size": len(data)}
    (reg / "registry.json").write_text(json.dumps(index))


def blob_files(store: Path) -> set[str]:
    return {str(p.relative_to(store)) for p in (store / "blobs").glob("??/*")}


def index_rows(store: Path) -> dict[str, Any]:
    """What a store records of its versions, by path and digest (ids differ by store)."""
    db = sqlite3.connect(f"file:{store / 'index.db'}?mode=ro", uri=True)
    try:
        paths: dict[int, str] = {}
        entries = []
        for (eid, parent, name, kind, mode, uid, gid, mtime, size, cdigest, target, link,
             nlink, ver) in db.execute(
                "SELECT e.id, e.parent_id, e.name, e.kind, e.mode, e.uid, e.gid, e.mtime_ns, "
                "e.size, c.digest, e.target, e.link_id, e.nlink, v.version FROM entries e "
                "JOIN versions v ON v.id = e.version_id LEFT JOIN contents c "
                "ON c.id = e.content_id ORDER BY e.id"):
            paths[eid] = f"{ver}:" if parent is None else f"{paths[parent]}/{bytes(name).decode()}"
            entries.append((paths[eid], kind, mode, uid, gid, mtime, size, cdigest, target,
                            paths.get(link) if link else None, nlink))
        versions = sorted(db.execute(
            "SELECT name, version, description, manifest, state, source, checksum, "
            "file_count, logical_size, pinned, stored_size FROM versions"))
        blobs = sorted(db.execute("SELECT digest, size, stored_size, codec FROM blobs"))
        contents = sorted((d, s, n, tuple(bytes(x) for (x,) in db.execute(
            "SELECT b.digest FROM chunks ch JOIN blobs b ON b.id = ch.blob_id "
            "WHERE ch.content_id = ? ORDER BY ch.seq", (cid,))))
            for cid, d, s, n in db.execute("SELECT id, digest, size, nchunks FROM contents"))
        return {"entries": entries, "versions": versions, "blobs": blobs,
                "contents": contents}
    finally:
        db.close()
