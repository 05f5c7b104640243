"""The benchmark series' wheel download step (benchmarks/series.py) from an empty cache.

A fresh clone's `make bench` fetches every pinned wheel of the series, which holds several
versions of one distribution (joblib 1.3.2 and 1.4.2). Current pip refuses those in one
``pip download`` call even with ``--no-deps``; these tests run the real pip against a real PEP
503 index served on 127.0.0.1 (tiny wheels built here), so they need no internet.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from benchmarks.series import SERIES, SetupError, _find_wheel, download_batches, download_wheels

WHEELS = [("joblib", "1.3.2"), ("joblib", "1.4.2"), ("threadpoolctl", "3.2.0")]


def _wheel(out: Path, dist: str, ver: str) -> Path:
    """A minimal valid pure-Python wheel (metadata only)."""
    name = f"{dist}-{ver}"
    path = out / f"{name}-py3-none-any.whl"
    files = {
        f"{name}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {ver}\n",
        f"{name}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\n"
                                   "Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{n},,\n" for n in files) + f"{name}.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for n, body in files.items():
            z.writestr(n, body)
        z.writestr(f"{name}.dist-info/RECORD", record)
    return path


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture
def index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A simple index on 127.0.0.1 holding WHEELS; pip's own config and env are cut off."""
    root = tmp_path / "index"
    files = root / "files"
    files.mkdir(parents=True)
    for dist, ver in WHEELS:
        _wheel(files, dist, ver)
    for dist in {d for d, _ in WHEELS}:
        links = "".join(
            f'<a href="../../files/{w.name}#sha256={hashlib.sha256(w.read_bytes()).hexdigest()}">'
            f"{w.name}</a>\n" for w in sorted(files.glob(f"{dist}-*.whl")))
        (root / "simple" / dist).mkdir(parents=True)
        (root / "simple" / dist / "index.html").write_text(f"<html><body>{links}</body></html>")

    def handler(*a: object, **kw: object) -> _Quiet:
        return _Quiet(*a, directory=str(root), **kw)  # type: ignore[arg-type]

    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    for k in [k for k in os.environ if k.startswith("PIP_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)   # no machine-wide mirrors or find-links
    url = f"http://127.0.0.1:{srv.server_address[1]}/simple"
    monkeypatch.setenv("PIP_INDEX_URL", url)
    try:
        yield url
    finally:
        srv.shutdown()
        srv.server_close()


def test_batches_name_each_distribution_once() -> None:
    wanted = sorted({(d, v) for ver in SERIES for d, v in SERIES[ver].items()})
    batches = download_batches(wanted)
    for b in batches:
        dists = [r.split("==")[0] for r in b]
        assert len(dists) == len(set(dists)), b
    assert sorted(tuple(r.split("==")) for b in batches for r in b) == wanted
    most = max(sum(1 for d, _ in wanted if d == dist) for dist, _ in wanted)
    assert len(batches) == most          # as few pip calls as the most-bumped package allows


def test_pip_refuses_two_versions_in_one_call(index: str, tmp_path: Path) -> None:
    """The premise: one call with both joblibs fails, each alone works (real pip, local index)."""
    both = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                           "-d", str(tmp_path / "one"), "joblib==1.3.2", "joblib==1.4.2"],
                          capture_output=True, text=True)
    assert both.returncode != 0 and "joblib" in both.stderr
    alone = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                            "-d", str(tmp_path / "one"), "joblib==1.3.2"],
                           capture_output=True, text=True)
    assert alone.returncode == 0, alone.stderr


def test_download_into_empty_cache_then_reuse(index: str, tmp_path: Path) -> None:
    wheels = tmp_path / "cache" / "wheels"
    download_wheels(wheels, WHEELS)
    for dist, ver in WHEELS:
        assert _find_wheel(wheels, dist, ver) is not None, (dist, ver)
    assert not (wheels / ".download").exists()
    before = {w.name: w.stat().st_mtime_ns for w in wheels.iterdir()}
    # every wheel cached: no pip call at all, so it works with the index gone
    os.environ["PIP_INDEX_URL"] = "http://127.0.0.1:9/simple"
    download_wheels(wheels, WHEELS)
    assert {w.name: w.stat().st_mtime_ns for w in wheels.iterdir()} == before


def test_unavailable_pin_is_one_clear_error(index: str, tmp_path: Path) -> None:
    wheels = tmp_path / "cache" / "wheels"
    download_wheels(wheels, WHEELS[:1])
    kept = sorted(p.name for p in wheels.iterdir())
    with pytest.raises(SetupError) as e:
        download_wheels(wheels, [*WHEELS, ("joblib", "9.9.9")])
    msg = str(e.value)
    assert "joblib==9.9.9" in msg and "\n" not in msg and "rerun" in msg
    # wheels fetched before the failure stay; no half-written download is left
    assert set(kept) <= {p.name for p in wheels.iterdir()}
    assert not (wheels / ".download").exists()
