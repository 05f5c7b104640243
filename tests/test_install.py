"""``make install``: jbl installed for every user in one step (issue 10).

Two parts:
* the session's own install (``PREFIX``, ``/opt/jbl`` — what the multi-user tests run):
  root-owned, nothing group/other-writable, built on the system Python, not editable, and
  an ordinary user runs ``jbl --help`` and ``jbl store list`` on a ``jbl setup --system``
  store through ``BINDIR/jbl``;
* a fresh copy of this clone installed into a scratch PREFIX under a careless umask
  (002): the install still comes out closed to writes, a second ``make install`` changes
  nothing, and a changed or deleted module in the clone is what the next one installs.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, Result, assert_one_line_error, run_jbl
from fixtures_users import (
    BINDIR,
    PREFIX,
    Users,
    installed_jbl,
    shared_dir,
    user_jbl,
)
from jbl.cli.setup_cmd import unreachable_for_others

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="make install needs root")


def world_writable_or_foreign(prefix: Path) -> list[str]:
    """What ``find PREFIX ! -type l ( -perm /022 -o ! -user root -o ! -perm -004 )`` prints."""
    p = subprocess.run(["find", str(prefix), "!", "-type", "l", "(", "-perm", "/022", "-o",
                        "!", "-user", "root", "-o", "!", "-perm", "-004", ")"],
                       capture_output=True, text=True, check=True)
    return p.stdout.splitlines()


def snapshot(prefix: Path) -> list[tuple[str, int, int, int]]:
    return sorted((str(p.relative_to(prefix)), p.lstat().st_mode, p.lstat().st_size,
                   p.lstat().st_mtime_ns) for p in prefix.rglob("*"))


# --- the session's install ------------------------------------------------------------------
def test_session_install_is_root_owned_closed_and_on_the_system_python() -> None:
    jbl = Path(installed_jbl())
    assert jbl == PREFIX / "bin/jbl" == Path(user_jbl())  # what as_user() runs
    assert world_writable_or_foreign(PREFIX) == []
    cfg = (PREFIX / "pyvenv.cfg").read_text()
    assert "home = /usr/bin" in cfg, cfg  # the system Python, which every user may execute
    assert os.path.realpath(PREFIX / "bin/python").startswith("/usr/bin/python3")
    # a real install, not a link back into the clone
    site = next(PREFIX.glob("lib/python3*/site-packages"))
    main = site / "jbl/cli/main.py"
    assert main.is_file() and not main.is_symlink()
    assert not list(site.glob("__editable__*")) and not list(site.glob("*.egg-link"))
    assert (BINDIR / "jbl").is_symlink() and os.readlink(BINDIR / "jbl") == str(jbl)


def tiny_tarball(d: Path) -> Path:
    rt = d / "tiny"
    (rt / "isolated").mkdir(parents=True)
    (rt / "isolated/hello.txt").write_text("hello\n")
    (rt / "runtime.yml").write_text("name: tiny\nversion: 1.0.0\ndescription: t\n"
                                    "mounts:\n  - source: isolated\n    target: /\n")
    tb = d / "tiny-1.0.0.tar"
    with tarfile.open(tb, "w") as t:
        t.add(rt, arcname=".")
    return tb


def test_ordinary_user_runs_jbl_through_bindir_on_a_system_store(users: Users) -> None:
    installed_jbl()
    base = shared_dir()
    try:
        store = base / "store"
        setup = ["--store", str(store), "setup", "--system", "--group", users.admin_group,
                 "--mountpoint", str(base / "mnt"), "--root", str(base / "sys")]
        p = subprocess.run([str(BINDIR / "jbl"), *setup], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        assert "other users cannot run jbl" not in p.stdout
        assert f"{BINDIR}/jbl --store {store} mount" in p.stdout  # how to start the mount
        if unreachable_for_others(os.path.realpath(sys.executable)):  # pyenv under /root
            r = run_jbl(*setup[2:], store=store).ok()
            assert "other users cannot run jbl" in r.out and "make install" in r.out
        run_jbl("store", "import", tiny_tarball(base), store=store).ok()
        env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "HOME": f"/home/{users.alice}",
               "LANG": "C.UTF-8"}

        def alice(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(["runuser", "-u", users.alice, "--", str(BINDIR / "jbl"),
                                   *args], capture_output=True, text=True, env=env, cwd="/",
                                  stdin=subprocess.DEVNULL, timeout=60)

        p = alice("--help")
        assert p.returncode == 0 and "usage: jbl" in p.stdout, p.stderr
        p = alice("--store", str(store), "store", "list", "--json")
        assert p.returncode == 0, p.stderr
        assert [(r["name"], r["version"]) for r in json.loads(p.stdout)] == [("tiny", "1.0.0")]
        # next to it, what alice may not do is still refused, in one line
        p = alice("--store", str(store), "store", "rm", "tiny@1.0.0")
        assert_one_line_error(Result(p.returncode, p.stdout, p.stderr), 8, "root or membership")
        assert "tiny" in run_jbl("store", "list", store=store).ok().out
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_install_needs_root() -> None:
    p = subprocess.run(["runuser", "-u", "nobody", "--", "/usr/bin/python3",
                        str(REPO / "tools/install.py"), "--prefix", "/nonexistent/jbl"],
                       capture_output=True, text=True, cwd="/")
    assert p.returncode == 8 and p.stderr.count("\n") == 1, p.stderr
    assert "needs root" in p.stderr and not os.path.exists("/nonexistent")


def test_install_refuses_a_prefix_that_is_not_its_venv() -> None:
    d = shared_dir("jbl-notvenv-")
    try:
        (d / "data").write_text("keep me\n")
        p = subprocess.run([sys.executable, str(REPO / "tools/install.py"), "--prefix", str(d),
                            "--bindir", str(d / "bin")], capture_output=True, text=True)
        assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
        assert "is not a venv" in p.stderr
        assert sorted(x.name for x in d.iterdir()) == ["data"]
        assert not Path(f"{d}.lock").exists()
    finally:
        shutil.rmtree(d)


# --- a fresh clone into a scratch prefix ----------------------------------------------------
@pytest.fixture(scope="module")
def clone() -> Iterator[Path]:
    """This clone's files `make install` uses, copied (as a fresh `git clone` would hold)."""
    d = shared_dir("jbl-clone-")
    files = subprocess.run(["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard",
                            "Makefile", "pyproject.toml", "README.md", "tools", "store",
                            "fusefs", "runner", "cli"], capture_output=True, text=True,
                           check=True).stdout.split()
    for f in files:
        if (REPO / f).is_file():
            (d / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, d / f)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def make_install(clone: Path, prefix: Path, bindir: Path) -> tuple[str, float]:
    t0 = time.monotonic()
    # umask 002: a careless root shell; the install must still close group write
    p = subprocess.run(["sh", "-c", f'umask 002; make -s -C "{clone}" install '
                        f'PREFIX="{prefix}" BINDIR="{bindir}"'],
                       capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout.strip(), time.monotonic() - t0


@pytest.mark.slow
def test_fresh_clone_installs_once_then_changes_nothing_then_follows_the_sources(
        clone: Path) -> None:
    scratch = shared_dir("jbl-prefix-")
    prefix, bindir = scratch / "opt/jbl", scratch / "bin"
    try:
        out, first = make_install(clone, prefix, bindir)
        assert "installed" in out, out
        assert world_writable_or_foreign(prefix) == []
        assert stat.S_IMODE(os.stat(f"{prefix}.lock").st_mode) == 0o600  # no one else's lock
        jbl = bindir / "jbl"
        p = subprocess.run(["runuser", "-u", "nobody", "--", str(jbl), "--help"],
                           capture_output=True, text=True, cwd="/")
        assert p.returncode == 0 and "usage: jbl" in p.stdout, p.stderr

        before = snapshot(prefix)
        out, again = make_install(clone, prefix, bindir)
        assert "up to date" in out, out
        assert snapshot(prefix) == before
        print(f"fresh install {first:.1f}s, second run {again:.2f}s")

        # a new module appears in the install, and leaves it with the clone (no stale build/)
        site = next(prefix.glob("lib/python3*/site-packages"))
        (clone / "cli/zz_probe.py").write_text("MARK = 'probe-1'\n")
        out, refresh = make_install(clone, prefix, bindir)
        assert "refreshed" in out and "the sources changed" in out, out
        assert (site / "jbl/cli/zz_probe.py").read_text() == "MARK = 'probe-1'\n"
        py = subprocess.run(["runuser", "-u", "nobody", "--", str(prefix / "bin/python"), "-c",
                             "import jbl.cli.zz_probe as m; print(m.MARK, m.__cached__)"],
                            capture_output=True, text=True, cwd="/")
        assert py.stdout.split()[0] == "probe-1", py.stderr
        assert Path(py.stdout.split()[1]).is_file()  # compiled by root: users cannot write it
        assert world_writable_or_foreign(prefix) == []
        (clone / "cli/zz_probe.py").unlink()
        out, _ = make_install(clone, prefix, bindir)
        assert "refreshed" in out and not (site / "jbl/cli/zz_probe.py").exists()
        assert len(list(site.glob("jbl-*.dist-info"))) == 1
        assert not list(site.glob(".jbl-staging-*"))
        print(f"refresh after a source change {refresh:.2f}s")
        after = snapshot(prefix)

        # a BINDIR/jbl that is not ours is left alone, with one line saying what to do
        jbl.unlink()
        jbl.write_text("#!/bin/sh\n")
        p = subprocess.run(["make", "-s", "-C", str(clone), "install", f"PREFIX={prefix}",
                            f"BINDIR={bindir}"], capture_output=True, text=True)
        assert p.returncode != 0 and "is not a symlink" in p.stderr
        assert jbl.read_text() == "#!/bin/sh\n" and snapshot(prefix) == after
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
