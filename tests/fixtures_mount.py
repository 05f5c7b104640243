"""Fixtures for the view and mount tests: tarballs, imports, real mounts, a second user.

``import_tarball`` uses ``jbl store import`` when the CLI has it; until then a tiny test-only
importer (``_mini_import``) writes the rows and blobs the way schema.py describes, so the
view and the mount can be tested on real runtime trees.

Every mount made here is unmounted in ``finally``; ``sweep_mounts`` (session, autouse where
imported) detaches any jbl mount left under the test temp dirs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import stat
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from conftest import run_jbl
from jbl.fusefs import mount as mountmod
from jbl.store.blobs import BlobStore
from jbl.store.manifest import parse_manifest
from jbl.store.store import Store
from rtbuild import build_runtime

OTHER_USER = "jbltest2"


def make_tarball(rtdir: Path, out: Path) -> Path:
    """A gzip tarball of a runtime directory, members ``./runtime.yml``, ``./isolated/...``."""
    subprocess.run(["tar", "--format=posix", "--numeric-owner", "--sort=name",
                    "--pax-option=delete=atime,delete=ctime", "-C", str(rtdir), "-czf", str(out),
                    "."], check=True)
    return out


def has_store_import() -> bool:
    return run_jbl("store", "import", "--help").rc == 0


def import_tarball(store_dir: Path, tarball: Path) -> None:
    if has_store_import():
        run_jbl("store", "import", tarball, store=store_dir).ok()
    else:
        _mini_import(store_dir, tarball)


def _mini_import(store_dir: Path, tarball: Path) -> None:
    """Test-only ingest: tar members -> blobs + rows in one transaction (no safety checks)."""
    store = Store.open(store_dir, create=True)
    try:
        cs = store.chunk_size
        blobs: list[tuple[bytes, int, int, int]] = []
        files: dict[str, dict[str, object]] = {}
        with tarfile.open(tarball, "r:*") as tf:
            for m in tf:
                path = os.path.normpath(m.name).lstrip("/")
                path = "" if path == "." else path
                d: dict[str, object] = {"m": m, "path": path}
                if m.isfile():
                    f = tf.extractfile(m)
                    assert f is not None
                    body = f.read()
                    d["digest"] = hashlib.sha256(body).digest()
                    chunks = []
                    for off in range(0, len(body), cs):
                        piece = body[off:off + cs]
                        dg = hashlib.sha256(piece).digest()
                        codec, stored = BlobStore.encode(piece)
                        store.blobs.write(dg, stored)
                        blobs.append((dg, len(piece), len(stored), codec))
                        chunks.append(dg)
                    d["chunks"] = chunks
                    d["size"] = len(body)
                files[path] = d
        store.blobs.sync()
        with store.db.write():
            db = store.db
            manifest_text = ""
            if "runtime.yml" in files:
                # read the manifest again from the tar (small)
                with tarfile.open(tarball, "r:*") as tf:
                    f = tf.extractfile(files["runtime.yml"]["m"])  # type: ignore[arg-type]
                    assert f is not None
                    manifest_text = f.read().decode()
            man = parse_manifest(manifest_text)
            now = time.time()
            for dg, size, ssize, codec in blobs:
                db.execute("INSERT OR IGNORE INTO blobs(digest, size, stored_size, codec, "
                           "created_at) VALUES (?,?,?,?,?)", (dg, size, ssize, codec, now))
            db.execute("INSERT INTO versions(name, version, description, manifest, source, "
                       "installed_at) VALUES (?,?,?,?,?,?)",
                       (man.name, man.version, man.description, manifest_text, str(tarball),
                        now))
            vid = db.conn.last_insert_rowid()
            ids: dict[str, int] = {}
            first_link: dict[str, int] = {}
            nlinks: dict[str, int] = {}
            for d in files.values():
                m = d["m"]
                if m.islnk():  # type: ignore[attr-defined]
                    tgt = os.path.normpath(m.linkname)  # type: ignore[attr-defined]
                    nlinks[tgt] = nlinks.get(tgt, 1) + 1
            subdirs: dict[str, int] = {}
            for p, d in files.items():
                if d["m"].isdir() and p:  # type: ignore[attr-defined]
                    par = os.path.dirname(p)
                    subdirs[par] = subdirs.get(par, 0) + 1
            if "" not in files:
                raise AssertionError("tarball without a root '.' member")
            logical = 0
            count = 0
            for p, d in files.items():
                m = d["m"]
                parent = None if p == "" else ids[os.path.dirname(p)]
                name = b"" if p == "" else os.path.basename(p).encode()
                mode = m.mode & 0o1777  # type: ignore[attr-defined]
                mtime_ns = int(Decimal(str(m.pax_headers.get("mtime", m.mtime)))  # type: ignore
                               * 1_000_000_000)
                content_id = None
                target = None
                link_id = None
                nlink = 1
                size = 0
                if m.isdir():  # type: ignore[attr-defined]
                    kind = stat.S_IFDIR
                    nlink = 2 + subdirs.get(p, 0)
                elif m.issym():  # type: ignore[attr-defined]
                    kind = stat.S_IFLNK
                    target = m.linkname.encode()  # type: ignore[attr-defined]
                    size = len(target)
                else:
                    kind = stat.S_IFREG
                    src = d
                    if m.islnk():  # type: ignore[attr-defined]
                        tgt = os.path.normpath(m.linkname)  # type: ignore[attr-defined]
                        src = files[tgt]
                        link_id = first_link[tgt]
                        nlink = nlinks[tgt]
                        m = src["m"]
                        mode = m.mode & 0o1777  # type: ignore[attr-defined]
                    elif p in nlinks:
                        nlink = nlinks[p]
                    size = int(src["size"])  # type: ignore[call-overload]
                    row = db.one("SELECT id FROM contents WHERE digest=?", (src["digest"],))
                    if row is None:
                        db.execute("INSERT INTO contents(digest, size, nchunks) VALUES (?,?,?)",
                                   (src["digest"], size, len(src["chunks"])))  # type: ignore
                        content_id = db.conn.last_insert_rowid()
                        for seq, dg in enumerate(src["chunks"]):  # type: ignore[arg-type]
                            bid = db.scalar("SELECT id FROM blobs WHERE digest=?", (dg,))
                            db.execute("INSERT INTO chunks(content_id, seq, blob_id) "
                                       "VALUES (?,?,?)", (content_id, seq, bid))
                    else:
                        content_id = row[0]
                    logical += size
                    count += 1
                db.execute("INSERT INTO entries(version_id, parent_id, name, kind, mode, uid, "
                           "gid, mtime_ns, size, content_id, target, link_id, nlink) "
                           "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                           (vid, parent, name, kind, mode, m.uid, m.gid,  # type: ignore
                            mtime_ns, size, content_id, target, link_id, nlink))
                eid = db.conn.last_insert_rowid()
                ids[p] = eid
                if p in nlinks and kind == stat.S_IFREG and link_id is None:
                    first_link[p] = eid
                    db.execute("UPDATE entries SET link_id=? WHERE id=?", (eid, eid))
            db.execute("UPDATE versions SET root_id=?, file_count=?, logical_size=? WHERE id=?",
                       (ids[""], count, logical, vid))
    finally:
        store.close()


def build_rt(name: str, version: str, tmp_path_factory: pytest.TempPathFactory,
             extra: dict[str, bytes] | None = None) -> Path:
    """A runtime dir of our own (conftest's rt_factory reuses one directory name when called
    twice with ``extra`` for the same name and version)."""
    return build_runtime(tmp_path_factory.mktemp("rt") / f"{name}-{version}", name, version,
                         extra=extra)


ENGINES = ["raw", "pyfuse3"]  # every mount test runs against both FUSE engines


@pytest.fixture(scope="module", params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    """The mount engine under test (``jbl mount --engine``)."""
    return str(request.param)


@contextlib.contextmanager
def mounted(store_dir: Path, mp: Path, *extra: str, engine: str | None = None
            ) -> Iterator[Path]:
    mp.mkdir(parents=True, exist_ok=True)
    if engine is not None:
        extra = (*extra, "--engine", engine)
    run_jbl("mount", mp, *extra, store=store_dir).ok()
    try:
        yield mp
    finally:
        r = run_jbl("umount", mp, store=store_dir)
        if mountmod.mount_fstype(mp) is not None:
            subprocess.run(["fusermount3", "-u", "-z", str(mp)], check=False)
            raise AssertionError(f"jbl umount left {mp} mounted: {r.err}")


@pytest.fixture(scope="session", autouse=True)
def sweep_mounts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    # Only this session's temp dirs: other pytest sessions on the host (other engineers)
    # have live mounts under their own /tmp/pytest-of-*/pytest-N. Private views
    # (/tmp/jbl-view-*) unmount themselves when their parent dies.
    base = str(tmp_path_factory.getbasetemp()) + "/"
    yield
    for mp in mountmod.jbl_mounts():
        if mp.startswith(base):
            subprocess.run(["fusermount3", "-u", "-z", mp], check=False)


@pytest.fixture(scope="session")
def other_user() -> str:
    """An unprivileged second user (created once; kept for later runs)."""
    try:
        pwd.getpwnam(OTHER_USER)
    except KeyError:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/sh", OTHER_USER],
                       check=True)
    return OTHER_USER


@pytest.fixture(scope="session")
def pyrt_tarball(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pyrt@1.0.0 as a tarball, with a multi-chunk file, hardlinks and an empty file added."""
    big = bytes(range(256)) * 4096 * 3 + os.urandom(300_000)  # 3 MiB + incompressible tail
    rt = build_rt("pyrt", "1.0.0", tmp_path_factory, extra={
        "data/big.bin": big, "data/empty": b"", "data/secret.txt": b"only root\n"})
    os.chmod(rt / "isolated/data/secret.txt", 0o600)
    link = rt / "isolated/data/big-link.bin"
    if not link.exists():
        os.link(rt / "isolated/data/big.bin", link)
    out = tmp_path_factory.mktemp("tarballs") / "pyrt-1.0.0.tar.gz"
    return make_tarball(rt, out)


def wait_until(cond: Callable[[], object], timeout: float = 10.0, interval: float = 0.1) -> bool:
    """Poll ``cond`` until it is true or ``timeout`` seconds pass; return whether it held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return False
