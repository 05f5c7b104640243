"""The shared server (issue 6): one store set up by an admin, used by many real users.

The story: root runs ``jbl setup --system`` (pointed at a temporary store, mountpoint and
system root so the machine's own /var/lib/jbl and /etc stay untouched) and installs a
runtime. Then real, freshly created Linux users log in (``runuser``): ordinary users list,
inspect, browse and run jobs but cannot change the store or reach each other's files; a
member of the admin group installs. Users are removed at the end (``userdel -r``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cgroup_probe
import pytest
from conftest import assert_one_line_error, run_jbl
from fixtures_users import (
    Users,
    as_user,
    index_dump,
    make_registry,
    sh_as,
    shared_dir,
    tree_state,
)
from jbl.store.db import open_db

RT = "sharedrt"


def need(module: str) -> None:
    """Skip (saying why) until the command a test drives exists in the tree."""
    if importlib.util.find_spec(f"jbl.cli.{module}") is None:
        pytest.skip(f"jbl.cli.{module} not written yet")


@dataclass
class Server:
    users: Users
    base: Path
    store: Path
    mnt: Path
    sysroot: Path
    reg: Path
    setup_out: str

    def setup_args(self, *extra: str) -> list[str]:
        return ["setup", "--system", "--group", self.users.admin_group, "--mountpoint",
                str(self.mnt), "--root", str(self.sysroot), "--joblet-alias", *extra]


@pytest.fixture(scope="module")
def server(users: Users, rt_factory) -> Iterator[Server]:
    base = shared_dir()
    (base / "sys/etc").mkdir(parents=True)
    shutil.copy("/etc/fuse.conf", base / "sys/etc/fuse.conf")
    reg = make_registry(base / "reg", [
        (RT, "1.0.0", rt_factory(RT, "1.0.0", probe="one")),
        (RT, "1.1.0", rt_factory(RT, "1.1.0", probe="two"))])
    srv = Server(users, base, base / "store", base / "mnt", base / "sys", reg, "")
    r = run_jbl(*srv.setup_args(), store=srv.store).ok()
    srv.setup_out = r.out
    run_jbl("store", "install", f"{RT}@1.0.0", "--registry", reg, store=srv.store).ok()
    try:
        yield srv
    finally:
        run_jbl("umount", srv.mnt, store=srv.store)  # also a stale one; no-op if none
        if os.path.ismount(srv.mnt):
            subprocess.run(["umount", "-l", str(srv.mnt)], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def mounted(server: Server) -> Server:
    """The shared mount, as jbl-mount.service would serve it (root, --allow-other)."""
    need("mount_cmd")
    if not server.mnt.is_mount():
        run_jbl("mount", "--allow-other", server.mnt, store=server.store, timeout=60).ok()
    return server


def _mode(p: Path) -> tuple[int, str, int]:
    import grp

    st = p.stat()
    return stat.S_IMODE(st.st_mode), grp.getgrgid(st.st_gid).gr_name, st.st_uid


# --- the admin sets the server up ---------------------------------------------------------
def test_setup_dry_run_changes_nothing_and_needs_root_for_real(users: Users) -> None:
    base = shared_dir()
    try:
        args = ["setup", "--system", "--group", users.admin_group, "--mountpoint",
                str(base / "mnt"), "--root", str(base / "sys")]
        r = run_jbl(*args, "--dry-run", store=base / "store").ok()
        assert "would create" in r.out and "store index" in r.out
        assert list(base.iterdir()) == []
        r = as_user(users.alice, *args, store=base / "store")
        assert_one_line_error(r, 8, "setup --system needs root")
        assert list(base.iterdir()) == []
    finally:
        shutil.rmtree(base)


def test_setup_lays_out_a_least_privilege_store(server: Server) -> None:
    g = server.users.admin_group
    s = server.store
    assert _mode(s) == (0o2775, g, 0)
    for name in ("index.db", "index.db-wal", "index.db-shm", "lock", "publish.lock"):
        assert _mode(s / name) == (0o660, g, 0), name  # no one else may open (so lock) them
    assert _mode(s / "public") == (0o2775, g, 0)
    assert stat.S_IMODE((s / "public/summary.json").stat().st_mode) == 0o644
    assert _mode(s / "blobs") == (0o2770, g, 0)
    assert _mode(s / "blobs" / "a7")[:2] == (0o2770, g)
    # nothing in the store is writable by others
    for p in [s, *s.rglob("*")]:
        assert not p.lstat().st_mode & stat.S_IWOTH, p


def test_setup_writes_units_fuse_conf_and_alias_and_says_how_to_start(server: Server) -> None:
    units = server.sysroot / "etc/systemd/system"
    mount_unit = (units / "jbl-mount.service").read_text()
    assert f"mount --foreground --allow-other {server.mnt}" in mount_unit
    assert f"--store {server.store}" in mount_unit
    assert "store gc --quiet --recompress --max-time 1h" in (units / "jbl-gc.service").read_text()
    assert "OnCalendar=daily" in (units / "jbl-gc.timer").read_text()
    lines = [ln.strip() for ln in (server.sysroot / "etc/fuse.conf").read_text().splitlines()]
    assert lines.count("user_allow_other") == 1
    alias = server.sysroot / "opt/joblet/runtimes"
    assert alias.is_symlink() and Path(os.readlink(alias)) == server.mnt
    if not Path("/run/systemd/system").is_dir():
        assert "systemd is not running" in server.setup_out
        assert f"mount --allow-other {server.mnt}" in server.setup_out


def test_setup_again_changes_nothing(server: Server) -> None:
    before = tree_state(server.store)
    r = run_jbl(*server.setup_args("--json"), store=server.store).ok()
    doc = json.loads(r.out)
    changed = [s for s in doc["steps"] if s["result"] != "ok"]
    assert changed == [], changed
    assert tree_state(server.store) == before


# --- ordinary users -----------------------------------------------------------------------
def test_ordinary_user_lists_inspects_and_sizes_the_store(server: Server) -> None:
    alice = server.users.alice
    r = as_user(alice, "store", "list", store=server.store).ok()
    assert RT in r.out and "1.0.0" in r.out
    rows = json.loads(as_user(alice, "store", "list", "--json", store=server.store).ok().out)
    assert any(row.get("name") == RT for row in rows), rows
    r = as_user(alice, "store", "info", f"{RT}@1.0.0", store=server.store).ok()
    assert "1.0.0" in r.out
    as_user(alice, "store", "df", store=server.store).ok()


def test_user_reads_while_an_admin_is_writing(server: Server) -> None:
    """Readers never wait for the writer, also without write access to the index files."""
    db = open_db(server.store)  # as jbl's own writers open it (persistent WAL)
    conn = db.conn
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO meta(key, value) VALUES ('jbl-test-uncommitted', 'x')")
        t0 = time.monotonic()
        r = as_user(server.users.bob, "store", "list", store=server.store).ok()
        assert RT in r.out
        assert time.monotonic() - t0 < 20
    finally:
        conn.execute("ROLLBACK")
        conn.close()


def test_ordinary_user_sees_what_is_available_without_writing_the_store(
        server: Server) -> None:
    alice = server.users.alice
    files = tree_state(server.store)
    r = as_user(alice, "store", "available", "--json", "--registry", server.reg,
                store=server.store).ok()
    offered = json.dumps(json.loads(r.out))
    assert RT in offered and "1.0.0" in offered and "1.1.0" in offered, r.out
    assert "1.1.0" in as_user(alice, "store", "available", "--registry", server.reg,
                              store=server.store).ok().out
    assert tree_state(server.store) == files  # no cache written into the system store
    assert not [p for p in server.store.rglob("*")
                if p.lstat().st_uid == server.users.uid(alice)]


def test_ordinary_user_cannot_change_the_store(server: Server) -> None:
    alice, g = server.users.alice, server.users.admin_group
    files, index = tree_state(server.store), index_dump(server.store)
    for args in (["store", "install", f"{RT}@1.1.0", "--registry", str(server.reg)],
                 ["store", "rm", "--yes", f"{RT}@1.0.0"],
                 ["store", "gc"],
                 ["store", "gc", "--keep-latest", "1"],
                 ["store", "pin", f"{RT}@1.0.0"]):
        r = as_user(alice, *args, store=server.store)
        assert_one_line_error(r, 8, f"needs root or membership in group {g}")
        assert args[1] in r.err  # names what was refused
    assert index_dump(server.store) == index
    assert tree_state(server.store) == files


def test_store_internals_are_closed_to_ordinary_users(server: Server) -> None:
    alice, s = server.users.alice, server.store
    assert sh_as(alice, f"touch {s}/evil").returncode != 0
    assert sh_as(alice, f"ls {s}/blobs").returncode != 0  # runtimes only through the mount
    assert sh_as(alice, f"echo x >> {s}/index.db").returncode != 0
    assert sh_as(alice, f"test -r {s}/index.db").returncode != 0  # the public summary instead
    assert sh_as(alice, f"test -r {s}/public/summary.json").returncode == 0
    assert not (s / "evil").exists()


def test_admin_group_member_installs_and_collects(server: Server) -> None:
    carol, alice = server.users.carol, server.users.alice
    r = as_user(carol, "store", "install", f"{RT}@1.1.0", "--registry", server.reg,
                store=server.store)
    r.ok()
    r = as_user(alice, "store", "list", store=server.store).ok()
    assert "1.0.0" in r.out and "1.1.0" in r.out
    # what carol wrote stays administrable by the group and readable for everyone
    for p in server.store.rglob("*"):
        assert not p.lstat().st_mode & stat.S_IWOTH, p
    as_user(carol, "store", "gc", store=server.store).ok()
    # and the index stays readable for users after an admin's write
    as_user(alice, "store", "info", f"{RT}@1.1.0", store=server.store).ok()
    run_jbl("store", "verify", store=server.store).ok()


def test_a_users_own_store_needs_no_admin(server: Server) -> None:
    """A private $XDG_DATA_HOME/jbl store is its owner's to change (and no one else's)."""
    alice, bob = server.users.alice, server.users.bob
    r = as_user(alice, "store", "install", f"{RT}@1.0.0", "--registry", server.reg)
    r.ok()
    own = Path(f"/home/{alice}/.local/share/jbl")
    assert (own / "index.db").exists() and own.stat().st_uid == server.users.uid(alice)
    assert RT in as_user(alice, "store", "list").ok().out
    os.chmod(f"/home/{alice}", 0o755)  # even when bob can reach it, he may not change it
    try:
        r = as_user(bob, "store", "rm", "--yes", f"{RT}@1.0.0", store=own)
        assert_one_line_error(r, 8, "needs root or membership")
    finally:
        os.chmod(f"/home/{alice}", 0o700)


# --- the mount and jobs -------------------------------------------------------------------
def test_users_browse_the_mount_read_only(mounted: Server) -> None:
    alice, m = mounted.users.alice, mounted.mnt
    p = sh_as(alice, f"ls {m}/{RT}/1.0.0/isolated/usr/bin && cat {m}/{RT}/1.0.0/runtime.yml")
    assert p.returncode == 0, p.stderr
    assert "python3" in p.stdout and RT in p.stdout
    p = sh_as(alice, f"touch {m}/{RT}/1.0.0/isolated/x")
    assert p.returncode != 0 and "Read-only" in p.stderr
    alias = mounted.sysroot / "opt/joblet/runtimes"
    assert sh_as(alice, f"cat {alias}/{RT}/1.0.0/runtime.yml").returncode == 0


def _run(srv: Server, user: str, *args: str, timeout: float = 120):  # type: ignore[no-untyped-def]
    return as_user(user, "run", "--runtime", f"{RT}@1.0.0", *args, store=srv.store,
                   timeout=timeout)


def test_user_runs_a_job_with_their_identity_on_a_shared_volume(mounted: Server) -> None:
    need("run_cmd")
    alice = mounted.users.alice
    r = _run(mounted, alice, "--", "python3", "-c", "import jblprobe; print(jblprobe.VERSION)")
    assert r.rc == 0, r.err
    assert r.out.strip() == "one"
    assert _run(mounted, alice, "--", "sh", "-c", "exit 7").rc == 7
    vol = Path(f"/home/{alice}/shared")
    sh_as(alice, f"mkdir -p {vol}")
    r = _run(mounted, alice, "--volume", f"{vol}:/data", "--",
             "sh", "-c", "id -u; echo hi > /data/out.txt")
    assert r.rc == 0, r.err
    assert r.out.split()[0] == str(mounted.users.uid(alice))
    st = (vol / "out.txt").stat()
    assert st.st_uid == mounted.users.uid(alice)
    assert (vol / "out.txt").read_text() == "hi\n"
    # the runtime is read-only and the store is not there at all; /tmp is the job's own
    r = _run(mounted, alice, "--", "sh", "-c",
             f"touch /usr/bin/x || echo ro-runtime; test -e {mounted.store} || echo no-store; "
             f"cat {mounted.store}/index.db > /dev/null 2>&1 || echo no-index; "
             "echo ok > /tmp/t && cat /tmp/t /usr/bin/cat > /dev/null && echo reads")
    assert r.rc == 0, r.err
    assert r.out.split() == ["ro-runtime", "no-store", "no-index", "reads"], r.out + r.err
    assert "Read-only file system" in r.err


def test_user_cannot_reach_another_users_files_through_jbl(mounted: Server) -> None:
    need("run_cmd")
    alice, bob = mounted.users.alice, mounted.users.bob
    secret = Path(f"/home/{bob}/private")
    assert sh_as(bob, f"mkdir -p {secret} && echo s3cr3t > {secret}/key && "
                      f"chmod 700 {secret}").returncode == 0
    r = _run(mounted, alice, "--volume", f"{secret}:/data", "--", "cat", "/data/key")
    assert r.rc != 0 and "s3cr3t" not in r.out + r.err
    r = _run(mounted, alice, "--upload", f"{secret}/key", "--", "cat", "key")
    assert r.rc != 0 and "s3cr3t" not in r.out + r.err


def test_jobs_of_different_users_cannot_see_each_other(mounted: Server) -> None:
    need("run_cmd")
    alice, bob = mounted.users.alice, mounted.users.bob
    marker = f"bobmarker{os.getpid()}"
    script = (f"echo secret > /tmp/{marker}; echo secret > {marker}; "
              f"echo ready; exec sleep 30")
    exe_args = ["run", "--runtime", f"{RT}@1.0.0", "--", "sh", "-c", script]
    from fixtures_users import user_jbl

    bobjob = subprocess.Popen(["runuser", "-u", bob, "--", user_jbl(), "--store",
                               str(mounted.store), *exe_args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd="/",
                              env={**os.environ, "HOME": f"/home/{bob}"})
    try:
        assert bobjob.stdout is not None
        line = bobjob.stdout.readline()
        assert line.strip() == "ready", bobjob.stderr.read() if bobjob.stderr else ""
        r = _run(mounted, alice, "--", "sh", "-c",
                 f"ls /tmp; ps -e -o comm= 2>/dev/null || ls /proc; cat /tmp/{marker}")
        assert "sleep" not in r.out and marker not in r.out and "secret" not in r.out
        # bob's work dir and /tmp live in his job's own mount namespace; the one way in
        # from the host is /proc/PID/{root,cwd}, which the kernel keeps from other users
        pids = [pid for pid in _pids_of(mounted.users.uid(bob))
                if Path(f"/proc/{pid}/comm").read_text().strip() == "sleep"]
        assert pids, "bob's job is not running"
        for pid in pids:
            assert Path(f"/proc/{pid}/root/tmp/{marker}").exists()  # root can: it's there
            for f in (f"/proc/{pid}/root/tmp/{marker}", f"/proc/{pid}/cwd/{marker}"):
                p = sh_as(alice, f"cat {f}")
                assert p.returncode != 0 and "secret" not in p.stdout, f
    finally:
        bobjob.terminate()
        try:
            bobjob.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            bobjob.kill()
            bobjob.communicate()


def _pids_of(uid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and d.stat().st_uid == uid:
                out.append(int(d.name))
        except OSError:
            pass
    return out


def test_root_runs_a_job_as_a_given_user(mounted: Server) -> None:
    need("run_cmd")
    alice = mounted.users.alice
    vol = Path(f"/home/{alice}/fromroot")
    sh_as(alice, f"mkdir -p {vol}")
    r = run_jbl("run", "--runtime", f"{RT}@1.0.0", "--user", alice, "--volume",
                f"{vol}:/data", "--", "sh", "-c", "id -u; touch /data/f", store=mounted.store)
    assert r.rc == 0, r.err
    assert r.out.split()[0] == str(mounted.users.uid(alice))
    assert (vol / "f").stat().st_uid == mounted.users.uid(alice)


def test_limits_without_cgroup_delegation_are_reported_not_fatal(mounted: Server) -> None:
    need("run_cmd")
    r = _run(mounted, mounted.users.alice, "--memory", "256M", "--", "true")
    assert r.rc == 0, r.err
    if cgroup_probe.limits_enforceable_for(mounted.users.alice):  # from the host, not jbl
        assert r.err == "", r.err
    else:
        assert r.err.count("\n") == 1 and "limits not enforced: memory" in r.err, r.err
