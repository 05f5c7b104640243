"""Leaving a foreground ``jbl run`` (issue 13): the detach keys on a real pty, SIGHUP without
one, and a terminal that closes; afterwards the job runs on, its output in its log, and
``jbl job status/log/stop`` work on it from other processes.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import termios
import time
from pathlib import Path
from typing import Any

import conftest_run
import pytest
from conftest_run import JBL, jbl
from test_run_session import Terminal

rt = conftest_run.rt
runtimes = conftest_run.runtimes

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="real jobs in real namespaces")

DEADLINE = 30.0
JOB_ID = re.compile(r"job-[0-9a-f]{8}")

# prints READY, echoes one line of input, then ticks (stdout) and tocks (stderr) until TERM
TICKER = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *a: (print("got-term", flush=True), sys.exit(5)))
print("READY", flush=True)
print("got", repr(sys.stdin.readline()), flush=True)
i = 0
while True:
    print(f"tick-{i}", flush=True)
    print(f"tock-{i}", file=sys.stderr, flush=True)
    i += 1
    time.sleep(0.05)
"""


def status(job: str) -> dict[str, Any]:
    r = jbl("job", "status", job, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def wait_for(pred: Any, what: str) -> None:
    end = time.monotonic() + DEADLINE
    while not pred():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def stop_and_check(job: str) -> None:
    """The left job stops like a detached one: SIGTERM reaches it, its end is recorded."""
    r = jbl("job", "stop", job)
    assert r.returncode == 0 and "stopped" in r.stdout, r.stderr
    rec = status(job)
    assert (rec["state"], rec["exit_status"], rec["reason"]) == ("failed", 5, "interrupted")
    assert jbl("job", "log", job).stdout.rstrip().endswith("got-term")


def test_detach_keys_leave_a_pty_job_running_its_output_then_in_its_log(rt: str) -> None:
    term = Terminal([JBL, "run", "--runtime-dir", rt, "--", "python3", "-c", TICKER])
    job = ""
    try:
        term.expect("READY")
        assert termios.tcgetattr(term.slave) != term.modes  # raw while attached
        term.write(b"a\x10b\r")  # a lone Ctrl-P is the job's, with the key after it
        term.expect("got 'a\\x10b\\n'")
        term.expect("tick-3")
        term.write(b"\x10")
        time.sleep(0.2)  # (a held Ctrl-P: nothing happens until the next key)
        term.write(b"\x11")
        assert term.wait() == 0, term.text()
        found = JOB_ID.search(term.text())
        assert found, term.text()
        job = found[0]
        assert f"detached from {job}" in term.text()
        assert termios.tcgetattr(term.slave) == term.modes  # the caller's terminal restored
        rec = status(job)
        assert (rec["state"], rec["detached"]) == ("running", 1)
        seen = int(re.findall(r"tick-(\d+)", term.text())[-1])
        # what it prints after the detach lands in its log (a pty: one stream)
        wait_for(lambda: f"tick-{seen + 5}" in jbl("job", "log", job).stdout,
                 "output after the detach in the log")
        stop_and_check(job)
    finally:
        term.close()
        if job:
            jbl("job", "stop", job)
            jbl("job", "rm", job)


def test_sighup_leaves_a_pipes_job_streams_kept_apart(rt: str) -> None:
    secret = "s3cr3t-" + os.urandom(6).hex()
    os.environ["JBL_TEST_TOKEN"] = secret  # -s NAME: the value from jbl run's environment
    try:
        term = Terminal([JBL, "run", "--no-tty", "--runtime-dir", rt, "-s", "JBL_TEST_TOKEN",
                         "--", "python3", "-c", TICKER])
    finally:
        del os.environ["JBL_TEST_TOKEN"]
    job = ""
    try:
        term.expect("READY")
        term.write(b"typed\n")
        term.expect("tock-2")
        os.kill(term.pid, signal.SIGHUP)  # to jbl run, the process the shell waits for
        assert term.wait() == 0, term.text()
        job = JOB_ID.findall(term.text())[-1]
        assert status(job)["state"] == "running"
        wait_for(lambda: "tick-" in jbl("job", "log", job).stdout, "stdout in the log")
        r = jbl("job", "log", job)
        assert "tick-" in r.stdout and "tock-" not in r.stdout
        assert "tock-" in r.stderr and "tick-" not in r.stderr
        # the logger started on leaving has none of jbl run's environment (its secrets)
        from jbl.runner.jobstore import JobStore

        store = JobStore.open_own(Path(os.environ["JBL_JOBS_DIR"]), create=False)
        assert store is not None
        logger = store.conn.execute("SELECT logger_pid FROM jobs WHERE id=?",
                                    (job,)).fetchall()[0][0]
        store.close()
        with open(f"/proc/{logger}/environ", "rb") as fh:
            assert secret.encode() not in fh.read()
        stop_and_check(job)
    finally:
        term.close()
        if job:
            jbl("job", "stop", job)
            jbl("job", "rm", job)


def test_closing_the_terminal_leaves_the_job_running(rt: str) -> None:
    """A shell on a real pty runs the job in the foreground; the terminal closes (SIGHUP to
    the session): the job runs on, its output in its log."""
    marker = f"mark-{os.urandom(4).hex()}"
    pid, master = pty.fork()
    if pid == 0:
        os.execv("/bin/sh", ["sh", "-c", f"{JBL} run --runtime-dir {rt} -- python3 -c "
                             f"'{TICKER}' {marker}; sleep 600"])
    out = b""
    try:
        while b"READY" not in out:
            ready, _, _ = select.select([master], [], [], DEADLINE)
            assert ready, out
            out += os.read(master, 1024)
        os.write(master, b"go\r")
        while b"tick-2" not in out:
            ready, _, _ = select.select([master], [], [], DEADLINE)
            assert ready, out
            out += os.read(master, 1024)
    finally:
        os.close(master)  # the terminal goes away
    _, st = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(st) and os.WTERMSIG(st) == signal.SIGHUP  # the shell did die
    jobs = json.loads(jbl("job", "list", "--json").stdout)
    mine = [r["id"] for r in jobs if marker in r["command"]]
    assert len(mine) == 1, jobs
    job = mine[0]
    try:
        rec = status(job)
        wait_for(lambda: status(job)["detached"] == 1, "the job to be detached")
        assert rec["state"] == "running"
        n = len(jbl("job", "log", job).stdout)
        wait_for(lambda: len(jbl("job", "log", job).stdout) > n + 50, "more output")
        stop_and_check(job)
    finally:
        jbl("job", "stop", job)
        jbl("job", "rm", job)


def test_a_signal_to_the_whole_group_is_one_signal_the_grace_is_kept(rt: str) -> None:
    """``kill -TERM -PGID`` (the shell's ``kill %1``, systemd) reaches the front and the
    supervisor: the job still gets one SIGTERM and its grace, not an immediate kill; and
    ``kill PID`` of jbl run alone reaches the job through the front."""
    graceful = ("import signal, sys, time\n"
                "def term(*a):\n"
                "    print('got-term', flush=True); time.sleep(0.5)\n"
                "    print('graceful', flush=True); sys.exit(5)\n"
                "signal.signal(signal.SIGTERM, term)\n"
                "print('READY', flush=True)\n"
                "time.sleep(60)\n")
    for group in (True, False):
        term = Terminal([JBL, "run", "--no-tty", "--kill-after", "20s", "--runtime-dir", rt,
                         "--", "python3", "-c", graceful])
        try:
            term.expect("READY")
            os.kill(-term.pid if group else term.pid, signal.SIGTERM)
            assert term.wait() == 5, term.text()
            assert "graceful" in term.text()
        finally:
            term.close()


def test_a_detach_that_cannot_be_done_leaves_the_job_attached(rt: str) -> None:
    """The records cannot be written when the keys come (their database replaced by a
    directory): one note, and the job stays on the terminal as it was, Ctrl-C included."""
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="jbl-test-jobs-nodetach-", dir="/run"))
    d.chmod(0o700)
    saved = os.environ["JBL_JOBS_DIR"]
    os.environ["JBL_JOBS_DIR"] = str(d)
    try:
        term = Terminal([JBL, "run", "--runtime-dir", rt, "--", "python3", "-c", TICKER])
    finally:
        os.environ["JBL_JOBS_DIR"] = saved
    try:
        term.expect("READY")
        term.write(b"x\r")
        term.expect("tick-1")
        (d / "jobs.db").rename(d / "moved.db")
        (d / "jobs.db").mkdir()
        term.write(b"\x10\x11")
        term.expect("cannot detach from job-")
        seen = int(re.findall(r"tick-(\d+)", term.text())[-1])
        term.expect(f"tick-{seen + 3}")  # still streaming to the terminal
        assert termios.tcgetattr(term.slave) != term.modes  # raw again
        term.write(b"\x03")  # Ctrl-C still reaches the job through its pty
        assert term.wait() == 130, term.text()
        assert "detached from" not in term.text()
        assert termios.tcgetattr(term.slave) == term.modes
    finally:
        term.close()
        shutil.rmtree(d)
