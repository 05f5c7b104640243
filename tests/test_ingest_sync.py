"""The install's syncfs runs beside its commit's inserts, and the COMMIT still comes after it:
rows never become durable before the blobs they name; a failed syncfs commits nothing."""

from __future__ import annotations

import errno
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fixtures_ingest import gnu_tar
from jbl.store import rows
from jbl.store.blobs import BlobStore
from jbl.store.db import DB
from jbl.store.ingest import ingest
from jbl.store.store import Store


def _tarball(rt_factory: Any, tmp_path: Path) -> Path:
    return gnu_tar(rt_factory("syncrt", "1.0.0"), tmp_path / "syncrt.tar.gz")


def test_inserts_overlap_the_syncfs_and_commit_after_it(rt_factory, tmp_path: Path,
                                                        store_dir: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    tarball = _tarball(rt_factory, tmp_path)
    inserted = threading.Event()
    seen: dict[str, float | bool] = {}
    real_sync, real_insert, real_execute = BlobStore.sync, rows.insert_version_tree, DB.execute

    def sync(self: BlobStore) -> None:
        # a slow disk: this syncfs lasts until the tree's rows are inserted (or 10 s)
        seen["inserted during syncfs"] = inserted.wait(10)
        real_sync(self)
        seen["synced"] = time.monotonic()

    def insert_version_tree(*a: Any, **kw: Any) -> Any:
        inserted.set()
        return real_insert(*a, **kw)

    def execute(self: DB, sql: str, *a: Any, **kw: Any) -> Any:
        if sql == "COMMIT" and inserted.is_set():
            seen["committed"] = time.monotonic()
        return real_execute(self, sql, *a, **kw)

    monkeypatch.setattr(BlobStore, "sync", sync)
    monkeypatch.setattr(rows, "insert_version_tree", insert_version_tree)
    monkeypatch.setattr(DB, "execute", execute)
    with Store.open(store_dir, create=True) as store:
        r = ingest(store, tarball, source=str(tarball))
    assert r.created
    assert seen["inserted during syncfs"] is True
    assert seen["committed"] > seen["synced"]


def test_a_failed_syncfs_commits_nothing(rt_factory, tmp_path: Path, store_dir: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    tarball = _tarball(rt_factory, tmp_path)

    def sync(self: BlobStore) -> None:
        raise OSError(errno.EIO, "I/O error (a test's disk)")

    monkeypatch.setattr(BlobStore, "sync", sync)
    with Store.open(store_dir, create=True) as store:
        with pytest.raises(OSError, match="a test's disk"):
            ingest(store, tarball, source=str(tarball))
        assert store.get_version("syncrt", "1.0.0") is None
        assert store.db.scalar("SELECT count(*) FROM blobs") == 0
