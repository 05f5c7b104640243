"""Resource limits through real cgroups (v1 on this host, v2 where the host has it)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import cgroup_probe
import conftest_run
import pytest
from conftest_run import JBL, jbl
from procs import reap

# fixtures, shared through a module rather than tests/conftest.py
rt = conftest_run.rt
runtimes = conftest_run.runtimes

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="cgroup limits for root jobs; "
                                "test_run_nonroot.py covers undelegated users")


def _record(stdout: str) -> dict[str, object]:
    return json.loads(stdout[stdout.index("{\n"):])


def start_held(rt: str, *args: str, then: str) -> tuple[subprocess.Popen[str], set[Path]]:
    """Start ``jbl run --json --runtime-dir rt ARGS -- python3`` with a job that says "held"
    and waits for a line on stdin before it runs ``then``; return the process and the host
    directories of the job's cgroups, read from the host while the job is held (the
    positive control: they exist and hold the job)."""
    code = f"import sys; print('held', flush=True); sys.stdin.readline(); {then}"
    p = subprocess.Popen([JBL, "run", "--json", "--runtime-dir", rt, *args, "--", "python3",
                          "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline() == "held\n"
        dirs = cgroup_probe.job_cgroup_dirs(p.pid)
        assert dirs and all(d.is_dir() for d in dirs), dirs
        held = set(cgroup_probe.descendants(p.pid))
        for d in dirs:
            assert set(map(int, (d / "cgroup.procs").read_text().split())) <= held
            assert (d / "cgroup.procs").read_text().split()
    except BaseException:
        reap(p)
        raise
    return p, dirs


def release(p: subprocess.Popen[str]) -> tuple[str, str]:
    try:
        return p.communicate("go\n", timeout=60)
    finally:
        reap(p)


def test_memory_hog_is_killed_and_reported(rt: str) -> None:
    p, dirs = start_held(rt, "--memory", "64M",
                         then="b = bytearray(256 << 20); print('survived')")
    try:
        memory = [d for d in dirs if d.parts[4] == "memory" or cgroup_probe.is_v2()]
        limit = "memory.max" if cgroup_probe.is_v2() else "memory.limit_in_bytes"
        assert [int((d / limit).read_text()) for d in memory] == [64 << 20]
    except BaseException:
        reap(p)
        raise
    out, err = release(p)
    assert p.returncode == 138, err
    assert "survived" not in out
    assert err.splitlines()[-1].endswith("was killed: out of memory (limit 64.0M)")
    rec = _record(out)
    assert rec["reason"] == "oom" and rec["exit_status"] == 138
    assert isinstance(rec["peak_memory"], int) and rec["peak_memory"] >= 48 << 20
    assert {d.name for d in dirs} == {rec["job_id"]}
    assert not [d for d in dirs if d.exists()]


def test_within_memory_limit_runs(rt: str) -> None:
    r = jbl("run", "--runtime-dir", rt, "--memory", "64M", "--", "python3", "-c",
            "b = bytearray(16 << 20); print('ok')")
    assert (r.returncode, r.stdout) == (0, "ok\n"), r.stderr


def test_fork_bomb_stops_at_pids(rt: str) -> None:
    code = """
import os, time
n = 0
try:
    while True:
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
        n += 1
except OSError as e:
    print("stopped", n, e.strerror)
"""
    r = jbl("run", "--runtime-dir", rt, "--pids", "20", "--", "python3", "-c", code)
    assert r.returncode == 0, r.stderr
    word, n, *_ = r.stdout.split()
    assert word == "stopped" and 10 <= int(n) < 20


def test_cpu_percent_limits_cpu_time(rt: str) -> None:
    code = """
import time
end = time.monotonic() + 1.0
while time.monotonic() < end:
    pass
print(round(time.process_time(), 2))
"""
    r = jbl("run", "--runtime-dir", rt, "--cpu", "30", "--", "python3", "-c", code)
    assert r.returncode == 0, r.stderr
    assert float(r.stdout) < 0.6  # unlimited: ~1.0


def test_cpu_cores(rt: str) -> None:
    r = jbl("run", "--runtime-dir", rt, "--cpu-cores", "0", "--", "python3", "-c",
            "import os; print(sorted(os.sched_getaffinity(0)))")
    assert r.stdout == "[0]\n", r.stderr


def test_cgroup_removed_after_plain_job(rt: str) -> None:
    p, dirs = start_held(rt, "--pids", "50", then="pass")
    try:
        assert {d.parts[4] for d in dirs} >= ({"memory", "pids", "freezer", "cpu"}
                                              if not cgroup_probe.is_v2() else set())
    except BaseException:
        reap(p)
        raise
    out, err = release(p)
    assert p.returncode == 0, err
    assert {d.name for d in dirs} == {_record(out)["job_id"]}
    assert not [d for d in dirs if d.exists()]
