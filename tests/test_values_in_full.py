"""Values are matched in full: a trailing newline is not part of a valid value (issue 10, 6).

Python's ``$`` also matches before a final newline, so ``re.match(r"^…$", "A\\n")`` accepts
it; every validation pattern uses ``re.fullmatch``. Checked through the real CLI for an
environment variable name (``-e``/``--env``), a ``--cpu-cores`` list and ``jbl setup``'s
``--group``: each is one line and exit 2, and the same value without the newline works.
"""

from __future__ import annotations

from pathlib import Path

import conftest_run
import pytest
from conftest import run_jbl
from conftest_run import jbl

rt = conftest_run.rt
runtimes = conftest_run.runtimes


@pytest.mark.parametrize("opt", [["-e", "A\n=1"], ["--env", "A\n=1"],
                                 ["--cpu-cores", "0\n"], ["--cpu-cores", "0-0,0\n"]],
                         ids=["-e", "--env", "cores", "core-list"])
def test_a_trailing_newline_in_a_run_option_is_refused(rt: str, opt: list[str]) -> None:
    r = jbl("run", "--runtime-dir", rt, *opt, "--", "true")
    name = "--env" if opt[0] == "-e" else opt[0]
    assert (r.returncode, r.stdout) == (2, ""), r.stderr
    assert r.stderr.startswith(f"jbl: error: invalid {name} {opt[1]!r}: ") and \
        r.stderr.count("\n") == 1, r.stderr
    # the same value without the newline is a job that runs
    good = [opt[0], opt[1].replace("\n", "")]
    r = jbl("run", "--runtime-dir", rt, *good, "--", "sh", "-c", "echo A=${A-unset}")
    assert r.returncode == 0, r.stderr
    assert r.stdout == ("A=1\n" if name == "--env" else "A=unset\n")


def test_a_trailing_newline_in_the_admin_group_is_refused(tmp_path: Path) -> None:
    def setup(group: str):  # type: ignore[no-untyped-def]
        return run_jbl("setup", "--system", "--dry-run", "--group", group, "--root",
                       tmp_path / "root", "--mountpoint", tmp_path / "mnt",
                       store=tmp_path / "store")

    r = setup("jbltadm\n")
    assert (r.rc, r.err) == (2, "jbl: error: bad group name 'jbltadm\\n'\n")
    assert not (tmp_path / "store").exists() and not (tmp_path / "root").exists()
    r = setup("jbltadm").ok()  # the plan for the same name without the newline
    assert "jbltadm" in r.out
