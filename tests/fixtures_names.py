"""Runtimes and helpers for the network and identity tests (test_job_network.py,
test_job_identity.py).

``names_runtime(dest, etc)`` builds a real runtime with ``rtbuild`` plus the host's
``getent`` (copied with its libraries, as rtbuild copies binaries) and an nsswitch.conf
that asks files before DNS: a name lookup in these tests never leaves the machine.
``etc`` replaces the runtime's /etc files (None removes /etc entirely). ``tree`` takes a
byte-exact snapshot of a runtime, to show jbl changed nothing in it. ``LocalServer`` is an
HTTP server on 127.0.0.1 that counts the requests it got.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rtbuild import _copy_file, build_runtime

NSSWITCH = b"passwd: files\ngroup: files\nhosts: files dns\n"


def names_runtime(dest: Path, etc: dict[str, bytes] | None, name: str = "namert") -> Path:
    """A runtime at ``dest``; its /etc holds exactly ``etc`` (+ nsswitch.conf), or nothing
    at all when ``etc`` is None."""
    build_runtime(dest, name, "1.0.0")
    iso = dest / "isolated"
    _copy_file("/usr/bin/getent", iso)
    shutil.rmtree(iso / "etc")
    if etc is not None:
        (iso / "etc").mkdir()
        for rel, data in {"nsswitch.conf": NSSWITCH, **etc}.items():
            (iso / "etc" / rel).write_bytes(data)
    for p in [dest, *dest.rglob("*")]:  # other users run jobs in it too
        if not p.is_symlink():
            p.chmod(p.stat().st_mode | 0o444 | (0o111 if p.is_dir() else 0))
    return dest


def tree(root: Path) -> dict[str, tuple[int, str]]:
    """Every entry under ``root``: (mode, sha256 of the content or the link target)."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        if p.is_symlink():
            data = os.readlink(p).encode()
        elif p.is_file():
            data = p.read_bytes()
        else:
            data = b""
        out[str(p.relative_to(root))] = (st.st_mode, hashlib.sha256(data).hexdigest())
    return out


class LocalServer:
    """An HTTP server on 127.0.0.1 (a free port) answering ``token`` to every GET."""

    def __init__(self, token: str) -> None:
        self.token = token.encode()
        self.hits = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
                server.hits += 1
                self.send_response(200)
                self.send_header("Content-Length", str(len(server.token)))
                self.end_headers()
                self.wfile.write(server.token)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]

    @contextmanager
    def running(self) -> Iterator[LocalServer]:
        t = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        t.start()
        try:
            yield self
        finally:
            self.httpd.shutdown()
            self.httpd.server_close()
            t.join(5)


def fetch_script(url: str) -> str:
    """Python for the job: one bounded GET of ``url``; prints the body or the error."""
    return ("import urllib.request\n"
            "try:\n"
            f"    print(urllib.request.urlopen({url!r}, timeout=5).read().decode())\n"
            "except Exception as e:\n"
            "    print('failed:', type(e).__name__, e)\n")
