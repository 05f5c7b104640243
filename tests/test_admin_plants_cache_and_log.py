"""Root follows no link an admin-group member plants in ``cache/`` or ``run/`` (issue 10, 3).

The registry cache (``STORE/cache/registries``) and the mount daemon's log
(``STORE/run/mount.log``) live in group-writable directories of a ``jbl setup --system``
store. A real member of the admin group (carol, created by the test) plants links there,
aimed at root-only places outside the store; root then does what root does on such a server
(``jbl store install``/``available`` from an http registry on 127.0.0.1, ``jbl mount
--allow-other``). Each test checks that nothing outside the store was created, written,
truncated or renamed, that nothing planted was read, and that the legitimate work next to
the attack still happens.

What root does with each plant (docs/shared-server.md):
* ``cache`` or ``cache/registries`` not a real directory: the install still runs, without
  the store's cache (one ``jbl: WARNING`` line naming the item); the index is cached in
  root's own cache instead. ``jbl setup --system`` replaces the item.
* ``run/mount.log`` a link (or FIFO, hard link): replaced — the link itself removed, a new
  log started with a WARNING line naming what it was; the mount starts.
* ``run`` a link: refused, one line, exit 10, nothing written; ``jbl setup --system``
  replaces it. A ``run`` swapped for a link while the daemon runs changes nothing: the
  daemon keeps the directory it opened.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Result, assert_one_line_error, run_jbl
from fixtures_registry import RegistryServer, publish
from fixtures_users import Users, drop_users, make_users, sh_as, shared_dir
from jbl.fusefs import mounttab
from jbl.fusefs.mounttab import LOG_MAX
from jbl.store.errors import UnsafeStorePath


@dataclass
class Server:
    users: Users
    base: Path
    store: Path
    mnt: Path
    sysroot: Path
    http: RegistryServer

    def setup(self) -> Result:
        return run_jbl("setup", "--system", "--group", self.users.admin_group, "--mountpoint",
                       str(self.mnt), "--root", str(self.sysroot), store=self.store)

    def carol(self, script: str) -> None:
        """A shell script as the admin-group member; it must succeed (the plant works)."""
        r = sh_as(self.users.carol, script)
        assert r.returncode == 0, f"planting failed: {r.stderr}"

    def root_only_dir(self, name: str, files: dict[str, bytes]) -> Path:
        d = self.base / name
        d.mkdir(mode=0o700)
        for f, data in files.items():
            (d / f).write_bytes(data)
            os.chmod(d / f, 0o600)
        return d

    def jbl(self, *args: str | os.PathLike[str], cache: str = "root-cache") -> Result:
        """root's jbl, with root's own registry cache in the test's directory."""
        return run_jbl(*args, store=self.store, timeout=120,
                       env={"XDG_CACHE_HOME": str(self.base / cache), "JBL_CONFIG": ""})


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    users = make_users()
    base = shared_dir("jbl-plants-")
    http = RegistryServer(base / "www")
    try:
        (base / "sys/etc").mkdir(parents=True)
        shutil.copy("/etc/fuse.conf", base / "sys/etc/fuse.conf")
        publish(http.root, "demo", "1.0.0")
        publish(http.root, "demo", "1.1.0")
        srv = Server(users, base, base / "store", base / "mnt", base / "sys", http)
        srv.setup().ok()
        yield srv
    finally:
        run_jbl("umount", base / "mnt", store=base / "store")
        if os.path.ismount(base / "mnt"):
            subprocess.run(["umount", "-l", str(base / "mnt")], capture_output=True)
        http.stop()
        drop_users(users)
        shutil.rmtree(base, ignore_errors=True)


def fingerprint(*roots: Path) -> dict[str, tuple[object, ...]]:
    """Owner, mode, type, size and content hash of everything under ``roots`` (no link
    followed): equal before and after means nothing there was touched."""
    out: dict[str, tuple[object, ...]] = {}
    for root in roots:
        for p in [root, *sorted(root.rglob("*"))]:
            st = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) \
                else ""
            out[str(p)] = (st.st_uid, st.st_gid, st.st_mode, st.st_size, digest)
    return out


def cache_name(server: Server) -> str:
    """The file name the cache gives the server's index (store/registry.py)."""
    return hashlib.sha256((server.http.url + "registry.json").encode()).hexdigest() + ".json"


# --- the registry cache --------------------------------------------------------------------
def test_install_never_writes_the_cache_through_a_planted_link(server: Server) -> None:
    s = server.store
    victim = server.root_only_dir("cache-victim", {"keep": b"root's own\n"})
    (victim / "registries").mkdir(mode=0o700)  # what a followed cache/ would write into
    before = fingerprint(victim)
    server.carol(f"cd {s} && rm -rf cache && ln -s {victim} cache")

    r = server.jbl("store", "install", "demo@1.0.0", "--registry", server.http.url).ok()

    assert fingerprint(victim) == before  # nothing created, written or renamed there
    assert f"{s}/cache is a symbolic link to {victim}" in r.err
    warnings = [ln for ln in r.err.splitlines() if "registry cache is not used" in ln]
    assert len(warnings) == 1, r.err  # said once, though the cache is read and written
    # the legitimate use: installed, and the index cached in root's own cache instead
    assert "installed demo@1.0.0" in r.out
    assert (server.base / "root-cache/jbl/registries" / cache_name(server)).is_file()
    assert (s / "cache").is_symlink()  # left for setup, which replaces it:
    assert f"{s}/cache is a symbolic link" in server.setup().ok().out
    assert (s / "cache").is_dir() and not (s / "cache").is_symlink()


def test_a_planted_cache_is_never_read_and_a_real_one_is_used(server: Server) -> None:
    s = server.store
    server.setup().ok()  # a real cache/ (the other test may have run first)
    # carol's own directory holds a fresh "cached index" forging a runtime, and
    # cache/registries points at it; a followed link would make root believe it
    forged = Path(f"/home/{server.users.carol}/forged")
    doc = b'{"version": "1", "runtimes": {"forged": {"6.6.6": {"version": "6.6.6", ' \
          b'"download_url": "x.tar", "checksum": "sha256:' + b"0" * 64 + b'"}}}}'
    server.carol(f"chmod 755 ~ && mkdir -p {forged} && "
                 f"printf '%s' '{doc.decode()}' > {forged}/{cache_name(server)} && "
                 f"cd {s}/cache && rm -rf registries && ln -s {forged} registries")
    before = fingerprint(forged)

    r = server.jbl("store", "available", "--registry", server.http.url, cache="cache2").ok()

    assert "forged" not in r.out and "demo" in r.out  # the server's index, not the plant
    assert f"{s}/cache/registries is a symbolic link to {forged}" in r.err
    assert fingerprint(forged) == before  # and nothing written into carol's directory
    # setup puts a real directory back; the store's cache then serves root again
    assert f"{s}/cache/registries is a symbolic link" in server.setup().ok().out
    assert not (s / "cache/registries").is_symlink()
    r = server.jbl("store", "available", "--registry", server.http.url, cache="cache3").ok()
    assert "registry cache is not used" not in r.err
    cached = s / "cache/registries" / cache_name(server)
    assert cached.is_file() and not cached.is_symlink()
    assert b"forged" not in cached.read_bytes()
    assert not (server.base / "cache3/jbl/registries" / cache_name(server)).exists()


# --- the mount daemon's log ----------------------------------------------------------------
def test_a_planted_mount_log_link_is_replaced_never_written_through(server: Server) -> None:
    s, mnt = server.store, server.mnt
    server.setup().ok()
    server.jbl("store", "install", "demo@1.0.0", "--registry", server.http.url).ok()
    big = b"root's own log-like file\n" * (LOG_MAX // 25 + 2)  # past LOG_MAX: rotatable
    victim = server.root_only_dir("log-victim", {"secret.log": big})
    before = fingerprint(victim)
    server.carol(f"cd {s}/run && rm -f mount.log mount.log.1 && "
                 f"ln -s {victim}/secret.log mount.log")

    run_jbl("mount", "--allow-other", mnt, store=s, timeout=60).ok()
    try:
        assert (mnt / "demo" / "1.0.0" / "runtime.yml").read_text().startswith("name: demo")
    finally:
        run_jbl("umount", mnt, store=s).ok()

    assert fingerprint(victim) == before  # not written, truncated, rotated or renamed
    log = s / "run" / "mount.log"
    assert log.is_file() and not log.is_symlink() and not (s / "run/mount.log.1").exists()
    text = log.read_text()
    assert f"WARNING replaced {log}: it was a symbolic link to {victim}/secret.log" in text
    assert "mounted " in text and "stopped; served" in text  # the daemon logged there


def test_a_planted_run_link_is_refused_and_a_later_swap_changes_nothing(server: Server) -> None:
    s, mnt = server.store, server.mnt
    server.setup().ok()
    server.jbl("store", "install", "demo@1.0.0", "--registry", server.http.url).ok()
    big = b"x" * (LOG_MAX + 1)
    outside = server.root_only_dir("run-victim", {"mount.log": big})
    os.chmod(outside, 0o755)  # carol can name it; only root can write it
    before = fingerprint(outside)
    server.carol(f"cd {s} && rm -rf run && ln -s {outside} run")

    r = run_jbl("mount", "--allow-other", mnt, store=s, timeout=60)

    assert_one_line_error(r, 10, f"{s}/run is a symbolic link to {outside}")
    assert not os.path.ismount(mnt)
    assert fingerprint(outside) == before  # no rotation (rename), no new log there
    # setup replaces the link; the mount then starts and logs in the real run/
    server.setup().ok()
    run_jbl("mount", "--allow-other", mnt, store=s, timeout=60).ok()
    try:
        # carol swaps run/ for the link while the daemon runs; its next lines must still
        # go to the directory it opened (now run.old), never through the link
        server.carol(f"cd {s} && mv run run.old && ln -s {outside} run")
        assert (mnt / "demo" / "1.0.0" / "runtime.yml").is_file()
    finally:
        run_jbl("umount", mnt, store=s).ok()
    assert fingerprint(outside) == before
    assert "stopped; served" in (s / "run.old" / "mount.log").read_text()
    server.carol(f"cd {s} && rm -f run && mv run.old run")


def test_a_fifo_hard_link_or_directory_as_the_log_never_blocks_or_leaks(tmp_path: Path) -> None:
    """The other plants, in-process (no users needed): a FIFO nobody reads (an open for
    writing would block without O_NONBLOCK) and a hard link to another file are replaced;
    a directory is refused in one line."""
    log = tmp_path / "store" / "run" / "mount.log"
    log.parent.mkdir(parents=True)
    os.mkfifo(log)
    fd = mounttab.open_log(log)
    os.write(fd, b"after\n")
    os.close(fd)
    assert stat.S_ISREG(log.lstat().st_mode)
    assert f"WARNING replaced {log}: it was a FIFO" in log.read_text()
    victim = tmp_path / "victim"
    victim.write_text("another file\n")
    log.unlink()
    os.link(victim, log)
    fd = mounttab.open_log(log)
    os.write(fd, b"after\n")
    os.close(fd)
    assert victim.read_text() == "another file\n" and victim.stat().st_nlink == 1
    assert "it was a regular file" in log.read_text()
    log.unlink()
    log.mkdir()
    with pytest.raises(UnsafeStorePath, match="is a directory, not a regular file"):
        mounttab.open_log(log)
    assert mounttab.read_log_tail(log) == ""
