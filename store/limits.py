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
