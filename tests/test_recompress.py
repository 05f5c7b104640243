"""The cold pass (`jbl store gc --recompress`, store/recompress.py): blobs rewritten at a higher
zstd level keep every file's bytes, a kill at any step leaves a store the next gc completes,
and a reader through the mount never fails while it runs.

Real imports (`jbl store import` of a runtime tarball with multi-chunk files), real mounts,
real SIGKILLs (JBL_CRASH_AT) and pauses (JBL_PAUSE_AT) of the real command.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from conftest import JBL, assert_one_line_error, run_jbl
from fixtures_mount import (  # noqa: F401 - fixtures
    build_rt,
    engine,
    import_tarball,
    make_tarball,
    mounted,
    sweep_mounts,
)
from jbl.store import crashpoints
from jbl.store.blobs import CODEC_ZSTD, CODEC_ZSTD_COLD, BlobStore
from jbl.store.recompress import JOURNAL
from jbl.store.store import Store
from pausepoints import Pauses
from procs import reap
from test_crash import RECOMPRESS_POINTS

KILLED = -signal.SIGKILL
SPEC = "pyrt/1.0.0"
# Level 19 (the default) encodes ~3 MB/s per core: the tests pass a fast level that still
# beats the installs' level 1, so the same code runs in seconds. The default is measured in
# benchmarks/bench_store.py.
FAST = ("--level", "6")


BIG = "isolated/data/big.txt"


@pytest.fixture(scope="module")
def tarball(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pyrt@1.0.0 plus a 3.5 MiB text-like file (four chunks that each shrink at a higher
    level; a chunk of one repeated pattern would not, and would not be rewritten)."""
    rnd = random.Random(12)
    words = ["".join(rnd.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rnd.randint(2, 9)))
             for _ in range(3000)]
    text = " ".join(rnd.choice(words) for _ in range(600_000)).encode()[:7 << 19]
    rt = build_rt("pyrt", "1.0.0", tmp_path_factory, extra={"data/big.txt": text})
    return make_tarball(rt, tmp_path_factory.mktemp("rc") / "pyrt-1.0.0.tar.gz")


def blob_rows(store_dir: Path) -> dict[bytes, tuple[int, int]]:
    """digest -> (stored_size, codec) of every blob row."""
    with Store.open(store_dir, readonly=True) as s:
        return {bytes(d): (int(ss), int(c)) for d, ss, c in
                s.db.query("SELECT digest, stored_size, codec FROM blobs")}


def files_match_rows(store_dir: Path) -> None:
    """Every blob file has its row's size (what readers and verify rely on)."""
    blobs = BlobStore(store_dir)
    for d, (stored, _codec) in blob_rows(store_dir).items():
        st = blobs.stat(d)
        assert st is not None and st.st_size == stored, d.hex()


def stored_bytes(store_dir: Path) -> int:
    """What `jbl store list` says the (only) version stores."""
    (v,) = json.loads(run_jbl("store", "list", "--json", store=store_dir).ok().out)
    return int(v["stored_bytes"])


def tar_files(tarball: Path) -> dict[str, bytes]:
    """Every regular file (hard links too) of the tarball by its path below the runtime."""
    out = {}
    with tarfile.open(tarball) as tf:
        for m in tf.getmembers():
            if m.isfile() or m.islnk():
                f = tf.extractfile(m)  # a hard link: its target's bytes
                assert f is not None
                out[m.name.removeprefix("./")] = f.read()
    return out


def recompress(store_dir: Path, *extra: str, env: dict[str, str] | None = None
               ) -> dict[str, object]:
    r = run_jbl("store", "gc", "--recompress", "--min-age", "0s", "--json", *FAST, *extra,
                store=store_dir, env=env).ok()
    return json.loads(r.out)["recompress"]  # type: ignore[no-any-return]


def test_recompression_keeps_every_files_bytes(store_dir: Path, tarball: Path,
                                               tmp_path: Path) -> None:
    import_tarball(store_dir, tarball)
    before = blob_rows(store_dir)
    zstd = {d for d, (_s, c) in before.items() if c == CODEC_ZSTD}
    assert len(zstd) > 10
    # young blobs are left at the fast level (the default minimum age is a day)
    r = run_jbl("store", "gc", "--recompress", "--json", store=store_dir).ok()
    assert json.loads(r.out)["recompress"]["remaining"] == 0
    assert blob_rows(store_dir) == before

    listed = stored_bytes(store_dir)  # computed and cached (versions.stored_size)
    res = recompress(store_dir)
    after = blob_rows(store_dir)
    assert res["rewritten"] and res["saved_bytes"] and res["remaining"] == 0
    assert stored_bytes(store_dir) == listed - res["saved_bytes"]  # the cache was reset
    assert res["rewritten"] + res["settled"] == len(zstd)
    assert {d for d, (_s, c) in after.items() if c == CODEC_ZSTD_COLD} == zstd
    assert sum(s for s, _c in after.values()) == \
        sum(s for s, _c in before.values()) - res["saved_bytes"]
    assert {d: v for d, v in after.items() if d not in zstd} == \
        {d: v for d, v in before.items() if d not in zstd}  # raw blobs untouched
    files_match_rows(store_dir)
    run_jbl("store", "verify", "--data", store=store_dir).ok()
    want = tar_files(tarball)
    with mounted(store_dir, tmp_path / "mnt") as mp:
        for path, data in want.items():
            assert (mp / SPEC / path).read_bytes() == data, path
    # resumable: a second pass finds nothing left to do
    again = recompress(store_dir)
    assert (again["rewritten"], again["settled"], again["remaining"]) == (0, 0, 0)


def test_bad_durations_are_one_line(store_dir: Path, tarball: Path) -> None:
    import_tarball(store_dir, tarball)
    before = blob_rows(store_dir)
    for opt, bad in (("--min-age", "soon"), ("--max-time", "soon"), ("--level", "1"),
                     ("--level", "23"), ("--level", "x")):
        r = run_jbl("store", "gc", "--recompress", opt, bad, store=store_dir)
        assert_one_line_error(r, 2, opt)
    assert blob_rows(store_dir) == before


def test_max_time_stops_and_the_next_run_resumes(store_dir: Path, tarball: Path
                                                 ) -> None:
    import_tarball(store_dir, tarball)
    res = recompress(store_dir, "--max-time", "0s")  # the deadline is before the first batch
    assert (res["rewritten"], res["settled"]) == (0, 0) and res["remaining"]
    res = recompress(store_dir, "--max-time", "10m")
    assert res["rewritten"] and res["remaining"] == 0


@pytest.mark.parametrize("point", RECOMPRESS_POINTS)
def test_a_killed_pass_is_completed_by_the_next_gc(store_dir: Path, tarball: Path,
                                                   point: str) -> None:
    assert point in (crashpoints.__doc__ or "")  # the list of points stays true
    import_tarball(store_dir, tarball)
    before = blob_rows(store_dir)
    r = run_jbl("store", "gc", "--recompress", "--min-age", "0s", *FAST, store=store_dir,
                env={crashpoints.ENV: point})
    assert r.rc == KILLED, r.err
    if point == "recompress.renamed":
        # files renamed, rows not committed: the journal names them, verify says so
        assert (store_dir / JOURNAL).exists()
        v = run_jbl("store", "verify", store=store_dir)
        assert v.rc == 5 and "interrupted `gc --recompress`" in v.out, v.out + v.err
    else:
        assert blob_rows(store_dir) == before  # nothing renamed: nothing changed
        files_match_rows(store_dir)
        run_jbl("store", "verify", "--data", store=store_dir).ok()
    # a plain gc finishes what was renamed (its rows follow the files) and sweeps the rest
    run_jbl("store", "gc", "--grace", "0s", store=store_dir).ok()
    assert not (store_dir / JOURNAL).exists()
    files_match_rows(store_dir)
    run_jbl("store", "verify", "--data", store=store_dir).ok()
    assert list(BlobStore(store_dir).iter_tmp()) == []
    res = recompress(store_dir)
    assert res["remaining"] == 0
    assert {c for _s, c in blob_rows(store_dir).values()} <= {0, CODEC_ZSTD_COLD}
    run_jbl("store", "verify", "--data", store=store_dir).ok()


def release_every_batch(pauses: Pauses, p: subprocess.Popen[str]) -> tuple[str, str]:
    """Let a paused pass run to its end: it pauses again before each later batch."""
    deadline = time.monotonic() + 120
    while p.poll() is None:
        Pauses.release([f for f in pauses.dir.glob("recompress.files-written.*")])
        assert time.monotonic() < deadline, "the pass did not finish"
        time.sleep(0.01)
    out, err = p.communicate()
    assert p.returncode == 0, err
    return out, err


def test_a_reader_through_the_mount_never_fails(store_dir: Path, tarball: Path,
                                                tmp_path: Path, engine: str) -> None:  # noqa: F811
    """The race that matters: the mount reads a file's chunk list (old stored sizes) and the
    pass replaces the blobs before the file's later chunks are read. The pass is held after
    encoding, the file opened and its first chunk read, then the pass commits: it must skip
    the blobs of the version the mount holds, and the rest of the file read whole."""
    import_tarball(store_dir, tarball)
    want = tar_files(tarball)
    big = BIG
    pauses = Pauses(tmp_path / "pauses")
    with mounted(store_dir, tmp_path / "mnt", engine=engine) as mp:
        p = subprocess.Popen([JBL, "--store", str(store_dir), "store", "gc", "--recompress",
                              "--min-age", "0s", "--json", *FAST], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env={**os.environ, **pauses.env("recompress.files-written")})
        try:
            flags = pauses.wait("recompress.files-written", [p])
            with open(mp / SPEC / big, "rb") as f:
                head = f.read(4096)  # chunk 0 read: the daemon holds the chunk list now
                Pauses.release(flags)
                out, err = release_every_batch(pauses, p)
                rest = f.read()
        finally:
            reap(p)
        assert head + rest == want[big]
        res = json.loads(out)["recompress"]
        assert res["in_use"] > 0 and res["rewritten"] == 0  # held by the mount's lease
        for path, data in want.items():  # every other file still reads whole
            assert (mp / SPEC / path).read_bytes() == data, path
    files_match_rows(store_dir)
    # the legitimate use next to it: once no one holds the version, the pass rewrites it
    res = recompress(store_dir)
    assert res["rewritten"] and res["in_use"] == 0 and res["remaining"] == 0
    with mounted(store_dir, tmp_path / "mnt", engine=engine) as mp:
        for path, data in want.items():
            assert (mp / SPEC / path).read_bytes() == data, path


def test_installs_and_gc_while_a_pass_is_held(store_dir: Path, tarball: Path,
                                              tmp_path_factory: pytest.TempPathFactory,
                                              tmp_path: Path) -> None:
    """Held after encoding (no lock held), the pass meets an install of a version sharing its
    blobs, the removal of the version it read and a gc with no grace that sweeps the removed
    version's blobs and the pass's own staged files. It then commits only what is still as it
    read it: the store stays whole, and the next pass rewrites the new version's blobs."""
    import_tarball(store_dir, tarball)
    rt2 = build_rt("pyrt", "2.0.0", tmp_path_factory,
                   extra={"data/big.txt": tar_files(tarball)[BIG]})
    v2 = make_tarball(rt2, tmp_path / "pyrt-2.0.0.tar.gz")
    pauses = Pauses(tmp_path / "pauses")
    p = subprocess.Popen([JBL, "--store", str(store_dir), "store", "gc", "--recompress",
                          "--min-age", "0s", "--json", *FAST], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True,
                         env={**os.environ, **pauses.env("recompress.files-written")})
    try:
        flags = pauses.wait("recompress.files-written", [p])
        import_tarball(store_dir, v2)
        run_jbl("store", "rm", "pyrt@1.0.0", store=store_dir).ok()
        run_jbl("store", "gc", "--grace", "0s", store=store_dir).ok()
        Pauses.release(flags)
        out, _err = release_every_batch(pauses, p)
    finally:
        reap(p)
    assert "rewritten" in json.loads(out)["recompress"]  # later batches may have rewritten
    files_match_rows(store_dir)
    run_jbl("store", "verify", "--data", store=store_dir).ok()
    assert list(BlobStore(store_dir).iter_tmp()) == []
    # the held batch's blobs that 2.0.0 shares were left as they were: this pass takes them
    res = recompress(store_dir)
    assert res["rewritten"] and res["remaining"] == 0
    with mounted(store_dir, tmp_path / "mnt") as mp:
        assert (mp / "pyrt/2.0.0" / BIG).read_bytes() == tar_files(tarball)[BIG]


def test_verify_during_a_pass_reports_no_damage(store_dir: Path, tarball: Path,
                                                tmp_path: Path) -> None:
    """verify reads one snapshot of the index; a pass that renames and commits while verify
    walks the files is a change seen half (old rows, new files), not damage."""
    import_tarball(store_dir, tarball)
    pauses = Pauses(tmp_path / "pauses")
    v = subprocess.Popen([JBL, "--store", str(store_dir), "store", "verify"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, **pauses.env("verify.first-blob")})
    try:
        flags = pauses.wait("verify.first-blob", [v])
        assert recompress(store_dir)["rewritten"]  # renamed and committed meanwhile
        Pauses.release(flags)
        out, err = v.communicate(timeout=120)
    finally:
        reap(v)
    assert v.returncode == 0, out + err
    assert out.startswith("store OK"), out
