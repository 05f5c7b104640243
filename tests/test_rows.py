"""store/rows.py (the one writer of index rows) and BlobStore's messages about the layout.

Every store here is checked by ``jbl store verify`` when the test ends (the store_dir fixture).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from conftest import run_jbl
from fixtures_gc import add_version, expected_hashes, files_for, hash_version
from jbl.store import rows
from jbl.store.store import Store


def test_a_version_written_through_rows_reads_back_byte_for_byte(store_dir: Path) -> None:
    files = files_for("1.0.0", big=True)
    vid = add_version(store_dir, "rt", "1.0.0", files)
    with Store.open(store_dir) as s:
        assert hash_version(s, vid) == expected_hashes(files, "rt", "1.0.0")
        info = s.version_by_id(vid)
        assert info is not None and info.file_count == len(files) + 1
    run_jbl("store", "verify", "--data", store=store_dir).ok()


def test_a_tree_without_exactly_one_root_is_refused_and_nothing_is_written(
        store_dir: Path) -> None:
    add_version(store_dir, "rt", "1.0.0")
    with Store.open(store_dir) as s:
        before = s.db.query("SELECT id, name, version FROM versions")
        nentries = s.db.scalar("SELECT count(*) FROM entries")
        first = rows.next_id(s.db, "entries")
        two_roots = [rows.EntryRow(first, None, b"", stat.S_IFDIR, 0o755),
                     rows.EntryRow(first + 1, None, b"", stat.S_IFDIR, 0o755)]
        for bad in ([], two_roots):
            with pytest.raises(ValueError, match="one root entry"), s.db.write():
                rows.insert_version_tree(s.db, rows.VersionRow("rt", "2.0.0", "", 0.0), bad)
        assert s.db.query("SELECT id, name, version FROM versions") == before
        assert s.db.scalar("SELECT count(*) FROM entries") == nentries
        # The legitimate tree next to it: one root is accepted.
        with s.db.write():
            vid = rows.insert_version_tree(s.db, rows.VersionRow("rt", "2.0.0", "", 0.0),
                                           two_roots[:1])
        assert s.db.scalar("SELECT root_id FROM versions WHERE id=?", (vid,)) == first


def test_dropping_a_versions_rows_keeps_what_another_version_shares(store_dir: Path) -> None:
    a = add_version(store_dir, "rt", "1.0.0")
    b = add_version(store_dir, "rt", "1.1.0")
    with Store.open(store_dir) as s:
        with s.db.write():
            rows.drop_version_rows(s.db, a)
        assert s.db.scalar("SELECT count(*) FROM entries WHERE version_id=?", (a,)) == 0
        assert s.version_by_id(a) is None
        assert hash_version(s, b) == expected_hashes(files_for("1.1.0"), "rt", "1.1.0")
    # What only 1.0.0 held is garbage now; gc takes it and 1.1.0 still verifies.
    run_jbl("store", "gc", "--grace", "0s", store=store_dir).ok()
    run_jbl("store", "verify", "--data", store=store_dir).ok()


def test_verify_names_a_planted_blob_link_without_following_it(store_dir: Path,
                                                                 tmp_path: Path) -> None:
    vid = add_version(store_dir, "rt", "1.0.0")
    secret = tmp_path / "secret"
    secret.write_bytes(b"not for the store")
    with Store.open(store_dir) as s:
        digest = bytes(s.db.scalar(
            "SELECT b.digest FROM entries e JOIN chunks c ON c.content_id = e.content_id "
            "JOIN blobs b ON b.id = c.blob_id WHERE e.version_id=? LIMIT 1", (vid,)))
        path = s.blobs.path(digest)
        saved = path.read_bytes()
        path.unlink()
        os.symlink(secret, path)
        described = s.blobs.describe(digest)
    assert described.startswith(f"a symbolic link to {secret}")
    r = run_jbl("store", "verify", store=store_dir)
    assert r.rc != 0 and f"a symbolic link to {secret}" in r.out and "never followed" in r.out
    assert path.is_symlink() and secret.read_bytes() == b"not for the store"
    # The legitimate blob put back: the same check passes.
    path.unlink()
    path.write_bytes(saved)
    run_jbl("store", "verify", store=store_dir).ok()
