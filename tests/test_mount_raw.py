"""The raw engine's own promises (the shared behaviour is tested for both engines in
test_mount.py / test_mount_live.py):

- its wire structs have the kernel header's sizes;
- once warm, a Python start in a chroot of the mount reaches the daemon only for what the
  kernel cannot answer itself (no open, opendir, readdir, lookup or read any more);
- a version whose top directory the kernel holds is leased, so `jbl store rm` defers it.
"""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import run_jbl
from fixtures_mount import (  # noqa: F401 - fixtures
    build_rt,
    import_tarball,
    make_tarball,
    mounted,
    sweep_mounts,
)
from jbl.fusefs import kernel as K
from jbl.fusefs import mount as mountmod
from jbl.fusefs import mounttab
from jbl.store.store import Store

IMPORTS = "import json, email, http.client, asyncio, sqlite3, jblprobe"


def test_wire_structs_have_the_kernel_headers_sizes() -> None:
    # sizes from include/uapi/linux/fuse.h (protocol 7.38)
    assert K.IN_HEADER.size == 40 and K.OUT_HEADER.size == 16
    assert K.INIT_OUT.size == 64 and K.ENTRY_OUT.size == 128 and K.ATTR_OUT.size == 104
    assert K.READ_IN.size == 40 and K.KSTATFS.size == 80 and K.DIRENT.size == 24
    assert K.NOTIFY_INVAL_ENTRY_OUT.size == 16 and K.NOTIFY_INVAL_INODE_OUT.size == 24
    assert K.dirent_size(1, False) == 32 and K.dirent_size(8, True) == 128 + 32
    assert K.OPCODE_NAMES[K.READDIRPLUS] == "readdirplus" and len(set(K.OPCODE_NAMES)) > 50


@pytest.fixture(scope="module")
def raw_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rt = build_rt("pyrt", "1.0.0", tmp_path_factory)
    base = tmp_path_factory.mktemp("raw")
    store_dir = base / "store"
    import_tarball(store_dir, make_tarball(rt, base / "pyrt-1.0.0.tar.gz"))
    return store_dir


def _requests(store_dir: Path, pid: int) -> dict[str, int]:
    """What reached the daemon so far (it logs its counters on SIGUSR1)."""
    log = mounttab.log_path(store_dir)
    before = log.read_text().count("requests so far")
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = log.read_text()
        if text.count("requests so far") > before:
            line = [ln for ln in text.splitlines() if "requests so far" in ln][-1]
            return ast.literal_eval(re.sub(r".*requests so far: ", "", line))  # type: ignore
        time.sleep(0.05)
    raise AssertionError("the daemon did not report its counters")


def test_a_warm_python_start_reaches_the_daemon_almost_never(
        raw_store: Path, tmp_path: Path) -> None:
    with mounted(raw_store, tmp_path / "mnt", engine="raw") as mp:
        (st,) = mountmod.status(raw_store)
        iso = mp / "pyrt/1.0.0/isolated"

        def python() -> None:
            r = subprocess.run(["chroot", str(iso), "/usr/bin/python3", "-c", IMPORTS],
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr

        python()
        python()
        first = _requests(raw_store, st.pid)
        # OPEN and OPENDIR were answered ENOSYS once each: the kernel never asks again
        assert first["open"] == 1 and first["opendir"] == 1
        for _ in range(3):
            python()
        warm = _requests(raw_store, st.pid)
        grown = {k: warm[k] - first.get(k, 0) for k in warm if warm[k] != first.get(k, 0)}
        # Only what the kernel cannot keep: ioctl (isatty() on every file Python opens; its
        # ENOSYS is not cached) and attributes of the 1-second top levels.
        assert set(grown) <= {"ioctl", "getattr", "lookup"}, grown
        assert grown.get("lookup", 0) <= 6 and grown.get("getattr", 0) <= 12, grown


def test_a_browsed_version_is_leased_so_rm_defers_it(raw_store: Path, tmp_path: Path) -> None:
    with mounted(raw_store, tmp_path / "mnt", engine="raw") as mp:
        (st,) = mountmod.status(raw_store)
        assert (mp / "pyrt/1.0.0/runtime.yml").exists()
        store = Store.open(raw_store, readonly=True)
        try:
            leases = store.live_leases()
        finally:
            store.close()
        assert [(kind, pid) for _id, _vid, kind, pid in leases] == [("mount", st.pid)]
        held = open(mp / "pyrt/1.0.0/runtime.yml", "rb")  # noqa: SIM115
        try:
            run_jbl("store", "rm", "pyrt@1.0.0", store=raw_store).ok()
            store = Store.open(raw_store, readonly=True)
            try:  # deferred: marked removed, rows and blobs kept for the open file
                assert store.db.scalar("SELECT state FROM versions") == "removed"
            finally:
                store.close()
            deadline = time.monotonic() + 10
            while (mp / "pyrt").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert os.listdir(mp) == []
            assert held.read().startswith(b"name: pyrt")
        finally:
            held.close()
    # unmounted: the kernel forgot everything, the daemon dropped its lease on the way out
    store = Store.open(raw_store, readonly=True)
    try:
        assert store.live_leases() == []
    finally:
        store.close()
    r = run_jbl("mount", "--status", "--json", store=raw_store).ok()
    assert json.loads(r.out) == []
