"""The fleet simulation (benchmarks/fleetsim.py) counts what the store and the form really hold.

Its objects must be the store's blobs (same chunk names, same stored sizes: a real ``jbl store
import`` of the same tree is the reference), and its fetch and fleet arithmetic must follow the
policy it claims: an update fetches only what is new, a pack is taken whole when that is cheaper,
a shared cache makes the origin's bytes independent of the node count.
"""

from __future__ import annotations

import os
import random
import subprocess
import time
from pathlib import Path

from conftest import run_jbl

from benchmarks import fleetsim

MANIFEST = ("name: fleetrt\nversion: {v}\ndescription: fleet simulation test\n"
            "mounts:\n  - source: isolated\n    target: /\n    readonly: true\n")


def _runtime(root: Path, version: str, seed: int, changed: int = 0) -> Path:
    """A runtime with a large file (whole chunks raw and zstd, a short tail), small files of
    every codec kind (``changed`` of them, and the large file's second chunk and tail, differ
    from seed 0's)."""
    rnd = random.Random(seed)
    iso = root / "isolated"
    (iso / "lib").mkdir(parents=True)
    (root / "runtime.yml").write_text(MANIFEST.format(v=version))
    noise = random.Random(1).randbytes(1 << 20)           # incompressible: kept raw
    mark = seed if changed else 0
    middle = (b"middle %d\n" % mark * (1 << 17))[:1 << 20]
    tail = b"tail %d\n" % mark * 60_000
    (iso / "lib/big.bin").write_bytes(noise + middle + tail)   # 2 whole chunks + a tail
    barely = bytearray(random.Random(2).randbytes(50_000))
    barely[:1500] = bytes(1500)                           # saves < 5 %: kept raw
    (iso / "lib/barely.bin").write_bytes(bytes(barely))
    (iso / "lib/tiny").write_bytes(b"short")               # under 64 bytes: raw
    (iso / "lib/empty").write_bytes(b"")                   # no chunk at all
    for i in range(60):
        body = random.Random(100 + i).randbytes(20_000)    # stored raw: sizes exact
        if i < changed:
            body = rnd.randbytes(20_000)
        (iso / f"lib/m{i:03d}.py").write_bytes(body)
    (iso / "lib/text.py").write_text("import os\n" * 3000)  # compresses: zstd
    (iso / "lib/copy.py").write_text("import os\n" * 3000)  # the same content once
    os.symlink("big.bin", iso / "lib/link")
    return root


def test_scan_objects_are_the_blobs_a_real_import_stores(tmp_path: Path,
                                                         store_dir: Path) -> None:
    src = _runtime(tmp_path / "rt", "1.0.0", 0)
    tarball = tmp_path / "rt.tar.gz"
    run_jbl("pack", src, "-o", tarball).ok()
    run_jbl("store", "import", tarball, store=store_dir).ok()
    blobs = {f"{shard.name}{f.name}": f.stat().st_size
             for shard in (store_dir / "blobs").iterdir() if len(shard.name) == 2
             for f in shard.iterdir()}
    scan = fleetsim.scan(src, "1.0.0", {})
    assert {d: n for d, (n, _big) in scan.objects.items()} == blobs
    big = subprocess.run(["sha256sum", str(src / "isolated/lib/big.bin")], check=True,
                         capture_output=True, text=True).stdout.split()[0]
    assert big not in scan.objects                         # chunks, not the whole file
    assert sum(b for _n, b in scan.objects.values()) == 2     # the tail is a small object
    assert scan.objects[_sha(b"short")] == (5, False)
    assert scan.objects[_sha(src / "isolated/lib/barely.bin")] == (50_000, False)
    assert scan.objects[_sha(src / "isolated/lib/text.py")][0] < 30_000 // 10


def _sha(x: bytes | Path) -> str:
    import hashlib
    return hashlib.sha256(x if isinstance(x, bytes) else x.read_bytes()).hexdigest()


def test_updates_fetch_what_is_new_packs_whole_when_cheaper_and_caches_flatten(
        tmp_path: Path) -> None:
    scans = [fleetsim.scan(_runtime(tmp_path / "v1", "1.0.0", 0), "1.0.0", {}),
             fleetsim.scan(_runtime(tmp_path / "v2", "2.0.0", 7, changed=10), "2.0.0", {})]
    pub = fleetsim.publish(scans)
    assert len(pub.packs_of_version[0]) == 1 and len(pub.packs_of_version[1]) == 1
    assert all(size <= fleetsim.PACK_MAX for size in pub.pack_bytes)
    # 1.0's delta pack is all of it: no full set; 2.0's cold install through 1.0's pack and
    # its own delta would take 10 superseded files and one request more: a full set of its own
    assert pub.full[0] == [] and pub.full[1] == [2]
    small = {d for d, (_n, big) in scans[1].objects.items() if not big}
    assert set(pub.packs[2]) == small

    update = fleetsim.fetch_plan(scans[1], pub, set(scans[0].objects), 1)
    new = {d: n for d, (n, _b) in scans[1].objects.items() if d not in scans[0].objects}
    # 10 files, runtime.yml (its version line), the large file's tail and its middle chunk
    assert len(new) == 13 and update.lacking == sum(new.values())
    # the 12 small ones come as their version's delta pack, the changed whole chunk alone
    assert sorted(u for u in update.urls if not u.startswith("objects/")) == [
        "packs/1", "registry.json@2.0.0", "trees/2.0.0"]
    assert update.bytes == sum(new.values()) + scans[1].tree_bytes + fleetsim.REGISTRY_JSON

    cold = fleetsim.fetch_plan(scans[1], pub, set(), 1)
    # a cold node takes 2.0's full set: its own small objects, nothing superseded
    assert sorted(u for u in cold.urls if u.startswith("packs/")) == ["packs/2"]
    assert cold.requests == 2 + 1 + 2                     # registry, tree, full set, 2 chunks
    assert cold.bytes == sum(n for n, _b in scans[1].objects.values()) + \
        scans[1].tree_bytes + fleetsim.REGISTRY_JSON
    before = fleetsim.FULL_TRIGGER
    try:  # without a full set, the same node takes 1.0's pack and 2.0's delta whole
        fleetsim.FULL_TRIGGER = float("inf")
        old = fleetsim.publish(scans)
        assert old.full == [[], []]
        cold_old = fleetsim.fetch_plan(scans[1], old, set(), 1)
        assert sorted(u for u in cold_old.urls if u.startswith("packs/")) == [
            "packs/0", "packs/1"] and cold_old.bytes > cold.bytes
    finally:
        fleetsim.FULL_TRIGGER = before

    sim = fleetsim.simulate(scans, [1000, 1000])
    rows = {r["nodes"]: r for r in sim["fleet"]}          # type: ignore[attr-defined]
    assert rows[1_000]["a"] == 1_000 * rows[1]["a"] and rows[1_000]["c"] == 1_000 * rows[1]["c"]
    assert rows[1_000]["b"] == rows[1]["b"] and rows[1_000]["d"] == rows[1]["d"]
    assert rows[1]["d"] == rows[1]["c"] == sum(r["update_bytes"]
                                               for r in sim["versions"])  # type: ignore[attr-defined]
    st = sim["storage"]                                    # type: ignore[index]
    assert st["full_sets"] == pub.pack_bytes[2] and st["tarballs"] == 2000
    out = fleetsim.rollout(sim, 1)
    assert out["d"] == update.bytes and out["lan_d"] == 1_000 * update.bytes


def test_the_bench_origin_counts_every_request_and_its_bytes(tmp_path: Path) -> None:
    """bench_fleet's figures are read from nginx's access log through ``Origin.since``."""
    import http.client

    from benchmarks.bench_fleet import HOST, origin

    (tmp_path / "root/cas/objects").mkdir(parents=True)
    (tmp_path / "root/cas/objects/ab").write_bytes(b"x" * 5000)
    with origin(tmp_path / "nginx", tmp_path / "root") as srv:
        assert srv.since() == []
        c = http.client.HTTPConnection(HOST, srv.port, timeout=10)
        for path in ("/cas/objects/ab", "/cas/objects/ab", "/cas/missing"):
            c.request("GET", path)
            c.getresponse().read()
        c.close()
        got: list[tuple[str, int, int]] = []
        deadline = time.monotonic() + 10  # nginx logs a request after answering it
        while len(got) < 3 and time.monotonic() < deadline:
            got += srv.since()
            time.sleep(0.01)
        assert got[:2] == [("/cas/objects/ab", 200, 5000)] * 2
        assert got[2][:2] == ("/cas/missing", 404)
        assert srv.since() == []                        # only what is new since the last call
