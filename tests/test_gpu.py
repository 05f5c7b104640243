"""GPUs: discovery, ``jbl gpu list``, allocation across concurrent real jobs, what a job gets.

Everything runs against a fake NVIDIA driver tree the test builds (``JBL_GPU_DRIVER_ROOT``):
``proc/driver/nvidia/gpus/*/information``, a ``nvidia-smi`` script, real character device
nodes (``mknod``, NVIDIA's major 195; no driver answers them here, so opening an allowed one
fails with ENXIO, a node the devices cgroup denies with EPERM) and real ELF libraries in a
linker cache made by ``ldconfig -r``. The code path is the one a real GPU takes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import conftest_run
import pytest
from conftest_run import JBL
from jbl.runner import gpu
from jbl.runner.cgroups import own_cgroups
from jbl.runner.plan import BindDev, BindRO, GpuGrant, Ids, JobRequest, Symlink, build_plan
from jbl.store.manifest import Manifest
from procs import reap

runtimes = conftest_run.runtimes
rt = conftest_run.rt

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")

UUIDS = ("GPU-11111111-2222-3333-4444-555555555555", "GPU-66666666-7777-8888-9999-000000000000")
BUSES = ("0000:01:00.0", "0000:02:00.0")
SMI = """#!/bin/sh
echo "0, 00000000:01:00.0, 8192, Tesla T4, GPU-11111111-2222-3333-4444-555555555555"
echo "1, 00000000:02:00.0, 16384, NVIDIA A100, GPU-66666666-7777-8888-9999-000000000000"
"""
UVM_MAJOR = 234  # dynamic on a real host; unused here, so opening it fails with ENXIO
DEV_CGROUP = Path("/sys/fs/cgroup/devices")


def _mknod(path: Path, major: int, minor: int) -> None:
    os.mknod(path, 0o666 | 0o020000, os.makedev(major, minor))
    path.chmod(0o666)


def make_driver_tree(root: Path, smi: bool = True) -> Path:
    """Two GPUs (minors 0 and 1), control nodes, a decoy /dev/nvidia7 no GPU owns, the
    driver's libraries in a linker cache next to an unrelated library, nvidia-smi."""
    root.mkdir(mode=0o755, parents=True, exist_ok=True)
    for minor, (bus, model, uuid) in enumerate(zip(BUSES, ("Tesla T4", "NVIDIA A100"), UUIDS,
                                                   strict=True)):
        d = root / "proc/driver/nvidia/gpus" / bus
        d.mkdir(parents=True)
        (d / "information").write_text(
            f"Model: \t\t {model}\nIRQ:   \t\t 35\nGPU UUID: \t {uuid}\nVideo BIOS: \t ??\n"
            f"Bus Type: \t PCIe\nBus Location: \t {bus}\nDevice Minor: \t {minor}\n"
            "GPU Excluded:\t No\n")
    dev = root / "dev"
    dev.mkdir()
    for minor in (0, 1, 7):
        _mknod(dev / f"nvidia{minor}", gpu.NVIDIA_MAJOR, minor)
    _mknod(dev / "nvidiactl", gpu.NVIDIA_MAJOR, 255)
    _mknod(dev / "nvidia-modeset", gpu.NVIDIA_MAJOR, 254)
    _mknod(dev / "nvidia-uvm", UVM_MAJOR, 0)
    _mknod(dev / "nvidia-uvm-tools", UVM_MAJOR, 1)
    libdir = root / "usr/lib/x86_64-linux-gnu"
    libdir.mkdir(parents=True)
    src = root / "cuda.c"
    src.write_text("int cuInit(unsigned flags) { return 42; }\n")
    for name, soname in (("libcuda.so.550.54", "libcuda.so.1"),
                         ("libnvidia-ml.so.550.54", "libnvidia-ml.so.1"),
                         ("libnotdriver.so.3.0", "libnotdriver.so.3")):
        subprocess.run(["gcc", "-shared", "-fPIC", f"-Wl,-soname,{soname}", "-o",
                        str(libdir / name), str(src)], check=True)
    (root / "etc").mkdir()
    (root / "etc/ld.so.conf").write_text("/usr/lib/x86_64-linux-gnu\n")
    subprocess.run(["ldconfig", "-r", str(root)], check=True)
    if smi:
        (root / "usr/bin").mkdir(parents=True)
        (root / "usr/bin/nvidia-smi").write_text(SMI)
        (root / "usr/bin/nvidia-smi").chmod(0o755)
    return root


@pytest.fixture(scope="module")
def driver() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="jbl-gpu-"))
    base.chmod(0o755)
    yield make_driver_tree(base / "root")
    shutil.rmtree(base)


def env_for(root: Path) -> dict[str, str]:
    return {**os.environ, gpu.DRIVER_ROOT_ENV: str(root)}


def jbl(root: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([JBL, *args], capture_output=True, text=True, timeout=timeout,
                          env=env_for(root), stdin=subprocess.DEVNULL)


def start_job(root: Path, rt: str, *opts: str) -> tuple[subprocess.Popen[str], list[str]]:
    """A GPU job that reports what it got, then waits for a line on stdin."""
    script = ('nodes=$(ls /dev | grep nvidia); '
              'echo "$JBL_JOB_ID|$CUDA_VISIBLE_DEVICES|$NVIDIA_VISIBLE_DEVICES|"$nodes; read x')
    p = subprocess.Popen([JBL, "run", "--runtime-dir", rt, *opts, "--", "sh", "-c", script],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env_for(root))
    assert p.stdout is not None
    line = p.stdout.readline()
    if not line:
        _, err = p.communicate(timeout=30)  # pipes closed
        pytest.fail(f"job did not start (exit {p.returncode}): {err}")
    return p, line.rstrip("\n").split("|")


def finish(p: subprocess.Popen[str]) -> int:
    p.communicate("\n" if p.poll() is None else None, timeout=30)
    return p.returncode


def one_line(r: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jbl: error: "), r.stderr
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr
    for w in words:
        assert w in lines[0], r.stderr


# ---- discovery and listing ----------------------------------------------------------------

def test_discovery_reads_proc_and_nvidia_smi(driver: Path) -> None:
    gpus = gpu.discover(driver)
    assert [(g.index, g.minor, g.bus_id, g.model, g.uuid, g.memory) for g in gpus] == [
        (0, 0, BUSES[0], "Tesla T4", UUIDS[0], 8192 << 20),
        (1, 1, BUSES[1], "NVIDIA A100", UUIDS[1], 16384 << 20)]


def test_discovery_without_nvidia_smi_has_no_memory(tmp_path: Path) -> None:
    root = make_driver_tree(tmp_path / "root", smi=False)
    gpus = gpu.discover(root)
    assert [(g.index, g.minor, g.bus_id, g.memory) for g in gpus] == [
        (0, 0, BUSES[0], None), (1, 1, BUSES[1], None)]
    # the linker cache gives the driver's libraries only, with their names and real files
    libs = sorted((n, p.name) for n, p in gpu.driver_libraries(root))
    assert libs == [("libcuda.so.1", "libcuda.so.550.54"),
                    ("libnvidia-ml.so.1", "libnvidia-ml.so.550.54")]


def test_gpu_list_shows_what_exists(driver: Path) -> None:
    r = jbl(driver, "gpu", "list")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:6] == ["GPU", "MINOR", "BUS", "MODEL", "MEMORY", "STATUS"]
    assert BUSES[0] in lines[1] and "Tesla T4" in lines[1] and "8.0G" in lines[1]
    assert "free" in lines[1] and "free" in lines[2] and len(lines) == 3
    rows = json.loads(jbl(driver, "gpu", "list", "--json").stdout)
    assert [(x["index"], x["status"], x["memory"]) for x in rows] == [
        (0, "free", 8 << 30), (1, "free", 16 << 30)]


def test_no_gpu_host(tmp_path: Path, rt: str) -> None:
    empty = tmp_path / "nogpu"
    empty.mkdir()
    r = jbl(empty, "gpu", "list")
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    assert r.stdout.startswith("no NVIDIA GPUs on this host")
    r = jbl(empty, "run", "--runtime-dir", rt, "--gpu=1", "--", "true")
    one_line(r, 14, "--gpu=1: no NVIDIA GPU on this host")


def test_bad_gpu_options(driver: Path, rt: str) -> None:
    one_line(jbl(driver, "run", "--runtime-dir", rt, "--gpu=two", "--", "true"), 2, "--gpu")
    one_line(jbl(driver, "run", "--runtime-dir", rt, "--gpu-memory=8G", "--", "true"), 2,
             "--gpu-memory needs --gpu")
    one_line(jbl(driver, "run", "--runtime-dir", rt, "--gpu=1", "--gpu-memory=lots", "--",
                 "true"), 2, "--gpu-memory")
    one_line(jbl(driver, "run", "--runtime-dir", rt, "--gpu=3", "--", "true"), 14,
             "this host has 2 GPU(s)")


# ---- what a job gets ----------------------------------------------------------------------

def test_plan_gives_exactly_the_grant() -> None:
    grant = GpuGrant(devices=(("/d/nvidia1", "nvidia1"), ("/d/nvidiactl", "nvidiactl")),
                     files=(("/h/libcuda.so.550", "/nvidia-driver/lib/libcuda.so.550"),),
                     links=(("libcuda.so.550", "/nvidia-driver/lib/libcuda.so.1"),),
                     env=(("CUDA_VISIBLE_DEVICES", "GPU-x"),), lib_dir="/nvidia-driver/lib",
                     bin_dir="/nvidia-driver/bin", device_rules=("c 195:1 rw",))
    m = Manifest("r", "1", environment={"LD_LIBRARY_PATH": "/opt/lib"})
    plan = build_plan(JobRequest(Path("/rt"), ("true",), job_id="job-00000000"), m,
                      {"isolated": []}, Ids(0, 0, False), gpu=grant)
    assert plan.find(BindDev) == [BindDev("/d/nvidia1", "/dev/nvidia1"),
                                  BindDev("/d/nvidiactl", "/dev/nvidiactl")]
    assert BindRO("/h/libcuda.so.550", "/nvidia-driver/lib/libcuda.so.550") in plan.steps
    assert Symlink("libcuda.so.550", "/nvidia-driver/lib/libcuda.so.1") in plan.steps
    assert plan.devices == ("c 195:1 rw",)
    env = dict(plan.steps[-3].vars)  # type: ignore[attr-defined]
    assert env["LD_LIBRARY_PATH"] == "/nvidia-driver/lib:/opt/lib"
    assert env["PATH"].endswith(":/nvidia-driver/bin") and env["CUDA_VISIBLE_DEVICES"] == "GPU-x"
    plain = build_plan(JobRequest(Path("/rt"), ("true",)), m, {"isolated": []}, Ids(0, 0, False))
    assert plain.devices is None and not plain.find(BindDev)


PROBE = r"""
import ctypes, errno, os
print(sorted(n for n in os.listdir("/dev") if n.startswith("nvidia")))
for n in ("nvidia0", "nvidia1", "nvidia7"):
    try:
        os.close(os.open("/dev/" + n, os.O_RDWR))
        print(n, "opened")
    except OSError as e:
        print(n, errno.errorcode[e.errno])
print({k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES",
                                      "CUDA_DEVICE_ORDER")})
print(sorted(os.listdir("/nvidia-driver/lib")), os.readlink("/nvidia-driver/lib/libcuda.so.1"))
print("cuInit", ctypes.CDLL("libcuda.so.1").cuInit(0))
try:
    open("/nvidia-driver/lib/libcuda.so.550.54", "ab")
except OSError as e:
    print("write lib", errno.errorcode[e.errno])
"""


def test_job_gets_its_nodes_driver_and_env(driver: Path, rt: str) -> None:
    r = jbl(driver, "run", "--runtime-dir", rt, "--gpu=1", "--gpu-memory=12G", "--",
            "python3", "-c", PROBE)
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    # the 16G GPU (minor 1) and the control nodes; never the other GPU or the decoy node
    assert out[0] == str(sorted(["nvidia1", "nvidia-modeset", "nvidia-uvm", "nvidia-uvm-tools",
                                 "nvidiactl"]))
    # its own node reaches the (absent) driver: ENXIO; the others are not there at all
    assert out[1:4] == ["nvidia0 ENOENT", "nvidia1 ENXIO", "nvidia7 ENOENT"]
    assert out[4] == str({"CUDA_VISIBLE_DEVICES": UUIDS[1], "NVIDIA_VISIBLE_DEVICES": UUIDS[1],
                          "CUDA_DEVICE_ORDER": "PCI_BUS_ID"})
    assert out[5] == str(sorted(["libcuda.so.1", "libcuda.so.550.54", "libnvidia-ml.so.1",
                                 "libnvidia-ml.so.550.54"])) + " libcuda.so.550.54"
    assert out[6:] == ["cuInit 42", "write lib EROFS"]
    smi = jbl(driver, "run", "--runtime-dir", rt, "--gpu=1", "--", "nvidia-smi")
    assert (smi.returncode, smi.stdout.splitlines()[0]) == (0, SMI.splitlines()[1][6:-1])
    # without --gpu: no GPU node, no driver directory
    plain = jbl(driver, "run", "--runtime-dir", rt, "--", "sh", "-c",
                "ls /dev | grep -c nvidia; ls /nvidia-driver")
    assert plain.stdout.startswith("0\n") and plain.returncode != 0


def test_concurrent_jobs_get_different_gpus_and_sigkill_frees(driver: Path, rt: str) -> None:
    a, (a_id, a_cuda, _, a_nodes) = start_job(driver, rt, "--gpu=1")
    b = c = None
    try:
        b, (b_id, b_cuda, _, b_nodes) = start_job(driver, rt, "--gpu", "1")
        assert {a_cuda, b_cuda} == set(UUIDS)  # first fit: each its own
        gpu_nodes = [[n for n in nodes.split() if n[6:].isdigit()] for nodes in (a_nodes, b_nodes)]
        assert sorted(gpu_nodes) == [["nvidia0"], ["nvidia1"]]
        # a third: one line naming both GPUs and the jobs holding them
        r = jbl(driver, "run", "--runtime-dir", rt, "--gpu=1", "--", "true")
        one_line(r, 14, "only 0 of the 2 matching GPUs are free", a_id, b_id, "jbl gpu list")
        rows = json.loads(jbl(driver, "gpu", "list", "--json").stdout)
        assert {x["job_id"] for x in rows} == {a_id, b_id}
        assert {x["pid"] for x in rows} == {a.pid, b.pid}
        assert {x["user"] for x in rows} == {"root"}
        # SIGKILL the jbl that holds a GPU: the kernel drops its lock; the GPU is free at once
        freed = a_cuda
        a.send_signal(signal.SIGKILL)
        a.communicate(timeout=30)  # reaped (so its descriptors are gone), pipes closed
        c, (_, c_cuda, _, _) = start_job(driver, rt, "--gpu=1")
        assert c_cuda == freed
        assert finish(c) == 0
    finally:
        for p in (a, b, c):
            if p is not None and p.poll() is None:
                finish(p)
            if p is not None:
                reap(p)
    rows = json.loads(jbl(driver, "gpu", "list", "--json").stdout)
    assert [x["status"] for x in rows] == ["free", "free"]


def test_devices_cgroup_allows_only_its_gpu(driver: Path, rt: str) -> None:
    if not (DEV_CGROUP / "cgroup.procs").exists():
        pytest.skip("no cgroup v1 devices controller (v2: the nodes are simply absent)")
    p, (job_id, _, _, _) = start_job(driver, rt, "--gpu=1")
    try:
        cg = DEV_CGROUP / own_cgroups().get("devices", "/").lstrip("/") / "jbl" / job_id
        rules = (cg / "devices.list").read_text().split()
        assert "c 195:0 rw" in " ".join(rules) or "195:0" in rules
        # a process in the job's devices cgroup, on the host, where every node is present;
        # then the same from outside it, where nothing is denied
        inside = _open_nodes(driver, cg / "cgroup.procs")
        assert inside == ["nvidia0 ENXIO", "nvidia1 EPERM", "nvidia7 EPERM", "nvidiactl ENXIO",
                          "null ok"]
        outside = _open_nodes(driver, None)
        assert outside == ["nvidia0 ENXIO", "nvidia1 ENXIO", "nvidia7 ENXIO", "nvidiactl ENXIO",
                           "null ok"]
    finally:
        assert finish(p) == 0


def _open_nodes(driver: Path, procs: Path | None) -> list[str]:
    """Open the fake tree's nodes from a fresh process, first moved into ``procs``'s cgroup.
    ENXIO: the cgroup let the open through to the (absent) driver; EPERM: it refused it."""
    probe = f"""
import errno, os
if {str(procs) if procs else ""!r}:
    open({str(procs)!r}, "w").write(str(os.getpid()))
for n in ("nvidia0", "nvidia1", "nvidia7", "nvidiactl"):
    try:
        os.close(os.open({str(driver / "dev")!r} + "/" + n, os.O_RDWR))
        print(n, "opened")
    except OSError as e:
        print(n, errno.errorcode[e.errno])
os.close(os.open("/dev/null", os.O_RDWR))
print("null ok")
"""
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def test_requirements_gpu_without_gpu_warns(driver: Path, tmp_path: Path) -> None:
    from rtbuild import build_runtime

    base = Path(tempfile.mkdtemp(prefix="jbl-gpurt-"))
    try:
        base.chmod(0o755)
        d = build_runtime(base / "gpurt", "gpurt", "1.0.0")
        with open(d / "runtime.yml", "a") as fh:
            fh.write("requirements:\n  gpu: true\n")
        r = jbl(driver, "run", "--runtime-dir", str(d), "--", "true")
        assert r.returncode == 0, r.stderr
        assert "requirements.gpu" in r.stderr and "--gpu=N" in r.stderr
        r = jbl(driver, "run", "--runtime-dir", str(d), "--gpu=1", "--", "true")
        assert (r.returncode, r.stderr) == (0, "")
    finally:
        shutil.rmtree(base)
