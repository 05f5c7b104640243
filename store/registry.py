"""Registries: fetching ``registry.json`` (http(s) via httpx, ``file://``, plain paths; its
model and checks are store/regformat.py), its cache, choosing a version for this host, and
downloading a verified tarball.

A registry location is a ``registry.json`` (URL or path) or a directory/URL holding one. It is
normalised to an absolute URL (``file:///…`` for paths); Joblet's ``OWNER/REPO`` (when no such
path exists) and ``https://github.com/OWNER/REPO`` name ``<raw base>/OWNER/REPO/main/registry.json``
(raw base ``https://raw.githubusercontent.com`` unless config ``github_raw_base`` or
``JBL_GITHUB_RAW_BASE`` names a mirror). ``download_url`` values are resolved
against it, so a registry dir can be moved or served over http as it is. Several registries
(``--registry`` repeated, or config ``registries:``) are tried in order and the FIRST one that
offers a runtime name serves every version of that name: versions of one name are never mixed
from two publishers.

Cache: a fetched http(s) index is kept as ``<sha256(url)>.json`` under ``STORE/cache/registries``
(or ``$XDG_CACHE_HOME/jbl/registries`` when the store is not writable) and reused for ``TTL``
without touching the network. The store's cache is group-writable, so it is reached only
through ``store/safepath.py`` (directory fds, no link followed, regular files only, written
as a new file renamed into place); a ``cache`` or ``cache/registries`` that is not a real
directory is skipped with one warning, and the user's own cache serves instead.
``refresh=True`` always refetches. When a refetch fails and a
stale copy exists, the stale copy is used with a warning (an offline server keeps working);
under ``refresh`` it is an error instead. Local registries are read directly, never cached.

Downloads stream into an unnamed (``O_TMPFILE``) file in ``STORE/blobs/tmp/``, checking
``size`` and sha256 as bytes arrive; nothing reaches ingest unless both match (ingest checks
the digest again), and a failed, interrupted or killed download leaves no file behind.

Every input is bounded (``DownloadSettings``, resolved once by the CLI from the config's
``download:`` and ``JBL_HTTP_TIMEOUT``): a download by its entry's ``size`` or, without one,
by ``max_size``; a transfer averaging less than ``speed_limit`` bytes/s over ``speed_time``
is abandoned (curl's ``--speed-limit``/``--speed-time``; a watchdog thread shuts the socket,
so a trickling server cannot hold jbl in a blocking read); connect and read timeouts; an
index by ``MAX_INDEX_BYTES`` and ``MAX_JSON_DEPTH``. A ``file://`` registry's tarballs must
lie inside the registry's own directory (also after following symlinks) and be regular files.

Errors: network/HTTP failures and malformed registries are RegistryError (exit 7), one line
naming the URL and what is wrong. Thread-safety: a RegistryClient holds one httpx.Client and a
dict of loaded registries; use it from one thread.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import platform
import re
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import unquote, urlsplit

import httpx

from . import safepath
from .config import GITHUB_RAW_BASE, GITHUB_REPO_RE, RegistrySource
from .errors import (
    ChecksumMismatch,
    IntegrityError,
    NotFound,
    RegistryError,
    UnsafeStorePath,
    UsageError,
)
from .regformat import (
    INDEX_NAME,
    MAX_INDEX_BYTES,
    MAX_URL_LEN,
    Registry,
    RegistryEntry,
    host_arch,
    parse_registry,
    registry_dir,
)
from .store import Store, VersionInfo
from .transport import http_reason
from .units import format_duration, format_size, parse_duration, parse_size
from .versions import Spec, select, sort_versions
from .versions import latest as latest_version

if TYPE_CHECKING:
    from .transport import Fetcher, TransportSettings

TTL = 3600.0  # seconds a fetched index is trusted without asking the server (as Joblet)
TIMEOUT_ENV = "JBL_HTTP_TIMEOUT"  # seconds/duration without data before giving up (default 30s)
USER_AGENT = "jbl/0.1"

Progress = Callable[[int], None]
Warn = Callable[[str], None]


# --- download bounds -----------------------------------------------------------------------
@dataclass(frozen=True)
class DownloadSettings:
    """The bounds on what a registry may make jbl read (config ``download:``)."""

    max_size: int = 8 << 30      # a tarball whose registry entry gives no ``size``
    speed_limit: int = 1 << 10   # bytes/s; a transfer slower than this for speed_time ends
    speed_time: float = 60.0     # seconds; 0 (or speed_limit 0) turns the stall rule off
    timeout: float = 30.0        # seconds without a byte (read), as JBL_HTTP_TIMEOUT
    connect_timeout: float = 10.0

    @property
    def stall_rule(self) -> str:
        return (f"less than {format_size(self.speed_limit)}/s for "
                f"{format_duration(self.speed_time)}")


_DOWNLOAD_KEYS = {"max_size": parse_size, "speed_limit": parse_size,
                  "speed_time": parse_duration, "timeout": parse_duration,
                  "connect_timeout": parse_duration}


def download_settings(config: Mapping[str, tuple[Any, str]],
                      env: Mapping[str, str]) -> DownloadSettings:
    """The settings from the config's ``download:`` (key -> (value, file)) and the
    environment (``JBL_HTTP_TIMEOUT`` overrides ``timeout``); UsageError names the key."""
    values: dict[str, Any] = {}
    for key, (value, origin) in config.items():
        parse = _DOWNLOAD_KEYS.get(key)
        if parse is None:
            raise UsageError(f"config {origin}: unknown download key {key!r} (known: "
                             f"{', '.join(sorted(_DOWNLOAD_KEYS))})")
        values[key] = parse(str(value), what=f"config {origin}: download.{key}")
    if env.get(TIMEOUT_ENV):
        values["timeout"] = parse_duration(env[TIMEOUT_ENV], what=TIMEOUT_ENV)
    settings = DownloadSettings(**values)
    if settings.timeout <= 0 or settings.connect_timeout <= 0:
        raise UsageError("download timeouts must be positive (config download.timeout, "
                         f"download.connect_timeout, {TIMEOUT_ENV})")
    return settings


class _Watchdog:
    """The stall rule for one HTTP request, on a thread: when fewer than ``speed_limit``
    bytes a second arrived over a ``speed_time`` window, it shuts the connection's socket,
    which ends the blocked read in the requesting thread (a read timeout alone never fires
    for a server that sends one byte every few seconds). The socket comes from httpcore's
    ``trace`` extension, so the header phase is covered too."""

    def __init__(self, settings: DownloadSettings) -> None:
        self.limit = settings.speed_limit
        self.window = settings.speed_time
        self.fired = False
        self._sock: socket.socket | None = None
        self._bytes = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> _Watchdog:
        if self.limit > 0 and self.window > 0:
            self._thread = threading.Thread(target=self._run, name="jbl-stall", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def trace(self, event: str, info: dict[str, Any]) -> None:
        if event == "connection.connect_tcp.complete":
            stream = info.get("return_value")
            sock = stream.get_extra_info("socket") if stream is not None else None
            with self._lock:
                self._sock = sock if isinstance(sock, socket.socket) else None

    def add(self, n: int) -> None:
        with self._lock:
            self._bytes += n

    def _run(self) -> None:
        start = time.monotonic()
        tick = min(1.0, self.window / 4)
        while not self._stop.wait(tick):
            now = time.monotonic()
            if now - start < self.window:
                continue
            with self._lock:
                slow = self._bytes < self.limit * (now - start)
                self._bytes = 0
                if slow:
                    self.fired = True
                    if self._sock is not None:
                        # already closed (OSError): the request is ending anyway
                        with contextlib.suppress(OSError):
                            self._sock.shutdown(socket.SHUT_RDWR)
                    return
            start = now


_GITHUB_URL_RE = re.compile(r"https?://(?:www\.)?github\.com/([A-Za-z0-9-]+/[A-Za-z0-9._-]+?)"
                            r"(?:\.git)?/?", re.IGNORECASE)


def github_registry(text: str, *, base_dir: Path | None = None,
                    raw_base: str = GITHUB_RAW_BASE) -> str | None:
    """The registry.json URL of the GitHub repository ``text`` names as Joblet does
    (``OWNER/REPO``, ``https://github.com/OWNER/REPO``), or None. An existing local path
    spelled ``OWNER/REPO`` (relative to ``base_dir``, default the working directory) stays a
    path: a directory registry must not turn into a download because it looks like a repo."""
    m = _GITHUB_URL_RE.fullmatch(text)
    if m is not None:
        repo = m.group(1)
    elif GITHUB_REPO_RE.fullmatch(text) and not os.path.lexists((base_dir or Path.cwd()) / text):
        repo = text
    else:
        return None
    if not GITHUB_REPO_RE.fullmatch(repo):  # e.g. github.com/o/x.json: not a repository
        return None
    return f"{raw_base.rstrip('/')}/{repo}/main/{INDEX_NAME}"


def location_url(text: str, *, base_dir: Path | None = None,
                 github_raw_base: str = GITHUB_RAW_BASE) -> str:
    """``--registry`` text -> the absolute URL of a registry.json."""
    text = text.strip()
    if not text:
        raise UsageError("empty registry location")
    if len(text) > MAX_URL_LEN:
        raise UsageError(f"registry location is longer than {MAX_URL_LEN} characters")
    github = github_registry(text, base_dir=base_dir, raw_base=github_raw_base)
    if github is not None:
        return github
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


def offered_summary(reg: Registry, arch: str | None = None) -> list[dict[str, Any]]:
    """Rows for ``available``: name, versions (ascending), the latest release this host's
    architecture (``arch``) can run -- what ``install NAME`` would pick --, platforms."""
    arch = arch or host_arch()
    rows = []
    for name in sorted(reg.runtimes):
        entries = reg.runtimes[name]
        vers = sort_versions(entries)
        plats = sorted({p for e in entries.values() for p in e.platforms})
        runnable = [v for v in vers if entries[v].runs_on(arch)]
        rows.append({"name": name, "versions": vers, "latest": latest_version(runnable),
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
class RegistryClient:
    """Loads registries (with the cache) and downloads tarballs. Close it (or use ``with``)."""

    def __init__(self, store_dir: Path | None, *, refresh: bool = False, ttl: float = TTL,
                 warn: Warn | None = None, settings: DownloadSettings | None = None,
                 github_raw_base: str = GITHUB_RAW_BASE,
                 user_cache: Path | None = None, transport: TransportSettings | None = None,
                 mirrors: Callable[[str], list[str]] | None = None) -> None:
        self.refresh = refresh
        # How content-addressed files are fetched (store/transport.py): proxies, s3_endpoint,
        # and each registry's configured mirrors (config ``mirrors:``), resolved by the CLI.
        self.transport = transport
        self.mirrors = mirrors or (lambda _url: [])
        self.github_raw_base = github_raw_base  # config github_raw_base / JBL_GITHUB_RAW_BASE
        self.ttl = ttl
        self.warn: Warn = warn or (lambda _msg: None)
        self.settings = settings or DownloadSettings()
        # The store's cache (reached through safepath: _open_cache_dir), then the user's own
        # (``user_cache``: Settings.registry_cache, $XDG_CACHE_HOME/jbl/registries).
        self._store_dir = Path(store_dir) if store_dir is not None and \
            os.access(store_dir, os.W_OK) else None
        self.cache_dirs: list[Path] = []
        if self._store_dir is not None:
            self.cache_dirs.append(self._store_dir / "cache" / "registries")
        if user_cache is not None:
            self.cache_dirs.append(user_cache)
        self._unsafe_warned = False
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
            s = self.settings
            # No keep-alive: every request opens its own connection, so the stall watchdog
            # always learns the socket it may have to shut (httpcore's connect_tcp trace).
            limits = httpx.Limits(max_keepalive_connections=0)
            # The proxies the content-addressed fetches use (config proxy:, the CLI's
            # environment snapshot); without transport settings, httpx's own reading.
            mounts = None
            if self.transport is not None:
                from .transport import proxy_mounts

                mounts = proxy_mounts(self.transport, limits)
            self._http = httpx.Client(
                timeout=httpx.Timeout(s.timeout, connect=min(s.timeout, s.connect_timeout)),
                limits=limits, follow_redirects=True, trust_env=self.transport is None,
                mounts=mounts,
                headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"})
        return self._http

    # cache -----------------------------------------------------------------------------
    @staticmethod
    def _cache_name(url: str) -> str:
        return hashlib.sha256(url.encode()).hexdigest() + ".json"

    def _open_cache_dir(self, d: Path, create: bool) -> int | None:
        """An fd of the cache directory ``d``, or None when it is missing (and not
        ``create``), not usable, or (the store's) not a real directory: the store's cache is
        group-writable, so an admin-group member could plant ``cache`` or
        ``cache/registries`` as a link; root never follows it (one warning, then the user's
        own cache serves). The user's cache is their own: opened by path."""
        try:
            if self._store_dir is not None and d == self.cache_dirs[0]:
                with safepath.opened(safepath.open_store(self._store_dir)) as sfd:
                    return safepath.walk(sfd, ("cache", "registries"),
                                         shown=str(self._store_dir),
                                         create_mode=0o2775 if create else None)
            if create:
                d.mkdir(parents=True, exist_ok=True)
            return os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except UnsafeStorePath as e:
            if not self._unsafe_warned:
                self._unsafe_warned = True
                self.warn(f"the store's registry cache is not used: {e}")
            return None
        except OSError:
            return None  # no cache (missing, not writable) is not an error

    def _cached(self, url: str) -> tuple[bytes, float] | None:
        """The freshest cached copy of ``url`` and its age in seconds. Read relative to the
        cache dir's fd without following links and without blocking, regular files only,
        bounded."""
        best: tuple[bytes, float] | None = None
        for d in self.cache_dirs:
            dfd = self._open_cache_dir(d, create=False)
            if dfd is None:
                continue
            try:
                fd = os.open(self._cache_name(url),
                             os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                             dir_fd=dfd)
            except OSError:
                continue
            finally:
                os.close(dfd)
            with os.fdopen(fd, "rb") as f:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_INDEX_BYTES:
                    continue
                age = time.time() - st.st_mtime
                if best is None or age < best[1]:
                    try:
                        best = (f.read(MAX_INDEX_BYTES + 1), age)
                    except OSError:
                        continue
        return best

    def _store_cache(self, url: str, data: bytes) -> None:
        """Cache ``data`` in the first usable cache dir: a new file (``O_EXCL|O_NOFOLLOW``,
        so nothing planted is written through) renamed over the old copy in the same
        directory fd (readers never see half a file; a link there is replaced, not
        followed)."""
        for d in self.cache_dirs:
            dfd = self._open_cache_dir(d, create=True)
            if dfd is None:
                continue
            tmp = f".tmp-{os.getpid()}-{os.urandom(6).hex()}"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW |
                             os.O_CLOEXEC, 0o644, dir_fd=dfd)
                try:
                    with os.fdopen(fd, "wb", closefd=False) as f:
                        f.write(data)
                    os.fchmod(fd, 0o644)
                finally:
                    os.close(fd)
                os.rename(tmp, self._cache_name(url), src_dir_fd=dfd, dst_dir_fd=dfd)
                return
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dfd)
                continue  # not writable: try the next dir; no cache is not an error
            finally:
                os.close(dfd)

    # http --------------------------------------------------------------------------------
    def _get(self, url: str, sink: Callable[[bytes], None], limit: int,
             too_big: Callable[[], Exception], what: str) -> None:
        """Stream ``url``'s body into ``sink``: at most ``limit`` bytes (else ``too_big()``),
        under the stall rule and the timeouts; RegistryError ``what: reason`` otherwise."""
        with _Watchdog(self.settings) as wd:
            try:
                with self.http.stream("GET", url, extensions={"trace": wd.trace}) as r:
                    if r.status_code != 200:
                        raise RegistryError(f"{what}: HTTP {r.status_code} {r.reason_phrase}")
                    announced = r.headers.get("content-length", "")
                    if announced.isdigit() and int(announced) > limit:
                        raise too_big()
                    n = 0
                    for block in r.iter_bytes():  # as each read returns: the watchdog counts
                        n += len(block)
                        if n > limit:
                            raise too_big()
                        wd.add(len(block))
                        sink(block)
            except httpx.HTTPError as e:
                if wd.fired:
                    raise self._stalled(what) from None
                raise RegistryError(f"{what}: {http_reason(e)}") from None
            if wd.fired:  # a shut socket can look like the end of a length-less body
                raise self._stalled(what)

    def _stalled(self, what: str) -> RegistryError:
        return RegistryError(f"{what}: stalled: {self.settings.stall_rule} (config "
                             "download.speed_limit, download.speed_time)")

    # loading ---------------------------------------------------------------------------
    def _fetch_http(self, url: str) -> bytes:
        buf = bytearray()
        self._get(url, buf.extend, MAX_INDEX_BYTES,
                  lambda: RegistryError(f"registry {url} is larger than "
                                        f"{MAX_INDEX_BYTES >> 20} MiB"),
                  f"cannot fetch registry {url}")
        return bytes(buf)

    def load(self, source: RegistrySource | str) -> Registry:
        if isinstance(source, str):
            source = RegistrySource(source)
        # config already made relative paths absolute (and OWNER/REPO a github.com URL)
        url = source.url
        if url.startswith("s3://"):  # a bucket, read as unsigned HTTP(S) (store/transport.py)
            from .transport import DEFAULT_S3_ENDPOINT, source_for

            url = source_for(url, s3_endpoint=self.transport.s3_endpoint if self.transport
                             else DEFAULT_S3_ENDPOINT).base
        url = location_url(url, github_raw_base=self.github_raw_base)
        if url in self._loaded:
            return self._loaded[url]
        label = source.name or url
        if url.startswith("file:"):
            reg = parse_registry(_read_local_index(Path(unquote(urlsplit(url).path))), url,
                                 label)
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
    def fetcher(self, registry_url: str) -> Fetcher:
        """A Fetcher of the registry's content-addressed files: its mirrors, then its own
        directory (the caller closes it)."""
        from .transport import Fetcher, TransportSettings

        return Fetcher.for_registry(registry_url, self.mirrors(registry_url),
                                    self.transport or TransportSettings(download=self.settings))

    def limit(self, entry: RegistryEntry) -> int:
        """The most bytes ``entry``'s tarball may have: its ``size``, else ``max_size``."""
        return entry.size if entry.size is not None else self.settings.max_size

    def _too_big(self, entry: RegistryEntry) -> Exception:
        if entry.size is not None:
            return IntegrityError(f"{entry.spec} from {entry.download_url} is larger than the "
                                  f"{entry.size} bytes its registry says")
        return RegistryError(f"{entry.spec} from {entry.download_url} is larger than "
                             f"{format_size(self.settings.max_size)}, the most jbl downloads "
                             "for an entry without a size (config download.max_size)")

    def fetch_tarball(self, entry: RegistryEntry, tmp_dir: Path,
                      progress: Progress | None = None) -> BinaryIO:
        """An open, verified copy of ``entry``'s tarball, positioned at its start; the caller
        closes it. A ``file://`` tarball is the registry's file itself (opened confined to
        the registry's directory); an http(s) one streams into an unnamed file in
        ``tmp_dir`` that vanishes when closed, whatever happens (even SIGKILL)."""
        tick: Progress = progress or (lambda _n: None)
        limit = self.limit(entry)
        h, count = hashlib.sha256(), [0]
        if entry.download_url.startswith("file:"):
            f = _open_confined(entry)
            try:
                while block := f.read(1 << 20):
                    count[0] += len(block)
                    if count[0] > limit:
                        raise self._too_big(entry)
                    h.update(block)
                    tick(len(block))
                self._check(entry, count[0], h.hexdigest())
                f.seek(0)
                return f
            except OSError as e:
                f.close()
                raise RegistryError(f"cannot read {entry.spec} tarball {entry.download_url}: "
                                    f"{e.strerror}") from None
            except BaseException:
                f.close()
                raise
        out = _anonymous_file(tmp_dir)
        try:
            def sink(block: bytes) -> None:
                h.update(block)
                out.write(block)
                count[0] += len(block)
                tick(len(block))

            self._get(entry.download_url, sink, limit, lambda: self._too_big(entry),
                      f"cannot download {entry.spec} from {entry.download_url}")
            self._check(entry, count[0], h.hexdigest())
            out.flush()
            out.seek(0)
            return out
        except OSError as e:
            out.close()
            raise RegistryError(f"cannot store the download of {entry.spec} in {tmp_dir}: "
                                f"{e.strerror}") from None
        except BaseException:
            out.close()
            raise

    @staticmethod
    def _check(entry: RegistryEntry, n: int, hexdigest: str) -> None:
        actual = "sha256:" + hexdigest
        if actual != entry.checksum:
            sizes = "" if entry.size in (None, n) else f" ({n} bytes, registry says {entry.size})"
            raise ChecksumMismatch(f"{entry.spec} from {entry.download_url}{sizes}",
                                   entry.checksum, actual)
        if entry.size is not None and n != entry.size:
            raise IntegrityError(f"{entry.spec}: {n} bytes, registry says {entry.size}")


def _read_local_index(path: Path) -> bytes:
    """A local registry.json: a regular file (a FIFO must not hang us, /dev/zero not spin),
    at most MAX_INDEX_BYTES."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise RegistryError(f"no registry at {path} (no {INDEX_NAME} there)") from None
    except OSError as e:
        raise RegistryError(f"cannot read registry {path}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise RegistryError(f"registry {path} is not a regular file")
        try:
            data = f.read(MAX_INDEX_BYTES + 1)
        except OSError as e:
            raise RegistryError(f"cannot read registry {path}: {e.strerror}") from None
    if len(data) > MAX_INDEX_BYTES:
        raise RegistryError(f"registry {path} is larger than {MAX_INDEX_BYTES >> 20} MiB")
    return data


def _open_confined(entry: RegistryEntry) -> BinaryIO:
    """Open a ``file://`` registry's tarball only if it really lies inside the registry's
    directory and is a regular file. The resolved path is checked before opening (no open of
    a device at all) and the opened file's own path after (``/proc/self/fd``), so a symlink
    swapped in between cannot lead elsewhere either."""
    base = os.path.realpath(registry_dir(entry.registry))
    path = unquote(urlsplit(entry.download_url).path)
    shown = f"{entry.spec}: {path}"

    def inside(p: str) -> bool:
        return p.startswith(base.rstrip("/") + "/")

    real = os.path.realpath(path)
    if not inside(real):
        raise RegistryError(f"{shown} leads outside the registry's directory {base} "
                            f"(to {real})")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise RegistryError(f"{shown}: no such tarball") from None
    except OSError as e:
        raise RegistryError(f"cannot read {shown}: {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise RegistryError(f"{shown} is not a regular file")
        if not inside(os.readlink(f"/proc/self/fd/{fd}")):
            raise RegistryError(f"{shown} leads outside the registry's directory {base}")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _anonymous_file(tmp_dir: Path) -> BinaryIO:
    """A file with no name in ``tmp_dir``: O_TMPFILE, else a named one unlinked at once.
    (``Store.blobs.tmp`` is ``/proc/self/fd/N``: a directory BlobStore checked and pinned.)"""
    try:
        fd = os.open(tmp_dir, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise RegistryError(f"cannot create a download file in {tmp_dir}: "
                                f"{e.strerror}") from None
        fd, name = tempfile.mkstemp(dir=tmp_dir, prefix="download-")
        os.unlink(name)
    return os.fdopen(fd, "w+b")


# --- installing ----------------------------------------------------------------------------
def install_entry(store: Store, client: RegistryClient, entry: RegistryEntry, *,
                  force: bool = False, download_progress: Progress | None = None,
                  ingest_progress: Progress | None = None,
                  total: Callable[[int | None], None] | None = None,
                  already: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Install one registry entry.

    From its content-addressed form when the registry offers it (store/casinstall.py: only
    the objects the store lacks are fetched; ``total`` learns how many bytes that is,
    ``already`` how many of the version's bytes the store holds), else
    from its tarball.

    Already installed from the same tarball (the registry's checksum is the one recorded at
    install): a no-op that says so. From a different one: AlreadyExists naming both digests,
    unless ``force``, which replaces it (ingest swaps the rows in one transaction; a job
    using the old copy keeps it). The tarball is downloaded and verified first, then handed
    to ingest, which checks the digest again before its commit. Returns the outcome as a
    JSON-able dict.
    """
    from .ingest import check_same_tarball, ingest  # the tar machinery: only when installing

    t0 = time.monotonic()
    out: dict[str, Any] = {"name": entry.name, "version": entry.version,
                           "source": entry.download_url, "checksum": entry.checksum,
                           "registry": entry.registry}
    have = store.get_version(entry.name, entry.version)
    if have is not None and not force:
        check_same_tarball(have, entry.checksum, entry.download_url)
        return {**out, **_existing(have)}
    if entry.tree is not None:
        from .casinstall import install_tree

        cas = install_tree(store, client, entry, entry.tree, force=force,
                           progress=download_progress, total=total, already=already)
        if cas is not None:
            for w in cas.warnings:
                client.warn(f"{entry.spec}: {w}")
            assert cas.version is not None
            if not cas.created:  # another process installed it meanwhile: the same tarball?
                check_same_tarball(cas.version, entry.checksum, entry.download_url)
                return {**out, **_existing(cas.version)}
            return {**out, "status": "replaced" if have is not None else "installed",
                    "form": "tree", "tree": entry.tree.url, "files": cas.files,
                    "logical_bytes": cas.logical_bytes, "new_blobs": cas.new_blobs,
                    "new_stored_bytes": cas.new_stored_bytes, "dedup_files": cas.dedup_files,
                    "dedup_bytes": cas.dedup_bytes, "fetched_bytes": cas.fetched_bytes,
                    "present_bytes": cas.present_bytes, "requests": cas.requests,
                    "seconds": round(time.monotonic() - t0, 3), "warnings": cas.warnings}
    if total is not None and entry.size is not None:
        total(2 * entry.size)  # read twice: downloaded and verified, then ingested
    with client.fetch_tarball(entry, store.blobs.tmp, download_progress) as f:
        res = ingest(store, f, source=entry.download_url, expected_checksum=entry.checksum,
                     name=entry.name, version=entry.version, progress=ingest_progress,
                     force=force)
    for w in res.warnings:
        client.warn(f"{entry.spec}: {w}")
    if not res.created:  # another process installed it meanwhile (ingest compared digests)
        return {**out, **_existing(res.version)}
    return {**out, "status": "replaced" if have is not None else "installed",
            "files": res.files, "logical_bytes": res.logical_bytes, "new_blobs": res.new_blobs,
            "new_stored_bytes": res.new_stored_bytes, "dedup_files": res.dedup_files,
            "dedup_bytes": res.dedup_bytes, "seconds": round(time.monotonic() - t0, 3),
            "warnings": list(res.warnings)}


def _existing(have: VersionInfo) -> dict[str, Any]:
    return {"status": "already installed", "files": have.file_count,
            "logical_bytes": have.logical_size, "new_stored_bytes": 0,
            "installed_checksum": have.checksum}
