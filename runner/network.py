"""``jbl run --network none|isolated|host``: what each mode gives the job, and slirp4netns.

* ``none`` (default): a network namespace of its own with only ``lo`` up. /etc/hosts names
  ``localhost`` and the job's hostname (jbl's copy, only when the runtime has no hosts file
  of its own); the runtime's resolv.conf is left alone (there is nothing to ask).
* ``isolated``: a network namespace of its own, reaching out through ``slirp4netns`` (user-
  mode networking: no root, no host interface, no iptables): ``tap0`` 10.0.2.100/24, gateway
  10.0.2.2, resolver 10.0.2.3 (written to the job's resolv.conf), MTU 65520. The host's
  loopback is *not* reachable through 10.0.2.2 (``--disable-host-loopback``): a service
  bound to 127.0.0.1 on the host trusts its callers to be local, and a job is not. The
  test-only setting ``JBL_SLIRP_HOST_LOOPBACK=1`` (read by the CLI into
  ``JobRequest.slirp_host_loopback``) lifts that, so tests can reach a server they started
  on 127.0.0.1 without sending anything off the machine.
* ``host``: the host's network namespace, and a copy of the host's /etc/resolv.conf and
  /etc/hosts (plus the job's hostname), read-only.

slirp4netns runs as whoever runs ``jbl`` (the job's user for a non-root job, so it works
rootless; root for root's jobs), joining the job's user and network namespaces through the
helper's pid. The order (``Slirp.start``): the helper unshares, maps ids and says so on a
socket (plan ``NetReady``); jbl starts slirp4netns and waits for its ``--ready-fd``; then
sends the go-ahead that init waits for before it forks the job (plan ``AwaitNet``), so the
job never starts unconfigured. slirp4netns gets an ``--exit-fd`` whose other end only jbl
holds: it exits when jbl closes it at the job's end, and also when jbl dies (even SIGKILL),
so it is never left running. Waits are bounded (``START_TIMEOUT``); a failure is one line.

Not thread-safe (one job per instance); called from the supervisor's thread only.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import stat
import time
from collections.abc import Mapping
from typing import IO, TYPE_CHECKING, Literal

if TYPE_CHECKING:  # subprocess and tempfile (~3 ms) only for --network isolated
    import subprocess

from .errors import SandboxSetupError
from .identity import RuntimeEtc

MODES = ("none", "isolated", "host")
Mode = Literal["none", "isolated", "host"]
SLIRP_GUEST, SLIRP_GATEWAY, SLIRP_RESOLVER = "10.0.2.100", "10.0.2.2", "10.0.2.3"
START_TIMEOUT = 10.0  # seconds for the namespace, then for slirp4netns, to be ready
STOP_TIMEOUT = 2.0  # seconds for slirp4netns to exit after its exit fd closed
MAX_HOST_FILE = 64 << 10  # the host's resolv.conf / hosts copied into a job
TUN = "/dev/net/tun"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
LOCALHOST = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"


def slirp4netns_path(env: Mapping[str, str]) -> str:
    """The slirp4netns to run, or a one-line error saying how to get it."""
    found = shutil.which("slirp4netns", path=env.get("PATH") or SYSTEM_PATH)
    if not found:
        raise SandboxSetupError("--network isolated needs slirp4netns, which is not installed",
                                hint="apt-get install slirp4netns, or use --network none|host")
    return found


def check_isolated(env: Mapping[str, str], euid: int) -> str:
    """Before anything starts: slirp4netns exists, and a non-root user may open the tun
    device (Debian makes /dev/net/tun 0666; some hosts leave it 0600, root only)."""
    path = slirp4netns_path(env)
    if euid != 0 and not os.access(TUN, os.R_OK | os.W_OK):
        raise SandboxSetupError(
            f"--network isolated: {TUN} is not usable by non-root users on this host",
            hint=f"an admin can allow it with `chmod 0666 {TUN}` (Debian's default), "
                 "or use --network none|host")
    return path


def _host_file(path: str) -> bytes | None:
    """A host configuration file (links followed: systemd-resolved's resolv.conf is one),
    only if it is a regular file that no ordinary user may write, within MAX_HOST_FILE."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o002 or st.st_size > MAX_HOST_FILE:
            return None
        data = os.read(fd, MAX_HOST_FILE + 1)
        return data if len(data) <= MAX_HOST_FILE else None
    finally:
        os.close(fd)


def resolver_files(mode: Mode, job_id: str, runtime: RuntimeEtc) -> list[tuple[str, bytes]]:
    """The job's /etc/hosts and /etc/resolv.conf for ``mode`` (see the module docstring)."""
    if mode == "host":
        out = []
        hosts = _host_file("/etc/hosts")
        if hosts is not None:
            sep = b"" if not hosts or hosts.endswith(b"\n") else b"\n"
            out.append(("hosts", hosts + sep + f"127.0.1.1\t{job_id}\n".encode()))
        resolv = _host_file("/etc/resolv.conf")
        if resolv is not None:
            out.append(("resolv.conf", resolv))
        return out
    if mode == "isolated":
        return [("hosts", f"{LOCALHOST}{SLIRP_GUEST}\t{job_id}\n".encode()),
                ("resolv.conf", f"nameserver {SLIRP_RESOLVER}\n".encode())]
    if "hosts" in runtime.files:  # none: the runtime's own hosts file is kept
        return []
    return [("hosts", f"{LOCALHOST}127.0.1.1\t{job_id}\n".encode())]


class Slirp:
    """slirp4netns for one job; ``stop`` ends it (also safe after a failed start)."""

    def __init__(self, proc: subprocess.Popen[bytes], exit_w: int, log: IO[bytes]) -> None:
        self.proc, self.exit_w, self.log = proc, exit_w, log

    @classmethod
    def start(cls, exe: str, pid: int, sock: int, host_loopback: bool) -> Slirp | None:
        """Wait for the helper ``pid`` to report its namespace on ``sock``, start slirp4netns
        against it, wait until it has configured the network, and let init go on. None when
        the helper ended first (its own status then says why)."""
        import subprocess
        import tempfile

        if _wait_byte(sock, START_TIMEOUT) != b"n":
            return None
        ready_r, ready_w = os.pipe()
        exit_r, exit_w = os.pipe()
        os.set_inheritable(exit_w, False)
        # unnamed, closed by stop(): only its last lines matter, and only on failure
        log = tempfile.TemporaryFile(prefix="jbl-slirp-")  # noqa: SIM115
        # --enable-sandbox (its own mount namespace) needs uid 0 mapped in the job's user
        # namespace (it calls setegid(0)); a non-root job maps the user to itself only
        sandbox = ["--enable-sandbox"] if os.geteuid() == 0 else []
        argv = [exe, "--configure", "--mtu=65520", "--enable-seccomp", *sandbox,
                f"--ready-fd={ready_w}", f"--exit-fd={exit_r}",
                *([] if host_loopback else ["--disable-host-loopback"]), str(pid), "tap0"]
        try:
            proc = subprocess.Popen(argv, pass_fds=(ready_w, exit_r), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=log,
                                    start_new_session=True)
        except OSError as e:
            for fd in (ready_r, ready_w, exit_r, exit_w):
                os.close(fd)
            log.close()
            raise SandboxSetupError(f"--network isolated: start slirp4netns: {e.strerror}") \
                from None
        os.close(ready_w)
        os.close(exit_r)
        slirp = cls(proc, exit_w, log)
        try:
            got = _wait_byte(ready_r, START_TIMEOUT)
        finally:
            os.close(ready_r)
        if got != b"1":
            why = slirp.why()
            slirp.stop()
            raise SandboxSetupError(f"--network isolated: slirp4netns failed: {why}")
        with contextlib.suppress(OSError):  # init is gone already: its status says why
            os.write(sock, b"g")
        return slirp

    def why(self) -> str:
        """slirp4netns's last words on stderr (a few lines at start-up at most)."""
        self.log.seek(0)
        lines = [ln.strip() for ln in self.log.read(1 << 16).decode("utf-8", "replace")
                 .splitlines() if ln.strip() and not ln.startswith("WARNING:")]
        if lines:
            return "; ".join(lines[-2:])
        code = self.proc.poll()
        return f"exited with status {code}" if code is not None else "not ready in time"

    def stop(self) -> None:
        """Close its exit fd (it exits), reap it; SIGKILL if it has not gone in time."""
        import subprocess

        if self.exit_w >= 0:
            os.close(self.exit_w)
            self.exit_w = -1
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def _wait_byte(fd: int, timeout: float) -> bytes:
    """One byte from ``fd`` within ``timeout`` seconds; b"" at EOF or when time is up."""
    deadline = time.monotonic() + timeout
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return b""
        if poller.poll(left * 1000):
            try:
                return os.read(fd, 1)
            except InterruptedError:
                continue
