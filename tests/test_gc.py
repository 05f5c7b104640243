"""`jbl store gc` and `pin`/`unpin`: the retention policy matrix, sweeping, leases, config.

Stores are made with ``fixtures_gc.add_version`` (the install protocol, without tarballs) so
each test sets install/last-use times exactly; the user-facing part runs the real CLI.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from conftest import assert_one_line_error, run_jbl
from fixtures_gc import (
    add_version,
    age,
    expected_hashes,
    files_for,
    hash_version,
    lease_holder,
)
from jbl.store.blobs import BlobStore
from jbl.store.store import Store
from procs import reap

DAY = 86400.0


def installed(store_dir: Path) -> list[str]:
    with Store.open(store_dir) as s:
        return [v.spec for v in s.versions()]


def blob_files(store_dir: Path) -> int:
    return sum(1 for _ in BlobStore(store_dir).iter_files())


def gc(store_dir: Path, *args: str, env: dict[str, str] | None = None) -> dict:
    r = run_jbl("store", "gc", "--json", *args, store=store_dir, env=env).ok()
    return json.loads(r.out)


def series(store_dir: Path, name: str, versions: list[str], *, days_ago: float = 10) -> None:
    now = time.time()
    for i, v in enumerate(versions):
        add_version(store_dir, name, v, installed_at=now - (days_ago - i) * DAY)


def test_sweep_only_keeps_every_version_and_frees_garbage(store_dir: Path) -> None:
    series(store_dir, "rt", ["1.0.0", "1.1.0"])
    blobs = BlobStore(store_dir)
    old = blobs.write(b"\x01" * 32, b"left by a killed install") and blobs.path(b"\x01" * 32)
    age(old, 2 * 3600)
    young = b"\x02" * 32
    blobs.write(young, b"an install still running")
    stale_tmp = blobs.tmp / "0101.deadbeef"
    stale_tmp.write_bytes(b"x" * 100)
    age(stale_tmp, 2 * 3600)

    out = gc(store_dir)
    assert out["removed"] == [] and out["policy"] == "sweep only"
    assert installed(store_dir) == ["rt@1.0.0", "rt@1.1.0"]
    assert out["orphans"] == 1 and out["temp_files"] == 1
    assert out["freed_bytes"] == len(b"left by a killed install") + 100
    assert not old.exists() and not stale_tmp.exists()
    assert blobs.exists(young)  # within the grace period: may belong to a running install
    # ... until the grace period says otherwise
    assert gc(store_dir, "--grace", "0s")["orphans"] == 1
    assert not blobs.exists(young)


def test_keep_latest_is_per_runtime_and_semver_ordered(store_dir: Path) -> None:
    series(store_dir, "rt", ["1.9.0", "1.10.0", "1.2.0", "2.0.0-beta"])
    series(store_dir, "other", ["0.1.0"])
    out = gc(store_dir, "--keep-latest", "2")
    # 1.10.0 > 1.9.0 > 1.2.0; the pre-release counts as a version too (it is installed)
    assert sorted(out["removed"]) == ["rt@1.2.0", "rt@1.9.0"]
    assert installed(store_dir) == ["other@0.1.0", "rt@1.10.0", "rt@2.0.0-beta"]
    assert out["freed_bytes"] > 0
    # what remains still reads back byte for byte
    for name, ver in (("rt", "1.10.0"), ("rt", "2.0.0-beta"), ("other", "0.1.0")):
        with Store.open(store_dir) as s:
            v = s.get_version(name, ver)
            assert v is not None
            got = hash_version(s, v.id)
        assert got == expected_hashes(files_for(ver), name, ver)


class ReadingJob:
    """A real process that leases ``spec`` as a job does and, on each request, reads every
    file of the version through its own store connection and answers {path: sha256}."""

    def __init__(self, store_dir: Path, spec: str) -> None:
        code = textwrap.dedent(f"""
            import json, sys
            sys.path.insert(0, {str(Path(__file__).parent)!r})
            from fixtures_gc import hash_version
            from jbl.store.store import Store
            with Store.open({str(store_dir)!r}) as s:
                info = s.resolve_installed({spec!r})
                with s.lease(info.id, "job"):
                    print("leased", flush=True)
                    for _ in sys.stdin:
                        print(json.dumps(hash_version(s, info.id)), flush=True)
        """)
        self.p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert self.p.stdout is not None and self.p.stdout.readline() == "leased\n"
        except BaseException:
            reap(self.p)
            raise

    def read_all(self) -> dict[str, str]:
        assert self.p.stdin is not None and self.p.stdout is not None
        self.p.stdin.write("read\n")
        self.p.stdin.flush()
        return dict(json.loads(self.p.stdout.readline()))

    def end(self) -> None:
        self.p.communicate("", timeout=30)
        assert self.p.returncode == 0


def test_unused_for_counts_last_use_else_install_time(store_dir: Path) -> None:
    now = time.time()
    add_version(store_dir, "rt", "1.0.0", installed_at=now - 40 * DAY)  # never used
    add_version(store_dir, "rt", "1.1.0", installed_at=now - 40 * DAY,
                last_used_at=now - 2 * DAY)  # used recently
    add_version(store_dir, "rt", "1.2.0", installed_at=now - 40 * DAY,
                last_used_at=now - 31 * DAY)
    add_version(store_dir, "rt", "1.3.0", installed_at=now - 1 * DAY)  # new, never used
    out = gc(store_dir, "--unused-for", "30d")
    assert sorted(out["removed"]) == ["rt@1.0.0", "rt@1.2.0"]
    assert installed(store_dir) == ["rt@1.1.0", "rt@1.3.0"]


def test_keep_rules_combine_as_keep_if_any_rule_keeps(store_dir: Path) -> None:
    now = time.time()
    add_version(store_dir, "rt", "1.0.0", installed_at=now - 40 * DAY)  # old, not latest
    add_version(store_dir, "rt", "1.1.0", installed_at=now - 40 * DAY,
                last_used_at=now - DAY)  # not latest but used: kept by unused-for
    add_version(store_dir, "rt", "1.2.0", installed_at=now - 40 * DAY)  # latest: kept
    out = gc(store_dir, "--keep-latest", "1", "--unused-for", "7d")
    assert out["removed"] == ["rt@1.0.0"]


def test_max_size_removes_least_recently_used_only_as_needed(store_dir: Path) -> None:
    now = time.time()
    big = {f"isolated/own{i}.bin": bytes([i]) * 4000 + b"x" * i for i in range(8)}
    for i, v in enumerate(["1.0.0", "1.1.0", "1.2.0", "1.3.0"]):
        files = {k + v: d + v.encode() * 500 for k, d in big.items()}  # unique per version
        add_version(store_dir, "rt", v, files, installed_at=now - 50 * DAY,
                    last_used_at=now - [3, 40, 1, 20][i] * DAY)
    r = run_jbl("store", "gc", "--dry-run", "--json", "--max-size", "1T", store=store_dir).ok()
    assert json.loads(r.out)["removed"] == []  # already small enough: nothing
    with Store.open(store_dir) as s:
        from jbl.store.policy import physical_size
        blob_bytes, index_bytes = physical_size(s)
    # room for all but ~1.5 versions' unique bytes: the two least recently used must go
    per_version = blob_bytes // 4
    limit = blob_bytes + index_bytes - per_version - per_version // 2
    out = gc(store_dir, "--max-size", str(limit))
    assert out["removed"] == ["rt@1.1.0", "rt@1.3.0"]  # used 40 and 20 days ago
    assert installed(store_dir) == ["rt@1.0.0", "rt@1.2.0"]
    with Store.open(store_dir) as s:
        assert sum(physical_size(s)) <= limit


def test_pinned_and_in_use_versions_are_never_collected(store_dir: Path) -> None:
    series(store_dir, "rt", ["1.0.0", "1.1.0", "1.2.0", "1.3.0"], days_ago=100)
    r = run_jbl("store", "pin", "rt@1.0.0", store=store_dir).ok()
    assert "rt@1.0.0 pinned" in r.err
    job = lease_holder(store_dir, "rt@1.1.0")  # a running job uses 1.1.0
    try:
        out = gc(store_dir, "--keep-latest", "1", "--unused-for", "1d", "--max-size", "1")
        assert out["removed"] == ["rt@1.2.0", "rt@1.3.0"]
        assert installed(store_dir) == ["rt@1.0.0", "rt@1.1.0"]
    finally:
        job.communicate("")
    run_jbl("store", "unpin", "rt@1.0.0", store=store_dir).ok()
    out = gc(store_dir, "--keep-latest", "1")  # job ended, pin gone: only the latest stays
    assert out["removed"] == ["rt@1.0.0"]
    assert installed(store_dir) == ["rt@1.1.0"]


def test_pin_of_a_version_not_installed_is_one_line_error(store_dir: Path) -> None:
    add_version(store_dir, "rt", "1.0.0")
    assert_one_line_error(run_jbl("store", "pin", "rt@9.9.9", store=store_dir), 3, "rt@9.9.9")
    assert_one_line_error(run_jbl("store", "pin", "bad name!", store=store_dir), 2)


def test_last_use_is_recorded_by_a_lease(store_dir: Path) -> None:
    add_version(store_dir, "rt", "1.0.0", installed_at=time.time() - 60 * DAY)
    job = lease_holder(store_dir, "rt@1.0.0")
    job.communicate("")  # a job ran (and ended) just now
    out = gc(store_dir, "--unused-for", "30d")
    assert out["removed"] == []


def test_dry_run_changes_nothing_and_predicts_the_real_run(store_dir: Path) -> None:
    series(store_dir, "rt", ["1.0.0", "1.1.0", "1.2.0"])
    files_before = blob_files(store_dir)
    dry = gc(store_dir, "--dry-run", "--keep-latest", "1")
    assert dry["dry_run"] and dry["removed"] == ["rt@1.0.0", "rt@1.1.0"]
    assert installed(store_dir) == ["rt@1.0.0", "rt@1.1.0", "rt@1.2.0"]
    assert blob_files(store_dir) == files_before
    real = gc(store_dir, "--keep-latest", "1")
    assert real["removed"] == dry["removed"]
    assert real["freed_bytes"] == dry["freed_bytes"] and real["blobs"] == dry["blobs"]
    assert blob_files(store_dir) == files_before - real["blobs"]
    text = run_jbl("store", "gc", store=store_dir).ok().out
    assert "gc (sweep only): 0 versions removed" in text and "freed 0B" in text


def test_policy_from_config_file_and_cli_overrides_it(store_dir: Path, tmp_path: Path) -> None:
    series(store_dir, "rt", ["1.0.0", "1.1.0", "1.2.0", "1.3.0"])
    cfg = tmp_path / "config.yaml"
    cfg.write_text("gc:\n  keep_latest: 3\n  grace: 2h\n")
    env = {"JBL_CONFIG": str(cfg)}
    out = gc(store_dir, "--dry-run", env=env)
    assert out["policy"] == "keep-latest 3" and out["removed"] == ["rt@1.0.0"]
    out = gc(store_dir, "--keep-latest", "2", env=env)  # the command line wins
    assert out["removed"] == ["rt@1.0.0", "rt@1.1.0"]
    cfg.write_text("gc:\n  keep_lastest: 3\n")
    r = run_jbl("store", "gc", store=store_dir, env=env)
    assert_one_line_error(r, 2, "keep_lastest")
    cfg.write_text("gc:\n  max_size: lots\n")
    assert_one_line_error(run_jbl("store", "gc", store=store_dir, env=env), 2, "gc.max_size")


def test_bad_options_are_one_line_usage_errors(store_dir: Path) -> None:
    add_version(store_dir, "rt", "1.0.0")
    for args, word in ((["--keep-latest", "0"], "--keep-latest"),
                       (["--keep-latest", "two"], "--keep-latest"),
                       (["--unused-for", "soon"], "--unused-for"),
                       (["--max-size=-1G"], "--max-size"),
                       (["--grace", "1x"], "--grace")):
        assert_one_line_error(run_jbl("store", "gc", *args, store=store_dir), 2, word)
    assert installed(store_dir) == ["rt@1.0.0"]


def test_rm_of_a_version_in_use_defers_until_the_job_ends(store_dir: Path) -> None:
    series(store_dir, "rt", ["1.0.0", "1.1.0"])
    job = ReadingJob(store_dir, "rt@1.0.0")
    want = expected_hashes(files_for("1.0.0"), "rt", "1.0.0")
    try:
        assert job.read_all() == want  # the control: the job reads it before the rm
        r = run_jbl("store", "rm", "rt@1.0.0", "--json", store=store_dir).ok()
        assert json.loads(r.out)["deferred"] == ["rt@1.0.0"]
        assert installed(store_dir) == ["rt@1.1.0"]  # hidden from new users at once
        # gc keeps it while the job runs, and the running job itself still reads every file
        assert gc(store_dir)["purged"] == []
        assert job.read_all() == want
    finally:
        job.end()
    out = gc(store_dir)
    assert out["purged"] == ["rt@1.0.0"] and out["freed_bytes"] > 0
    with Store.open(store_dir) as s:
        assert s.db.scalar("SELECT COUNT(*) FROM versions WHERE state='removed'") == 0
        assert s.db.scalar("SELECT COUNT(*) FROM leases") == 0


def test_gc_drops_the_lease_of_a_killed_job(store_dir: Path) -> None:
    series(store_dir, "rt", ["1.0.0", "1.1.0"])
    job = lease_holder(store_dir, "rt@1.0.0")
    job.kill()  # SIGKILL: its lease row stays behind
    job.wait()
    assert job.stdin is not None
    job.stdin.close()
    assert job.stdout is not None
    job.stdout.close()
    out = gc(store_dir, "--keep-latest", "1")
    assert out["removed"] == ["rt@1.0.0"]
    with Store.open(store_dir) as s:
        assert s.db.scalar("SELECT COUNT(*) FROM leases") == 0


def test_gc_says_which_versions_it_kept_because_they_are_in_use(store_dir: Path) -> None:
    series(store_dir, "rt", ["1.0.0", "1.1.0"])
    job = lease_holder(store_dir, "rt@1.0.0")
    try:
        out = gc(store_dir, "--keep-latest", "1")
        assert out["removed"] == [] and out["in_use"] == ["rt@1.0.0"]
        text = run_jbl("store", "gc", "--dry-run", "--keep-latest", "1", store=store_dir).ok().out
        assert "kept while in use by a job or a mount: rt@1.0.0" in text
    finally:
        job.communicate("")
    assert gc(store_dir, "--keep-latest", "1")["removed"] == ["rt@1.0.0"]
