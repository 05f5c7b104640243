"""No ordinary user can delay a store write, and what they read respects file modes (issue 10).

On a ``jbl setup --system`` store (temporary paths, real users, a root ``--allow-other``
mount): an ordinary user cannot open the lock file or the index files, so cannot lock them,
while root's install, gc and the mount's lease writes go ahead; a negative control shows the
same lock held by that user *would* have stalled gc. Ordinary users read the published summary
(store/snapshot.py) instead of the index: it shows what was just installed, and nothing about
files in 0700 directories, 0600 files, or a runtime.yml others may not read.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import assert_one_line_error, run_jbl
from fixtures_users import Users, as_user, drop_users, make_users, sh_as, shared_dir
from procs import reap
from rtbuild import build_runtime

RT = "stallrt"
HIDDEN = "hiddenymlrt"
TOKEN = secrets.token_hex(6)  # names and contents that must not leak
SECRET_DIR = f"opt/secretdir-{TOKEN}"
SECRET_FILE = f"etc/topsecret-{TOKEN}"
SECRET_BYTES = f"a private key {TOKEN}\n".encode() * 50
LOCKED_NAMES = ("lock", "publish.lock", "index.db", "index.db-wal", "index.db-shm")

# Run as the ordinary user with the system python3: open, flock and fcntl-lock (the bytes
# SQLite's WAL writers lock in -shm, and the index's own lock bytes) everything it can, say
# what happened as JSON, then hold it all until stdin closes.
HOLDER = r"""
import errno, fcntl, json, os, sys
store, names = sys.argv[1], sys.argv[2:]
held, res = [], {}
for name in names:
    try:
        fd = os.open(os.path.join(store, name), os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        res[name] = errno.errorcode[e.errno]
        continue
    held.append(fd)
    got = []
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        got.append("flock")
    except OSError:
        pass
    for start, length in ((120, 8), (1073741824, 512)):  # -shm WAL locks; the db's lock bytes
        try:
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, length, start)
            got.append("fcntl")
        except OSError:
            pass
    res[name] = "+".join(got) or "opened"
print(json.dumps(res), flush=True)
sys.stdin.read()
"""


@dataclass
class Srv:
    users: Users
    base: Path
    store: Path
    mnt: Path
    sysroot: Path
    tarballs: dict[str, Path]


def _tarball(src: Path, out: Path) -> Path:
    subprocess.run(["tar", "--numeric-owner", "--owner=0", "--group=0", "-C", str(src), "-cf",
                    str(out), "."], check=True)
    return out


def _runtimes(base: Path) -> dict[str, Path]:
    tbs: dict[str, Path] = {}
    for version in ("1.0.0", "1.1.0", "1.2.0"):
        d = build_runtime(base / f"src-{version}", RT, version, probe=version, extra={
            f"{SECRET_DIR}/inner-{TOKEN}.txt": SECRET_BYTES + version.encode(),
            SECRET_FILE: SECRET_BYTES})
        os.chmod(d / "isolated" / SECRET_DIR, 0o700)
        os.chmod(d / "isolated" / SECRET_FILE, 0o600)
        tbs[version] = _tarball(d, base / f"{RT}-{version}.tar")
    d = build_runtime(base / "src-hidden", HIDDEN, "1.0.0")
    yml = d / "runtime.yml"
    yml.write_text(yml.read_text() + f"  SECRET_ENV: {TOKEN}\n")
    os.chmod(yml, 0o600)
    tbs["hidden"] = _tarball(d, base / f"{HIDDEN}.tar")
    return tbs


@pytest.fixture(scope="module")
def srv() -> Iterator[Srv]:
    users = make_users()
    base = shared_dir("jbl-stall-")
    (base / "sys/etc").mkdir(parents=True)
    shutil.copy("/etc/fuse.conf", base / "sys/etc/fuse.conf")
    s = Srv(users, base, base / "store", base / "mnt", base / "sys", _runtimes(base))
    try:
        run_jbl("setup", "--system", "--group", users.admin_group, "--mountpoint", s.mnt,
                "--root", s.sysroot, store=s.store).ok()
        for key in ("1.0.0", "hidden"):
            run_jbl("store", "import", s.tarballs[key], store=s.store).ok()
        run_jbl("mount", "--allow-other", s.mnt, store=s.store, timeout=60).ok()
        yield s
    finally:
        run_jbl("umount", s.mnt, store=s.store)
        if os.path.ismount(s.mnt):
            subprocess.run(["umount", "-l", str(s.mnt)], capture_output=True)
        drop_users(users)
        shutil.rmtree(base, ignore_errors=True)


class Holder:
    """The ordinary user's process holding files of the store open (and locked if it can)."""

    def __init__(self, user: str, store: Path, names: tuple[str, ...]) -> None:
        self.proc = subprocess.Popen(
            ["runuser", "-u", user, "--", "/usr/bin/python3", "-c", HOLDER, str(store), *names],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd="/")
        try:
            assert self.proc.stdout is not None
            line = self.proc.stdout.readline()
            assert line, self.proc.stderr.read() if self.proc.stderr else "holder died"
            self.result: dict[str, str] = json.loads(line)
        except BaseException:
            reap(self.proc)
            raise

    def close(self) -> None:
        self.proc.communicate(input="", timeout=30)


def _timed(*args: str | os.PathLike[str], store: Path, limit: float) -> float:
    """Run root's ``jbl ARGS``; fail (not hang) if it takes longer than ``limit`` seconds."""
    t0 = time.monotonic()
    try:
        run_jbl(*args, store=store, timeout=limit).ok()
    except subprocess.TimeoutExpired:
        pytest.fail(f"`jbl {' '.join(map(str, args))}` stalled for over {limit:.0f} s")
    return time.monotonic() - t0


# --- the attack fails, writers go ahead ------------------------------------------------------
def test_ordinary_user_cannot_open_or_lock_what_writers_lock(srv: Srv) -> None:
    names = (*LOCKED_NAMES, "public/summary.json", ".")
    holder = Holder(srv.users.alice, srv.store, names)
    try:
        for name in LOCKED_NAMES:
            assert holder.result[name] == "EACCES", holder.result
        # what the user may open locks nothing a writer takes
        assert holder.result["public/summary.json"] != "EACCES"
        # with everything held: root installs, a user's first look at it through the root
        # mount takes the mount's lease (a write), gc sweeps; each well within the 60 s a
        # held -shm lock used to cost, and instead of hanging forever on a held flock
        _timed("store", "import", srv.tarballs["1.1.0"], store=srv.store, limit=90)
        t0 = time.monotonic()
        p = sh_as(srv.users.bob, f"ls {srv.mnt}/{RT}/1.1.0/isolated/usr", timeout=30)
        assert p.returncode == 0, p.stderr
        assert time.monotonic() - t0 < 20
        _timed("store", "gc", store=srv.store, limit=90)
    finally:
        holder.close()
    # the admin group's member, next to it, still opens the index (trusted with the store)
    carol = sh_as(srv.users.carol, f"test -r {srv.store}/index.db && test -w {srv.store}/lock")
    assert carol.returncode == 0, carol.stderr


def test_negative_control_a_lock_the_user_could_open_would_stall_gc(srv: Srv) -> None:
    """Give the lock file the old mode (0664): the same holder now takes it, and gc waits."""
    lock = srv.store / "lock"
    os.chmod(lock, 0o664)
    try:
        holder = Holder(srv.users.alice, srv.store, ("lock",))
        try:
            assert holder.result["lock"].startswith("flock"), holder.result
            with pytest.raises(subprocess.TimeoutExpired):
                run_jbl("store", "gc", store=srv.store, timeout=4)
        finally:
            holder.close()
    finally:
        os.chmod(lock, 0o660)
    _timed("store", "gc", store=srv.store, limit=90)


# --- what ordinary users read --------------------------------------------------------------
def test_ordinary_user_lists_what_was_just_installed_without_the_index(srv: Srv) -> None:
    run_jbl("store", "import", srv.tarballs["1.2.0"], store=srv.store).ok()
    alice = srv.users.alice
    r = as_user(alice, "store", "list", store=srv.store).ok()
    assert f"{RT}  1.2.0" in r.out or ("1.2.0" in r.out and RT in r.out), r.out
    rows = json.loads(as_user(alice, "store", "list", "--json", store=srv.store).ok().out)
    mine = {(x["name"], x["version"]) for x in rows}
    assert (RT, "1.2.0") in mine and (HIDDEN, "1.0.0") in mine
    # the same figures an admin sees from the index itself
    admin = json.loads(as_user(srv.users.carol, "store", "list", "--json",
                               store=srv.store).ok().out)
    strip = [{k: v for k, v in x.items() if k != "last_used_at"} for x in admin]
    assert [{k: v for k, v in x.items() if k != "last_used_at"} for x in rows] == strip
    d = json.loads(as_user(alice, "store", "info", "--json", f"{RT}@1.2.0",
                           store=srv.store).ok().out)
    assert d["version"] == "1.2.0" and d["files"] > 100 and d["environment"]["LANG"]
    assert d["in_use_by"] is None  # live holders are for admins only
    r = as_user(alice, "store", "info", RT, store=srv.store).ok()
    assert "1.2.0" in r.out and "shown to admins only" in r.out
    df = json.loads(as_user(alice, "store", "df", "--json", store=srv.store).ok().out)
    assert df["versions"] >= 3 and df["physical_bytes"] > 0 and df["blob_files"] > 0
    as_user(alice, "store", "df", store=srv.store).ok()
    # the runtime a job resolves comes from the same summary
    r = as_user(alice, "run", "--runtime", f"{RT}@1.2", "--", "python3", "-c",
                "import jblprobe; print(jblprobe.VERSION)", store=srv.store)
    assert r.rc == 0 and r.out.strip() == "1.2.0", r.err


def test_non_admin_verify_is_one_line_and_admins_verify(srv: Srv) -> None:
    r = as_user(srv.users.alice, "store", "verify", store=srv.store)
    assert_one_line_error(r, 8, f"verify needs root or membership in group "
                                f"{srv.users.admin_group}")
    assert "internal error" not in r.err
    r = as_user(srv.users.alice, "store", "verify", "--data", store=srv.store)
    assert_one_line_error(r, 8, "verify needs root")
    as_user(srv.users.carol, "store", "verify", store=srv.store).ok()


def test_summary_shows_nothing_of_private_files(srv: Srv) -> None:
    raw = (srv.store / "public/summary.json").read_bytes()
    doc = json.loads(raw)
    assert {v["name"] for v in doc["versions"]} == {RT, HIDDEN}
    # no per-file rows: no names, digests or sizes of the 0700 dir's or the 0600 file's files
    assert TOKEN.encode() not in raw
    for body in (SECRET_BYTES, SECRET_BYTES + b"1.0.0"):
        assert hashlib.sha256(body).hexdigest().encode() not in raw
    # the runtime.yml other users may not read: not in the summary, info says so
    hidden = next(v for v in doc["versions"] if v["name"] == HIDDEN)
    assert hidden["manifest"] is None and hidden["environment"] == {}
    r = as_user(srv.users.alice, "store", "info", HIDDEN, store=srv.store).ok()
    assert "runtime.yml" in r.out and "not shown" in r.out and TOKEN not in r.out
    # what the summary leaves out is exactly what the mount refuses to ordinary users...
    m = f"{srv.mnt}/{RT}/1.0.0"
    assert sh_as(srv.users.alice, f"ls {m}/isolated/{SECRET_DIR}").returncode != 0
    assert sh_as(srv.users.alice, f"cat {m}/isolated/{SECRET_FILE}").returncode != 0
    assert sh_as(srv.users.alice, f"cat {srv.mnt}/{HIDDEN}/1.0.0/runtime.yml").returncode != 0
    # ...while readable runtime.yml fields are there, and root still sees all through the mount
    shown = next(v for v in doc["versions"] if v["name"] == RT)
    assert shown["manifest"] and shown["environment"]["LANG"] == "C.UTF-8"
    assert (Path(m) / "isolated" / SECRET_FILE).read_bytes() == SECRET_BYTES


def test_planted_summary_link_or_fifo_neither_hangs_users_nor_misleads_root(srv: Srv) -> None:
    """An admin-group member replaces the summary with a link or a FIFO: users get one line
    at once, root's next refresh puts a real file back and never writes through the link."""
    carol, alice = srv.users.carol, srv.users.alice
    pub = srv.store / "public"
    target = srv.base / "root-only"  # stands for /etc/shadow (which other tests' useradd touch)
    target.write_text("root's\n")
    os.chmod(target, 0o600)
    before = os.stat(target)
    for plant in (f"ln -sfn {target} {pub}/summary.json",
                  f"rm -f {pub}/summary.json && mkfifo {pub}/summary.json"):
        assert sh_as(carol, plant).returncode == 0
        t0 = time.monotonic()
        r = as_user(alice, "store", "list", store=srv.store, timeout=30)
        assert_one_line_error(r, 10, "public summary")
        assert time.monotonic() - t0 < 20
        run_jbl("store", "pin", f"{RT}@1.0.0", store=srv.store).ok()  # a change: refresh
        run_jbl("store", "unpin", f"{RT}@1.0.0", store=srv.store).ok()
        st = (pub / "summary.json").lstat()
        assert stat.S_ISREG(st.st_mode)
        assert RT in as_user(alice, "store", "list", store=srv.store).ok().out
    after = os.stat(target)
    assert (after.st_mode, after.st_uid, after.st_mtime_ns) == (
        before.st_mode, before.st_uid, before.st_mtime_ns)
    assert target.read_text() == "root's\n"


def test_refresh_is_cheap_next_to_an_install(srv: Srv) -> None:
    """After an install on a store with several versions, its refresh of the summary costs a
    small fraction of the install."""
    from jbl.store.store import Store

    tb = srv.tarballs["1.1.0"]
    run_jbl("store", "rm", f"{RT}@1.1.0", store=srv.store).ok()
    t0 = time.monotonic()
    run_jbl("store", "import", tb, store=srv.store).ok()
    install = time.monotonic() - t0
    # Put the summary back to how it was before this install, then time the refresh the
    # install made: the new version's facts computed, the others' carried over, one write.
    summary = srv.store / "public/summary.json"
    doc = json.loads(summary.read_bytes())
    doc["versions"] = [v for v in doc["versions"] if v["version"] != "1.1.0"]
    summary.write_text(json.dumps(doc))
    with Store.open(srv.store) as store:
        t0 = time.monotonic()
        assert store.publish()
        refresh = time.monotonic() - t0
    assert "1.1.0" in as_user(srv.users.alice, "store", "list", store=srv.store).ok().out
    print(f"\ninstall {install:.2f} s (4 versions in the store), summary refresh "
          f"{refresh * 1000:.0f} ms", file=sys.stderr)
    assert refresh < install / 4, (install, refresh)
