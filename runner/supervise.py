"""Run one job: prepare its plan, create its cgroup, spawn the sandbox helper, wait, clean up.

``run_job(req) -> JobResult`` is the runner's API. It blocks the job-control signals in the
calling thread for the job's lifetime and takes them with ``sigtimedwait`` (so call it from
the main thread, before starting other threads, which inherit the mask): they are all
forwarded to the job, which is in a session of its own (a terminal's Ctrl-C reaches jbl only;
with a pty it reaches the job as a byte through its pty). The first SIGINT, SIGTERM, SIGHUP
(unless the job can be left instead: ``stdio.JobStdio.detach``) or SIGQUIT starts the grace
period (``req.kill_after``); when it runs out, or at a second signal, the whole cgroup is
killed. A timeout sends SIGTERM, then the same grace and kill.
While waiting it relays the job's stdio (``stdio.py``) when a terminal is involved.

Teardown (cgroup killed and removed, pipes closed) is in ``finally``, so it also runs when
``jbl`` is interrupted; if ``jbl`` itself is SIGKILLed, the helper's parent-death signal
takes the PID namespace down and the next job sweeps the empty cgroup.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import marshal
import os
import pwd
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from jbl.store.errors import ExitCode, UsageError
from jbl.store.manifest import Manifest
from jbl.store.units import format_duration, format_size

from . import sandbox as _sandbox_module
from . import warm
from .cgroups import JobCgroup
from .errors import (
    CgroupError,
    CommandNotExecutable,
    CommandNotFound,
    LimitsNotEnforced,
    SandboxSetupError,
)
from .foreground import echo
from .identity import JobUser, host_getgrgid, host_getpwuid, passwd_group, read_runtime_etc
from .manifests import load_manifest as load_manifest
from .network import Slirp, check_isolated, resolver_files
from .plan import GpuGrant, Ids, JobEtc, JobRequest, Plan, RootfsEntry, build_plan, clean_job_path
from .stdio import TTY_STOPS, JobStdio
from .terminal import wants_pty

SANDBOX = os.path.abspath(_sandbox_module.__file__)
TERMINATE = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT}
PASS_ON = {signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH, signal.SIGCONT}
WAITED = TERMINATE | PASS_ON | {signal.SIGCHLD}


@dataclass(frozen=True)
class JobResult:
    job_id: str
    runtime: str
    exit_status: int  # what `jbl run` exits with
    job_status: int  # the job's own status (128+N for signal N)
    reason: str  # exited | signaled | timeout | oom | interrupted
    wall_time: float
    peak_memory: int | None
    message: str = ""  # one line for timeout/oom, empty otherwise
    unenforced: tuple[str, ...] = field(default=())
    cpu_time: float | None = None  # s, user + system, from the job's cgroup (None: none)

    def record(self) -> dict[str, object]:
        return {"job_id": self.job_id, "runtime": self.runtime, "exit_status": self.exit_status,
                "job_status": self.job_status, "reason": self.reason,
                "wall_time": round(self.wall_time, 4), "peak_memory": self.peak_memory,
                "unenforced_limits": list(self.unenforced), "message": self.message}


# ---- preparing ----------------------------------------------------------------------------

def _inside(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def list_rootfs(src: Path) -> list[RootfsEntry]:
    out = []
    for e in sorted(os.scandir(src), key=lambda e: e.name):
        if e.is_symlink():
            out.append(RootfsEntry(e.name, "symlink", os.readlink(e.path)))
        elif e.is_dir():
            out.append(RootfsEntry(e.name, "dir"))
        else:
            out.append(RootfsEntry(e.name, "file"))
    return out


def job_ids(req: JobRequest) -> Ids:
    euid, egid = os.geteuid(), os.getegid()
    if req.user is None:
        return Ids(euid, egid, userns=euid != 0)
    if euid != 0:
        raise UsageError("--user needs root (without it, jobs run as you)")
    try:
        pw = pwd.getpwnam(req.user)
    except KeyError:
        raise UsageError(f"--user {req.user!r}: no such user") from None
    groups = tuple(os.getgrouplist(pw.pw_name, pw.pw_gid))
    return Ids(0, 0, userns=False, job_uid=pw.pw_uid, job_gid=pw.pw_gid, job_groups=groups)


def prepare(req: JobRequest, manifest: Manifest | None = None, pty: bool = False,
            gpu: GpuGrant | None = None, note: Callable[[str], None] | None = None) -> Plan:
    """Read the runtime directory and the host facts the pure planner needs. ``manifest``:
    the runtime's, when the caller has read it already from ``req.runtime_dir``; ``pty``:
    the job gets a fresh pty as its controlling terminal; ``gpu``: its GPUs (runner/gpu.py)."""
    rt = Path(os.path.realpath(req.runtime_dir))
    if manifest is None:
        manifest = load_manifest(rt)
    if getattr(manifest, "requires_gpu", False) and not req.gpus and note is not None:
        note(f"{req.runtime_label or manifest.name} asks for a GPU (runtime.yml "
             "requirements.gpu) but the job has none: add --gpu=N to give it one")
    entries: dict[str, list[RootfsEntry]] = {}
    skip: set[str] = set()
    for m in manifest.default_mounts():
        src = os.path.realpath(rt / m.source)
        # A source the runtime lacks is skipped, as Joblet does (import noted it, info shows
        # it); so is one whose symlinks lead out of the runtime: never followed to the host.
        if not _inside(src, str(rt)) or not os.path.exists(src):
            skip.add(m.source)
            continue
        if m.target == "/":
            entries[m.source] = list_rootfs(Path(src))
    for up in req.uploads:
        if not os.path.lexists(up):
            raise UsageError(f"--upload {up}: no such file or directory")
    for v in req.volumes:
        if not os.path.isabs(v.source) or not os.path.exists(v.source):
            raise UsageError(f"--volume {v.source}: no such file or directory")
    req2 = dataclasses.replace(req, runtime_dir=rt,
                               uploads=tuple(Path(os.path.abspath(u)) for u in req.uploads))
    ids = job_ids(req)
    return build_plan(req2, manifest, entries, ids, host_env=os.environ, ctty=pty,
                      gpu=gpu, skip_sources=skip, etc=job_etc(req2, manifest, ids))


def job_etc(req: JobRequest, manifest: Manifest, ids: Ids) -> JobEtc:
    """The files jbl writes for the job's /etc: names (runner/identity.py) and resolvers
    (runner/network.py), with what the runtime's /etc holds (read without following links)."""
    runtime = read_runtime_etc(Path(req.runtime_dir), manifest)
    if runtime.kind == "other":
        return JobEtc(runtime_etc="other")
    user = (JobUser(ids.euid, ids.egid, userns=ids.userns) if ids.job_uid is None else
            JobUser(ids.job_uid, ids.job_gid if ids.job_gid is not None else ids.job_uid,
                    ids.job_groups))
    home = clean_job_path(req.workdir, "--workdir")
    files = passwd_group(runtime, user, home, host_getpwuid, host_getgrgid)
    files += resolver_files(req.network, req.job_id, runtime)
    return JobEtc(tuple(files), runtime.kind, frozenset(runtime.files))


# ---- running ------------------------------------------------------------------------------

def run_job(req: JobRequest, note: Callable[[str], None] | None = None,
            manifest: Manifest | None = None) -> JobResult:
    """Run ``req`` to its end. Setup failures raise JobError subclasses (one line). With
    ``req.gpus`` the GPUs are allocated first and held (their locks) until the job is gone."""
    if not req.gpus:
        return _run_job(req, note, manifest)
    from . import gpu

    alloc = gpu.allocate(Path(req.gpu_driver_root), gpu.discover(Path(req.gpu_driver_root)),
                         req.gpus, req.gpu_memory, req.job_id)
    try:
        return _run_job(req, note, manifest, gpu.grant(alloc))
    finally:
        alloc.release()


def _run_job(req: JobRequest, note: Callable[[str], None] | None, manifest: Manifest | None,
             gpu: GpuGrant | None = None) -> JobResult:
    pty = wants_pty(req.terminal)
    slirp = check_isolated(os.environ, os.geteuid()) if req.network == "isolated" else ""
    plan = prepare(req, manifest, pty, gpu, note)
    # a launcher's job process has a helper waiting in a cgroup made ahead (runner/warm.py);
    # one that does not fit (an isolated job's plan never does) is discarded, its cgroup too
    helper = warm.take_helper(plan, req.cgroup_parent)
    try:
        if helper is not None:
            cg = helper.cgroup
            try:
                cg.limit(plan.limits, plan.devices)
            except OSError:
                helper.discard()
                raise
        else:
            cg = JobCgroup.create(plan.job_id, plan.limits, plan.devices,
                                  parent=req.cgroup_parent)
    except OSError as e:
        raise CgroupError(f"create cgroup for {plan.job_id}: {e.strerror} ({e.filename})") from None
    try:
        if cg.unenforced:
            text = (f"limits not enforced: {', '.join(cg.unenforced)} ({cg.why})")
            if req.require_limits:
                raise LimitsNotEnforced(text, hint="run without --require-limits to accept")
            if note:
                note(text + "; running anyway")
        if plan.devices is not None and "devices" not in {*cg.dirs, *cg.unenforced} and note:
            # a user's GPU job (cgroup v1 is root's) or cgroup v2 (no device program): the job
            # still has only its own GPUs' nodes, but nothing refuses a node it might obtain
            why = "cgroup v2: no device program" if cg.version == 2 else cg.why or "no cgroup"
            note(f"GPU device allow-list not enforced ({why}); the job's /dev holds only its "
                 "own GPUs' nodes")
        if helper is not None:  # in its cgroup already
            return _run(req, plan.with_cgroup(()), cg, pty, slirp, helper)
        return _run(req, plan.with_cgroup(cg.procs_files), cg, pty, slirp)
    finally:
        if helper is not None and helper.sock.fileno() >= 0:
            helper.discard()  # refused before it was given its plan
        cg.remove()


def single_threaded() -> bool:
    """Is the calling thread this process's only one (kernel's count, C threads included)?"""
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


def _spawn_helper(plan: Plan, status_w: int, stdio: tuple[int, int, int],
                  keep: tuple[int, ...] = ()) -> int:
    """Start the sandbox helper with ``stdio`` as its fds 0, 1, 2; return its pid. The status
    pipe's write end stays ours to close; so do ``keep`` (fds the plan's steps name, which
    the helper keeps). Forked when we are single-threaded, else exec'd
    (docs/runner.md, "Start-up")."""
    if single_threaded():
        wire = plan.to_wire()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            try:
                _child_stdio(stdio)
            except BaseException as e:  # never run a job with the wrong (the caller's) fds
                why = e.strerror if isinstance(e, OSError) else repr(e)
                _sandbox_module.Sandbox(status_w, "").fail(f"set up stdio: {why}")
            _sandbox_module.run_forked(wire, status_w, parent)  # never returns
        return pid
    import subprocess  # only here: ~2 ms on every job otherwise

    plan_r, plan_w = os.pipe()
    try:
        given = [None if fd == n else fd for n, fd in enumerate(stdio)]  # None: inherit ours
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", SANDBOX, str(plan_r), str(status_w), str(os.getpid())],
            pass_fds=(plan_r, status_w, *keep), stdin=given[0], stdout=given[1],
            stderr=given[2])
        proc.returncode = 0  # reaped by _wait, not by Popen: keeps Popen.__del__ quiet
        os.close(plan_r)
        plan_r = -1
        with contextlib.suppress(BrokenPipeError), os.fdopen(plan_w, "wb") as fh:
            plan_w = -1  # the file object closes it
            fh.write(marshal.dumps(plan.to_wire()))  # died early: its status says why
    finally:
        for fd in (plan_r, plan_w):
            if fd >= 0:
                os.close(fd)
    return proc.pid


def _child_stdio(fds: tuple[int, int, int]) -> None:
    """In the forked helper, before anything else: make ``fds`` its 0, 1, 2 (through copies
    above 2 first, so no source is overwritten before it is used; the copies are closed by
    ``run_forked``)."""
    if fds == (0, 1, 2):
        return
    copies = []
    for fd in fds:
        try:
            copies.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3))
        except OSError as e:
            if e.errno != errno.EBADF:
                raise
            copies.append(-1)  # a caller's closed fd stays closed
    for target, fd in enumerate(copies):
        if fd >= 0:
            os.dup2(fd, target)


def _run(req: JobRequest, plan: Plan, cg: JobCgroup, pty: bool, slirp_exe: str = "",
         helper: warm.Helper | None = None) -> JobResult:
    """``slirp_exe``: --network isolated's slirp4netns (runner/network.py); ``helper``: one
    started ahead (runner/warm.py), given the plan instead of forking one."""
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, WAITED | TTY_STOPS)
    status_r, status_w = os.pipe()
    pid: int | None = None
    reaped = False
    start = time.monotonic()
    stdio: JobStdio | None = None
    net = (-1, -1)  # --network isolated: our end and the helper's of the socket NetReady uses
    slirp: Slirp | None = None
    try:
        if slirp_exe:
            import socket  # only isolated jobs pay for it

            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            net = (ours.detach(), theirs.detach())
            plan = plan.with_net_fd(net[1])
        if signal.sigpending() & TERMINATE:  # interrupted while preparing: do not start
            signal.sigtimedwait(TERMINATE, 0)  # consume it, or it fires when unblocked
            raise KeyboardInterrupt
        stdio = JobStdio.open(pty)
        if helper is not None:
            pid = helper.launch(plan, status_w, stdio.child_fds)
        else:
            pid = _spawn_helper(plan, status_w, stdio.child_fds, net[1:] if slirp_exe else ())
        os.close(status_w)
        status_w = -1
        if slirp_exe:
            os.close(net[1])  # the helper's now: EOF on ours when it is gone
            net = (net[0], -1)
            slirp = Slirp.start(slirp_exe, pid, net[0], req.slirp_host_loopback)
        stdio.started(WAITED)
        status, reason = _wait(pid, req, cg, start, stdio)
        reaped = True
        stdio.drain()
        wall = time.monotonic() - start
        message = _read_status(status_r)
        if message and status == ExitCode.JOB_SETUP:
            raise SandboxSetupError(message)
        # the status pipe closes at exec: a job's own exit 127 comes with no message
        if message and status == ExitCode.COMMAND_NOT_FOUND:
            raise CommandNotFound(message)
        if message and status == ExitCode.COMMAND_NOT_EXECUTABLE:
            raise CommandNotExecutable(message)
        peak = cg.peak_memory()
        label = req.runtime_label or str(req.runtime_dir)
        base = dict(job_id=plan.job_id, runtime=label, job_status=status, wall_time=wall,
                    peak_memory=peak, unenforced=tuple(cg.unenforced),
                    cpu_time=cg.cpu_time())
        if reason == "timeout":
            return JobResult(exit_status=ExitCode.JOB_TIMEOUT, reason="timeout",
                             message=f"job {plan.job_id} timed out after "
                                     f"{format_duration(req.timeout or 0)} and was killed",
                             **base)  # type: ignore[arg-type]
        if status >= 128 and cg.oom_kills() > 0:
            limit = format_size(plan.limits.memory) if plan.limits.memory else "?"
            return JobResult(exit_status=ExitCode.JOB_OOM, reason="oom",
                             message=f"job {plan.job_id} was killed: out of memory "
                                     f"(limit {limit})", **base)  # type: ignore[arg-type]
        if reason is None:
            reason = "signaled" if status > 128 else "exited"
        return JobResult(exit_status=status, reason=reason, **base)  # type: ignore[arg-type]
    finally:
        if pid is not None and not reaped:
            cg.kill()
            _kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        if slirp is not None:
            slirp.stop()  # after the job: it never outlives it
        for fd in (status_r, status_w, *net):
            if fd >= 0:
                os.close(fd)
        if stdio is not None:
            stdio.close()  # the caller's terminal back as it was, also after an error
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def _wait(pid: int, req: JobRequest, cg: JobCgroup, start: float,
          stdio: JobStdio) -> tuple[int, str | None]:
    """Wait for the helper; relay stdio; forward signals; enforce the timeout. Returns
    (status, reason)."""
    deadline = start + req.timeout if req.timeout else None
    kill_at: float | None = None
    reason: str | None = None
    while True:
        done, wstatus = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(wstatus)
            return (code if code >= 0 else 128 - code), reason
        now = time.monotonic()
        if kill_at is not None and now >= kill_at:
            cg.kill()
            _kill(pid, signal.SIGKILL)  # without a cgroup: init dies with it, and its PID ns
            kill_at = now + 3600
        if deadline is not None and now >= deadline and reason != "timeout":
            reason, deadline = "timeout", None
            _kill(pid, signal.SIGTERM)
            kill_at = min(kill_at or now + req.kill_after, now + req.kill_after)
        waits = [t - now for t in (deadline, kill_at) if t is not None]
        timeout = max(0.0, min(waits)) if waits else None
        if stdio.pumps:
            stdio.wait(timeout)  # relays until a signal is pending (or the timeout)
            info = signal.sigtimedwait(WAITED, 0)
        else:
            info = (signal.sigtimedwait(WAITED, timeout) if timeout is not None
                    else signal.sigwaitinfo(WAITED))
        if info is None or info.si_signo == signal.SIGCHLD or echo(info):
            continue  # (echo: one signal to jbl run's whole group, twice: foreground.py)
        sig = signal.Signals(info.si_signo)
        if sig == signal.SIGWINCH and stdio.pty:
            stdio.window_changed()  # the kernel signals the job's foreground group itself
            continue
        if sig == signal.SIGHUP and stdio.detach():
            continue  # the caller left (its terminal closed): the job runs on, detached
        if sig in TERMINATE:
            reason = reason or "interrupted"
            now = time.monotonic()
            kill_at = now if kill_at is not None else now + req.kill_after
        _kill(pid, sig)  # the job is in its own session: nothing reached it but this


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _read_status(fd: int) -> str:
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
    try:
        data = os.read(fd, 1 << 16)
    except BlockingIOError:
        return ""
    return data.decode("utf-8", "replace").strip().splitlines()[-1] if data.strip() else ""
