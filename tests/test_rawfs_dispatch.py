"""The raw engine's dispatch, in-process: every modifying opcode reaches ``op_erofs``.

Through a real mount these requests never arrive — the kernel answers EROFS itself for an
MS_RDONLY mount — so test_mount.py's EROFS cases prove the mount is read-only, not that the
daemon refuses. Here ``RawFS.dispatch`` is fed the kernel's own wire format (``fuse_in_header``
+ body) over a SOCK_SEQPACKET pair standing in for /dev/fuse, and the replies are read back:
each modifying opcode is answered EROFS (and counted as handled), an unknown one ENOSYS,
and LOOKUP/GETATTR/READ of the same file still work next to them.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import hostile
import pytest
from conftest import run_jbl
from jbl.fusefs import kernel as K
from jbl.fusefs.rawfs import RawFS
from jbl.store.store import Store
from jbl.store.view import View

BODY = bytes(256)  # room for any opcode's fixed struct; names follow where an op takes one


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("rawfs")
    (d / "rt.tar").write_bytes(hostile.tar())
    run_jbl("store", "import", d / "rt.tar", store=d / "store").ok()
    return d / "store"


class Wire:
    """A RawFS on one end of a socket pair; requests in, replies out, as /dev/fuse does."""

    def __init__(self, fs: RawFS, peer: socket.socket) -> None:
        self.fs, self.peer, self.unique = fs, peer, 0

    def call(self, op: int, nodeid: int, body: bytes = BODY) -> tuple[int, bytes]:
        self.unique += 1
        req = K.IN_HEADER.pack(K.IN_HEADER.size + len(body), op, self.unique, nodeid, 0, 0,
                               1, 0, 0) + body
        self.fs.dispatch(memoryview(req))
        self.peer.settimeout(10)
        out = self.peer.recv(1 << 21)
        length, error, unique = K.OUT_HEADER.unpack_from(out)
        assert (length, unique) == (len(out), self.unique)
        return -error, out[K.OUT_HEADER.size:]

    def lookup(self, parent: int, name: str) -> int:
        code, payload = self.call(K.LOOKUP, parent, name.encode() + b"\0")
        assert code == 0, errno.errorcode[code]
        return int(K.ENTRY_OUT.unpack_from(payload)[0])


@pytest.fixture
def wire(store_dir: Path) -> Iterator[Wire]:
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with Store.open(store_dir, readonly=True) as store:
        fs = RawFS(View(store), ours.fileno())
        try:
            yield Wire(fs, peer)
        finally:
            fs.pool.shutdown(wait=True)
            ours.close()
            peer.close()


def test_every_modifying_opcode_is_erofs_and_reads_still_work(wire: Wire) -> None:
    top = wire.lookup(K.ROOT_ID, "hostile")
    version = wire.lookup(top, "1.0.0")
    hello = wire.lookup(wire.lookup(wire.lookup(version, "isolated"), "bin"), "hello")
    assert len(K.MODIFYING) >= 17
    for op in sorted(K.MODIFYING):
        for nodeid in (K.ROOT_ID, version, hello):
            code, payload = wire.call(op, nodeid, BODY + b"new-name\0")
            assert (code, payload) == (errno.EROFS, b""), (K.OPCODE_NAMES[op], nodeid)
        assert wire.fs.stats[K.OPCODE_NAMES[op]] == 3  # the daemon's handler answered it
    # next to the refusals the tree is intact and readable, byte for byte
    code, payload = wire.call(K.GETATTR, hello, bytes(16))
    assert code == 0
    size = K.ATTR_OUT.unpack_from(payload)[4]  # attr_valid, nsec, dummy, ino, size
    assert size == len(b"#!/bin/sh\necho hello\n")
    code, data = wire.call(K.READ, hello, K.READ_IN.pack(0, 0, 4096, 0, 0, 0, 0))
    assert (code, data) == (0, b"#!/bin/sh\necho hello\n")


def test_unknown_opcodes_are_enosys(wire: Wire) -> None:
    code, _ = wire.call(9999, K.ROOT_ID)
    assert code == errno.ENOSYS
    code, _ = wire.call(K.GETATTR, K.ROOT_ID, bytes(16))  # and the session goes on
    assert code == 0


def test_the_header_layout_is_the_kernels() -> None:
    # a reply's error is the negated errno in a signed field (fuse_out_header.error)
    assert K.OUT_HEADER.unpack(struct.pack("=IiQ", 16, -errno.EROFS, 7)) == (16,
                                                                               -errno.EROFS, 7)
