"""The read-only view and the FUSE operations, without a kernel mount.

A runtime is imported with ``jbl store import`` (a real tarball built from this host); then
``store.view`` is read directly (chunk boundaries, readdir order, a corrupt or missing blob)
and ``fusefs.ops`` handlers are called directly (shared inodes across versions, EROFS, EIO).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import tarfile
from pathlib import Path

import pyfuse3
import pytest
from fixtures_mount import build_rt, import_tarball, make_tarball
from jbl.fusefs.errors import guarded
from jbl.fusefs.ops import JblOperations
from jbl.store.errors import IntegrityError
from jbl.store.store import Store
from jbl.store.view import View

CS = 1 << 20


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory: pytest.TempPathFactory):  # type: ignore
    """A store with pyrt 1.0.0 and 2.0.0 (most files shared) + the big file's bytes."""
    big = os.urandom(CS) + bytes(CS) + os.urandom(CS // 2 + 7)  # raw, zstd, raw tail
    base = tmp_path_factory.mktemp("view")
    store_dir = base / "store"
    for ver in ("1.0.0", "2.0.0"):
        rt = build_rt("pyrt", ver, tmp_path_factory, extra={"data/big.bin": big,
                                                             "data/empty": b""})
        import_tarball(store_dir, make_tarball(rt, base / f"pyrt-{ver}.tar.gz"))
    return store_dir, big, base


def _open(store_dir: Path) -> tuple[Store, View]:
    store = Store.open(store_dir, readonly=True)
    return store, View(store)


def test_reads_any_range_across_chunk_boundaries(two_versions) -> None:  # type: ignore
    store_dir, big, _ = two_versions
    store, view = _open(store_dir)
    with store:
        root = view.installed()["pyrt"]["1.0.0"].root_id
        e = view.resolve(root, "isolated/data/big.bin")
        assert e is not None and e.size == len(big) and e.content_id is not None
        refs = view.chunks(e.content_id)
        assert len(refs) == 3
        cases = [(0, 0), (0, 1), (CS - 1, 2), (CS, CS), (CS - 5, CS + 10), (0, len(big)),
                 (2 * CS - 1, 1), (len(big) - 3, 100), (len(big), 10), (len(big) + 5, 10)]
        for off, n in cases:
            assert view.read(refs, e.size, off, n) == big[off:off + n], (off, n)
            got = b""
            for p in view.plan_read(refs, e.size, off, n):
                piece = view.read_piece_nowait(p)
                got += piece if piece is not None else view.read_piece(p)
            assert got == big[off:off + n], (off, n)


def test_chunk_cache_is_bounded(two_versions) -> None:  # type: ignore
    store_dir, big, _ = two_versions
    store = Store.open(store_dir, readonly=True)
    with store:
        view = View(store, cache_bytes=CS + 100)
        root = view.installed()["pyrt"]["1.0.0"].root_id
        e = view.resolve(root, "isolated/data/big.bin")
        assert e is not None and e.content_id is not None
        refs = view.chunks(e.content_id)
        for _ in range(3):
            assert view.read(refs, e.size, 0, e.size) == big
            assert view.cache.bytes <= CS + 100


def test_readdir_is_complete_and_in_id_order(two_versions) -> None:  # type: ignore
    store_dir, _, base = two_versions
    with tarfile.open(base / "pyrt-1.0.0.tar.gz") as tf:
        want = sorted(os.path.basename(m.name.rstrip("/")) for m in tf
                      if os.path.dirname(os.path.normpath(m.name)) == "isolated/usr/bin")
    store, view = _open(store_dir)
    with store:
        root = view.installed()["pyrt"]["1.0.0"].root_id
        d = view.resolve(root, "isolated/usr/bin")
        assert d is not None and d.kind == stat.S_IFDIR
        rows = view.readdir(d.id)
        assert sorted(r.name.decode() for r in rows) == want
        assert [r.id for r in rows] == sorted(r.id for r in rows)
        # paging by id gives the same listing
        paged, after = [], 0
        while batch := view.readdir(d.id, after, 7):
            paged += batch
            after = batch[-1].id
        assert paged == rows
        assert view.lookup(d.id, b"no-such-file") is None
        py = view.lookup(d.id, b"python3")
        assert py is not None and py.kind == stat.S_IFLNK and View.readlink(py) == b"python3.11"


def test_missing_and_corrupt_blobs_raise_integrity_errors_naming_the_blob(
        two_versions, tmp_path: Path) -> None:  # type: ignore
    store_dir, _, _ = two_versions
    store, view = _open(store_dir)
    with store:
        root = view.installed()["pyrt"]["1.0.0"].root_id
        e = view.resolve(root, "isolated/usr/lib/python3/dist-packages/jblprobe/__init__.py")
        assert e is not None and e.content_id is not None
        (ref,) = view.chunks(e.content_id)
        path = store.blobs.path(ref.digest)
        saved = path.read_bytes()
        try:
            path.unlink()
            with pytest.raises(IntegrityError, match=ref.digest.hex()):
                view.read((ref,), e.size, 0, e.size)
            path.write_bytes(b"\0" * ref.stored_size)  # same size, garbage
            with pytest.raises(IntegrityError, match=ref.digest.hex()):
                view.read((ref,), e.size, 0, e.size)
        finally:
            path.write_bytes(saved)
            os.chmod(path, 0o444)


# --- the Operations, called directly ---------------------------------------------------
async def _walk(ops: JblOperations, *parts: str) -> pyfuse3.EntryAttributes:
    ino = pyfuse3.ROOT_INODE
    attr = None
    for part in parts:
        attr = await ops.lookup(ino, part.encode(), None)
        assert attr.st_ino != 0, f"{part} not found"
        ino = attr.st_ino
    assert attr is not None
    return attr


async def test_same_file_in_two_versions_is_one_inode(two_versions) -> None:  # type: ignore
    store_dir, _, _ = two_versions
    store, view = _open(store_dir)
    with store:
        ops = JblOperations(view)
        path = ("isolated", "usr", "lib", "python3.11", "json", "decoder.py")
        a = await _walk(ops, "pyrt", "1.0.0", *path)
        b = await _walk(ops, "pyrt", "2.0.0", *path)
        assert a.st_ino == b.st_ino and stat.S_ISREG(a.st_mode)
        probe = ["isolated", "usr", "lib", "python3", "dist-packages", "jblprobe", "__init__.py"]
        pa = await _walk(ops, "pyrt", "1.0.0", *probe)
        pb = await _walk(ops, "pyrt", "2.0.0", *probe)
        assert pa.st_ino != pb.st_ino  # different content, different inode
        d1 = await _walk(ops, "pyrt", "1.0.0", "isolated")
        d2 = await _walk(ops, "pyrt", "2.0.0", "isolated")
        assert d1.st_ino != d2.st_ino  # directories are per version
        latest = await _walk(ops, "pyrt", "latest")
        assert stat.S_ISLNK(latest.st_mode)
        assert await ops.readlink(latest.st_ino, None) == b"2.0.0"
        neg = await ops.lookup(d1.st_ino, b"nope", None)
        assert neg.st_ino == 0 and neg.entry_timeout > 3600  # cached negative lookup
        fi = await ops.open(a.st_ino, os.O_RDONLY, None)
        assert fi.keep_cache
        data = await ops.read(fi.fh, 0, 1 << 20)
        assert data.startswith(b'"""Implementation of JSONDecoder')
        await ops.release(fi.fh)


async def test_every_modifying_handler_answers_erofs(two_versions) -> None:  # type: ignore
    store_dir, _, _ = two_versions
    store, view = _open(store_dir)
    with store:
        ops = JblOperations(view)
        f = await _walk(ops, "pyrt", "1.0.0", "runtime.yml")
        calls = {
            "setattr": (f.st_ino, f, None, None, None), "mknod": (1, b"x", 0o644, 0, None),
            "mkdir": (1, b"x", 0o755, None), "unlink": (1, b"pyrt", None),
            "rmdir": (1, b"pyrt", None), "symlink": (1, b"x", b"y", None),
            "rename": (1, b"pyrt", 1, b"q", 0, None), "link": (f.st_ino, 1, b"x", None),
            "write": (1, 0, b"x"), "create": (1, b"x", 0o644, os.O_WRONLY, None),
            "setxattr": (f.st_ino, b"user.x", b"1", None),
            "removexattr": (f.st_ino, b"user.x", None),
        }
        for name, args in calls.items():
            with pytest.raises(pyfuse3.FUSEError) as ei:
                await getattr(ops, name)(*args)
            assert ei.value.errno == errno.EROFS, name
        for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
            with pytest.raises(pyfuse3.FUSEError) as ei:
                await ops.open(f.st_ino, flags, None)
            assert ei.value.errno == errno.EROFS


async def test_a_missing_blob_is_eio_and_a_log_line_naming_it(
        two_versions, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore
    store_dir, _, _ = two_versions
    store, view = _open(store_dir)
    with store:
        ops = JblOperations(view)
        a = await _walk(ops, "pyrt", "2.0.0", "isolated", "usr", "lib", "python3", "dist-packages",
                        "jblprobe", "__init__.py")
        fi = await ops.open(a.st_ino, os.O_RDONLY, None)
        (ref,) = ops.handles[fi.fh].node.refs or ()
        path = store.blobs.path(ref.digest)
        saved = path.read_bytes()
        path.unlink()
        try:
            with caplog.at_level(logging.ERROR, "jbl.fusefs"), \
                    pytest.raises(pyfuse3.FUSEError) as ei:
                await ops.read(fi.fh, 0, 4096)
            assert ei.value.errno == errno.EIO
            assert ref.digest.hex() in caplog.text
            # a handle that was never opened is EBADF (an answer, not a crash)
            with pytest.raises(pyfuse3.FUSEError) as ei:
                await ops.read(10**9, 0, 1)
            assert ei.value.errno == errno.EBADF
            # and anything unexpected is EIO with its traceback logged, never an escaping
            # exception (the guard every handler is wrapped in)
            @guarded
            async def handler_with_a_bug() -> None:
                raise ZeroDivisionError("a bug")

            caplog.clear()
            with caplog.at_level(logging.ERROR, "jbl.fusefs"), \
                    pytest.raises(pyfuse3.FUSEError) as ei:
                await handler_with_a_bug()
            assert ei.value.errno == errno.EIO
            assert "unexpected error" in caplog.text and "ZeroDivisionError" in caplog.text
        finally:
            path.write_bytes(saved)
            os.chmod(path, 0o444)
            await ops.release(fi.fh)
