"""Archive shapes jbl used to get wrong, and tarball owners that are not host identities.

The story: an admin imports real tarballs (GNU tar's sparse formats, a directory listed twice,
mtimes from broken clocks) with ``jbl store import``, mounts the store for everyone
(``jbl mount --allow-other``, both engines), and real users browse it. What must hold:

* sparse members (old GNU ``S``, pax 0.0, 0.1 and 1.0 maps) install as plain files whose
  bytes equal GNU tar's own extraction of the same archive, holes as zeros;
* the same directory twice with identical metadata is one entry;
* extreme mtimes (far past, far future, 5000-digit pax values, base-256, negative) install,
  clamped to 0 .. 2^33-1 s with a warning naming the member; normal and fractional mtimes are
  kept to the nanosecond; the mount serves them all (no EIO);
* a file the tarball gave to uid U with mode 0600 is root's in the mount: the host user with
  uid U cannot read it (nor list a 0700 directory of theirs), world-readable files next to it
  stay readable, and ``jbl store info`` still reports the recorded owners.

The refusals (uid >= 2^32, huge pax ids, whiteouts, lying sparse maps, directories listed
twice with different metadata) are cases of the hostile corpus (tests/hostile.py).
"""

from __future__ import annotations

import datetime as dt
import errno
import io
import json
import os
import pwd
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import apsw
import hostile
import pytest
from conftest import run_jbl
from fixtures_mount import engine, mounted, sweep_mounts  # noqa: F401 - fixtures
from fixtures_users import Users, sh_as, shared_dir

MIB = 1 << 20
MANIFEST = b"name: shapes\nversion: 1.0.0\ndescription: archive shapes\n"
# GNU tar's sparse formats: (version label, tar options)
SPARSE_FORMATS = {
    "1.0.0": ["--format=gnu"],                             # old GNU 'S' members
    "1.0.1": ["--format=posix"],                           # GNU tar's default pax map: 1.0
    "1.0.2": ["--format=posix", "--sparse-version=0.0"],
    "1.0.3": ["--format=posix", "--sparse-version=0.1"],
}
MAX_S = 2**33 - 1
MAX_NS = MAX_S * 10**9
# member -> (how its mtime is spelled, the mtime_ns jbl must keep, clamped?)
MTIMES: dict[str, tuple[dict[str, object], int, bool]] = {
    "normal": ({"pax": b"1700000000"}, 1_700_000_000 * 10**9, False),
    "fraction": ({"pax": b"1700000000.123456789"}, 1_700_000_000_123_456_789, False),
    "fraction-long": ({"pax": b"1700000000.1234567891234"}, 1_700_000_000_123_456_789, False),
    "epoch": ({"ustar": 0}, 0, False),
    "ustar-max": ({"ustar": MAX_S}, MAX_NS, False),
    "far-future": ({"pax": b"99999999999999999999999"}, MAX_NS, True),
    "5000-digits": ({"pax": b"9" * 5000}, MAX_NS, True),
    "just-past-max": ({"pax": str(MAX_S + 1).encode()}, MAX_NS, True),
    "base256-huge": ({"b256": 2**80}, MAX_NS, True),
    "negative": ({"pax": b"-1000000000.5"}, 0, True),
    "base256-negative": ({"b256": -86400}, 0, True),
}


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _sparse_file(path: Path, size: int, regions: list[tuple[int, bytes]]) -> None:
    """A file of ``size`` bytes that is holes except for ``regions`` (truncate + pwrite)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in regions:
            os.pwrite(f.fileno(), data, off)


def _sparse_runtime(d: Path) -> Path:
    _write(d / "runtime.yml", MANIFEST)
    s = d / "isolated/sparse"
    # data at the start, in the middle of the second 1 MiB chunk, straddling a chunk
    # boundary, and a hole at the end
    _sparse_file(s / "holes.img", 5 * MIB + 123, [(0, b"hello"), (1_600_000, b"mid"),
                                                  (3 * MIB - 5000, os.urandom(12_288))])
    # more regions than the old GNU header holds (extension blocks), ending in data
    _sparse_file(s / "many.img", 40 * 8192 + 10, [(i * 40_960, bytes([65 + i]) * 4096)
                                                  for i in range(8)] + [(40 * 8192, b"0123456789")])
    _sparse_file(s / "nothing.img", 2 * MIB + 1, [])  # all hole
    _write(s / "plain.txt", b"not sparse\n")
    return d


def _sparse_members(tarball: Path) -> set[str]:
    """Names of the members GNU tar stored sparse (so the test cannot pass on plain files)."""
    with tarfile.open(tarball) as tf:
        return {m.name.rsplit("/", 1)[-1] for m in tf if m.sparse is not None}


def _entries(store: Path, version: str) -> list[tuple[str, int, int, int, int, int]]:
    """(name, kind, mode, uid, gid, mtime_ns) of a version's entries, by id."""
    con = apsw.Connection(str(store / "index.db"), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return [(bytes(n).decode(), k, m, u, g, t) for n, k, m, u, g, t in con.execute(
            "SELECT e.name, e.kind, e.mode, e.uid, e.gid, e.mtime_ns FROM entries e "
            "JOIN versions v ON v.id = e.version_id WHERE v.version = ? ORDER BY e.id",
            (version,))]
    finally:
        con.close()


def _mtime_member(name: str, spelling: dict[str, object]) -> bytes:
    path = f"isolated/t/{name}".encode()
    if "pax" in spelling:
        return hostile.pax({b"mtime": spelling["pax"]}) + hostile.file(path, name.encode())  # type: ignore[dict-item]
    if "b256" in spelling:
        return hostile.file(path, name.encode(),
                            mtime_field=hostile.b256(spelling["b256"], 12))  # type: ignore[arg-type]
    return hostile.file(path, name.encode(), mtime=spelling["ustar"])


def _owned_tarball(uid: int, gid: int) -> bytes:
    """Files the tarball gives to (uid, gid): one private, one public, a private directory."""
    data = (hostile.file(b"runtime.yml", MANIFEST.replace(b"1.0.0", b"3.0.0"))
            + hostile.directory(b"isolated/")
            + hostile.directory(b"isolated/home/", uid=uid, gid=gid)
            + hostile.file(b"isolated/home/secret", b"the owner's only\n", mode=0o600,
                           uid=uid, gid=gid)
            + hostile.file(b"isolated/home/group", b"group only\n", mode=0o640, uid=0,
                           gid=gid)
            + hostile.file(b"isolated/home/public", b"for everyone\n", mode=0o644,
                           uid=uid, gid=gid)
            + hostile.directory(b"isolated/home/private/", mode=0o700, uid=uid, gid=gid)
            + hostile.file(b"isolated/home/private/f", b"x", mode=0o644, uid=uid, gid=gid)
            + hostile.END)
    return data + bytes(-len(data) % 10240)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory, users: Users) -> Iterator[dict[str, object]]:
    """One store holding every accepted shape: four sparse versions (2.0.x: mtimes, 2.1.0
    and 2.2.0: duplicate directories, 3.0.0: owned files) and what each import printed."""
    base = tmp_path_factory.mktemp("shapes")
    store = base / "store"
    out: dict[str, object] = {"store": store, "base": base, "imports": {}}
    rt = _sparse_runtime(base / "rt")
    for version, opts in SPARSE_FORMATS.items():
        tb = base / f"sparse-{version}.tar"
        subprocess.run(["tar", *opts, "--sparse", "--numeric-owner", "-C", str(rt), "-cf",
                        str(tb), "."], check=True)
        assert _sparse_members(tb) == {"holes.img", "many.img", "nothing.img"}, opts
        ref = base / f"ref-{version}"
        ref.mkdir()
        subprocess.run(["tar", "-C", str(ref), "-xf", str(tb)], check=True)
        run_jbl("store", "import", tb, "--version", version, store=store).ok()
    # extreme mtimes
    tb = base / "mtimes.tar"
    tb.write_bytes(hostile.tar(hostile.directory(b"isolated/t/"),
                               *(_mtime_member(n, sp) for n, (sp, _, _) in MTIMES.items())))
    out["imports"]["mtimes"] = run_jbl("store", "import", tb, "--version", "2.0.0",  # type: ignore[index]
                                       store=store).ok()
    # the same directory twice, identically: by hand and as GNU tar writes it
    tb = base / "dupdir.tar"
    tb.write_bytes(hostile.tar(hostile.directory(b"isolated/bin/"), hostile.directory(b"./"),
                               hostile.directory(b"./")))
    run_jbl("store", "import", tb, "--version", "2.1.0", store=store).ok()
    tb = base / "dupdir-gnu.tar"
    subprocess.run(["tar", "--no-recursion", "-C", str(rt), "-cf", str(tb), ".",
                    "./runtime.yml", "./isolated", "./isolated/sparse", "./isolated",
                    "./isolated/sparse/plain.txt", "./isolated/sparse", "."], check=True)
    with tarfile.open(tb) as tf:
        names = [m.name for m in tf]
    assert names.count("./isolated") == 2 and names.count(".") == 2, names
    run_jbl("store", "import", tb, "--version", "2.2.0", store=store).ok()
    # files owned by a real host user's uid
    pw = pwd.getpwnam(users.alice)
    (base / "owned.tar").write_bytes(_owned_tarball(pw.pw_uid, pw.pw_gid))
    run_jbl("store", "import", base / "owned.tar", store=store).ok()
    yield out


@pytest.fixture(scope="module")
def served(shapes: dict[str, object], engine: str) -> Iterator[Path]:  # noqa: F811
    """The store mounted for every user, as the shared server's jbl-mount.service does."""
    mp = shared_dir("jbl-shapes-mnt-") / "mnt"
    with mounted(shapes["store"], mp, "--allow-other", engine=engine) as m:  # type: ignore[arg-type]
        yield m
    shutil.rmtree(mp.parent, ignore_errors=True)


# --- sparse members ------------------------------------------------------------------------
@pytest.mark.parametrize("version", sorted(SPARSE_FORMATS))
def test_sparse_members_equal_gnu_tars_extraction(shapes: dict[str, object], served: Path,
                                                  version: str) -> None:
    ref = shapes["base"] / f"ref-{version}/isolated/sparse"  # type: ignore[operator]
    got = served / "shapes" / version / "isolated/sparse"
    assert sorted(os.listdir(got)) == sorted(os.listdir(ref)) == [
        "holes.img", "many.img", "nothing.img", "plain.txt"]
    for name in os.listdir(ref):
        want = (ref / name).read_bytes()
        assert os.path.getsize(got / name) == len(want), name
        assert (got / name).read_bytes() == want, name
    # and what tar extracted is the file it archived (holes read as zeros)
    assert (ref / "holes.img").read_bytes()[1_600_000:1_600_003] == b"mid"
    assert (ref / "many.img").read_bytes()[-10:] == b"0123456789"
    assert (got / "nothing.img").read_bytes() == bytes(2 * MIB + 1)


def test_sparse_members_are_plain_files_in_the_index(shapes: dict[str, object]) -> None:
    store = shapes["store"]
    con = apsw.Connection(str(store / "index.db"), flags=apsw.SQLITE_OPEN_READONLY)  # type: ignore[operator]
    try:
        rows = set(con.execute(
            "SELECT v.version, e.name, e.size, c.nchunks FROM entries e "
            "JOIN versions v ON v.id = e.version_id JOIN contents c ON c.id = e.content_id "
            "WHERE e.name = CAST('holes.img' AS BLOB)"))
    finally:
        con.close()
    assert rows == {(v, b"holes.img", 5 * MIB + 123, 6) for v in SPARSE_FORMATS}


# --- duplicate directories -----------------------------------------------------------------
def test_a_directory_listed_twice_identically_is_one_entry(shapes: dict[str, object],
                                                           served: Path) -> None:
    for spec, parent in (("hostile/2.1.0", "isolated"), ("shapes/2.2.0", "")):
        names = [e[0] for e in _entries(shapes["store"], spec[-5:])]  # type: ignore[arg-type]
        assert names.count("bin" if parent else "isolated") == 1, names
        assert names.count("") == 1  # the root './', listed twice
        listing = os.listdir(served / spec / parent)
        assert len(listing) == len(set(listing))
    assert os.listdir(served / "hostile/2.1.0/isolated/bin") == ["hello"]
    assert os.listdir(served / "shapes/2.2.0/isolated/sparse") == ["plain.txt"]


# --- mtimes --------------------------------------------------------------------------------
def test_extreme_mtimes_are_clamped_and_normal_ones_kept_exactly(shapes: dict[str, object],
                                                                 served: Path) -> None:
    r = shapes["imports"]["mtimes"]  # type: ignore[index]
    stored = {e[0]: e[5] for e in _entries(shapes["store"], "2.0.0")}  # type: ignore[arg-type]
    for name, (_, want, clamped) in MTIMES.items():
        assert stored[name] == want, name
        assert ("mtime out of range, clamped to" in r.err and f"'isolated/t/{name}'" in r.err
                ) == clamped, (name, r.err)
        st = os.stat(served / "hostile/2.0.0/isolated/t" / name)  # no EIO
        assert st.st_mtime_ns == want, name
        dt.datetime.fromtimestamp(st.st_mtime, dt.UTC)  # usable by Python
        assert (served / "hostile/2.0.0/isolated/t" / name).read_bytes() == name.encode()
    assert "clamped to 2242-03-16" in r.err and "clamped to 1970-01-01" in r.err
    assert sorted(os.listdir(served / "hostile/2.0.0/isolated/t")) == sorted(MTIMES)
    run_jbl("store", "info", "hostile@2.0.0", store=shapes["store"]).ok()  # type: ignore[arg-type]


# --- owners --------------------------------------------------------------------------------
def test_tarball_owners_are_not_host_identities(shapes: dict[str, object], served: Path,
                                                users: Users) -> None:
    pw = pwd.getpwnam(users.alice)
    home = served / "shapes/3.0.0/isolated/home"
    # the recorded owners are alice's numbers...
    rows = {e[0]: e[3:5] for e in _entries(shapes["store"], "3.0.0")}  # type: ignore[arg-type]
    assert rows["secret"] == rows["private"] == (pw.pw_uid, pw.pw_gid)
    # ...but the mount shows root's, with the tarball's modes
    for name, mode in (("secret", 0o600), ("group", 0o640), ("public", 0o644),
                       ("private", 0o700)):
        st = os.lstat(home / name)
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, 0, mode), name
    # so the host user with that uid gets no owner (or group) rights
    r = sh_as(users.alice, f"cat {home}/secret")
    assert r.returncode != 0 and "Permission denied" in r.stderr, r
    r = sh_as(users.alice, f"cat {home}/group")
    assert r.returncode != 0 and "Permission denied" in r.stderr, r
    r = sh_as(users.alice, f"ls {home}/private")
    assert r.returncode != 0 and "Permission denied" in r.stderr, r
    # while what the tarball made world-readable stays readable
    r = sh_as(users.alice, f"cat {home}/public")
    assert r.returncode == 0 and r.stdout == "for everyone\n", r
    assert (home / "secret").read_bytes() == b"the owner's only\n"  # root still reads it
    with pytest.raises(OSError) as ei:
        os.chown(home / "public", pw.pw_uid, pw.pw_gid)
    assert ei.value.errno == errno.EROFS
    # `jbl store info` still reports what the tarball recorded
    info = json.loads(run_jbl("store", "info", "shapes@3.0.0", "--json",
                              store=shapes["store"]).ok().out)  # type: ignore[arg-type]
    owners = {(o["uid"], o["gid"]): o["entries"] for o in info["owners"]}
    assert owners[(pw.pw_uid, pw.pw_gid)] == 5 and owners[(0, pw.pw_gid)] == 1, owners
    text = run_jbl("store", "info", "shapes@3.0.0", store=shapes["store"]).ok().out  # type: ignore[arg-type]
    assert f"{pw.pw_uid}:{pw.pw_gid} (5)" in text and "the mount shows root:root" in text


def test_the_builders_mean_what_the_tests_say() -> None:
    """The hand-built members mean what the test says (Python's tarfile agrees)."""
    with tarfile.open(fileobj=io.BytesIO(_owned_tarball(1005, 1006))) as tf:
        m = tf.getmember("isolated/home/secret")
        assert (m.uid, m.gid, m.mode) == (1005, 1006, 0o600)
    data = hostile.tar(_mtime_member("fraction", MTIMES["fraction"][0]))
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        assert tf.getmember("isolated/t/fraction").mtime == pytest.approx(1700000000.123456789)
