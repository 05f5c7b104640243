"""BlobStore writes with kept shard fds (what an install's workers use): every blob lands
under its own name and reads back, each shard is opened once, and ``close`` lets go of
every fd it kept."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from jbl.store.blobs import CODEC_RAW, BlobStore


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_kept_shards_are_opened_once_and_closed_with_the_store(tmp_path: Path) -> None:
    BlobStore(tmp_path).create()
    data = [f"blob {i}".encode() * (i + 1) for i in range(300)]
    digests = [hashlib.sha256(d).digest() for d in data]
    shards = {d.hex()[:2] for d in digests}
    before = _open_fds()
    blobs = BlobStore(tmp_path, keep_shards=True)
    for d, body in zip(digests, data, strict=True):
        assert blobs.write(d, body) == len(body)
    for d, body in zip(digests, data, strict=True):  # again: over existing names
        blobs.write(d, body)
    # blobs/, blobs/tmp/ (the rewrites went through it) and one fd per shard written to:
    # not one per write
    assert len(_open_fds() - before) == 2 + len(shards)
    blobs.close()
    assert _open_fds() - before == set()
    reader = BlobStore(tmp_path)
    for d, body in zip(digests, data, strict=True):
        assert reader.read(d, CODEC_RAW, len(body)) == body
    reader.close()


def test_without_kept_shards_a_write_keeps_no_shard_open(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path)
    blobs.create()
    before = _open_fds()
    for i in range(50):
        body = b"x" * i
        blobs.write(hashlib.sha256(body).digest(), body)
    assert _open_fds() - before == set()
    blobs.close()
