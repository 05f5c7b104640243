"""GPUs and the tun device for ordinary users (issue 11), with real users and real jobs.

Real Linux users (``fixtures_users``) run the system-wide ``jbl`` against the fake NVIDIA
driver tree of ``test_gpu`` (``JBL_GPU_DRIVER_ROOT``: real device nodes, a real linker
cache; root makes it, so it is root's and nobody else can write it). ``jbl setup --system``
makes the GPU lock files there; users' and root's jobs then share them. The tun device is a
real char device 10:200 that the test makes under setup's ``--root``, so the host's own
``/dev/net/tun`` is never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import conftest_run
import pytest
from conftest import JBL, Result, assert_one_line_error, run_jbl
from fixtures_users import Users, as_user, sh_as, shared_dir, user_jbl
from procs import reap
from test_gpu import BUSES, PROBE, UUIDS, make_driver_tree

runtimes = conftest_run.runtimes
rt = conftest_run.rt

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (test users, mknod)")

NOTE = ("jbl: note: GPU device allow-list not enforced (cgroup v1 is not delegated to users); "
        "the job's /dev holds only its own GPUs' nodes")


@pytest.fixture(scope="module")
def base() -> Iterator[Path]:
    d = shared_dir("jbl-userdev-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def setup(users: Users, where: Path, driver: Path | None, *extra: str) -> Result:
    """``jbl setup --system`` on a store, mountpoint and system root of the test's own."""
    env = {"JBL_GPU_DRIVER_ROOT": str(driver)} if driver else {}
    return run_jbl("setup", "--system", "--group", users.admin_group, "--mountpoint",
                   where / "mnt", "--root", where / "sys", *extra, store=where / "store",
                   env=env, timeout=120)


@pytest.fixture(scope="module")
def driver(users: Users, base: Path) -> Path:
    """A fake driver tree with two GPUs, set up for users by ``jbl setup --system``."""
    root = make_driver_tree(base / "driver")
    setup(users, base / "setup", root).ok()
    return root


def genv(driver: Path) -> dict[str, str]:
    return {"JBL_GPU_DRIVER_ROOT": str(driver)}


def one_line(r: Result, code: int, *words: str) -> None:
    assert_one_line_error(r, code)
    assert r.err.startswith("jbl: error: "), r.err
    for w in words:
        assert w in r.err, r.err


def gpu_rows(driver: Path, user: str | None = None) -> list[dict[str, object]]:
    r = (as_user(user, "gpu", "list", "--json", env=genv(driver)) if user else
         run_jbl("gpu", "list", "--json", env=genv(driver)))
    return json.loads(r.ok().out)  # type: ignore[no-any-return]


def start(driver: Path, rt: str, user: str | None, *opts: str) -> tuple[subprocess.Popen[str],
                                                                        list[str]]:
    """A GPU job (of ``user``, else root's) that reports what it got, then waits for a line."""
    script = ('nodes=$(ls /dev | grep nvidia); '
              'echo "$JBL_JOB_ID|$CUDA_VISIBLE_DEVICES|"$nodes; read x')
    argv = [JBL] if user is None else ["runuser", "-u", user, "--", user_jbl()]
    env = {**os.environ, **genv(driver)}
    if user is not None:
        env.update(HOME=f"/home/{user}", USER=user, LOGNAME=user)
    p = subprocess.Popen([*argv, "run", "--runtime-dir", rt, *opts, "--", "sh", "-c", script],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env, cwd="/")
    assert p.stdout is not None
    line = p.stdout.readline()
    if not line:
        _, err = p.communicate(timeout=30)  # pipes closed
        pytest.fail(f"job did not start (exit {p.returncode}): {err}")
    return p, line.rstrip("\n").split("|")


def finish(p: subprocess.Popen[str]) -> int:
    p.communicate("\n" if p.poll() is None else None, timeout=60)
    return p.returncode


# ---- setup makes the locks; without them a user is told who can --------------------------

def test_setup_makes_gpu_locks_for_users(users: Users, base: Path, rt: str) -> None:
    where = base / "fresh"
    root = make_driver_tree(where / "driver")
    locks = root / "run/jbl/gpus"
    # not set up: the user can list, and --gpu says who can fix it, holding nothing
    rows = gpu_rows(root, users.alice)
    assert [x["status"] for x in rows] == ["free", "free"]
    r = as_user(users.alice, "run", "--runtime-dir", rt, "--gpu=1", "--", "true", env=genv(root))
    one_line(r, 14, "GPUs are not set up for users", "jbl setup --system")
    assert not locks.exists()
    # the dry run shows the steps and makes nothing
    out = setup(users, where, root, "--dry-run").ok().out
    assert [ln.split()[:3] for ln in out.splitlines() if "GPU lock" in ln] == [
        ["would", "create", "GPU"]] * 3
    assert not locks.exists()
    # for real: the directory 0755 and one 0644 file per GPU, all root's
    doc = json.loads(setup(users, where, root, "--json").ok().out)
    gpu_steps = [(s["step"], s["path"], s["result"]) for s in doc["steps"] if "GPU" in s["step"]]
    assert gpu_steps == [("GPU lock directory", str(locks), "created")] + [
        ("GPU lock file", str(locks / f"gpu-{b}.lock"), "created") for b in BUSES]
    st = locks.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o755, 0)
    for b in BUSES:
        st = (locks / f"gpu-{b}.lock").stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid, stat.S_ISREG(st.st_mode)) == (0o644, 0, True)
    # a lock file an older jbl made root-only is put right, then everything is ok
    (locks / f"gpu-{BUSES[1]}.lock").chmod(0o600)
    r = as_user(users.alice, "run", "--runtime-dir", rt, "--gpu=2", "--", "true", env=genv(root))
    one_line(r, 14, "can be opened by root only", "jbl setup --system")
    doc = json.loads(setup(users, where, root, "--json").ok().out)
    assert [s["result"] for s in doc["steps"] if "GPU" in s["step"]] == ["ok", "ok", "changed"]
    doc = json.loads(setup(users, where, root, "--json").ok().out)
    assert {s["result"] for s in doc["steps"]} == {"ok"}
    # and now the user's job runs with both GPUs
    r = as_user(users.alice, "run", "--runtime-dir", rt, "--gpu=2", "--", "sh", "-c",
                "echo $CUDA_VISIBLE_DEVICES", env=genv(root))
    assert (r.rc, r.out.strip(), r.err.strip()) == (0, ",".join(UUIDS), NOTE), r.err


# ---- what a user's job gets -----------------------------------------------------------------

def test_user_job_gets_exactly_its_gpu(users: Users, driver: Path, rt: str) -> None:
    r = as_user(users.alice, "run", "--runtime-dir", rt, "--gpu=1", "--gpu-memory=12G", "--",
                "python3", "-c", PROBE, env=genv(driver))
    assert r.rc == 0, r.err
    assert r.err.strip().splitlines() == [NOTE]  # said once
    out = r.out.splitlines()
    assert out[0] == str(sorted(["nvidia1", "nvidia-modeset", "nvidia-uvm", "nvidia-uvm-tools",
                                 "nvidiactl"]))
    # its own node reaches the (absent) driver from inside the user's namespaces: ENXIO
    # (a nodev mount would say EACCES); the other GPU's node is simply not there
    assert out[1:4] == ["nvidia0 ENOENT", "nvidia1 ENXIO", "nvidia7 ENOENT"]
    assert out[4] == str({"CUDA_VISIBLE_DEVICES": UUIDS[1], "NVIDIA_VISIBLE_DEVICES": UUIDS[1],
                          "CUDA_DEVICE_ORDER": "PCI_BUS_ID"})
    assert out[5] == str(sorted(["libcuda.so.1", "libcuda.so.550.54", "libnvidia-ml.so.1",
                                 "libnvidia-ml.so.550.54"])) + " libcuda.so.550.54"
    assert out[6:] == ["cuInit 42", "write lib EACCES"]  # root's file: the mode says no first
    # ... and the mounts say no too: the driver's files are bound read-only
    r = as_user(users.alice, "run", "--runtime-dir", rt, "--gpu=1", "--", "sh", "-c",
                "grep ' /nvidia-driver/' /proc/self/mountinfo", env=genv(driver))
    mounts = [ln.split()[4:6] for ln in r.out.splitlines()]
    assert len(mounts) == 3 and all(o.split(",")[0] == "ro" for _, o in mounts), r.out
    # the same user without --gpu: no GPU node, no note
    r = as_user(users.alice, "run", "--runtime-dir", rt, "--", "sh", "-c",
                "ls /dev | grep -c nvidia", env=genv(driver))
    assert (r.out, r.err) == ("0\n", ""), r.err


def test_a_node_the_user_cannot_open_is_one_line(users: Users, driver: Path, rt: str) -> None:
    node = driver / "dev/nvidia0"
    node.chmod(0o660)
    try:
        r = as_user(users.alice, "run", "--runtime-dir", rt, "--gpu=1", "--", "true",
                    env=genv(driver))
        one_line(r, 8, f"GPU device {node} is not usable by you", "0660")
        assert [x["status"] for x in gpu_rows(driver)] == ["free", "free"]  # nothing held
        r = run_jbl("run", "--runtime-dir", rt, "--gpu=1", "--", "true", env=genv(driver))
        assert (r.rc, r.err) == (0, ""), r.err  # root may open it
    finally:
        node.chmod(0o666)


# ---- sharing: users and root, first fit, who sees what ----------------------------------

def test_users_and_root_share_gpus_first_fit(users: Users, driver: Path, rt: str) -> None:
    a, (a_id, a_cuda, a_nodes) = start(driver, rt, users.alice, "--gpu=1")
    b = c = None
    try:
        b, (b_id, b_cuda, b_nodes) = start(driver, rt, users.bob, "--gpu=1")
        assert (a_cuda, b_cuda) == UUIDS  # first fit, each its own
        assert ("nvidia0" in a_nodes.split(), "nvidia1" in a_nodes.split()) == (True, False)
        assert ("nvidia0" in b_nodes.split(), "nvidia1" in b_nodes.split()) == (False, True)
        # root's job is refused at once, naming both holders (root sees every job id)
        t0 = time.monotonic()
        r = run_jbl("run", "--runtime-dir", rt, "--gpu=1", "--", "true", env=genv(driver),
                    timeout=60)
        one_line(r, 14, "only 0 of the 2 matching GPUs are free", a_id, b_id,
                 f"user {users.alice}", f"user {users.bob}")
        assert time.monotonic() - t0 < 30
        rows = gpu_rows(driver)
        assert [(x["job_id"], x["user"]) for x in rows] == [(a_id, users.alice),
                                                           (b_id, users.bob)]
        # a user sees holders' pids and users, but only their own job ids
        for who, mine, other in ((users.alice, 0, 1), (users.bob, 1, 0)):
            rows = gpu_rows(driver, who)
            assert rows[mine]["job_id"] == (a_id, b_id)[mine]
            assert rows[other]["job_id"] is None
            assert rows[other]["user"] == (users.alice, users.bob)[other]
            assert {x["status"] for x in rows} == {"taken"}
        r = as_user(users.alice, "run", "--runtime-dir", rt, "--gpu=1", "--", "true",
                    env=genv(driver))
        one_line(r, 14, a_id, f"user {users.bob}")
        assert b_id not in r.err
        # alice forges records: bob's holder in her own directory, and one for her GPU
        # naming bob's job; root believes neither (records only from the holder's own user)
        bob_pid = rows[1]["pid"]
        forged = (f"mkdir -p ~/.local/state/jbl/gpus && cd ~/.local/state/jbl/gpus && "
                  f"echo '{bob_pid} job-0badf00d' > gpu-{BUSES[1]}.job")
        assert sh_as(users.alice, forged).returncode == 0
        assert sh_as(users.alice, f"echo x > {driver}/run/jbl/gpus/gpu-{BUSES[1]}.job"
                     ).returncode != 0  # root's directory: not hers to write
        assert [x["job_id"] for x in gpu_rows(driver)] == [a_id, b_id]
        # SIGKILL alice's jbl (the lock's holder): her GPU is free at once, root gets it
        a_pid = gpu_rows(driver)[0]["pid"]
        assert isinstance(a_pid, int)
        os.kill(a_pid, signal.SIGKILL)
        a.communicate(timeout=60)
        c, (c_id, c_cuda, _) = start(driver, rt, None, "--gpu=1")
        assert c_cuda == UUIDS[0]
        # root's job id is root's to see: alice sees its pid and user only
        assert [(x["user"], x["job_id"]) for x in gpu_rows(driver, users.alice)] == [
            ("root", None), (users.bob, None)]
        assert [x["job_id"] for x in gpu_rows(driver)] == [c_id, b_id]
        assert finish(c) == 0
    finally:
        for p in (a, b, c):
            if p is not None and p.poll() is None:
                finish(p)
            if p is not None:
                reap(p)
    assert [x["status"] for x in gpu_rows(driver)] == ["free", "free"]


def test_a_user_holding_locks_outside_jobs_reserves_and_root_never_waits(
        users: Users, driver: Path, rt: str) -> None:
    locks = driver / "run/jbl/gpus"
    # flock(1) as alice: an exclusive lock on GPU 0 and a shared one on GPU 1, no job at all
    p = subprocess.Popen(["runuser", "-u", users.alice, "--", "flock", "-n",
                          str(locks / f"gpu-{BUSES[0]}.lock"), "flock", "-n", "-s",
                          str(locks / f"gpu-{BUSES[1]}.lock"), "sh", "-c", "echo held; read x"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/")
    try:
        assert p.stdout is not None and p.stdout.readline() == "held\n"
        rows = gpu_rows(driver)
        assert [(x["status"], x["user"], x["job_id"]) for x in rows] == [
            ("taken", users.alice, None), ("taken", users.alice, None)]
        t0 = time.monotonic()
        r = run_jbl("run", "--runtime-dir", rt, "--gpu=1", "--", "true", env=genv(driver),
                    timeout=60)
        one_line(r, 14, "only 0 of the 2 matching GPUs are free", f"user {users.alice}")
        assert time.monotonic() - t0 < 30  # refused, not waited (a wait would hit the timeout)
        # she cannot swap or remove the lock files root's jbl relies on
        assert sh_as(users.alice, f"rm -f {locks}/gpu-{BUSES[0]}.lock").returncode != 0
        assert sh_as(users.alice, f"ln -s /etc/shadow {locks}/x.lock").returncode != 0
    finally:
        p.communicate("\n", timeout=30)
    r = run_jbl("run", "--runtime-dir", rt, "--gpu=2", "--", "true", env=genv(driver))
    assert (r.rc, r.err) == (0, ""), r.err


def test_tampered_locks_are_refused(users: Users, driver: Path, rt: str) -> None:
    locks = driver / "run/jbl/gpus"
    lock0 = locks / f"gpu-{BUSES[0]}.lock"
    locks.chmod(0o777)
    try:
        for who in (users.alice, None):
            r = (as_user(who, "run", "--runtime-dir", rt, "--gpu=1", "--", "true",
                         env=genv(driver)) if who else
                 run_jbl("run", "--runtime-dir", rt, "--gpu=1", "--", "true", env=genv(driver)))
            one_line(r, 12, f"GPU lock directory {locks} is not root's alone")
    finally:
        locks.chmod(0o755)
    os.chown(lock0, users.uid(users.alice), -1)  # as if a user's file stood in its place
    try:
        for who in (users.alice, None):
            r = (as_user(who, "run", "--runtime-dir", rt, "--gpu=1", "--", "true",
                         env=genv(driver)) if who else
                 run_jbl("run", "--runtime-dir", rt, "--gpu=1", "--", "true", env=genv(driver)))
            one_line(r, 12, f"GPU lock file {lock0} is not a file of root's")
    finally:
        os.chown(lock0, 0, -1)
    lock0.chmod(0o666)  # writable by all: a user refuses it, root puts it right
    r = as_user(users.alice, "run", "--runtime-dir", rt, "--gpu=1", "--", "true",
                env=genv(driver))
    one_line(r, 12, "only root can write")
    r = run_jbl("run", "--runtime-dir", rt, "--gpu=1", "--", "true", env=genv(driver))
    assert (r.rc, r.err) == (0, ""), r.err
    assert stat.S_IMODE(lock0.stat().st_mode) == 0o644
    r = as_user(users.alice, "run", "--runtime-dir", rt, "--gpu=1", "--", "true",
                env=genv(driver))
    assert (r.rc, r.err.strip()) == (0, NOTE), r.err


# ---- the tun device ---------------------------------------------------------------------------

def test_setup_makes_the_tun_device_usable_by_users(users: Users, base: Path) -> None:
    where = base / "tun"
    net = where / "sys/dev/net"
    net.mkdir(parents=True)
    tun = net / "tun"
    os.mknod(tun, 0o600 | stat.S_IFCHR, os.makedev(10, 200))
    tun.chmod(0o600)

    def row(out: str) -> list[str]:
        return [" ".join(ln.split()[:-1]) for ln in out.splitlines() if "tun device" in ln]

    assert row(setup(users, where, None, "--dry-run").ok().out) == [
        "would change tun device (--network isolated)"]
    assert stat.S_IMODE(tun.stat().st_mode) == 0o600
    assert row(setup(users, where, None).ok().out) == ["changed tun device (--network isolated)"]
    assert stat.S_IMODE(tun.stat().st_mode) == 0o666
    assert row(setup(users, where, None).ok().out) == ["ok tun device (--network isolated)"]
    # what is not the tun device is left alone: a link (to a file of root's) and another node
    victim = where / "victim"
    victim.write_text("secret\n")
    victim.chmod(0o600)
    tun.unlink()
    tun.symlink_to(victim)
    r = setup(users, where, None)
    one_line(r, 1, f"tun device {tun} is a symlink, not the tun device")
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600
    tun.unlink()
    os.mknod(tun, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    r = setup(users, where, None)
    one_line(r, 1, "is char device 1:3, not the tun device")
    assert stat.S_IMODE(tun.lstat().st_mode) == 0o600
