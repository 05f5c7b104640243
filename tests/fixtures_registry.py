"""Real registries for tests: tiny synthetic runtimes, a registry dir, and a local HTTP server.

``publish(regdir, name, version, ...)`` writes a small runtime tarball (runtime.yml + a few
files under isolated/) into ``regdir`` and adds it to ``regdir/registry.json`` in Joblet's
format with a relative download_url — the same layout ``jbl registry add`` writes — so tests
stay fast and can also publish deliberately wrong entries (bad checksum, other architecture).
``RegistryServer(dir)`` serves a directory over http on 127.0.0.1 from a thread and counts
the requests per path, so tests can tell a cache hit from a fetch.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

SHARED_SIZE = 256 * 1024  # a file every version of a runtime has, byte-identical
UNIQUE_SIZE = 128 * 1024  # a file only this version has (random: zstd cannot shrink it)
MTIME = 1_700_000_000


def runtime_files(name: str, version: str) -> dict[str, bytes]:
    """The files of a tiny synthetic runtime (paths relative to the runtime directory)."""
    manifest = (f"name: {name}\nversion: {version}\ndescription: tiny {name} {version}\n"
                "mounts:\n  - {source: isolated, target: /, readonly: true}\n"
                "environment: {PATH: /bin}\n")
    return {
        "runtime.yml": manifest.encode(),
        "isolated/bin/hello": f"#!/bin/sh\necho hello from {name} {version}\n".encode(),
        "isolated/etc/version": f"{version}\n".encode(),
        "isolated/lib/shared.bin": random.Random(f"shared-{name}").randbytes(SHARED_SIZE),
        "isolated/lib/unique.bin": random.Random(f"{name}@{version}").randbytes(UNIQUE_SIZE),
    }


def make_tarball(files: dict[str, bytes], out: Path,
                 extra: Iterable[tuple[tarfile.TarInfo, bytes]] = ()) -> Path:
    """A .tar.gz with the files (and their parent dirs) at the archive root, then the
    ``extra`` members as they are given (links, odd modes and owners: tests/cas_fixtures.py)."""
    dirs = sorted({str(Path(p).parents[i]) for p in files for i in range(len(Path(p).parts) - 1)}
                  - {"."})
    with tarfile.open(out, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        for d in dirs:
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, MTIME
            tar.addfile(ti)
        for path in sorted(files):
            ti = tarfile.TarInfo(path)
            ti.size, ti.mtime = len(files[path]), MTIME
            ti.mode = 0o755 if path.startswith("isolated/bin/") else 0o644
            tar.addfile(ti, io.BytesIO(files[path]))
        for ti, data in extra:
            tar.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
    return out


def sha256_file(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def publish(regdir: Path, name: str, version: str, *, platforms: list[str] | None = None,
            checksum: str | None = None, files: dict[str, bytes] | None = None,
            **override: Any) -> dict[str, Any]:
    """Add NAME@VERSION to ``regdir/registry.json``; return its entry. ``override`` replaces
    entry fields verbatim (``checksum=None`` keeps the true one; pass ``drop=[keys]`` to
    delete fields)."""
    regdir.mkdir(parents=True, exist_ok=True)
    tarball = make_tarball(files or runtime_files(name, version),
                           regdir / f"{name}-{version}.tar.gz")
    entry: dict[str, Any] = {
        "version": version, "description": f"tiny {name} {version}",
        "download_url": tarball.name, "checksum": checksum or sha256_file(tarball),
        "size": tarball.stat().st_size,
        "platforms": ["ubuntu-amd64", "ubuntu-arm64"] if platforms is None else platforms,
    }
    for key in override.pop("drop", []):
        entry.pop(key, None)
    entry.update(override)
    index = regdir / "registry.json"
    doc = json.loads(index.read_text()) if index.exists() else {
        "version": "1", "updated_at": "2025-01-01T00:00:00Z", "runtimes": {}}
    doc["runtimes"].setdefault(name, {})[version] = entry
    index.write_text(json.dumps(doc, indent=2))
    return entry


class _Handler(SimpleHTTPRequestHandler):
    def __init__(self, *args: Any, counter: Counter[str], **kw: Any) -> None:
        self.counter = counter
        super().__init__(*args, **kw)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.counter[self.path] += 1
        super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:  # quiet test output
        pass


class RegistryServer:
    """``http.server`` in a thread on 127.0.0.1:<free port>, serving ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.requests: Counter[str] = Counter()
        handler = partial(_Handler, directory=str(root), counter=self.requests)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.running = True

    def stop(self) -> None:
        if self.running:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join()
            self.running = False


@pytest.fixture
def registry_server(tmp_path: Path) -> Iterator[RegistryServer]:
    server = RegistryServer(tmp_path / "registry")
    yield server
    server.stop()
