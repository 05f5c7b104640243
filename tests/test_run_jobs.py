"""Real jobs through the real ``jbl run`` CLI (root): isolation, I/O, statuses, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import cgroup_probe
import conftest_run
import pytest
from conftest_run import JBL, host_pids_with, jbl
from procs import reap

# fixtures, shared through a module rather than tests/conftest.py
runtimes = conftest_run.runtimes
rt = conftest_run.rt
shared_dir = conftest_run.shared_dir
test_user = conftest_run.test_user

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="these jobs run as root; "
                                "test_run_nonroot.py covers unprivileged users")


def test_exit_code_and_output(rt: str) -> None:
    r = jbl("run", "--runtime-dir", rt, "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert (r.returncode, r.stdout, r.stderr) == (7, "out\n", "err\n")


def test_signal_status_is_128_plus_n(rt: str) -> None:
    r = jbl("run", "--runtime-dir", rt, "--", "sh", "-c", "kill -TERM $$")
    assert r.returncode == 128 + signal.SIGTERM


def test_stdin_passes_through(rt: str) -> None:
    r = jbl("run", "--runtime-dir", rt, "--", "cat", input="hello\n")
    assert r.stdout == "hello\n"


def test_runtime_only_import(rt: str) -> None:
    r = jbl("run", "--runtime-dir", rt, "--", "python3", "-c",
            "import jblprobe, sys; print(jblprobe.VERSION, sys.version_info[:2])")
    assert r.stdout == "1.0.0 (3, 11)\n", r.stderr


def test_two_versions_side_by_side(runtimes: dict[str, Path]) -> None:
    code = "import jblprobe, time; time.sleep(0.3); print(jblprobe.VERSION)"
    procs = {v: subprocess.Popen([JBL, "run", "--runtime-dir", str(d), "--", "python3", "-c",
                                  code], stdout=subprocess.PIPE, text=True)
             for v, d in runtimes.items()}
    try:
        for v, p in procs.items():
            out, _ = p.communicate(timeout=30)
            assert (p.returncode, out) == (0, v + "\n")
    finally:
        for p in procs.values():
            reap(p)


def test_runtime_is_read_only(rt: str) -> None:
    r = jbl("run", "--runtime-dir", rt, "--", "python3", "-c", """
import errno
for path in ("/usr/lib/x", "/etc/passwd", "/x", "/usr/bin/cat"):
    try:
        open(path, "a")
    except OSError as e:
        print(path, errno.errorcode[e.errno])
""")
    assert r.stdout.split("\n")[:4] == ["/usr/lib/x EROFS", "/etc/passwd EROFS", "/x EROFS",
                                        "/usr/bin/cat EROFS"], r.stderr


def test_tmp_is_private_per_job(rt: str) -> None:
    Path("/tmp/jbl-host-marker").write_text("host")
    a = subprocess.Popen([JBL, "run", "--runtime-dir", rt, "--", "sh", "-c",
                          "echo a > /tmp/mine && echo written; read x; ls -A /tmp"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert a.stdout is not None and a.stdout.readline() == "written\n"
        # both jobs exist at once: a has written its file and waits until b has looked
        b = jbl("run", "--runtime-dir", rt, "--", "sh", "-c",
                "ls -A /tmp; echo b > /tmp/theirs; echo end")
        out, _ = a.communicate("go\n", timeout=30)
    finally:
        reap(a)
        os.unlink("/tmp/jbl-host-marker")
    assert (a.returncode, out) == (0, "mine\n")
    assert b.stdout == "end\n"
    assert not os.path.lexists("/tmp/mine") and not os.path.lexists("/tmp/theirs")


def test_host_is_invisible(rt: str) -> None:
    r = jbl("run", "--json", "--runtime-dir", rt, "--", "sh", "-c",
            "ls /proc | grep -c '^[0-9]'; hostname; ls /; test -e /work/main && echo LEAK")
    lines = r.stdout.splitlines()
    record = json.loads("\n".join(lines[lines.index("{"):]))
    assert int(lines[0]) <= 4  # init, sh, ls, grep: nothing of the host
    assert lines[1] == record["job_id"]
    assert "LEAK" not in r.stdout
    assert set(lines[2:lines.index("{")]) == {"bin", "dev", "etc", "lib", "lib64", "proc",
                                               "sbin", "tmp", "usr", "work"}


def test_privileges_dropped(rt: str) -> None:
    r = jbl("run", "--runtime-dir", rt, "--", "sh", "-c",
            "grep -E '^(CapEff|CapPrm|CapBnd|CapAmb|NoNewPrivs)' /proc/self/status; "
            "ls /proc/self/fd; echo 1 > /proc/sys/kernel/ns_last_pid || echo ro",
            input="")
    assert "CapEff:\t0000000000000000" in r.stdout and "CapBnd:\t0000000000000000" in r.stdout
    assert "NoNewPrivs:\t1" in r.stdout
    fds = r.stdout.split("NoNewPrivs:\t1\n")[1].split()
    assert fds[:3] == ["0", "1", "2"] and len(fds) <= 5  # + ls's own dir fd, then "ro"
    assert "Read-only file system" in r.stderr


def test_network_none_has_only_loopback(rt: str) -> None:
    code = """
import socket
names = [l.split(':')[0].strip() for l in open('/proc/net/dev').read().splitlines()[2:]]
s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()
c = socket.create_connection(s.getsockname(), timeout=2)
print(names, 'lo-up')
"""
    r = jbl("run", "--runtime-dir", rt, "--", "python3", "-c", code)
    assert r.stdout == "['lo'] lo-up\n", r.stderr
    host = jbl("run", "--runtime-dir", rt, "--network", "host", "--", "cat", "/proc/net/dev")
    assert len(host.stdout.splitlines()) - 2 == len(Path("/proc/net/dev").read_text()
                                                    .splitlines()) - 2


def test_uploads_and_env_arrive(rt: str, shared_dir: Path) -> None:
    (shared_dir / "script.py").write_text("import os; print(os.environ['GREETING'], "
                                          "os.environ['LANG'], open('pkg/data.txt').read())")
    (shared_dir / "pkg").mkdir()
    (shared_dir / "pkg" / "data.txt").write_text("payload")
    r = jbl("run", "--runtime-dir", rt, "--upload", str(shared_dir / "script.py"),
            "--upload", str(shared_dir / "pkg"), "--env", "GREETING=hi there", "--",
            "python3", "script.py")
    assert r.stdout == "hi there C.UTF-8 payload\n", r.stderr


def test_volumes_rw_and_ro(rt: str, shared_dir: Path) -> None:
    (shared_dir / "ro").mkdir()
    (shared_dir / "rw").mkdir()
    (shared_dir / "ro" / "in.txt").write_text("input")
    r = jbl("run", "--runtime-dir", rt, "--volume", f"{shared_dir / 'ro'}:/in:ro",
            "--volume", f"{shared_dir / 'rw'}:/out", "--workdir", "/out", "--", "sh", "-c",
            "cat /in/in.txt > result; touch /in/x 2>&1 || true")
    assert (shared_dir / "rw" / "result").read_text() == "input"
    assert "Read-only file system" in r.stdout + r.stderr


def test_user_option_drops_to_that_user(rt: str, shared_dir: Path, test_user: str) -> None:
    import pwd

    uid = pwd.getpwnam(test_user).pw_uid
    shared_dir.chmod(0o777)
    r = jbl("run", "--runtime-dir", rt, "--user", test_user, "--volume",
            f"{shared_dir}:/out", "--", "sh", "-c",
            "id -u; touch /out/f /work/g && grep CapEff /proc/self/status")
    assert r.stdout.splitlines() == [str(uid), "CapEff:\t0000000000000000"], r.stderr
    assert (shared_dir / "f").stat().st_uid == uid


def test_setup_failures_name_their_step(rt: str, shared_dir: Path) -> None:
    r = jbl("run", "--runtime-dir", rt, "--", "no-such-command")
    assert r.returncode == 127 and r.stderr.count("\n") == 1, r.stderr  # as shells say it
    assert r.stderr.startswith("jbl: error: no-such-command: command not found in the "
                               "runtime (PATH="), r.stderr
    r = jbl("run", "--runtime-dir", rt, "--volume", f"{shared_dir}:/bin/x", "--", "true")
    assert r.returncode == 12
    assert r.stderr == "jbl: error: bind /bin/x: /bin: a path component is a symlink\n"
    # refused before anything was made: not on the host, not in the runtime the link names
    assert not os.path.lexists("/bin/x") and not os.path.lexists("/usr/bin/x")
    assert not os.path.lexists(Path(rt) / "isolated/usr/bin/x")
    assert os.path.islink(Path(rt) / "isolated/bin")  # the link the refusal is about


def test_sigterm_is_forwarded_and_cgroup_removed(rt: str) -> None:
    marker = "765.125"  # a background child the trap does not wait for
    p = subprocess.Popen([JBL, "run", "--json", "--runtime-dir", rt, "--", "sh", "-c",
                          f"trap 'echo got-term; exit 5' TERM; sleep {marker} & "
                          f"until grep -qs {marker} /proc/$!/cmdline; do :; done; echo ready; "
                          "while :; do sleep 0.05; done"],
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        assert p.stdout.readline() == "ready\n"
        # the positive control: the job's processes are in job cgroups that exist right now
        sleeper = cgroup_probe.pids_running("sleep", marker)
        assert len(sleeper) == 1
        dirs = cgroup_probe.cgroup_dirs_of(sleeper[0])
        assert dirs and all(d.is_dir() for d in dirs), dirs
        assert all(str(sleeper[0]) in (d / "cgroup.procs").read_text().split() for d in dirs)
        assert dirs == cgroup_probe.job_cgroup_dirs(p.pid)  # one cgroup set for the whole job
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=20)
    finally:
        reap(p)  # a failed assertion must not leave the job running (PDEATHSIG ends it)
    assert p.returncode == 5
    assert out.startswith("got-term\n")
    record = json.loads(out[len("got-term\n"):])
    assert record["reason"] == "interrupted"
    assert {d.name for d in dirs} == {record["job_id"]}
    assert not cgroup_probe.pids_running("sleep", marker)
    assert not [d for d in dirs if d.exists()]


def test_a_sigkilled_jbl_run_takes_its_job_with_it(rt: str) -> None:
    """docs/runner.md: helper and init die by PR_SET_PDEATHSIG when jbl is SIGKILLed (no
    teardown runs then), and init's death ends the PID namespace: nothing of the job stays."""
    marker = "876.375"
    p = subprocess.Popen([JBL, "run", "--runtime-dir", rt, "--", "sh", "-c",
                          f"sleep {marker} & until grep -qs {marker} /proc/$!/cmdline; "
                          "do :; done; echo ready; wait"], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
        job = cgroup_probe.descendants(p.pid)
        assert len(cgroup_probe.pids_running("sleep", marker)) == 1 and len(job) >= 3
    finally:
        reap(p)  # SIGKILL: jbl's finally never runs
    deadline = time.monotonic() + 10
    while [pid for pid in job if os.path.exists(f"/proc/{pid}")] and time.monotonic() < deadline:
        time.sleep(0.01)
    survivors = [pid for pid in job if os.path.exists(f"/proc/{pid}")]
    for pid in survivors:  # a failing run must not leave the job behind
        os.kill(pid, signal.SIGKILL)
    assert not survivors
    assert not cgroup_probe.pids_running("sleep", marker)


def test_timeout_kills_double_forked_daemon(rt: str) -> None:
    marker = "987.25"
    r = jbl("run", "--json", "--runtime-dir", rt, "--timeout", "1s", "--kill-after", "1s",
            "--", "python3", "-c", f"""
import os, signal, time
if os.fork() == 0:  # a daemon: double fork, new session, parent gone
    os.setsid()
    if os.fork() == 0:
        os.execv("/bin/sleep", ["sleep", "{marker}"])
    os._exit(0)
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # and ignore the polite request
time.sleep(30)
""")
    assert r.returncode == 124
    assert "timed out after 1.0s" in r.stderr and len(r.stderr.splitlines()) == 1
    assert json.loads(r.stdout)["reason"] == "timeout"
    assert not host_pids_with(f"sleep {marker}")
