"""A strict streaming reader of untrusted tar archives (plain, gzip, zstd, xz, bzip2).

Nothing is ever extracted: ``TarReader.members()`` yields ``Member`` records and, for regular
files, ``TarReader.body()`` yields the file's bytes in pieces; the caller decides what to keep.

Strict where Python's ``tarfile`` is lenient (it treats a bad header as end-of-archive and
ignores whatever follows the end marker):
* every header's checksum is verified and its magic must be ustar/pax or GNU;
* numeric fields must be clean octal or GNU base-256; negative sizes/ids are refused;
* the archive must end with two zero blocks; after them only zero padding (at most
  ``limits.MAX_END_PADDING``) may follow, anything else is "trailing data or a second
  archive"; a stream that stops before the end marker is "truncated";
* the compressed container must be complete and clean: a truncated or corrupt gzip/zstd/xz/bz2
  stream, or bytes after the last compressed member/frame, is refused;
* member names must be UTF-8 without control characters, relative, free of ``..``, within
  the name/path/depth limits; sizes and entry counts are checked from the header, before
  the data is read; the zstd window and the decompression ratio are bounded.
Supported member types: regular (``0``, ``\\0``, ``7``), hardlink, symlink, directory,
character/block device, FIFO (the last three are reported; ingest drops them); pax extended
headers (``x``: path, linkpath, size, mtime with nanoseconds, uid, gid; ``g`` is parsed and
ignored) and GNU long names/links (``L``/``K``). Sparse files (old GNU ``S`` and the pax
``GNU.sparse`` formats 0.0, 0.1 and 1.0) are regular files whose body comes out expanded,
holes as zeros. Anything else is refused, and so are OCI whiteout markers (``.wh.*``).
Numbers: uid/gid must lie in ``0..ID_MAX``, mtimes are clamped to ``0..MTIME_MAX_NS``; pax
numbers are length-checked before they are converted.

Thread-safety: a reader and its decoder belong to one thread (the ingest reading thread).
"""

from __future__ import annotations

import bz2
import lzma
import queue
import re
import threading
import types
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, cast

import zstandard

from .digest import HashingReader
from .errors import LimitExceeded, UnsafeArchive
from .limits import (
    ID_MAX,
    MAX_END_PADDING,
    MAX_META_SIZE,
    RATIO_FLOOR,
    Limits,
    clamp_mtime_ns,
)

_inflate: types.ModuleType = zlib
_INFLATE_ERRORS: tuple[type[BaseException], ...] = (zlib.error,)
try:  # ISA-L inflate: the same gzip format and checks at ~2x zlib's speed (optional)
    from isal import isal_zlib

    _inflate = isal_zlib
    _INFLATE_ERRORS = (zlib.error, cast(type[BaseException], isal_zlib.error))
except ImportError:  # pragma: no cover - the wheel is missing: stdlib zlib, slower
    pass

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_PIECE = 1 << 20          # decoded bytes produced per decoder step (bounds memory)
_RAW_READ = 256 << 10     # raw bytes read per step
_VIEW_MIN = 64 << 10      # body reads at least this big are views, not copies (read_view)

REG, DIR, SYMLINK, HARDLINK, CHAR, BLOCKDEV, FIFO = "file", "dir", "symlink", "hardlink", \
    "char device", "block device", "fifo"
_TYPES = {b"0": REG, b"\0": REG, b"7": REG, b"1": HARDLINK, b"2": SYMLINK, b"3": CHAR,
          b"4": BLOCKDEV, b"5": DIR, b"6": FIFO}

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
XZ_MAGIC = b"\xfd7zXZ\x00"
BZ2_MAGIC = b"BZh"


class Truncated(Exception):
    """The decoded stream ended early (turned into UnsafeArchive naming the member)."""


@dataclass(slots=True)
class Member:
    path: str           # normalised: relative, no '.', no '//', no trailing '/'; '' = archive root
    kind: str           # REG, DIR, SYMLINK, HARDLINK, CHAR, BLOCKDEV, FIFO
    mode: int           # all 12 permission bits as in the archive (setuid not yet cleared)
    uid: int
    gid: int
    size: int           # body bytes (regular files), else 0
    mtime_ns: int       # clamped to 0..MTIME_MAX_NS
    link: bytes | None  # symlink target verbatim; hardlink: normalised path (UTF-8)
    mtime_clamped: bool = False  # the archive's mtime was outside that range


# ------------------------------------------------------------------------------ decoders
class _Source:
    """Decoded bytes in pieces; subclasses implement ``_next_piece`` (b'' at clean EOF)."""

    name = "tar"

    def __init__(self, raw: HashingReader, head: bytes, limits: Limits) -> None:
        self.raw = raw
        self._head = head
        self.limits = limits
        self.decoded = 0

    def _read_raw(self) -> bytes:
        if self._head:
            data, self._head = self._head, b""
            return data
        return self.raw.read(_RAW_READ)

    def _next_piece(self) -> bytes:
        return self._read_raw()

    def _more(self, rest: bytes, magic: bytes) -> bytes:
        """What follows a finished compressed member, at least ``len(magic)`` bytes if any."""
        while len(rest) < len(magic):
            data = self._read_raw()
            if not data:
                break
            rest += data
        return rest

    def next_piece(self) -> bytes:
        piece = self._next_piece()
        self.decoded += len(piece)
        if (self.name != "tar" and self.decoded > RATIO_FLOOR
                and self.decoded > self.limits.max_compression_ratio * max(self.raw.count, 1)):
            raise LimitExceeded(f"{self.name} stream expands more than "
                                f"{self.limits.max_compression_ratio}:1 (a decompression bomb?)")
        return piece


class _GzipSource(_Source):
    name = "gzip"

    def __init__(self, raw: HashingReader, head: bytes, limits: Limits) -> None:
        super().__init__(raw, head, limits)
        self._d = _inflate.decompressobj(31)  # 31: gzip wrapper; CRC32 and ISIZE checked
        self._pending = b""

    def _next_piece(self) -> bytes:
        while True:
            if self._d.eof:
                rest = self._more(self._d.unused_data, GZIP_MAGIC)
                if not rest:
                    return b""
                if not rest.startswith(GZIP_MAGIC):
                    raise UnsafeArchive("trailing data after the gzip stream")
                self._d = _inflate.decompressobj(31)  # a concatenated gzip member is gzip
                self._pending = rest
            data = self._d.unconsumed_tail or self._pending or self._read_raw()
            self._pending = b""
            if not data:
                raise UnsafeArchive("truncated gzip stream")
            try:
                out: bytes = self._d.decompress(data, _PIECE)
            except _INFLATE_ERRORS as e:
                raise UnsafeArchive(f"corrupt gzip stream ({e})") from None
            if out:
                return out


class _LzmaBz2Source(_Source):
    def __init__(self, raw: HashingReader, head: bytes, limits: Limits, kind: str) -> None:
        super().__init__(raw, head, limits)
        self.name = kind
        self._magic = XZ_MAGIC if kind == "xz" else BZ2_MAGIC
        self._d = self._new()
        self._data = b""

    def _new(self) -> lzma.LZMADecompressor | bz2.BZ2Decompressor:
        if self.name == "xz":
            # memlimit bounds the dictionary an archive may demand, like the zstd window.
            mem = 1 << (self.limits.max_window_log + 1)
            return lzma.LZMADecompressor(lzma.FORMAT_XZ, memlimit=mem)
        return bz2.BZ2Decompressor()

    def _next_piece(self) -> bytes:
        while True:
            if self._d.eof:
                rest = self._more(self._d.unused_data + self._data, self._magic)
                self._data = b""
                if not rest:
                    return b""
                if not rest.startswith(self._magic):
                    raise UnsafeArchive(f"trailing data after the {self.name} stream")
                self._d = self._new()
                self._data = rest
            if self._d.needs_input:
                if not self._data:
                    self._data = self._read_raw()
                    if not self._data:
                        raise UnsafeArchive(f"truncated {self.name} stream")
                data, self._data = self._data, b""
            else:
                data = b""
            try:
                out = self._d.decompress(data, _PIECE)
            except (lzma.LZMAError, OSError, EOFError) as e:
                if "limit" in str(e).lower():
                    raise LimitExceeded(f"xz dictionary exceeds the limit "
                                        f"(2^{self.limits.max_window_log} bytes)") from None
                raise UnsafeArchive(f"corrupt {self.name} stream ({e})") from None
            if out:
                return out


class _ZstdSource(_Source):
    """zstd, walked frame by frame and block by block so that each decompress call gets at
    most a few blocks (output per call <= 16 x 128 KiB), every frame's window is checked
    before it is decoded, and a frame cut short is detected (zstandard's stream reader
    returns a silent EOF for a truncated frame)."""

    name = "zstd"

    def __init__(self, raw: HashingReader, head: bytes, limits: Limits) -> None:
        super().__init__(raw, head, limits)
        self._buf = bytearray(head)
        self._head = b""
        self._dctx = zstandard.ZstdDecompressor(max_window_size=1 << limits.max_window_log)
        self._obj: zstandard.ZstdDecompressionObj | None = None
        self._checksum = 0  # bytes of content checksum still to pass at the end of the frame
        self._last = False  # the current frame's last block has been fed

    def _need(self, n: int, eof_ok: bool = False) -> bool:
        while len(self._buf) < n:
            data = self.raw.read(max(_RAW_READ, n - len(self._buf)))
            if not data:
                if eof_ok and not self._buf:
                    return False
                raise UnsafeArchive("truncated zstd stream")
            self._buf += data
        return True

    def _take(self, n: int) -> bytes:
        self._need(n)
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def _start_frame(self) -> bool:
        while True:
            if not self._need(4, eof_ok=True):
                return False
            magic = int.from_bytes(self._buf[:4], "little")
            if 0x184D2A50 <= magic <= 0x184D2A5F:  # skippable frame: magic, size, payload
                self._need(8)
                self._take(8 + int.from_bytes(self._buf[4:8], "little"))
                continue
            if bytes(self._buf[:4]) != ZSTD_MAGIC:
                raise UnsafeArchive("trailing data after the zstd stream")
            self._need(5)
            fhd = self._buf[4]
            fcs_flag, single, checksum, did_flag = fhd >> 6, fhd >> 5 & 1, fhd >> 2 & 1, fhd & 3
            if fhd & 0x08:
                raise UnsafeArchive("corrupt zstd stream (reserved frame header bit set)")
            hlen = 5 + (0 if single else 1) + (0, 1, 2, 4)[did_flag] + \
                ((1 if single else 0), 2, 4, 8)[fcs_flag]
            self._need(hlen)
            try:
                params = zstandard.get_frame_parameters(bytes(self._buf[:hlen]))
            except zstandard.ZstdError as e:
                raise UnsafeArchive(f"corrupt zstd stream ({e})") from None
            if params.window_size > 1 << self.limits.max_window_log:
                raise LimitExceeded(f"zstd window of {params.window_size} bytes exceeds the "
                                    f"limit (2^{self.limits.max_window_log})")
            self._obj = self._dctx.decompressobj()
            self._checksum = 4 if checksum else 0
            self._last = False
            self._feed(self._take(hlen))
            return True

    def _feed(self, data: bytes) -> bytes:
        assert self._obj is not None
        try:
            return self._obj.decompress(data)
        except zstandard.ZstdError as e:
            if "memory" in str(e) or "window" in str(e).lower():
                raise LimitExceeded(f"zstd window exceeds the limit "
                                    f"(2^{self.limits.max_window_log})") from None
            raise UnsafeArchive(f"corrupt zstd stream ({e})") from None

    def _next_piece(self) -> bytes:
        while True:
            if self._obj is None and not self._start_frame():
                return b""
            if self._last:
                out = self._feed(self._take(self._checksum)) if self._checksum else b""
                assert self._obj is not None  # set by _start_frame, cleared only below
                if not self._obj.eof:
                    raise UnsafeArchive("corrupt zstd stream (frame does not end)")
                self._obj = None
                if out:
                    return out
                continue
            chunk = bytearray()
            for _ in range(16):  # at most 16 blocks (<= 2 MiB decoded) per call
                self._need(3)
                hdr = int.from_bytes(self._buf[:3], "little")
                btype, bsize = hdr >> 1 & 3, hdr >> 3
                if btype == 3:
                    raise UnsafeArchive("corrupt zstd stream (reserved block type)")
                chunk += self._take(3 + (1 if btype == 1 else bsize))
                if hdr & 1:
                    self._last = True
                    break
            out = self._feed(bytes(chunk))
            if out:
                return out


def open_source(raw: HashingReader, limits: Limits) -> _Source:
    """Sniff the compression from the magic bytes and return the decoded stream."""
    head = b""
    while len(head) < 6:
        data = raw.read(6 - len(head))
        if not data:
            break
        head += data
    if head.startswith(GZIP_MAGIC):
        return _GzipSource(raw, head, limits)
    if head.startswith(ZSTD_MAGIC):
        return _ZstdSource(raw, head, limits)
    if head.startswith(XZ_MAGIC):
        return _LzmaBz2Source(raw, head, limits, "xz")
    if head.startswith(BZ2_MAGIC):
        return _LzmaBz2Source(raw, head, limits, "bzip2")
    return _Source(raw, head, limits)


class _Prefetch:
    """Runs a source's reading and decoding on its own thread, handing pieces over through a
    bounded queue: raw reads, the tarball's sha256 and zlib/zstd/lzma all release the GIL, so
    decompression overlaps header parsing and the chunk workers (two cores busy)."""

    def __init__(self, src: _Source, depth: int = 8) -> None:
        self.src = src
        self.name = src.name
        self._q: queue.Queue[bytes | BaseException] = queue.Queue(depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, name="jbl-decode", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                piece = self.src.next_piece()
                self._put(piece)
                if not piece:
                    return
        except BaseException as e:  # handed to the reading thread, raised there
            self._put(e)

    def _put(self, item: bytes | BaseException) -> None:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def next_piece(self) -> bytes:
        if self._done:
            return b""
        item = self._q.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if not item:
            self._done = True
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


class _Decoded:
    """Exact reads over a source's pieces."""

    def __init__(self, src: _Source | _Prefetch) -> None:
        self.src = src
        self._cur = b""
        self._off = 0

    def read(self, n: int) -> bytes:
        """Exactly ``n`` bytes, or Truncated."""
        end = self._off + n
        if end <= len(self._cur):
            out = self._cur[self._off:end]
            self._off = end
            return out
        parts = [self._cur[self._off:]]
        need = n - len(parts[0])
        while need > 0:
            piece = self.src.next_piece()
            if not piece:
                self._cur, self._off = b"", 0
                raise Truncated()
            if len(piece) > need:
                parts.append(piece[:need])
                self._cur, self._off = piece, need
                return b"".join(parts)
            parts.append(piece)
            need -= len(piece)
        self._cur, self._off = b"", 0
        return b"".join(parts)

    def read_view(self, n: int) -> bytes | memoryview:
        """Exactly ``n`` bytes like ``read``, but a large read that lies inside one decoded
        piece comes back as a memoryview of it instead of a copy: file bodies are most of
        the bytes, and copying them under the GIL stalls the other threads. A view keeps its
        whole piece (<= ``_PIECE``) alive; small reads are copied so that many tiny files
        never pin many pieces."""
        end = self._off + n
        if n >= _VIEW_MIN and end <= len(self._cur):
            out = memoryview(self._cur)[self._off:end]
            self._off = end
            return out
        return self.read(n)

    def skip(self, n: int) -> None:
        while n > 0:
            k = min(n, _PIECE)
            self.read(k)
            n -= k

    def drain_zeros(self, limit: int) -> bool:
        """Consume the rest; True if it is all zeros and at most ``limit`` bytes."""
        seen = 0
        rest = self._cur[self._off:]
        self._cur, self._off = b"", 0
        while True:
            if rest.count(0) != len(rest):
                return False
            seen += len(rest)
            if seen > limit:
                return False
            rest = self.src.next_piece()
            if not rest:
                return True


# ------------------------------------------------------------------------------ headers
_OCTAL_RE = re.compile(rb"[0-7]+")


def _num(field: bytes, what: str, name: str) -> int:
    if field and field[0] in (0x80, 0xFF):  # GNU base-256
        n = int.from_bytes(field[1:], "big")
        return n - (256 ** (len(field) - 1)) if field[0] == 0xFF else n
    s = field.split(b"\0", 1)[0].strip(b" ")
    if not s:
        return 0
    if not _OCTAL_RE.fullmatch(s):
        raise UnsafeArchive(f"corrupt header field {what}", name)
    return int(s, 8)


def _check_block(block: bytes) -> None:
    stored_field = block[148:156]
    try:
        t = stored_field.split(b"\0", 1)[0].strip(b" ")
        stored = int(t, 8) if t else -1
    except ValueError:
        stored = -1
    unsigned = sum(block) - sum(stored_field) + 8 * 0x20
    if stored == unsigned:
        return
    # Some old tars summed signed chars; accept that spelling too, as GNU tar does.
    signed = unsigned - 256 * sum(1 for b in block[:148] + block[156:] if b > 127)
    if stored != signed:
        raise UnsafeArchive("bad tar header checksum (corrupt or not a tar archive)")


# A pax number with more digits than this is beyond every range above; checked before int()
# (which is quadratic in the digits and refuses more than 4300 of them).
_MAX_DIGITS = 20
_HUGE = 10**_MAX_DIGITS


def _pax_uint(value: bytes, what: str, name: str) -> int:
    """A pax decimal number; ``_HUGE`` for anything longer than ``_MAX_DIGITS`` digits."""
    if not value.isdigit():  # bytes.isdigit: ASCII digits only, and not empty
        raise UnsafeArchive(f"corrupt pax {what} ({value[:40].decode('latin-1')!r})", name)
    value = value.lstrip(b"0") or b"0"
    return _HUGE if len(value) > _MAX_DIGITS else int(value)


def _check_id(n: int, what: str, name: str) -> int:
    if n < 0:
        raise UnsafeArchive(f"negative {what}", name)
    if n > ID_MAX:
        shown = f"of more than {_MAX_DIGITS} digits" if n >= _HUGE else str(n)
        raise UnsafeArchive(f"{what} {shown} is out of range (0..{ID_MAX})", name)
    return n


def _parse_mtime(text: bytes, name: str) -> int:
    """pax ``mtime`` ("[-]SECONDS[.FRACTION]") -> nanoseconds, exact (not yet clamped;
    more than ``_MAX_DIGITS`` digits of seconds count as ``_HUGE``)."""
    neg = text.startswith(b"-")
    sec, _, frac = text.lstrip(b"-").partition(b".")
    if not sec.isdigit() or (frac and not frac.isdigit()):
        raise UnsafeArchive("corrupt pax mtime", name)
    s = _pax_uint(sec, "mtime", name)
    ns = s * 1_000_000_000 + int((frac[:9] + b"000000000")[:9])
    return -ns if neg else ns


# pax 0.0 sparse maps repeat these two keys once per region: kept in order, not overwritten.
_SPARSE_PAIR_KEYS = (b"GNU.sparse.offset", b"GNU.sparse.numbytes")
_SPARSE00 = b" sparse 0.0 map"  # where _parse_pax collects them (no real key has a space)


def _parse_pax(body: bytes, name: str) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    pairs: list[bytes] = []
    pos = 0
    while pos < len(body):
        sp = body.find(b" ", pos)
        # the body is <= MAX_META_SIZE, so a longer length than 8 digits is corrupt anyway
        if sp < 0 or not body[pos:sp].isdigit() or sp - pos > 8:
            raise UnsafeArchive("corrupt pax extended header", name)
        length = int(body[pos:sp])
        rec = body[sp + 1:pos + length]
        if length <= sp - pos or pos + length > len(body) or not rec.endswith(b"\n") \
                or b"=" not in rec:
            raise UnsafeArchive("corrupt pax extended header", name)
        key, _, value = rec[:-1].partition(b"=")
        if key in _SPARSE_PAIR_KEYS:
            if (key == _SPARSE_PAIR_KEYS[0]) != (len(pairs) % 2 == 0):
                raise UnsafeArchive("corrupt pax sparse map (offset/numbytes out of order)",
                                    name)
            pairs.append(value)
        else:
            out[key] = value
        pos += length
    if pairs:
        out[_SPARSE00] = b",".join(pairs)
    return out


# Unicode category Cc exactly: C0 controls, DEL and the C1 controls.
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f]")


def check_name(raw: bytes, limits: Limits, what: str = "member") -> str:
    """Validate a member path; return it normalised ('' for the archive root './')."""
    shown = raw.decode("utf-8", "backslashreplace")
    if not raw:
        raise UnsafeArchive(f"empty {what} name", shown)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UnsafeArchive(f"{what} name is not valid UTF-8", shown) from None
    if _CONTROL_RE.search(text):
        raise UnsafeArchive(f"{what} name contains a control character", shown)
    if text.startswith("/"):
        raise UnsafeArchive(f"absolute {what} path", shown)
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchive(f"{what} path contains '..'", shown)
    if len(raw) > limits.max_path_len:
        raise LimitExceeded(f"{what} path longer than {limits.max_path_len} bytes", shown)
    if len(parts) > limits.max_depth:
        raise LimitExceeded(f"{what} path deeper than {limits.max_depth} components", shown)
    for p in parts:
        if len(p.encode()) > limits.max_name_len:
            raise LimitExceeded(f"{what} name component longer than {limits.max_name_len} "
                                "bytes", shown)
    return "/".join(parts)


# ------------------------------------------------------------------------------ reader
class TarReader:
    """``members()`` yields each member; ``body(m)`` streams a regular file's bytes."""

    def __init__(self, f: BinaryIO, limits: Limits, progress: object = None) -> None:
        self.raw = HashingReader(f, progress)  # type: ignore[arg-type]
        self.limits = limits
        self.src = _Prefetch(open_source(self.raw, limits))
        self.dec = _Decoded(self.src)
        self._unread = 0       # body bytes of the current member not yet consumed (as stored)
        self._pad = 0          # its padding to the next block
        self._sparse: list[tuple[int, int]] | None = None  # its data regions, if sparse
        self._real = 0         # a sparse member's full size (holes included)
        self._current = ""
        self.entries = 0
        self.total_size = 0

    @property
    def compression(self) -> str:
        return self.src.name

    def _read(self, n: int) -> bytes:
        try:
            return self.dec.read(n)
        except Truncated:
            if self._current:
                raise UnsafeArchive("archive is truncated inside member", self._current) from None
            raise UnsafeArchive("archive is truncated (no end-of-archive marker)") from None

    def _meta_body(self, size: int, what: str, name: str) -> bytes:
        if size > MAX_META_SIZE:
            raise LimitExceeded(f"{what} of {size} bytes is larger than {MAX_META_SIZE}", name)
        data = self._read(size)
        self._read(-size % BLOCK)
        return data

    # --- bodies -------------------------------------------------------------------------
    def body(self, m: Member, piece: int) -> Iterator[bytes | memoryview]:
        """The member's bytes in pieces of ``piece`` bytes (the last may be shorter); large
        pieces may be memoryviews (``_Decoded.read_view``): bytes-like, not ``bytes``. A
        sparse member comes out expanded: its holes as zeros, ``m.size`` bytes in all."""
        if self._sparse is not None:
            yield from self._sparse_body(piece)
            return
        while self._unread > 0:
            k = min(piece, self._unread)
            try:
                data = self.dec.read_view(k)
            except Truncated:
                raise UnsafeArchive("archive is truncated inside member",
                                    self._current) from None
            self._unread -= k
            yield data

    def _sparse_body(self, piece: int) -> Iterator[bytes | memoryview]:
        """Regions and holes re-cut into exact ``piece``-sized pieces (ingest's chunks)."""
        assert self._sparse is not None
        runs: list[tuple[bool, int]] = []  # (is data, length) in file order
        pos = 0
        for off, n in self._sparse:
            if off > pos:
                runs.append((False, off - pos))
            if n:
                runs.append((True, n))
            pos = off + n
        if self._real > pos:
            runs.append((False, self._real - pos))
        self._sparse = None  # consumed: a second call yields nothing, as for other bodies
        zeros = bytes(piece)  # one shared piece of zeros: whole-hole pieces are not copied
        buf = bytearray()
        for is_data, n in runs:
            while n > 0:
                k = min(n, piece - len(buf))
                if not is_data and not buf and k == piece:
                    yield zeros
                elif is_data:
                    buf += self._read(k)
                    self._unread -= k
                else:
                    buf += memoryview(zeros)[:k]
                n -= k
                if len(buf) == piece:
                    yield bytes(buf)
                    buf = bytearray()
        if buf:
            yield bytes(buf)

    # --- headers ------------------------------------------------------------------------
    def members(self) -> Iterator[Member]:
        pax: dict[bytes, bytes] = {}
        longname: bytes | None = None
        longlink: bytes | None = None
        while True:
            if self._unread or self._pad:
                try:
                    self.dec.skip(self._unread + self._pad)
                except Truncated:
                    raise UnsafeArchive("archive is truncated inside member",
                                        self._current) from None
                self._unread = self._pad = 0
            self._sparse = None
            self._current = ""
            block = self._read(BLOCK)
            if block == _ZERO_BLOCK:
                if pax or longname is not None or longlink is not None:
                    raise UnsafeArchive("extended header without a member before the end of "
                                        "archive")
                self._end_of_archive()
                return
            _check_block(block)
            magic = block[257:263]
            if magic not in (b"ustar\x00", b"ustar "):
                raise UnsafeArchive("unsupported tar format (no ustar/pax/GNU magic)")
            name_raw = block[:100].split(b"\0", 1)[0]
            if magic == b"ustar\x00" and block[345] != 0:  # POSIX prefix field
                name_raw = block[345:500].split(b"\0", 1)[0] + b"/" + name_raw
            shown = name_raw.decode("utf-8", "backslashreplace")
            tflag = block[156:157]
            size = _num(block[124:136], "size", shown)
            if size < 0:
                raise UnsafeArchive("negative member size", shown)
            if tflag in (b"x", b"g"):
                body = self._meta_body(size, "pax extended header", shown)
                if tflag == b"x":
                    pax.update(_parse_pax(body, shown))
                else:
                    _parse_pax(body, shown)  # validated, ignored: nothing in it applies to us
                continue
            if tflag in (b"L", b"K"):
                # Read (bounded by MAX_META_SIZE) even when over-long, so that the error
                # names the member rather than '././@LongLink'; check_name applies the limit.
                body = self._meta_body(size, "GNU long name", shown).split(b"\0", 1)[0]
                if tflag == b"L":
                    longname = body
                else:
                    longlink = body
                continue
            yield self._member(block, tflag, name_raw, size, pax, longname, longlink)
            pax, longname, longlink = {}, None, None

    def _end_of_archive(self) -> None:
        try:
            second = self.dec.read(BLOCK)
        except Truncated:
            second = b""
        if second != _ZERO_BLOCK:
            raise UnsafeArchive("corrupt end of archive (a single zero block, not the "
                                "two-block end marker)")
        if not self.dec.drain_zeros(MAX_END_PADDING):
            raise UnsafeArchive("trailing data or a second archive after the "
                                "end-of-archive marker")

    def _member(self, block: bytes, tflag: bytes, name_raw: bytes, size: int,
                pax: dict[bytes, bytes], longname: bytes | None, longlink: bytes | None
                ) -> Member:
        """A real member: pax/GNU overrides applied, every field checked, body state set."""
        sparse = tflag == b"S" or any(k.startswith(b"GNU.sparse.") or k == _SPARSE00
                                      for k in pax)
        if sparse and pax.get(b"GNU.sparse.name"):
            name_raw = pax[b"GNU.sparse.name"]  # the real name (the header's is a dummy)
        elif pax.get(b"path"):
            name_raw = pax[b"path"]
        elif longname is not None:
            name_raw = longname
        link_raw = block[157:257].split(b"\0", 1)[0]
        if pax.get(b"linkpath"):
            link_raw = pax[b"linkpath"]
        elif longlink is not None:
            link_raw = longlink
        shown = name_raw.decode("utf-8", "backslashreplace")
        kind = REG if tflag == b"S" else _TYPES.get(tflag)
        if kind is None:
            raise UnsafeArchive(f"unknown member type {tflag.decode('latin-1')!r}", shown)
        if tflag == b"\0" and name_raw.endswith(b"/"):
            kind = DIR  # old tars mark directories by a trailing slash only
        if sparse and kind != REG:
            raise UnsafeArchive(f"sparse map on a {kind}", shown)
        path = check_name(name_raw, self.limits)
        _check_whiteout(path, shown)
        self._current = path or "."
        if pax.get(b"size"):
            size = _pax_uint(pax[b"size"], "size", shown)
        uid = _pax_uint(pax[b"uid"], "uid", shown) if pax.get(b"uid") else \
            _num(block[108:116], "uid", shown)
        gid = _pax_uint(pax[b"gid"], "gid", shown) if pax.get(b"gid") else \
            _num(block[116:124], "gid", shown)
        _check_id(uid, "uid", shown)
        _check_id(gid, "gid", shown)
        if pax.get(b"mtime"):
            mtime_ns = _parse_mtime(pax[b"mtime"], shown)
        else:
            mtime_ns = _num(block[136:148], "mtime", shown) * 1_000_000_000
        mtime = clamp_mtime_ns(mtime_ns)
        mode = _num(block[100:108], "mode", shown) & 0o7777

        self.entries += 1
        if self.entries > self.limits.max_entries:
            raise LimitExceeded(f"more than {self.limits.max_entries} entries", shown)
        link: bytes | None = None
        if kind == REG:
            real = self._sparse_size(block, tflag, pax, shown) if sparse else size
            if real > self.limits.max_file_size:
                raise LimitExceeded(f"file larger than {self.limits.max_file_size} bytes",
                                    shown)
            self.total_size += real
            if self.total_size > self.limits.max_total_size:
                raise LimitExceeded(f"archive holds more than {self.limits.max_total_size} "
                                    "bytes of files", shown)
            if size > self.limits.max_file_size:  # stored bytes (a sparse map + its data)
                raise LimitExceeded(f"file larger than {self.limits.max_file_size} bytes",
                                    shown)
            self._unread, self._pad = size, -size % BLOCK
            if sparse:
                self._sparse = self._sparse_map(block, tflag, pax, real, shown)
                self._real = real
            size = real
        else:
            size = 0  # other types carry no data (as GNU tar and tarfile read them)
        if kind == SYMLINK:
            if not link_raw:
                raise UnsafeArchive("symlink with an empty target", shown)
            if len(link_raw) > self.limits.max_path_len:
                raise LimitExceeded(f"symlink target longer than {self.limits.max_path_len}"
                                    " bytes", shown)
            link = link_raw
        elif kind == HARDLINK:
            link = check_name(link_raw, self.limits, "hardlink target").encode()
        return Member(path, kind, mode, uid, gid, size, mtime, link, mtime != mtime_ns)

    # --- sparse members -----------------------------------------------------------------
    @staticmethod
    def _sparse_size(block: bytes, tflag: bytes, pax: dict[bytes, bytes], shown: str) -> int:
        """A sparse member's full size, holes included."""
        if tflag == b"S":
            real = _num(block[483:495], "sparse real size", shown)
        elif pax.get(b"GNU.sparse.major") is not None:
            if (pax.get(b"GNU.sparse.major"), pax.get(b"GNU.sparse.minor")) != (b"1", b"0"):
                raise UnsafeArchive("unsupported GNU sparse format "
                                    f"{pax[b'GNU.sparse.major'].decode('latin-1')}."
                                    f"{pax.get(b'GNU.sparse.minor', b'?').decode('latin-1')}",
                                    shown)
            real = _pax_uint(pax.get(b"GNU.sparse.realsize", b""), "sparse real size", shown)
        else:
            real = _pax_uint(pax.get(b"GNU.sparse.size", b""), "sparse size", shown)
        if real < 0:
            raise UnsafeArchive("negative sparse real size", shown)
        return real

    def _sparse_map(self, block: bytes, tflag: bytes, pax: dict[bytes, bytes], real: int,
                    shown: str) -> list[tuple[int, int]]:
        """The (offset, length) data regions of a sparse member, checked against its size
        and its stored bytes. Formats: old GNU (``S``: four regions in the header, more in
        extension blocks), pax 0.0 (repeated offset/numbytes keys), 0.1 (``GNU.sparse.map``)
        and 1.0 (the map at the start of the data, in decimal lines)."""
        if tflag == b"S":
            regions = self._old_gnu_map(block, shown)
        elif pax.get(b"GNU.sparse.major") is not None:
            regions = self._pax1_map(shown)
        else:
            text = pax.get(b"GNU.sparse.map", pax.get(_SPARSE00))
            if text is None:
                raise UnsafeArchive("GNU sparse member without a sparse map", shown)
            nums = [_pax_uint(v, "sparse map", shown) for v in text.split(b",")]
            if len(nums) % 2:
                raise UnsafeArchive("corrupt sparse map (an odd count of numbers)", shown)
            regions = list(zip(nums[::2], nums[1::2], strict=True))
        pos = data = 0
        for off, n in regions:
            if off < pos or off + n > real:
                raise UnsafeArchive("corrupt sparse map (regions overlap, go backwards or "
                                    "end past the file's size)", shown)
            pos = off + n
            data += n
        if data != self._unread:
            raise UnsafeArchive(f"corrupt sparse map ({data} bytes of data mapped, the member "
                                f"stores {self._unread})", shown)
        return regions

    def _old_gnu_map(self, block: bytes, shown: str) -> list[tuple[int, int]]:
        regions: list[tuple[int, int]] = []

        def entries(b: bytes, at: int, count: int) -> None:
            for i in range(count):
                e = b[at + 24 * i:at + 24 * i + 24]
                if e[12] == 0:  # an empty numbytes field ends the map (as GNU tar reads it)
                    return
                regions.append((_num(e[:12], "sparse offset", shown),
                                _num(e[12:], "sparse length", shown)))

        entries(block, 386, 4)
        extended, read = block[482], 0
        while extended:
            read += BLOCK
            if read > MAX_META_SIZE:
                raise LimitExceeded(f"sparse map larger than {MAX_META_SIZE} bytes", shown)
            ext = self._read(BLOCK)
            entries(ext, 0, 21)
            extended = ext[504]
        return regions

    def _pax1_map(self, shown: str) -> list[tuple[int, int]]:
        """Format 1.0: decimal lines (count, then offset/length pairs) padded to a block,
        taken from the member's stored bytes."""
        nums: list[int] = []
        need: int | None = None
        rest = b""
        used = 0
        while need is None or len(nums) < need:
            if used + BLOCK > self._unread:
                raise UnsafeArchive("corrupt sparse map (runs past the member's data)", shown)
            if used >= MAX_META_SIZE:
                raise LimitExceeded(f"sparse map larger than {MAX_META_SIZE} bytes", shown)
            lines = (rest + self._read(BLOCK)).split(b"\n")
            used += BLOCK
            rest = lines.pop()
            for ln in lines:
                if need is not None and len(nums) >= need:
                    break
                nums.append(_pax_uint(ln, "sparse map", shown))
                if need is None:
                    need = 1 + 2 * min(nums[0], MAX_META_SIZE)
            if (need is None or len(nums) < need) and len(rest) > _MAX_DIGITS:
                raise UnsafeArchive("corrupt sparse map", shown)  # a number without end
        self._unread -= used
        return list(zip(nums[1::2], nums[2::2], strict=True))

    def checksum(self) -> str:
        """sha256 of the raw bytes; complete once ``members()`` has returned."""
        return self.raw.checksum()

    def close(self) -> None:
        self.src.close()


def _check_whiteout(path: str, shown: str) -> None:
    """OCI image layers delete files of lower layers with ``.wh.NAME`` entries (and empty a
    directory with ``.wh..wh..opq``). A runtime is one flat tree with nothing below it to
    delete from; installed as a plain file the marker would only mislead, so it is refused."""
    leaf = path.rsplit("/", 1)[-1]
    if leaf == ".wh..wh..opq":
        raise UnsafeArchive("OCI opaque-directory whiteout marker (a flat runtime has no "
                            "layers to hide; export the image flattened, e.g. docker export)",
                            shown)
    if leaf.startswith(".wh."):
        raise UnsafeArchive("OCI whiteout marker (a flat runtime has no layers to delete "
                            "from; export the image flattened, e.g. docker export)", shown)
