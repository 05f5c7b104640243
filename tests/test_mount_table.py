"""Finding mounts from the mountpoint alone: `jbl umount MNT` with no --store, `jbl mount
--status` without dead entries, a non-root user mounting through fusermount3, a bounded log.

The story: an admin mounts a store with `--store`, and later (another shell, a systemd
ExecStop) runs `jbl umount MNT` with no store at all: the daemon is stopped cleanly, and
"stale" is said only of a mount whose daemon really died. Dead private views never linger in
`--status`. An ordinary user mounts a store of their own (through fusermount3), reads
it, and unmounts it, with the daemon's log somewhere the user may write.

Every test runs on both engines (the ``engine`` fixture): finding, stopping and recording a
mount is the serve skeleton's job (fusefs/mount.py, shared), and a user's mount goes through
fusermount3 with either (the raw engine calls it itself, pyfuse3 through libfuse).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import assert_one_line_error, run_jbl
from fixtures_mount import (  # noqa: F401 - fixtures
    build_rt,
    engine,
    import_tarball,
    make_tarball,
    sweep_mounts,
    wait_until,
)
from fixtures_users import as_user, sh_as, shared_dir
from jbl.fusefs import mount as mountmod
from jbl.fusefs import mounttab
from jbl.store.store import pid_alive


@pytest.fixture(scope="module")
def tarball(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rt = build_rt("pyrt", "1.0.0", tmp_path_factory, extra={"data/hello.txt": b"hello\n"})
    return make_tarball(rt, tmp_path_factory.mktemp("tab") / "pyrt-1.0.0.tar.gz")


@pytest.fixture
def store(tarball: Path, store_dir: Path) -> Path:
    import_tarball(store_dir, tarball)
    return store_dir


def _status_all() -> list[dict[str, object]]:
    return json.loads(run_jbl("mount", "--status", "--all", "--json").ok().out)  # type: ignore


def test_umount_without_store_stops_the_daemon_and_stale_means_dead(
        store: Path, tmp_path: Path, engine: str) -> None:  # noqa: F811
    mp = tmp_path / "mnt"
    mp.mkdir()
    run_jbl("mount", mp, "--engine", engine, store=store).ok()
    try:
        (st,) = mountmod.status(store)
        assert st.state == "mounted" and st.store == str(store)
        # no --store (and no JBL_STORE): the mountpoint alone finds the daemon
        r = run_jbl("umount", mp).ok()
        assert "stopped" in r.err and "stale" not in r.err, r.err
        assert not pid_alive(st.pid, st.pid_start)
        assert mounttab.mount_fstype(mp) is None
        assert mountmod.status(store) == []
        assert not mounttab.record_path(str(mp)).exists()

        # a daemon that really died: now, and only now, the mount is "stale"
        run_jbl("mount", mp, "--engine", engine, store=store).ok()
        (st,) = mountmod.status(store)
        os.kill(st.pid, signal.SIGKILL)
        assert wait_until(lambda: mounttab.connection_dead(mp))
        (row,) = [s for s in _status_all() if s["mountpoint"] == str(mp)]
        assert row["state"] == "stale" and row["store"] == str(store)
        r = run_jbl("umount", mp).ok()
        assert "stale" in r.err, r.err
        assert mounttab.mount_fstype(mp) is None
        assert_one_line_error(run_jbl("umount", mp), 11, "not mounted")
    finally:
        if mounttab.mount_fstype(mp):
            subprocess.run(["fusermount3", "-u", "-z", str(mp)])


def test_status_forgets_dead_views_and_says_which_store(
        store: Path, tmp_path: Path, engine: str) -> None:  # noqa: F811
    live, dead = tmp_path / "live", tmp_path / "jbl-view-dead"
    live.mkdir()
    dead.mkdir()
    run_jbl("mount", live, "--engine", engine, store=store).ok()
    run_jbl("mount", dead, "--engine", engine, store=store).ok()
    try:
        # a private view whose daemon was killed and whose mount was detached by someone
        # else: its record is all that is left
        (st,) = [s for s in mountmod.status(store) if s.mountpoint == str(dead)]
        os.kill(st.pid, signal.SIGKILL)
        assert wait_until(lambda: not pid_alive(st.pid, st.pid_start))
        subprocess.run(["fusermount3", "-u", "-z", str(dead)], check=True)
        record = mounttab.record_path(str(dead))
        assert record.exists()
        rows = [s for s in _status_all() if s["store"] == str(store)]
        assert [(r["mountpoint"], r["state"]) for r in rows] == [(str(live), "mounted")]
        assert not record.exists()  # pruned: it will not be listed forever
        out = run_jbl("mount", "--status", store=store).ok().out
        assert str(live) in out and str(store) in out and str(dead) not in out
    finally:
        run_jbl("umount", live)
        for mp in (live, dead):
            if mounttab.mount_fstype(mp):
                subprocess.run(["fusermount3", "-u", "-z", str(mp)])


def test_the_daemon_log_is_rotated_before_it_grows_without_bound(
        store: Path, tmp_path: Path, engine: str) -> None:  # noqa: F811
    log = mounttab.log_path(store)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_bytes(b"old line\n" * (mounttab.LOG_MAX // 9 + 1))
    mp = tmp_path / "mnt"
    mp.mkdir()
    run_jbl("mount", mp, "--engine", engine, store=store).ok()
    try:
        assert Path(f"{log}.1").stat().st_size >= mounttab.LOG_MAX
        assert log.stat().st_size < 64 << 10 and "mounted" in log.read_text()
    finally:
        run_jbl("umount", mp).ok()
    assert "stopped" in log.read_text()


# --- a non-root user --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def user() -> Iterator[str]:
    """A fresh unprivileged user. Distributions make /dev/fuse mode 0666 (udev) so that
    users can mount through fusermount3; where this machine has it root-only, it is opened
    up for the duration of the test and restored afterwards."""
    name = f"jblt{secrets.token_hex(2)}-mnt"
    subprocess.run(["useradd", "-m", "-s", "/bin/sh", name], check=True, capture_output=True)
    mode = os.stat("/dev/fuse").st_mode & 0o777
    try:
        if mode & 0o006 != 0o006:
            os.chmod("/dev/fuse", 0o666)
        yield name
    finally:
        os.chmod("/dev/fuse", mode)
        subprocess.run(["userdel", "-r", "-f", name], capture_output=True)


def test_a_user_mounts_their_own_store_through_fusermount3(
        user: str, tarball: Path, engine: str) -> None:  # noqa: F811
    base = shared_dir("jbl-usermount-")
    try:
        store, mp = base / "store", base / "mnt"
        import_tarball(store, tarball)
        mp.mkdir()
        (store / "run").mkdir(exist_ok=True)
        subprocess.run(["chown", "-R", f"{user}:", str(store), str(mp)], check=True)
        # run/ not writable (as on a store someone else set up): the log goes to the user's
        # own directory instead
        os.chmod(store / "run", 0o555)
        r = as_user(user, "mount", mp, "--engine", engine, store=store)
        assert r.rc == 0, r.err
        try:
            info = mounttab.mount_info(mp)
            assert info is not None and info.fstype == mounttab.FSTYPE
            pw_uid = int(subprocess.run(["id", "-u", user], capture_output=True, text=True,
                                        check=True).stdout)
            assert info.uid == pw_uid  # mounted by fusermount3 for the user, not by root
            c = sh_as(user, f"cat {mp}/pyrt/1.0.0/isolated/data/hello.txt")
            assert c.returncode == 0 and c.stdout == "hello\n", c.stderr
            s = as_user(user, "mount", "--status", "--json", store=store)
            (row,) = json.loads(s.out)
            assert row["state"] == "mounted" and row["store"] == str(store)
            assert Path(f"/home/{user}/.local/state/jbl/mounts").is_dir()
            # root sees the user's mount and its store in the host-wide view
            (mine,) = [x for x in _status_all() if x["mountpoint"] == str(mp)]
            assert mine["store"] == str(store) and mine["pid"] == row["pid"]
        finally:
            u = as_user(user, "umount", mp)  # no --store
        assert u.rc == 0 and "stopped" in u.err, u.err
        assert mounttab.mount_fstype(mp) is None
        log = Path(f"/home/{user}/.local/state/jbl/mount.log").read_text()
        assert "mounted" in log and "stopped" in log
    finally:
        if mounttab.mount_fstype(base / "mnt"):
            subprocess.run(["fusermount3", "-u", "-z", str(base / "mnt")])
        shutil.rmtree(base, ignore_errors=True)
