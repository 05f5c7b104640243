"""Moving a registry's files: reading them from an ordered list of sources (``Fetcher``) and
writing them to a publishing target (``Target``: a directory or an S3 bucket).

Sources, tried in order: the configured mirrors, then the origin (the registry's own base
URL). A source is ``http(s)://BASE``, ``file:///DIR`` or an absolute ``/DIR``, or
``s3://BUCKET/PREFIX``, which is read as plain unsigned HTTPS from ``s3_endpoint``
(``{endpoint}/BUCKET/PREFIX/…``, or ``{bucket}`` in the endpoint for virtual-hosted
buckets): a public-read bucket or a CDN in front of one, because signed requests are not
cacheable by shared caches. A file is named by a relative path (``objects/ab/<hex>``,
``packs/<hex>.pack``, ``registry.json``): plain components only, never ``..``.

The failure sequence, per file (CernVM-FS's): bytes that fail the caller's ``check`` (or
exceed ``max_size``) are fetched once more from the same source with ``Cache-Control:
no-cache``, so an HTTP cache in between replaces its copy; still bad, the next source is
asked, down to the origin; when no source served good bytes and at least one served bad
ones, IntegrityError (exit 5) names the file and every source that served it bad. A 4xx (a
bucket answers 403 for a missing key) moves on to the next source; a source that cannot be
reached (connection refused, DNS, a timeout, 5xx after its retries) too, and it is not asked
again by this Fetcher. When every source failed without serving bad bytes: RegistryError (exit 7),
one line naming each source and why. 503, 429 and other 5xx answers are retried on the same
source after a wait doubling from ``backoff`` with jitter (``Retry-After`` honoured), at
most ``tries`` requests and ``backoff_total`` seconds of waiting per file and source.

Bounds: every body at most ``max_size`` bytes (a longer one is bad bytes, cut at the limit);
connect and read timeouts and the stall rule of ``DownloadSettings`` (registry.py), timed per
connection while a request is on it (a request waiting for a free worker is not timed):
one monitor thread shuts the socket of a transfer slower than ``speed_limit`` over
``speed_time``. Never a Range request. ``get_many`` runs ``concurrency`` requests at a time
over kept-alive connections (one httpx.Client, thread-safe).

Proxies: ``HTTPS_PROXY``/``HTTP_PROXY``/``ALL_PROXY``/``NO_PROXY`` (either case) from the
environment snapshot the CLI passed (``Settings.env``), else config ``proxy:``; httpx never
reads ``os.environ`` itself here (``trust_env=False``).

Targets: ``DirTarget`` writes a new file in the directory and renames it into place (a
reader or a killed publisher never leaves half a file under the real name);
``S3Target`` uploads with boto3 (the optional extra ``jbl[s3]``; credentials from boto3's
usual environment variables and files; request checksums only "when required", so MinIO,
Ceph RGW and B2 accept the uploads), immutable files with ``Cache-Control: public,
max-age=31536000, immutable`` and the others (``registry.json``) with ``max-age=61``
(squid caches nothing that expires within 60 s).

Thread-safety: ``Fetcher.get`` may be called from several threads (``get_many`` does);
counters are kept under a lock. Targets are used from one thread.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import re
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote, urlsplit

import httpx

from .errors import IntegrityError, RegistryError, UsageError

if TYPE_CHECKING:
    from .config import Config
    from .registry import DownloadSettings

Check = Callable[[bytes], bool]
DEFAULT_S3_ENDPOINT = "https://s3.amazonaws.com"
IMMUTABLE = "public, max-age=31536000, immutable"
MUTABLE = "public, max-age=61"  # squid keeps nothing that expires within 60 s
USER_AGENT = "jbl/0.1"
MAX_RELPATH = 1024
MAX_SOURCES = 32
_RELPATH_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(?:/[A-Za-z0-9][A-Za-z0-9._-]*)*")
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class TransportSettings:
    """How a Fetcher reaches its sources (config ``mirrors``, ``proxy``, ``s3_endpoint``;
    the environment's proxy variables; the ``download:`` bounds)."""

    download: DownloadSettings | None = None  # None: registry.DownloadSettings()
    proxy: str | None = None                  # config proxy:
    env: Mapping[str, str] = field(default_factory=dict)  # HTTPS_PROXY & co. (Settings.env)
    s3_endpoint: str = DEFAULT_S3_ENDPOINT
    tries: int = 5             # requests per file and source on 429/5xx
    backoff: float = 0.25      # seconds before the first retry; doubled each time, jittered
    backoff_total: float = 30.0  # most seconds spent waiting on one file and source


def transport_settings(config: Config, env: Mapping[str, str],
                       download: DownloadSettings | None = None) -> TransportSettings:
    """The settings of one command: config ``proxy``/``s3_endpoint``, the environment
    snapshot (``Settings.env``; only its proxy variables are read) and the download bounds."""
    return TransportSettings(download=download, proxy=config.proxy, env=env,
                             s3_endpoint=config.s3_endpoint or DEFAULT_S3_ENDPOINT)


def mirrors_for(config: Config, registry_url: str) -> list[str]:
    """The configured mirrors of the registry at ``registry_url`` (its registry.json or its
    directory), in order: those named for it and those for every registry as they come."""
    def base(url: str) -> str:
        url = url.rstrip("/")
        if url.startswith("file://"):
            url = unquote(urlsplit(url).path)
        return url.rsplit("/", 1)[0] if url.endswith(".json") else url

    me = base(registry_url)
    return [m.url for m in config.mirrors if not m.registry or base(m.registry) == me]


def check_relpath(relpath: str) -> str:
    """``relpath`` if it is a plain relative path (``objects/ab/cd``), else UsageError."""
    if len(relpath) > MAX_RELPATH or not _RELPATH_RE.fullmatch(relpath):
        raise UsageError(f"not a registry file name: {relpath[:200]!r}")
    return relpath


# --- sources ---------------------------------------------------------------------------------
class _Missing(Exception):
    """The source does not have the file (HTTP 4xx, no such file): try the next one."""


class _Down(Exception):
    """The source cannot be reached or keeps failing: try the next one, and not it again."""


class _TooBig(Exception):
    pass


@dataclass(frozen=True)
class Source:
    """One place to read a registry's files from: ``base`` is an http(s) URL or a directory."""

    label: str           # as the user wrote it (s3://…, file://…, http://…)
    base: str            # http(s) URL without a trailing slash, or an absolute directory
    is_dir: bool = False

    def url(self, relpath: str) -> str:
        return f"{self.base}/{relpath}"


def source_for(text: str, *, s3_endpoint: str = DEFAULT_S3_ENDPOINT) -> Source:
    """A Source from a mirror or registry base: http(s)://, file://, /DIR or s3://B/PREFIX."""
    text = text.strip()
    scheme = urlsplit(text).scheme.lower() if "://" in text else ""
    if scheme in ("http", "https"):
        return Source(text, text.rstrip("/"))
    if scheme == "s3":
        parts = urlsplit(text)
        bucket, prefix = parts.netloc, parts.path.strip("/")
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
            raise UsageError(f"{text!r}: not an S3 bucket name (s3://BUCKET/PREFIX)")
        endpoint = s3_endpoint.rstrip("/")
        base = endpoint.replace("{bucket}", bucket) if "{bucket}" in endpoint \
            else f"{endpoint}/{bucket}"
        return Source(text, base + (f"/{prefix}" if prefix else ""))
    if scheme == "file":
        path = unquote(urlsplit(text).path)
    elif scheme:
        raise UsageError(f"unsupported source {text!r}: use http(s)://, file://, s3:// or a "
                         "directory")
    else:
        path = text
    if not os.path.isabs(path):
        raise UsageError(f"a directory source must be an absolute path (got {text!r})")
    return Source(text, os.path.normpath(path), is_dir=True)


def read_dir_file(base: str, relpath: str, max_size: int) -> bytes:
    """``base/relpath`` read one component at a time without following links, a regular
    file of at most ``max_size`` bytes (else _TooBig); _Missing when absent."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    try:
        dfd = os.open(base, flags)
    except OSError as e:
        raise _Down(f"cannot open {base}: {e.strerror}") from None
    try:
        *dirs, name = relpath.split("/")
        for d in dirs:
            try:
                nfd = os.open(d, flags | os.O_NOFOLLOW, dir_fd=dfd)
            except FileNotFoundError:
                raise _Missing("no such file") from None
            except OSError as e:
                raise _Missing(f"{d}: {e.strerror}") from None
            os.close(dfd)
            dfd = nfd
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=dfd)
        except FileNotFoundError:
            raise _Missing("no such file") from None
        except OSError as e:
            # ELOOP: a symbolic link, never followed
            raise _Missing(f"{e.strerror}" if e.errno != errno.ELOOP
                           else "a symbolic link (not followed)") from None
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise _Missing("not a regular file")
            data = f.read(max_size + 1)
    finally:
        os.close(dfd)
    if len(data) > max_size:
        raise _TooBig()
    return data


# --- the stall monitor -------------------------------------------------------------------------
class _Transfer:
    """One request on a connection: its socket and the bytes counted in this window."""

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.start = time.monotonic()
        self.bytes = 0
        self.fired = False

    def trace(self, event: str, info: dict[str, Any]) -> None:
        if event == "connection.connect_tcp.complete":
            stream = info.get("return_value")
            self.take(stream)

    def take(self, stream: Any) -> None:
        sock = stream.get_extra_info("socket") if stream is not None else None
        if isinstance(sock, socket.socket):
            self.sock = sock


class _Monitor:
    """The stall rule for every transfer of a Fetcher, on one thread: a transfer that
    received fewer than ``limit`` bytes a second over a ``window`` has its socket shut (the
    blocked read in its worker ends; a read timeout alone never fires for a trickle)."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit, self.window = limit, window
        self.active: set[_Transfer] = set()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    @contextlib.contextmanager
    def transfer(self) -> Iterator[_Transfer]:
        t = _Transfer()
        if self.limit <= 0 or self.window <= 0:
            yield t
            return
        with self.lock:
            self.active.add(t)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="jbl-stall",
                                               daemon=True)
                self.thread.start()
        try:
            yield t
        finally:
            with self.lock:
                self.active.discard(t)

    def add(self, t: _Transfer, n: int) -> None:
        with self.lock:
            t.bytes += n

    def _run(self) -> None:
        tick = min(1.0, self.window / 4)
        while not self.stop.wait(tick):
            now = time.monotonic()
            with self.lock:
                for t in list(self.active):
                    if now - t.start < self.window:
                        continue
                    if t.bytes < self.limit * (now - t.start) and not t.fired:
                        t.fired = True
                        if t.sock is not None:
                            with contextlib.suppress(OSError):
                                t.sock.shutdown(socket.SHUT_RDWR)
                    t.start, t.bytes = now, 0

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()


# --- proxies -------------------------------------------------------------------------------
def proxy_map(env: Mapping[str, str], proxy: str | None) -> dict[str, str | None]:
    """httpx mount patterns -> proxy URL (None: direct), from the environment snapshot's
    ``HTTP(S)_PROXY``/``ALL_PROXY``/``NO_PROXY`` (lower case first, as curl), else config
    ``proxy`` for every scheme; NO_PROXY applies to both."""

    def var(name: str) -> str:
        return (env.get(name.lower()) or env.get(name) or "").strip()

    out: dict[str, str | None] = {}
    for scheme, name in (("http", "HTTP_PROXY"), ("https", "HTTPS_PROXY")):
        value = var(name) or var("ALL_PROXY") or (proxy or "")
        if value:
            out[f"{scheme}://"] = value if "://" in value else f"http://{value}"
    for host in (h.strip() for h in var("NO_PROXY").split(",")):
        if host == "*":
            return {}
        if not host:
            continue
        if "://" in host:
            out[host] = None
        elif re.fullmatch(r"[0-9.]+", host) or host.lower() == "localhost":
            out[f"all://{host}"] = None
        elif ":" in host:
            out[f"all://[{host.strip('[]')}]"] = None
        else:
            out[f"all://*{host}"] = None
    return out


def proxy_mounts(settings: TransportSettings,
                 limits: httpx.Limits) -> dict[str, httpx.BaseTransport | None] | None:
    """httpx ``mounts`` for the proxies ``settings`` name (None: none); use with
    ``trust_env=False`` so that httpx does not read ``os.environ`` itself."""
    mounts: dict[str, httpx.BaseTransport | None] = {}
    for pattern, proxy in proxy_map(settings.env, settings.proxy).items():
        mounts[pattern] = None if proxy is None else \
            httpx.HTTPTransport(proxy=proxy, limits=limits, trust_env=False)
    return mounts or None


# --- the fetcher ---------------------------------------------------------------------------
@dataclass
class SourceStats:
    requests: int = 0
    bytes: int = 0
    bad: int = 0       # bodies that failed their check or size
    failures: int = 0  # 404s, errors, retried statuses


class Fetcher:
    """Reads files from ``sources`` (mirrors first, the origin last) by the failure sequence
    of the module docstring. Close it (or use ``with``)."""

    def __init__(self, sources: Sequence[str | Source],
                 settings: TransportSettings | None = None) -> None:
        self.settings = settings or TransportSettings()
        if self.settings.download is None:
            from .registry import DownloadSettings

            self.download: DownloadSettings = DownloadSettings()
        else:
            self.download = self.settings.download
        srcs = [s if isinstance(s, Source) else
                source_for(s, s3_endpoint=self.settings.s3_endpoint) for s in sources]
        if not srcs or len(srcs) > MAX_SOURCES:
            raise UsageError(f"a fetcher needs 1 to {MAX_SOURCES} sources (got {len(srcs)})")
        self.sources: tuple[Source, ...] = tuple(dict.fromkeys(srcs))  # duplicates once
        self.requests = 0
        self.bytes_fetched = 0
        self.per_source: dict[str, SourceStats] = {s.label: SourceStats()
                                                   for s in self.sources}
        self._down: dict[Source, str] = {}
        self._lock = threading.Lock()
        self._monitor = _Monitor(self.download.speed_limit, self.download.speed_time)
        self._http: httpx.Client | None = None

    @classmethod
    def for_registry(cls, registry_url: str, mirrors: Iterable[str] = (),
                     settings: TransportSettings | None = None) -> Fetcher:
        """A Fetcher for the registry whose ``registry.json`` is at ``registry_url`` (its
        directory is the origin), the ``mirrors`` first."""
        base = registry_url.rsplit("/", 1)[0] if registry_url.endswith(".json") \
            else registry_url
        return cls([*mirrors, base], settings)

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._monitor.close()
        if self._http is not None:
            self._http.close()
            self._http = None

    @property
    def any_down(self) -> bool:
        """Whether a source failed other than by not having a file (down, refusing)."""
        with self._lock:
            return bool(self._down)

    @property
    def http(self) -> httpx.Client:
        with self._lock:
            if self._http is None:
                self._http = self._client()
            return self._http

    def _client(self) -> httpx.Client:
        d = self.download
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=32)
        return httpx.Client(
            timeout=httpx.Timeout(d.timeout, connect=min(d.timeout, d.connect_timeout)),
            limits=limits, follow_redirects=True, trust_env=False,
            mounts=proxy_mounts(self.settings, limits),
            headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"})

    # counting --------------------------------------------------------------------------
    def _count(self, src: Source, *, requests: int = 0, nbytes: int = 0, bad: int = 0,
               failures: int = 0) -> None:
        with self._lock:
            self.requests += requests
            self.bytes_fetched += nbytes
            st = self.per_source[src.label]
            st.requests += requests
            st.bytes += nbytes
            st.bad += bad
            st.failures += failures

    # one request -------------------------------------------------------------------------
    def _http_once(self, src: Source, relpath: str, max_size: int, no_cache: bool) -> bytes:
        """One GET; _Missing, _Down, _TooBig, or _Retry(status, retry_after)."""
        headers = {"Cache-Control": "no-cache", "Pragma": "no-cache"} if no_cache else {}
        buf = bytearray()
        with self._monitor.transfer() as t:
            self._count(src, requests=1)
            try:
                with self.http.stream("GET", src.url(relpath), headers=headers,
                                      extensions={"trace": t.trace}) as r:
                    t.take(r.extensions.get("network_stream"))  # a kept-alive connection
                    if r.status_code in _RETRY_STATUS:
                        raise _Retry(r.status_code, r.headers.get("retry-after", ""))
                    if 400 <= r.status_code < 500:  # this file (a bucket says 403 for a
                        # missing key without ListBucket): the next source, this one stays
                        raise _Missing(f"HTTP {r.status_code} {r.reason_phrase}".rstrip())
                    if r.status_code != 200:
                        raise _Down(f"HTTP {r.status_code} {r.reason_phrase}")
                    announced = r.headers.get("content-length", "")
                    if announced.isdigit() and int(announced) > max_size:
                        raise _TooBig()
                    for block in r.iter_bytes():
                        self._monitor.add(t, len(block))
                        self._count(src, nbytes=len(block))
                        buf += block
                        if len(buf) > max_size:
                            raise _TooBig()
            except httpx.HTTPError as e:
                if t.fired:
                    raise _Down(f"stalled: {self.download.stall_rule}") from None
                raise _Down(http_reason(e)) from None
            if t.fired:  # a shut socket can look like the end of a length-less body
                raise _Down(f"stalled: {self.download.stall_rule}")
        return bytes(buf)

    def _read(self, src: Source, relpath: str, max_size: int, no_cache: bool) -> bytes:
        """The file from ``src``, 429/5xx retried with backoff (module docstring)."""
        if src.is_dir:
            self._count(src, requests=1)
            data = read_dir_file(src.base, relpath, max_size)
            self._count(src, nbytes=len(data))
            return data
        s = self.settings
        waited = 0.0
        for attempt in range(1, max(1, s.tries) + 1):
            try:
                return self._http_once(src, relpath, max_size, no_cache)
            except _Retry as e:
                self._count(src, failures=1)
                pause = s.backoff * (2 ** (attempt - 1)) * random.uniform(0.5, 1.5)
                if e.retry_after.isdigit():
                    pause = max(pause, float(e.retry_after))
                if attempt == s.tries or waited + pause > s.backoff_total:
                    raise _Down(f"HTTP {e.status} after {attempt} tries") from None
                time.sleep(pause)
                waited += pause
        raise AssertionError("unreachable")  # the loop returns or raises

    # the failure sequence --------------------------------------------------------------
    def get(self, relpath: str, *, check: Check | None = None, max_size: int) -> bytes:
        """The bytes of ``relpath`` that pass ``check`` (module docstring: the sequence)."""
        check_relpath(relpath)
        bad: list[str] = []
        failed: list[str] = []
        for src in self.sources:
            with self._lock:
                down = self._down.get(src)
            if down is not None:
                failed.append(f"{src.url(relpath)}: {down}")
                continue
            for no_cache in (False, True):
                try:
                    data = self._read(src, relpath, max_size, no_cache)
                except _Missing as e:
                    self._count(src, failures=1)
                    failed.append(f"{src.url(relpath)}: {e}")
                    break
                except _Down as e:
                    self._count(src, failures=1)
                    with self._lock:
                        self._down.setdefault(src, str(e))
                    failed.append(f"{src.url(relpath)}: {e}")
                    break
                except _TooBig:
                    why = f"larger than {max_size} bytes"
                else:
                    if check is None or check(data):
                        return data
                    why = "bytes do not match"
                self._count(src, bad=1)
                if no_cache or src.is_dir:  # a file reads the same twice
                    bad.append(f"{src.url(relpath)} ({why}"
                               f"{', also with no-cache' if no_cache else ''})")
                    break
        if bad:
            rest = f"; {'; '.join(failed)}" if failed else ""
            raise IntegrityError(f"{relpath}: no good copy: served bad by "
                                 f"{', '.join(bad)}{rest}",
                                 hint="a cache or mirror keeps a broken copy, or the registry "
                                      "itself is damaged: tell its publisher")
        raise RegistryError(f"cannot fetch {relpath}: {'; '.join(failed)}")

    def get_many(self, items: Iterable[tuple[str, Check | None, int]], *,
                 concurrency: int = 8) -> Iterator[tuple[str, bytes]]:
        """``(relpath, bytes)`` for each ``(relpath, check, max_size)``, in the order they
        complete, ``concurrency`` at a time; the first failure is raised (the rest are
        cancelled; requests under way end within their timeouts)."""
        concurrency = max(1, min(concurrency, 32))
        it = iter(items)
        with ThreadPoolExecutor(concurrency, thread_name_prefix="jbl-fetch") as pool:
            pending: dict[Future[bytes], str] = {}
            try:
                while True:
                    while len(pending) < 2 * concurrency:
                        item = next(it, None)
                        if item is None:
                            break
                        relpath, check, size = item
                        fut = pool.submit(self.get, relpath, check=check, max_size=size)
                        pending[fut] = relpath
                    if not pending:
                        return
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        relpath = pending.pop(fut)
                        yield relpath, fut.result()
            finally:
                for fut in pending:
                    fut.cancel()


class _Retry(Exception):
    def __init__(self, status: int, retry_after: str) -> None:
        super().__init__(status)
        self.status = status
        self.retry_after = retry_after.strip()


def http_reason(e: httpx.HTTPError) -> str:
    """An httpx failure in a few words (one place: the registry client says it too)."""
    if isinstance(e, httpx.TimeoutException):
        return "timed out"
    if isinstance(e, httpx.ConnectError):
        return f"cannot connect ({e})" if str(e) else "cannot connect"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


# --- publishing targets ----------------------------------------------------------------------
class Target(Protocol):
    """Where ``jbl registry add`` publishes: write objects, packs, trees, then ``sync``, then
    registry.json last, so no cache ever stores a "not found" for something about to exist.
    ``get`` reads back a file the target holds (None: absent or over ``max_size``)."""

    label: str

    def put(self, relpath: str, data: bytes, *, immutable: bool) -> None: ...

    def exists(self, relpath: str) -> bool: ...

    def get(self, relpath: str, max_size: int) -> bytes | None: ...

    def sync(self) -> None: ...


class DirTarget:
    """A registry directory: each file written as a new temporary file in its directory and
    renamed into place (mode 0644, directories 0755); ``sync`` is one ``syncfs`` for all of
    them (not an fsync per object), before registry.json is written."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.label = self.path

    def _dir_fd(self, parts: Sequence[str], create: bool) -> int:
        if create:
            os.makedirs(self.path, 0o755, exist_ok=True)
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for d in parts:
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(d, 0o755, dir_fd=fd)
                nfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                              dir_fd=fd)
                os.close(fd)
                fd = nfd
            return fd
        except BaseException:
            os.close(fd)
            raise

    def put(self, relpath: str, data: bytes, *, immutable: bool) -> None:
        *parts, name = check_relpath(relpath).split("/")
        try:
            dfd = self._dir_fd(parts, create=True)
        except OSError as e:
            raise RegistryError(f"cannot write {self.path}/{relpath}: {e.strerror}") from None
        tmp = f".tmp-{os.getpid()}-{os.urandom(6).hex()}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW |
                         os.O_CLOEXEC, 0o644, dir_fd=dfd)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fchmod(fd, 0o644)
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise RegistryError(f"cannot write {self.path}/{relpath}: {e.strerror}") from None
        finally:
            os.close(dfd)

    def exists(self, relpath: str) -> bool:
        *parts, name = check_relpath(relpath).split("/")
        try:
            dfd = self._dir_fd(parts, create=False)
        except OSError:
            return False
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            return stat.S_ISREG(st.st_mode)
        except OSError:
            return False
        finally:
            os.close(dfd)


    def get(self, relpath: str, max_size: int) -> bytes | None:
        try:
            return read_dir_file(self.path, check_relpath(relpath), max_size)
        except (_Missing, _Down, _TooBig):
            return None

    def sync(self) -> None:
        from .blobs import _syncfs

        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            _syncfs(fd)
        except OSError as e:
            raise RegistryError(f"cannot flush {self.path}: {e.strerror}") from None
        finally:
            os.close(fd)


class S3Target:
    """An S3-compatible bucket (``s3://BUCKET/PREFIX``) written with boto3; ``endpoint`` is
    the API endpoint (None: boto3's own choice, e.g. ``AWS_ENDPOINT_URL``)."""

    def __init__(self, url: str, endpoint: str | None = None) -> None:
        parts = urlsplit(url)
        self.bucket, self.prefix = parts.netloc, parts.path.strip("/")
        self.label = url
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise UsageError(f"publishing to {url} needs boto3: pip install 'jbl[s3]'") \
                from None
        cfg = Config(request_checksum_calculation="when_required",
                     response_checksum_validation="when_required",
                     retries={"max_attempts": 5, "mode": "standard"},
                     connect_timeout=10, read_timeout=60)
        self._client: Any = boto3.client("s3", endpoint_url=endpoint, config=cfg)

    def _key(self, relpath: str) -> str:
        check_relpath(relpath)
        return f"{self.prefix}/{relpath}" if self.prefix else relpath

    def put(self, relpath: str, data: bytes, *, immutable: bool) -> None:
        ctype = "application/json" if relpath.endswith(".json") else \
            "application/octet-stream"
        try:
            self._client.put_object(Bucket=self.bucket, Key=self._key(relpath), Body=data,
                                    ContentType=ctype,
                                    CacheControl=IMMUTABLE if immutable else MUTABLE)
        except Exception as e:  # botocore's errors: no common base worth importing here
            raise RegistryError(f"cannot upload {self.label}/{relpath}: {_s3_reason(e)}") \
                from None

    def put_file(self, relpath: str, path: Path, *, immutable: bool) -> None:
        """A large file (a tarball) uploaded from disk in parts, never read whole."""
        try:
            self._client.upload_file(str(path), self.bucket, self._key(relpath), ExtraArgs={
                "ContentType": "application/octet-stream",
                "CacheControl": IMMUTABLE if immutable else MUTABLE})
        except OSError as e:
            raise UsageError(f"cannot read {path}: {e.strerror}") from None
        except Exception as e:
            raise RegistryError(f"cannot upload {self.label}/{relpath}: {_s3_reason(e)}") \
                from None

    def exists(self, relpath: str) -> bool:
        try:
            self._client.head_object(Bucket=self.bucket, Key=self._key(relpath))
            return True
        except Exception as e:
            if _s3_code(e) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise RegistryError(f"cannot check {self.label}/{relpath}: {_s3_reason(e)}") \
                from None


    def get(self, relpath: str, max_size: int) -> bytes | None:
        try:
            r = self._client.get_object(Bucket=self.bucket, Key=self._key(relpath))
        except Exception as e:
            if _s3_code(e) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise RegistryError(f"cannot read {self.label}/{relpath}: {_s3_reason(e)}") \
                from None
        body = r["Body"]
        try:
            if int(r.get("ContentLength") or 0) > max_size:
                return None
            data: bytes = body.read(max_size + 1)
        finally:
            body.close()
        return data if len(data) <= max_size else None

    def sync(self) -> None:
        """Nothing to do: an upload is durable when put_object returns."""


def _s3_code(e: Exception) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))


def _s3_reason(e: Exception) -> str:
    err = getattr(e, "response", {}).get("Error", {}) if hasattr(e, "response") else {}
    if err:
        return f"{err.get('Code', '?')}: {err.get('Message', '')}".strip()
    return f"{type(e).__name__}: {e}"


def target_for(location: str, *, s3_endpoint: str | None = None) -> Target:
    """The publishing target ``location`` names: ``s3://BUCKET/PREFIX`` or a directory."""
    if location.startswith("s3://"):
        return S3Target(location, s3_endpoint)
    if "://" in location and not location.startswith("file://"):
        raise UsageError(f"cannot publish to {location!r}: use a directory or s3://BUCKET/…")
    path = unquote(urlsplit(location).path) if location.startswith("file://") else location
    return DirTarget(path)
