"""``jbl job list|status|log``'s light start (cli/job_light.py) and the listing's text
(issue 13): the light path says exactly what cli/main.py's parser says, imports none of
the heavy CLI, and a record's text never reaches a terminal as control characters.

Records are written straight into a scratch ``JBL_JOBS_DIR`` (runner/jobstore.py, as jbl run
writes them); the CLI runs as a real process. Its speed is measured in
benchmarks/bench_jobs.py, never asserted here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest_run import JBL

COMMANDS = (["python", "-c", "pass"], ["sh", "-c", "echo \"hi\" 'there'"], ["héllo", "wörld"],
            [], ["a\\b", "c"], ["x" * 80], ["ls", "-l", "/tmp"], ["日本語"], ["a", "", "b"])


@pytest.fixture
def records() -> Iterator[Path]:
    """A records directory with jobs in every state, odd commands and runtimes."""
    from jbl.runner.jobstore import JobStore, process_start

    d = Path(tempfile.mkdtemp(prefix="jbl-test-joblist-", dir="/run" if os.geteuid() == 0
                              else None))
    d.chmod(0o700)
    s = JobStore.open_own(d)
    assert s is not None
    me = {"supervisor_pid": os.getpid(), "supervisor_start": process_start(os.getpid())}
    try:
        for i, command in enumerate(COMMANDS * 2):
            job = f"job-{i:08x}"
            s.begin(me | {"id": job, "command": command, "runtime": "rt@" + "1" * (i % 4),
                          "created": 1_700_000_000.5 + i * 26_000})
            if i % 4 == 0:
                s.finish(job, exit_status=0, reason="exited")
            elif i % 4 == 1:
                s.finish(job, exit_status=137, reason="signaled")
            elif i % 4 == 2:  # a supervisor that is gone
                with s.conn:
                    s.conn.execute("UPDATE jobs SET supervisor_start=1 WHERE id=?", (job,))
        s.close()
        yield d
    finally:
        shutil.rmtree(d)


def run(d: Path, *args: str, env: dict[str, str] | None = None,
        python: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*python, JBL, *args], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, JBL_JOBS_DIR=str(d)) | (env or {}),
                          stdin=subprocess.DEVNULL)


FORMS = (("job", "list"), ("job", "list", "--state", "lost"), ("job", "list", "--state=done"),
         ("--json", "job", "list"), ("job", "list", "--json", "--state", "failed"),
         ("-q", "job", "list", "--state", "running", "-q"), ("job", "status", "00000003"),
         ("job", "status", "job-00000005", "--json"), ("job", "status", "zz"),
         ("job", "log", "00000001", "--tail", "2"), ("job", "log", "0000000", "--tail=-1"),
         ("job", "list", "--state", "weird"), ("job", "list", "--stat", "done"))


@pytest.mark.parametrize("form", FORMS, ids=" ".join)
def test_light_start_says_what_the_full_parser_says(records: Path, form: tuple[str, ...]) -> None:
    light = run(records, *form)
    full = run(records, "--store", str(records), *form)  # cli/main.py's parser
    assert (light.returncode, light.stdout) == (full.returncode, full.stdout), form
    assert light.stderr.count("\n") <= 1 and "Traceback" not in light.stderr, light.stderr
    if light.returncode:
        assert light.stderr.startswith("jbl: error: ")


def test_listing_imports_no_parser_settings_or_config(records: Path) -> None:
    r = run(records, "job", "list", python=(sys.executable, "-X", "importtime"))
    assert r.returncode == 0 and r.stdout.count("\n") == 1 + 2 * len(COMMANDS), r.stderr
    imported = {ln.rpartition("|")[2].strip() for ln in r.stderr.splitlines()}
    assert "jbl.runner.jobstore" in imported
    assert not imported & {"jbl.cli.main", "argparse", "jbl.store.settings",
                           "jbl.store.config", "dataclasses"}, sorted(imported)
    # what is not the light path's still goes to cli/main.py
    r = run(records, "job", "list", "--stat", "done", python=(sys.executable, "-X",
                                                              "importtime"))
    assert r.returncode == 0 and "jbl.cli.main" in r.stderr


def test_control_characters_and_broken_json_never_reach_the_terminal(records: Path) -> None:
    """A record's command and runtime are shown with each control character as '?', one
    line per job; a command that is not JSON is shown as stored (the listing still works)."""
    from jbl.runner.jobstore import JobStore

    s = JobStore.open_own(records)
    assert s is not None
    with s.conn:
        s.conn.execute("UPDATE jobs SET command=? WHERE id='job-00000000'",
                       (json.dumps(["printf", "\x1b]0;owned\x07\nfake-row  done"]),))
        s.conn.execute("UPDATE jobs SET runtime='rt\x1b[2J', command='[\"tab\there\"]' "
                       "WHERE id='job-00000001'")
        s.conn.execute("UPDATE jobs SET command='not json [' WHERE id='job-00000004'")
    s.close()
    for state in ((), ("--state", "done")):
        r = run(records, "job", "list", *state)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert not any(c in r.stdout for c in "\x1b\x07\t"), r.stdout
        assert all(ln.startswith(("ID", "job-")) for ln in lines), lines
        assert "printf ?]0;owned??fake-row  done" in lines[1]
        assert lines[5 if not state else 2].endswith("not json [")
    r = run(records, "job", "list")
    row = r.stdout.splitlines()[2]
    assert row.split()[2] == "rt?[2J" and row.endswith("tab?here"), row
    listed = json.loads(run(records, "job", "list", "--json").stdout)
    assert [j["command"] for j in listed if j["id"] == "job-00000004"] == ["not json ["]
