"""`jbl store verify`: a clean store passes; each kind of damage is one line naming the blob and
the versions using it, with exit status 5; `--data` catches what sizes cannot."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import run_jbl
from fixtures_gc import add_version, age, files_for, make_tarball
from jbl.store.blobs import BlobStore
from jbl.store.store import Store

SHARED = b"shared 3\n" * 50  # files_for(): in every version


@pytest.fixture
def damaged(tmp_path: Path) -> Path:
    """A store the test may break (not the auto-verified ``store_dir``)."""
    d = tmp_path / "damaged"
    add_version(d, "rt", "1.0.0")
    add_version(d, "rt", "1.1.0")
    add_version(d, "solo", "0.1.0", {"isolated/only.txt": b"only in solo\n" * 30})
    return d


def blob_of(store_dir: Path, data: bytes) -> tuple[str, Path]:
    import hashlib
    with Store.open(store_dir) as s:
        d = hashlib.sha256(data).digest()  # single-chunk file: blob digest == body digest
        assert s.db.scalar("SELECT 1 FROM blobs WHERE digest=?", (d,))
        return d.hex(), s.blobs.path(d)


def verify(store_dir: Path, *args: str) -> tuple[int, list[str], str]:
    r = run_jbl("store", "verify", *args, store=store_dir)
    assert "Traceback" not in r.err
    return r.rc, [ln for ln in r.out.splitlines() if ln.strip()], r.err


def test_a_clean_store_passes_with_a_one_line_summary(store_dir: Path) -> None:
    add_version(store_dir, "rt", "1.0.0")
    rc, lines, err = verify(store_dir, "--data")
    assert rc == 0 and err == ""
    assert len(lines) == 1 and lines[0].startswith("store OK: 1 versions")
    assert "data re-hashed" in lines[0]


def test_truncated_blob_is_named_with_every_version_using_it(damaged: Path) -> None:
    hexd, path = blob_of(damaged, SHARED)
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.truncate(10)
    rc, lines, err = verify(damaged)
    assert rc == 5
    stored = len(BlobStore.encode(SHARED)[1])
    assert lines == [f"blob {hexd}: file has 10 bytes, index says {stored} "
                     "(truncated or overwritten) (used by rt@1.0.0, rt@1.1.0)"]
    assert err.startswith("jbl: error: store verify found 1 problems (1 size)")
    assert len(err.strip().splitlines()) == 1


def test_flipped_byte_is_found_only_by_rehashing(damaged: Path) -> None:
    data = b"only in solo\n" * 30
    hexd, path = blob_of(damaged, data)
    os.chmod(path, 0o644)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    assert verify(damaged)[0] == 0  # sizes and references are all fine
    rc, lines, _ = verify(damaged, "--data")
    assert rc == 5
    assert len(lines) == 1 and lines[0].startswith(f"blob {hexd}: ")
    assert lines[0].endswith("(used by solo@0.1.0)")


def test_missing_blob(damaged: Path) -> None:
    hexd, path = blob_of(damaged, b"1.1.0 file 0\n" * 40)
    path.unlink()
    rc, lines, _ = verify(damaged)
    assert rc == 5 and lines == [f"blob {hexd}: file missing (used by rt@1.1.0)"]


def test_orphans_older_than_grace_are_problems_younger_ones_not(damaged: Path) -> None:
    blobs = BlobStore(damaged)
    digest = b"\xab" * 32
    blobs.write(digest, b"no row for me")
    assert verify(damaged)[0] == 0  # young: an install may be running
    age(blobs.path(digest), 3 * 3600)
    tmp = blobs.tmp / "abab.123"
    tmp.write_bytes(b"half a blob")
    age(tmp, 3 * 3600)
    rc, lines, _ = verify(damaged)
    assert rc == 5 and len(lines) == 2
    assert lines[0].startswith(f"blob {digest.hex()}: file without an index row, 3h old")
    # blobs.tmp is the directory pinned by an fd (/proc/self/fd/N); messages name the real path
    assert lines[1].startswith(f"{damaged / 'blobs' / 'tmp' / 'abab.123'}: stale temporary file")
    assert verify(damaged, "--grace", "4h")[0] == 0
    run_jbl("store", "gc", store=damaged).ok()  # gc is the cure
    assert verify(damaged)[0] == 0


def test_broken_references_are_reported(damaged: Path) -> None:
    with Store.open(damaged) as s, s.db.write():
        cid = s.db.scalar("SELECT content_id FROM entries e JOIN versions v ON "
                          "v.id=e.version_id WHERE v.name='solo' AND e.name=?",
                          (b"only.txt",))
        s.db.execute("DELETE FROM chunks WHERE content_id=?", (cid,))
    rc, lines, _ = verify(damaged)
    assert rc == 5
    assert lines == [f"content {cid}: 0 chunks (0..-1) of 0 bytes, index says 1 chunks of "
                     f"{len(b'only in solo' * 30) + 30} bytes (used by solo@0.1.0)"]


def test_json_report_lists_each_problem(damaged: Path) -> None:
    _hexd, path = blob_of(damaged, SHARED)
    path.unlink()
    r = run_jbl("store", "verify", "--json", store=damaged)
    assert r.rc == 5
    doc = json.loads(r.out)
    assert doc["ok"] is False
    assert [(p["kind"], p["versions"]) for p in doc["problems"]] == \
        [("missing", ["rt@1.0.0", "rt@1.1.0"])]


def test_repair_says_honestly_when_it_cannot(damaged: Path) -> None:
    _hexd, path = blob_of(damaged, SHARED)
    path.unlink()
    rc, lines, err = verify(damaged, "--repair")
    assert rc == 5
    assert any("cannot repair rt@1.0.0" in ln for ln in lines), lines
    assert len(err.strip().splitlines()) == 1


def test_verify_of_removed_but_unswept_versions_passes(store_dir: Path) -> None:
    """Rows of a removed version gone, blobs not yet swept: garbage, not damage."""
    add_version(store_dir, "rt", "1.0.0", files_for("1.0.0"))
    with Store.open(store_dir) as s, s.db.write():
        s.db.execute("DELETE FROM entries")
        s.db.execute("DELETE FROM versions")
    assert verify(store_dir, "--data")[0] == 0


def test_repair_rewrites_damaged_blobs_from_the_source_tarball(tmp_path: Path) -> None:
    store = tmp_path / "s"
    files = files_for("1.0.0", big=True)  # a multi-chunk body too
    tb = make_tarball(tmp_path, "rt", "1.0.0", files)
    run_jbl("store", "import", tb, store=store).ok()
    with Store.open(store) as s:
        digests = [bytes(d) for (d,) in s.db.query("SELECT digest FROM blobs ORDER BY id")]
        paths = [s.blobs.path(d) for d in digests]
    paths[0].unlink()  # missing
    os.chmod(paths[1], 0o644)
    raw = bytearray(paths[1].read_bytes())
    raw[0] ^= 0xFF  # same size, wrong bytes
    paths[1].write_bytes(bytes(raw))
    rc, lines, _ = verify(store, "--data", "--repair")
    assert rc == 0, lines
    assert lines[0] == f"repaired 2 blobs of rt@1.0.0 from {tb}"
    assert verify(store, "--data")[0] == 0
    # the tarball changed since: repair must refuse rather than write other bytes
    paths[0].unlink()
    tb.write_bytes(tb.read_bytes() + b"\0" * 512)
    rc, lines, _ = verify(store, "--repair")
    assert rc == 5 and "no longer has the installed checksum" in lines[0]
