"""`jbl mount`: a real FUSE mount of a real imported runtime, checked by independent tools.

The story: an admin imports a runtime tarball, mounts the store, and everything under
MOUNT/pyrt/1.0.0/ is what the tarball held — `mtree` (NetBSD's, from a spec `bsdtar` wrote
from the tarball) and `diff -r` against `tar -x` say so; readers get the right bytes at any
offset, from many threads; nothing can be modified; a chroot runs the runtime's python.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest
from conftest import assert_one_line_error, run_jbl
from fixtures_mount import (  # noqa: F401 - fixtures
    engine,
    import_tarball,
    mounted,
    pyrt_tarball,
    sweep_mounts,
)
from jbl.fusefs import mounttab

KEYWORDS = "!all,type,mode,uid,gid,size,time,link,sha256"


@pytest.fixture(scope="module")
def served(pyrt_tarball: Path, tmp_path_factory: pytest.TempPathFactory,  # noqa: F811
           engine: str):  # noqa: F811
    base = tmp_path_factory.mktemp("mount")
    store_dir = base / "store"
    import_tarball(store_dir, pyrt_tarball)
    with mounted(store_dir, base / "mnt", engine=engine) as mp:
        yield store_dir, mp, pyrt_tarball, base


def _fix_spec(text: str, tarball: Path) -> str:
    """Two quirks of bsdtar's mtree output for an *archive*: it names the root "/." (mtree
    wants "."), and a hardlink member (no body in the tar) gets size=0 and no digest: give it
    its link target's size and digest, which is what the file really holds."""
    text = text.replace("\n/. ", "\n. ")
    lines = text.splitlines()
    by_name = {ln.split(" ", 1)[0]: i for i, ln in enumerate(lines) if ln.startswith("./")}
    with tarfile.open(tarball) as tf:
        links = [(m.name, m.linkname) for m in tf if m.islnk()]
    for name, target in links:
        src = lines[by_name["./" + os.path.normpath(target)]].split()
        keep = {k.split("=")[0]: k for k in src if "=" in k}
        fields = [f for f in lines[by_name[name]].split()
                  if not f.startswith(("size=", "sha256digest="))]
        lines[by_name[name]] = " ".join(fields + [keep["size"], keep["sha256digest"]])
    return "\n".join(lines) + "\n"


def test_the_mounted_version_is_exactly_the_tarball(served) -> None:  # type: ignore
    store_dir, mp, tarball, base = served
    # pyrt's members are all root's, so the spec's uid/gid are at once what the tarball
    # recorded and what the mount presents for every tarball (root:root; other recorded
    # owners: tests/test_archive_shapes.py)
    with tarfile.open(tarball) as tf:
        assert {(m.uid, m.gid) for m in tf} == {(0, 0)}
    spec = base / "spec.mtree"
    subprocess.run(["bsdtar", "--format=mtree", f"--options={KEYWORDS}", "-cf", str(spec),
                    f"@{tarball}"], check=True)
    text = _fix_spec(spec.read_text(), tarball)
    spec.write_text(text)
    r = subprocess.run(["mtree", "-p", str(mp / "pyrt/1.0.0"), "-f", str(spec)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == "", r.stdout + r.stderr
    # the tool does check: a spec with one wrong digest fails
    bad = base / "bad.mtree"
    lines = text.splitlines()
    i = next(i for i, ln in enumerate(lines) if "runtime.yml" in ln)
    lines[i] = lines[i].replace("mode=644", "mode=600")
    bad.write_text("\n".join(lines) + "\n")
    r = subprocess.run(["mtree", "-p", str(mp / "pyrt/1.0.0"), "-f", str(bad)],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "runtime.yml" in r.stdout
    # byte for byte against tar's own extraction
    ref = base / "extracted"
    ref.mkdir(exist_ok=True)
    subprocess.run(["tar", "-C", str(ref), "-xzf", str(tarball)], check=True)
    r = subprocess.run(["diff", "-r", "--no-dereference", str(ref), str(mp / "pyrt/1.0.0")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[:2000]


def test_hardlinks_latest_and_statfs(served) -> None:  # type: ignore
    _, mp, _, _ = served
    a = os.stat(mp / "pyrt/1.0.0/isolated/data/big.bin")
    b = os.stat(mp / "pyrt/1.0.0/isolated/data/big-link.bin")
    assert a.st_ino == b.st_ino and a.st_nlink == b.st_nlink == 2
    assert os.readlink(mp / "pyrt/latest") == "1.0.0"
    assert sorted(os.listdir(mp / "pyrt")) == ["1.0.0", "latest"]
    assert os.listdir(mp) == ["pyrt"]
    assert not os.path.exists(mp / "pyrt/9.9.9")
    sv = os.statvfs(mp)
    assert sv.f_blocks > 0 and sv.f_bavail == 0 and sv.f_namemax == 255
    assert os.path.getsize(mp / "pyrt/1.0.0/isolated/data/empty") == 0
    assert (mp / "pyrt/1.0.0/isolated/data/empty").read_bytes() == b""


def test_many_threads_reading_random_ranges_get_the_right_bytes(served) -> None:  # type: ignore
    store_dir, mp, _, base = served
    ref = base / "extracted-big"
    ref.mkdir(exist_ok=True)
    subprocess.run(["tar", "-C", str(ref), "-xzf", str(served[2]), "./isolated/data/big-link.bin"],
                   check=True)
    big_native = ref / "isolated/data/big-link.bin"  # the member holding the body
    want = big_native.read_bytes()
    assert len(want) > 3 << 20
    errors: list[str] = []

    def reader(seed: int) -> None:
        rnd = random.Random(seed)
        with open(mp / "pyrt/1.0.0/isolated/data/big.bin", "rb", buffering=0) as f:
            for _ in range(150):
                off = rnd.randrange(0, len(want) + 10)
                n = rnd.choice([1, 4096, 65536, 131072, (1 << 20) + 3, rnd.randrange(1, 300000)])
                got = os.pread(f.fileno(), n, off)
                if hashlib.sha256(got).digest() != hashlib.sha256(want[off:off + n]).digest():
                    errors.append(f"seed {seed}: bad bytes at {off}+{n}")
                    return

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_every_modifying_operation_fails_with_erofs(served) -> None:  # type: ignore
    _, mp, _, _ = served
    v = mp / "pyrt/1.0.0"
    f = v / "runtime.yml"
    attempts = {
        "open for write": lambda: os.open(f, os.O_RDWR),
        "create": lambda: os.open(v / "new", os.O_WRONLY | os.O_CREAT, 0o644),
        "truncate": lambda: os.truncate(f, 0),
        "mkdir": lambda: os.mkdir(v / "d"),
        "mknod": lambda: os.mknod(v / "fifo", 0o600 | 0o010000),
        "unlink": lambda: os.unlink(f),
        "rmdir": lambda: os.rmdir(v / "isolated/tmp"),
        "rename": lambda: os.rename(f, v / "x.yml"),
        "symlink": lambda: os.symlink("x", v / "ln"),
        "link": lambda: os.link(f, v / "hl"),
        "chmod": lambda: os.chmod(f, 0o777),
        "chown": lambda: os.chown(f, 1, 1),
        "utime": lambda: os.utime(f, (0, 0)),
        "setxattr": lambda: os.setxattr(f, "user.x", b"1"),
        "removexattr": lambda: os.removexattr(f, "user.x"),
        "top-level mkdir": lambda: os.mkdir(mp / "newrt"),
        "remove a version": lambda: os.rmdir(mp / "pyrt/1.0.0"),
    }
    for what, fn in attempts.items():
        with pytest.raises(OSError) as ei:
            fn()
        assert ei.value.errno == errno.EROFS, f"{what}: {ei.value}"


def test_a_chroot_into_the_mount_runs_the_runtimes_python(served) -> None:  # type: ignore
    _, mp, _, _ = served
    r = subprocess.run(["chroot", str(mp / "pyrt/latest/isolated"), "/usr/bin/python3", "-c",
                        "import json, email, http.client, asyncio, sqlite3, jblprobe;"
                        "print(jblprobe.VERSION)"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "1.0.0", r.stderr


def test_status_lists_the_mount(served, engine: str) -> None:  # type: ignore  # noqa: F811
    store_dir, mp, _, _ = served
    r = run_jbl("mount", "--status", "--json", store=store_dir).ok()
    rows = json.loads(r.out)
    assert [(x["mountpoint"], x["alive"], x["state"], x["engine"]) for x in rows] == [
        (str(mp), True, "mounted", engine)]
    assert rows[0]["pid"] > 0


def test_mount_refusals_are_one_line_errors(served, tmp_path: Path) -> None:  # type: ignore
    store_dir, mp, _, _ = served
    r = run_jbl("mount", tmp_path / "missing", store=store_dir)
    assert_one_line_error(r, 11, "does not exist")
    r = run_jbl("mount", mp, store=store_dir)
    assert_one_line_error(r, 11, "already a jbl mount")
    r = run_jbl("umount", tmp_path, store=store_dir)
    assert_one_line_error(r, 11, "not mounted")
    r = run_jbl("mount", store=store_dir)
    assert_one_line_error(r, 2, "MOUNTPOINT")
    assert mounttab.mount_fstype(str(mp)) == mounttab.FSTYPE
