"""``jbl run --network none|isolated|host`` with real jobs: name resolution in each mode,
slirp4netns for ``isolated`` (root and an ordinary user), and slirp4netns never outliving
its job.

Traffic stays on this machine: the only server is one the test starts on 127.0.0.1, which
an isolated job reaches through slirp's host alias 10.0.2.2 under the test-only setting
``JBL_SLIRP_HOST_LOOPBACK=1``; no name is ever looked up in DNS (the runtime's nsswitch
asks files first, and only names in the job's hosts file are looked up).
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import conftest_run
import pytest
from conftest_run import JBL, jbl, user_jbl
from fixtures_names import LocalServer, fetch_script, names_runtime, tree
from jbl.runner import plan as P
from jbl.store.manifest import parse_manifest

test_user = conftest_run.test_user

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (test users, tun mode)")

RUNTIME_HOSTS = b"127.0.0.1\tlocalhost\n10.9.9.9\truntime-own-name\n"
RUNTIME_RESOLV = b"nameserver 192.0.2.53\n"  # TEST-NET-1: never asked (see above)


@pytest.fixture(scope="module")
def rts() -> Iterator[dict[str, Path]]:
    """Runtimes whose /etc lacks hosts and resolv.conf ("bare"), has both ("full"), or
    does not exist ("noetc")."""
    base = Path(tempfile.mkdtemp(prefix="jbl-netrt-"))
    base.chmod(0o755)
    passwd = {"passwd": b"root:x:0:0:root:/root:/bin/sh\n", "group": b"root:x:0:\n"}
    yield {"bare": names_runtime(base / "bare", passwd),
           "full": names_runtime(base / "full", {**passwd, "hosts": RUNTIME_HOSTS,
                                                 "resolv.conf": RUNTIME_RESOLV}),
           "noetc": names_runtime(base / "noetc", None)}
    subprocess.run(["rm", "-rf", str(base)], check=False)


def run(rt: Path, network: str, script: str, user: str | None = None,
        env: dict[str, str] | None = None,
        job_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``script`` in a job; ``env`` for jbl, ``job_env`` for the job (``--env``)."""
    exe = JBL if user is None else user_jbl()
    argv = [exe, "run", "--runtime-dir", str(rt), "--network", network,
            *[f"--env={k}={v}" for k, v in (job_env or {}).items()], "--", "sh", "-c", script]
    if user is not None:
        argv = ["runuser", "-u", user, "--", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd="/",
                          stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})


RESOLVE = ("getent hosts localhost; getent hosts $(hostname); "
           "python3 -c \"import socket; print(sorted({a[4][0] for a in "
           "socket.getaddrinfo('localhost', 80)}))\"; "
           "echo x >> /etc/hosts || echo hosts-read-only; "
           "cat /etc/resolv.conf 2>/dev/null || echo no-resolv; echo ---; cat /etc/hosts")


@needs_root
def test_none_resolves_localhost_and_its_own_name(rts: dict[str, Path]) -> None:
    before = tree(rts["bare"])
    r = run(rts["bare"], "none", RESOLVE + "; echo ---; cat /proc/net/dev")
    assert (r.returncode, r.stderr.count("Read-only file system")) == (0, 1), r.stderr
    head, hosts, dev = r.stdout.split("---\n")
    lines = head.splitlines()
    assert lines[0].split()[1:2] == ["localhost"]  # ::1 or 127.0.0.1, from the hosts file
    assert lines[1].startswith("127.0.1.1") and lines[1].split()[1].startswith("job-")
    assert "'127.0.0.1'" in lines[2]
    assert lines[3:] == ["hosts-read-only", "no-resolv"]
    assert "127.0.0.1\tlocalhost" in hosts
    assert [ln.split(":")[0].strip() for ln in dev.splitlines()[2:]] == ["lo"]
    assert tree(rts["bare"]) == before
    # a runtime with a hosts file of its own keeps it under --network none
    r = run(rts["full"], "none", "cat /etc/hosts /etc/resolv.conf; getent hosts runtime-own-name")
    assert r.returncode == 0, r.stderr
    assert r.stdout == (RUNTIME_HOSTS + RUNTIME_RESOLV).decode() + \
        "10.9.9.9        runtime-own-name\n"


@needs_root
@pytest.mark.parametrize("kind", ["bare", "full", "noetc"])
def test_host_gets_the_hosts_resolv_conf_and_hosts(rts: dict[str, Path], kind: str) -> None:
    """Each way of placing the files: over the runtime's own (full), an overlay adding
    them (bare), the whole of /etc when the runtime has none (noetc)."""
    before = tree(rts[kind])
    r = run(rts[kind], "host", RESOLVE)
    assert r.returncode == 0, r.stderr
    head, hosts = r.stdout.split("---\n")
    host_resolv = Path("/etc/resolv.conf").read_text()
    assert head.endswith("hosts-read-only\n" + host_resolv), head
    assert hosts.startswith(Path("/etc/hosts").read_text())
    assert hosts.splitlines()[-1].startswith("127.0.1.1\tjob-")
    assert "'127.0.0.1'" in head.splitlines()[2]
    assert tree(rts[kind]) == before
    if kind != "noetc":  # the rest of the runtime's /etc is still there
        r = run(rts[kind], "host", "cat /etc/passwd /etc/nsswitch.conf")
        assert r.stdout == "root:x:0:0:root:/root:/bin/sh\n" + fixtures_nss(), r.stderr


def fixtures_nss() -> str:
    from fixtures_names import NSSWITCH

    return NSSWITCH.decode()


@needs_root
def test_bad_network_is_one_line_exit_2(rts: dict[str, Path]) -> None:
    r = jbl("run", "--runtime-dir", str(rts["bare"]), "--network", "bridge", "--", "true")
    assert r.returncode == 2
    assert r.stderr == ("jbl: error: invalid --network 'bridge': expected none, isolated "
                        "or host\n")


def _slirps() -> dict[int, str]:
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                cmd = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmd and cmd[0].endswith(b"slirp4netns"):
                out[int(d)] = b" ".join(cmd).decode()
    return out


def _gone(pids: set[int], deadline: float) -> bool:
    while time.monotonic() < deadline:
        if not pids & set(_slirps()):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def loopback_server() -> Iterator[LocalServer]:
    with LocalServer("hello-from-the-test").running() as s:
        yield s


IFACES = "import socket; print(*sorted(n for _, n in socket.if_nameindex()))"
ISOLATED = ('cat /etc/resolv.conf; getent hosts localhost | head -1; python3 -c "$IFACES"; '
            'python3 -c "$FETCH"')


def _isolated(rt: Path, server: LocalServer, user: str | None,
              loopback: bool) -> subprocess.CompletedProcess[str]:
    job_env = {"FETCH": fetch_script(f"http://10.0.2.2:{server.port}/"), "IFACES": IFACES}
    return run(rt, "isolated", ISOLATED, user=user, job_env=job_env,
               env={"JBL_SLIRP_HOST_LOOPBACK": "1" if loopback else "0"})


@needs_root
def test_isolated_reaches_a_loopback_server_only_under_the_test_setting(
        rts: dict[str, Path], loopback_server: LocalServer) -> None:
    before = set(_slirps())
    r = _isolated(rts["bare"], loopback_server, None, loopback=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "nameserver 10.0.2.3"
    assert lines[1].split()[1:2] == ["localhost"]
    assert lines[2].split() == ["lo", "tap0"]
    assert lines[3] == "hello-from-the-test"
    assert loopback_server.hits == 1
    # the default: the host's loopback is out of reach, the network itself still up
    r = _isolated(rts["bare"], loopback_server, None, loopback=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[2].split() == ["lo", "tap0"]
    assert r.stdout.splitlines()[3].startswith("failed:"), r.stdout
    assert loopback_server.hits == 1
    assert set(_slirps()) == before  # none left behind by either job
    # and without any network, the same address is unreachable
    r = run(rts["bare"], "none", 'python3 -c "$FETCH"',
            job_env={"FETCH": fetch_script(f"http://10.0.2.2:{loopback_server.port}/")})
    assert r.stdout.startswith("failed:") and loopback_server.hits == 1


@needs_root
def test_isolated_for_an_ordinary_user(rts: dict[str, Path], test_user: str,
                                      loopback_server: LocalServer) -> None:
    """slirp4netns runs as the user (rootless); it needs the tun device to be usable by
    users (Debian's 0666): when it is not, one line says so and nothing runs."""
    mode = stat.S_IMODE(os.stat("/dev/net/tun").st_mode)
    try:
        os.chmod("/dev/net/tun", 0o600)
        r = _isolated(rts["bare"], loopback_server, test_user, loopback=True)
        assert r.returncode == 12, r.stderr
        assert r.stderr.startswith("jbl: error: --network isolated: /dev/net/tun is not "
                                   "usable by non-root users on this host (an admin can")
        assert r.stderr.count("\n") == 1 and r.stdout == ""
        os.chmod("/dev/net/tun", 0o666)
        r = _isolated(rts["bare"], loopback_server, test_user, loopback=True)
    finally:
        os.chmod("/dev/net/tun", mode)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "nameserver 10.0.2.3"
    assert r.stdout.splitlines()[3] == "hello-from-the-test"
    assert loopback_server.hits == 1


def _descendants(pid: int) -> set[int]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    out, todo = set(), [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.add(k)
            todo.append(k)
    return out


@needs_root
@pytest.mark.parametrize("how", ["job ends", "jbl is SIGKILLed"])
def test_slirp_never_outlives_its_job(rts: dict[str, Path], how: str) -> None:
    share = Path(tempfile.mkdtemp(prefix="jbl-netgo-"))
    try:
        proc = subprocess.Popen(
            [JBL, "run", "--runtime-dir", str(rts["bare"]), "--network", "isolated",
             "--volume", f"{share}:/share", "--", "sh", "-c",
             "touch /share/started; while [ ! -e /share/go ]; do sleep 0.05; done; exit 5"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while not (share / "started").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        ours = set(_slirps()) & _descendants(proc.pid)
        assert len(ours) == 1  # running while the job runs, as jbl's child
        if how == "job ends":
            (share / "go").touch()
            assert proc.wait(30) == 5
        else:
            proc.kill()
            proc.wait(30)
        assert _gone(ours, time.monotonic() + 10), _slirps()
    finally:
        (share / "go").touch()
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
        subprocess.run(["rm", "-rf", str(share)], check=False)


@needs_root
def test_missing_slirp4netns_is_one_line(rts: dict[str, Path]) -> None:
    empty = tempfile.mkdtemp(prefix="jbl-nopath-")
    try:
        r = subprocess.run([JBL, "run", "--runtime-dir", str(rts["bare"]), "--network",
                            "isolated", "--", "true"], capture_output=True, text=True,
                           env={**os.environ, "PATH": empty}, timeout=60,
                           stdin=subprocess.DEVNULL)
    finally:
        os.rmdir(empty)
    assert r.returncode == 12 and r.stderr.count("\n") == 1, r.stderr
    assert "slirp4netns, which is not installed" in r.stderr


@needs_root
def test_signals_still_reach_an_isolated_job(rts: dict[str, Path]) -> None:
    proc = subprocess.Popen([JBL, "run", "--runtime-dir", str(rts["bare"]), "--network",
                             "isolated", "--", "sh", "-c",
                             "trap 'exit 9' TERM; echo ready; while :; do sleep 0.05; done"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        ours = set(_slirps()) & _descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 9
        assert _gone(ours, time.monotonic() + 10)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


# ---- the pure plan (no root) -------------------------------------------------------------

MANIFEST = parse_manifest("name: rt\nversion: 1.0.0\nmounts:\n - {source: isolated, target: /}\n")
ROOTFS = [P.RootfsEntry("etc", "dir"), P.RootfsEntry("usr", "dir")]


def _plan(network: str, userns: bool = True, etc: P.JobEtc | None = None) -> list[str]:
    req = P.JobRequest(Path("/rt"), ("true",), job_id="job-1", network=network)  # type: ignore[arg-type]
    ids = P.Ids(1000, 1000, userns=userns)
    plan = P.build_plan(req, MANIFEST, {"isolated": ROOTFS}, ids, etc=etc)
    return [s.op for s in plan.with_net_fd(9).steps]


def test_plan_isolated_waits_for_its_network() -> None:
    ops = _plan("isolated")
    # the namespace is announced after the id map (slirp4netns joins the user namespace),
    # and the job is forked only once slirp4netns has configured it
    assert ops[ops.index("unshare"):ops.index("fork_init")] == ["unshare", "id_map", "net_ready"]
    assert ops.index("pivot_root") < ops.index("await_net") == ops.index("fork_job") - 1
    assert "loopback_up" in ops
    none, host = _plan("none"), _plan("host")
    assert "net_ready" not in none + host and "await_net" not in none + host
    assert "loopback_up" in none and "loopback_up" not in host


def test_plan_unshares_net_except_for_host() -> None:
    for network, net in (("none", True), ("isolated", True), ("host", False)):
        req = P.JobRequest(Path("/rt"), ("true",), network=network)  # type: ignore[arg-type]
        plan = P.build_plan(req, MANIFEST, {"isolated": ROOTFS}, P.Ids(0, 0, userns=False))
        assert P.Unshare(user=False, net=net) in plan.steps
        assert [s.fd for s in plan.with_net_fd(7).steps if isinstance(s, P.NetReady)] == \
            ([7] if network == "isolated" else [])


def test_etc_files_placement() -> None:
    files = (("hosts", b"h"), ("passwd", b"p"))
    assert P.JobEtc(files, "dir", frozenset({"hosts", "passwd"})).step() == \
        P.EtcFiles(files, "files")
    assert P.JobEtc(files, "dir", frozenset({"passwd"})).step() == P.EtcFiles(files, "overlay")
    assert P.JobEtc(files, "absent").step() == P.EtcFiles(files, "dir")
    assert P.JobEtc(files, "other").step() is None
    assert P.JobEtc((), "dir").step() is None
    ops = _plan("none", etc=P.JobEtc(files, "absent"))
    # after the runtime's mounts (so /etc exists), before volumes could cover a file
    assert ops.index("bind_ro") < ops.index("etc_files") < ops.index("proc")
