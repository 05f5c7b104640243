"""The view-speed work of issue 12, in-process over a socket pair standing in for /dev/fuse.

* The raw engine's counters say what a request did: requests per opcode (``stats``), time per
  opcode on the request thread and in the read pool (``busy_ns``), and the view's split of a
  read into blob reading, decompression and hashing (``View.spent_ns``); the chunk cache's
  hits show a second read of the same bytes did no work.
* The bytes served are the stored bytes, and a corrupt blob is still EIO (with the file next
  to it still readable).
"""

from __future__ import annotations

import errno
import os
import random
import socket
from collections.abc import Iterator
from pathlib import Path

import hostile
import pytest
import test_rawfs_dispatch as rd
from conftest import run_jbl
from jbl.fusefs import kernel as K
from jbl.fusefs.rawfs import RawFS
from jbl.store.store import Store
from jbl.store.view import INLINE_DECODE_MAX, View

# Compressible (zstd) and bigger than what the request thread decodes inline: the read pool's.
_rng = random.Random(12)
BIG = b"".join(b"line %d %s\n" % (i, _rng.choice([b"alpha", b"beta", b"gamma"]) * 8)
               for i in range(INLINE_DECODE_MAX // 40))
SMALL = b"import os\n" * 300
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33  # asm-generic/socket.h (not in Python's socket)


def _store(d: Path) -> Path:
    (d / "rt.tar").write_bytes(hostile.tar(
        hostile.directory(b"isolated/lib/"),
        hostile.file(b"isolated/lib/big.txt", BIG),
        hostile.file(b"isolated/lib/small.py", SMALL)))
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
            ours.close()
            peer.close()


def _lib(wire: rd.Wire) -> int:
    top = wire.lookup(K.ROOT_ID, "hostile")
    return wire.lookup(wire.lookup(wire.lookup(top, "1.0.0"), "isolated"), "lib")


def _read(wire: rd.Wire, ino: int, size: int) -> tuple[int, bytes]:
    return wire.call(K.READ, ino, K.READ_IN.pack(0, 0, size, 0, 0, 0, 0))


def test_the_counters_say_what_each_request_did(wire: rd.Wire) -> None:
    fs, view = wire.fs, wire.fs.view
    lib = _lib(wire)
    big = wire.lookup(lib, "big.txt")
    assert fs.stats["lookup"] == 5 and fs.busy_ns["lookup"] > 0
    assert view.spent_ns == {"pread": 0, "decode": 0, "hash": 0}  # lookups read no blob
    code, data = _read(wire, big, len(BIG) + 4096)
    assert (code, data) == (0, BIG)
    # too big to decode inline: the read pool did it, and the view says where its time went
    assert fs.stats["read"] == 1 and fs.stats["read_thread"] == 1
    assert fs.busy_ns["read"] > 0 and fs.busy_ns["read_thread"] > 0
    spent = dict(view.spent_ns)
    assert spent["pread"] > 0 and spent["decode"] > 0 and spent["hash"] > 0
    # the same bytes again: a chunk-cache hit on the request thread, no blob read, no decode
    hits = view.cache.hits
    assert _read(wire, big, len(BIG) + 4096) == (0, BIG)
    assert view.cache.hits == hits + 1 and fs.stats["read_thread"] == 1
    assert view.spent_ns["decode"] == spent["decode"]
    assert view.spent_ns["pread"] == spent["pread"]
    # a small file is read and decoded inline (never the pool)
    small = wire.lookup(lib, "small.py")
    assert _read(wire, small, 65536) == (0, SMALL)
    assert fs.stats["read"] == 3 and fs.stats["read_thread"] == 1
    # a missing name is a negative entry (nodeid 0), counted like any lookup
    code, payload = wire.call(K.LOOKUP, lib, b"missing.py\0")
    assert code == 0 and K.ENTRY_OUT.unpack_from(payload)[0] == 0
    assert fs.stats["lookup"] == 7


def test_a_corrupt_blob_is_eio_and_the_file_next_to_it_still_reads(wire: rd.Wire) -> None:
    fs, view = wire.fs, wire.fs.view
    lib = _lib(wire)
    small = wire.lookup(lib, "small.py")
    (ref,) = fs.tree.refs(fs.core.node(small))
    path = view.blobs.path(ref.digest)
    os.chmod(path, 0o644)
    path.write_bytes(b"\0" * ref.stored_size)  # same size, garbage
    assert _read(wire, small, 65536) == (errno.EIO, b"")
    assert fs.stats["read"] == 1
    big = wire.lookup(lib, "big.txt")
    assert _read(wire, big, len(BIG) + 4096) == (0, BIG)
