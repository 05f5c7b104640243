"""``jbl job list|status|log|stop|rm|prune`` and the two ends of ``jbl run`` that touch job
records: ``JobRecord`` (begin/finish, used by ``run_cmd.run``) and ``launch_detached``
(``jbl run --detach``).

The records are the caller's own (``runner/jobstore.py``); root's ``--all`` adds every other
user's, read-only.
"""

from __future__ import annotations

import json
import os
import pwd
import select
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from jbl.store.errors import ExitCode, JblError, PermissionDenied, UsageError

TYPE_CHECKING = False  # list/status/log start light: cli/job_light.py
if TYPE_CHECKING:
    import argparse
    from typing import Any

FOLLOW_POLL = 0.1  # s between looks at the database while following a live log
STOP_SLACK = 10.0  # s beyond the job's grace that `job stop` waits for the end


def jobs_dir(args: argparse.Namespace) -> Path | None:
    """``JBL_JOBS_DIR`` when it applies (``jobstore.chosen_dir``), else None: the caller's
    state directory (``jobstore.state_dir``)."""
    from jbl.runner.jobstore import chosen_dir

    return chosen_dir(args.settings.var("JBL_JOBS_DIR"))


# ---- recording jbl run ---------------------------------------------------------------------

class JobRecord:
    """The record of one ``jbl run`` job, written by its supervisor."""

    @classmethod
    def start(cls, req: Any, note: Any = None, detached: bool = False,
              args: argparse.Namespace | None = None) -> JobRecord | None:
        """Insert (or, detached, complete) the record of ``req`` (in ``jobs_dir(args)``); a
        foreground job whose record cannot be written runs anyway, with a note."""
        import apsw
        from jbl.runner import warm
        from jbl.runner.jobstore import JobStore, process_start

        try:
            d = jobs_dir(args) if args is not None else None
            # a launcher's job process opened it ahead (runner/warm.py)
            store = warm.take_records(d) or JobStore.open_own(d)
            assert store is not None
            store.begin(describe(req) | {"supervisor_pid": os.getpid(),
                                         "supervisor_start": process_start(os.getpid()) or 0,
                                         "detached": detached})
        except (JblError, apsw.Error) as e:
            if detached:
                raise
            if note is not None:
                note(f"job {req.job_id} is not recorded: {e}")
            return None
        return cls(store, req.job_id, note)

    def __init__(self, store: Any, job_id: str, note: Any = None) -> None:
        self.store = store
        self.job_id = job_id
        self.note = note
        self.rusage0 = _children_cpu()

    def finished(self, result: Any) -> None:
        cpu = getattr(result, "cpu_time", None)  # the cgroup's; without one, rusage's
        self._finish(exit_status=int(result.exit_status), reason=result.reason,
                     message=result.message, peak_memory=result.peak_memory,
                     cpu_time=cpu if cpu is not None else _children_cpu() - self.rusage0)

    def failed(self, e: BaseException) -> None:
        if isinstance(e, JblError):
            code, reason, message = int(e.exit_code), "setup", str(e)
        elif isinstance(e, KeyboardInterrupt):
            code, reason, message = int(ExitCode.INTERRUPTED), "interrupted", "interrupted"
        else:
            code, reason, message = 1, "error", f"{type(e).__name__}: {e}"
        self._finish(exit_status=code, reason=reason, message=message)

    def _finish(self, **fields: Any) -> None:
        """The end, recorded; a record that cannot be written never changes the job's exit
        status (a note says so; ``jbl job list`` then shows the job as lost)."""
        import apsw

        try:
            self.store.finish(self.job_id, **fields)
        except (JblError, apsw.Error) as e:
            if self.note is not None:
                self.note(f"the end of job {self.job_id} is not recorded: {e}")
        finally:
            from jbl.runner import warm

            if not warm.fast_exit():  # a launcher's job process leaves it to os._exit
                self.store.close()


def describe(req: Any) -> dict[str, Any]:
    """What a record says of a request: secret values are replaced, never stored."""
    import dataclasses

    limits = {k: v for k, v in dataclasses.asdict(req.limits).items()
              if v not in (None, (), [])}
    env = dict(req.env)
    env.update({k: "***" for k, _ in req.secret_env})
    if req.timeout is not None:
        limits["timeout"] = req.timeout
    limits["kill_after"] = req.kill_after
    return {"id": req.job_id, "runtime": req.runtime_label or str(req.runtime_dir),
            "command": list(req.argv), "limits": json.loads(json.dumps(limits, default=str)),
            "env": env}


def _children_cpu() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return float(ru.ru_utime + ru.ru_stime)


def log_limit(args: argparse.Namespace) -> int:
    """``--log-limit`` in bytes (default ``jobstore.LOG_LIMIT``)."""
    from jbl.runner.jobstore import LOG_LIMIT
    from jbl.store.units import parse_size

    if args.log_limit is None:
        return LOG_LIMIT
    limit = parse_size(args.log_limit, what="--log-limit")
    if limit <= 0:
        raise UsageError(f"invalid --log-limit {args.log_limit!r}: must be more than 0")
    return limit


def split_foreground(args: argparse.Namespace) -> int | None:
    """A foreground ``jbl run`` with a terminal: fork its supervisor behind a front process
    (``runner/foreground.py``) so that the caller can leave the job. None in the supervisor
    (and when there is no terminal: nothing to leave); the exit status in the front."""
    from jbl.runner import foreground
    from jbl.runner.plan import new_job_id

    if not foreground.can_leave():
        return None
    limit = log_limit(args)  # a bad --log-limit: one line, before anything runs
    try:
        directory = jobs_dir(args)
    except JblError:
        return None  # no records: nothing to leave to (the job runs, with a note)
    args.job_id = getattr(args, "job_id", None) or new_job_id()
    return foreground.split(args.job_id, directory, limit, as_json=bool(args.json))


def launch_detached(args: argparse.Namespace) -> int:
    """``jbl run --detach``: check the options and resolve the runtime here (a mistake is one
    line and its exit code, as in the foreground), record the job, fork its supervisor into a
    session of its own, print the id and return."""
    import dataclasses

    from jbl.cli import run_cmd
    from jbl.runner import detach
    from jbl.runner.jobstore import JobStore, process_start
    from jbl.runner.plan import new_job_id

    limit = log_limit(args)
    if args.terminal == "tty":
        raise UsageError("--detach and --tty exclude each other: a detached job has no "
                         "terminal (its output goes to its log)")
    with ExitStack() as stack:
        req = run_cmd.build_request(args, Path("."), "", stack)  # options: one line, exit 2
    label = run_cmd.resolve_label(args)
    args.job_id = new_job_id()
    req = dataclasses.replace(req, job_id=args.job_id, runtime_label=label)
    directory = _checked_dir(args)  # no connection open across the fork: SQLite forbids it
    if not args.runtime_dir:
        args.runtime = label  # the version resolved now, whatever is installed meanwhile
    as_json = bool(args.json)
    args.detach, args.terminal, args.json = False, "pipes", False

    def supervise() -> int:
        try:
            return int(run_cmd.run(args))
        except JblError as e:
            message, code = f"jbl: error: {e}", int(e.exit_code)
        except Exception as e:
            message, code = f"jbl: internal error: {type(e).__name__}: {e}", 1
        print(message, file=sys.stderr)  # into the job's log
        again = JobStore.open_own(directory)  # a failure before the job had its record
        assert again is not None
        again.finish(args.job_id, exit_status=code, reason="setup", message=message)
        again.close()
        return code

    pid, go = detach.spawn(args.job_id, directory, limit, supervise)
    store = JobStore.open_own(directory)
    assert store is not None
    try:
        store.begin(describe(req) | {"supervisor_pid": pid, "detached": True,
                                     "supervisor_start": process_start(pid) or 0})
    finally:
        store.close()
    detach.release(go)
    if as_json:
        from jbl.cli.output import print_json

        print_json({"job_id": args.job_id, "runtime": label})
    else:
        print(args.job_id)
    return 0


# ---- the commands --------------------------------------------------------------------------



def _stores(args: argparse.Namespace) -> list[Any]:
    """The caller's store, and with ``--all`` as root every user's, read-only (a caller who
    is not root gets the others' from the admin service: ``_admin``)."""
    from jbl.runner.jobstore import JobStore

    if getattr(args, "all", False) and os.geteuid() == 0:
        from jbl.runner.jobadmin import every_store

        return every_store(jobs_dir(args))
    own = JobStore.open_own(jobs_dir(args), create=False)
    return [own] if own is not None else []


def _admin(req: dict[str, Any]) -> dict[str, Any]:
    """Root's jobs admin service's answer (runner/jobadmin.py), for a caller who is not
    root asking about other users' jobs."""
    from jbl.runner import jobadmin

    return jobadmin.ask(req)


def _own_or_missing(args: argparse.Namespace, job: str) -> Any:
    from jbl.runner.jobstore import JobStore
    from jbl.store.errors import NotFound

    store = JobStore.open_own(jobs_dir(args), create=False)
    if store is None:
        raise NotFound(f"no job {job}: you have no job records yet",
                       hint="jbl run --detach … starts one")
    return store


def _own_or_other(args: argparse.Namespace, op: str, **req: Any) -> tuple[Any, Any]:
    """(the caller's store holding job ``args.id``, None) or, for a caller who is not root
    and has no such job, (None, the admin service's answer to ``op``) when the service
    answers for them; else the caller's own "no job" error."""
    from jbl.runner import jobadmin
    from jbl.store.errors import NotFound

    store = None
    try:
        store = _own_or_missing(args, args.id)
        store.get(args.id)
        return store, None
    except NotFound as e:
        if store is not None:
            store.close()
        if os.geteuid() == 0:
            raise
        missing = e
    try:
        return None, _admin({"op": op, "id": args.id} | req)
    except jobadmin.AdminServiceDown:
        if _in_admin_group():
            raise  # how to start it
        raise missing from None
    except jobadmin.Answered as e:
        if e.refused or e.exit_code == ExitCode.NOT_FOUND:
            raise missing from None  # to anyone else, another user's job does not exist
        raise


def _in_admin_group() -> bool:
    """Is the caller in the configured admin group (store/access.py), in this session or in
    the group database?"""
    import grp

    from jbl.store.access import configured_group

    try:
        g = grp.getgrnam(configured_group())
    except KeyError:
        return False
    return g.gr_gid in os.getgroups() or pwd.getpwuid(os.geteuid()).pw_name in g.gr_mem


def cmd_serve_admin(args: argparse.Namespace) -> int:
    """``jbl job serve-admin``: root's jobs admin service (runner/jobadmin.py)."""
    import grp

    from jbl.runner import jobadmin
    from jbl.store.access import configured_group

    if os.geteuid() != 0:
        raise PermissionDenied("only root runs the jobs admin service",
                               hint=f"root: systemctl start {jobadmin.UNIT}")
    group = args.group or configured_group()
    try:
        grp.getgrnam(group)
    except KeyError:
        raise UsageError(f"no group {group}", hint="jbl setup --system makes it, or --group "
                         "NAME") from None
    print(f"jbl: jobs admin service for root and group {group} on {jobadmin.SOCKET}",
          file=sys.stderr, flush=True)
    jobadmin.serve(group, jobs_dir(args))
    return 0


def _checked_dir(args: argparse.Namespace) -> Path:
    """The caller's job directory, made and checked (a connection opened and closed)."""
    from jbl.runner.jobstore import JobStore

    store = JobStore.open_own(jobs_dir(args))
    assert store is not None
    store.close()
    return store.where


def _when(t: float | None) -> str:
    return "" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def cmd_list(args: argparse.Namespace) -> int:
    from jbl.runner.jobstore import format_table

    every = bool(getattr(args, "all", False))
    others = None  # a caller who is not root: the other users' jobs, from the admin service
    if every and os.geteuid() != 0:
        others = _admin({"op": "list", "state": args.state, "table": not args.json})
    stores = _stores(args)
    try:
        if others is None and len(stores) == 1:
            text = (stores[0].json_text(args.state) if args.json
                    else stores[0].table_text(args.state, user=every))
        elif args.json:
            rows = [r for store in stores for r in store.jobs(args.state)]
            rows += others["jobs"] if others else []
            rows.sort(key=lambda r: r["created"])
            text = json.dumps(rows)
        else:
            lines = [r for store in stores for r in store.table(args.state)]
            lines += [tuple(r) for r in others["table"]] if others else []
            lines.sort(key=lambda r: r[-1])
            text = format_table(lines, user=every)
    finally:
        for store in stores:
            store.close()
    if args.json:
        sys.stdout.write(text + "\n")
    else:
        sys.stdout.write(text or ("" if getattr(args, "quiet", False) else "no jobs\n"))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from jbl.cli.output import print_json
    from jbl.runner.jobstore import CONTROL

    store, remote = _own_or_other(args, "status")
    if store is not None:
        try:
            rec = store.get(args.id)
        finally:
            store.close()
    else:
        rec = remote["record"]
    for k in ("supervisor_start", "logger_pid", "logger_start"):
        rec.pop(k, None)
    if args.json:
        print_json(rec)
        return 0
    for k, v in rec.items():
        if k in ("created", "ended"):
            v = _when(v)
        elif isinstance(v, list | dict):
            v = json.dumps(v)
        print(f"{k}: {'' if v is None else CONTROL.sub('?', str(v))}")
    return 0


def cmd_log(args: argparse.Namespace) -> int:
    from jbl.runner.jobstore import logger_alive

    if args.tail is not None and args.tail < 0:
        raise UsageError(f"invalid --tail {args.tail}: must be 0 or more")
    store, remote = _own_or_other(args, "log", tail=args.tail)
    if store is None:
        return _remote_log(args, remote)
    try:
        rec = store.get(args.id)
        if not _log_kept(rec):
            return 0
        after = store.last_seqs(rec["id"], args.tail) if args.tail is not None else 0
        while True:
            after = _print_log(args, store.iter_chunks(rec["id"], after), after)
            if not args.follow:
                return 0
            done = store.get(rec["id"])
            if done["state"] != "running" and not logger_alive(done):
                _print_log(args, store.iter_chunks(rec["id"], after), after)  # meanwhile
                return 0
            select.select([], [], [], FOLLOW_POLL)  # sqlite has no change event across
    finally:
        store.close()


def _log_kept(rec: dict[str, Any]) -> bool:
    """Is there a log to print (a detached job's)? Says why not, and what was dropped."""
    if not rec["detached"]:
        print(f"jbl: job {rec['id']} ran in the foreground and was not left: its output "
              "went to its terminal (a job's log starts when it is detached: jbl run -d, "
              "or Ctrl-P Ctrl-Q / SIGHUP)", file=sys.stderr)
        return False
    if rec["log_dropped"]:
        print(f"jbl: [{rec['log_dropped']} bytes of older output dropped: --log-limit]",
              file=sys.stderr)
    return True


def _remote_log(args: argparse.Namespace, reply: dict[str, Any]) -> int:
    """``job log`` of another user's job, page by page from the admin service (which reads
    the user's database as it was last checkpointed: the newest output may come late)."""
    import base64

    from jbl.runner.jobstore import Chunk

    if not _log_kept(reply["record"]):
        return 0
    job, after = reply["record"]["id"], 0
    while True:
        chunks = [Chunk(int(q), int(st), float(ts), base64.b64decode(d))
                  for q, st, ts, d in reply["chunks"]]
        after = _print_log(args, iter(chunks), after)
        if not reply["more"] and not (args.follow and reply["live"]):
            return 0
        if not reply["more"]:
            select.select([], [], [], FOLLOW_POLL * 5)
        reply = _admin({"op": "log", "id": job, "after": after})


def _print_log(args: argparse.Namespace, chunks: Any, after: int) -> int:
    """Print ``chunks`` (those after seq ``after``); the last seq printed. A jump in seq
    means the log's bound dropped chunks before this reader got to them (a follower that
    fell behind): a marker says how many, where they were."""
    for c in chunks:
        if after and c.seq != after + 1:
            missed = c.seq - after - 1
            if args.json:
                sys.stdout.write(json.dumps({"dropped_chunks": missed,
                                             "before_seq": c.seq}) + "\n")
            else:
                sys.stdout.flush()
                print(f"jbl: [{missed} chunks of output dropped here: --log-limit]",
                      file=sys.stderr, flush=True)
        _emit_chunk(args, c)
        after = c.seq
    return after


def _emit_chunk(args: argparse.Namespace, c: Any) -> None:
    if args.json:
        sys.stdout.write(json.dumps({"seq": c.seq, "stream": "stdout" if c.stream == 1
                                     else "stderr", "ts": c.ts,
                                     "data": c.data.decode("utf-8", "replace")}) + "\n")
        sys.stdout.flush()
        return
    out = sys.stdout if c.stream == 1 else sys.stderr
    out.flush()
    out.buffer.write(c.data)
    out.buffer.flush()


def cmd_stop(args: argparse.Namespace) -> int:
    from jbl.runner.jobstore import not_signalled, stop_job

    store, remote = _own_or_other(args, "stop")
    if store is not None:
        try:
            rec = store.get(args.id)
            if rec["state"] == "running":
                if not stop_job(rec, owner=store.owner, slack=STOP_SLACK):
                    rec = store.get(rec["id"])
                    if rec["state"] == "running":
                        raise PermissionDenied(not_signalled(rec))
                rec = store.get(rec["id"])
            else:
                print(f"job {rec['id']} is not running ({rec['state']})")
                return 0
        finally:
            store.close()
    else:
        rec = remote["record"]
    if args.json:
        from jbl.cli.output import print_json

        print_json({"id": rec["id"], "state": rec["state"], "exit_status": rec["exit_status"],
                    "reason": rec["reason"]})
    else:
        print(f"stopped {rec['id']} ({rec['state']}, exit {rec['exit_status']})")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    store = _own_or_missing(args, args.id)
    try:
        rec = store.get(args.id)
        if rec["state"] == "running":
            raise UsageError(f"job {rec['id']} is running", hint=f"jbl job stop {rec['id']}")
        store.remove(rec["id"])
    finally:
        store.close()
    if args.json:
        from jbl.cli.output import print_json

        print_json({"removed": [rec["id"]]})
    else:
        print(f"removed {rec['id']}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from jbl.runner.jobstore import JobStore
    from jbl.store.units import parse_duration

    age = parse_duration(args.older_than, what="--older-than")
    store = JobStore.open_own(jobs_dir(args), create=False)
    ids: list[str] = []
    if store is not None:
        try:
            ids = store.prune(time.time() - age)
        finally:
            store.close()
    if args.json:
        from jbl.cli.output import print_json

        print_json({"removed": ids})
    else:
        print(f"removed {len(ids)} job record{'s' if len(ids) != 1 else ''}")
    return 0


# add_commands' (not `job run`)
COMMANDS = ("list", "status", "log", "stop", "rm", "prune", "serve-admin")


def add_commands(jsub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """``job list|status|log|stop|rm|prune`` under ``jbl job`` (cli/joblet_cmd.py)."""
    q = jsub.add_parser("list", parents=parents,
                        help="your jobs (root and the admin group: --all for everyone's)")
    q.add_argument("--all", action="store_true",
                   help="every user's jobs (root; the admin group through root's jobs admin "
                        "service)")
    q.add_argument("--state", choices=("running", "done", "failed", "lost"))
    q.set_defaults(func=cmd_list)
    q = jsub.add_parser("status", parents=parents, help="one job's record")
    q.add_argument("id", metavar="ID", help="a job id or an unambiguous prefix of it")
    q.set_defaults(func=cmd_status)
    q = jsub.add_parser("log", parents=parents, help="a detached job's output")
    q.add_argument("id", metavar="ID")
    q.add_argument("-f", "--follow", action="store_true",
                   help="then what it prints, until it ends")
    q.add_argument("--tail", metavar="N", type=int, help="only the last N chunks first")
    q.set_defaults(func=cmd_log)
    q = jsub.add_parser("stop", parents=parents,
                        help="SIGTERM, then SIGKILL of the job's cgroup after its grace")
    q.add_argument("id", metavar="ID")
    q.set_defaults(func=cmd_stop)
    q = jsub.add_parser("rm", parents=parents, help="remove an ended job's record and log")
    q.add_argument("id", metavar="ID")
    q.set_defaults(func=cmd_rm)
    q = jsub.add_parser("prune", parents=parents, help="remove ended jobs' records")
    q.add_argument("--older-than", metavar="DURATION", default="30d",
                   help="created longer ago than this (default 30d)")
    q.set_defaults(func=cmd_prune)
    q = jsub.add_parser("serve-admin", parents=parents,
                        help="root: answer the admin group's --all, status, log and stop of "
                             "any user's job (the jbl-jobs-admin service)")
    q.add_argument("--group", metavar="NAME",
                   help="the admin group (default: admin_group of /etc/jbl/config.yaml)")
    q.set_defaults(func=cmd_serve_admin)
