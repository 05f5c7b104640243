"""The jobs admin service (runner/jobadmin.py, ``jbl job serve-admin``): members of the admin
group list, read and stop any user's jobs without being root; anyone else is refused; a
user's forged record cannot make root signal what that user could not. Real users
(tests/fixtures_users.py), real detached jobs, a real service process started here.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator

import conftest_run
import pytest
from fixtures_users import Users, as_user, user_jbl

rt = conftest_run.rt
runtimes = conftest_run.runtimes

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a root service and real users")


def wait_for(pred: Callable[[], object], what: str, deadline: float = 30.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def answers(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


@pytest.fixture
def service(users: Users) -> Iterator[subprocess.Popen[str]]:
    from jbl.runner.jobadmin import SOCKET

    if answers(str(SOCKET)):
        pytest.skip(f"a jobs admin service already answers on {SOCKET}")
    # the system-wide install, as systemd runs it: its helper runs as the job's user, who
    # cannot reach the development venv's interpreter
    p = subprocess.Popen([user_jbl(), "job", "serve-admin", "--group", users.admin_group],
                         stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: answers(str(SOCKET)) or p.poll() is not None, "the service")
        assert p.poll() is None, p.communicate()[1]
        yield p
    finally:
        p.send_signal(signal.SIGINT)
        p.communicate(timeout=30)
    assert not SOCKET.exists()


def detach(user: str, rt: str, *cmd: str) -> str:
    r = as_user(user, "run", "-d", "--runtime-dir", rt, "--", *cmd)
    assert r.rc == 0, r.err
    return r.out.strip()


def listed(user: str) -> dict[str, dict[str, object]]:
    r = as_user(user, "job", "list", "--all", "--json")
    assert r.rc == 0, r.err
    return {j["id"]: j for j in json.loads(r.out)}


def test_an_admin_lists_reads_and_stops_another_users_job_and_others_are_refused(
        rt: str, users: Users, service: subprocess.Popen[str]) -> None:
    a = detach(users.alice, rt, "sh", "-c", "echo from alice; exec sleep 120")
    mine = detach(users.carol, rt, "true")
    try:
        wait_for(lambda: listed(users.carol).get(a, {}).get("state") == "running",
                 "alice's job in carol's --all")
        every = listed(users.carol)
        assert every[a]["user"] == users.alice and every[mine]["user"] == users.carol
        table = as_user(users.carol, "job", "list", "--all").out.splitlines()
        assert table[0].split()[:3] == ["ID", "USER", "STATE"]
        assert {ln.split()[0]: ln.split()[1] for ln in table[1:]}[a] == users.alice
        st = as_user(users.carol, "job", "status", a, "--json")
        assert st.rc == 0 and json.loads(st.out)["user"] == users.alice, st.err
        wait_for(lambda: as_user(users.carol, "job", "log", a).out == "from alice\n",
                 "alice's log through the service")
        # bob is no member: refused, and to him alice's job does not exist
        r = as_user(users.bob, "job", "list", "--all")
        assert r.rc == 8 and r.err.count("\n") == 1 and users.admin_group in r.err, r.err
        for cmd in ("status", "stop"):
            r = as_user(users.bob, "job", cmd, a)
            assert r.rc == 3 and "no job" in r.err and r.err.count("\n") == 1, r.err
        # carol stops it, as root would
        r = as_user(users.carol, "job", "stop", a)
        assert r.rc == 0 and r.out.startswith(f"stopped {a}"), r.err
        rec = json.loads(as_user(users.alice, "job", "status", a, "--json").out)
        assert rec["state"] == "failed" and rec["exit_status"] != 0, rec
    finally:
        as_user(users.alice, "job", "stop", a)
        as_user(users.carol, "job", "rm", mine)


def test_a_forged_record_cannot_make_root_signal_another_process(
        rt: str, users: Users, service: subprocess.Popen[str]) -> None:
    """bob's record names the service's own pid and start time (root's process, alive,
    this boot): the stop carol asks for signals nothing and says so."""
    from jbl.runner.jobstore import boot_id, process_start

    job = detach(users.bob, rt, "true")
    db = users.home(users.bob) / ".local/state/jbl/jobs.db"
    forged = (f"UPDATE jobs SET state='running', ended=NULL, supervisor_pid={service.pid}, "
              f"supervisor_start={process_start(service.pid)}, boot_id='{boot_id()}' "
              f"WHERE id='{job}'")
    try:
        wait_for(lambda: listed(users.carol).get(job, {}).get("state") in ("done", "failed"),
                 "bob's ended job")
        subprocess.run(["runuser", "-u", users.bob, "--", "python3", "-c",
                        f"import sqlite3; c = sqlite3.connect({str(db)!r}); "
                        f"c.execute({forged!r}); c.commit(); c.close()"], check=True)
        wait_for(lambda: listed(users.carol)[job]["state"] == "running", "the forged record")
        r = as_user(users.carol, "job", "stop", job)
        assert r.rc == 8 and "nothing was signalled" in r.err and r.err.count("\n") == 1, r.err
        assert service.poll() is None  # root's service was not signalled
        assert listed(users.carol)[job]["state"] == "running"
    finally:
        as_user(users.bob, "job", "rm", job)


def test_without_the_service_an_admin_is_told_how_to_start_it(users: Users) -> None:
    from jbl.runner.jobadmin import SOCKET

    if answers(str(SOCKET)):
        pytest.skip(f"a jobs admin service answers on {SOCKET}")
    r = as_user(users.carol, "job", "list", "--all")
    assert r.rc == 8 and r.err.count("\n") == 1, r.err
    assert "not running" in r.err and "systemctl start jbl-jobs-admin.service" in r.err


def test_setup_writes_the_services_unit() -> None:
    from pathlib import Path

    from jbl.cli.setup_cmd import unit_texts

    units = unit_texts("/usr/local/bin/jbl", Path("/var/lib/jbl"), Path("/run/jbl/runtimes"),
                       "lab-admins")
    assert "\nExecStart=/usr/local/bin/jbl job serve-admin --group lab-admins\n" in units[
        "jbl-jobs-admin.service"]
