"""With no ``jbl mount`` running, a user's ``jbl run``s share one private view of the store
that outlives the last job by ``JBL_VIEW_LINGER`` seconds (fusefs/linger.py).

Every test here ends with no view left: the ``store`` fixture stops whatever still serves it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import JBL, run_jbl
from fixtures_mount import (  # noqa: F401 - fixture
    import_tarball,
    make_tarball,
    other_user,
    wait_until,
)
from jbl.fusefs import mounttab
from jbl.store.store import proc_starttime
from procs import reap

SPEC = "pyrt@1.0.0"


@pytest.fixture(scope="module")
def tarball(rt_factory, tmp_path_factory: pytest.TempPathFactory) -> Path:  # type: ignore[no-untyped-def]
    return make_tarball(rt_factory("pyrt", "1.0.0"),
                        tmp_path_factory.mktemp("linger") / "pyrt-1.0.0.tar.gz")


@pytest.fixture
def store(tarball: Path, store_dir: Path) -> Iterator[Path]:
    import_tarball(store_dir, tarball)
    yield store_dir
    for v in views(store_dir):
        run_jbl("umount", v["mountpoint"])


def run(store: Path, *cmd: str, linger: str = "1") -> subprocess.CompletedProcess[str]:
    return subprocess.run([JBL, "--store", str(store), "run", "--runtime", SPEC, "--", *cmd],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "JBL_VIEW_LINGER": linger})


def start(store: Path, *cmd: str, linger: str = "1") -> subprocess.Popen[str]:
    return subprocess.Popen([JBL, "--store", str(store), "run", "--runtime", SPEC, "--", *cmd],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "JBL_VIEW_LINGER": linger})


def views(store: Path) -> list[dict[str, object]]:
    """The store's private views, as ``jbl mount --status --json`` lists them."""
    r = run_jbl("mount", "--status", "--json", store=store).ok()
    return [v for v in json.loads(r.out) if v["private"]]


def daemons_started(store: Path) -> int:
    return (store / "run/mount.log").read_text().count(" INFO mounted ")



def test_back_to_back_jobs_reuse_one_view_which_goes_away_after_the_linger(store: Path) -> None:
    first = run(store, "/bin/echo", "one", linger="3")
    assert (first.returncode, first.stdout) == (0, "one\n"), first.stderr
    [view] = views(store)
    pid = int(view["pid"])  # type: ignore[call-overload]
    assert run(store, "/bin/echo", "two", linger="3").stdout == "two\n"
    assert [v["pid"] for v in views(store)] == [pid]
    assert daemons_started(store) == 1

    # the last job set the clock: the daemon unmounts and exits one linger after it
    done = time.monotonic()
    assert wait_until(lambda: proc_starttime(pid) is None, 8)
    assert time.monotonic() - done > 2
    mp = str(view["mountpoint"])
    assert mounttab.mount_fstype(mp) is None and not os.path.exists(mp)
    assert views(store) == []


def test_the_pyfuse3_engine_s_lingering_view_also_goes_away_by_itself(store: Path) -> None:
    # the idle stop condition is the serve skeleton's (fusefs/stop.py), for both engines
    r = subprocess.run([JBL, "--store", str(store), "run", "--runtime", SPEC, "--", "/bin/true"],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "JBL_VIEW_LINGER": "1", "JBL_MOUNT_ENGINE": "pyfuse3"})
    assert r.returncode == 0, r.stderr
    [view] = views(store)
    assert view["engine"] == "pyfuse3"
    assert wait_until(lambda: proc_starttime(int(view["pid"])) is None, 8)  # type: ignore[call-overload]
    assert mounttab.mount_fstype(str(view["mountpoint"])) is None and views(store) == []


def test_concurrent_jobs_share_one_view(store: Path) -> None:
    # four jobs started at once (none finds a view yet), all running together until the
    # test has seen them all up: they overlap, so sharing cannot come from serial reuse
    jobs = [subprocess.Popen([JBL, "--store", str(store), "run", "--runtime", SPEC, "--",
                              "/bin/sh", "-c", "echo up; read x; echo done"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "JBL_VIEW_LINGER": "2"}) for _ in range(4)]
    try:
        for j in jobs:
            assert j.stdout is not None and j.stdout.readline() == "up\n"
        assert daemons_started(store) == 1
        [view] = views(store)
        outs = [j.communicate("go\n", timeout=60) for j in jobs]
    finally:
        for j in jobs:
            reap(j)
    assert [(j.returncode, o) for j, (o, _e) in zip(jobs, outs, strict=True)] == \
        [(0, "done\n")] * 4, [e for _o, e in outs]
    assert daemons_started(store) == 1
    assert [v["pid"] for v in views(store)] == [view["pid"]]


def test_a_running_job_keeps_the_view_beyond_the_linger(store: Path) -> None:
    # the job goes on only when told (not after a sleep of its own that a loaded machine
    # could outrun), and then reads through the view it kept
    job = start(store, "/bin/sh", "-c",
                "echo ready; read go; python3 -c 'import jblprobe; print(jblprobe.VERSION)'")
    try:
        assert job.stdout is not None and job.stdout.readline() == "ready\n"
        [view] = views(store)
        time.sleep(2.5)  # well past the 1 s linger (a non-event: nothing to wait on instead)
        assert views(store) == [view]
        out, err = job.communicate("go\n", timeout=60)
    finally:
        reap(job)
    assert (job.returncode, out) == (0, "1.0.0\n"), err
    assert daemons_started(store) == 1


def test_a_killed_jbl_run_does_not_keep_the_view_alive(store: Path) -> None:
    job = start(store, "/bin/sh", "-c", "echo ready; exec sleep 60")
    try:
        assert job.stdout is not None
        assert job.stdout.readline() == "ready\n"
        [view] = views(store)
        pid = int(view["pid"])  # type: ignore[call-overload]
        job.send_signal(signal.SIGKILL)
        job.communicate()
    finally:
        reap(job)
    assert wait_until(lambda: proc_starttime(pid) is None, 8), "the view outlived its linger"
    assert views(store) == []


def test_a_dead_daemons_stale_view_is_recovered_by_the_next_job(store: Path) -> None:
    assert run(store, "/bin/true", linger="30").returncode == 0
    [view] = views(store)
    os.kill(int(view["pid"]), signal.SIGKILL)  # type: ignore[call-overload]
    assert wait_until(lambda: mounttab.is_stale(str(view["mountpoint"])))
    r = run(store, "/bin/echo", "again", linger="1")
    assert (r.returncode, r.stdout) == (0, "again\n"), r.stderr
    assert mounttab.mount_fstype(str(view["mountpoint"])) is None  # detached, dir gone
    assert not os.path.exists(str(view["mountpoint"]))
    assert daemons_started(store) == 2


def test_linger_zero_mounts_a_view_per_job(store: Path) -> None:
    for _ in range(2):
        r = run(store, "/bin/true", linger="0")
        assert r.returncode == 0, r.stderr
        assert views(store) == []  # gone when the job is
    assert daemons_started(store) == 2


def test_a_malformed_linger_is_one_line_error(store: Path) -> None:
    r = run(store, "/bin/true", linger="soon")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "JBL_VIEW_LINGER" in r.stderr and "Traceback" not in r.stderr


def test_root_s_lingering_view_is_out_of_other_users_reach(store: Path,
                                                           other_user: str) -> None:  # noqa: F811
    job = start(store, "/bin/sh", "-c", "echo ready; exec sleep 60")
    try:
        assert job.stdout is not None and job.stdout.readline() == "ready\n"
        [view] = views(store)
        mp = Path(str(view["mountpoint"]))
        assert (mp.parent.stat().st_mode & 0o777, mp.parent.stat().st_uid) == (0o700, 0)
        p = subprocess.run(["runuser", "-u", other_user, "--", "ls", f"{mp}/pyrt"],
                           capture_output=True, text=True)
        assert p.returncode != 0 and "Permission denied" in p.stderr
    finally:
        job.terminate()
        job.communicate(timeout=30)
