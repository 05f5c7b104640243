"""The engine-neutral core (fusefs/core.py), called directly over a real imported store:
the typed answers both engines encode. No kernel, no pyfuse3 (the core must not need it).
"""

from __future__ import annotations

import errno
import stat
import sys
from pathlib import Path

import pytest
from fixtures_mount import build_rt, import_tarball, make_tarball
from jbl.fusefs.core import Core, Negative, StatFs
from jbl.fusefs.errnos import Errno
from jbl.fusefs.inodes import ROOT_INODE, Node
from jbl.fusefs.tree import TIMEOUT, TOP_TIMEOUT, TopChange
from jbl.store.store import Store
from jbl.store.view import View

BIG = bytes(range(256)) * 9000  # > 2 MiB: three chunks


def _attr(ino: int, *_rest: int) -> int:
    return ino  # the core never looks inside an engine's attributes


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("core")
    s = base / "store"
    for ver in ("1.0.0", "2.0.0"):
        rt = build_rt("pyrt", ver, tmp_path_factory, extra={"data/big.bin": BIG})
        import_tarball(s, make_tarball(rt, base / f"pyrt-{ver}.tar.gz"))
    return s


def _walk(core: Core, *parts: str) -> Node:
    ino = ROOT_INODE
    for p in parts:
        got = core.lookup(ino, p.encode())
        assert isinstance(got, Node), p
        ino = got.inode
    return core.node(ino)


def test_the_core_does_not_import_pyfuse3() -> None:
    import subprocess

    code = ("import sys, jbl.fusefs.core, jbl.fusefs.rawfs, jbl.fusefs.rawmount; "
            "assert 'pyfuse3' not in sys.modules and 'trio' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_lookups_negatives_and_their_timeouts(store_dir: Path) -> None:
    with Store.open(store_dir, readonly=True) as store:
        core = Core(View(store), _attr)
        top = core.lookup(ROOT_INODE, b"nope")
        assert top == Negative(TOP_TIMEOUT)  # the top levels change with installs
        usr = _walk(core, "pyrt", "1.0.0", "isolated", "usr")
        assert core.lookup(usr.inode, b"nope") == Negative(TIMEOUT)  # immutable below
        link = _walk(core, "pyrt", "latest")
        assert core.readlink(link.inode) == b"2.0.0"
        with pytest.raises(Errno) as ei:
            core.readlink(usr.inode)
        assert ei.value.code == errno.EINVAL
        f = _walk(core, "pyrt", "1.0.0", "runtime.yml")
        with pytest.raises(Errno) as ei:
            core.lookup(f.inode, b"x")
        assert ei.value.code == errno.ENOTDIR
        with pytest.raises(Errno) as ei:
            core.node(10**12)  # an inode the kernel should have forgotten
        assert ei.value.code == errno.ENOENT


def test_statfs_is_the_stores_logical_size(store_dir: Path) -> None:
    with Store.open(store_dir, readonly=True) as store:
        view = View(store)
        size, files = view.totals()
        assert Core(view, _attr).statfs() == StatFs((size + 4095) // 4096, files)


def test_pages_and_offsets(store_dir: Path) -> None:
    with Store.open(store_dir, readonly=True) as store:
        core = Core(View(store), _attr)
        name_dir = _walk(core, "pyrt")
        listing = core.top_listing(name_dir)
        page = list(core.top_page(listing, 0))
        assert [(n, off) for n, _c, off in page] == [(b"1.0.0", 1), (b"2.0.0", 2),
                                                     (b"latest", 3)]
        assert [n for n, _c, _o in core.top_page(listing, 2)] == [b"latest"]
        d = _walk(core, "pyrt", "1.0.0", "isolated", "usr", "bin")
        whole = list(core.entries(d, 0, 1000))
        paged, after = [], 0  # resuming at an entry's id gives the rest, in any batch size
        while True:
            got = list(core.entries(d, after, 3))[:3]
            if not got:
                break
            paged += got
            after = got[-1].id
        assert paged == whole and len(whole) > 3
        with pytest.raises(Errno) as ei:
            core.directory(_walk(core, "pyrt", "1.0.0", "runtime.yml").inode)
        assert ei.value.code == errno.ENOTDIR


def test_read_plans_and_the_eisdir_check(store_dir: Path) -> None:
    with Store.open(store_dir, readonly=True) as store:
        view = View(store)
        core = Core(view, _attr)
        big = core.file(_walk(core, "pyrt", "1.0.0", "isolated", "data", "big.bin").inode)
        for off, n in [(0, len(BIG)), ((1 << 20) - 3, 10), (len(BIG) - 1, 100), (len(BIG), 5)]:
            got = b"".join(view.read_piece(p) for p in core.read_plan(big, off, n))
            assert got == BIG[off:off + n], (off, n)
        d = _walk(core, "pyrt", "1.0.0", "isolated")
        for call in (lambda: core.file(d.inode), lambda: core.read_plan(d, 0, 1)):
            with pytest.raises(Errno) as ei:
                call()
            assert ei.value.code == errno.EISDIR
        assert d.kind == stat.S_IFDIR


def test_index_changes_are_handed_on_only_once_live(store_dir: Path, tmp_path: Path) -> None:
    from conftest import run_jbl

    with Store.open(store_dir, readonly=True) as store:
        seen: list[TopChange] = []
        core = Core(View(store), _attr, seen.append)
        _walk(core, "pyrt")  # a name directory the kernel holds: its changes are reported
        core.poll()
        assert seen == []
        rt = build_rt_here(tmp_path)
        run_jbl("store", "import", make_tarball(rt, tmp_path / "t.tar.gz"),
                store=store_dir).ok()
        try:
            core.poll()
            assert seen == []  # not serving a kernel yet: nothing to invalidate
            core.live = True
            run_jbl("store", "rm", "pyrt@3.0.0", store=store_dir).ok()
            core.poll()
            assert len(seen) == 1 and seen[0].moved and not seen[0].names
        finally:
            run_jbl("store", "rm", "pyrt@3.0.0", store=store_dir)


def build_rt_here(tmp_path: Path) -> Path:
    from conftest import build_runtime

    return build_runtime(tmp_path / "pyrt-3.0.0", "pyrt", "3.0.0")
