"""``jbl run`` as an unprivileged user: a user namespace maps the user to themselves.

The user is created with useradd (root needed to set the test up); the jobs run via runuser.
"""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import cgroup_probe
import conftest_run
import pytest
from conftest_run import jbl

# fixtures, shared through a module rather than tests/conftest.py
rt = conftest_run.rt
runtimes = conftest_run.runtimes
shared_dir = conftest_run.shared_dir
test_user = conftest_run.test_user

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create the test user")


def test_job_runs_and_writes_volume_as_the_user(rt: str, test_user: str,
                                                shared_dir: Path) -> None:
    pw = pwd.getpwnam(test_user)
    os.chown(shared_dir, pw.pw_uid, pw.pw_gid)
    r = jbl("run", "--runtime-dir", rt, "--volume", f"{shared_dir}:/out", "--", "sh", "-c",
            "id -u; id -g; python3 -c 'import jblprobe; print(jblprobe.VERSION)'; "
            "echo data > /out/result; grep CapEff /proc/self/status; exit 3", user=test_user)
    assert r.returncode == 3, r.stderr
    assert r.stdout.splitlines() == [str(pw.pw_uid), str(pw.pw_gid), "1.0.0",
                                     "CapEff:\t0000000000000000"]
    st = (shared_dir / "result").stat()
    assert (st.st_uid, st.st_gid) == (pw.pw_uid, pw.pw_gid)


def test_unenforceable_limits_are_noted_once(rt: str, test_user: str) -> None:
    r = jbl("run", "--runtime-dir", rt, "--memory", "64M", "--pids", "10", "--", "true",
            user=test_user)
    assert r.returncode == 0, r.stderr
    notes = [line for line in r.stderr.splitlines() if "limits not enforced" in line]
    if cgroup_probe.limits_enforceable_for(test_user):  # decided from the host, not from jbl
        assert notes == [], r.stderr
    else:
        assert len(notes) == 1 and "memory, pids" in notes[0], r.stderr


def test_require_limits_makes_it_an_error(rt: str, test_user: str) -> None:
    r = jbl("run", "--runtime-dir", rt, "--memory", "64M", "--require-limits", "--", "true",
            user=test_user)
    if cgroup_probe.limits_enforceable_for(test_user):
        assert (r.returncode, r.stderr) == (0, ""), r.stderr
    else:
        assert r.returncode == 12 and r.stderr.count("\n") == 1, r.stderr
        assert r.stderr.startswith("jbl: error: limits not enforced: memory")


def test_user_cannot_read_what_they_could_not_read_anyway(rt: str, test_user: str,
                                                          shared_dir: Path) -> None:
    secret = shared_dir / "secret"
    secret.mkdir(mode=0o700)
    (secret / "key").write_text("root only")
    r = jbl("run", "--runtime-dir", rt, "--volume", f"{secret}:/s:ro", "--", "cat", "/s/key",
            user=test_user)
    assert r.returncode != 0 and "root only" not in r.stdout
    r = jbl("run", "--runtime-dir", rt, "--upload", str(secret / "key"), "--", "true",
            user=test_user)
    assert r.returncode == 2 and r.stderr.count("\n") == 1  # cannot even see it


def test_user_option_needs_root(rt: str, test_user: str) -> None:
    r = jbl("run", "--runtime-dir", rt, "--user", "root", "--", "true", user=test_user)
    assert (r.returncode, r.stderr) == (2, "jbl: error: --user needs root "
                                            "(without it, jobs run as you)\n")


def test_nonroot_timeout_without_cgroup_kills_everything(rt: str, test_user: str) -> None:
    r = jbl("run", "--runtime-dir", rt, "--timeout", "0.5s", "--kill-after", "0.5s", "--",
            "sh", "-c", "trap '' TERM; sleep 654.5 & sleep 654.5", user=test_user)
    assert r.returncode == 124, r.stderr
    from conftest_run import host_pids_with

    assert not host_pids_with("sleep 654.5")
