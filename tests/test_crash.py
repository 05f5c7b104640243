"""A SIGKILL at every named crash point (``JBL_CRASH_AT``) of gc, rm and install leaves a store
that `jbl store verify` passes and that the next gc/import completes; nothing leaks after.

Versions are installed with the real `jbl store import` of small runtime tarballs.
"""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest
from conftest import run_jbl
from fixtures_gc import files_for, make_tarball
from jbl.store import crashpoints
from jbl.store.blobs import BlobStore
from jbl.store.store import Store

KILLED = -signal.SIGKILL
VERSIONS = ["1.0.0", "1.1.0", "1.2.0", "1.3.0"]
REPO = Path(__file__).resolve().parents[1]
GC_POINTS = ["gc.after-mark", "gc.rows-deleted", "gc.mid-unlink"]
RM_POINT = "rm.rows-deleted"
INGEST_POINTS = ["ingest.blobs-written", "ingest.before-commit", "ingest.after-commit"]
RECOMPRESS_POINTS = ["recompress.files-written", "recompress.renamed"]  # test_recompress.py
CAS_POINT = "casinstall.half-fetched"  # paused in tests/test_cas_publish_install.py
VERIFY_POINT = "verify.first-blob"  # paused in tests/test_recompress.py


@pytest.fixture(scope="module")
def tarballs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("tarballs")
    # a multi-chunk file per version too, so chunk rows and several blobs per body are swept
    return {v: make_tarball(base, "rt", v, files_for(v, shared=30, own=10, big=True))
            for v in VERSIONS}


def crash_env(point: str) -> dict[str, str]:
    assert point in crashpoints.__doc__  # type: ignore[operator]  # the list stays true
    return {crashpoints.ENV: point}


def installed(store_dir: Path) -> list[str]:
    r = run_jbl("store", "list", "--json", store=store_dir).ok()
    return sorted(f"{v['name']}@{v['version']}" for v in json.loads(r.out))


def assert_verify_ok(store_dir: Path, *args: str) -> None:
    r = run_jbl("store", "verify", *args, store=store_dir)
    assert r.rc == 0, r.out + r.err


def assert_no_leftovers(store_dir: Path) -> None:
    """Every blob file has a row and vice versa; no temp files; no journal."""
    with Store.open(store_dir) as s:
        rows = {bytes(d) for (d,) in s.db.query("SELECT digest FROM blobs")}
    files = {d for d, _ in BlobStore(store_dir).iter_files()}
    assert files == rows
    assert list(BlobStore(store_dir).iter_tmp()) == []
    assert not (store_dir / "gc-pending").exists()


def import_all(store_dir: Path, tarballs: dict[str, Path]) -> None:
    for v in VERSIONS:
        run_jbl("store", "import", tarballs[v], store=store_dir).ok()


@pytest.mark.parametrize("point", GC_POINTS)
def test_gc_killed_at_each_step(store_dir: Path, tarballs: dict[str, Path], point: str) -> None:
    import_all(store_dir, tarballs)
    r = run_jbl("store", "gc", "--keep-latest", "1", store=store_dir, env=crash_env(point))
    assert r.rc == KILLED, r.err
    assert installed(store_dir) == ["rt@1.3.0"]  # rows of the old versions went first
    assert_verify_ok(store_dir, "--data")
    # the next gc completes and leaves nothing behind (default 1h grace: the unlink journal,
    # not file age, is what lets it finish a killed gc's work at once)
    r = run_jbl("store", "gc", "--json", store=store_dir).ok()
    assert json.loads(r.out)["removed"] == []
    assert_verify_ok(store_dir, "--data")
    assert_no_leftovers(store_dir)


def test_rm_killed_after_its_rows_are_gone(store_dir: Path, tarballs: dict[str, Path]) -> None:
    import_all(store_dir, tarballs)
    r = run_jbl("store", "rm", "rt@1.0.0", store=store_dir, env=crash_env(RM_POINT))
    assert r.rc == KILLED, r.err
    assert "rt@1.0.0" not in installed(store_dir)
    assert_verify_ok(store_dir, "--data")
    r = run_jbl("store", "gc", "--json", store=store_dir).ok()
    assert json.loads(r.out)["freed_bytes"] > 0  # its unique blobs are freed now
    assert_no_leftovers(store_dir)


@pytest.mark.parametrize("point", INGEST_POINTS)
def test_import_killed_at_each_step(store_dir: Path, tarballs: dict[str, Path],
                                    point: str) -> None:
    run_jbl("store", "import", tarballs["1.0.0"], store=store_dir).ok()
    r = run_jbl("store", "import", tarballs["1.1.0"], store=store_dir, env=crash_env(point))
    assert r.rc == KILLED, r.err
    committed = point == "ingest.after-commit"
    assert ("rt@1.1.0" in installed(store_dir)) == committed
    assert_verify_ok(store_dir, "--data")  # orphans are young: an install might be running
    # the next import completes (or says it is there already); gc then sweeps the orphans
    run_jbl("store", "import", tarballs["1.1.0"], store=store_dir).ok()
    assert installed(store_dir) == ["rt@1.0.0", "rt@1.1.0"]
    run_jbl("store", "gc", "--grace", "0s", store=store_dir).ok()
    assert_verify_ok(store_dir, "--data")
    assert_no_leftovers(store_dir)


def crashpoint_calls() -> set[str]:
    """Every ``crashpoint("NAME")`` call in the shipped packages (the code, not its doc)."""
    found: set[str] = set()
    for pkg in ("store", "fusefs", "runner", "cli"):
        for f in (REPO / pkg).rglob("*.py"):
            found |= set(re.findall(r"""crashpoint\(\s*["']([^"']+)["']\s*\)""",
                                    f.read_text()))
    return found


def test_every_named_crash_point_is_tested() -> None:
    doc = crashpoints.__doc__ or ""
    documented = {ln.split()[0] for ln in doc.splitlines()
                  if ln.startswith("    ") and "." in ln.split()[0]}
    in_code = crashpoint_calls()
    assert in_code, "no crashpoint(...) call found: the scan is broken"
    assert in_code == documented  # the module's list is the code's
    assert in_code == {*GC_POINTS, RM_POINT, *INGEST_POINTS, *RECOMPRESS_POINTS, CAS_POINT,
                       VERIFY_POINT}
