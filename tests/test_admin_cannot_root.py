"""An admin-group member cannot become root through links planted in the store (issue 10, 3).

The store of a ``jbl setup --system`` server is group-writable: a member of the admin group
may put anything in it. Here a real member (carol, created by the test) plants what the
attack needs — a symlinked ``lock``, ``index.db-shm``, shard directory, ``blobs/tmp``, gc
journal temp file, a blob that is a link to a root-only host file with index rows naming it,
a blob replaced by other bytes — and root then runs what root runs on such a server:
``jbl setup --system`` again, the daily ``jbl store gc``, ``jbl store verify [--repair]`` and
the ``--allow-other`` mount daemon. Each test asserts that nothing outside the store changed
owner, mode, content or existence, that the root-only bytes never appear anywhere, and that
the legitimate work next to the attack still happens.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Result, assert_one_line_error, run_jbl
from fixtures_users import Users, make_registry, sh_as, shared_dir
from jbl.cli.setup_cmd import BLOB_DIR_MODE, FILE_MODE

RT = "rootrt"
CHUNK = 1 << 20
BIG = os.urandom(3 * CHUNK)  # incompressible: stored as three RAW chunks


@dataclass
class Server:
    users: Users
    base: Path
    store: Path
    mnt: Path
    sysroot: Path
    reg: Path
    secret: Path   # root-only host file (0600 in a 0700 dir): what the attacks aim at
    token: str     # its content: must never appear in anything jbl outputs or serves

    def setup(self, store: Path | None = None) -> Result:
        return run_jbl("setup", "--system", "--group", self.users.admin_group, "--mountpoint",
                       str(self.mnt), "--root", str(self.sysroot), store=store or self.store)

    def carol(self, script: str) -> None:
        """Run a shell script as the admin-group member; it must succeed (the plant works)."""
        r = sh_as(self.users.carol, script)
        assert r.returncode == 0, f"planting failed: {r.stderr}"


@pytest.fixture(scope="module")
def server(users: Users, rt_factory) -> Iterator[Server]:
    base = shared_dir("jbl-admin-root-")
    (base / "sys/etc").mkdir(parents=True)
    shutil.copy("/etc/fuse.conf", base / "sys/etc/fuse.conf")
    reg = make_registry(base / "reg", [
        (RT, "1.0.0", rt_factory(RT, "1.0.0", probe="adm", extra={"data/big.bin": BIG}))])
    hidden = base / "rootonly"
    hidden.mkdir(mode=0o700)
    token = "ROOT-ONLY-" + secrets.token_hex(16)
    secret = hidden / "secret"
    secret.write_text(token + "\n")
    os.chmod(secret, 0o600)
    srv = Server(users, base, base / "store", base / "mnt", base / "sys", reg, secret, token)
    srv.setup().ok()
    run_jbl("store", "install", RT, "--registry", reg, store=srv.store).ok()
    try:
        yield srv
    finally:
        run_jbl("umount", srv.mnt, store=srv.store)
        if os.path.ismount(srv.mnt):
            subprocess.run(["umount", "-l", str(srv.mnt)], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


# --- helpers ------------------------------------------------------------------------------
def fingerprint(*roots: Path) -> dict[str, tuple[object, ...]]:
    """Owner, mode, size and content hash of every path under ``roots`` (links not followed)."""
    out: dict[str, tuple[object, ...]] = {}
    for root in roots:
        for p in [root, *root.rglob("*")] if root.is_dir() else [root]:
            try:
                st = p.lstat()
            except FileNotFoundError:
                out[str(p)] = ("missing",)
                continue
            digest = (hashlib.sha256(p.read_bytes()).hexdigest()
                      if stat.S_ISREG(st.st_mode) else "")
            out[str(p)] = (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode),
                           stat.S_IFMT(st.st_mode), st.st_size, digest)
    return out


def outside_dir(srv: Server, name: str, files: list[str]) -> Path:
    """A root-owned directory outside the store with old root-only files (what gc would
    delete and setup would chown/chmod if they followed a link into it)."""
    d = srv.base / name
    d.mkdir(mode=0o755)
    old = time.time() - 3 * 86400
    for f in files:
        (d / f).write_text("precious host file\n")
        os.chmod(d / f, 0o600)
        os.utime(d / f, (old, old))
    return d


def empty_shard(store: Path) -> str:
    for i in range(256):
        if not any((store / "blobs" / f"{i:02x}").iterdir()):
            return f"{i:02x}"
    raise AssertionError("no empty shard")


def blob_file(store: Path, digest: bytes) -> Path:
    h = digest.hex()
    return store / "blobs" / h[:2] / h[2:]


def leaked(srv: Server, *texts: str) -> bool:
    return any(srv.token in t for t in texts)


# --- setup --------------------------------------------------------------------------------
def test_setup_rerun_replaces_planted_links_and_touches_nothing_outside(server: Server) -> None:
    s, g = server.store, server.users.admin_group
    shard = empty_shard(s)
    shard_target = outside_dir(server, "setup-shard", ["f" * 62])
    tmp_target = outside_dir(server, "setup-tmp", ["keep"])
    shm_victim = server.base / "rootonly-shm"
    shm_victim.write_text("another root-only file\n")
    os.chmod(shm_victim, 0o600)
    before = fingerprint(server.secret, shm_victim, shard_target, tmp_target)
    # round 1: what root's setup would chown/chmod (the lock, a shard, tmp) or write through
    server.carol(f"cd {s} && rm -f lock && ln -s {server.secret} lock && "
                 f"rmdir blobs/{shard} blobs/tmp && "
                 f"ln -s {shard_target} blobs/{shard} && ln -s {tmp_target} blobs/tmp && "
                 f"ln -s {server.base}/created-by-root gc-pending.tmp")
    r1 = server.setup().ok()
    # round 2: SQLite's own files, which setup opens the index through
    server.carol(f"cd {s} && rm -f index.db-shm && ln -s {shm_victim} index.db-shm")
    r2 = server.setup().ok()

    assert fingerprint(server.secret, shm_victim, shard_target, tmp_target) == before
    assert not (server.base / "created-by-root").exists()
    for name in ("lock", f"blobs/{shard}", "blobs/tmp", "gc-pending.tmp"):
        assert f"{s}/{name} is a symbolic link" in r1.out, name  # said, with its target
    assert f"{s}/index.db-shm is a symbolic link to {shm_victim}" in r2.out
    import grp
    for name, kind, mode in (("lock", stat.S_IFREG, FILE_MODE),
                             (f"blobs/{shard}", stat.S_IFDIR, BLOB_DIR_MODE),
                             ("blobs/tmp", stat.S_IFDIR, BLOB_DIR_MODE)):
        st = (s / name).lstat()
        assert stat.S_IFMT(st.st_mode) == kind and stat.S_IMODE(st.st_mode) == mode, name
        assert (st.st_uid, grp.getgrgid(st.st_gid).gr_name) == (0, g), name
    assert not (s / "index.db-shm").is_symlink()
    assert not (s / "gc-pending.tmp").exists()
    # the legitimate use next to it: the store works and is whole
    run_jbl("store", "verify", store=s).ok()
    assert "1.0.0" in run_jbl("store", "list", store=s).ok().out


def test_setup_refuses_a_linked_index_and_changes_nothing(server: Server) -> None:
    store2 = server.base / "store2"
    server.setup(store2).ok()
    before = fingerprint(server.secret)
    server.carol(f"cd {store2} && mv index.db index.db.away && ln -s {server.secret} index.db")
    r = server.setup(store2)
    assert_one_line_error(r, 10, f"{store2}/index.db is a symbolic link")
    assert fingerprint(server.secret) == before
    assert (store2 / "index.db").is_symlink()  # left for the admin to sort out
    assert not leaked(server, r.out, r.err)
    for args in (["store", "gc"], ["store", "verify"]):  # root's other commands refuse it too
        r = run_jbl(*args, store=store2)
        assert_one_line_error(r, 10, f"{store2}/index.db is a symbolic link")
        assert fingerprint(server.secret) == before and not leaked(server, r.out, r.err)


# --- gc -----------------------------------------------------------------------------------
def test_gc_deletes_nothing_outside_the_store(server: Server) -> None:
    s = server.store
    shard = empty_shard(s)
    tmp_target = outside_dir(server, "gc-tmp", ["download-old", "abcdef.123"])
    shard_target = outside_dir(server, "gc-shard", ["e" * 62])
    before = fingerprint(server.secret, tmp_target, shard_target)
    # a real orphan (a killed install's leftover) in a real shard: gc must still sweep it
    orphan_digest = hashlib.sha256(b"orphan " + secrets.token_bytes(8)).digest()
    orphan = blob_file(s, orphan_digest)
    if orphan.parent.name == shard:
        orphan_digest = bytes([orphan_digest[0] ^ 1]) + orphan_digest[1:]
        orphan = blob_file(s, orphan_digest)
    server.carol(f"cd {s} && rmdir blobs/tmp blobs/{shard} && ln -s {tmp_target} blobs/tmp && "
                 f"ln -s {shard_target} blobs/{shard} && ln -s {server.secret} gc-pending.tmp "
                 f"&& echo leftover > {orphan} && touch -d '3 days ago' {orphan}")

    r = run_jbl("store", "gc", store=s).ok()

    assert fingerprint(server.secret, tmp_target, shard_target) == before
    assert f"skipped {s}/blobs/tmp: it is a symbolic link" in r.err
    assert f"skipped {s}/blobs/{shard}: it is a symbolic link" in r.err
    assert not orphan.exists(), "the legitimate sweep next to it did not happen"
    assert "1 orphan files" in r.out
    assert not leaked(server, r.out, r.err)
    # root's setup puts the real directories back; the store is whole again
    server.setup().ok()
    run_jbl("store", "verify", store=s).ok()


# --- a planted blob: the mount daemon, verify, repair --------------------------------------
@dataclass
class Planted:
    stolen_name: str     # an entry whose blob is a link to the root-only file
    tampered_chunk: int  # chunk of data/big.bin whose (raw) blob carol replaced
    tampered_digest: bytes


@pytest.fixture(scope="module")
def planted(server: Server) -> Planted:
    s = server.store
    size = len(server.token) + 1
    fake = hashlib.sha256(b"what the attacker claims the file holds").digest()
    # index rows: a file 'stolen' at the runtime's root whose one chunk is blob `fake`
    sql = f"""
    INSERT INTO blobs(digest, size, stored_size, codec, created_at)
        VALUES (X'{fake.hex()}', {size}, {size}, 0, 0);
    INSERT INTO contents(digest, size, nchunks) VALUES (X'{fake.hex()}', {size}, 1);
    INSERT INTO chunks(content_id, seq, blob_id) VALUES ((SELECT id FROM contents WHERE
        digest=X'{fake.hex()}'), 0, (SELECT id FROM blobs WHERE digest=X'{fake.hex()}'));
    INSERT INTO entries(version_id, parent_id, name, kind, mode, uid, gid, mtime_ns, size,
                        content_id, nlink)
        SELECT v.id, v.root_id, CAST('stolen' AS BLOB), {stat.S_IFREG}, 420, 0, 0, 0, {size},
               (SELECT id FROM contents WHERE digest=X'{fake.hex()}'), 1
        FROM versions v WHERE v.name='{RT}';
    """
    (server.base / "plant.sql").write_text(sql)
    os.chmod(server.base / "plant.sql", 0o644)
    link = blob_file(s, fake)
    seq = 1
    real = hashlib.sha256(BIG[seq * CHUNK:(seq + 1) * CHUNK]).digest()
    target = blob_file(s, real)
    assert target.stat().st_size == CHUNK  # raw: the partial-read path is the one tested
    server.carol(f"sqlite3 {s}/index.db < {server.base}/plant.sql && "
                 f"ln -s {server.secret} {link} && "
                 f"head -c {CHUNK} /dev/zero > {s}/blobs/tmp/evil && "
                 f"mv -f {s}/blobs/tmp/evil {target}")
    return Planted("stolen", seq, real)


def test_mount_daemon_serves_only_checked_bytes_of_regular_blobs(server: Server,
                                                                 planted: Planted) -> None:
    s, mnt = server.store, server.mnt
    run_jbl("mount", "--allow-other", mnt, store=s, timeout=60).ok()
    try:
        top = mnt / RT / "1.0.0"
        with pytest.raises(OSError) as e:
            (top / planted.stolen_name).read_bytes()
        assert e.value.errno == 5  # EIO: a link is never followed
        big = top / "isolated" / "data" / "big.bin"
        fd = os.open(big, os.O_RDONLY)
        try:
            # the legitimate reads next to it: an untouched chunk, read partially
            assert os.pread(fd, 4096, 8192) == BIG[8192:8192 + 4096]
            assert os.pread(fd, 4096, 2 * CHUNK + 100) == BIG[2 * CHUNK + 100:2 * CHUNK + 4196]
            # a partial range of the replaced raw chunk: checked, so EIO, never zeros
            with pytest.raises(OSError) as e:
                os.pread(fd, 4096, planted.tampered_chunk * CHUNK + 8192)
            assert e.value.errno == 5
        finally:
            os.close(fd)
        assert (top / "runtime.yml").read_text().startswith("name:")  # a normal file reads
    finally:
        run_jbl("umount", mnt, store=s)
    log = (s / "run" / "mount.log").read_text()
    assert f"blob {hashlib.sha256(b'what the attacker claims the file holds').hexdigest()}" \
        in log and "symbolic link" in log  # EIO, logged
    assert f"blob {planted.tampered_digest.hex()} is corrupt" in log
    assert not leaked(server, log)


def test_verify_and_repair_report_and_never_follow_the_link(server: Server,
                                                            planted: Planted) -> None:
    s = server.store
    before = fingerprint(server.secret)
    r = run_jbl("store", "verify", "--data", store=s)
    assert r.rc == 5, r.err
    assert "is not a regular file but a symbolic link to " + str(server.secret) in r.out
    assert f"blob {planted.tampered_digest.hex()}: content does not match" in r.out
    assert "internal error" not in r.err and not leaked(server, r.out, r.err)

    r = run_jbl("store", "verify", "--data", "--repair", store=s)
    assert "repaired 1 blobs" in r.out  # the replaced chunk comes back from the tarball
    assert r.rc == 5  # the planted link has no tarball: still reported, never followed
    assert f"blob {planted.tampered_digest.hex()}" not in r.out
    assert fingerprint(server.secret) == before
    assert not leaked(server, r.out, r.err)
    assert blob_file(s, planted.tampered_digest).read_bytes() == \
        BIG[planted.tampered_chunk * CHUNK:(planted.tampered_chunk + 1) * CHUNK]
