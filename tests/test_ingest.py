"""Importing real runtimes: every attribute and byte survives, files dedup, big files chunk,
concurrent imports both succeed, and a kill at any ingest step leaves the store as before.

The store is read back through its rows and BlobStore only (``stored_tree``), never through
the FUSE view, so these tests pin down what ingest writes.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import apsw
import pytest
from conftest import JBL, assert_one_line_error, run_jbl
from fixtures_ingest import gnu_tar, source_tree, stored_tree
from jbl.store.blobs import BlobStore
from jbl.store.db import create_index
from pausepoints import Pauses

MiB = 1 << 20


def import_json(store: Path, tarball: Path, *args: str) -> dict[str, Any]:
    r = run_jbl("store", "import", tarball, "--json", *args, store=store).ok()
    return json.loads(r.out)


def test_round_trip_keeps_every_attribute_and_byte(rt_factory, tmp_path: Path,
                                                   store_dir: Path) -> None:
    src = tmp_path / "rt"
    subprocess.run(["cp", "-a", str(rt_factory("roundtrip", "1.0.0")), str(src)], check=True)
    iso = src / "isolated"
    os.link(iso / "usr/bin/python3.11", iso / "usr/bin/python-hardlink")  # a hardlink group
    (iso / "usr/bin/suid-tool").write_bytes(b"#!/bin/sh\n")
    os.chmod(iso / "usr/bin/suid-tool", 0o4755)
    os.chown(iso / "etc/passwd", 1234, 5678)
    os.utime(iso / "etc/group", ns=(0, 1_234_567_891_987_654_321))
    (iso / "empty").write_bytes(b"")
    (iso / "weird name ü").mkdir()
    os.symlink("../../nowhere/at/all", iso / "weird name ü" / "dangling")
    tarball = gnu_tar(src, tmp_path / "rt.tar.gz")

    r = run_jbl("store", "import", tarball, store=store_dir).ok()
    assert r.out.startswith("installed roundtrip@1.0.0 (")
    assert "setuid/setgid bits cleared: 'isolated/usr/bin/suid-tool'" in r.err

    got = stored_tree(store_dir, "roundtrip", "1.0.0")
    want = source_tree(src)
    want["isolated/usr/bin/suid-tool"]["mode"] = 0o755  # neutralised, as the warning said
    assert sorted(got) == sorted(want)
    for path, w in want.items():
        g = got[path]
        for key, value in w.items():
            assert g[key] == value, f"{path}: {key} {g[key]!r} != {value!r}"
    a, b = got["isolated/usr/bin/python3.11"], got["isolated/usr/bin/python-hardlink"]
    assert a["link_id"] == b["link_id"] is not None and a["nlink"] == b["nlink"] == 2


def test_runtime_under_a_single_top_dir_name_and_version_override(rt_factory, tmp_path: Path,
                                                                   store_dir: Path) -> None:
    src = rt_factory("toprt", "1.2.3")
    tarball = gnu_tar(src, tmp_path / "toprt.tar.zst", top="toprt-1.2.3", compress="--zstd")
    rec = import_json(store_dir, tarball, "--name", "renamed", "--version", "9.0.0")
    assert (rec["name"], rec["version"], rec["created"]) == ("renamed", "9.0.0", True)
    tree = stored_tree(store_dir, "renamed", "9.0.0")
    assert "runtime.yml" in tree and "isolated/usr/bin/python3.11" in tree
    assert tree[""]["mtime_ns"] == src.stat().st_mtime_ns  # the top dir is the version root
    # The version row keeps runtime.yml verbatim (its own name/version) but lists the override.
    r = run_jbl("store", "import", tarball, "--name", "renamed", "--version", "9.0.0",
                store=store_dir).ok()
    assert r.out.strip() == "renamed@9.0.0 is already installed"


def test_second_version_stores_only_what_is_new(rt_factory, tmp_path: Path,
                                                store_dir: Path) -> None:
    v1 = rt_factory("deduprt", "1.0.0")
    new_file = random.Random(7).randbytes(MiB)
    v2 = rt_factory("deduprt", "2.0.0", extra={"opt/new.bin": new_file})
    r1 = import_json(store_dir, gnu_tar(v1, tmp_path / "v1.tar.gz"))
    r2 = import_json(store_dir, gnu_tar(v2, tmp_path / "v2.tar.gz"))
    assert r1["new_stored_bytes"] > 5 * MiB
    # v2 adds the random MiB (incompressible) plus the probe module and runtime.yml.
    assert MiB <= r2["new_stored_bytes"] < MiB + 16 * 1024
    assert r2["dedup_files"] >= 0.98 * r1["files"]  # all but the changed few
    assert r2["dedup_bytes"] >= r1["logical_bytes"] - 1024
    r = run_jbl("store", "import", tmp_path / "v2.tar.gz", store=store_dir).ok()
    assert r.out.strip() == "deduprt@2.0.0 is already installed"


def test_large_file_is_chunked_and_each_chunk_reads_alone(tmp_path: Path,
                                                          store_dir: Path) -> None:
    data = random.Random(3).randbytes(3 * MiB + MiB // 2)
    rt = tmp_path / "chunky"
    (rt / "isolated").mkdir(parents=True)
    (rt / "isolated/big.bin").write_bytes(data)
    (rt / "runtime.yml").write_text("name: chunky\nversion: 1.0.0\n")
    import_json(store_dir, gnu_tar(rt, tmp_path / "chunky.tar"))
    con = apsw.Connection(str(store_dir / "index.db"), flags=apsw.SQLITE_OPEN_READONLY)
    cid, nchunks, size = next(con.execute(
        "SELECT c.id, c.nchunks, c.size FROM entries e JOIN contents c ON c.id = e.content_id "
        "WHERE e.name = ?", (b"big.bin",)))
    assert (nchunks, size) == (4, len(data))
    digest, codec, bsize = next(con.execute(
        "SELECT b.digest, b.codec, b.size FROM chunks c JOIN blobs b ON b.id = c.blob_id "
        "WHERE c.content_id=? AND c.seq=2", (cid,)))
    con.close()
    assert BlobStore(store_dir).read(bytes(digest), codec, bsize) == data[2 * MiB:3 * MiB]


def test_two_imports_at_once_both_succeed(tmp_path: Path, store_dir: Path) -> None:
    import hostile
    tarballs = []
    for i, name in enumerate(["left", "right", "right"]):
        manifest = f"name: {name}\nversion: 1.0.0\n".encode()
        data = (hostile.file(b"runtime.yml", manifest) + hostile.directory(b"isolated/")
                + hostile.file(b"isolated/shared.bin", random.Random(1).randbytes(3 * MiB))
                + hostile.file(b"isolated/own.bin", random.Random(name).randbytes(2 * MiB))
                + hostile.END)
        p = tmp_path / f"{name}-{i}.tar"
        p.write_bytes(data)
        tarballs.append(p)
    pauses = Pauses(tmp_path / "pauses")

    def start(t: Path, env: dict[str, str]) -> subprocess.Popen[str]:
        return subprocess.Popen([JBL, "--store", str(store_dir), "store", "import", str(t)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, **env})

    # left and the first right have read everything and written their blobs, and are held
    # just before their commit; the second right then runs start to end and commits
    with start(tarballs[0], pauses.env("ingest.before-commit")) as left, \
            start(tarballs[1], pauses.env("ingest.before-commit")) as right:
        held = [left, right]
        try:
            flags = pauses.wait("ingest.before-commit", held)
            with start(tarballs[2], {}) as late:
                late_out = late.communicate(timeout=120)
            assert late.returncode == 0, late_out
            assert late_out[0].startswith("installed right@1.0.0"), late_out
            pauses.release(flags)
            outs = [p.communicate(timeout=120) for p in held]
        finally:
            for p in held:
                p.kill()
    assert [p.returncode for p in held] == [0, 0], outs
    assert outs[0][0].startswith("installed left@1.0.0"), outs
    # the first right found the second's commit only inside its own transaction: the re-check
    assert outs[1][0].strip() == "right@1.0.0 is already installed", outs
    con = apsw.Connection(str(store_dir / "index.db"), flags=apsw.SQLITE_OPEN_READONLY)
    assert sorted(con.execute("SELECT name FROM versions")) == [("left",), ("right",)]
    con.close()


# Another process creating the same store: it holds the write lock of the new, still empty
# index (as while it switches it to WAL) until its stdin is closed.
_CREATING = """
import sys, apsw
con = apsw.Connection(sys.argv[1])
con.execute("BEGIN IMMEDIATE")
con.execute("CREATE TABLE racing_creator(x)")
print("held", flush=True)
sys.stdin.read()
con.execute("ROLLBACK")
"""


def test_first_import_waits_for_another_process_creating_the_index(tmp_path: Path,
                                                                   store_dir: Path) -> None:
    """Two first installs at once: one opens the index while the other holds its write lock
    to switch the empty file to WAL. It waits and installs (it used to stop at once with
    'internal error: BusyError: database is locked': SQLite does not retry that statement)."""
    import hostile
    tarball = tmp_path / "rt.tar"
    tarball.write_bytes(hostile.tar())
    store_dir.mkdir()
    create_index(store_dir / "index.db")  # what the other process's open did first
    with subprocess.Popen([sys.executable, "-c", _CREATING, str(store_dir / "index.db")],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as other:
        assert other.stdout is not None and other.stdin is not None
        assert other.stdout.readline() == "held\n"
        with subprocess.Popen([JBL, "--store", str(store_dir), "store", "import", str(tarball)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) as imp:
            try:
                try:
                    imp.wait(timeout=3)
                except subprocess.TimeoutExpired:
                    pass  # waiting for the lock, as it should
                else:
                    pytest.fail(f"the import did not wait: {imp.communicate()}")
            finally:
                other.stdin.close()  # the other process is done: the import goes on
            out, err = imp.communicate(timeout=120)
    assert (other.returncode, imp.returncode) == (0, 0), err
    assert out.startswith("installed hostile@1.0.0"), (out, err)


def test_a_look_at_an_index_still_being_created_is_one_line(tmp_path: Path,
                                                            store_dir: Path) -> None:
    """Between the first install making the index file and its schema commit, a reader
    (`list`, the mount) finds an empty index: one line, not 'no such table: meta'."""
    import hostile
    store_dir.mkdir()
    create_index(store_dir / "index.db")  # as the creating install's open did first
    r = run_jbl("store", "list", store=store_dir)
    assert_one_line_error(r, 10, "still being created")
    tarball = tmp_path / "rt.tar"
    tarball.write_bytes(hostile.tar())
    run_jbl("store", "import", tarball, store=store_dir).ok()
    assert "hostile" in run_jbl("store", "list", store=store_dir).ok().out  # then completed


@pytest.mark.parametrize("point", ["ingest.blobs-written", "ingest.before-commit",
                                   "ingest.after-commit"])
def test_kill_at_each_ingest_step_leaves_the_store_consistent(tmp_path: Path, store_dir: Path,
                                                              point: str) -> None:
    import hostile
    seed = tmp_path / "seed.tar"
    seed.write_bytes(hostile.tar())
    run_jbl("store", "import", seed, "--name", "seed", store=store_dir).ok()
    victim = tmp_path / "victim.tar"
    victim.write_bytes(hostile.tar(hostile.file(b"isolated/new.bin",
                                                random.Random(5).randbytes(MiB + 5))))
    r = run_jbl("store", "import", victim, store=store_dir, env={"JBL_CRASH_AT": point})
    assert r.rc == -9, r
    con = apsw.Connection(str(store_dir / "index.db"), flags=apsw.SQLITE_OPEN_READONLY)
    names = sorted(n for (n,) in con.execute("SELECT name FROM versions"))
    con.close()
    assert names == (["hostile", "seed"] if point == "ingest.after-commit" else ["seed"])
    run_jbl("store", "verify", store=store_dir).ok()
    r = run_jbl("store", "import", victim, store=store_dir).ok()
    assert ("already installed" in r.out) == (point == "ingest.after-commit")


def test_bad_arguments_are_one_line_errors(tmp_path: Path, store_dir: Path) -> None:
    assert_one_line_error(run_jbl("store", "import", tmp_path / "nope.tar.gz", store=store_dir),
                          3, "no such tarball")
    assert_one_line_error(run_jbl("store", "import", tmp_path, store=store_dir), 2, "jbl pack")
    t = tmp_path / "x.tar"
    t.write_bytes(b"")
    assert_one_line_error(run_jbl("store", "import", t, "--name", "../evil", store=store_dir), 2,
                          "invalid runtime name")
    assert_one_line_error(run_jbl("store", "import", t, "--max-total-size", "lots",
                                  store=store_dir), 2, "--max-total-size")
    assert_one_line_error(run_jbl("store", "import", t, store=store_dir), 6, "truncated")
