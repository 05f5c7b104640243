"""Resource limits through real cgroups (v1 on this host, v2 where the host has it)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import conftest_run
import pytest
from conftest_run import jbl
from jbl.runner.cgroups import ROOT, own_cgroups, v2_root

# fixtures, shared through a module rather than tests/conftest.py
rt = conftest_run.rt
runtimes = conftest_run.runtimes

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="cgroup limits for root jobs; "
                                "test_run_nonroot.py covers undelegated users")


def _record(stdout: str) -> dict[str, object]:
    return json.loads(stdout[stdout.index("{\n"):])


def job_cgroup_dirs(job_id: str) -> list[Path]:
    if v2_root() is not None:
        return [ROOT / "jbl" / job_id]
    own = own_cgroups()
    return [ROOT / c / own.get(c, "/").lstrip("/") / "jbl" / job_id
            for c in ("memory", "pids", "freezer", "cpu", "cpuset")]


def test_memory_hog_is_killed_and_reported(rt: str) -> None:
    r = jbl("run", "--json", "--runtime-dir", rt, "--memory", "64M", "--", "python3", "-c",
            "b = bytearray(256 << 20); print('survived')")
    assert r.returncode == 138, r.stderr
    assert "survived" not in r.stdout
    assert r.stderr.splitlines()[-1].endswith("was killed: out of memory (limit 64.0M)")
    rec = _record(r.stdout)
    assert rec["reason"] == "oom" and rec["exit_status"] == 138
    assert isinstance(rec["peak_memory"], int) and rec["peak_memory"] >= 48 << 20
    assert not any(d.exists() for d in job_cgroup_dirs(str(rec["job_id"])))


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
    r = jbl("run", "--json", "--runtime-dir", rt, "--pids", "50", "--", "true")
    assert r.returncode == 0
    assert not any(d.exists() for d in job_cgroup_dirs(str(_record(r.stdout)["job_id"])))
