"""``jbl store verify --repair`` downloads an http(s) source with the bounds every download has
(issue 10, 5): a server that streams forever stops at ``download.max_size``, one that trickles
is abandoned by the stall rule; either way one "cannot repair" line, exit 5, the store
unchanged and no file left in ``blobs/tmp``. The same repair from a healthy server works.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from conftest import Result, run_jbl
from fixtures_registry import make_tarball, runtime_files, sha256_file
from jbl.store.store import Store
from test_bounded_input import Hostile, env_for, state, tmp_files

CONFIG = "download: {max_size: 1M, speed_limit: 1K, speed_time: 2s}\n"


def jbl(tmp: Path, store: Path, *args: str) -> Result:
    return run_jbl(*args, store=store, env=env_for(tmp, CONFIG), timeout=60)


def test_repair_downloads_are_bounded_and_leave_nothing_behind(tmp_path: Path) -> None:
    store = tmp_path / "store"
    data = make_tarball(runtime_files("demo", "1.0.0"), tmp_path / "demo.tar.gz").read_bytes()
    checksum = sha256_file(tmp_path / "demo.tar.gz")
    server = Hostile()
    try:
        server.bytes_route("/demo.tar.gz", data)
        server.registry({"demo@1.0.0": {"download_url": "demo.tar.gz", "checksum": checksum,
                                        "size": len(data)}})
        jbl(tmp_path, store, "store", "install", "demo@1.0.0", "--registry", server.url).ok()
        with Store.open(store) as s:
            digest = max((bytes(d) for (d,) in s.db.query("SELECT digest FROM blobs")),
                         key=lambda d: s.blobs.path(d).stat().st_size)
            blob = s.blobs.path(digest)
        blob.unlink()  # damage: a missing blob the tarball can give back
        before = state(store, tmp_path)
        source = f"{server.url}demo.tar.gz"

        cases = [(b"", b"\0" * 65536, 0.0,  # no end: stops at download.max_size (1M)
                  "demo@1.0.0 from {source} is larger than 1.0M, the most jbl downloads for an "
                  "entry without a size (config download.max_size)"),
                 (data[:1], b"\0", 1.0,  # a byte a second: the stall rule (1K/s for 2s)
                  "cannot download demo@1.0.0 from {source}: stalled: less than 1.0K/s for "
                  "2.0s (config download.speed_limit, download.speed_time)")]
        for head, piece, pause, why in cases:
            server.stream_route("/demo.tar.gz", head, piece, pause)
            t0 = time.monotonic()
            r = jbl(tmp_path, store, "store", "verify", "--repair")
            assert time.monotonic() - t0 < 30
            assert r.rc == 5 and "Traceback" not in r.err, r.err
            assert len(r.err.strip().splitlines()) == 1, r.err  # verify's own summary
            lines = [ln for ln in r.out.splitlines() if ln.startswith("cannot repair")]
            assert lines == ["cannot repair demo@1.0.0: " + why.format(source=source)], r.out
            assert state(store, tmp_path) == before and tmp_files(store) == []
            assert not blob.exists()

        # the legitimate repair next to it: the same server, healthy again
        server.bytes_route("/demo.tar.gz", data)
        r = jbl(tmp_path, store, "store", "verify", "--repair").ok()
        assert f"repaired 1 blobs of demo@1.0.0 from {source}" in r.out
        assert blob.is_file() and tmp_files(store) == []
        jbl(tmp_path, store, "store", "verify", "--data").ok()
    finally:
        server.stop()
    assert os.listdir(store / "blobs" / "tmp") == []
