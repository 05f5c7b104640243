"""SHA-256 digests as jbl spells them: raw 32 bytes in the index, ``sha256:<hex>`` for users.

``parse_checksum`` is the one parser for the registry/CLI spelling; ``HashingReader`` hashes
and counts the raw bytes of a stream as it is read (the tarball checksum is over the bytes
as downloaded, before decompression). Pure; a HashingReader belongs to one thread.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from .errors import UsageError

PREFIX = "sha256:"
_HEX_RE = re.compile(r"[0-9a-f]{64}")  # always fullmatch
EMPTY = hashlib.sha256(b"").digest()


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def format_checksum(digest: bytes) -> str:
    return PREFIX + digest.hex()


def parse_checksum(text: str) -> str:
    """Normalise ``sha256:<hex>`` (or a bare 64-digit hex) to ``sha256:<lowercase hex>``."""
    t = text.strip()
    body = t[len(PREFIX):] if t.lower().startswith(PREFIX) else t
    body = body.lower()
    if not _HEX_RE.fullmatch(body):
        raise UsageError(f"invalid checksum {text!r}: expected sha256:<64 hex digits>")
    return PREFIX + body


def file_checksum(path: Path, bufsize: int = 1 << 20) -> tuple[str, int]:
    """(``sha256:<hex>``, size) of a file."""
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while buf := f.read(bufsize):
            h.update(buf)
            n += len(buf)
    return format_checksum(h.digest()), n


class HashingReader:
    """Wraps a binary stream: every byte read is hashed and counted (and reported)."""

    def __init__(self, f: BinaryIO, progress: Callable[[int], None] | None = None) -> None:
        self._f = f
        self._h = hashlib.sha256()
        self._progress = progress
        self.count = 0

    def read(self, n: int) -> bytes:
        data = self._f.read(n)
        if data:
            self._h.update(data)
            self.count += len(data)
            if self._progress is not None:
                self._progress(len(data))
        return data

    def checksum(self) -> str:
        return format_checksum(self._h.digest())
