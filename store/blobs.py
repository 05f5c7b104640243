"""Content-addressed blob files: ``STORE/blobs/<hex[:2]>/<hex[2:]>``, raw or one zstd frame.

A blob is one chunk of a file body (at most ``schema.CHUNK_SIZE`` bytes decoded), named by
the sha256 of its decoded bytes. It is stored zstd-compressed when that saves space and raw
when it does not; the codec is recorded in the index (``blobs.codec``).

Write order (the durability story, relied on by ingest):
  1. ``write()`` puts the bytes in ``blobs/tmp/<random>`` and renames it to its final name.
     No per-file fsync: that is one disk flush per small file.
  2. ``sync()`` runs ``syncfs(2)`` on the blob filesystem once, flushing every blob written
     so far (data and directory entries) — then, and only then, the caller commits the rows.
  A crash before the commit leaves files without rows (orphans, possibly torn): they are never
  trusted for dedup (only a committed row is) and gc sweeps them.
Deleting goes the other way: rows first (committed), then ``unlink()``.

Thread-safety: stateless apart from the directory; safe from any thread and process.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import zstandard

from .errors import IntegrityError

CODEC_RAW = 0
CODEC_ZSTD = 1
ZSTD_LEVEL = 3
# Keep zstd only if it saves at least this fraction: a barely-compressible chunk (a .so of
# machine code, a .whl inside a runtime) costs CPU on every cold read for no disk gain.
MIN_SAVING = 0.05
MAX_WINDOW_LOG = 23  # 8 MiB: our own frames never need more; refuse bigger on decode

_libc = ctypes.CDLL("libc.so.6", use_errno=True)  # glibc; find_library forks ldconfig


def _syncfs(fd: int) -> None:
    if _libc.syncfs(fd) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def hexdigest(digest: bytes) -> str:
    return digest.hex()


class BlobStore:
    def __init__(self, store_dir: Path) -> None:
        self.root = Path(store_dir) / "blobs"
        self.tmp = self.root / "tmp"

    # --- layout -------------------------------------------------------------------------
    def create(self) -> None:
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, digest: bytes) -> Path:
        h = digest.hex()
        return self.root / h[:2] / h[2:]

    def exists(self, digest: bytes) -> bool:
        return self.path(digest).exists()

    # --- encoding -----------------------------------------------------------------------
    @staticmethod
    def encode(data: bytes, cctx: zstandard.ZstdCompressor | None = None) -> tuple[int, bytes]:
        """Return (codec, stored bytes): zstd if it saves MIN_SAVING, else raw."""
        if len(data) < 64:
            return CODEC_RAW, data
        c = (cctx or zstandard.ZstdCompressor(level=ZSTD_LEVEL)).compress(data)
        if len(c) <= len(data) * (1 - MIN_SAVING):
            return CODEC_ZSTD, c
        return CODEC_RAW, data

    @staticmethod
    def decode(stored: bytes, codec: int, size: int, what: str = "blob") -> bytes:
        if codec == CODEC_RAW:
            data = stored
        elif codec == CODEC_ZSTD:
            try:
                dctx = zstandard.ZstdDecompressor(max_window_size=1 << MAX_WINDOW_LOG)
                data = dctx.decompress(stored, max_output_size=size)
            except zstandard.ZstdError as e:
                raise IntegrityError(f"{what}: corrupt zstd data ({e})") from None
        else:
            raise IntegrityError(f"{what}: unknown codec {codec}")
        if len(data) != size:
            raise IntegrityError(f"{what}: decoded {len(data)} bytes, index says {size}")
        return data

    # --- I/O ----------------------------------------------------------------------------
    def write(self, digest: bytes, stored: bytes) -> int:
        """Write ``stored`` (already encoded) as blob ``digest`` atomically; return its size.

        Always writes, even if a file exists: an existing file without a committed row may
        be a torn orphan from a crash. Call ``sync()`` before committing rows.
        """
        final = self.path(digest)
        tmp = self.tmp / f"{digest.hex()[:16]}.{secrets.token_hex(6)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
        except FileNotFoundError:
            self.create()
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
        try:
            view = memoryview(stored)
            while view:
                n = os.write(fd, view)
                view = view[n:]
        finally:
            os.close(fd)
        try:
            os.rename(tmp, final)
        except FileNotFoundError:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.rename(tmp, final)
        return len(stored)

    def sync(self) -> None:
        """Flush every blob written so far (data + directory entries) to stable storage."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            _syncfs(fd)
        finally:
            os.close(fd)

    def read_stored(self, digest: bytes) -> bytes:
        with open(self.path(digest), "rb") as f:
            return f.read()

    def read(self, digest: bytes, codec: int, size: int) -> bytes:
        """The decoded bytes of a blob (raises IntegrityError/FileNotFoundError)."""
        return self.decode(self.read_stored(digest), codec, size, f"blob {digest.hex()}")

    def pread_raw(self, digest: bytes, offset: int, length: int) -> bytes:
        """A byte range of a RAW blob, without reading the rest."""
        fd = os.open(self.path(digest), os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def unlink(self, digest: bytes) -> bool:
        try:
            os.unlink(self.path(digest))
            return True
        except FileNotFoundError:
            return False

    def iter_files(self) -> Iterator[tuple[bytes, Path]]:
        """Every blob file on disk (by name), skipping tmp/ and anything malformed."""
        if not self.root.exists():
            return
        with os.scandir(self.root) as shards:
            for shard in shards:
                if len(shard.name) != 2 or not shard.is_dir(follow_symlinks=False):
                    continue
                with os.scandir(shard.path) as files:
                    for f in files:
                        name = shard.name + f.name
                        if len(name) == 64:
                            try:
                                yield bytes.fromhex(name), Path(f.path)
                            except ValueError:
                                continue

    def iter_tmp(self) -> Iterator[Path]:
        if self.tmp.exists():
            yield from self.tmp.iterdir()


def is_enospc(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
