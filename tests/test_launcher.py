"""The resident launcher (runner/launcher.py): real launcher processes, real jobs, real users.

Every test runs in a launcher scope of its module's own (a ``PYTHON_JBL_TEST_SCOPE`` variable
is part of the scope: runner/launchproto.facts), so no other jbl on the machine shares it.
"Went through the launcher" is proved by process ancestry and by the launcher's own request
counter, never by timing: an in-process ``jbl run`` is the parent of its sandbox helper, a
launched one has no child at all (the launcher's job process is).
"""

from __future__ import annotations

import array
import contextlib
import functools
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import conftest_run
import pytest
from conftest import JBL
from fixtures_users import Users, as_user, sh_as, shared_dir

rt = conftest_run.rt
runtimes = conftest_run.runtimes
DEADLINE = 30.0  # seconds for a launcher to come up (a Python start + imports, loaded box)
SCOPE = "PYTHON_JBL_TEST_SCOPE"


@pytest.fixture(scope="module")
def env() -> Iterator[dict[str, str]]:
    e = dict(os.environ, JBL_LAUNCHER="1", **{SCOPE: secrets.token_hex(4)})
    e.pop("JBL_STORE", None)
    yield e
    subprocess.run([JBL, "launcher", "stop"], env=e, capture_output=True, timeout=30)


def jbl(env: dict[str, str], *args: str, input: str | None = None,
        extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([JBL, *args], input=input, capture_output=True, text=True,
                          env={**env, **(extra or {})}, timeout=60,
                          stdin=None if input is not None else subprocess.DEVNULL)


def status(env: dict[str, str]) -> dict[str, object]:
    import json

    r = jbl(env, "launcher", "status", "--json")
    assert r.returncode == 0, r.stderr
    out: dict[str, object] = json.loads(r.stdout)
    return out


def wait_launcher(env: dict[str, str], rt: str, other_than: object = None) -> dict[str, object]:
    """A launcher serving this scope (a job started with none running starts one)."""
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        st = status(env)
        if st["running"] and st["pid"] != other_than:
            return st
        if not st["running"]:
            r = jbl(env, "run", "--runtime-dir", rt, "--", "true")
            assert r.returncode == 0, r.stderr
        time.sleep(0.1)
    pytest.fail(f"no launcher came up within {DEADLINE}s: {status(env)}")


def children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(c) for c in text.split()]


def wait_file(path: Path, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + DEADLINE
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def blocked_job(env: dict[str, str], rt: str, out: Path,
                extra: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """A job that says it started (``out/started``), then waits for a line on stdin."""
    script = "echo up > /out/started; read x; echo done $x; echo bye >&2; exit 5"
    return subprocess.Popen(
        [JBL, "run", "--runtime-dir", rt, "--volume", f"{out}:/out", "--", "sh", "-c", script],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**env, **(extra or {})})


def launched(env: dict[str, str], rt: str, tmp: Path,
             extra: dict[str, str] | None = None) -> tuple[bool, int, str, str]:
    """Run ``blocked_job`` to its end: (was the client the job's supervisor, rc, out, err)."""
    out = tmp / secrets.token_hex(3)
    out.mkdir()
    proc = blocked_job(env, rt, out, extra)
    wait_file(out / "started", proc)
    in_process = bool(children(proc.pid))
    o, e = proc.communicate("go\n", timeout=60)
    return in_process, proc.returncode, o, e


def code_may_change(test: Callable[..., None]) -> Callable[..., None]:
    """Run ``test`` again (twice at most) when it failed while jbl's code changed under it:
    an edit made meanwhile (this tree is shared) retires the launcher, whose token no longer
    matches, and the next job rightly runs in-process. A failure with the code unchanged is
    reported at once. Each attempt gets a ``tmp_path`` of its own."""

    @functools.wraps(test)
    def run(*args: object, **kwargs: object) -> None:
        from jbl.runner.launchproto import token

        base = kwargs.get("tmp_path")
        for attempt in range(3):
            if isinstance(base, Path):
                kwargs["tmp_path"] = base / f"attempt{attempt}"
                kwargs["tmp_path"].mkdir()  # type: ignore[attr-defined]
            before = token()
            try:
                test(*args, **kwargs)
                return
            except AssertionError:
                if attempt == 2 or token() == before:
                    raise

    return run


@code_may_change
def test_second_run_goes_through_launcher_same_io(env: dict[str, str], rt: str,
                                                  tmp_path: Path) -> None:
    before = wait_launcher(env, rt)
    in_process, rc, out, err = launched(env, rt, tmp_path)
    after = status(env)
    assert not in_process, "the client supervised the job itself"
    # it counts requests: the job's, then this status query's own
    assert after["served"] == before["served"] + 2  # type: ignore[operator]
    assert (rc, out) == (5, "done go\n")
    assert err == "bye\n"  # stderr apart from stdout, nothing of jbl's own
    # the same job in-process: the same status, output and separation
    ref = launched(env, rt, tmp_path, {"JBL_LAUNCHER": "0"})
    assert ref == (True, 5, "done go\n", "bye\n")


@code_may_change
def test_usage_error_through_launcher_is_one_line_exit_2(env: dict[str, str], rt: str) -> None:
    before = wait_launcher(env, rt)
    r = jbl(env, "run", "--runtime-dir", rt, "--memory", "12Q", "--", "true")
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr.startswith("jbl: error: invalid --memory '12Q'") and \
        r.stderr.count("\n") == 1, r.stderr
    st = status(env)
    if st.get("pid") == before["pid"]:
        assert st["served"] == before["served"] + 2  # type: ignore[operator]
    ok = jbl(env, "run", "--runtime-dir", rt, "--", "sh", "-c", "echo fine")
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, "fine\n", "")


@code_may_change
def test_disabled_by_env(env: dict[str, str], rt: str, tmp_path: Path) -> None:
    before = wait_launcher(env, rt)
    in_process, rc, out, _ = launched(env, rt, tmp_path, {"JBL_LAUNCHER": "0"})
    assert in_process and (rc, out) == (5, "done go\n")
    st = status(env)
    assert st.get("served") == before["served"] + 1 or st.get("pid") != before["pid"]  # type: ignore[operator]


@code_may_change
def test_launched_job_gets_its_limits_and_umask_in_a_cgroup_made_ahead(
        env: dict[str, str], rt: str) -> None:
    """The launcher's job process makes the job's cgroup and sandbox helper before the
    request (runner/warm.py): the request's limits still hold, the caller's umask still
    reaches the job, and the cgroup (named for the job) is gone after."""
    import json

    import cgroup_probe

    before = wait_launcher(env, rt)
    hog = subprocess.run(
        [JBL, "run", "--json", "--runtime-dir", rt, "--memory", "48M", "--", "python3", "-c",
         "import os; print(oct(os.umask(0)), flush=True); b = bytearray(256 << 20); "
         "print('survived')"],
        capture_output=True, text=True, env=env, timeout=60, umask=0o027,
        stdin=subprocess.DEVNULL)
    assert hog.returncode == 138, hog.stderr
    assert hog.stdout.startswith("0o27\n") and "survived" not in hog.stdout
    rec = json.loads(hog.stdout[hog.stdout.index("{"):])
    assert rec["reason"] == "oom", rec
    bomb = jbl(env, "run", "--runtime-dir", rt, "--pids", "4", "--", "python3", "-c",
               "import os, time\nn = 0\ntry:\n    while n < 50:\n"
               "        if os.fork() == 0:\n            time.sleep(5); os._exit(0)\n"
               "        n += 1\nexcept OSError:\n    print('stopped', n)")
    assert (bomb.returncode, bomb.stdout) == (0, "stopped 3\n"), bomb.stderr  # 4, python's 1
    st = status(env)
    assert st.get("pid") == before["pid"] and st["served"] == before["served"] + 3  # type: ignore[operator]
    base = Path("/sys/fs/cgroup") if cgroup_probe.is_v2() else Path("/sys/fs/cgroup/pids")
    assert not (base / "jbl" / rec["job_id"]).exists()


@code_may_change
def test_launcher_sigkilled_mid_job(env: dict[str, str], rt: str, tmp_path: Path) -> None:
    before = wait_launcher(env, rt)
    out = tmp_path / "k"
    out.mkdir()
    proc = blocked_job(env, rt, out)
    wait_file(out / "started", proc)
    assert not children(proc.pid)
    os.kill(int(before["pid"]), signal.SIGKILL)  # type: ignore[call-overload]
    o, e = proc.communicate("still\n", timeout=60)
    assert (proc.returncode, o, e) == (5, "done still\n", "bye\n")  # the job ran on
    listed = jbl(env, "job", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert '"running"' not in listed.stdout  # its record ended too (never "running")
    # the next run cleans the dead launcher's socket and starts a new one
    st = status(env)
    assert not st["running"]
    again = wait_launcher(env, rt, other_than=before["pid"])
    assert again["pid"] != before["pid"]


@code_may_change
def test_sigkilled_client_takes_its_job_with_it(env: dict[str, str], rt: str,
                                                tmp_path: Path) -> None:
    """As an in-process ``jbl run`` SIGKILLed (test_run_jobs): the relay sees the client's
    connection close and hangs the job up; nothing of it stays, its record ends."""
    from cgroup_probe import pids_running

    wait_launcher(env, rt)
    marker = f"913.{secrets.randbelow(10**6)}"  # this run's job only
    script = (f"sleep {marker} & until grep -qs {marker} /proc/$!/cmdline; do :; done; "
              "echo up > /out/started; wait")
    proc = subprocess.Popen([JBL, "run", "--runtime-dir", rt, "--volume", f"{tmp_path}:/out",
                             "--", "sh", "-c", script], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_file(tmp_path / "started", proc)  # type: ignore[arg-type]
        assert not children(proc.pid) and len(pids_running("sleep", marker)) == 1
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + DEADLINE
    while pids_running("sleep", marker) and time.monotonic() < deadline:
        time.sleep(0.02)
    left = pids_running("sleep", marker)
    for pid in left:  # a failing run must not leave the job behind
        os.kill(pid, signal.SIGKILL)
    assert not left
    import json

    def running() -> list[object]:
        r = jbl(env, "job", "list", "--json")
        return [j for j in json.loads(r.stdout) if j["state"] == "running"]

    while running() and time.monotonic() < deadline:  # the job process writes it at its end
        time.sleep(0.05)
    assert not running()


@code_may_change
def test_a_client_that_gives_up_before_committing_never_gets_its_job_run(
        env: dict[str, str], rt: str, tmp_path: Path) -> None:
    """The protocol's two steps (runner/launchproto.py): a request answered ``ready`` runs
    only after the client's ``g``; one that closes instead (it timed out and runs the job
    itself) must never see it run in the launcher too."""
    from jbl.runner import launchproto

    st = wait_launcher(env, rt)
    scope = subprocess.run(
        [sys.executable, "-c", "from jbl.runner import launchproto as p; print(p.scope(), end='')"],
        env=env, capture_output=True, text=True, check=True).stdout
    assert launchproto.socket_path(launchproto.launcher_dir(env), launchproto.key(scope)) == \
        st["socket"]
    argv = ["run", "--runtime-dir", rt, "--volume", f"{tmp_path}:/out", "--", "sh", "-c"]
    data = launchproto.encode_request(
        "run", scope, [*argv, "echo ran > /out/abandoned"],
        {k.encode(): v.encode() for k, v in env.items()}, 0o22)
    cwd = os.open("/", os.O_PATH | os.O_DIRECTORY)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(st["socket"]))
        null = os.open(os.devnull, os.O_RDWR)
        try:
            s.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                array.array("i", [null, null, null, cwd]))])
        finally:
            os.close(null)
            os.close(cwd)
        assert s.recv(64) == b"ready\n"
        # no "g" (held open meanwhile): a committed job beside it runs, this one does not
        r = jbl(env, *argv, "echo ran > /out/committed")
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "committed").read_text() == "ran\n"
        assert not (tmp_path / "abandoned").exists()
    # and closing without "g" never starts it either (the client runs it itself)
    r = jbl(env, *argv, "echo ran > /out/after")
    assert r.returncode == 0 and (tmp_path / "after").exists(), r.stderr
    assert not (tmp_path / "abandoned").exists()


@code_may_change
def test_older_code_launcher_is_not_used(env: dict[str, str], rt: str, tmp_path: Path) -> None:
    old = status(env)
    jbl(env, "launcher", "stop")
    deadline = time.monotonic() + DEADLINE
    while old.get("pid") and Path(f"/proc/{old['pid']}").exists():  # its lock goes with it
        assert time.monotonic() < deadline, old
        time.sleep(0.02)
    fake = subprocess.Popen([sys.executable, "-m", "jbl.runner.launcher", "serve",
                             "--claim-token", "0ld.1"], env=env, cwd="/",
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + DEADLINE
        while "other code" not in str(status(env).get("why")):
            assert fake.poll() is None, fake.communicate()
            assert time.monotonic() < deadline, status(env)
            time.sleep(0.05)
        in_process, rc, out, err = launched(env, rt, tmp_path)
        assert in_process and (rc, out, err) == (5, "done go\n", "bye\n")
    finally:
        fake.terminate()
        _, err = fake.communicate(timeout=30)
    assert (fake.returncode, err) == (0, "")


@pytest.fixture(scope="module")
def user_rt() -> Iterator[str]:
    from rtbuild import build_runtime

    base = shared_dir("jbl-launcher-rt-")
    yield str(build_runtime(base / "rt", "lrt", "1.0.0"))
    import shutil

    shutil.rmtree(base, ignore_errors=True)


def _user_status(user: str, env: dict[str, str]) -> dict[str, object]:
    import json

    r = as_user(user, "launcher", "status", "--json", env=env)
    assert r.rc == 0, r.err
    out: dict[str, object] = json.loads(r.out)
    return out


def _user_launcher(user: str, env: dict[str, str], rt: str) -> dict[str, object]:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        st = _user_status(user, env)
        if st["running"]:
            return st
        r = as_user(user, "run", "--runtime-dir", rt, "--", "true", env=env)
        assert r.rc == 0, r.err
        time.sleep(0.1)
    pytest.fail(f"no launcher of {user} within {DEADLINE}s")


RETIRED: list[str] = []  # what each attempt that saw a launcher change saw


def _side_by_side(users: Users, env: dict[str, str], rt: str) -> bool:
    """One attempt; False when a launcher was retired meanwhile (another test session's
    ``make install`` refreshes /opt/jbl: its code token changes) and counts mean nothing."""
    sts = {u: _user_launcher(u, env, rt) for u in (users.alice, users.bob)}
    a, b = sts[users.alice], sts[users.bob]
    assert a["pid"] != b["pid"] and a["socket"] != b["socket"]
    for u in (users.alice, users.bob):
        pid = int(sts[u]["pid"])  # type: ignore[call-overload]
        assert os.stat(f"/proc/{pid}").st_uid == users.uid(u)
        sock = Path(str(sts[u]["socket"]))
        assert str(sock).startswith(f"/home/{u}/")
        st = os.stat(sock.parent)
        assert (st.st_uid, st.st_mode & 0o777) == (users.uid(u), 0o700)
    # each user's jobs go through their own launcher only
    r = as_user(users.alice, "run", "--runtime-dir", rt, "--", "echo", "a", env=env)
    assert (r.rc, r.out) == (0, "a\n"), r.err
    a2, b2 = _user_status(users.alice, env), _user_status(users.bob, env)
    if (a2.get("pid"), b2.get("pid")) != (a["pid"], b["pid"]):
        RETIRED.append(f"before {a}, {b}; after {a2}, {b2}")
        return False
    assert a2["served"] == a["served"] + 2  # type: ignore[operator]
    assert b2["served"] == b["served"] + 1  # type: ignore[operator]  # its own query only
    # bob cannot reach alice's socket (her 0700 directory); root reaches it and is refused
    sock = str(a2["socket"])
    probe = sh_as(users.bob, f"test -e {sock} || echo unreachable")
    assert probe.stdout == "unreachable\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(sock)
        with contextlib.suppress(BrokenPipeError):  # it may have said no and closed
            s.sendall(b"JBL1\0\0\0\4stat")
        reply = s.recv(4096)
    assert reply.startswith(b"no ") and b"own user" in reply
    a3 = _user_status(users.alice, env)
    if a3.get("pid") != a2["pid"]:
        return False
    assert a3["served"] == a2["served"] + 1  # type: ignore[operator]  # root never counted
    ok = as_user(users.alice, "run", "--runtime-dir", rt, "--", "echo", "hi", env=env)
    assert (ok.rc, ok.out) == (0, "hi\n"), ok.err
    return True


def test_two_users_side_by_side_and_root_refused(users: Users, user_rt: str) -> None:
    env = {"JBL_LAUNCHER": "1", SCOPE: secrets.token_hex(4)}
    try:
        assert any(_side_by_side(users, env, user_rt) for _ in range(5)), \
            f"every attempt saw a launcher retired by a code change: {RETIRED}"
    finally:
        for u in (users.alice, users.bob):
            as_user(u, "launcher", "stop", env=env)
