"""``jbl run``: parse the job's options into a ``JobRequest``, find the runtime, run, report.

Values are taken as strings and checked here (sizes and durations only through
``jbl.store.units``), so a malformed option is one ``UsageError`` line and exit 2. The runtime
comes from the store (``Store.resolve_installed`` + ``view_started``: a view daemon this job
starts comes up while the job is made ready; a launcher's job process has the index open and
the view found ahead, runner/warmview.py), or, bypassing the store, from ``--runtime-dir``
(hidden; for tests and benchmarks). The exit status is the job's
(128+N for a signal; 124 timeout; 138 out of memory); ``--json`` adds a final record.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from jbl.store.errors import UsageError
from jbl.store.settings import Settings

CORES_RE = re.compile(r"\d+(-\d+)?(,\d+(-\d+)?)*")  # fullmatch: `$` allows a final newline


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "run", parents=parents, help="run a command in a runtime, isolated and limited",
        description="Run CMD in its own namespaces with the runtime read-only as its root.",
        usage="jbl run --runtime NAME[@VERSION] [options] [--] CMD [ARGS...]")
    p.add_argument("--runtime", metavar="NAME[@VERSION]",
                   help="installed runtime; no version or @latest = highest release, "
                        "@1.3 = highest 1.3.x")
    p.add_argument("--runtime-dir", metavar="DIR", help=argparse.SUPPRESS)
    g = p.add_argument_group("limits")
    g.add_argument("--memory", metavar="SIZE",
                   help="memory limit: a bare number is MiB (as in Joblet), or 512M, 2G")
    g.add_argument("--cpu", metavar="PERCENT", help="CPU limit in percent (100 = one core)")
    g.add_argument("--cpu-cores", metavar="LIST", help="run only on these cores, e.g. 0-1,3")
    g.add_argument("--pids", metavar="N", help="at most N processes/threads")
    g.add_argument("--timeout", metavar="DURATION", help="kill the job after e.g. 90s, 10m, 2h")
    g.add_argument("--kill-after", metavar="DURATION", default="5s",
                   help="grace between SIGTERM and SIGKILL on timeout/interrupt (default 5s)")
    g.add_argument("--require-limits", action="store_true",
                   help="fail instead of warning when a limit cannot be enforced "
                        "(env JBL_REQUIRE_LIMITS=1)")
    j = p.add_argument_group("job")
    j.add_argument("--network", metavar="none|isolated|host", default="none",
                   help="none (default: loopback only), isolated (own network namespace, "
                        "outbound through slirp4netns) or host")
    j.add_argument("--upload", metavar="PATH", action="append", default=[],
                   help="copy a file or directory into the work directory (repeatable)")
    j.add_argument("--workdir", metavar="DIR", default="/work",
                   help="working directory inside the job (default /work)")
    j.add_argument("-e", "--env", metavar="K=V", action="append", default=[],
                   help="environment variable, on top of runtime.yml's (repeatable)")
    j.add_argument("--volume", metavar="HOST:JOB[:ro]|NAME", action="append", default=[],
                   help="share a host directory with the job, or mount your named volume "
                        "NAME at /volumes/NAME (jbl volume create NAME) (repeatable)")
    from jbl.cli import job_options

    job_options.add_options(g, j)
    j.add_argument("--user", metavar="NAME", help="run the job as this user (root only)")
    gp = p.add_argument_group("GPUs (see jbl gpu list)")
    gp.add_argument("--gpu", metavar="N", help="give the job N whole NVIDIA GPUs of its own")
    gp.add_argument("--gpu-memory", metavar="SIZE",
                    help="only GPUs with at least this much memory (16G, 16GB; a bare "
                         "number is MiB)")
    t = j.add_mutually_exclusive_group()
    t.add_argument("--tty", dest="terminal", action="store_const", const="tty",
                   help="give the job a fresh pseudo-terminal (default when stdin and stdout "
                        "are terminals)")
    t.add_argument("--no-tty", dest="terminal", action="store_const", const="pipes",
                   help="no pseudo-terminal: stdout and stderr stay apart")
    p.set_defaults(terminal="auto")
    j.add_argument("-d", "--detach", action="store_true",
                   help="print the job id and return at once; the job runs on in the "
                        "background (jbl job list/log/stop), its output in its log")
    j.add_argument("--log-limit", metavar="SIZE",
                   help="a detached job's log keeps at most this much output, oldest "
                        "dropped first (default 16M)")
    from jbl.cli.joblet_cmd import refuse_joblet_flags

    refuse_joblet_flags(p)  # --schedule, --node, …: one line saying so, never the command
    # Everything from the first word that is not an option on is the command (options after
    # it included), so `--` is optional, as in Joblet: `jbl run --runtime=X python s.py -v`.
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD [ARGS...]")
    p.set_defaults(func=run, exit_now=True)  # nothing left to clean up after run(): cli/main


# ---- option parsing (each a one-line UsageError) ------------------------------------------

def parse_limits(args: argparse.Namespace, volumes: tuple[Any, ...] = (),
                 workdir: str = "/work") -> Any:
    from jbl.cli import job_options as jo
    from jbl.runner.plan import Limits

    if args.cpu_cores is not None:
        check_cores(args.cpu_cores)
    iobps = jo.iobps(args.max_iobps)
    devices = jo.io_devices(volumes, workdir)[0] if iobps is not None else ()
    return Limits(memory=jo.memory(args), cpu_percent=jo.cpu_percent(args),
                  cpu_cores=args.cpu_cores, pids=jo.pids(args.pids), iobps=iobps,
                  io_devices=devices)


def _core_list(cores: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"`` (the kernel's cpuset list format)."""
    runs: list[list[int]] = []
    for c in sorted(cores):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def check_cores(text: str) -> None:
    """``--cpu-cores``: well-formed, and only cores this process may run on (the kernel
    would refuse the others with ERANGE, long after the options were read)."""
    if not CORES_RE.fullmatch(text):
        raise UsageError(f"invalid --cpu-cores {text!r}: expected a list like 0-1,3")
    have = os.sched_getaffinity(0)
    asked: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        first, last = int(lo), int(hi or lo)
        if first > last:
            raise UsageError(f"invalid --cpu-cores {text!r}: {part} runs backwards")
        if last - first > 65536:
            raise UsageError(f"invalid --cpu-cores {text!r}: {part} is no machine's cores")
        asked.update(range(first, last + 1))
    missing = sorted(asked - have)
    if missing:
        raise UsageError(f"invalid --cpu-cores {text!r}: no such core {_core_list(missing)}; "
                         f"the cores here are {_core_list(sorted(have))}")


def parse_volumes(items: list[str], settings: Settings,
                  stack: ExitStack | None = None) -> tuple[Any, ...]:
    from jbl.cli.job_options import named_volume
    from jbl.runner.plan import Volume, clean_job_path

    out = []
    for item in items:
        named = named_volume(item, stack, settings)
        if named is not None:
            out.append(named)
            continue
        parts = item.split(":")
        mode = "rw"
        if len(parts) == 3 and parts[2] in ("ro", "rw"):
            mode = parts.pop()
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise UsageError(f"invalid --volume {item!r}: expected HOST:JOB[:ro]")
        host = Path(os.path.realpath(parts[0]))
        if not host.exists():
            raise UsageError(f"invalid --volume {item!r}: {parts[0]}: no such file or directory")
        out.append(Volume(host, clean_job_path(parts[1], "--volume target"), mode == "ro"))
    return tuple(out)


def build_request(args: argparse.Namespace, runtime_dir: Path, label: str,
                  stack: ExitStack | None = None) -> Any:
    """The job request; named volumes are held through ``stack`` (the job's lifetime)."""
    from jbl.cli import job_options as jo
    from jbl.runner import warm
    from jbl.runner.plan import JobRequest, clean_job_path
    from jbl.store.units import parse_duration

    # the id a launcher's job process prepared its cgroup for (runner/warm.py), if any
    job_id: Any = getattr(args, "job_id", None) or warm.job_id()
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise UsageError("no command given: jbl run --runtime NAME -- CMD [ARGS...]")
    if args.network not in ("none", "isolated", "host"):
        raise UsageError(f"invalid --network {args.network!r}: expected none, isolated or host")
    timeout = None
    if args.timeout is not None:
        timeout = parse_duration(args.timeout, what="--timeout")
        if timeout <= 0:
            raise UsageError(f"invalid --timeout {args.timeout!r}: must be greater than 0")
    kill_after = parse_duration(args.kill_after, what="--kill-after")
    if args.user is not None and os.geteuid() != 0:
        raise UsageError("--user needs root (without it, jobs run as you)")
    env = jo.env(args.env)
    workdir = clean_job_path(args.workdir, "--workdir")
    volumes = parse_volumes(args.volume, args.settings, stack)
    return JobRequest(
        runtime_dir=runtime_dir, argv=tuple(cmd), env=env,
        secret_env=jo.secret_env(args.secret_env, env, args.settings.env),
        workdir=workdir, network=args.network, uploads=jo.uploads(args.upload),
        upload_dirs=jo.upload_dirs(args.upload_dir), volumes=volumes,
        limits=parse_limits(args, volumes, workdir), timeout=timeout, kill_after=kill_after,
        user=args.user,
        require_limits=args.require_limits or args.settings.require_limits,
        # test-only: an isolated job may reach the host's loopback (runner/network.py)
        slirp_host_loopback=args.settings.slirp_host_loopback,
        cgroup_parent=args.settings.cgroup_parent,
        runtime_label=label, terminal=args.terminal, **parse_gpu(args),
        **({"job_id": job_id} if job_id else {}))


def parse_gpu(args: argparse.Namespace) -> dict[str, Any]:
    """``--gpu``/``--gpu-memory`` and the (test-only) driver root, for ``JobRequest``."""
    if args.gpu is None:
        if args.gpu_memory is not None:
            raise UsageError("--gpu-memory needs --gpu=N (how many GPUs)")
        return {}
    try:
        count = int(args.gpu)
    except ValueError:
        raise UsageError(f"invalid --gpu {args.gpu!r}: expected a number of GPUs") from None
    if count < 0:
        raise UsageError(f"invalid --gpu {args.gpu!r}: must be 0 or more")
    memory = None
    if args.gpu_memory is not None:
        from jbl.store.units import parse_size

        text = args.gpu_memory.strip()
        memory = parse_size(text + "M" if text.isdigit() else text, what="--gpu-memory")
        if memory <= 0:
            raise UsageError(f"invalid --gpu-memory {args.gpu_memory!r}: must be more than 0")
    if count == 0:
        return {}
    from jbl.runner.gpu import resolve_driver_root

    root = resolve_driver_root(args.settings)
    return {"gpus": count, "gpu_memory": memory, "gpu_driver_root": str(root)}


# ---- the command --------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    from jbl.runner.foreground import TERMINATE  # the supervisor's (not imported yet: below)

    if bool(args.runtime) == bool(args.runtime_dir):
        raise UsageError("jbl run needs --runtime NAME[@VERSION]")
    if getattr(args, "detach", False):
        from jbl.cli.job_cmd import launch_detached

        return launch_detached(args)
    from jbl.cli.job_cmd import JobRecord, split_foreground

    front = split_foreground(args)  # with a terminal: the caller may leave the job
    if front is not None:
        return front

    # Block job-control signals before any helper thread (a private FUSE mount) starts, so
    # only the supervisor's sigtimedwait takes them; run_job forwards them to the job.
    old = signal.pthread_sigmask(signal.SIG_BLOCK, TERMINATE)
    manifest = view = None
    try:
        with ExitStack() as stack:
            if args.runtime_dir:
                from jbl.runner.manifests import load_manifest

                runtime_dir = Path(args.runtime_dir)
                build_request(args, runtime_dir, "", stack)  # options first: one line, exit 2
                manifest = load_manifest(Path(os.path.realpath(runtime_dir)))
                label = f"{manifest.name}@{manifest.version}"
            else:
                from jbl.fusefs.broker import view_started
                from jbl.store.store import Store

                build_request(args, Path("."), "", stack)
                from jbl.store.access import can_admin

                # A job is a gc root (a lease row) when its user may write the index; an
                # ordinary user's job is covered by the shared mount's own lease instead.
                writable = can_admin(args.store) and os.access(
                    Path(args.store) / "index.db", os.W_OK)
                # a launcher's job process opened the index and found the view ahead
                from jbl.runner import warm, warmview

                opened, known = warmview.take(warm.take_runtime(),
                                              Path(os.path.realpath(args.store)))
                if opened is not None and not writable:
                    opened.close()
                    opened = None
                if writable:
                    store = stack.enter_context(opened if opened is not None else Store.open(
                        args.store, action=args.settings.action))
                    info = store.resolve_installed(args.runtime)
                    stack.enter_context(store.lease(info.id, kind="job"))
                    name, version = info.name, info.version
                else:  # ordinary users never open the index: its published summary names it
                    from jbl.store.snapshot import load as load_summary

                    found = load_summary(args.store).resolve(args.runtime)
                    name, version = found["name"], found["version"]
                # a private view keeps a removed version no longer than configured
                hold = args.settings.config.removed_hold_limit  # malformed: one line, exit 2
                # a daemon this job starts comes up while the job is made ready (view.ready)
                view = stack.enter_context(view_started(
                    args.store, hold_limit=hold, engine=args.settings.mount_engine,
                    linger=args.settings.view_linger, known=known))
                runtime_dir = view.root / name / version
                label = f"{name}@{version}"
            # the runner, imported once a view's daemon this job started is on its way up
            from jbl.runner.supervise import run_job

            req = build_request(args, runtime_dir, label, stack)
            quiet = bool(getattr(args, "quiet", False))
            if req.limits.iobps is not None and not quiet:
                from jbl.cli.job_options import io_devices

                _note(io_devices(req.volumes, req.workdir)[1])
            # A record that cannot be kept (e.g. a system user without a home) is said once,
            # after the job ran: a job refused before it starts stays one error line.
            unrecorded: list[str] = []
            record = JobRecord.start(req, unrecorded.append, args=args)
            if record is not None:
                record.note = None if quiet else _note
            try:
                if view is not None:
                    view.ready()  # MountError: the job failed to start
                result = run_job(req, note=None if quiet else _note, manifest=manifest)
            except BaseException as e:
                if record is not None:
                    record.failed(e)
                raise
            if record is not None:
                record.finished(result)
            elif unrecorded and not quiet:
                _note(unrecorded[0])
            _report(args, result, label)  # before the lease, view and store are let go
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return int(result.exit_status)


def _report(args: argparse.Namespace, result: Any, label: str) -> None:
    """The job's end as the caller sees it: its message, ``--json``, and (a launcher's job
    process) its exit status to the client at once, ahead of this process's teardown."""
    from jbl.runner import warm

    if result.message:
        print(f"jbl: {result.message}", file=sys.stderr)
    if args.json:
        from jbl.cli.output import print_json

        rec = result.record()
        rec["version"] = label.rpartition("@")[2]
        print_json(rec)
    sys.stdout.flush()
    warm.report_exit(result.exit_status)


def resolve_label(args: argparse.Namespace) -> str:
    """``name@version`` that ``args.runtime`` names now (or ``--runtime-dir``'s manifest),
    without holding anything: ``jbl run --detach`` fixes the version before it forks."""
    if args.runtime_dir:
        from jbl.runner.supervise import load_manifest

        manifest = load_manifest(Path(os.path.realpath(args.runtime_dir)))
        return f"{manifest.name}@{manifest.version}"
    from jbl.store.access import can_admin

    if can_admin(args.store) and os.access(Path(args.store) / "index.db", os.W_OK):
        from jbl.store.store import Store

        with Store.open(args.store) as store:
            info = store.resolve_installed(args.runtime)
            return f"{info.name}@{info.version}"
    from jbl.store.snapshot import load as load_summary

    found = load_summary(args.store).resolve(args.runtime)
    return f"{found['name']}@{found['version']}"


def _note(text: str) -> None:
    print(f"jbl: note: {text}", file=sys.stderr)
