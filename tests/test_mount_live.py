"""A mount that lives through changes: installs and removals, other users, a dead daemon,
and the runner's ``view_root()``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from conftest import JBL, assert_one_line_error, run_jbl
from fixtures_mount import (  # noqa: F401 - fixtures
    build_rt,
    engine,
    import_tarball,
    make_tarball,
    mounted,
    other_user,  # noqa: F811
    sweep_mounts,
    wait_until,
)
from jbl.fusefs import broker, mounttab
from jbl.fusefs import mount as mountmod
from procs import reap


@pytest.fixture(scope="module")
def v1_tarball(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rt = build_rt("pyrt", "1.0.0", tmp_path_factory, extra={"data/secret.txt": b"root only\n",
                                                           "data/open.txt": b"everyone\n"})
    os.chmod(rt / "isolated/data/secret.txt", 0o600)
    return make_tarball(rt, tmp_path_factory.mktemp("live") / "pyrt-1.0.0.tar.gz")


@pytest.fixture
def store_with_v1(v1_tarball: Path, store_dir: Path) -> Path:
    import_tarball(store_dir, v1_tarball)
    return store_dir


def test_installs_and_removals_show_up_while_open_files_keep_reading(
        store_with_v1: Path, rt_factory, tmp_path: Path, engine: str) -> None:  # type: ignore  # noqa: F811
    store_dir = store_with_v1
    with mounted(store_dir, tmp_path / "mnt", engine=engine) as mp:
        assert os.listdir(mp / "pyrt") == ["1.0.0", "latest"]
        assert not (mp / "pyrt/2.0.0").exists()  # a negative lookup the kernel caches
        held = open(mp / "pyrt/1.0.0/isolated/usr/lib/python3/dist-packages/jblprobe/"  # noqa: SIM115
                    "__init__.py", "rb")
        held_dir = os.open(mp / "pyrt/1.0.0/isolated/usr/bin", os.O_RDONLY | os.O_DIRECTORY)
        try:
            rt2 = rt_factory("pyrt", "2.0.0")
            import_tarball(store_dir, make_tarball(rt2, tmp_path / "pyrt-2.0.0.tar.gz"))
            assert wait_until(lambda: (mp / "pyrt/2.0.0/runtime.yml").exists())
            assert wait_until(lambda: os.readlink(mp / "pyrt/latest") == "2.0.0")
            assert sorted(os.listdir(mp / "pyrt")) == ["1.0.0", "2.0.0", "latest"]

            run_jbl("store", "rm", "pyrt@1.0.0", store=store_dir).ok()
            assert wait_until(lambda: not (mp / "pyrt/1.0.0").exists())
            assert sorted(os.listdir(mp / "pyrt")) == ["2.0.0", "latest"]
            # what was open before the removal still reads
            assert held.read() == b"VERSION = '1.0.0'\n"
            assert "python3" in os.listdir(held_dir)
        finally:
            held.close()
            os.close(held_dir)


def test_a_second_user_reads_through_allow_other_with_modes_enforced(
        store_with_v1: Path, other_user: str, engine: str) -> None:  # noqa: F811
    store_dir = store_with_v1
    # pytest's tmp dirs are 0700: the other user needs a path it can walk to
    mp = Path(tempfile.mkdtemp(prefix="jbl-test-mnt-"))
    os.chmod(mp, 0o755)
    try:
        with mounted(store_dir, mp, engine=engine):
            r = subprocess.run(["runuser", "-u", other_user, "--", "ls", str(mp)],
                               capture_output=True, text=True)
            # without --allow-other only the mounting user gets in
            assert r.returncode != 0 and "Permission denied" in r.stderr
        _other_user_reads(store_dir, mp, other_user, engine)
    finally:
        mp.rmdir()


def _other_user_reads(store_dir: Path, mp: Path, user: str, engine: str) -> None:  # noqa: F811
    with mounted(store_dir, mp, "--allow-other", engine=engine):
        def as_other(*argv: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(["runuser", "-u", user, "--", *argv],
                                  capture_output=True, text=True)
        r = as_other("cat", str(mp / "pyrt/1.0.0/isolated/data/open.txt"))
        assert r.returncode == 0 and r.stdout == "everyone\n", r.stderr
        r = as_other("cat", str(mp / "pyrt/1.0.0/isolated/data/secret.txt"))
        assert r.returncode != 0 and "Permission denied" in r.stderr
        r = as_other(str(mp / "pyrt/1.0.0/isolated/usr/bin/python3.11"), "-c", "print(1)")
        # not a chroot: the host's loader runs the runtime's binary; it must at least exec
        assert r.returncode == 0 and r.stdout == "1\n", r.stderr


def test_a_killed_daemon_leaves_a_stale_mount_that_umount_and_mount_recover(
        store_with_v1: Path, tmp_path: Path, engine: str) -> None:  # type: ignore  # noqa: F811
    store_dir = store_with_v1
    mp = tmp_path / "mnt"
    mp.mkdir()
    run_jbl("mount", mp, "--engine", engine, store=store_dir).ok()
    try:
        (st,) = mountmod.status(store_dir)
        os.kill(st.pid, signal.SIGKILL)
        assert wait_until(lambda: not mounttab.answers(mp))
        with pytest.raises(OSError) as ei:
            os.listdir(mp)
        assert ei.value.errno == 107  # ENOTCONN: what a job sees when the daemon died
        r = run_jbl("mount", "--status", store=store_dir).ok()
        assert "stale" in r.out
        r = run_jbl("umount", mp, store=store_dir).ok()
        assert mounttab.mount_fstype(str(mp)) is None
        # and again, but this time `jbl mount` itself recovers the stale mountpoint
        run_jbl("mount", mp, "--engine", engine, store=store_dir).ok()
        (st,) = mountmod.status(store_dir)
        os.kill(st.pid, signal.SIGKILL)
        assert wait_until(lambda: not mounttab.answers(mp))
        run_jbl("mount", mp, "--engine", engine, store=store_dir).ok()
        assert (mp / "pyrt/1.0.0/runtime.yml").exists()
    finally:
        run_jbl("umount", mp, store=store_dir)
        if mounttab.mount_fstype(str(mp)):
            subprocess.run(["fusermount3", "-u", "-z", str(mp)])
    assert run_jbl("mount", "--status", store=store_dir).ok().out.strip().startswith("nothing")
    assert_one_line_error(run_jbl("umount", mp, store=store_dir), 11, "not mounted")


def test_foreground_mount_unmounts_cleanly_on_sigterm(
        store_with_v1: Path, tmp_path: Path, engine: str) -> None:  # type: ignore  # noqa: F811
    mp = tmp_path / "mnt"
    mp.mkdir()
    p = subprocess.Popen([JBL, "--store", str(store_with_v1), "mount", "--foreground",
                          "--engine", engine, str(mp)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: (mp / "pyrt").exists() or p.poll() is not None)
        assert p.poll() is None, p.communicate()
        p.send_signal(signal.SIGTERM)
        _out, err = p.communicate(timeout=15)
        assert p.returncode == 0, err
        assert mounttab.mount_fstype(str(mp)) is None
        assert mountmod.status(store_with_v1) == []
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
        if mounttab.mount_fstype(str(mp)):
            subprocess.run(["fusermount3", "-u", "-z", str(mp)])


def test_view_root_mounts_privately_or_reuses_a_running_mount(
        store_with_v1: Path, tmp_path: Path, engine: str) -> None:  # type: ignore  # noqa: F811
    store_dir = store_with_v1
    with broker.view_root(store_dir, engine=engine, linger=0) as root:
        assert (root / "pyrt/1.0.0/runtime.yml").read_text().startswith("name: pyrt")
        private = str(root)
        assert mounttab.mount_fstype(private) == mounttab.FSTYPE
    assert mounttab.mount_fstype(private) is None and not os.path.exists(private)
    with mounted(store_dir, tmp_path / "mnt", engine=engine) as mp, \
            broker.view_root(store_dir, engine=engine) as root:
        assert root == mp

    # the caller dies without cleaning up: its private view goes away by itself
    code = textwrap.dedent(f"""
        import sys, time
        from jbl.fusefs.broker import view_root
        with view_root({str(store_dir)!r}, engine={engine!r}, linger=0) as root:
            print(root, flush=True)
            time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        root = p.stdout.readline().strip()
        assert mounttab.mount_fstype(root) == mounttab.FSTYPE
    finally:
        reap(p)
    assert wait_until(lambda: mounttab.mount_fstype(root) is None, 10)
