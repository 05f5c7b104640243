"""Servers for the transport and fleet tests, all on 127.0.0.1 and random free ports:

* ``ScriptedServer``: a small HTTP/1.1 server (keep-alive) serving a dict of files, told
  per path what to do next (serve bad bytes, answer 503/429, trickle, vanish) and logging
  every request with its headers and connection;
* ``ForwardProxy``: a minimal forward HTTP proxy (absolute-URI GETs) that logs what it
  forwarded, to prove the proxy settings are honoured;
* fixtures for the real servers ``docs/fleet.md`` configures: nginx as the origin
  (``nginx_origin``), squid as the cache in front of it (``squid_cache``), both started from
  the config files in ``docs/fleet/`` with only ports and paths filled in, and moto's server
  mode as the S3 API (``s3_server``). Each is killed and its directory removed afterwards; a
  fixture skips only when its program is not installed (``make test`` installs them).
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FLEET_DOCS = ROOT / "docs" / "fleet"
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class Logged:
    path: str
    headers: dict[str, str]
    conn: int  # which TCP connection (a counter per accepted socket)


@dataclass
class Script:
    """What the server does for requests of a path, one action per request, then serves the
    file: ``"bad"`` (flipped bytes), ``"503"``, ``"429"``, ``"404"``, ``"403"``, ``"trickle"`` (one
    byte every ``trickle_gap`` s), ``"big"`` (the file plus extra bytes)."""

    actions: list[str] = field(default_factory=list)


class ScriptedServer:
    def __init__(self, files: dict[str, bytes] | None = None, *, trickle_gap: float = 0.3,
                 chunk_gap: float = 0.0) -> None:
        self.files: dict[str, bytes] = dict(files or {})
        self.scripts: dict[str, list[str]] = {}
        self.always: dict[str, str] = {}  # path -> an action for every request
        # after this many requests for objects/ and packs/, the server goes away mid-request
        self.vanish_after: int | None = None
        self._served = 0
        self.log: list[Logged] = []
        self.trickle_gap = trickle_gap
        self.chunk_gap = chunk_gap  # seconds between 256-byte chunks (0: one write)
        self.lock = threading.Lock()
        self._conns = 0
        self._socks: list[socket.socket] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with outer.lock:
                    outer._conns += 1
                    self.conn_no = outer._conns
                    outer._socks.append(self.connection)

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                outer._serve(self)

        self.httpd = http.server.ThreadingHTTPServer((HOST, 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://{HOST}:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def connections(self) -> int:
        return self._conns

    def script(self, path: str, *actions: str) -> None:
        with self.lock:
            self.scripts.setdefault(path.lstrip("/"), []).extend(actions)

    def serve_dir(self, root: Path) -> None:
        """Serve every regular file under ``root`` (a published registry) as it is now."""
        for p in root.rglob("*"):
            if p.is_file() and not p.is_symlink():
                self.files[str(p.relative_to(root))] = p.read_bytes()

    def requests_for(self, path: str) -> list[Logged]:
        return [r for r in self.log if r.path == path.lstrip("/")]

    def _serve(self, h: http.server.BaseHTTPRequestHandler) -> None:
        path = h.path.split("?", 1)[0]
        if path.startswith("http://"):  # absolute form (from a proxy)
            path = "/" + path.split("/", 3)[3]
        path = path.lstrip("/")
        with self.lock:
            self.log.append(Logged(path, {k.lower(): v for k, v in h.headers.items()},
                                   getattr(h, "conn_no", 0)))
            queue = self.scripts.get(path, [])
            action = queue.pop(0) if queue else self.always.get(path, "")
            if path.startswith(("objects/", "packs/")):
                self._served += 1
                if self.vanish_after is not None and self._served > self.vanish_after:
                    action = "vanish"
        if action == "vanish":  # no answer; every connection closed, the port refused
            threading.Thread(target=self.disappear, daemon=True).start()
            h.close_connection = True
            with contextlib.suppress(OSError):
                h.connection.shutdown(socket.SHUT_RDWR)
            return
        body = self.files.get(path)
        if action in ("503", "429", "404", "403") or body is None:
            code = int(action) if action else 404
            h.send_response(code)
            if code == 429:
                h.send_header("Retry-After", "0")
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        if action == "bad":
            body = bytes([body[0] ^ 0xFF]) + body[1:] if body else b"x"
        elif action == "big":
            body = body + b"\0" * 4096
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.send_header("Content-Type", "application/octet-stream")
        h.end_headers()
        try:
            if action == "trickle":
                for i in range(len(body)):
                    h.wfile.write(body[i:i + 1])
                    h.wfile.flush()
                    time.sleep(self.trickle_gap)
            elif self.chunk_gap:
                for i in range(0, len(body), 256):
                    h.wfile.write(body[i:i + 256])
                    h.wfile.flush()
                    time.sleep(self.chunk_gap)
            else:
                h.wfile.write(body)
        except OSError:
            pass  # the client gave up (the stall rule shut its socket)

    def disappear(self) -> None:
        """Stop listening and close every connection: later ones are refused."""
        self.httpd.shutdown()
        self.httpd.server_close()
        with self.lock:
            for sock in self._socks:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        if self.thread.is_alive():
            self.disappear()


class ForwardProxy:
    """A forward HTTP proxy for absolute-URI GETs to 127.0.0.1, logging each URL."""

    def __init__(self) -> None:
        self.log: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                outer.log.append(self.path)
                rest = self.path.split("://", 1)[1]
                hostport, _, path = rest.partition("/")
                host, _, port = hostport.partition(":")
                if host != HOST:  # never anywhere but this machine's loopback
                    self.send_response(403)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                c = http.client.HTTPConnection(host, int(port or 80), timeout=10)
                c.request("GET", "/" + path, headers={"Cache-Control":
                                                      self.headers.get("Cache-Control", "")})
                r = c.getresponse()
                body = r.read()
                c.close()
                self.send_response(r.status)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Via", "1.1 test-proxy")
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer((HOST, 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://{HOST}:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, log: Path | None = None,
              timeout: float = 20.0) -> None:
    """Until something accepts on ``port`` (the process still alive), at most ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            text = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} exited with {proc.returncode}: {text}")
        with socket.socket() as s:
            if s.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout}s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


# --- the real servers of docs/fleet.md ---------------------------------------------------------
def program(name: str, package: str) -> str:
    """The path of ``name``, or a skip saying it is not installed (``make test`` installs
    ``package``)."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if path is None:
        pytest.skip(f"{name} is not installed (make test installs the {package} package)")
    return path


def render(template: Path, dest: Path, **values: str) -> Path:
    """``template`` with each ``@KEY@`` replaced; every placeholder must be filled."""
    text = template.read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    assert "@" not in "".join(line.split("#", 1)[0] for line in text.splitlines()), \
        f"{template} has a placeholder the test did not fill"
    dest.write_text(text)
    return dest


def world_dir(prefix: str, *, memory: bool = False) -> Path:
    """A new directory every user can reach (nginx's and squid's workers are not root);
    ``memory``: on /dev/shm when there is one (squid's 4096 cache directories are made and
    removed in a blink there, seconds on a busy disk)."""
    shm = "/dev/shm" if memory and os.path.isdir("/dev/shm") else None
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=shm))
    d.chmod(0o755)
    return d


@dataclass
class Origin:
    url: str
    root: Path
    access_log: Path

    def requests(self) -> list[tuple[str, int]]:
        """(path, status) of each request nginx logged, in order."""
        return [(path, status) for path, status, _ in self.served()]

    def served(self) -> list[tuple[str, int, int]]:
        """(path, status, body bytes sent) of each request nginx logged, in order."""
        out = []
        if self.access_log.exists():
            for line in self.access_log.read_text().splitlines():
                request = line.split('"')[1]
                status, sent = line.split('"')[2].split()[:2]
                out.append((request.split()[1], int(status), int(sent)))
        return out


@contextlib.contextmanager
def nginx_origin(root: Path) -> Iterator[Origin]:
    """nginx serving ``root`` with docs/fleet/nginx.conf on a free 127.0.0.1 port."""
    exe = program("nginx", "nginx-light")
    prefix = world_dir("jbl-nginx-")
    port = free_port()
    try:
        conf = render(FLEET_DOCS / "nginx.conf", prefix / "nginx.conf",
                      LISTEN=f"{HOST}:{port}", ROOT=str(root), PREFIX=str(prefix))
        proc = subprocess.Popen([exe, "-p", str(prefix), "-c", str(conf), "-e",
                                 str(prefix / "error.log"), "-g", "daemon off;"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            wait_port(port, proc, "nginx", prefix / "error.log")
            yield Origin(f"http://{HOST}:{port}", root, prefix / "access.log")
        finally:
            stop(proc)
    finally:
        shutil.rmtree(prefix, ignore_errors=True)


@dataclass
class Cache:
    url: str
    prefix: Path
    port: int
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        wait_port(self.port, self.proc, "squid", self.prefix / "cache.log", timeout=30)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None

    def restart(self, meanwhile: Callable[[], None]) -> None:
        """Stop squid (it writes its index), run ``meanwhile``, start it on the same cache."""
        self.stop()
        meanwhile()
        self.start()


@contextlib.contextmanager
def squid_cache() -> Iterator[Cache]:
    """squid with docs/fleet/squid.conf on a free 127.0.0.1 port (a fresh, empty cache)."""
    exe = program("squid", "squid")
    prefix = world_dir("jbl-squid-", memory=True)
    port = free_port()
    try:
        conf = render(FLEET_DOCS / "squid.conf", prefix / "squid.conf",
                      LISTEN=f"{HOST}:{port}", PREFIX=str(prefix))
        (prefix / "cache").mkdir()
        shutil.chown(prefix, "proxy", "proxy")
        shutil.chown(prefix / "cache", "proxy", "proxy")
        subprocess.run([exe, "-z", "-N", "-f", str(conf)], check=True, timeout=60,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cache = Cache(f"http://{HOST}:{port}", prefix, port, [exe, "-N", "-f", str(conf)])
        try:
            cache.start()
            yield cache
        finally:
            cache.stop()
    finally:
        shutil.rmtree(prefix, ignore_errors=True)


@dataclass
class S3Server:
    endpoint: str
    env: dict[str, str]  # credentials for boto3 (moto accepts any)


@contextlib.contextmanager
def moto_s3() -> Iterator[S3Server]:
    """moto's S3 API in server mode (``moto_server``, from the ``test`` extra) on a free
    127.0.0.1 port; a fresh, empty server."""
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("moto_server is not installed (pip install 'moto[server]': the test extra)")
    port = free_port()
    proc = subprocess.Popen([exe, "-H", HOST, "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_port(port, proc, "moto_server", timeout=60)
        yield S3Server(f"http://{HOST}:{port}",
                       {"AWS_ACCESS_KEY_ID": "fleet-test", "AWS_SECRET_ACCESS_KEY": "fleet-test",
                        "AWS_DEFAULT_REGION": "us-east-1"})
    finally:
        stop(proc)


def public_bucket(s3: S3Server, bucket: str) -> None:
    """Create ``bucket`` with the read-only public policy docs/fleet.md gives."""
    import boto3

    c = boto3.client("s3", endpoint_url=s3.endpoint, aws_access_key_id="fleet-test",
                     aws_secret_access_key="fleet-test", region_name="us-east-1")
    c.create_bucket(Bucket=bucket)
    c.put_bucket_policy(Bucket=bucket, Policy=json.dumps(
        {"Version": "2012-10-17", "Statement": [
            {"Sid": "FleetRead", "Effect": "Allow", "Principal": "*",
             "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{bucket}/*"}]}))
