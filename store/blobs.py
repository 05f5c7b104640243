"""Content-addressed blob files: ``STORE/blobs/<hex[:2]>/<hex[2:]>``, raw or one zstd frame.

A blob is one chunk of a file body (at most ``schema.CHUNK_SIZE`` bytes decoded), named by
the sha256 of its decoded bytes. It is stored zstd-compressed when that saves space and raw
when it does not; the codec is recorded in the index (``blobs.codec``).

Write order (the durability story, relied on by ingest):
  1. ``write()`` creates an unnamed ``O_TMPFILE`` in the blob's shard directory, writes it and
     ``linkat``s it to its final name: the name appears only with the whole content behind it,
     and a crash mid-write leaves nothing at all (an unnamed file is freed). When the name
     already exists (an orphan of a killed install, possibly torn, or a concurrent install
     writing the same chunk), or the filesystem has no O_TMPFILE, it falls back to
     ``blobs/tmp/<random>`` + ``rename`` over the final name (atomic replace). Both are ~2x
     cheaper than a named temp file in another directory renamed across (measured: the
     cross-directory rename locks two directories and dirties both).
     No per-file fsync: that is one disk flush per small file.
  2. ``sync()`` runs ``syncfs(2)`` on the blob filesystem once, flushing every blob written
     so far (data and directory entries) — then, and only then, the caller commits the rows.
  A crash before the commit leaves files without rows (orphans, possibly torn): they are never
  trusted for dedup (only a committed row is) and gc sweeps them.
Deleting goes the other way: rows first (committed), then ``unlink()``.

Thread-safety: stateless apart from the directory and a process-wide "O_TMPFILE works" flag
(it only ever goes from True to False, so a race on it is harmless); safe from any thread and
process.
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
# Level 1, not 3: on the realistic ML runtime (387 MB, 10k files) level 3 costs 1.54 s CPU
# for 146 MB allocated, level 1 1.05 s for 155 MB (+6 %), level 2 1.26 s / 150 MB. Install
# time is CPU-bound on two cores; three versions stay at ~0.18x of side-by-side (<= 0.25x).
ZSTD_LEVEL = 1
# Keep zstd only if it saves at least this fraction: a barely-compressible chunk (a .so of
# machine code, a .whl inside a runtime) costs CPU on every cold read for no disk gain.
MIN_SAVING = 0.05
MAX_WINDOW_LOG = 23  # 8 MiB: our own frames never need more; refuse bigger on decode

_libc = ctypes.CDLL("libc.so.6", use_errno=True)  # glibc; find_library forks ldconfig


def _syncfs(fd: int) -> None:
    if _libc.syncfs(fd) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


_AT_FDCWD = -100
_AT_SYMLINK_FOLLOW = 0x400
_TMPFILE_FLAGS = os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC
_tmpfile_ok = True  # cleared once O_TMPFILE or /proc/self/fd turns out to be unavailable


def _no_tmpfile() -> None:
    global _tmpfile_ok
    _tmpfile_ok = False


def _link_fd(fd: int, dest: str) -> None:
    """linkat(2) of /proc/self/fd/N with AT_SYMLINK_FOLLOW: names an O_TMPFILE without
    CAP_DAC_READ_SEARCH (AT_EMPTY_PATH would need it). Called through ctypes because
    CPython 3.11's ``os.link`` uses plain link(2), which links the /proc symlink itself."""
    if _libc.linkat(_AT_FDCWD, f"/proc/self/fd/{fd}".encode(), _AT_FDCWD, os.fsencode(dest),
                    _AT_SYMLINK_FOLLOW) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), dest)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


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
    def encode(data: bytes | memoryview, cctx: zstandard.ZstdCompressor | None = None
               ) -> tuple[int, bytes | memoryview]:
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
    def write(self, digest: bytes, stored: bytes | memoryview) -> int:
        """Write ``stored`` (already encoded) as blob ``digest`` atomically; return its size.

        Always writes, even if a file exists: an existing file without a committed row may
        be a torn orphan from a crash. Call ``sync()`` before committing rows.
        """
        h = digest.hex()
        shard = f"{self.root}/{h[:2]}"
        if _tmpfile_ok:
            try:
                fd = os.open(shard, _TMPFILE_FLAGS, 0o444)
            except FileNotFoundError:
                os.makedirs(shard, exist_ok=True)
                fd = os.open(shard, _TMPFILE_FLAGS, 0o444)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise
                _no_tmpfile()
                return self._write_renamed(digest, stored)
            try:
                _write_all(fd, stored)
                _link_fd(fd, f"{shard}/{h[2:]}")
                return len(stored)
            except FileExistsError:
                pass  # replace it atomically below: it may be a torn orphan
            except FileNotFoundError:  # no /proc: never try again in this process
                _no_tmpfile()
            finally:
                os.close(fd)
        return self._write_renamed(digest, stored)

    def _write_renamed(self, digest: bytes, stored: bytes | memoryview) -> int:
        """The fallback: a named temp file in ``blobs/tmp`` renamed over the final name."""
        final = self.path(digest)
        tmp = self.tmp / f"{digest.hex()[:16]}.{secrets.token_hex(6)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
        except FileNotFoundError:
            self.create()
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
        try:
            _write_all(fd, stored)
        except BaseException:
            os.unlink(tmp)  # a disk that filled up gets the partial file's space back
            raise
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
