"""Retention policies: which installed versions ``jbl store gc`` removes, and why.

A policy is a few optional limits (``keep_latest``, ``unused_for``, ``max_size``) plus the
orphan ``grace`` period. They come from the command line or from the config file's ``gc:``
section (``config.load_config().gc``); a command-line option replaces the same config key.

Selection rules (``select``), in this order:

* Never selected: pinned versions and versions held by a live lease (a running job, a mount
  access, an install). These are absolute.
* ``keep_latest`` and ``unused_for`` are *keep* rules (restic's ``forget`` semantics): the N
  highest versions of each runtime name are kept; versions used (or, never used, installed)
  within ``unused_for`` are kept. A version no given keep rule keeps is selected. With neither
  rule given, nothing is selected by them.
* ``max_size`` then removes more, least recently used first (``last_used_at``, else
  ``installed_at``), only while the store's physical size (blob bytes + index file) would still
  be above the limit once everything already selected is gone. It may take a version the keep
  rules kept — the disk limit is the harder promise; pins are how an admin says "never".

Pure apart from reading the index; the same thread rule as ``Store``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from . import versions as versions_mod
from .errors import UsageError
from .store import Store, VersionInfo
from .units import format_duration, format_size, parse_duration, parse_size

DEFAULT_GRACE = 3600.0  # orphan blobs/temp files younger than this may belong to an install


@dataclass(frozen=True)
class Policy:
    keep_latest: int | None = None
    unused_for: float | None = None  # seconds
    max_size: int | None = None  # bytes
    grace: float = DEFAULT_GRACE  # seconds

    @property
    def selects(self) -> bool:
        """True when any version-removal rule is set (else gc only sweeps)."""
        return (self.keep_latest is not None or self.unused_for is not None
                or self.max_size is not None)

    def describe(self) -> str:
        parts = []
        if self.keep_latest is not None:
            parts.append(f"keep-latest {self.keep_latest}")
        if self.unused_for is not None:
            parts.append(f"unused-for {format_duration(self.unused_for)}")
        if self.max_size is not None:
            parts.append(f"max-size {format_size(self.max_size)}")
        return ", ".join(parts) or "sweep only"


def _keep_latest(value: Any, where: str) -> int:
    try:
        n = int(str(value))
    except ValueError:
        raise UsageError(f"invalid {where} {value!r}: expected a whole number >= 1") from None
    if n < 1:
        raise UsageError(f"invalid {where} {value!r}: expected a whole number >= 1 "
                         "(use `jbl store rm` to remove every version)")
    return n


def parse_policy(*, keep_latest: Any = None, unused_for: Any = None, max_size: Any = None,
                 grace: Any = None, where: str = "") -> Policy:
    """Build a Policy from text values (CLI strings or YAML scalars); None = not given.

    ``where`` prefixes error messages: "" names the CLI options (``--keep-latest``), a
    config origin like ``"/etc/jbl/config.yaml: gc."`` names the config keys.
    """
    def name(key: str) -> str:
        return f"{where}{key}" if where else "--" + key.replace("_", "-")

    return Policy(
        keep_latest=None if keep_latest is None else _keep_latest(keep_latest,
                                                                  name("keep_latest")),
        unused_for=None if unused_for is None else parse_duration(str(unused_for),
                                                                  what=name("unused_for")),
        max_size=None if max_size is None else parse_size(str(max_size), what=name("max_size")),
        grace=DEFAULT_GRACE if grace is None else parse_duration(str(grace), what=name("grace")),
    )


_CONFIG_KEYS = {"keep_latest", "unused_for", "max_size", "grace"}


def policy_from_config(gc: Mapping[str, Any], origin: str = "config") -> Policy:
    unknown = sorted(set(gc) - _CONFIG_KEYS)
    if unknown:
        raise UsageError(f"{origin}: unknown gc key {unknown[0]!r} "
                         f"(known: {', '.join(sorted(_CONFIG_KEYS))})")
    return parse_policy(where=f"{origin}: gc.", **{k: gc.get(k) for k in _CONFIG_KEYS})


def merge(config: Policy, cli: Policy, given: Iterable[str]) -> Policy:
    """``config`` with the fields named in ``given`` taken from ``cli``."""
    return replace(config, **{k: getattr(cli, k) for k in given})


def physical_size(store: Store) -> tuple[int, int]:
    """(blob bytes per the index, index file bytes incl. WAL) — `df`'s physical size."""
    blob_bytes = int(store.db.scalar("SELECT COALESCE(SUM(stored_size), 0) FROM blobs"))
    index = 0
    for suffix in ("", "-wal"):
        with contextlib.suppress(FileNotFoundError):
            index += os.stat(f"{store.db.path}{suffix}").st_size
    return blob_bytes, index


def last_use(v: VersionInfo) -> float:
    return v.last_used_at if v.last_used_at is not None else v.installed_at


@dataclass(frozen=True)
class Selected:
    info: VersionInfo
    reason: str


def select(store: Store, policy: Policy, *, now: float,
           leased: set[int]) -> list[Selected]:
    """The versions ``policy`` removes (see the module docstring), oldest use first."""
    if not policy.selects:
        return []
    installed = store.versions()
    protected = {v.id for v in installed if v.pinned or v.id in leased}
    chosen: dict[int, Selected] = {}
    if policy.keep_latest is not None or policy.unused_for is not None:
        kept: set[int] = set()
        if policy.keep_latest is not None:
            by_name: dict[str, list[VersionInfo]] = {}
            for v in installed:
                by_name.setdefault(v.name, []).append(v)
            for group in by_name.values():
                order = versions_mod.sort_versions(v.version for v in group)
                newest = set(order[-policy.keep_latest:])
                kept |= {v.id for v in group if v.version in newest}
        if policy.unused_for is not None:
            cutoff = now - policy.unused_for
            kept |= {v.id for v in installed if last_use(v) >= cutoff}
        why = []
        if policy.keep_latest is not None:
            why.append(f"older than the {policy.keep_latest} latest")
        if policy.unused_for is not None:
            why.append(f"unused for {format_duration(policy.unused_for)}")
        for v in installed:
            if v.id not in kept and v.id not in protected:
                chosen[v.id] = Selected(v, " and ".join(why))
    if policy.max_size is not None:
        chosen.update({s.info.id: s for s in _over_size(store, policy.max_size, installed,
                                                          protected, set(chosen))})
    return sorted(chosen.values(), key=lambda s: (last_use(s.info), s.info.spec))


def _over_size(store: Store, max_size: int, installed: list[VersionInfo], protected: set[int],
               already: set[int]) -> list[Selected]:
    """LRU versions to drop, beyond ``already``, until the store would fit in ``max_size``.

    Works on the (version, blob) reference pairs in memory: a blob is freed when the last
    version referencing it goes. Versions in state 'removed' still reference their blobs
    (they are leased, or gc drops them anyway before sweeping - counted as going).
    """
    blob_bytes, index_bytes = physical_size(store)
    if blob_bytes + index_bytes <= max_size:
        return []
    sizes: dict[int, int] = dict(store.db.iter("SELECT id, stored_size FROM blobs"))
    refs: dict[int, int] = {}
    per_version: dict[int, list[int]] = {}
    for vid, bid in store.db.iter(
            "SELECT DISTINCT e.version_id, c.blob_id FROM entries e "
            "JOIN chunks c ON c.content_id = e.content_id"):
        refs[bid] = refs.get(bid, 0) + 1
        per_version.setdefault(vid, []).append(bid)
    # Removed-state versions without a live lease are dropped by this gc's sweep anyway.
    going = set(already) | {vid for (vid,) in store.db.iter(
        "SELECT id FROM versions WHERE state='removed'") if vid not in protected}
    # Unreferenced blobs (garbage) are swept whatever we select: they do not count.
    size = index_bytes + sum(sizes.get(bid, 0) for bid in refs)
    for vid in going:
        for bid in per_version.get(vid, ()):
            refs[bid] -= 1
            if refs[bid] == 0:
                size -= sizes.get(bid, 0)
    out: list[Selected] = []
    lru = sorted((v for v in installed if v.id not in protected and v.id not in going),
                 key=lambda v: (last_use(v), v.spec))
    for v in lru:
        if size <= max_size:
            break
        for bid in per_version.get(v.id, ()):
            refs[bid] -= 1
            if refs[bid] == 0:
                size -= sizes.get(bid, 0)
        out.append(Selected(v, f"least recently used while over max-size {format_size(max_size)}"))
    return out
