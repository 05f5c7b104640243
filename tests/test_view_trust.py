"""Discovery of running views trusts only what it should (issue 10, point 2).

An ordinary user (bob) serves a trojan ``pyrt@1.0.0`` from his own ``jbl mount --allow-other``
of his own store and forges his mount record to name the system store; he plants FIFOs and
symlinks where records are read, and records whose pid is someone else's. Root's ``jbl run``
and ``jbl mount --status`` must not be fooled, must not hang, and the legitimate uses next to
each attack (bob's own job on his own mount, root's own mount for users) still work.

Real users (tests/fixtures_users.py), real mounts, real jobs. ``user_allow_other`` is put in
/etc/fuse.conf for the module if missing (what ``jbl setup --system`` does on a real server:
the attack needs it), and /dev/fuse opened to users (0666, the distributions' default) where
this machine has it root-only; both are restored afterwards.

The module runs once per engine (the ``engine`` fixture; ``JBL_MOUNT_ENGINE`` set for every
jbl it starts, users' mounts and root's private views included): the records, the
``fuse.jbl`` type and the source name in mountinfo are written by the serve skeleton and the
engines' mount options, so a trojan must be refused whichever engine serves it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import run_jbl
from fixtures_mount import engine, make_tarball, wait_until  # noqa: F401 - fixture
from fixtures_users import Users, as_user, drop_users, make_users, sh_as, shared_dir
from jbl.fusefs import linger, mounttab
from jbl.store.store import proc_starttime

RT = "pyrt@1.0.0"
PROBE = ["python3", "-c", "import jblprobe; print(jblprobe.VERSION)"]
FUSE_CONF = Path("/etc/fuse.conf")


@dataclass
class World:
    users: Users
    base: Path
    system: Path      # root's store: the genuine runtime
    bob_store: Path   # bob's own store: a trojan of the same name and version
    bob_mnt: Path     # bob's `jbl mount --allow-other` of his store
    bob_records: Path


@pytest.fixture(scope="module")
def world(rt_factory, engine: str  # type: ignore[no-untyped-def] # noqa: F811
          ) -> Iterator[World]:
    saved_engine = os.environ.get("JBL_MOUNT_ENGINE")
    os.environ["JBL_MOUNT_ENGINE"] = engine  # every jbl below inherits it (as_user too)
    conf = FUSE_CONF.read_text() if FUSE_CONF.exists() else None
    if conf is None or "user_allow_other" not in [ln.strip() for ln in conf.splitlines()]:
        FUSE_CONF.write_text((conf or "") + "\nuser_allow_other\n")
    fuse_mode = os.stat("/dev/fuse").st_mode & 0o777
    open_fuse()
    users = make_users()
    base = shared_dir()
    bob = users.bob
    try:
        genuine = make_tarball(rt_factory("pyrt", "1.0.0", probe="genuine"), base / "g.tar.gz")
        trojan = make_tarball(rt_factory("pyrt", "1.0.0", probe="trojan"), base / "t.tar.gz")
        os.chmod(trojan, 0o644)
        system = base / "system"
        run_jbl("store", "import", genuine, store=system).ok()
        home = users.home(bob)
        w = World(users, base, system, home / "store", home / "mnt",
                  home / ".local/state/jbl/mounts")
        as_user(bob, "store", "import", trojan, store=w.bob_store).ok()
        assert sh_as(bob, f"mkdir -p {w.bob_mnt}").returncode == 0
        as_user(bob, "mount", "--allow-other", w.bob_mnt, store=w.bob_store).ok()
        yield w
    finally:
        for r in mounttab.records():
            if r.store.startswith((str(base), "/home/" + users.bob)):
                run_jbl("umount", r.mountpoint)
        for m in mounttab.jbl_mounts():
            if m.startswith("/home/" + users.bob):
                run_jbl("umount", m)
        drop_users(users)
        shutil.rmtree(base, ignore_errors=True)
        os.chmod("/dev/fuse", fuse_mode)
        if conf is None:
            FUSE_CONF.unlink(missing_ok=True)
        else:
            FUSE_CONF.write_text(conf)
        if saved_engine is None:
            os.environ.pop("JBL_MOUNT_ENGINE", None)
        else:
            os.environ["JBL_MOUNT_ENGINE"] = saved_engine


def open_fuse() -> None:
    """Users mount through fusermount3, which needs /dev/fuse read-write (another module's
    teardown may have closed it again meanwhile)."""
    if os.stat("/dev/fuse").st_mode & 0o006 != 0o006:
        os.chmod("/dev/fuse", 0o666)


def bob_record(w: World) -> Path:
    return mounttab.record_path(str(w.bob_mnt), w.bob_records)


def forge(w: World, path: Path, **fields: object) -> None:
    """Bob rewrites his own record (he may: it is his file in his directory)."""
    rec = json.loads(path.read_text())
    rec.update(fields)
    sh_as(w.users.bob, f"cat > {path}.new <<'EOF'\n{json.dumps(rec)}\nEOF\nmv {path}.new {path}")
    assert json.loads(path.read_text()) == rec


def root_probe(w: World, **env: str) -> tuple[str, float]:
    t0 = time.monotonic()
    r = run_jbl("run", "--runtime", RT, "--", *PROBE, store=w.system, timeout=60,
                env={"JBL_VIEW_LINGER": "0", **env})
    assert r.rc == 0, r.err
    return r.out.strip(), time.monotonic() - t0


def status_all(user: str | None = None) -> list[dict[str, object]]:
    r = (as_user(user, "mount", "--status", "--all", "--json", timeout=30) if user else
         run_jbl("mount", "--status", "--all", "--json", timeout=30))
    assert r.rc == 0, r.err
    return json.loads(r.out)  # type: ignore[no-any-return]


def test_the_mount_names_its_store_and_owner_in_mountinfo(
        world: World, engine: str) -> None:  # noqa: F811
    # the engine really is the one under test (the environment reached bob's daemon)
    (rec,) = [r for r in mounttab.records() if r.mountpoint == str(world.bob_mnt)]
    assert rec.engine == engine
    m = mounttab.mount_info(world.bob_mnt)
    assert m is not None and m.fstype == mounttab.FSTYPE
    assert m.uid == world.users.uid(world.users.bob)
    assert m.source == mounttab.fs_source(world.bob_store)
    assert mounttab.fs_source("/a,b c") .startswith("jbl:sha256:")


def test_a_forged_record_does_not_make_root_run_a_users_trojan(world: World) -> None:
    w, bob = world, world.users.bob
    path = bob_record(w)
    original = path.read_text()
    # the attack: bob's live --allow-other mount, its record now naming the system store
    forge(w, path, store=str(w.system))
    try:
        out, _ = root_probe(w)
        assert out == "genuine"
        # nor does root's --status count it as a mount of the system store
        r = run_jbl("mount", "--status", "--json", store=w.system).ok()
        assert not [s for s in json.loads(r.out) if s["mountpoint"] == str(w.bob_mnt)]
    finally:
        forge(w, path, **json.loads(original))
    # the legitimate use next to it: bob's own job of his own store uses his own mount
    r = as_user(bob, "run", "--runtime", RT, "--", *PROBE, store=w.bob_store)
    assert (r.rc, r.out.strip()) == (0, "trojan"), r.err
    mine = json.loads(as_user(bob, "mount", "--status", "--json", store=w.bob_store).ok().out)
    assert [s["mountpoint"] for s in mine] == [str(w.bob_mnt)]  # no private view was needed


def test_root_uses_only_its_own_mount_and_users_may_use_roots(world: World) -> None:
    w, bob = world, world.users.bob
    mnt = w.base / "rootmnt"
    mnt.mkdir()
    run_jbl("mount", "--allow-other", mnt, store=w.system).ok()
    try:
        views = mounttab.usable_views(w.system)
        assert [v.mountpoint for v in views] == [str(mnt)]
        assert root_probe(w)[0] == "genuine"
        # bob's job of the system store may use root's mount (not his own, not a private one)
        os.chmod(w.system, 0o755)
        r = as_user(bob, "run", "--runtime", RT, "--", *PROBE, store=w.system)
        assert (r.rc, r.out.strip()) == (0, "genuine"), r.err
        mine = json.loads(as_user(bob, "mount", "--status", "--json", store=w.system).ok().out)
        assert not [s for s in mine if s["private"]]
    finally:
        run_jbl("umount", mnt)


def test_fifo_and_symlink_records_neither_hang_nor_leak(world: World) -> None:
    w, bob = world, world.users.bob
    fifo, link = w.bob_records / "mount-fifo0000000000.json", w.bob_records / "mount-link.json"
    assert sh_as(bob, f"mkfifo {fifo} && ln -s /etc/shadow {link}").returncode == 0
    # root's own lingering-view files for this store, replaced by a FIFO and a link
    files = linger.view_files(w.system)
    assert files is not None
    for p in (files.current, files.hold):
        p.unlink(missing_ok=True)
    os.mkfifo(files.current)
    files.hold.symlink_to("/etc/shadow")
    shadow = os.stat("/etc/shadow")
    try:
        t0 = time.monotonic()
        rows = status_all()
        assert time.monotonic() - t0 < 20
        mine = [s for s in rows if s["mountpoint"] == str(w.bob_mnt)]
        assert len(mine) == 1 and mine[0]["state"] == "mounted"
        assert not [s for s in rows if "root:" in json.dumps(s)]
        out, took = root_probe(w, JBL_VIEW_LINGER="60")  # goes through the linger files
        assert out == "genuine" and took < 30
        assert os.stat("/etc/shadow").st_mtime_ns == shadow.st_mtime_ns  # not touched
        # bob's own --status with the FIFO in his own directory: prompt too
        t0 = time.monotonic()
        assert [s["mountpoint"] for s in status_all(bob)
                if s["store"] == str(w.bob_store)] == [str(w.bob_mnt)]
        assert time.monotonic() - t0 < 20
    finally:
        fifo.unlink(missing_ok=True)
        link.unlink(missing_ok=True)
        files.current.unlink(missing_ok=True)
        files.hold.unlink(missing_ok=True)


def test_a_huge_or_malformed_record_is_skipped(world: World) -> None:
    w, bob = world, world.users.bob
    big, bad = w.bob_records / "mount-big.json", w.bob_records / "mount-bad.json"
    sh_as(bob, f"head -c 1000000 /dev/zero > {big}; printf '[[[[[[[[[[' > {bad}")
    try:
        assert [s["mountpoint"] for s in status_all()
                if s["mountpoint"].startswith(str(w.users.home(bob)))] == [str(w.bob_mnt)]
    finally:
        big.unlink(missing_ok=True)
        bad.unlink(missing_ok=True)


def test_a_record_naming_someone_elses_pid_is_not_alive(world: World) -> None:
    """The EACCES/ESRCH pid trick: bob's daemon dies, his record now names a root process
    (which he may not signal) or no process at all; neither is 'alive', and root's umount
    signals nobody."""
    w, bob = world, world.users.bob
    path = bob_record(w)
    rec = json.loads(path.read_text())
    victim = subprocess.Popen(["sleep", "60"])
    try:
        subprocess.run(["kill", "-KILL", str(rec["pid"])], check=True)
        assert wait_until(lambda: mounttab.connection_dead(w.bob_mnt))
        for pid, start in ((victim.pid, proc_starttime(victim.pid)), (2 ** 22 - 3, 1)):
            forge(w, path, pid=pid, pid_start=start)
            for rows in (status_all(), status_all(bob)):
                mine = [s for s in rows if s["mountpoint"] == str(w.bob_mnt)]
                assert len(mine) == 1 and mine[0]["state"] == "stale", mine
                assert mine[0]["alive"] is False
        r = run_jbl("umount", w.bob_mnt).ok()
        assert "stale" in r.err + r.out
        assert victim.poll() is None  # root's process was not signalled
    finally:
        victim.kill()
        victim.wait()
    # the legitimate use again: bob mounts anew and it is found
    open_fuse()
    as_user(bob, "mount", "--allow-other", w.bob_mnt, store=w.bob_store).ok()
    assert [s["state"] for s in status_all(bob) if s["mountpoint"] == str(w.bob_mnt)] == \
        ["mounted"]


def test_a_users_mount_without_allow_other_is_not_alive_to_root(world: World) -> None:
    w, bob = world, world.users.bob
    mnt = w.users.home(bob) / "mnt2"
    assert sh_as(bob, f"mkdir -p {mnt}").returncode == 0
    open_fuse()
    as_user(bob, "mount", mnt, store=w.bob_store).ok()
    try:
        mine = [s for s in status_all() if s["mountpoint"] == str(mnt)]
        assert len(mine) == 1 and mine[0]["alive"] is False  # EACCES to root: not usable
        assert [s["alive"] for s in status_all(bob) if s["mountpoint"] == str(mnt)] == [True]
    finally:
        as_user(bob, "umount", mnt)
