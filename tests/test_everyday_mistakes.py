"""A new user's first hour (issue 14): the ordinary mistakes, each answered in one line that
says what is wrong and what to do, with the README's exit code, and nothing left lying around.

Every test makes the mistake through the real ``jbl`` (real stores, a read-only tmpfs, real
mounts, real jobs, real users for the shared server), checks the answer and that nothing
changed on disk, and then does the right thing next to it to show it still works.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import REPO, Result, assert_one_line_error, run_jbl
from fixtures_mount import make_tarball
from fixtures_registry import publish
from fixtures_users import (
    PREFIX,
    Users,
    as_user,
    installed_jbl,
    shared_dir,
    tree_state,
)
from jbl.fusefs import mounttab

NOCONFIG = {"JBL_CONFIG": ""}
OTHER_ARCH = "ubuntu-arm64" if platform.machine() in ("x86_64", "amd64") else "ubuntu-amd64"


def jbl(store: Path | None, *args: str | os.PathLike[str], **env: str) -> Result:
    return run_jbl(*args, store=store, env={**NOCONFIG, **env})


def wait_for(what: str, cond: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def regdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny synthetic runtimes: demo 1.0.0 and 1.1.0 for every architecture, 2.0.0 only for
    an architecture this host is not."""
    reg = tmp_path_factory.mktemp("reg")
    publish(reg, "demo", "1.0.0")
    publish(reg, "demo", "1.1.0")
    publish(reg, "demo", "2.0.0", platforms=[OTHER_ARCH])
    return reg


@pytest.fixture(scope="module")
def real_tarball(rt_factory, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A runtime built from this host (sh, python3, ...), as a tarball."""
    return make_tarball(rt_factory("everyday", "1.0.0"),
                        tmp_path_factory.mktemp("tb") / "everyday-1.0.0.tar.gz")


@pytest.fixture
def real_store(store_dir: Path, real_tarball: Path) -> Path:
    jbl(store_dir, "store", "import", real_tarball).ok()
    return store_dir


# --- the store path ------------------------------------------------------------------------
@pytest.fixture
def readonly_dir(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "ro"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "jbl-test-ro", str(d)],
                   check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


@pytest.mark.parametrize("case", ["under /proc", "read-only", "a file", "under a file"])
def test_a_store_path_that_cannot_be_used_is_one_line_and_creates_nothing(
        case: str, tmp_path: Path, regdir: Path, readonly_dir: Path) -> None:
    a_file = tmp_path / "notes.txt"
    a_file.write_text("my notes\n")
    store, expect = {
        "under /proc": (Path(f"/proc/jbl-{os.getpid()}"), "does not allow new directories"),
        "read-only": (readonly_dir / "store", "read-only filesystem"),
        "a file": (a_file, f"{a_file} is a file, not a directory"),
        "under a file": (a_file / "store", f"{a_file} is a file, not a directory"),
    }[case]
    for args in (("store", "install", "demo", "--registry", regdir),
                 ("store", "import", regdir / "demo-1.0.0.tar.gz")):
        r = jbl(store, *args)
        assert_one_line_error(r, rc=10, contains=expect)
        assert "internal error" not in r.err and "Errno" not in r.err, r.err
        assert "--store" in r.err  # what to do: point it elsewhere
    assert not os.path.lexists(store) or store == a_file
    assert a_file.read_text() == "my notes\n"
    assert os.listdir(readonly_dir) == []
    # the same install into a usable directory works
    good = tmp_path / "good"
    jbl(good, "store", "install", "demo", "--registry", regdir).ok()
    assert json.loads(jbl(good, "store", "list", "--json").ok().out)[0]["version"] == "1.1.0"
    shutil.rmtree(good)


def test_list_of_a_store_path_that_is_a_file_says_so(tmp_path: Path) -> None:
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    for args in (("store", "list"), ("store", "df"), ("store", "info", "demo")):
        assert_one_line_error(jbl(a_file, *args), rc=10, contains="is a file, not a directory")
    # a store that does not exist yet still lists nothing, as documented
    r = jbl(tmp_path / "new", "store", "list").ok()
    assert "no runtimes installed" in r.out and not (tmp_path / "new").exists()


def test_setup_on_a_store_path_that_is_a_file_names_the_step(tmp_path: Path) -> None:
    a_file = tmp_path / "notes.txt"
    a_file.write_text("my notes\n")
    r = jbl(a_file, "setup", "--system", "--group", "root", "--root", tmp_path / "sys",
            "--mountpoint", tmp_path / "mnt")
    assert_one_line_error(r, rc=1, contains=f"store directory {a_file}: cannot create: a file "
                          "is in the way")
    assert a_file.read_text() == "my notes\n" and not (tmp_path / "mnt").exists()


# --- jbl mount -----------------------------------------------------------------------------
@pytest.fixture
def demo_store(store_dir: Path, regdir: Path) -> Path:
    jbl(store_dir, "store", "install", "demo@1.0.0", "--registry", regdir).ok()
    return store_dir


def _umount(mp: Path) -> None:
    run_jbl("umount", mp)
    if mounttab.mount_fstype(mp) is not None:
        subprocess.run(["fusermount3", "-u", "-z", str(mp)], check=False)


def test_mount_refuses_to_hide_a_directory_that_is_not_empty(demo_store: Path,
                                                             tmp_path: Path) -> None:
    mp = tmp_path / "work"
    mp.mkdir()
    (mp / "thesis.tex").write_text("two years of work\n")
    r = jbl(demo_store, "mount", mp)
    assert_one_line_error(r, rc=11, contains="is not empty")
    assert "--nonempty" in r.err
    assert mounttab.mount_fstype(mp) is None and os.listdir(mp) == ["thesis.tex"]
    # told so, it mounts over it (the file is hidden, not gone)
    jbl(demo_store, "mount", "--nonempty", mp).ok()
    try:
        assert os.listdir(mp) == ["demo"]
    finally:
        _umount(mp)
    assert (mp / "thesis.tex").read_text() == "two years of work\n"


def test_mount_of_a_store_that_does_not_exist_creates_nothing(demo_store: Path,
                                                              tmp_path: Path) -> None:
    mp = tmp_path / "mnt"
    mp.mkdir()
    typo = demo_store.with_name(demo_store.name + "e")
    r = jbl(typo, "mount", mp)
    assert_one_line_error(r, rc=10, contains=f"no jbl store at {typo}")
    assert "typo" in r.err
    assert not typo.exists() and mounttab.mount_fstype(mp) is None
    jbl(demo_store, "mount", mp).ok()  # the right --store mounts
    try:
        assert sorted(os.listdir(mp / "demo")) == ["1.0.0", "latest"]
    finally:
        _umount(mp)


def _daemon_exited(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return True
    return data[data.rindex(b")") + 2:][:1] in (b"Z", b"X")


def test_a_killed_mount_daemon_is_stale_at_once(demo_store: Path, tmp_path: Path) -> None:
    mp = tmp_path / "mnt"
    mp.mkdir()
    jbl(demo_store, "mount", mp).ok()
    try:
        os.listdir(mp / "demo")  # the kernel now caches the root's attributes
        (st,) = json.loads(jbl(demo_store, "mount", "--status", "--json").ok().out)
        os.kill(st["pid"], signal.SIGKILL)
        wait_for("the daemon to exit", lambda: _daemon_exited(st["pid"]), 10)
        # not "mounted" for the second the kernel still answers stat from its cache
        (now,) = json.loads(jbl(demo_store, "mount", "--status", "--json").ok().out)
        assert now["state"] == "stale", now
        r = jbl(demo_store, "mount", mp).ok()  # recovers it, not "already a jbl mount"
        assert "stale" in r.err
        assert sorted(os.listdir(mp / "demo")) == ["1.0.0", "latest"]
    finally:
        _umount(mp)


# --- the runner's lingering view -----------------------------------------------------------
def _view_files(store: Path) -> list[str]:
    key = hashlib.sha256(os.fsencode(os.path.realpath(store))).hexdigest()[:16]
    views = mounttab.records_dir().parent / "views"
    return sorted(n for n in os.listdir(views) if n.startswith(key)) if views.is_dir() else []


def test_a_lingering_view_leaves_nothing_and_never_recreates_a_removed_store(
        real_store: Path) -> None:
    linger = {"JBL_VIEW_LINGER": "2s"}
    jbl(real_store, "run", "--runtime", "everyday", "--", "true", **linger).ok()
    assert _view_files(real_store)  # the view lingers for the next job...
    wait_for("the view to go", lambda: not _view_files(real_store))  # ...then goes, entirely
    # the store is removed while a view of it lingers: the view goes and leaves it removed
    jbl(real_store, "run", "--runtime", "everyday", "--", "true", **linger).ok()
    assert _view_files(real_store)
    shutil.rmtree(real_store)
    wait_for("the view to go", lambda: not _view_files(real_store))
    assert not os.path.lexists(real_store)


# --- jbl run -------------------------------------------------------------------------------
def test_cpu_cores_that_do_not_exist_is_a_usage_error_naming_those_that_do(
        real_store: Path) -> None:
    have = sorted(os.sched_getaffinity(0))
    r = jbl(real_store, "run", "--runtime", "everyday", "--cpu-cores", f"{have[-1] + 1}-99",
            "--", "true")
    assert_one_line_error(r, rc=2, contains=f"no such core {have[-1] + 1}-99")
    assert "the cores here are" in r.err and "Numerical result" not in r.err
    jbl(real_store, "run", "--runtime", "everyday", "--cpu-cores", str(have[0]), "--",
        "true").ok()


def test_a_missing_command_is_127_and_an_unexecutable_one_126(real_store: Path,
                                                              tmp_path: Path) -> None:
    def run(*cmd: str, upload: Path | None = None) -> Result:
        up = ("--upload", str(upload)) if upload else ()
        return jbl(real_store, "run", "--runtime", "everyday", *up, "--", *cmd)

    assert_one_line_error(run("python4"), rc=127, contains="python4: command not found "
                          "in the runtime (PATH=")
    assert_one_line_error(run("/opt/no/such"), rc=127, contains="no such file in the runtime")
    script = tmp_path / "go.sh"
    script.write_text("#!/no/such/interpreter\necho hi\n")
    script.chmod(0o755)
    assert_one_line_error(run("./go.sh", upload=script), rc=127, contains="interpreter")
    assert_one_line_error(run("/usr"), rc=126, contains="/usr: cannot execute")
    script.chmod(0o644)
    assert_one_line_error(run("./go.sh", upload=script), rc=126, contains="cannot execute")
    # the job's own 127/126 pass through untouched, with nothing added
    for code in (127, 126):
        r = run("sh", "-c", f"exit {code}")
        assert (r.rc, r.err) == (code, "")
    assert run("python3", "-c", "print('ok')").ok().out == "ok\n"


# --- the shared server whose mount service is down ------------------------------------------
def test_a_shared_store_without_its_mount_service_says_so(users: Users,
                                                          real_tarball: Path) -> None:
    base = shared_dir()
    try:
        store, mnt, sysroot = base / "store", base / "mnt", base / "sys"
        (sysroot / "etc").mkdir(parents=True)
        shutil.copy("/etc/fuse.conf", sysroot / "etc/fuse.conf")
        jbl(store, "setup", "--system", "--group", users.admin_group, "--mountpoint", mnt,
            "--root", sysroot).ok()
        jbl(store, "store", "import", real_tarball).ok()
        before = tree_state(store)
        r = as_user(users.alice, "run", "--runtime", "everyday", "--", "true", store=store)
        assert_one_line_error(r, rc=11, contains="the shared view of the store")
        assert "systemctl start jbl-mount" in r.err and "Permission denied" not in r.err
        assert tree_state(store) == before
        assert not [m for m in mounttab._mountinfo()
                    if m.fstype == mounttab.FSTYPE and m.uid == users.uid(users.alice)]
        # once the admin starts the shared view, the same command works
        jbl(store, "mount", "--allow-other", mnt).ok()
        try:
            r = as_user(users.alice, "run", "--runtime", "everyday", "--", "sh", "-c",
                        "echo hi", store=store)
            assert (r.rc, r.out) == (0, "hi\n"), r.err
        finally:
            _umount(mnt)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_another_users_private_home_is_not_a_store_you_can_use(users: Users,
                                                               regdir: Path) -> None:
    theirs = users.home(users.bob) / "jbl"  # /home/bob is 0700
    reg = shared_dir("jbl-reg-")
    try:
        shutil.copytree(regdir, reg, dirs_exist_ok=True)
        subprocess.run(["chmod", "-R", "a+rX", str(reg)], check=True)  # copytree kept 0700
        for args in (("store", "install", "demo", "--registry", str(reg)),
                     ("store", "list"), ("mount", "--status")):
            r = as_user(users.alice, *args, store=theirs)
            if args[-1] == "--status":
                assert r.rc == 0, r.err  # nothing of it is mounted: true, and harmless
                continue
            assert_one_line_error(r, rc=8, contains=str(theirs))
            assert "internal error" not in r.err and "--debug" not in r.err, r.err
        assert not os.path.lexists(theirs)
        os.chown(reg, users.uid(users.alice), -1)  # a store of alice's own works
        as_user(users.alice, "store", "install", "demo", "--registry", str(reg),
                store=reg / "mine").ok()
    finally:
        shutil.rmtree(reg, ignore_errors=True)


# --- the store's checks and the registry ---------------------------------------------------
def test_verify_repair_without_data_finds_and_repairs_a_corrupt_blob(demo_store: Path) -> None:
    blob = max((p for p in (demo_store / "blobs").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only re-hashing sees it
    blob.write_bytes(bytes(data))
    assert jbl(demo_store, "store", "verify").ok().out.startswith("store OK")  # sizes only
    r = jbl(demo_store, "store", "verify", "--repair").ok()
    assert "repaired 1 blobs of demo@1.0.0" in r.out and "(data re-hashed)" in r.out
    assert jbl(demo_store, "store", "verify", "--data").ok().out.startswith("store OK")


def test_available_latest_is_what_this_host_would_install(store_dir: Path,
                                                          regdir: Path) -> None:
    (row,) = json.loads(jbl(store_dir, "store", "available", "--registry", regdir,
                            "--json").ok().out)
    assert row["versions"] == ["1.0.0", "1.1.0", "2.0.0"]
    assert row["latest"] == "1.1.0"  # 2.0.0 is offered only for another architecture
    r = jbl(store_dir, "store", "install", "demo", "--registry", regdir).ok()
    assert r.out.startswith("installed demo@1.1.0")


# --- the CLI itself and the package --------------------------------------------------------
def test_a_usage_mistake_names_the_program_once() -> None:
    r = run_jbl("store", "install")
    assert (r.rc, r.err) == (2, "jbl: error: the following arguments are required: "
                                "NAME[@VERSION] (see 'jbl store install --help')\n")
    r = run_jbl()
    assert r.rc == 2 and r.err.startswith("jbl: error: the following arguments are required")


def test_pyproject_license_is_the_spdx_string_setuptools_wants() -> None:
    """What ``pip install .`` builds with: setuptools warns about a ``license`` table."""
    python = str(PREFIX / "bin/python") if (PREFIX / "bin/python").exists() else None
    if python is None:
        installed_jbl()
        python = str(PREFIX / "bin/python")
    probe = ("import sys\nfrom setuptools.config.pyprojecttoml import apply_configuration\n"
             "from setuptools.dist import Distribution\n"
             "d = apply_configuration(Distribution(), sys.argv[1])\n"
             "print(d.metadata.license_expression)")
    r = subprocess.run([python, "-W", "error", "-c", probe, str(REPO / "pyproject.toml")],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert (r.returncode, r.stdout) == (0, "Apache-2.0\n"), r.stderr[-2000:]
