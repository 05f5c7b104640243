"""Removing a version and installing it again, as an admin would after a mistake — also while
a job still uses the removed copy."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import run_jbl
from fixtures_gc import expected_hashes, files_for, hash_version, lease_holder, make_tarball
from jbl.store.store import Store


def installed(store_dir: Path) -> list[str]:
    r = run_jbl("store", "list", "--json", store=store_dir).ok()
    return sorted(f"{v['name']}@{v['version']}" for v in json.loads(r.out))


def test_reinstall_after_rm_while_a_job_still_uses_the_old_copy(
        store_dir: Path, tmp_path: Path) -> None:
    tarball = make_tarball(tmp_path, "rt", "1.0.0", files_for("1.0.0"))
    run_jbl("store", "import", tarball, store=store_dir).ok()

    job = lease_holder(store_dir, "rt@1.0.0")  # a running job holds the version
    try:
        out = json.loads(run_jbl("store", "rm", "rt@1.0.0", "--yes", "--json",
                                 store=store_dir).ok().out)
        assert out["deferred"] == ["rt@1.0.0"]
        assert installed(store_dir) == []
        # the admin installs it again at once: no "run gc first"
        run_jbl("store", "import", tarball, store=store_dir).ok()
        assert installed(store_dir) == ["rt@1.0.0"]
    finally:
        job.communicate("")
    # the job has ended: gc drops the old copy, the reinstalled one stays, whole
    out = json.loads(run_jbl("store", "gc", "--json", store=store_dir).ok().out)
    assert len(out["purged"]) == 1 and out["purged"][0].startswith("rt@1.0.0"), out
    assert out["freed_bytes"] == 0  # its blobs are the reinstalled copy's too: nothing to free
    assert installed(store_dir) == ["rt@1.0.0"]
    with Store.open(store_dir) as s:
        rows = list(s.db.query("SELECT id, state FROM versions WHERE name='rt'"))
        assert [state for _, state in rows] == ["installed"]  # the removed row is gone
        assert s.db.scalar("SELECT COUNT(*) FROM leases") == 0
        assert hash_version(s, rows[0][0]) == expected_hashes(files_for("1.0.0"), "rt",
                                                              "1.0.0")


def test_reinstall_after_rm_of_an_unused_version(store_dir: Path, tmp_path: Path) -> None:
    tarball = make_tarball(tmp_path, "rt", "1.0.0", files_for("1.0.0"))
    run_jbl("store", "import", tarball, store=store_dir).ok()
    run_jbl("store", "rm", "rt@1.0.0", "--yes", store=store_dir).ok()
    r = run_jbl("store", "import", tarball, store=store_dir).ok()
    assert "installed" in r.out
    assert installed(store_dir) == ["rt@1.0.0"]
