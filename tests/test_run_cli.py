"""``jbl run`` option checking: every malformed value is one line and exit 2."""

from __future__ import annotations

import re

import conftest_run
import pytest
from conftest_run import jbl

# fixtures, shared through a module rather than tests/conftest.py
rt = conftest_run.rt
runtimes = conftest_run.runtimes

BAD = [
    ["--memory", "12Q"], ["--memory", "1K"], ["--cpu", "0"], ["--cpu", "lots"],
    ["--pids", "0"], ["--pids", "1.5"], ["--timeout", "5x"], ["--timeout", "0"],
    ["--kill-after", "soon"], ["--network", "bridge"], ["--env", "NOEQUALS"],
    ["--env", "1BAD=x"], ["--volume", "onlyhost"], ["--volume", "/nonexistent-jbl:/x"],
    ["--volume", "/tmp:relative"], ["--volume", "/tmp:/a/../b"], ["--workdir", "relative"],
    ["--workdir", "/tmp"], ["--upload", "/nonexistent-jbl-file"], ["--cpu-cores", "a-b"],
]


@pytest.mark.parametrize("opt", BAD, ids=lambda o: " ".join(o))
def test_malformed_option_is_one_line_exit_2(rt: str, opt: list[str]) -> None:
    r = jbl("run", "--runtime-dir", rt, *opt, "--", "true")
    assert r.returncode == 2, r.stderr
    # one line naming the option and the (part of the) value that was wrong, then why
    m = re.fullmatch(r"jbl: error: invalid (--[a-z-]+)( target)? '([^']+)': (.{8,})\n",
                     r.stderr)
    assert m is not None, r.stderr
    assert m[1] == opt[0] and m[3] in opt[1], r.stderr
    assert r.stdout == ""


def test_no_command(rt: str) -> None:
    r = jbl("run", "--runtime-dir", rt)
    assert (r.returncode, r.stderr.count("\n")) == (2, 1)
    assert "no command given" in r.stderr


def test_no_runtime() -> None:
    r = jbl("run", "--", "true")
    assert (r.returncode, r.stderr) == (2, "jbl: error: jbl run needs --runtime NAME[@VERSION]\n")


def test_not_a_runtime_directory(tmp_path: object) -> None:
    r = jbl("run", "--runtime-dir", "/nonexistent-jbl-rt", "--", "true")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "not a runtime directory" in r.stderr
