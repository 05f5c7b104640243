"""The first job of a scope (no launcher running) starts a launcher once it is over, never
beside it: a launcher starting (a Python importing all of jbl, then making a job process
ahead) would take a core from the job it was started by (cli/entry.py).

Proved by process start times (``/proc/PID/stat``), never by durations: the launcher's
process was made after the job's ``jbl run`` had gone.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import conftest_run
import pytest
from conftest import JBL

rt = conftest_run.rt
runtimes = conftest_run.runtimes
DEADLINE = 30.0  # seconds for a launcher to come up (a Python start + imports, loaded box)


@pytest.fixture()
def env() -> Iterator[dict[str, str]]:
    e = dict(os.environ, JBL_LAUNCHER="1", PYTHON_JBL_TEST_SCOPE=secrets.token_hex(4))
    e.pop("JBL_STORE", None)
    yield e
    subprocess.run([JBL, "launcher", "stop"], env=e, capture_output=True, timeout=30)


def _launcher_pid(env: dict[str, str]) -> int | None:
    import json

    r = subprocess.run([JBL, "launcher", "status", "--json"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    return int(st["pid"]) if st["running"] else None


def _started(pid: int) -> int:
    """When ``pid`` was made, in clock ticks since boot (field 22 of /proc/PID/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rpartition(")")[2].split()[19])


def test_first_job_starts_the_launcher_after_it_ends(env: dict[str, str], rt: str,
                                                     tmp_path: Path) -> None:
    assert _launcher_pid(env) is None  # a scope of its own: nothing serves it yet
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen(
        [JBL, "run", "--runtime-dir", rt, "--volume", f"{out}:/out", "--", "sh", "-c",
         "echo up > /out/started; read x"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env)
    try:
        deadline = time.monotonic() + DEADLINE
        while not (out / "started").exists():  # the job runs (in-process: none to take it)
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the job never started"
            time.sleep(0.02)
        released = _ticks_now()
        _, err = proc.communicate("go\n", timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    deadline = time.monotonic() + DEADLINE
    while (pid := _launcher_pid(env)) is None:  # started by that job, once it was over
        assert time.monotonic() < deadline, f"no launcher came up within {DEADLINE}s"
        time.sleep(0.1)
    # A launcher spawned beside the job (when its jbl run began) was made before the job was
    # let go; one spawned at the end, after.
    assert _started(pid) >= released


def _ticks_now() -> int:
    """Clock ticks since boot now, as /proc/PID/stat counts a process's start."""
    return int(float(Path("/proc/uptime").read_text().split()[0]) * os.sysconf("SC_CLK_TCK"))
