"""The view-speed work of issue 12, in-process over a socket pair standing in for /dev/fuse.

* The raw engine's counters say what a request did: requests per opcode (``stats``), time per
  opcode on the request thread and in the read pool (``busy_ns``), and the view's split of a
  read into blob reading, decompression and hashing (``View.spent_ns``); the chunk cache's
  hits show a second read of the same bytes did no work.
* Read-ahead at LOOKUP: a looked-up regular file's first chunk is decoded (and checked) in
  the background, so its READ is a cache hit on the request thread; directories and negative
  lookups are not read ahead, nor a chunk already cached. A sequential READ readies the next
  chunk; a jump does not.
* Through a real mount (both engines): a negative entry cached a day inside a version is
  still right after a new version that has the name is installed.
* The bytes served are the stored bytes, and a corrupt blob is still EIO (with the file next
  to it still readable); a read-ahead that meets it keeps nothing and logs nothing (the READ
  logs it, naming the blob).
"""

from __future__ import annotations

import errno
import os
import random
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import hostile
import pytest
import test_rawfs_dispatch as rd
from conftest import run_jbl
from fixtures_mount import (  # noqa: F401 - fixtures
    build_rt,
    engine,
    import_tarball,
    make_tarball,
    mounted,
    sweep_mounts,
    wait_until,
)
from jbl.fusefs import kernel as K
from jbl.fusefs.rawfs import RawFS
from jbl.store.store import Store
from jbl.store.view import INLINE_DECODE_MAX, ChunkCache, View

# Compressible (zstd) and bigger than what the request thread decodes inline: the read pool's.
_rng = random.Random(12)
BIG = b"".join(b"line %d %s\n" % (i, _rng.choice([b"alpha", b"beta", b"gamma"]) * 8)
               for i in range(INLINE_DECODE_MAX // 40))
SMALL = b"import os\n" * 300
MIB = 1 << 20  # the store's chunk size (schema.CHUNK_SIZE)
LONG = b"".join(b"%08d chunked\n" % i for i in range(5 * MIB // 17))  # 5 chunks, zstd
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33  # asm-generic/socket.h (not in Python's socket)


def _store(d: Path) -> Path:
    (d / "rt.tar").write_bytes(hostile.tar(
        hostile.directory(b"isolated/lib/"),
        hostile.file(b"isolated/lib/big.txt", BIG),
        hostile.file(b"isolated/lib/small.py", SMALL),
        hostile.file(b"isolated/lib/long.log", LONG)))
    run_jbl("store", "import", d / "rt.tar", store=d / "store").ok()
    return d / "store"


@pytest.fixture
def wire(tmp_path: Path) -> Iterator[rd.Wire]:
    store_dir = _store(tmp_path)
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    # room for a reply bigger than INLINE_DECODE_MAX in one datagram (root may force it)
    ours.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 4 << 20)
    peer.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 4 << 20)
    with Store.open(store_dir, readonly=True) as store:
        fs = RawFS(View(store), ours.fileno())
        try:
            yield rd.Wire(fs, peer)
        finally:
            fs.pool.shutdown(wait=True)
            fs.prefetch_pool.shutdown(wait=True)
            ours.close()
            peer.close()


def _lib(wire: rd.Wire) -> int:
    top = wire.lookup(K.ROOT_ID, "hostile")
    return wire.lookup(wire.lookup(wire.lookup(top, "1.0.0"), "isolated"), "lib")


def _read(wire: rd.Wire, ino: int, size: int) -> tuple[int, bytes]:
    return wire.call(K.READ, ino, K.READ_IN.pack(0, 0, size, 0, 0, 0, 0))


def _settle(fs: RawFS) -> None:
    """Wait for every read-ahead in flight (a fresh pool serves the ones to come)."""
    fs.prefetch_pool.shutdown(wait=True)
    fs.prefetch_pool = ThreadPoolExecutor(1)


def test_the_counters_say_what_each_request_did(wire: rd.Wire) -> None:
    fs, view = wire.fs, wire.fs.view
    lib = _lib(wire)
    assert fs.stats["lookup"] == 4 and fs.busy_ns["lookup"] > 0
    assert view.spent_ns == {"pread": 0, "decode": 0, "hash": 0}  # no blob read for dirs
    big = wire.lookup(lib, "big.txt")
    _settle(fs)
    spent = dict(view.spent_ns)  # the read-ahead's work, split
    assert spent["pread"] > 0 and spent["decode"] > 0 and spent["hash"] > 0
    # a cache hit: answered on the request thread, no blob read, no decode
    hits = view.cache.hits
    assert _read(wire, big, len(BIG) + 4096) == (0, BIG)
    assert view.cache.hits == hits + 1 and view.spent_ns == spent
    assert fs.stats["read"] == 1 and "read_thread" not in fs.stats
    # the chunk forgotten: too big to decode inline, so the read pool does it, and says so
    view.cache = ChunkCache(view.cache.max_bytes)
    assert _read(wire, big, len(BIG) + 4096) == (0, BIG)
    assert fs.stats["read"] == 2 and fs.stats["read_thread"] == 1
    assert fs.busy_ns["read"] > 0 and fs.busy_ns["read_thread"] > 0
    assert view.spent_ns["decode"] > spent["decode"]
    # a small file is read and decoded inline (never the pool)
    small = wire.lookup(lib, "small.py")
    _settle(fs)
    assert _read(wire, small, 65536) == (0, SMALL)
    assert fs.stats["read"] == 3 and fs.stats["read_thread"] == 1
    # a missing name is a negative entry (nodeid 0), counted like any lookup
    code, payload = wire.call(K.LOOKUP, lib, b"missing.py\0")
    assert code == 0 and K.ENTRY_OUT.unpack_from(payload)[0] == 0
    assert fs.stats["lookup"] == 7


def _damage(view: View, path: str) -> bytes:
    """Overwrite the blob behind ``path`` (one chunk) with same-size garbage; its digest."""
    root = view.installed()["hostile"]["1.0.0"].root_id
    e = view.resolve(root, path)
    assert e is not None and e.content_id is not None
    (ref,) = view.chunks(e.content_id)
    blob = view.blobs.path(ref.digest)
    good = blob.read_bytes()
    os.chmod(blob, 0o644)
    blob.write_bytes(good[:-64] + bytes(64))  # same size, a damaged tail
    return ref.digest


def test_a_corrupt_blob_is_eio_and_the_file_next_to_it_still_reads(wire: rd.Wire) -> None:
    fs = wire.fs
    _damage(fs.view, "isolated/lib/small.py")
    lib = _lib(wire)
    small = wire.lookup(lib, "small.py")
    _settle(fs)
    assert _read(wire, small, 65536) == (errno.EIO, b"")  # decoded inline: still checked
    assert fs.stats["read"] == 1
    big = wire.lookup(lib, "big.txt")
    assert _read(wire, big, len(BIG) + 4096) == (0, BIG)


def test_a_looked_up_file_is_read_ahead_so_its_read_waits_for_nothing(wire: rd.Wire) -> None:
    fs, view = wire.fs, wire.fs.view
    lib = _lib(wire)  # directories: never read ahead
    code, _ = wire.call(K.LOOKUP, lib, b"missing.py\0")  # nor a negative entry
    assert code == 0 and "prefetch" not in fs.stats
    big = wire.lookup(lib, "big.txt")
    assert fs.stats["prefetch"] == 1
    _settle(fs)  # the read-ahead has run
    spent = dict(view.spent_ns)
    assert spent["decode"] > 0 and spent["hash"] > 0  # ... and decoded and checked the chunk
    # the READ (too big to decode inline without it) is answered on the request thread from
    # the cache: no read-pool hop, no second decode
    assert _read(wire, big, len(BIG) + 4096) == (0, BIG)
    assert fs.stats.get("read_thread", 0) == 0 and view.spent_ns["decode"] == spent["decode"]
    # a cached chunk is not read ahead again
    wire.lookup(lib, "big.txt")
    assert fs.stats["prefetch"] == 1


def test_read_ahead_of_a_corrupt_blob_caches_nothing_and_the_read_is_eio(
        wire: rd.Wire, caplog: pytest.LogCaptureFixture) -> None:
    fs, view = wire.fs, wire.fs.view
    digest = _damage(view, "isolated/lib/big.txt")
    lib = _lib(wire)
    big = wire.lookup(lib, "big.txt")
    assert fs.stats["prefetch"] == 1
    _settle(fs)
    assert view.spent_ns["pread"] > 0  # the read-ahead read the damaged blob ...
    assert not view.cache.peek(digest)  # ... kept nothing
    assert not caplog.records  # ... and logged nothing: the READ says it
    assert _read(wire, big, len(BIG) + 4096) == (errno.EIO, b"")
    assert digest.hex() in caplog.text
    small = wire.lookup(lib, "small.py")  # the file next to it still reads
    assert _read(wire, small, 65536) == (0, SMALL)


def test_a_sequential_read_readies_the_next_chunk_and_a_jump_does_not(
        wire: rd.Wire) -> None:
    fs, view = wire.fs, wire.fs.view
    node = wire.lookup(_lib(wire), "long.log")
    _settle(fs)
    refs = fs.tree.refs(fs.core.node(node))
    assert len(refs) == 5 and view.cache.peek(refs[0].digest)  # chunk 0: at LOOKUP

    def read(off: int, n: int = 128 << 10) -> None:
        assert wire.call(K.READ, node, K.READ_IN.pack(0, off, n, 0, 0, 0, 0)) == (
            0, LONG[off:off + n])
        _settle(fs)

    read(0)  # the start of the file: chunk 1 readied
    assert fs.stats["prefetch_next"] == 1 and view.cache.peek(refs[1].digest)
    read(128 << 10)  # sequential, still in chunk 0: chunk 1 is there already
    assert fs.stats["prefetch_next"] == 1
    read(3 * MIB + 4096)  # a jump (mmap faults, seeks): nothing read ahead
    assert fs.stats["prefetch_next"] == 1 and not view.cache.peek(refs[4].digest)
    read(3 * MIB + 4096 + (128 << 10))  # sequential again, in chunk 3: chunk 4 readied
    assert fs.stats["prefetch_next"] == 2 and view.cache.peek(refs[4].digest)
    assert not view.cache.peek(refs[2].digest)  # never asked for, never decoded
    end = 3 * MIB + 4096 + (256 << 10)
    read(end, len(LONG) - end)  # sequential to the end: no chunk after the last
    assert fs.stats["prefetch_next"] == 2


def test_lookups_still_answer_once_the_prefetch_pool_is_shut_down(wire: rd.Wire) -> None:
    fs = wire.fs
    lib = _lib(wire)
    fs.prefetch_pool.shutdown(wait=True)  # what the end of the request loop does
    big = wire.lookup(lib, "big.txt")  # answered; the read-ahead is skipped, not an EIO
    assert "prefetch" not in fs.stats
    assert _read(wire, big, len(BIG) + 4096) == (0, BIG)


# --- through a real mount, both engines -----------------------------------------------
def test_a_negative_entry_inside_a_version_stays_right_when_a_new_version_comes(
        store_dir: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory,
        engine: str) -> None:  # noqa: F811
    """Missing names below a version are cached a day (Python probes many); that is right
    because the version's tree never changes: a new version that has the name shows it in
    the new version only, while the top level (1 s, invalidated) shows the new version."""
    v1 = build_rt("negrt", "1.0.0", tmp_path_factory, extra={"data/a.txt": b"one\n"})
    v2 = build_rt("negrt", "2.0.0", tmp_path_factory,
                  extra={"data/a.txt": b"one\n", "data/new.txt": b"two\n"})
    import_tarball(store_dir, make_tarball(v1, tmp_path / "v1.tar.gz"))
    with mounted(store_dir, tmp_path / "mnt", engine=engine) as mp:
        old, new = mp / "negrt/1.0.0/isolated/data", mp / "negrt/2.0.0/isolated/data"
        for _ in range(3):  # cached by the kernel from the first miss on
            assert not (old / "new.txt").exists() and not new.exists()
        import_tarball(store_dir, make_tarball(v2, tmp_path / "v2.tar.gz"))
        assert wait_until(lambda: (new / "new.txt").exists())
        assert (new / "new.txt").read_bytes() == b"two\n"
        assert not (old / "new.txt").exists()  # still right: 1.0.0 never had it
        assert (old / "a.txt").read_bytes() == (new / "a.txt").read_bytes() == b"one\n"
        assert sorted(os.listdir(old)) == ["a.txt"]
