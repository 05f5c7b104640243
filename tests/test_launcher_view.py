"""A launcher's job process learns the store's view ahead of its request
(runner/warmview.py, ``fusefs.broker.learn``); a job uses what it learned only if the view is
still the same live mount (``Known.still``). Here the view changes between the learning and
the job: the job must still run, in the view that is live now, never in the one it learned.

Each test waits until a job process of the launcher holds the store's index open: it opens it
after learning the view, so from then on the job to come has a view it learned (the change
made next is what it must notice). Real launchers, real FUSE daemons, real jobs.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import JBL, run_jbl
from fixtures_mount import import_tarball, make_tarball, wait_until
from jbl.fusefs import mounttab

SPEC = "pyrt@1.0.0"
DEADLINE = 30.0  # seconds for a launcher and its job process to be ready (a loaded box)


@pytest.fixture(scope="module")
def tarball(rt_factory, tmp_path_factory: pytest.TempPathFactory) -> Path:  # type: ignore[no-untyped-def]
    return make_tarball(rt_factory("pyrt", "1.0.0"),
                        tmp_path_factory.mktemp("lview") / "pyrt-1.0.0.tar.gz")


@pytest.fixture
def store(tarball: Path, store_dir: Path) -> Iterator[Path]:
    import_tarball(store_dir, tarball)
    yield store_dir
    for v in views(store_dir):
        run_jbl("umount", str(v["mountpoint"]))


@pytest.fixture
def env(store: Path) -> Iterator[dict[str, str]]:
    """A launcher scope of this test's own, whose environment names the store (what its job
    processes prepare for: runner/warmview.py)."""
    e = dict(os.environ, JBL_LAUNCHER="1", JBL_VIEW_LINGER="30", JBL_STORE=str(store),
             PYTHON_JBL_TEST_SCOPE=secrets.token_hex(4))
    yield e
    subprocess.run([JBL, "launcher", "stop"], env=e, capture_output=True, timeout=30)


def jbl(env: dict[str, str], *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([JBL, *args], capture_output=True, text=True, timeout=60,
                          env={**env, **extra}, stdin=subprocess.DEVNULL)


def job(env: dict[str, str], store: Path, *cmd: str,
        **extra: str) -> subprocess.CompletedProcess[str]:
    assert env["JBL_STORE"] == str(store)
    return jbl(env, "run", "--runtime", SPEC, "--", *cmd, **extra)


def views(store: Path) -> list[dict[str, object]]:
    r = run_jbl("mount", "--status", "--json", store=store).ok()
    return [v for v in json.loads(r.out) if v["private"]]


def launched(env: dict[str, str], *cmd: str) -> tuple[int, str, str]:
    """Run a job that must go through the launcher: (rc, its output, stderr). Its record's
    supervisor is the launcher's job process, not the client (as in-process)."""
    p = subprocess.Popen([JBL, "run", "--json", "--runtime", SPEC, "--", *cmd], env=env,
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=60)
    at = out.find("{")
    assert at >= 0, err
    rec = json.loads(out[at:])
    st = json.loads(run_jbl("job", "status", rec["job_id"], "--json").ok().out)
    assert st["supervisor_pid"] != p.pid, "the job ran in-process, not in the launcher"
    return p.returncode, out[:at], err


def _descendants(pid: int) -> set[int]:
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        for k in map(int, kids):
            out.add(k)
            todo.append(k)
    return out


def _holds(pid: int, path: str) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == path:
                return True
        except OSError:
            continue
    return False


def ready(env: dict[str, str], store: Path) -> None:
    """Wait until a launcher serves this scope and one of its job processes has learned
    ``store``'s view (it holds the index open: runner/warmview.py opens it after learning).
    Watched through /proc: a status request is served by the spare, whose job process then
    gives up what it prepared."""
    index = str(Path(os.path.realpath(store)) / "index.db")
    deadline = time.monotonic() + DEADLINE
    st = json.loads(jbl(env, "launcher", "status", "--json").stdout)
    while not st["running"] and time.monotonic() < deadline:
        time.sleep(0.1)
        st = json.loads(jbl(env, "launcher", "status", "--json").stdout)
    while time.monotonic() < deadline:
        if st["running"] and any(_holds(p, index) for p in _descendants(int(st["pid"]))):
            return
        time.sleep(0.05)
    pytest.fail(f"no job process of the launcher learned the view within {DEADLINE}s")


def test_a_lingering_view_whose_daemon_died_after_it_was_learned_is_not_used(
        env: dict[str, str], store: Path) -> None:
    assert job(env, store, "/bin/true").returncode == 0  # in-process: the view, a launcher
    ready(env, store)
    [old] = views(store)
    os.kill(int(old["pid"]), signal.SIGKILL)  # type: ignore[call-overload]
    assert wait_until(lambda: mounttab.is_stale(str(old["mountpoint"])))
    rc, out, err = launched(env, "/bin/echo", "again")
    assert (rc, out) == (0, "again\n"), err
    [new] = views(store)
    assert new["mountpoint"] != old["mountpoint"] and new["state"] == "mounted"
    assert mounttab.mount_fstype(str(old["mountpoint"])) is None  # recovered: detached


def test_a_lingering_view_replaced_after_it_was_learned_is_not_used(
        env: dict[str, str], store: Path) -> None:
    assert job(env, store, "/bin/true").returncode == 0
    ready(env, store)
    [old] = views(store)
    run_jbl("umount", str(old["mountpoint"])).ok()
    assert job(env, store, "/bin/true", JBL_LAUNCHER="0").returncode == 0  # a new view
    [new] = views(store)
    assert new["mountpoint"] != old["mountpoint"]
    rc, out, err = launched(env, "/bin/echo", "again")
    assert (rc, out) == (0, "again\n"), err
    assert views(store) == [new]  # the job ran in the live one: no third view was made


def test_a_shared_mount_stopped_after_it_was_learned_is_not_used(
        env: dict[str, str], store: Path, tmp_path: Path) -> None:
    mp = tmp_path / "mnt"
    mp.mkdir()
    run_jbl("mount", str(mp), store=store).ok()
    try:
        assert job(env, store, "/bin/true").returncode == 0
        assert views(store) == []  # the shared mount served it
        ready(env, store)
    finally:
        run_jbl("umount", str(mp)).ok()
    rc, out, err = launched(env, "/bin/echo", "again")
    assert (rc, out) == (0, "again\n"), err
    assert len(views(store)) == 1  # a lingering view of its own now


def test_a_shared_mount_started_after_the_lingering_view_was_learned_is_preferred(
        env: dict[str, str], store: Path, tmp_path: Path) -> None:
    assert job(env, store, "/bin/true").returncode == 0  # a lingering view
    ready(env, store)
    mp = tmp_path / "mnt"
    mp.mkdir()
    run_jbl("mount", str(mp), store=store).ok()
    try:
        rc, out, err = launched(env, "python3", "-c",
                                "import os, sys; print(os.stat(sys.executable).st_dev)")
        assert rc == 0, err
        assert int(out) == os.stat(mp).st_dev  # the job's runtime came from the mount
    finally:
        run_jbl("umount", str(mp)).ok()
