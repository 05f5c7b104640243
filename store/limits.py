"""Limits on what an untrusted tarball may ask of the store, checked before its data is trusted.

The defaults are generous for real runtimes (a 5 GB ML image with 300k files passes); tests
and cautious admins pass smaller ones. Every limit is checked from a header, before the bytes
it describes are read, except the compression ratio, which is checked as bytes are decoded.
Pure data, thread-safe.
"""

from __future__ import annotations

from dataclasses import dataclass

# Below this many decoded bytes the ratio is not checked: a tiny tarball of empty files or
# a few zero-filled blocks legitimately compresses far beyond any sane ratio.
RATIO_FLOOR = 8 << 20
# A pax extended header or GNU long name is metadata: a few KiB at most in practice.
MAX_META_SIZE = 1 << 20
# Zero padding tolerated after the end-of-archive marker (tar pads to its record size,
# 10 KiB by default; 1 MiB covers any blocking factor tar accepts).
MAX_END_PADDING = 1 << 20

# What a member's numbers may be (docs/store-format.md, "Numbers"). A uid/gid is a Linux
# uid_t minus (uid_t)-1, which means "no change" to chown and is no one's id; anything larger
# is refused (the kernel cannot carry it: the file and its directory would give EIO).
ID_MAX = 2**32 - 2
# mtimes are clamped, not refused (a file's age is not a safety property, and tarballs made
# on machines with broken clocks exist): to 1970-01-01 .. 2242-03-16, which is exactly what a
# ustar mtime field (11 octal digits) can hold, and fits the index's signed 64-bit
# nanoseconds, Python's datetime, the FUSE attribute encoding and every Linux filesystem.
MTIME_MAX_NS = (2**33 - 1) * 1_000_000_000


def clamp_mtime_ns(ns: int) -> int:
    """``ns`` moved into ``0 .. MTIME_MAX_NS`` (unchanged when inside: mtimes are never
    normalised, stale-bytecode checks depend on them)."""
    return min(max(ns, 0), MTIME_MAX_NS)


@dataclass(frozen=True)
class Limits:
    max_total_size: int = 32 << 30        # sum of regular file sizes
    max_file_size: int = 16 << 30
    max_entries: int = 2_000_000
    max_depth: int = 128                  # path components
    max_name_len: int = 255               # one component, bytes
    max_path_len: int = 4096
    max_window_log: int = 27              # zstd window of a .tar.zst input (128 MiB)
    max_compression_ratio: int = 1000     # decompressed/compressed, beyond a few MiB: bomb
