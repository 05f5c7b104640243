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
     ``blobs/tmp/<random>`` + ``renameat`` over the final name (atomic replace). Both are ~2x
     cheaper than a named temp file in another directory renamed across (measured: the
     cross-directory rename locks two directories and dirties both).
     No per-file fsync: that is one disk flush per small file.
  2. ``sync()`` runs ``syncfs(2)`` on the blob filesystem once, flushing every blob written
     so far (data and directory entries) — then, and only then, the caller commits the rows.
  A crash before the commit leaves files without rows (orphans, possibly torn): they are never
  trusted for dedup (only a committed row is) and gc sweeps them.
Deleting goes the other way: rows first (committed), then ``unlink()``.
Replacing an existing blob by a smaller encoding of the same bytes (the cold pass,
store/recompress.py): ``stage()`` into ``blobs/tmp``, ``sync()``, then ``replace()`` (a rename
over the name) inside the transaction that updates the row.

No link is ever followed (the store is group-writable; root runs gc, verify, repair, installs
and the mount daemon over it): ``blobs/``, each shard and ``tmp/`` are opened as directories
with ``O_NOFOLLOW`` relative to the store's fd, blob files with ``O_NOFOLLOW|O_NONBLOCK`` and
``fstat``-checked to be regular files, and names are created, replaced and removed only with
``linkat``/``renameat``/``unlinkat`` on those fds (store/safepath.py). A shard or ``tmp`` that
is a link is an error (``UnsafeStorePath``), a blob that is one an ``IntegrityError``. gc,
verify and repair reach blob files only through this class: it is the one owner of the layout.
An install's BlobStore (``keep_shards``) opens each shard once and writes through that fd
until it is closed: a shard an admin swaps for a link meanwhile is still not followed (the
writes go on into the directory that was checked; ``verify`` then reports those blobs
missing under their names).

Thread-safety: the open ``blobs/``, ``tmp/`` and kept shard fds are guarded by a lock; a
process-wide "O_TMPFILE works" flag only ever goes from True to False, so a race on it is
harmless; safe from any thread and process.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
import threading
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from . import safepath
from .errors import IntegrityError, JblError, UnsafeStorePath

if TYPE_CHECKING:
    # imported where blobs are encoded or decoded: `jbl run` opens the store (a lease) and
    # never does either (zstandard imports platform: ~3 ms of every job's start)
    import zstandard

CODEC_RAW = 0
CODEC_ZSTD = 1
# A zstd frame the cold pass has settled (store/recompress.py: rewritten at COLD_LEVEL, or
# found not worth rewriting). Decoded exactly like CODEC_ZSTD; the value only tells the next
# pass to skip it, so an interrupted pass resumes where it stopped.
CODEC_ZSTD_COLD = 2
CODECS = (CODEC_RAW, CODEC_ZSTD, CODEC_ZSTD_COLD)
# Level 1, not 3: on the realistic ML runtime (387 MB, 10k files) level 3 costs 1.54 s CPU
# for 146 MB allocated, level 1 1.05 s for 155 MB (+6 %), level 2 1.26 s / 150 MB. Install
# time is CPU-bound on two cores; three versions stay at ~0.18x of side-by-side (<= 0.25x).
ZSTD_LEVEL = 1
# The cold pass (`jbl store gc --recompress`): chunks are at most 1 MiB, so zstd's window is
# the chunk and long-distance matching finds nothing more; 19 is the highest level that
# needs no bigger window (20-22 "ultra" only raise the window, which a chunk never fills).
# Measured on the realistic series: docs/gc.md, "Recompressing cold blobs".
COLD_LEVEL = 19
# Keep zstd only if it saves at least this fraction: a barely-compressible chunk (a .so of
# machine code, a .whl inside a runtime) costs CPU on every cold read for no disk gain.
MIN_SAVING = 0.05
MAX_WINDOW_LOG = 23  # 8 MiB: our own frames never need more; refuse bigger on decode
MAX_STORED = 64 << 20  # no blob file we write is near this; a bigger one is not ours

_libc = ctypes.CDLL("libc.so.6", use_errno=True)  # glibc; find_library forks ldconfig


def _syncfs(fd: int) -> None:
    if _libc.syncfs(fd) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


_AT_FDCWD = -100
_AT_SYMLINK_FOLLOW = 0x400
_TMPFILE_FLAGS = os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_MODE = 0o777  # & ~umask; `jbl setup --system` makes shards 2770 root:G
_tmpfile_ok = True  # cleared once O_TMPFILE or /proc/self/fd turns out to be unavailable


def _no_tmpfile() -> None:
    global _tmpfile_ok
    _tmpfile_ok = False


def _link_fd(fd: int, dir_fd: int, name: str) -> None:
    """linkat(2) of /proc/self/fd/N with AT_SYMLINK_FOLLOW into ``dir_fd``: names an
    O_TMPFILE without CAP_DAC_READ_SEARCH (AT_EMPTY_PATH would need it). The new name is
    never followed (EEXIST if anything, even a link, has it). Called through ctypes because
    CPython 3.11's ``os.link`` uses plain link(2), which links the /proc symlink itself."""
    if _libc.linkat(_AT_FDCWD, f"/proc/self/fd/{fd}".encode(), dir_fd, name.encode(),
                    _AT_SYMLINK_FOLLOW) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), name)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _close_all(*lists: list[int]) -> None:
    for fds in lists:
        while fds:
            with contextlib.suppress(OSError):
                os.close(fds.pop())


def hexdigest(digest: bytes) -> str:
    return digest.hex()


class BlobStore:
    """The one owner of the blob layout. Every file is reached through directory fds with
    no-follow opens (store/safepath.py): ``blobs/`` is opened once (lazily, so a reader who
    may not open it is never refused before it needs a blob), each shard per operation (or
    once, ``keep_shards``)."""

    def __init__(self, store_dir: Path, *, keep_shards: bool = False) -> None:
        """``keep_shards``: ``write`` keeps each shard's fd open until ``close`` (an install
        writing thousands of blobs: three syscalls fewer a blob) instead of one per call."""
        self.store_dir = Path(store_dir)
        self.root = self.store_dir / "blobs"  # for messages; never opened by path
        self._lock = threading.Lock()
        self._fds: list[int] = []  # [blobs fd] or [blobs fd, tmp fd]; closed with us
        self._shards: dict[str, int] | None = {} if keep_shards else None
        self._kept: list[int] = []  # the kept shard fds, closed with us
        self._finalizer = weakref.finalize(self, _close_all, self._fds, self._kept)

    def close(self) -> None:
        with self._lock:
            _close_all(self._fds, self._kept)
            if self._shards:
                self._shards.clear()

    # --- layout -------------------------------------------------------------------------
    def _root_fd(self, create: bool = False) -> int:
        with self._lock:
            if not self._fds:
                sfd = safepath.open_store(self.store_dir)
                try:
                    self._fds.append(safepath.open_dir(
                        sfd, "blobs", shown=str(self.root),
                        create_mode=_DIR_MODE if create else None))
                finally:
                    os.close(sfd)
            return self._fds[0]

    def _tmp_fd(self) -> int:
        root = self._root_fd(create=True)
        with self._lock:
            if len(self._fds) < 2:
                self._fds.append(safepath.open_dir(root, "tmp", shown=str(self.root / "tmp"),
                                                   create_mode=_DIR_MODE))
            return self._fds[1]

    def _shard(self, h: str, create: bool = False) -> int:
        """An fd of the shard directory of hex digest ``h`` (the caller closes it)."""
        return safepath.open_dir(self._root_fd(create), h[:2], shown=f"{self.root}/{h[:2]}",
                                 create_mode=_DIR_MODE if create else None)

    def _write_shard(self, h: str) -> int:
        """The shard fd ``write`` uses: a kept one (``keep_shards``), else a new one."""
        if self._shards is None:
            return self._shard(h, create=True)
        fd = self._shards.get(h[:2])
        if fd is None:
            new = self._shard(h, create=True)
            with self._lock:
                fd = self._shards.setdefault(h[:2], new)
                if fd == new:
                    self._kept.append(new)
            if fd != new:  # another thread opened it first
                os.close(new)
        return fd

    def create(self) -> None:
        self._tmp_fd()

    @property
    def tmp(self) -> Path:
        """``blobs/tmp`` for path-based callers (downloads, repair): ``/proc/self/fd/N``, the
        directory checked once and pinned by an fd, so a link planted there later is never
        followed. Valid while this BlobStore is open (the Store keeps it)."""
        return Path(f"/proc/self/fd/{self._tmp_fd()}")

    def path(self, digest: bytes) -> Path:
        """Where a blob lives, for messages and tests; jbl itself never opens this path."""
        h = digest.hex()
        return self.root / h[:2] / h[2:]

    def stat(self, digest: bytes) -> os.stat_result | None:
        """lstat of the blob file (a link is reported, not followed); None if absent."""
        h = digest.hex()
        try:
            shard = self._shard(h)
        except FileNotFoundError:
            return None
        with safepath.opened(shard):
            return safepath.lstat(shard, h[2:])

    def describe(self, digest: bytes) -> str:
        """What the blob's name is on disk (a link and its target), for a problem line."""
        h = digest.hex()
        try:
            with safepath.opened(self._shard(h)) as shard:
                return safepath.describe(shard, h[2:])
        except (OSError, JblError):
            return "unreadable"

    def tmp_shown(self, name: str) -> Path:
        """``blobs/tmp/NAME`` for messages (``iter_tmp`` names); never opened by path."""
        return self.root / "tmp" / name

    def exists(self, digest: bytes) -> bool:
        st = self.stat(digest)
        return st is not None and stat.S_ISREG(st.st_mode)

    # --- encoding -----------------------------------------------------------------------
    @staticmethod
    def encode(data: bytes | memoryview, cctx: zstandard.ZstdCompressor | None = None
               ) -> tuple[int, bytes | memoryview]:
        """Return (codec, stored bytes): zstd if it saves MIN_SAVING, else raw."""
        if len(data) < 64:
            return CODEC_RAW, data
        import zstandard

        c = (cctx or zstandard.ZstdCompressor(level=ZSTD_LEVEL)).compress(data)
        if len(c) <= len(data) * (1 - MIN_SAVING):
            return CODEC_ZSTD, c
        return CODEC_RAW, data

    @staticmethod
    def decode(stored: bytes, codec: int, size: int, what: str = "blob") -> bytes:
        if codec == CODEC_RAW:
            data = stored
        elif codec in (CODEC_ZSTD, CODEC_ZSTD_COLD):
            import zstandard

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

    # --- writing ------------------------------------------------------------------------
    def write(self, digest: bytes, stored: bytes | memoryview) -> int:
        """Write ``stored`` (already encoded) as blob ``digest`` atomically; return its size.

        Always writes, even if a file exists: an existing file without a committed row may
        be a torn orphan from a crash (or a link an admin planted: replaced, not followed).
        Call ``sync()`` before committing rows.
        """
        h = digest.hex()
        shard = self._write_shard(h)
        try:
            if _tmpfile_ok:
                try:
                    fd = os.open(".", _TMPFILE_FLAGS, 0o444, dir_fd=shard)
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                        raise
                    _no_tmpfile()
                else:
                    try:
                        _write_all(fd, stored)
                        _link_fd(fd, shard, h[2:])
                        return len(stored)
                    except FileExistsError:
                        pass  # replace it atomically below: it may be a torn orphan
                    except FileNotFoundError:  # no /proc: never try again in this process
                        _no_tmpfile()
                    finally:
                        os.close(fd)
            return self._write_renamed(shard, h, stored)
        finally:
            if self._shards is None:
                os.close(shard)

    def _write_renamed(self, shard: int, h: str, stored: bytes | memoryview) -> int:
        """The fallback: a new file in ``blobs/tmp`` renamed over the final name (renameat
        replaces whatever has the name, a planted link included, without following it)."""
        name = self.stage(bytes.fromhex(h), stored)
        os.rename(name, h[2:], src_dir_fd=self._tmp_fd(), dst_dir_fd=shard)
        return len(stored)

    def stage(self, digest: bytes, stored: bytes | memoryview) -> str:
        """Write ``stored`` to a new file in ``blobs/tmp`` (not synced) and return its name,
        for ``replace``. A failed write leaves nothing (a full disk gets its space back)."""
        tmp = self._tmp_fd()
        name = f"{digest.hex()[:16]}.{os.urandom(6).hex()}"  # secrets.token_hex, minus hmac
        fd = os.open(name, _NEW_FILE_FLAGS, 0o444, dir_fd=tmp)
        try:
            _write_all(fd, stored)
        except BaseException:
            os.unlink(name, dir_fd=tmp)
            raise
        finally:
            os.close(fd)
        return name

    def replace(self, name: str, digest: bytes) -> None:
        """Rename ``blobs/tmp/NAME`` (from ``stage``) over blob ``digest``: atomic, so whoever
        opens the blob's name gets the old file or the new one, each whole, and whoever has
        it open keeps reading the old inode. FileNotFoundError if either is gone."""
        h = digest.hex()
        with safepath.opened(self._shard(h)) as shard:
            if safepath.lstat(shard, h[2:]) is None:
                raise FileNotFoundError(errno.ENOENT, "blob file gone", h)
            os.rename(name, h[2:], src_dir_fd=self._tmp_fd(), dst_dir_fd=shard)

    def sync(self) -> None:
        """Flush every blob written so far (data + directory entries) to stable storage."""
        _syncfs(self._root_fd())

    # --- reading ------------------------------------------------------------------------
    def open_blob(self, digest: bytes) -> int:
        """A read fd of the blob file: a regular file, opened without following links and
        without blocking. FileNotFoundError if absent; IntegrityError if it is anything else
        (a planted link, FIFO, device, directory)."""
        h = digest.hex()
        try:
            with safepath.opened(self._shard(h)) as shard:
                return safepath.open_file(shard, h[2:], shown=f"blob {h}")
        except UnsafeStorePath as e:
            raise IntegrityError(e.message, hint=e.hint) from None

    def read_stored(self, digest: bytes, limit: int = MAX_STORED) -> bytes:
        """The stored bytes of a blob (at most ``limit``: more is IntegrityError)."""
        fd = self.open_blob(digest)
        try:
            data = bytearray()
            while len(data) <= limit and (block := os.read(fd, limit + 1 - len(data))):
                data += block
        finally:
            os.close(fd)
        if len(data) > limit:
            raise IntegrityError(f"blob {digest.hex()}: more than {limit} bytes on disk")
        return bytes(data)

    def read(self, digest: bytes, codec: int, size: int) -> bytes:
        """The decoded bytes of a blob (raises IntegrityError/FileNotFoundError)."""
        return self.decode(self.read_stored(digest), codec, size, f"blob {digest.hex()}")

    # --- deleting -----------------------------------------------------------------------
    def unlink(self, digest: bytes) -> bool:
        return self.unlink_many([digest]) == 1

    def unlink_many(self, digests: Iterable[bytes]) -> int:
        """unlinkat every named blob file (a link itself, never its target); each shard is
        opened once. Returns how many existed."""
        by_shard: dict[str, list[str]] = {}
        for d in digests:
            h = d.hex()
            by_shard.setdefault(h[:2], []).append(h[2:])
        n = 0
        for sh, names in by_shard.items():
            try:
                fd = self._shard(sh)
            except (FileNotFoundError, UnsafeStorePath):
                continue  # a shard that is a link: nothing through it is touched
            with safepath.opened(fd):
                n += sum(safepath.unlink(fd, name) for name in names)
        return n

    # --- listing ------------------------------------------------------------------------
    def scan(self) -> Iterator[tuple[bytes, os.DirEntry[str]]]:
        """Every file in the shards named like a blob, with its DirEntry, which may be
        ``stat(follow_symlinks=False)``-ed only before the next item (its shard fd is open
        until then). Shards that are links (or not directories) are skipped: verify reports
        them, setup replaces them. Skips ``tmp/`` and malformed names."""
        try:
            root = self._root_fd()
        except FileNotFoundError:
            return
        with os.scandir(root) as shards:
            names = [s.name for s in shards if len(s.name) == 2
                     and s.is_dir(follow_symlinks=False)]
        for sh in names:
            try:
                fd = self._shard(sh)
            except (FileNotFoundError, UnsafeStorePath):
                continue  # swapped since the listing
            with safepath.opened(fd), os.scandir(fd) as files:
                for f in files:
                    if len(f.name) == 62:
                        try:
                            yield bytes.fromhex(sh + f.name), f
                        except ValueError:
                            continue

    def unsafe_items(self) -> list[tuple[str, str]]:
        """(path, what it is) of each shard or ``tmp`` that is a link or not a directory."""
        try:
            root = self._root_fd()
        except FileNotFoundError:
            return []
        out = []
        with os.scandir(root) as items:
            for it in items:
                if (len(it.name) == 2 or it.name == "tmp") and not it.is_dir(
                        follow_symlinks=False):
                    out.append((f"{self.root}/{it.name}", safepath.describe(root, it.name)))
        return out

    def iter_files(self) -> Iterator[tuple[bytes, Path]]:
        """Every blob file on disk by name (path for display), skipping tmp/ and malformed."""
        for digest, _entry in self.scan():
            yield digest, self.path(digest)

    def iter_tmp(self) -> Iterator[tuple[str, os.stat_result]]:
        """(name, lstat) of everything in ``blobs/tmp``. UnsafeStorePath if tmp is a link."""
        try:
            root = self._root_fd()
        except FileNotFoundError:
            return
        if safepath.lstat(root, "tmp") is None:
            return
        with os.scandir(self._tmp_fd()) as items:
            for it in items:
                try:
                    yield it.name, it.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue

    def unlink_tmp(self, name: str) -> bool:
        return safepath.unlink(self._tmp_fd(), name)


def is_enospc(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
