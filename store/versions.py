"""Semantic versions and ``NAME[@VERSION]`` specs: parsing, ordering, selection.

* ``1.10.0 > 1.9.0`` (packaging's Version, which also orders pre-releases below releases).
* ``NAME`` or ``NAME@latest`` -> the highest *release* (pre-releases only when named).
* ``NAME@1.3`` -> the highest release ``1.3.x``; ``NAME@1`` -> highest ``1.x.y``.
* ``NAME@1.4.0-beta`` -> exactly that version (semver pre-release spelling accepted).
Versions that are not semver-like still work when named exactly and sort below all others.
Names and versions are checked in full (``manifest.check_name``: no trailing newline).
Pure and thread-safe.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from packaging.version import InvalidVersion, Version

from .errors import NotFound, UsageError
from .manifest import check_name

_SEMVER_PRE = re.compile(r"(\d+(?:\.\d+)*)-([0-9A-Za-z.-]+)")  # always fullmatch


@dataclass(frozen=True)
class Spec:
    name: str
    version: str | None  # None = latest

    def __str__(self) -> str:
        return f"{self.name}@{self.version}" if self.version else self.name


def parse_spec(text: str) -> Spec:
    """``'python@1.3'`` -> Spec('python', '1.3'); ``@latest`` and no ``@`` -> version None."""
    name, sep, ver = text.partition("@")
    check_name(name)
    if sep and not ver:
        raise UsageError(f"invalid runtime spec {text!r}: nothing after '@' "
                         "(use NAME, NAME@latest or NAME@VERSION)")
    if ver in ("", "latest"):
        return Spec(name, None)
    check_name(ver, "version")
    return Spec(name, ver)


def parse_version(text: str) -> Version | None:
    """packaging Version for semver-ish text (``1.4.0-beta`` -> 1.4.0b0), None if not one."""
    t = text.strip()
    m = _SEMVER_PRE.fullmatch(t)
    try:
        return Version(f"{m.group(1)}-{m.group(2)}" if m else t)
    except InvalidVersion:
        return None


def sort_key(text: str) -> tuple[int, Version | str]:
    v = parse_version(text)
    return (1, v) if v is not None else (0, text)


def sort_versions(versions: Iterable[str]) -> list[str]:
    """Ascending: non-semver first (by text), then semver order."""
    return sorted(versions, key=lambda t: (sort_key(t)[0], sort_key(t)[1] if sort_key(t)[0] else 0,
                                           t if not sort_key(t)[0] else ""))


def is_prerelease(text: str) -> bool:
    v = parse_version(text)
    return v is not None and (v.is_prerelease or v.is_devrelease)


def latest(versions: Iterable[str]) -> str | None:
    """The highest release; None if there is none (pre-releases are never 'latest')."""
    releases = [(v, t) for t in versions if (v := parse_version(t)) and not (
        v.is_prerelease or v.is_devrelease)]
    return max(releases)[1] if releases else None


def select(spec: Spec, available: Iterable[str], *, where: str = "") -> str:
    """Pick the version ``spec`` asks for among ``available``; NotFound says what exists."""
    avail = list(available)
    where_txt = f" {where}" if where else ""
    if spec.version is None:
        best = latest(avail)
        if best is None:
            if avail:
                raise NotFound(f"{spec.name} has no release{where_txt}, only pre-releases: "
                               f"{', '.join(sort_versions(avail))} (name one with NAME@VERSION)")
            raise NotFound(f"no runtime named {spec.name!r}{where_txt}")
        return best
    if spec.version in avail:
        return spec.version
    want = parse_version(spec.version)
    if want is not None:
        for t in avail:  # 1.4.0-beta vs 1.4.0b0 spelled differently
            if parse_version(t) == want and not _is_partial_match_only(spec.version):
                return t
        parts = spec.version.split(".")
        if len(parts) < 3 and all(p.isdigit() for p in parts):
            prefix = tuple(int(p) for p in parts)
            matches = [t for t in avail if (v := parse_version(t)) and not (
                v.is_prerelease or v.is_devrelease) and v.release[:len(prefix)] == prefix]
            if matches:
                best = latest(matches)
                assert best is not None
                return best
    if not avail:
        raise NotFound(f"no runtime named {spec.name!r}{where_txt}")
    raise NotFound(f"{spec.name}@{spec.version} not found{where_txt}; available: "
                   f"{', '.join(sort_versions(avail))}")


def _is_partial_match_only(text: str) -> bool:
    parts = text.split(".")
    return len(parts) < 3 and all(p.isdigit() for p in parts)
