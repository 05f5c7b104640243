"""The job flags Joblet users type, and named volumes (issue 11), with real jobs.

Memory in bare MiB really limits (the hog is killed, 138), ``--max-cpu`` writes the quota
and throttles a busy loop, ``--max-iobps`` writes the real disk's numbers into blkio and
slows a ``dd`` with direct I/O on a block-backed volume, ``-e``/``-s`` reach the job while a
secret appears in no output, uploads are bounded and never follow a link, and named volumes
belong to the user who made them (tested as two real users).
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import re
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import cgroup_probe
import conftest_run
import pytest
from conftest_run import JBL, jbl
from fixtures_users import Users, as_user
from jbl.runner import plan as P
from jbl.runner.sandbox import Budget, StepFailed, copy_in
from test_run_limits import release, start_held

rt = conftest_run.rt
runtimes = conftest_run.runtimes
shared_dir = conftest_run.shared_dir
test_user = conftest_run.test_user

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="real cgroups, users and mounts")
ERR = re.compile(r"jbl: error: invalid (--[a-z-]+)( target)? '([^']*)': (.{8,})\n")
SECRET = "s3cr3t-Zq8v-never-shown"


def _record(stdout: str) -> dict[str, object]:
    return json.loads(stdout[stdout.index("{\n"):])


# ---- bad values: one line naming the option, exit 2 ----------------------------------------

def _bad_values(tmp: Path) -> list[tuple[list[str], str]]:
    (tmp / "file").write_text("x")
    (tmp / "link").symlink_to(tmp / "file")
    os.mkfifo(tmp / "fifo")
    return [
        (["--memory", "1"], "--memory"), (["--max-memory", "2"], "--max-memory"),
        (["--max-memory", "lots"], "--max-memory"), (["--memory", "99999999999999"], "--memory"),
        (["--memory", "64", "--max-memory", "64"], "--max-memory"),
        (["--max-cpu", "0"], "--max-cpu"), (["--max-cpu", "nan"], "--max-cpu"),
        (["--max-cpu", "inf"], "--max-cpu"), (["--max-cpu", "half"], "--max-cpu"),
        (["--cpu", "50", "--max-cpu", "50"], "--max-cpu"), (["--pids", "99999999"], "--pids"),
        (["--max-iobps", "0"], "--max-iobps"), (["--max-iobps", "fast"], "--max-iobps"),
        (["-e", "NOEQUALS"], "--env"), (["-e", "1X=y"], "--env"),
        (["--upload-dir", "/nonexistent-jbl-dir"], "--upload-dir"),
        (["--upload-dir", str(tmp / "file")], "--upload-dir"),
        (["--upload", str(tmp / "link")], "--upload"),
        (["--upload", str(tmp / "fifo")], "--upload"),
        (["--volume", "bad/name"], "--volume"), (["--volume", "no-such-volume-jbl"], "--volume"),
    ]


def test_bad_values_are_one_line_exit_2(rt: str, tmp_path: Path) -> None:
    env = dict(os.environ, JBL_VOLUMES=str(tmp_path / "vols"))
    for opts, opt in _bad_values(tmp_path):
        r = subprocess.run([JBL, "run", "--runtime-dir", rt, *opts, "--", "true"],
                           capture_output=True, text=True, env=env, timeout=60,
                           stdin=subprocess.DEVNULL)
        assert r.returncode == 2, (opts, r.stderr)
        m = ERR.fullmatch(r.stderr)
        assert m is not None and m[1] == opt, (opts, r.stderr)
        assert r.stdout == ""
    # the legitimate spellings next to them run
    r = jbl("run", "--runtime-dir", rt, "--memory=64", "--max-cpu=150", "--max-iobps=10M",
            "-e", "A=1", "--env=B=2", "-q", "--", "sh", "-c", "echo $A$B")
    assert (r.returncode, r.stdout, r.stderr) == (0, "12\n", ""), r.stderr


# ---- memory and CPU ----------------------------------------------------------------------

@pytest.mark.parametrize("opt", ["--memory=64", "--max-memory=64"])
def test_bare_memory_is_mib_and_limits(rt: str, opt: str) -> None:
    p, dirs = start_held(rt, opt, then="b = bytearray(256 << 20); print('survived')")
    limit = "memory.max" if cgroup_probe.is_v2() else "memory.limit_in_bytes"
    memory = [d for d in dirs if cgroup_probe.is_v2() or d.parts[4] == "memory"]
    assert [int((d / limit).read_text()) for d in memory] == [64 << 20]
    out, err = release(p)
    assert p.returncode == 138 and "survived" not in out, err
    assert err.splitlines()[-1].endswith("out of memory (limit 64.0M)")
    r = jbl("run", "--runtime-dir", rt, opt, "--", "python3", "-c",
            "b = bytearray(16 << 20); print('ok')")
    assert (r.returncode, r.stdout) == (0, "ok\n"), r.stderr


def test_max_cpu_writes_the_quota_and_throttles(rt: str) -> None:
    p, dirs = start_held(rt, "--max-cpu=150", then="pass")
    if cgroup_probe.is_v2():
        assert [(d / "cpu.max").read_text().split() for d in dirs] == [["150000", "100000"]]
    else:
        cpu = [d for d in dirs if d.parts[4] == "cpu"]
        assert [int((d / "cpu.cfs_quota_us").read_text()) for d in cpu] == [150000]
        assert [int((d / "cpu.cfs_period_us").read_text()) for d in cpu] == [100000]
    release(p)
    code = ("import time\nend = time.monotonic() + 1.0\nwhile time.monotonic() < end: pass\n"
            "print(round(time.process_time(), 2))")
    r = jbl("run", "--runtime-dir", rt, "--max-cpu=40", "--", "python3", "-c", code)
    assert r.returncode == 0, r.stderr
    assert 0.02 < float(r.stdout) < 0.7  # unlimited: ~1.0; 40% of one core: ~0.4


# ---- block I/O throttle --------------------------------------------------------------------

def _disk_of(path: Path) -> str:
    """The whole disk under ``path``, found with util-linux, not with jbl's code."""
    src = subprocess.run(["findmnt", "-n", "-o", "SOURCE", "-T", str(path)], text=True,
                         capture_output=True, check=True).stdout.strip()
    parent = subprocess.run(["lsblk", "-n", "-d", "-o", "PKNAME", src], text=True,
                            capture_output=True).stdout.strip()
    dev = f"/dev/{parent}" if parent else src
    rdev = os.stat(dev).st_rdev
    return f"{os.major(rdev)}:{os.minor(rdev)}"


@pytest.fixture
def block_dir() -> Iterator[Path]:
    """A directory on a block-device-backed filesystem: /var/tmp if it is on one, else an
    ext4 on a loop device made for the test."""
    src = subprocess.run(["findmnt", "-n", "-o", "SOURCE", "-T", "/var/tmp"], text=True,
                         capture_output=True).stdout.strip()
    if src.startswith("/dev/") and stat.S_ISBLK(os.stat(src).st_mode):
        d = Path(tempfile.mkdtemp(prefix="jbl-iobps-", dir="/var/tmp"))
        yield d
        subprocess.run(["rm", "-rf", str(d)])
        return
    img = Path(tempfile.mkdtemp(prefix="jbl-iobps-img-"))
    subprocess.run(["truncate", "-s", "64M", str(img / "fs.img")], check=True)
    loop = subprocess.run(["losetup", "-f", "--show", str(img / "fs.img")], text=True,
                          capture_output=True, check=True).stdout.strip()
    try:
        subprocess.run(["mkfs.ext4", "-q", loop], check=True)
        (img / "mnt").mkdir()
        subprocess.run(["mount", loop, str(img / "mnt")], check=True)
        try:
            yield img / "mnt"
        finally:
            subprocess.run(["umount", str(img / "mnt")])
    finally:
        subprocess.run(["losetup", "-d", loop])
        subprocess.run(["rm", "-rf", str(img)])


DD = ("for i in 1 2; do dd if=/dev/zero of=/v/f bs=64K count=64 oflag=direct 2>&1; "
      "dd if=/v/f of=/dev/null bs=64K iflag=direct 2>&1; done | grep copied")


def _dd_seconds(out: str) -> list[float]:
    return [float(m) for m in re.findall(r"copied, ([0-9.]+) s", out)]


def test_max_iobps_throttles_the_volumes_disk(rt: str, block_dir: Path) -> None:
    disk = _disk_of(block_dir)
    p, dirs = start_held(rt, "--volume", f"{block_dir}:/v", "--max-iobps=2M", then="pass")
    rate = str(2 << 20)
    if cgroup_probe.is_v2():
        lines = [ln.split() for d in dirs for ln in (d / "io.max").read_text().splitlines()]
        assert [ln[:3] for ln in lines] == [[disk, f"rbps={rate}", f"wbps={rate}"]]
    else:
        blkio = [d for d in dirs if d.parts[4] == "blkio"]
        assert len(blkio) == 1
        for f in ("read", "write"):
            text = (blkio[0] / f"blkio.throttle.{f}_bps_device").read_text().split()
            assert text == [disk, rate], (f, text)
    out, err = release(p)
    assert p.returncode == 0, err
    assert "/tmp, /work have no block device" in err  # said once, for what it skipped
    # Throttled: 4 MiB at 2 MiB/s is ~2 s each way; unthrottled the same dd is far faster.
    r = jbl("run", "--runtime-dir", rt, "--volume", f"{block_dir}:/v", "--max-iobps=2M",
            "-q", "--", "sh", "-c", DD, timeout=90)
    limited = _dd_seconds(r.stdout)
    assert r.returncode == 0 and len(limited) == 4, r.stdout + r.stderr
    r = jbl("run", "--runtime-dir", rt, "--volume", f"{block_dir}:/v", "--", "sh", "-c", DD)
    free = _dd_seconds(r.stdout)
    assert len(free) == 4, r.stdout + r.stderr
    # the second round of each: the first write may allocate; every limited one >= 1.5 s
    assert min(limited) >= 1.5, limited
    assert max(free[2:]) < 1.0, free


# ---- environment and secrets ---------------------------------------------------------------

HASH = hashlib.sha256(SECRET.encode()).hexdigest()
CHECK = f'test "$(printf %s "$TOKEN" | sha256sum)" = "{HASH}  -" && test "$PLAIN" = yes && ' \
        f'test "$(printf %s "$FROMENV" | sha256sum)" = "{HASH}  -" && echo both-set'


def test_env_and_secret_env_reach_the_job_and_nothing_shows_the_secret(rt: str) -> None:
    env = dict(os.environ, FROMENV=SECRET)
    outputs = []
    for extra in ([], ["--debug"]):
        r = subprocess.run([JBL, "run", "--json", *extra, "--runtime-dir", rt, "-e",
                            "PLAIN=yes", "-s", f"TOKEN={SECRET}", "--secret-env", "FROMENV",
                            "--", "sh", "-c", CHECK],
                           capture_output=True, text=True, env=env, timeout=60,
                           stdin=subprocess.DEVNULL)
        assert r.returncode == 0 and r.stdout.startswith("both-set\n"), r.stderr
        assert _record(r.stdout)["exit_status"] == 0
        outputs += [r.stdout, r.stderr]
    # failures with a secret given: a bad one, a clash with --env, another bad option, a job
    # that cannot start
    for opts in (["-s", f"1BAD={SECRET}"], ["-e", "K=1", "-s", f"K={SECRET}"],
                 ["-s", f"K={SECRET}", "--memory", "1"]):
        r = jbl("run", "--runtime-dir", rt, *opts, "--", "true")
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        outputs += [r.stdout, r.stderr]
    r = jbl("run", "--json", "--runtime-dir", rt, "-s", f"K={SECRET}", "--", "no-such-cmd-jbl")
    assert r.returncode in (12, 127) and "no-such-cmd-jbl" in r.stderr, r.stderr
    outputs += [r.stdout, r.stderr]
    assert not [o for o in outputs if SECRET in o]
    # the request's and the plan's reprs (what a debug log would print) name no value
    req = P.JobRequest(Path("/rt"), ("true",), secret_env=(("TOKEN", SECRET),))
    assert SECRET not in repr(req)
    assert SECRET not in repr(P.Env((("TOKEN", SECRET),)))


def test_secret_from_the_environment_is_not_on_any_command_line(rt: str) -> None:
    """``-s NAME`` takes the value from jbl's environment: no process of the job, nor jbl,
    shows it in its command line (``-s NAME=VALUE`` would: ps shows argv to everyone)."""
    env = dict(os.environ, TOKEN=SECRET)
    code = ("import hashlib, os, sys; "
            f"print(hashlib.sha256(os.environ['TOKEN'].encode()).hexdigest() == '{HASH}', "
            "flush=True); sys.stdin.readline()")
    p = subprocess.Popen([JBL, "run", "--runtime-dir", rt, "-s", "TOKEN", "--", "python3",
                          "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert p.stdout is not None and p.stdout.readline() == "True\n"
        pids = [p.pid, *cgroup_probe.descendants(p.pid)]
        assert len(pids) >= 3  # jbl, the helper, init, the job
        cmdlines = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in pids]
        assert not [c for c in cmdlines if SECRET.encode() in c]
    finally:
        out, err = p.communicate("go\n", timeout=60)
    assert p.returncode == 0, err


# ---- uploads ------------------------------------------------------------------------------

def test_upload_dir_copies_contents_without_following_links(rt: str, shared_dir: Path) -> None:
    src = shared_dir / "proj"
    (src / "sub").mkdir(parents=True)
    (src / "data.csv").write_text("a,b\n")
    (src / "sub" / "run.sh").write_text("echo deep\n")
    (src / "sub" / "run.sh").chmod(0o4755)  # setuid is dropped, the x bits are kept
    (src / "escape").symlink_to("/etc/hostname")  # copied as a link: names the job's file
    (src / "rel").symlink_to("sub/run.sh")
    (shared_dir / "one.txt").write_text("single\n")
    r = jbl("run", "--runtime-dir", rt, "--upload-dir", str(src), "--upload",
            str(shared_dir / "one.txt"), "--", "sh", "-c",
            "cd /work && cat data.csv one.txt && sh rel && readlink escape && "
            "stat -c '%a %F' sub/run.sh escape")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["a,b", "single", "deep", "/etc/hostname",
                                     "755 regular file", "777 symbolic link"]


def test_upload_bounds_and_special_files(rt: str, shared_dir: Path) -> None:
    deep = shared_dir / "deep"
    d = deep
    for _ in range(P.UPLOAD_MAX_DEPTH + 1):
        d = d / "d"
    d.mkdir(parents=True)
    big = shared_dir / "big"
    big.mkdir()
    with open(big / "sparse", "wb") as fh:
        fh.truncate(P.UPLOAD_MAX_BYTES + 1)  # no disk used; its size counts
    pipe = shared_dir / "pipe"
    pipe.mkdir()
    os.mkfifo(pipe / "fifo")
    for path, why in ((deep, "levels deep"), (big, "bytes (the upload limit)"),
                      (pipe, "is a named pipe")):
        r = jbl("run", "--runtime-dir", rt, "--upload-dir", str(path), "--", "true",
                timeout=30)
        assert r.returncode == 2 and ERR.fullmatch(r.stderr), r.stderr
        assert why in r.stderr, r.stderr
    (pipe / "fifo").unlink()
    (pipe / "ok").write_text("ok\n")
    r = jbl("run", "--runtime-dir", rt, "--upload-dir", str(pipe), "--", "cat", "ok")
    assert (r.returncode, r.stdout) == (0, "ok\n"), r.stderr


def test_copier_enforces_its_bounds_and_refuses_a_linked_path(tmp_path: Path) -> None:
    """The sandbox's copier itself (what runs in the job's init), not only the CLI's check:
    a tree that grew past the bounds after the check, or a path whose directory became a
    link, is refused while copying."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        (src / f"f{i}").write_text("x" * 10)
    dst = tmp_path / "dst"
    dst.mkdir()
    with pytest.raises(StepFailed, match="more than 3 entries"):
        copy_in("", str(src), str(dst), True, Budget("upload", 1 << 20, 3, 8))
    dst2 = tmp_path / "dst2"
    dst2.mkdir()
    with pytest.raises(StepFailed, match="more than 25 bytes"):
        copy_in("", str(src), str(dst2), True, Budget("upload", 25, 100, 8))
    (tmp_path / "alias").symlink_to(src)
    dst3 = tmp_path / "dst3"
    dst3.mkdir()
    with pytest.raises(StepFailed, match="alias: a path component is a symlink"):
        copy_in("", str(tmp_path / "alias" / "f0"), str(dst3 / "f0"), False,
                Budget("upload", 1 << 20, 100, 8))
    copy_in("", str(src / "f0"), str(dst3 / "f0"), False, Budget("upload", 1 << 20, 100, 8))
    assert (dst3 / "f0").read_text() == "x" * 10


def test_root_upload_for_another_user_reads_as_that_user(rt: str, test_user: str,
                                                          shared_dir: Path) -> None:
    """root's --user job gets only what that user could read: the copy runs with the job
    user's filesystem identity, not root's."""
    src = shared_dir / "up"
    src.mkdir()
    (src / "public").write_text("pub\n")
    r = jbl("run", "--runtime-dir", rt, "--user", test_user, "--upload-dir", str(src),
            "--", "sh", "-c", "cat public; stat -c %u public")
    uid = pwd.getpwnam(test_user).pw_uid
    assert (r.returncode, r.stdout) == (0, f"pub\n{uid}\n"), r.stderr
    (src / "rootonly").write_text("root's\n")
    (src / "rootonly").chmod(0o600)
    r = jbl("run", "--runtime-dir", rt, "--user", test_user, "--upload-dir", str(src),
            "--", "true")
    assert r.returncode == 12 and "Permission denied" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1


# ---- named volumes -------------------------------------------------------------------------

def test_volume_lifecycle_as_root(rt: str, tmp_path: Path) -> None:
    vols = tmp_path / "vols"
    env = dict(os.environ, JBL_VOLUMES=str(vols))

    def v(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([JBL, *args], capture_output=True, text=True, env=env,
                              timeout=60, stdin=subprocess.DEVNULL)

    assert v("volume", "create", "data").returncode == 0
    assert stat.S_IMODE((vols / "data").stat().st_mode) == 0o700
    r = v("volume", "create", "data")
    assert r.returncode == 4 and r.stderr.count("\n") == 1
    for bad in ("../x", ".hidden", "a/b", "x" * 65):
        r = v("volume", "create", bad)
        assert r.returncode == 2 and "invalid volume name" in r.stderr, r.stderr
    r = v("volume", "create", "sized", "--size=1G")
    assert r.returncode == 2 and r.stderr.startswith("jbl: error: invalid --size '1G'")
    r = v("run", "--runtime-dir", rt, "--volume=data", "--volume", f"{tmp_path}:/host:ro",
          "--", "sh", "-c", "echo kept > /volumes/data/f && ls /host >/dev/null && "
          "! touch /host/x 2>/dev/null")
    assert r.returncode == 0, r.stderr
    assert (vols / "data" / "f").read_text() == "kept\n"
    listed = json.loads(v("volume", "list", "--json").stdout)
    assert [(x["name"], x["path"]) for x in listed] == [("data", str(vols / "data"))]
    # in use by a running job: not removed
    p = subprocess.Popen([JBL, "run", "--runtime-dir", rt, "--volume=data", "--", "sh", "-c",
                          "cat /volumes/data/f; read x"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert p.stdout is not None and p.stdout.readline() == "kept\n"
    r = v("volume", "remove", "data")
    p.communicate("\n", timeout=60)
    assert r.returncode == 9 and "in use" in r.stderr and (vols / "data" / "f").exists()
    assert v("volume", "remove", "data").returncode == 0
    assert not (vols / "data").exists()
    r = v("run", "--runtime-dir", rt, "--volume=data", "--", "true")
    assert r.returncode == 2 and ERR.fullmatch(r.stderr), r.stderr
    assert v("volume", "remove", "data").returncode == 3


def test_root_refuses_a_volumes_dir_another_user_controls(test_user: str,
                                                          shared_dir: Path) -> None:
    theirs = shared_dir / "vols"
    theirs.mkdir()
    (theirs / "data").mkdir()
    pw = pwd.getpwnam(test_user)
    for d in (theirs, theirs / "data"):
        os.chown(d, pw.pw_uid, pw.pw_gid)
    env = dict(os.environ, JBL_VOLUMES=str(theirs))
    for args in (["volume", "remove", "data"], ["volume", "create", "x"]):
        r = subprocess.run([JBL, *args], capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 10 and "not a directory of yours alone" in r.stderr, r.stderr
    assert (theirs / "data").is_dir() and not (theirs / "x").exists()
    os.chown(theirs, 0, 0)  # root's own, but a planted link inside is not followed
    (theirs / "data").rmdir()
    (theirs / "data").symlink_to("/etc")
    r = subprocess.run([JBL, "volume", "remove", "data"], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 10 and Path("/etc/passwd").exists(), r.stderr


def test_volumes_belong_to_their_user(rt: str, users: Users) -> None:
    a, b = users.alice, users.bob
    r = as_user(a, "volume", "create", "data")
    assert r.rc == 0, r.err
    path = users.home(a) / ".local/share/jbl-volumes/data"
    st = path.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (users.uid(a), 0o700)
    r = as_user(a, "run", "--runtime-dir", rt, "--volume=data", "--", "sh", "-c",
                "echo mine > /volumes/data/f")
    assert r.rc == 0, r.err
    assert (path / "f").stat().st_uid == users.uid(a)
    r = as_user(a, "run", "--runtime-dir", rt, "--volume=data", "--", "cat", "/volumes/data/f")
    assert (r.rc, r.out) == (0, "mine\n"), r.err
    # bob: sees none of it, cannot use or remove it, by name or by alice's directory
    assert json.loads(as_user(b, "volume", "list", "--json").out) == []
    r = as_user(b, "run", "--runtime-dir", rt, "--volume=data", "--", "true")
    assert r.rc == 2 and "no volume of that name" in r.err, r.err
    assert as_user(b, "volume", "remove", "data").rc == 3
    theirs = {"JBL_VOLUMES": str(path.parent)}
    r = as_user(b, "volume", "remove", "data", env=theirs)
    assert r.rc == 10 and r.err.count("\n") == 1, r.err
    r = as_user(b, "run", "--runtime-dir", rt, "--volume=data", "--", "true", env=theirs)
    assert r.rc != 0 and r.err.count("\n") == 1, r.err
    assert (path / "f").read_text() == "mine\n"
    # bob's own volume of the same name is his, apart
    assert as_user(b, "volume", "create", "data").rc == 0
    r = as_user(b, "run", "--runtime-dir", rt, "--volume=data", "--", "ls", "/volumes/data")
    assert (r.rc, r.out) == (0, ""), r.err
    assert as_user(a, "volume", "remove", "data").rc == 0 and not path.exists()
    assert json.loads(as_user(b, "volume", "list", "--json").out)[0]["name"] == "data"
    assert as_user(b, "volume", "remove", "data").rc == 0
