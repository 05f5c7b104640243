"""Job records (issue 13): ``jbl run --detach`` and ``jbl job list|status|log|stop|rm|prune``,
with real jobs, real processes and real users.

Root's jobs go to the test session's records (``JBL_JOBS_DIR``, set by conftest.py), never
root's real ones, shared with other tests running jobs as root: every check here looks at
this test's own job ids only, and removes them.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import conftest_run
import pytest
from conftest_run import JBL, host_pids_with, jbl
from fixtures_users import Users, as_user

rt = conftest_run.rt
runtimes = conftest_run.runtimes

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="real jobs as root and real users")

SECRET = "s3cr3t-" + os.urandom(6).hex()


def detach(rt: str, *cmd: str, opts: tuple[str, ...] = ()) -> str:
    t0 = time.monotonic()
    r = jbl("run", "-d", "--runtime-dir", rt, *opts, "--", *cmd)
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t0 < 10  # returns at once, not when the job ends
    job = r.stdout.strip()
    assert job.startswith("job-") and len(job) == 12, r.stdout
    return job


def status(job: str, user: str | None = None) -> dict[str, Any]:
    if user is not None:
        u = as_user(user, "job", "status", job, "--json")
        assert u.rc == 0, u.err
        return json.loads(u.out)  # type: ignore[no-any-return]
    r = jbl("job", "status", job, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def wait_for(pred: Callable[[], object], what: str, deadline: float = 30.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_detach_then_list_status_log_stop_from_other_processes(rt: str) -> None:
    job = detach(rt, "sh", "-c", "trap 'echo got-term; exit 5' TERM; echo started; "
                 "echo warn >&2; while :; do sleep 0.05; done")
    try:
        listed = json.loads(jbl("job", "list", "--json", "--state", "running").stdout)
        assert job in [r["id"] for r in listed]
        rec = status(job[4:9])  # an unambiguous prefix, without "job-"
        assert rec["id"] == job and rec["state"] == "running" and rec["detached"] == 1
        assert rec["runtime"] == "pyrt@1.0.0" and rec["user"] == "root"
        wait_for(lambda: "started" in jbl("job", "log", job).stdout, "the job's first line")
        r = jbl("job", "log", job)
        assert (r.stdout, r.stderr) == ("started\n", "warn\n")
        r = jbl("job", "stop", job)
        assert r.returncode == 0 and "stopped" in r.stdout, r.stderr
        rec = status(job)
        assert (rec["state"], rec["exit_status"], rec["reason"]) == ("failed", 5, "interrupted")
        assert rec["ended"] is not None and rec["cpu_time"] is not None
        assert jbl("job", "log", job).stdout == "started\ngot-term\n"
        r = jbl("job", "stop", job)  # stopping an ended job says so, changes nothing
        assert r.returncode == 0 and "not running" in r.stdout
    finally:
        jbl("job", "stop", job)
        assert jbl("job", "rm", job).returncode == 0
    r = jbl("job", "status", job)
    assert r.returncode == 3 and r.stderr.count("\n") == 1 and "no job" in r.stderr


def test_detached_job_outlives_the_terminal_that_started_it(rt: str) -> None:
    """A shell on a real pty starts the job, then its terminal closes (SIGHUP to the
    session): the job runs on and ends by itself."""
    import pty

    pid, master = pty.fork()
    if pid == 0:  # the shell of a terminal session
        os.execv("/bin/sh", ["sh", "-c", f"{JBL} run -d --runtime-dir {rt} -- sh -c "
                 "'sleep 1.5; echo survived' && sleep 600"])
    out = b""
    try:
        while not (found := re.search(rb"job-[0-9a-f]{8}", out)):
            ready, _, _ = select.select([master], [], [], 30)
            assert ready, out
            out += os.read(master, 1024)
    finally:
        os.close(master)  # the terminal goes away: SIGHUP to the session's shell
    _, st = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(st) and os.WTERMSIG(st) == signal.SIGHUP  # the shell did die
    job = found[0].decode()
    try:
        wait_for(lambda: status(job)["state"] != "running", "the job to end")
        assert (status(job)["state"], jbl("job", "log", job).stdout) == ("done", "survived\n")
    finally:
        jbl("job", "rm", job)


def test_log_follow_has_no_gap_no_duplicate_and_keeps_stream_order(rt: str) -> None:
    n = 60
    job = detach(rt, "sh", "-c", f"i=0; while [ $i -lt {n} ]; do echo out-$i; "
                 "echo err-$i >&2; i=$((i+1)); sleep 0.02; done")
    try:
        follow = subprocess.run([JBL, "job", "log", job, "--follow", "--json"],
                                capture_output=True, text=True, timeout=60)
        assert follow.returncode == 0, follow.stderr
        chunks = [json.loads(line) for line in follow.stdout.splitlines()]
        seqs = [c["seq"] for c in chunks]
        assert seqs == list(range(1, len(seqs) + 1))  # from the first, no gap, no duplicate
        for stream, word in (("stdout", "out"), ("stderr", "err")):
            text = "".join(c["data"] for c in chunks if c["stream"] == stream)
            assert text == "".join(f"{word}-{i}\n" for i in range(n))
        assert status(job)["state"] == "done"  # follow ended with the job
        # the same log read afterwards, and its tail
        after = jbl("job", "log", job, "--json")
        assert [json.loads(x)["seq"] for x in after.stdout.splitlines()] == seqs
        tail = jbl("job", "log", job, "--tail", "2", "--json").stdout.splitlines()
        assert [json.loads(x)["seq"] for x in tail] == seqs[-2:]
    finally:
        jbl("job", "rm", job)


def test_sigkilled_supervisor_leaves_the_job_lost_never_running(rt: str) -> None:
    nap = f"{100 + int.from_bytes(os.urandom(2), 'big') / 1000:.3f}"  # a unique sleep
    job = detach(rt, "sh", "-c", f"echo up; exec sleep {nap}")
    try:
        wait_for(lambda: "up" in jbl("job", "log", job).stdout, "the job to start")
        pid = int(status(job)["supervisor_pid"])
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not alive(pid), "the supervisor to die")
        rec = status(job)
        assert (rec["state"], rec["reason"]) == ("lost", "lost")
        lost = json.loads(jbl("job", "list", "--state", "lost", "--json").stdout)
        assert job in [r["id"] for r in lost]
        running = json.loads(jbl("job", "list", "--state", "running", "--json").stdout)
        assert job not in [r["id"] for r in running]
        # the job went with its supervisor (the helper's parent-death signal)
        wait_for(lambda: not host_pids_with(f"sleep {nap}"), "the job to end")
        r = jbl("job", "log", job, "--follow")  # a lost job's log ends, it does not hang
        assert r.returncode == 0 and r.stdout == "up\n"
    finally:
        jbl("job", "rm", job)


def test_foreground_job_is_recorded_and_secret_values_never_stored(rt: str) -> None:
    r = jbl("--json", "run", "--runtime-dir", rt, "-e", "PLAIN=visible", "-s",
            f"TOKEN={SECRET}", "--memory", "256M", "--", "sh", "-c",
            'echo out; test ${#TOKEN} -eq 19 && exit 3')
    # the job had its secret (exit 3: its length), the foreground output streamed
    assert r.returncode == 3 and len(SECRET) == 19, r.stderr
    assert r.stdout.startswith("out\n")
    job = json.loads(r.stdout[4:])["job_id"]
    try:
        rec = status(job)
        assert rec["detached"] == 0 and rec["command"][0] == "sh"
        assert rec["env"] == {"PLAIN": "visible", "TOKEN": "***"}
        assert rec["limits"]["memory"] == 256 << 20
        assert rec["exit_status"] == r.returncode and rec["state"] == "failed"
        # a detached job with the same secret
        job2 = detach(rt, "sh", "-c", 'test -n "$TOKEN" && echo has-token',
                      opts=("-s", f"TOKEN={SECRET}"))
        wait_for(lambda: status(job2)["state"] != "running", "the detached job to end")
        assert jbl("job", "log", job2).stdout == "has-token\n"
        outputs = [r.stdout, r.stderr]
        for args in (("job", "list", "--json"), ("job", "status", job, "--json"),
                     ("job", "status", job2), ("job", "log", job2, "--json")):
            got = jbl(*args)
            outputs += [got.stdout, got.stderr]
        assert not any(SECRET in o for o in outputs)
        for f in Path(os.environ["JBL_JOBS_DIR"]).iterdir():  # the database and its WAL
            assert SECRET.encode() not in f.read_bytes(), f
        jbl("job", "rm", job2)
    finally:
        jbl("job", "rm", job)


def test_log_is_bounded_oldest_dropped_with_a_marker(rt: str) -> None:
    job = detach(rt, "sh", "-c", "i=0; while [ $i -lt 400 ]; do echo line-$i; "
                 "i=$((i+1)); done", opts=("--log-limit", "1K"))
    try:
        wait_for(lambda: status(job)["state"] == "done", "the job to end")
        rec = status(job)
        assert 0 < rec["log_bytes"] <= 1024
        total = sum(len(f"line-{i}\n") for i in range(400))
        assert rec["log_bytes"] + rec["log_dropped"] == total
        r = jbl("job", "log", job)
        assert r.stdout.endswith("line-399\n") and "line-0\n" not in r.stdout
        assert f"{rec['log_dropped']} bytes of older output dropped" in r.stderr
    finally:
        jbl("job", "rm", job)


def test_bad_ids_and_options_are_one_line(rt: str) -> None:
    for args, code in ((("job", "status", "job-zzzzzzzz"), 3), (("job", "log", "nope"), 3),
                       (("job", "stop", "job-zzzz"), 3), (("job", "rm", "zzzz"), 3),
                       (("job", "prune", "--older-than", "soon"), 2),
                       (("job", "list", "--state", "weird"), 2),
                       (("run", "-d", "--tty", "--runtime-dir", rt, "--", "true"), 2),
                       (("run", "-d", "--log-limit", "0", "--runtime-dir", rt, "--", "true"),
                        2)):
        r = jbl(*args)
        assert r.returncode == code and r.stderr.count("\n") == 1, (args, r.stderr)
        assert "Traceback" not in r.stderr and "internal error" not in r.stderr


# ---- two users ------------------------------------------------------------------------------

def test_two_users_never_see_each_others_jobs(rt: str, users: Users) -> None:
    ids = {}
    for who in (users.alice, users.bob):
        r = as_user(who, "run", "-d", "--runtime-dir", rt, "--", "sh", "-c",
                    f"echo I am {who}; exec sleep 60")
        assert r.rc == 0, r.err
        ids[who] = r.out.strip()
    a, b = ids[users.alice], ids[users.bob]
    try:
        for me, other in ((users.alice, b), (users.bob, a)):
            mine = json.loads(as_user(me, "job", "list", "--json").out)
            assert [r["id"] for r in mine] == [ids[me]] and mine[0]["user"] == me
            for cmd in ("status", "log", "stop", "rm"):
                r = as_user(me, "job", cmd, other)
                assert r.rc == 3 and "no job" in r.err and r.err.count("\n") == 1, r.err
            r = as_user(me, "job", "list", "--all")
            assert r.rc == 8 and r.err.count("\n") == 1, r.err
        wait_for(lambda: as_user(users.alice, "job", "log", a).out == f"I am {users.alice}\n",
                 "alice's output")
        # bob's stop of alice's id failed above: her job still runs
        assert status(a, users.alice)["state"] == "running"
        # root sees both, read-only (their databases stay theirs, 0600 in a 0700 directory)
        every = json.loads(jbl("job", "list", "--all", "--json").stdout)
        seen = {r["id"]: r["user"] for r in every}
        assert seen.get(a) == users.alice and seen.get(b) == users.bob
        table = jbl("job", "list", "--all").stdout.splitlines()  # merged from three stores
        assert table[0].split()[:3] == ["ID", "USER", "STATE"]
        rows = {ln.split()[0]: ln.split()[1:3] for ln in table[1:]}
        assert rows[a] == [users.alice, "running"] and rows[b] == [users.bob, "running"]
        for who in (users.alice, users.bob):
            d = users.home(who) / ".local/state/jbl"
            assert (d.stat().st_mode & 0o777, (d / "jobs.db").stat().st_mode & 0o777) == (
                0o700, 0o600)
            assert d.stat().st_uid == (d / "jobs.db").stat().st_uid == users.uid(who)
    finally:
        for who, job in ids.items():
            as_user(who, "job", "stop", job)


def test_root_skips_a_planted_link_as_a_users_database(rt: str, users: Users) -> None:
    """A user's jobs.db that is a link to root's records is not read by root's --all."""
    d = users.home(users.carol) / ".local/state/jbl"
    subprocess.run(["runuser", "-u", users.carol, "--", "sh", "-c",
                    f"mkdir -p {d} && chmod 700 {d} && ln -sf {os.environ['JBL_JOBS_DIR']}/jobs.db "
                    f"{d}/jobs.db"], check=True)
    job = detach(rt, "true")
    try:
        every = json.loads(jbl("job", "list", "--all", "--json").stdout)
        assert [r["user"] for r in every if r["id"] == job] == ["root"]  # once, as root's
        r = as_user(users.carol, "job", "list")
        assert r.rc == 8 and r.err.count("\n") == 1 and "jobs.db" in r.err, r.err
    finally:
        jbl("job", "rm", job)


# ---- the runtime version a record names -----------------------------------------------------

def test_record_keeps_the_version_it_ran(runtimes: dict[str, Path], tmp_path: Path) -> None:
    store = tmp_path / "store"
    for v in ("1.0.0", "2.0.0"):
        tar = tmp_path / f"pyrt-{v}.tar.gz"
        assert jbl("pack", str(runtimes[v]), "-o", str(tar)).returncode == 0
    assert jbl("--store", str(store), "store", "import",
               str(tmp_path / "pyrt-1.0.0.tar.gz")).returncode == 0
    r = jbl("--store", str(store), "--json", "run", "--runtime", "pyrt", "--", "true")
    assert r.returncode == 0, r.stderr
    fg = json.loads(r.stdout)["job_id"]
    r = jbl("--store", str(store), "run", "-d", "--runtime", "pyrt@latest", "--", "true")
    assert r.returncode == 0, r.stderr
    bg = r.stdout.strip()
    try:
        assert jbl("--store", str(store), "store", "import",
                   str(tmp_path / "pyrt-2.0.0.tar.gz")).returncode == 0
        wait_for(lambda: status(bg)["state"] != "running", "the detached job to end")
        assert status(fg)["runtime"] == status(bg)["runtime"] == "pyrt@1.0.0"
        assert status(bg)["state"] == "done"
    finally:
        jbl("job", "rm", fg)
        jbl("job", "rm", bg)


# ---- the listing ------------------------------------------------------------------------------
# (its speed with 10,000 records is measured in benchmarks/bench_jobs.py)

def test_list_table_and_json_agree_on_states_and_filters() -> None:
    """``jbl job list`` (laid out by SQLite) and ``--json`` show the same jobs in the same
    states, a dead supervisor's record as lost, under every ``--state``."""
    import shutil

    from jbl.runner.jobstore import JobStore, process_start

    d = _own_dir("list")
    try:
        s = JobStore.open_own(d)
        assert s is not None
        me = {"runtime": "pyrt@1.0.0", "supervisor_pid": os.getpid(),
              "supervisor_start": process_start(os.getpid())}
        for i, (name, end) in enumerate((("done", 0), ("failed", 3), ("alive", None),
                                          ("dead", None))):
            job = f"job-0000{i:04x}"
            s.begin(me | {"id": job, "command": ["sh", "-c", f"echo {name}"],
                          "created": 1_000_000 + i})
            if end is not None:
                s.finish(job, exit_status=end, reason="exited")
        with s.conn:  # a supervisor that is gone
            s.conn.execute("UPDATE jobs SET supervisor_start=1 WHERE id='job-00000003'")
        s.close()
        want = {"job-00000000": "done", "job-00000001": "failed", "job-00000002": "running",
                "job-00000003": "lost"}
        env = dict(os.environ, JBL_JOBS_DIR=str(d))

        def listed(*opts: str) -> tuple[dict[str, str], dict[str, str]]:
            table = subprocess.run([JBL, "job", "list", *opts], env=env, capture_output=True,
                                   text=True, timeout=60)
            js = subprocess.run([JBL, "job", "list", "--json", *opts], env=env,
                                capture_output=True, text=True, timeout=60)
            assert table.returncode == js.returncode == 0, table.stderr + js.stderr
            lines = table.stdout.splitlines()
            if lines == ["no jobs"]:
                rows = {}
            else:
                assert lines[0].split() == ["ID", "STATE", "RUNTIME", "STARTED", "EXIT",
                                            "COMMAND"]
                rows = {ln.split()[0]: ln.split()[1] for ln in lines[1:]}
                for ln in lines[1:]:  # columns aligned under their headers
                    assert ln.index("pyrt@1.0.0") == lines[0].index("RUNTIME")
                    assert ln.endswith("sh -c echo " + {"done": "done", "failed": "failed",
                                                        "running": "alive", "lost": "dead"}[
                        rows[ln.split()[0]]])
            return rows, {r["id"]: r["state"] for r in json.loads(js.stdout)}

        assert listed() == (want, want)
        for state in ("running", "done", "failed", "lost"):
            only = {k: v for k, v in want.items() if v == state}
            assert listed("--state", state) == (only, only), state
    finally:
        shutil.rmtree(d)


# ---- where records live; what survives a reboot ----------------------------------------------

def _own_dir(tag: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix=f"jbl-test-jobs-{tag}-", dir="/run"))
    d.chmod(0o700)
    return d


def test_a_record_from_before_a_reboot_is_lost_and_an_old_database_migrates() -> None:
    """A ``running`` record whose pid and start time match a live process but whose boot id
    is another boot's is lost (after a reboot pids and start ticks repeat); a schema-1
    database (no boot id) is migrated in place, its records kept."""
    import shutil

    import apsw
    from jbl.runner.jobstore import JobStore, boot_id, process_start

    d = _own_dir("boot")
    try:
        s = JobStore.open_own(d)
        assert s is not None
        me = {"runtime": "pyrt@1.0.0", "command": ["true"], "supervisor_pid": os.getpid(),
              "supervisor_start": process_start(os.getpid())}
        s.begin(me | {"id": "job-0000aaaa"})
        s.begin(me | {"id": "job-0000bbbb"})
        with s.conn:
            s.conn.execute("UPDATE jobs SET boot_id='another-boot' WHERE id='job-0000bbbb'")
        assert boot_id() and {r["id"]: r["state"] for r in s.jobs()} == {
            "job-0000aaaa": "running", "job-0000bbbb": "lost"}
        # back to schema 1, as an older jbl left it
        with s.conn:
            s.conn.execute("ALTER TABLE jobs DROP COLUMN boot_id")
            s.conn.execute("PRAGMA user_version=1")
        s.close()
        s = JobStore.open_own(d)
        assert s is not None
        assert s.conn.execute("PRAGMA user_version").fetchall()[0][0] == 2
        assert {r["id"]: r["state"] for r in s.jobs()} == {
            "job-0000aaaa": "running", "job-0000bbbb": "lost"}
        s.close()
        with pytest.raises(apsw.Error):  # and nothing else was made of it
            apsw.Connection(str(d / "jobs.db")).execute("SELECT x FROM jobs")
    finally:
        shutil.rmtree(d)


def test_jobs_dir_setting_is_used_checked_or_ignored(rt: str, users: Users) -> None:
    import shutil

    real = Path("/var/lib/jbl-jobs")
    before = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in real.iterdir()} \
        if real.is_dir() else {}
    d = _own_dir("set")
    env = dict(os.environ, JBL_JOBS_DIR=str(d))
    try:
        r = subprocess.run([JBL, "--json", "run", "--runtime-dir", rt, "--", "true"],
                           capture_output=True, text=True, env=env, timeout=60,
                           stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stderr
        job = json.loads(r.stdout)["job_id"]
        listed = subprocess.run([JBL, "job", "list", "--json"], capture_output=True,
                                text=True, env=env, timeout=60).stdout
        assert [x["id"] for x in json.loads(listed)] == [job]  # there, and only it
        # root's real records never saw it (nor any other job of this test session)
        after = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in real.iterdir()} \
            if real.is_dir() else {}
        assert after == before
        # someone else's directory: ignored, the user keeps to their own records
        u = as_user(users.alice, "job", "list", "--json", env={"JBL_JOBS_DIR": str(d)})
        assert u.rc == 0 and job not in u.out, u.err
        # the caller's own but open to others, a link, relative, missing: one line each
        d.chmod(0o755)
        link = Path(str(d) + "-link")
        link.symlink_to(d)
        for value, code in ((str(d), 8), (str(link), 2), ("rel/dir", 2),
                            (str(d / "missing"), 2)):
            r = subprocess.run([JBL, "job", "list"], capture_output=True, text=True,
                               env=dict(env, JBL_JOBS_DIR=value), timeout=60)
            assert r.returncode == code and r.stderr.count("\n") == 1, (value, r.stderr)
            assert "JBL_JOBS_DIR" in r.stderr and "Traceback" not in r.stderr
        link.unlink()
    finally:
        shutil.rmtree(d)


def test_record_has_peak_memory_and_cpu_time_of_every_job_process(rt: str) -> None:
    """CPU time counts the job's children too (the job's cgroup: cpuacct on v1, cpu.stat on
    v2), and peak memory comes from its memory cgroup."""
    burn = ("import os, time\n"
            "def burn(s):\n"
            "    t = time.process_time()\n"
            "    while time.process_time() - t < s: pass\n"
            "burn(0.3)\n"
            "if os.fork() == 0:\n"
            "    burn(0.3); os._exit(0)\n"
            "os.wait()\n"
            "b = bytearray(64 << 20)\n")
    r = jbl("--json", "run", "--runtime-dir", rt, "--", "python3", "-c", burn)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    job = out["job_id"]
    try:
        rec = status(job)
        assert 0.55 <= rec["cpu_time"] <= 0.6 + 2 * out["wall_time"], rec
        assert rec["peak_memory"] >= 64 << 20, rec
    finally:
        jbl("job", "rm", job)


def test_a_follower_that_fell_behind_the_bound_is_told_where_output_was_dropped(
        rt: str) -> None:
    """``log --follow`` stopped (SIGSTOP) while the job writes more than ``--log-limit``:
    when it goes on, a marker says how many chunks were dropped before it read them, and
    every chunk it does print comes once, in order."""
    job = detach(rt, "python3", "-c",
                 "import time\n"
                 "for i in range(400):\n"
                 "    print(f'line-{i:04d}', flush=True); time.sleep(0.01)\n",
                 opts=("--log-limit", "1K"))
    follow = subprocess.Popen([JBL, "job", "log", job, "--follow", "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert follow.stdout is not None
        first = ""  # it is reading (byte by byte: communicate() below reads the raw pipe)
        while not first.endswith("\n"):
            byte = os.read(follow.stdout.fileno(), 1)
            assert byte, first
            first += byte.decode()
        assert '"seq"' in first, first
        follow.send_signal(signal.SIGSTOP)
        # meanwhile the job writes well over the 1K bound (~110 lines of 10 bytes)
        wait_for(lambda: status(job)["log_dropped"] > 1500, "the bound to drop output")
        follow.send_signal(signal.SIGCONT)
        out, err = follow.communicate(timeout=60)
        assert follow.returncode == 0, err
        rows = [json.loads(x) for x in [first, *out.splitlines()]]
        gaps = [r for r in rows if "dropped_chunks" in r]
        chunks = [r for r in rows if "seq" in r]
        assert len(gaps) >= 1
        seqs = [c["seq"] for c in chunks]
        assert seqs == sorted(set(seqs))  # once each, in order
        for g in gaps:  # each marker sits where seq jumps, by what it says
            i = next(k for k, c in enumerate(chunks) if c["seq"] == g["before_seq"])
            assert seqs[i] - seqs[i - 1] - 1 == g["dropped_chunks"] > 0
        text = "".join(c["data"] for c in chunks)
        assert text.endswith("line-0399\n")
        assert status(job)["state"] == "done"
    finally:
        if follow.poll() is None:
            follow.send_signal(signal.SIGCONT)
            follow.kill()
            follow.wait()
        jbl("job", "rm", job)
