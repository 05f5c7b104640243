"""A launcher's waiting sandbox helper does the plan's request-independent steps ahead
(runner/warm.py ``ahead_steps``): the session, no_new_privs, the PID, IPC, UTS and cgroup
namespaces (a user's: its user namespace), the fork of init; init makes the mount namespace
with the request. Real launchers, real jobs, real users.

Each test first finds the init made ahead (a waiting helper's child, both ``sandbox.py
--wait``) under its launcher, then checks the job ran as that init's child, so a job that
silently fell back to the usual path (a plan ``Helper.remaining`` refused) fails here. What
a job could observe differently is checked from inside it: a fresh ``/tmp`` per job,
``/proc`` of its own PID namespace, its cgroup namespace rooted at its own cgroup, its
hostname, its pty as controlling terminal, a user's network namespace (made by init with
the rest of the plan) with ``--network none`` and none with ``host``, a filesystem mounted
on the host after the helper was made.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import select
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import conftest_run
import pytest
from conftest import JBL
from fixtures_users import Users, as_user

rt = conftest_run.rt
runtimes = conftest_run.runtimes
DEADLINE = 30.0
SCOPE = "PYTHON_JBL_TEST_SCOPE"
NET = "echo net $(grep -o '^ *[^ :]*:' /proc/net/dev)"  # the interfaces, as "lo:"
FACTS = ("hostname; echo tmp $(ls -A /tmp | wc -l); touch /tmp/left-behind; "
         "echo pids $(ls /proc | grep '^[0-9]'); "
         "echo cgroups $(grep -c . /proc/self/cgroup) $(grep -vc ':/$' /proc/self/cgroup); "
         f"echo dev $(ls /dev); {NET}")


@pytest.fixture(scope="module")
def env() -> Iterator[dict[str, str]]:
    e = dict(os.environ, JBL_LAUNCHER="1", **{SCOPE: secrets.token_hex(4)})
    e.pop("JBL_STORE", None)
    yield e
    subprocess.run([JBL, "launcher", "stop"], env=e, capture_output=True, timeout=30)


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                stat = (p / "stat").read_bytes()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
            kids.setdefault(ppid, []).append(int(p.name))
    return kids


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def _waiting(pid: int) -> bool:
    argv = _cmdline(pid)
    return len(argv) > 4 and argv[3].endswith("sandbox.py") and argv[4] == "--wait"


def ahead_init(launcher: int) -> tuple[int, int]:
    """(helper, init) of the launcher's idle spare, once its init is made, ahead."""
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        kids = _children()
        todo, seen = [launcher], []
        while todo:
            pid = todo.pop()
            seen.append(pid)
            todo += kids.get(pid, [])
        for pid in seen:
            if _waiting(pid):
                inits = [k for k in kids.get(pid, []) if _waiting(k)]
                if inits and not kids.get(inits[0]):  # an init with no job yet
                    return pid, inits[0]
        time.sleep(0.05)
    pytest.fail(f"no helper of launcher {launcher} made its init ahead within {DEADLINE}s")


def launcher_pid(status: subprocess.CompletedProcess[str]) -> int:
    assert status.returncode == 0, status.stderr
    st = json.loads(status.stdout)
    return int(st["pid"]) if st["running"] else 0


def wait_launcher(env: dict[str, str], rt: str) -> int:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        pid = launcher_pid(subprocess.run([JBL, "launcher", "status", "--json"], env=env,
                                          capture_output=True, text=True, timeout=60))
        if pid:
            return pid
        r = subprocess.run([JBL, "run", "--runtime-dir", rt, "--", "true"], env=env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        time.sleep(0.1)
    pytest.fail(f"no launcher came up within {DEADLINE}s")


def facts(out: str) -> dict[str, str]:
    lines = out.splitlines()
    got = {"hostname": lines[0]}
    got.update(line.split(" ", 1) for line in lines[1:] if " " in line)
    return got


def interfaces(line: str) -> list[str]:
    return sorted(w.rstrip(":") for w in line.split()[1:])


def test_a_launched_job_runs_under_the_init_made_ahead_in_a_fresh_sandbox(
        env: dict[str, str], rt: str, tmp_path: Path) -> None:
    seen_tmp = []
    for n in range(2):  # the second job's helper was made after the first left /tmp dirty
        launcher = wait_launcher(env, rt)
        helper, init = ahead_init(launcher)
        out = tmp_path / f"job{n}"
        out.mkdir()
        proc = subprocess.Popen(
            [JBL, "run", "--json", "--runtime-dir", rt, "--volume", f"{out}:/out", "--",
             "sh", "-c", f"({FACTS}) > /out/facts; echo up > /out/started; read x"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=env)
        deadline = time.monotonic() + DEADLINE
        while not (out / "started").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the job never started"
            time.sleep(0.02)
        job = _children().get(init, [])
        assert len(job) == 1 and _cmdline(job[0])[0] == "sh", (init, job)
        host_cgroup = Path(f"/proc/{job[0]}/cgroup").read_text()
        o, e = proc.communicate("go\n", timeout=60)
        assert proc.returncode == 0, e
        rec = json.loads(o)
        got = facts((out / "facts").read_text())
        assert got["hostname"] == rec["job_id"]
        assert f"/jbl/{rec['job_id']}\n" in host_cgroup  # its own cgroup, seen from the host
        lines, elsewhere = got["cgroups"].split()
        assert int(lines) > 0 and elsewhere == "0"  # its cgroup namespace is rooted there
        pids = [int(p) for p in got["pids"].split()]
        assert 1 in pids and max(pids) < 50 and init not in pids and helper not in pids
        assert {"null", "zero", "urandom", "tty", "pts", "shm", "ptmx"} <= set(got["dev"].split())
        assert interfaces("net " + got["net"]) == ["lo"]  # --network none: loopback only
        seen_tmp.append(got["tmp"])
        assert not Path(f"/proc/{init}").exists() and not Path(f"/proc/{helper}").exists()
    assert seen_tmp == ["0", "0"]  # each job its own empty /tmp


def test_a_filesystem_mounted_after_the_helper_was_made_reaches_the_job(
        env: dict[str, str], rt: str, tmp_path: Path) -> None:
    """The host's ``/`` is private here: a mount namespace copied ahead would never see a
    view or a volume's filesystem mounted since (init copies the host's mounts with the
    request)."""
    launcher = wait_launcher(env, rt)
    _, init = ahead_init(launcher)
    fs = tmp_path / "fs"
    fs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "jbl-test", str(fs)], check=True)
    try:
        (fs / "fresh").write_text("mounted after\n")
        r = subprocess.run([JBL, "run", "--runtime-dir", rt, "--volume", f"{fs}:/v", "--",
                            "cat", "/v/fresh"], env=env, capture_output=True, text=True,
                           timeout=60, stdin=subprocess.DEVNULL)
        assert (r.returncode, r.stdout, r.stderr) == (0, "mounted after\n", ""), r.stderr
        assert not Path(f"/proc/{init}").exists()  # it went through the init made ahead
    finally:
        subprocess.run(["umount", str(fs)], check=True)


def test_a_launched_job_with_a_tty_has_its_pty_as_controlling_terminal(
        env: dict[str, str], rt: str) -> None:
    """With a terminal the job process forks the job's supervisor behind a front
    (runner/foreground.py): the supervisor takes nothing made ahead (``warm.owner``), so the
    init made ahead is discarded, and the job gets its pty as controlling terminal."""
    launcher = wait_launcher(env, rt)
    _, init = ahead_init(launcher)
    master, slave = os.openpty()
    try:  # setsid -c: the client's controlling terminal is the pty, as a login's would be
        proc = subprocess.Popen(
            ["setsid", "-w", "-c", JBL, "run", "--runtime-dir", rt, "--", "sh", "-c",
             "exec 3</dev/tty && echo CTTY-OK; readlink /proc/self/fd/0; echo PPID $PPID"],
            stdin=slave, stdout=slave, stderr=slave, env=env)
        os.close(slave)
        slave = -1
        text = b""
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            if select.select([master], [], [], 0.2)[0]:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every holder of the slave is gone
                    break
                if not chunk:
                    break
                text += chunk
            elif proc.poll() is not None:
                break
        assert proc.wait(timeout=60) == 0, text
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    out = text.decode(errors="replace").replace("\r\n", "\n")
    assert re.search(r"^CTTY-OK\n/dev/pts/\d+\nPPID 1\n", out, re.M), out  # its own pty
    deadline = time.monotonic() + DEADLINE
    while Path(f"/proc/{init}").exists():  # not used, and not left behind
        assert time.monotonic() < deadline, "the init made ahead outlived its job process"
        time.sleep(0.05)


def test_an_isolated_job_through_the_launcher_makes_its_own_helper(
        env: dict[str, str], rt: str) -> None:
    """Its plan does not fit the helper made ahead (slirp4netns joins the namespaces the
    plan makes): that helper and its cgroup are discarded first, the job's cgroup takes the
    same name."""
    import shutil

    if shutil.which("slirp4netns") is None:
        pytest.skip("no slirp4netns")
    launcher = wait_launcher(env, rt)
    _, init = ahead_init(launcher)
    r = subprocess.run([JBL, "run", "--runtime-dir", rt, "--network", "isolated", "--", "sh",
                        "-c", NET], env=env, capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    assert "lo" in interfaces(r.stdout) and len(interfaces(r.stdout)) == 2  # lo and slirp's
    assert not Path(f"/proc/{init}").exists()


@pytest.fixture(scope="module")
def user_rt() -> Iterator[str]:
    import shutil

    from fixtures_users import shared_dir
    from rtbuild import build_runtime

    base = shared_dir("jbl-ahead-rt-")
    yield str(build_runtime(base / "rt", "art", "1.0.0"))
    shutil.rmtree(base, ignore_errors=True)


def test_a_users_launched_job_gets_its_network_namespace_from_init(
        users: Users, user_rt: str) -> None:
    """A user's helper makes its user namespace ahead, without a network namespace: init
    makes one (``UnshareNet``) for ``--network none``, none for ``host``."""
    env = {"JBL_LAUNCHER": "1", SCOPE: secrets.token_hex(4)}
    user = users.alice
    try:
        for network, want in (("none", "lo"), ("host", None)):
            deadline = time.monotonic() + DEADLINE
            launcher = 0
            while not launcher:
                st = as_user(user, "launcher", "status", "--json", env=env)
                launcher = launcher_pid(subprocess.CompletedProcess([], st.rc, st.out, st.err))
                if not launcher:
                    r = as_user(user, "run", "--runtime-dir", user_rt, "--", "true", env=env)
                    assert r.rc == 0, r.err
                    assert time.monotonic() < deadline, "no launcher of the user came up"
            helper, init = ahead_init(launcher)
            assert os.stat(f"/proc/{init}").st_uid == users.uid(user)
            r = as_user(user, "run", "--runtime-dir", user_rt, "--network", network, "--",
                        "sh", "-c", f"{NET}; id -u",
                        env=env)
            assert r.rc == 0, r.err
            net, uid = r.out.split("\n")[:2]
            assert uid == str(users.uid(user))
            if want is not None:
                assert interfaces(net) == [want]
            else:  # the host's interfaces
                assert interfaces(net) == sorted(os.listdir("/sys/class/net"))
            assert not Path(f"/proc/{init}").exists(), "the job did not use the init made ahead"
    finally:
        as_user(user, "launcher", "stop", env=env)


def test_an_idle_helper_and_its_init_go_with_the_launcher(env: dict[str, str],
                                                          rt: str) -> None:
    """A spare that never gets a request: EOF ends init, then the helper, then its cgroup
    is removed: nothing is left behind."""
    launcher = wait_launcher(env, rt)
    helper, init = ahead_init(launcher)
    cgroup = next(line.split(":", 2)[2] for line in
                  Path(f"/proc/{init}/cgroup").read_text().splitlines()
                  if ":pids:" in line or line.startswith("0::"))
    base = Path("/sys/fs/cgroup/pids") if Path("/sys/fs/cgroup/pids").is_dir() else \
        Path("/sys/fs/cgroup")
    assert cgroup.startswith("/jbl/job-") and (base / cgroup.lstrip("/")).is_dir()
    subprocess.run([JBL, "launcher", "stop"], env=env, capture_output=True, timeout=30)
    deadline = time.monotonic() + DEADLINE
    while any(Path(f"/proc/{p}").exists() for p in (launcher, helper, init)) or \
            (base / cgroup.lstrip("/")).exists():
        assert time.monotonic() < deadline, "the idle spare left something behind"
        time.sleep(0.05)
