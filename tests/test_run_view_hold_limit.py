"""A private view that ``jbl run`` starts keeps a removed version no longer than the configured
``removed_hold_limit`` (issue 10, 6), as ``jbl mount``'s views do: the limit reaches the
view's daemon (its command line is read from the host), for a lingering view and for a
view mounted for one job, and a malformed value is one line before any view starts.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import JBL, run_jbl
from fixtures_mount import import_tarball, make_tarball
from jbl.fusefs import mounttab


def daemon_argv(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [a.decode() for a in f.read().split(b"\0")]


def private_views(store: Path) -> list[mounttab.MountStatus]:
    real = os.path.realpath(store)
    return [st for st in mounttab.records() if st.private and st.store == real]


@pytest.fixture
def store(rt_factory, store_dir: Path, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    import_tarball(store_dir, make_tarball(rt_factory("pyrt", "1.0.0"), tmp_path / "a.tar.gz"))
    return store_dir


@pytest.mark.parametrize("limit, passed", [("90s", "90.0"), ("never", "never")])
def test_a_lingering_view_gets_the_configured_limit(store: Path, tmp_path: Path, limit: str,
                                                    passed: str) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"removed_hold_limit: {limit}\n")
    env = {"JBL_CONFIG": str(cfg), "JBL_VIEW_LINGER": "60"}
    run_jbl("run", "--runtime", "pyrt", "--", "true", store=store, env=env).ok()
    views = private_views(store)
    try:
        assert len(views) == 1 and views[0].linger > 0, views
        argv = daemon_argv(views[0].pid)
        assert argv[argv.index("--removed-hold-limit") + 1] == passed, argv
    finally:
        for st in views:
            run_jbl("umount", st.mountpoint)


def test_a_view_for_one_job_gets_it_too(store: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("removed_hold_limit: 45s\n")
    env = {"JBL_CONFIG": str(cfg), "JBL_VIEW_LINGER": "0"}
    # the job itself cannot see the host's /proc: it prints a marker and the test looks at
    # the view while the job sleeps
    with subprocess.Popen([JBL, "--store", str(store), "run", "--runtime", "pyrt", "--",
                           "sh", "-c", "echo up; sleep 30"], stdout=subprocess.PIPE,
                          text=True, env={**os.environ, **env},
                          stdin=subprocess.DEVNULL) as p:
        try:
            assert p.stdout is not None and p.stdout.readline() == "up\n"
            views = private_views(store)
            assert len(views) == 1 and views[0].linger == 0, views
            argv = daemon_argv(views[0].pid)
            assert argv[argv.index("--removed-hold-limit") + 1] == "45.0", argv
        finally:
            p.terminate()
            p.wait(30)


def test_a_malformed_limit_is_one_line_and_starts_no_view(store: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("removed_hold_limit: soon\n")
    r = run_jbl("run", "--runtime", "pyrt", "--", "true", store=store,
                env={"JBL_CONFIG": str(cfg), "JBL_VIEW_LINGER": "60"})
    assert r.rc == 2 and r.err.count("\n") == 1 and "removed_hold_limit" in r.err, r.err
    assert private_views(store) == []
