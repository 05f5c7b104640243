"""A store on a nearly full disk: an install that runs out of space fails in one line and
leaves the store exactly as it was; once space is freed the same install succeeds.

The store lives on a real size-limited tmpfs (ENOSPC from the kernel, not a simulation).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import assert_one_line_error, assert_store_ok, run_jbl
from jbl.store.blobs import BlobStore
from jbl.store.store import Store


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "jbl-test-full", str(mnt)],
                   check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _snapshot(store_dir: Path) -> tuple[list[tuple[object, ...]], set[bytes]]:
    with Store.open(store_dir, readonly=True) as s:
        rows = s.db.query("SELECT name, version FROM versions ORDER BY id")
        rows += s.db.query("SELECT count(*) FROM blobs")
    return rows, {d for d, _ in BlobStore(store_dir).iter_files()}


def test_an_install_that_fills_the_disk_fails_cleanly_and_changes_nothing(
        small_disk: Path, rt_factory, tmp_path: Path) -> None:
    store = small_disk / "store"
    small = tmp_path / "small"
    (small / "isolated").mkdir(parents=True)
    (small / "isolated" / "hello").write_text("hello\n")
    (small / "runtime.yml").write_text("name: tiny\nversion: 1.0.0\n")
    run_jbl("pack", small, "-o", tmp_path / "tiny.tar.gz").ok()
    run_jbl("store", "import", tmp_path / "tiny.tar.gz", store=store).ok()
    before = _snapshot(store)

    # ~40 MB of real binaries and libraries, ~15 MB compressed: more than the disk has left
    # once a filler takes most of it.
    big = rt_factory("pyrt", "1.0.0")
    run_jbl("pack", big, "-o", tmp_path / "pyrt.tar.gz").ok()
    filler = small_disk / "filler"
    with open(filler, "wb") as f:
        f.write(os.urandom(14 << 20))

    r = run_jbl("store", "import", tmp_path / "pyrt.tar.gz", store=store)
    assert_one_line_error(r, contains="space")
    assert _snapshot(store) == before
    assert_store_ok(store)
    listed = json.loads(run_jbl("store", "list", "--json", store=store).ok().out)
    assert [v["name"] for v in listed] == ["tiny"]

    filler.unlink()  # an admin frees space: the same install now goes through
    run_jbl("store", "import", tmp_path / "pyrt.tar.gz", store=store).ok()
    assert_store_ok(store)
