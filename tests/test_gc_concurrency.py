"""gc in a loop while another process imports overlapping versions and readers hash files.

Three kinds of real processes share one store for ~15 s:
* an importer: `jbl store import` of 10 versions whose files overlap (shared files, shared
  multi-chunk bodies between neighbours, files of their own);
* a gc loop: `jbl store gc --keep-latest 2 --grace 0s` back to back — the most aggressive
  settings: versions are removed as fast as they arrive and orphans have no grace at all;
* two readers acting like jobs: pick an installed version, lease it, read every file through
  ``store/view.py`` in 128 KiB pieces (as the mount does) and compare each sha256 with the
  tarball's. A version removed before the lease is taken is skipped (a job would be told
  "not installed"); once leased, no read may ever fail.
A fourth process holds a lease on the oldest version throughout: gc's own output must show it
met that version and kept it (``in_use``) while it removed the other old ones. Each import
waits for a gc run that started after it, so gc really sees every version; then the loops
go on until gc has taken every old version (a reader's lease keeps one only while it reads),
within a deadline.
At the end `verify --data` passes, only the 2 latest versions remain, nothing leaked.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

from conftest import JBL, run_jbl
from fixtures_gc import files_for, lease_holder, make_tarball
from jbl.store.blobs import BlobStore
from jbl.store.store import Store

VERSIONS = [f"1.{i}.0" for i in range(10)]

READER = textwrap.dedent("""
    import hashlib, json, random, sys, os
    from pathlib import Path
    from jbl.store.errors import JblError, NotInstalled
    from jbl.store.store import Store
    from jbl.store.view import View

    store_dir, expected_path, stop = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    expected = json.loads(Path(expected_path).read_text())
    reads = skipped = 0
    failures = []
    while not stop.exists():
        try:
            store = Store.open(store_dir)
        except JblError:
            continue  # no store yet
        with store:
            view = View(store)
            have = view.installed().get("rt", {})
            if not have:
                continue
            version = random.choice(sorted(have))
            vid = have[version].version_id
            try:
                lease = store.lease(vid, "job")
                lease.__enter__()
            except NotInstalled:  # removed between our look and the lease: a job says so
                skipped += 1
                continue
            try:
                root = store.db.scalar("SELECT root_id FROM versions WHERE id=?", (vid,))
                for path, want in expected[version].items():
                    try:
                        e = view.resolve(root, path)
                        refs = view.chunks(e.content_id)
                        h = hashlib.sha256()
                        for off in range(0, e.size, 128 << 10):
                            h.update(view.read(refs, e.size, off, 128 << 10))
                        if h.hexdigest() != want:
                            failures.append(f"{version} {path}: wrong bytes")
                    except Exception as exc:
                        failures.append(f"{version} {path}: {type(exc).__name__}: {exc}")
                reads += 1
            finally:
                lease.__exit__(None, None, None)
    print(json.dumps({"reads": reads, "skipped": skipped, "failures": failures[:20]}))
""")


def test_gc_loop_with_concurrent_imports_and_readers(store_dir: Path, tmp_path: Path) -> None:
    expected: dict[str, dict[str, str]] = {}
    tarballs = []
    for i, v in enumerate(VERSIONS):
        files = files_for(v, shared=60, own=15)
        # a 2.5-chunk body shared by each pair of neighbours: chunk blobs shared across
        # versions are where a careless sweep would bite
        files["isolated/data/pair.bin"] = hashlib.sha256(f"pair{i // 2}".encode()).digest() \
            * (80 * 1024) + bytes(range(256)) * 41
        tarballs.append(make_tarball(tmp_path, "rt", v, files))
        expected[v] = {"runtime.yml": hashlib.sha256(
            (tmp_path / "src" / f"rt-{v}" / "runtime.yml").read_bytes()).hexdigest()}
        expected[v].update({p: hashlib.sha256(d).hexdigest() for p, d in files.items()})
    (tmp_path / "expected.json").write_text(json.dumps(expected))
    stop = tmp_path / "stop"

    run_jbl("store", "import", tarballs[0], store=store_dir).ok()
    gc_outs: list[dict] = []
    gc_errors: list[str] = []
    ran = threading.Condition()

    def gc_loop() -> None:
        while not stop.exists():
            p = subprocess.run([JBL, "--store", str(store_dir), "store", "gc", "--json",
                                "--keep-latest", "2", "--grace", "0s"],
                               capture_output=True, text=True)
            with ran:
                if p.returncode != 0:
                    gc_errors.append(p.stderr)
                else:
                    gc_outs.append(json.loads(p.stdout))
                ran.notify_all()

    def gc_runs_after_now(n: int) -> None:
        """Wait until ``n`` gc runs started after this moment (one may be under way)."""
        with ran:
            want = len(gc_outs) + len(gc_errors) + 1 + n
            assert ran.wait_for(lambda: len(gc_outs) + len(gc_errors) >= want, timeout=60)

    def taken() -> set[str]:
        """Versions gc took: removed at once, or deferred (leased meanwhile) and purged by a
        later run once that lease was gone."""
        return {v for o in gc_outs for v in o["removed"] + o["purged"]}

    old = {f"rt@{v}" for v in VERSIONS[1:-2]}
    # Whatever fails, every process is stopped, its pipes closed and it is waited for.
    with contextlib.ExitStack() as procs:
        readers = [procs.enter_context(subprocess.Popen(
            [sys.executable, "-c", READER, str(store_dir), str(tmp_path / "expected.json"),
             str(stop)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
            for _ in range(2)]
        procs.callback(stop.touch)  # runs before the readers are waited for
        # a job that holds the oldest version all along: every gc that would take it meets it
        holder = procs.enter_context(lease_holder(store_dir, "rt@1.0.0"))
        t = threading.Thread(target=gc_loop)
        t.start()
        try:
            for tb in tarballs[1:]:
                run_jbl("store", "import", tb, store=store_dir).ok()
                gc_runs_after_now(1)  # gc sees each version before the next arrives
            # A reader leasing an old version keeps it (in_use) for as long as it reads; gc
            # takes it at a later run. So the loops go on until gc took every old version,
            # within a deadline: a version gc skipped for good fails below.
            with ran:
                ran.wait_for(lambda: old <= taken() or bool(gc_errors), timeout=120)
        finally:
            stop.touch()
            t.join()
            outs = [r.communicate(timeout=60) for r in readers]
        assert all(r.returncode == 0 for r in readers), [err for _o, err in outs]
        results = [json.loads(out) for out, _err in outs]
        assert [r["failures"] for r in results] == [[], []]
        assert sum(r["reads"] for r in results) >= 10  # the readers really read
        assert gc_errors == [] and len(gc_outs) >= len(VERSIONS)
        # gc met the leased version and kept it, every time, and took the unleased old ones
        assert any(o["in_use"] == ["rt@1.0.0"] for o in gc_outs), gc_outs
        assert "rt@1.0.0" not in taken()
        assert old <= taken(), (sorted(old - taken()), gc_outs[-3:])
        holder.communicate("", timeout=30)
    assert json.loads(run_jbl("store", "gc", "--json", "--keep-latest", "2", "--grace", "0s",
                              store=store_dir).ok().out)["removed"] == ["rt@1.0.0"]

    # quiet now: one last sweep, then the store holds exactly the 2 latest and no leftovers
    run_jbl("store", "gc", "--keep-latest", "2", "--grace", "0s", store=store_dir).ok()
    r = run_jbl("store", "verify", "--data", store=store_dir)
    assert r.rc == 0, r.out + r.err
    with Store.open(store_dir) as s:
        assert [v.version for v in s.versions()] == VERSIONS[-2:]
        assert s.db.scalar("SELECT COUNT(*) FROM versions") == 2
        rows = {bytes(d) for (d,) in s.db.query("SELECT digest FROM blobs")}
    assert {d for d, _ in BlobStore(store_dir).iter_files()} == rows
