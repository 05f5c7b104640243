"""Registries: the ``registry.json`` model, fetching it (http(s) via httpx, ``file://``, plain
paths), its cache, choosing a version for this host, and downloading a verified tarball.

A registry location is a ``registry.json`` (URL or path) or a directory/URL holding one. It is
normalised to an absolute URL (``file:///…`` for paths); ``download_url`` values are resolved
against it, so a registry dir can be moved or served over http as it is. Several registries
(``--registry`` repeated, or config ``registries:``) are tried in order and the FIRST one that
offers a runtime name serves every version of that name: versions of one name are never mixed
from two publishers.

Cache: a fetched http(s) index is kept as ``<sha256(url)>.json`` under ``STORE/cache/registries``
(or ``$XDG_CACHE_HOME/jbl/registries`` when the store is not writable) and reused for ``TTL``
without touching the network. ``refresh=True`` always refetches. When a refetch fails and a
stale copy exists, the stale copy is used with a warning (an offline server keeps working);
under ``refresh`` it is an error instead. Local registries are read directly, never cached.

Downloads stream to a temp file in ``STORE/tmp/``, checking ``size`` and sha256 as bytes
arrive; nothing reaches ingest unless both match (ingest checks the digest again).

Errors: network/HTTP failures and malformed registries are RegistryError (exit 7), one line
naming the URL and what is wrong. Thread-safety: a RegistryClient holds one httpx.Client and a
dict of loaded registries; use it from one thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

import httpx

from .config import RegistrySource
from .errors import ChecksumMismatch, IntegrityError, NotFound, RegistryError, UsageError
from .manifest import check_name
from .store import Store, VersionInfo
from .versions import Spec, select, sort_versions
from .versions import latest as latest_version

INDEX_NAME = "registry.json"
TTL = 3600.0  # seconds a fetched index is trusted without asking the server (as Joblet)
MAX_INDEX_BYTES = 32 << 20
TIMEOUT_ENV = "JBL_HTTP_TIMEOUT"  # seconds/duration without data before giving up (default 30s)
USER_AGENT = "jbl/0.1"
_CHECKSUM_RE = re.compile(r"^sha256:([0-9a-fA-F]{64})$")
# CPU architecture names as they appear in platform strings ("ubuntu-amd64", "linux/arm64",
# "x86_64"); a runtime brings its own userland, so only the architecture matters.
_ARCH_ALIASES = {
    "amd64": "amd64", "x86_64": "amd64", "x86-64": "amd64", "x64": "amd64",
    "arm64": "arm64", "aarch64": "arm64",
    "armhf": "arm", "armv7": "arm", "armv7l": "arm", "armel": "arm",
    "i386": "386", "i486": "386", "i586": "386", "i686": "386",
    "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64",
}
_ARCH_RE = re.compile(r"(?<![a-z0-9])(" + "|".join(sorted(map(re.escape, _ARCH_ALIASES),
                                                          key=len, reverse=True))
                      + r")(?![a-z0-9])")

Progress = Callable[[int], None]
Warn = Callable[[str], None]


# --- architectures -------------------------------------------------------------------------
def normalize_arch(text: str) -> str | None:
    """The architecture a platform string names (``ubuntu-amd64`` -> ``amd64``), or None."""
    m = _ARCH_RE.search(text.lower())
    return _ARCH_ALIASES[m.group(1)] if m else None


def host_arch() -> str:
    machine = platform.machine()
    return normalize_arch(machine) or machine.lower()


# --- the model -----------------------------------------------------------------------------
@dataclass(frozen=True)
class RegistryEntry:
    name: str
    version: str
    description: str
    download_url: str  # absolute (resolved against the registry's URL)
    checksum: str  # "sha256:<64 lowercase hex>"
    size: int | None
    platforms: tuple[str, ...]
    registry: str  # the registry.json URL it came from

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def architectures(self) -> frozenset[str]:
        """Architectures offered; empty = no architecture named (runs anywhere)."""
        return frozenset(a for p in self.platforms if (a := normalize_arch(p)))

    def runs_on(self, arch: str) -> bool:
        archs = self.architectures
        return not archs or arch in archs


@dataclass(frozen=True)
class Registry:
    url: str
    label: str
    updated_at: str
    runtimes: dict[str, dict[str, RegistryEntry]] = field(default_factory=dict)


def location_url(text: str, *, base_dir: Path | None = None) -> str:
    """``--registry`` text -> the absolute URL of a registry.json."""
    text = text.strip()
    if not text:
        raise UsageError("empty registry location")
    scheme = urlsplit(text).scheme.lower() if "://" in text else ""
    if scheme in ("http", "https"):
        if text.endswith(".json"):
            return text
        return text.rstrip("/") + "/" + INDEX_NAME
    if scheme == "file":
        path = Path(unquote(urlsplit(text).path))
    elif scheme:
        raise UsageError(f"unsupported registry URL {text!r}: use http(s)://, file:// or a path")
    else:
        path = Path(os.path.expanduser(text))
        if not path.is_absolute():
            path = (base_dir or Path.cwd()) / path
    path = Path(os.path.abspath(path))
    if path.is_dir() or not path.name.endswith(".json"):
        path = path / INDEX_NAME
    return path.as_uri()


def _fail(url: str, where: str, what: str) -> RegistryError:
    return RegistryError(f"registry {url}: {where}: {what}")


def _entry(url: str, name: str, ver: str, doc: Any, allow_file: bool) -> RegistryEntry:
    where = f"runtimes.{name}.{ver}"
    if not isinstance(doc, dict):
        raise _fail(url, where, "must be an object")
    if "version" in doc and str(doc["version"]) != ver:
        raise _fail(url, where, f"'version' says {doc['version']!r}")
    checksum = doc.get("checksum")
    m = _CHECKSUM_RE.match(checksum) if isinstance(checksum, str) else None
    if m is None:
        got = "missing" if checksum is None else f"got {str(checksum)[:80]!r}"
        raise _fail(url, where, f"checksum must be 'sha256:' and 64 hex digits ({got})")
    dl = doc.get("download_url")
    if not isinstance(dl, str) or not dl.strip():
        raise _fail(url, where, "download_url is missing")
    dl_url = urljoin(url, dl.strip())
    scheme = urlsplit(dl_url).scheme.lower()
    if scheme not in ("http", "https", "file") or (scheme == "file" and not allow_file):
        # a remote registry must not make us read local files (even checksum-guarded)
        raise _fail(url, where, f"download_url {dl!r} has an unsupported scheme")
    size = doc.get("size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise _fail(url, where, f"size must be a non-negative integer (got {size!r})")
    plats = doc.get("platforms") or []
    if not isinstance(plats, list) or not all(isinstance(p, str) for p in plats):
        raise _fail(url, where, "platforms must be a list of strings")
    return RegistryEntry(name, ver, str(doc.get("description") or ""), dl_url,
                         "sha256:" + m.group(1).lower(), size, tuple(plats), url)


def parse_registry(data: bytes, url: str, label: str = "") -> Registry:
    """Validate a Joblet-format registry.json strictly; RegistryError names what is wrong."""
    try:
        doc = json.loads(data)
    except UnicodeDecodeError:
        raise RegistryError(f"registry {url} is not UTF-8 JSON") from None
    except json.JSONDecodeError as e:
        raise RegistryError(f"registry {url} is not valid JSON (line {e.lineno} column "
                            f"{e.colno}: {e.msg})") from None
    if not isinstance(doc, dict):
        raise RegistryError(f"registry {url}: top level must be an object")
    fmt = doc.get("version", "1")
    if str(fmt) != "1":
        raise RegistryError(f"registry {url}: unsupported format version {fmt!r} (jbl reads 1)")
    runtimes = doc.get("runtimes")
    if not isinstance(runtimes, dict):
        raise RegistryError(f"registry {url}: no 'runtimes' object")
    allow_file = urlsplit(url).scheme == "file"
    out: dict[str, dict[str, RegistryEntry]] = {}
    for name, vers in runtimes.items():
        try:
            check_name(name)
        except UsageError as e:
            raise _fail(url, "runtimes", e.message) from None
        if not isinstance(vers, dict):
            raise _fail(url, f"runtimes.{name}", "must be an object of versions")
        out[name] = {}
        for ver, entry in vers.items():
            try:
                check_name(ver, "version")
            except UsageError as e:
                raise _fail(url, f"runtimes.{name}", e.message) from None
            out[name][ver] = _entry(url, name, ver, entry, allow_file)
    return Registry(url, label or url, str(doc.get("updated_at") or ""), out)


def offered_summary(reg: Registry) -> list[dict[str, Any]]:
    """Rows for ``available``: name, versions (ascending), latest release, platforms."""
    rows = []
    for name in sorted(reg.runtimes):
        entries = reg.runtimes[name]
        vers = sort_versions(entries)
        plats = sorted({p for e in entries.values() for p in e.platforms})
        rows.append({"name": name, "versions": vers, "latest": latest_version(vers),
                     "platforms": plats, "registry": reg.label})
    return rows


def choose(reg: Registry, spec: Spec, arch: str) -> RegistryEntry:
    """The entry ``spec`` selects among versions this architecture can run."""
    offered = reg.runtimes[spec.name]
    fits = [v for v, e in offered.items() if e.runs_on(arch)]
    try:
        return offered[select(spec, fits, where=f"in {reg.label} for {arch}")]
    except NotFound:
        pass
    chosen = select(spec, offered, where=f"in {reg.label}")  # raises: not offered at all
    e = offered[chosen]
    raise NotFound(f"{e.spec} is offered only for {', '.join(e.platforms)}; this host is "
                   f"{arch} ({platform.machine()})",
                   hint=f"versions for {arch}: {', '.join(sort_versions(fits)) or 'none'}")


# --- fetching and caching ------------------------------------------------------------------
def user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jbl" / "registries"


class RegistryClient:
    """Loads registries (with the cache) and downloads tarballs. Close it (or use ``with``)."""

    def __init__(self, store_dir: Path | None, *, refresh: bool = False, ttl: float = TTL,
                 warn: Warn | None = None) -> None:
        self.refresh = refresh
        self.ttl = ttl
        self.warn: Warn = warn or (lambda _msg: None)
        self.cache_dirs: list[Path] = []
        if store_dir is not None and os.access(store_dir, os.W_OK):
            self.cache_dirs.append(Path(store_dir) / "cache" / "registries")
        self.cache_dirs.append(user_cache_dir())
        self._http: httpx.Client | None = None
        self._loaded: dict[str, Registry] = {}

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    @property
    def http(self) -> httpx.Client:
        if self._http is None:
            from .units import parse_duration

            read = parse_duration(os.environ.get(TIMEOUT_ENV) or "30s", what=TIMEOUT_ENV)
            self._http = httpx.Client(timeout=httpx.Timeout(read, connect=min(read, 10.0)),
                                      follow_redirects=True, headers={"User-Agent": USER_AGENT})
        return self._http

    # cache -----------------------------------------------------------------------------
    @staticmethod
    def _cache_name(url: str) -> str:
        return hashlib.sha256(url.encode()).hexdigest() + ".json"

    def _cached(self, url: str) -> tuple[bytes, float] | None:
        """The freshest cached copy of ``url`` and its age in seconds."""
        best: tuple[bytes, float] | None = None
        for d in self.cache_dirs:
            p = d / self._cache_name(url)
            try:
                age = time.time() - p.stat().st_mtime
                if best is None or age < best[1]:
                    best = (p.read_bytes(), age)
            except OSError:
                continue
        return best

    def _store_cache(self, url: str, data: bytes) -> None:
        for d in self.cache_dirs:
            try:
                d.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.chmod(tmp, 0o644)
                os.replace(tmp, d / self._cache_name(url))  # readers never see half a file
                return
            except OSError:
                continue  # not writable: try the next dir; no cache is not an error

    # loading ---------------------------------------------------------------------------
    def _fetch_http(self, url: str) -> bytes:
        try:
            with self.http.stream("GET", url) as r:
                if r.status_code != 200:
                    raise RegistryError(f"cannot fetch registry {url}: HTTP {r.status_code} "
                                        f"{r.reason_phrase}")
                buf = bytearray()
                for chunk in r.iter_bytes():
                    buf += chunk
                    if len(buf) > MAX_INDEX_BYTES:
                        raise RegistryError(f"registry {url} is larger than "
                                            f"{MAX_INDEX_BYTES >> 20} MiB")
                return bytes(buf)
        except httpx.HTTPError as e:
            raise RegistryError(f"cannot fetch registry {url}: {_http_reason(e)}") from None

    def load(self, source: RegistrySource | str) -> Registry:
        if isinstance(source, str):
            source = RegistrySource(source)
        url = location_url(source.url)  # config already made relative paths absolute
        if url in self._loaded:
            return self._loaded[url]
        label = source.name or url
        if url.startswith("file:"):
            path = Path(unquote(urlsplit(url).path))
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                raise RegistryError(f"no registry at {path} (no {INDEX_NAME} there)") from None
            except OSError as e:
                raise RegistryError(f"cannot read registry {path}: {e.strerror}") from None
            reg = parse_registry(data, url, label)
        else:
            reg = self._load_remote(url, label)
        self._loaded[url] = reg
        return reg

    def _load_remote(self, url: str, label: str) -> Registry:
        cached = None if self.refresh else self._cached(url)
        if cached is not None and cached[1] < self.ttl:
            try:
                return parse_registry(cached[0], url, label)
            except RegistryError:
                pass  # a bad cached copy: fetch anew
        try:
            data = self._fetch_http(url)
        except RegistryError as e:
            if cached is None:
                raise
            self.warn(f"{e}; using the copy cached {int(cached[1] // 60)} min ago")
            return parse_registry(cached[0], url, label)
        reg = parse_registry(data, url, label)  # only a valid index replaces the cache
        self._store_cache(url, data)
        return reg

    def find(self, spec: Spec, sources: Iterable[RegistrySource | str]) -> RegistryEntry:
        """The entry for ``spec`` from the first registry that offers ``spec.name``."""
        labels = []
        for src in sources:
            reg = self.load(src)
            labels.append(reg.label)
            if spec.name in reg.runtimes:
                return choose(reg, spec, host_arch())
        raise NotFound(f"no runtime named {spec.name!r} in {', '.join(labels)}",
                       hint="see what is offered: jbl store available")

    # downloading -----------------------------------------------------------------------
    def fetch_tarball(self, entry: RegistryEntry, tmp_dir: Path,
                      progress: Progress | None = None) -> tuple[Path, bool]:
        """A local, verified copy of ``entry``'s tarball: (path, is_temporary).

        A ``file://`` tarball is verified in place; an http(s) one streams into ``tmp_dir``.
        The caller deletes a temporary file when done.
        """
        tick: Progress = progress or (lambda _n: None)
        if entry.download_url.startswith("file:"):
            path = Path(unquote(urlsplit(entry.download_url).path))
            try:
                with open(path, "rb") as f:
                    h, n = hashlib.sha256(), 0
                    while block := f.read(1 << 20):
                        h.update(block)
                        n += len(block)
                        tick(len(block))
            except OSError as e:
                raise RegistryError(f"cannot read {entry.spec} tarball {path}: "
                                    f"{e.strerror}") from None
            self._check(entry, n, h.hexdigest())
            return path, False
        tmp_dir.mkdir(parents=True, exist_ok=True)
        base = re.sub(r"[^A-Za-z0-9._-]", "_", urlsplit(entry.download_url).path.rsplit("/")[-1])
        fd, tmp = tempfile.mkstemp(dir=tmp_dir, prefix="download-", suffix="-" + base[-80:])
        ok = False
        try:
            with os.fdopen(fd, "wb") as f:
                n, hexdigest = self._stream(entry, f, tick)
            self._check(entry, n, hexdigest)
            ok = True
            return Path(tmp), True
        finally:
            if not ok:
                os.unlink(tmp)

    def _stream(self, entry: RegistryEntry, f: Any, tick: Progress) -> tuple[int, str]:
        url = entry.download_url
        h, n = hashlib.sha256(), 0
        try:
            with self.http.stream("GET", url) as r:
                if r.status_code != 200:
                    raise RegistryError(f"cannot download {entry.spec} from {url}: HTTP "
                                        f"{r.status_code} {r.reason_phrase}")
                for block in r.iter_bytes(1 << 20):
                    n += len(block)
                    if entry.size is not None and n > entry.size:
                        raise IntegrityError(f"{entry.spec} from {url} is larger than the "
                                             f"{entry.size} bytes its registry says")
                    h.update(block)
                    f.write(block)
                    tick(len(block))
        except httpx.HTTPError as e:
            raise RegistryError(f"cannot download {entry.spec} from {url}: "
                                f"{_http_reason(e)}") from None
        return n, h.hexdigest()

    @staticmethod
    def _check(entry: RegistryEntry, n: int, hexdigest: str) -> None:
        actual = "sha256:" + hexdigest
        if actual != entry.checksum:
            sizes = "" if entry.size in (None, n) else f" ({n} bytes, registry says {entry.size})"
            raise ChecksumMismatch(f"{entry.spec} from {entry.download_url}{sizes}",
                                   entry.checksum, actual)
        if entry.size is not None and n != entry.size:
            raise IntegrityError(f"{entry.spec}: {n} bytes, registry says {entry.size}")


def _http_reason(e: httpx.HTTPError) -> str:
    if isinstance(e, httpx.TimeoutException):
        return "timed out"
    if isinstance(e, httpx.ConnectError):
        return f"cannot connect ({e})" if str(e) else "cannot connect"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


# --- installing ----------------------------------------------------------------------------
def install_entry(store: Store, client: RegistryClient, entry: RegistryEntry, *,
                  download_progress: Progress | None = None,
                  ingest_progress: Progress | None = None) -> dict[str, Any]:
    """Install one registry entry (a no-op that says so when it is installed already).

    The tarball is downloaded and verified first (``blobs/tmp``, where gc sweeps what a
    killed download leaves), then handed to ingest, which checks the digest again before its
    commit. Returns the outcome as a JSON-able dict.
    """
    from .ingest import ingest  # ingest pulls in the tar machinery; registry reads need none

    t0 = time.monotonic()
    out: dict[str, Any] = {"name": entry.name, "version": entry.version,
                           "source": entry.download_url, "checksum": entry.checksum,
                           "registry": entry.registry}
    have = store.get_version(entry.name, entry.version)
    if have is not None:
        return {**out, **_existing(have, entry)}
    path, temporary = client.fetch_tarball(entry, store.blobs.tmp, download_progress)
    try:
        res = ingest(store, path, source=entry.download_url, expected_checksum=entry.checksum,
                     name=entry.name, version=entry.version, progress=ingest_progress)
    finally:
        if temporary:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    for w in res.warnings:
        client.warn(f"{entry.spec}: {w}")
    if not res.created:  # another process installed it meanwhile
        return {**out, **_existing(res.version, entry)}
    return {**out, "status": "installed", "files": res.files,
            "logical_bytes": res.logical_bytes, "new_blobs": res.new_blobs,
            "new_stored_bytes": res.new_stored_bytes, "dedup_files": res.dedup_files,
            "dedup_bytes": res.dedup_bytes, "seconds": round(time.monotonic() - t0, 3),
            "warnings": list(res.warnings)}


def _existing(have: VersionInfo, entry: RegistryEntry) -> dict[str, Any]:
    d: dict[str, Any] = {"status": "already installed", "files": have.file_count,
                         "logical_bytes": have.logical_size, "new_stored_bytes": 0,
                         "installed_checksum": have.checksum}
    if have.checksum and have.checksum != entry.checksum:
        # same NAME@VERSION, different bytes: the registry republished it; we keep ours
        d["note"] = f"installed from a different tarball ({have.checksum})"
    return d
