"""``jbl runtime …`` and ``jbl job run``: Joblet's spellings of ``jbl store …`` and ``jbl run``.

One implementation, two spellings: every handler reached from here is the ``jbl store`` one
(cli/store_install_cmd.py) or ``jbl run`` itself (cli/run_cmd.py registers ``job run`` with the
very parser it gives ``run``); only the argv shape is Joblet's:

    jbl runtime list [--registry[=OWNER/REPO|URL|PATH]]   store list | store available
    jbl runtime install NAME[@VER]… [--registry R] [-f]   store install
    jbl runtime info NAME[@VER]                           store info
    jbl runtime remove NAME[@VER]…                        store rm
    jbl job run [OPTIONS] CMD [ARGS…]                     run

Joblet spellings jbl does not implement are refused with one line saying so (exit 2), never
ignored or half-done: ``runtime build/test/validate``, ``job logs/cancel/…`` (naming jbl's
spelling: ``jbl job list|status|log|stop|rm|prune`` are cli/job_cmd.py's) and the job flags in
``REFUSED_FLAGS`` (also refused on ``jbl run`` and before the command, as Joblet's
global ``--node``/``--config``). Importing this module is cheap (no store, no httpx): it is
loaded for ``jbl job run``'s start-up too.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

from jbl.store.errors import UsageError

# Joblet's job flags jbl does not implement, and why (what to do instead).
REFUSED_FLAGS = {
    "--schedule": "jbl runs a job now, in the foreground; run it later with cron, at or a "
                  "systemd timer",
    "--workflow": "jbl runs one job at a time; chain jobs with a shell script or your "
                  "cluster's scheduler",
    "--node": "jbl runs jobs on this machine; run jbl on the node (ssh, or your cluster's "
              "scheduler)",
    "--config": "jbl has no client config; its own is JBL_CONFIG or ~/.config/jbl/config.yaml, "
                "and it reads the runtimes block of ~/.rnx/config.yaml by itself",
}
GLOBAL_REFUSED = ("--node", "--config")  # Joblet's `rnx --node=srv1 job run …`

# Joblet's other subcommands, refused with what jbl offers instead.
REFUSED_RUNTIME = {
    "build": "jbl installs runtimes that are already built (a runtime.yml and an isolated/ "
             "root); build one with Joblet's tools, then `jbl pack DIR -o TARBALL`",
    "test": "run a command in it instead: jbl job run --runtime=NAME true",
    "validate": "jbl checks a runtime when it installs it (`jbl pack DIR` checks a directory)",
}
REFUSED_JOB = {
    "logs": "jbl's spelling is `jbl job log ID [--follow]`",
    "cancel": "jbl's spelling is `jbl job stop ID`",
    "delete": "jbl's spelling is `jbl job rm ID`",
    "delete-all": "jbl's spelling is `jbl job prune --older-than DURATION`",
    "monitor": "jbl records a job's peak memory and CPU time: `jbl job status ID`",
    "metrics": "jbl records a job's peak memory and CPU time: `jbl job status ID`",
}


class _Refused(argparse.Action):
    """A Joblet option jbl does not implement: parsing it is one UsageError line, so it is
    never silently taken for part of the command (or its value for the command)."""

    def __init__(self, option_strings: Sequence[str], dest: str, reason: str = "",
                 **_kw: Any) -> None:
        super().__init__(option_strings, dest, nargs="?", default=argparse.SUPPRESS,
                         help=argparse.SUPPRESS)
        self.reason = reason

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        raise UsageError(f"jbl does not support Joblet's {self.option_strings[0]}: "
                         f"{self.reason}")


def refuse_joblet_flags(p: argparse.ArgumentParser, flags: Sequence[str] = ()) -> None:
    """Make ``p`` refuse Joblet's job flags (all of ``REFUSED_FLAGS`` unless ``flags``)."""
    for flag in flags or REFUSED_FLAGS:
        p.add_argument(flag, action=_Refused, reason=REFUSED_FLAGS[flag])


def _refuse(what: str, reason: str) -> Callable[[argparse.Namespace], int]:
    def refuse(_args: argparse.Namespace) -> int:
        raise UsageError(f"jbl does not support Joblet's `{what}`: {reason}")

    return refuse


def _store(name: str) -> Callable[[argparse.Namespace], int]:
    """The ``jbl store`` handler ``name``, imported when called (``job run`` never needs it)."""
    def call(args: argparse.Namespace) -> int:
        from jbl.cli import store_install_cmd

        return int(getattr(store_install_cmd, name)(args))

    return call


def cmd_list(args: argparse.Namespace) -> int:
    """``runtime list``: installed versions; with ``--registry[=R]`` what registries offer
    (a bare ``--registry``: the configured ones)."""
    if args.registry is None:
        return _store("cmd_list")(args)
    args.registry = [r for r in args.registry if r] or None
    return _store("cmd_available")(args)


def _registry_option(p: argparse.ArgumentParser, *, bare: bool) -> None:
    kw: dict[str, Any] = {"nargs": "?", "const": ""} if bare else {}
    p.add_argument("--registry", action="append", metavar="OWNER/REPO|URL|PATH", **kw,
                   help="a registry: GitHub OWNER/REPO or https://github.com/OWNER/REPO, a "
                        "registry.json URL, or a directory (repeatable"
                        + ("; bare: the configured registries)" if bare else
                           "; default: the configured registries)"))
    p.add_argument("--refresh", action="store_true",
                   help="refetch registry indexes instead of using the 1 h cache")


def _register_runtime(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("runtime", parents=parents,
                       help="Joblet's spelling of `jbl store`: list, install, info, remove",
                       description="Joblet's `rnx runtime` commands, done by `jbl store`.")
    rsub = p.add_subparsers(dest="runtime_command", metavar="SUBCOMMAND")
    rsub.required = True

    q = rsub.add_parser("list", parents=parents, help="installed versions (= jbl store list); "
                        "with --registry what a registry offers (= jbl store available)")
    _registry_option(q, bare=True)
    q.set_defaults(func=cmd_list)

    q = rsub.add_parser("install", parents=parents, help="= jbl store install",
                        description="Install NAME (highest release), NAME@1.3 (highest 1.3.x) "
                                    "or NAME@1.3.2 from a registry (= jbl store install).")
    q.add_argument("specs", nargs="+", metavar="NAME[@VERSION]")
    q.add_argument("-f", "--force", action="store_true",
                   help="replace an installed copy of the same version (e.g. re-released "
                        "with a new checksum)")
    _registry_option(q, bare=False)
    q.set_defaults(func=_store("cmd_install"))

    q = rsub.add_parser("info", parents=parents, help="= jbl store info")
    q.add_argument("spec", metavar="NAME[@VERSION]")
    q.set_defaults(func=_store("cmd_info"))

    q = rsub.add_parser("remove", parents=parents, help="= jbl store rm",
                        description="Remove NAME@VERSION, or every version of NAME (asks on a "
                                    "terminal unless --yes) (= jbl store rm).")
    q.add_argument("specs", nargs="+", metavar="NAME[@VERSION]")
    q.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    q.set_defaults(func=_store("cmd_rm"))

    for name, reason in REFUSED_RUNTIME.items():
        q = rsub.add_parser(name, parents=parents, add_help=False)
        q.add_argument("rest", nargs=argparse.REMAINDER)
        q.set_defaults(func=_refuse(f"runtime {name}", reason))


def _job_subcommand(argv: Sequence[str]) -> str | None:
    """The word after ``job`` in ``argv`` (None: none, or no ``job``)."""
    words = [a for a in argv if not a.startswith("-")]
    return words[words.index("job") + 1] if "job" in words[:-1] else None


def _register_job(sub: Any, parents: list[argparse.ArgumentParser],
                  argv: Sequence[str] = ()) -> None:
    from jbl.cli import job_cmd

    p = sub.add_parser("job", parents=parents,
                       help="jobs: run (= jbl run), list, status, log, stop, rm, prune",
                       description="Joblet's `rnx job …`: run is `jbl run`; the others read "
                                   "and manage your job records.")
    jsub = p.add_subparsers(dest="job_command", metavar="SUBCOMMAND")
    jsub.required = True
    # `jbl job list|status|…` never needs `job run`'s parser: building it (and importing
    # run_cmd) is ~15-20 ms of a 10,000-record `jbl job list` (benchmarks/bench_jobs.py)
    if _job_subcommand(argv) not in job_cmd.COMMANDS:
        from jbl.cli import run_cmd

        run_cmd.register(jsub, parents)  # the very parser `jbl run` has
        jsub.choices["run"].usage = ("jbl job run --runtime=NAME[@VERSION] [options] [--] "
                                     "CMD [ARGS...]")
    job_cmd.add_commands(jsub, parents)  # list, status, log, stop, rm, prune
    for name, reason in REFUSED_JOB.items():
        q = jsub.add_parser(name, parents=parents, add_help=False)
        q.add_argument("rest", nargs=argparse.REMAINDER)
        q.set_defaults(func=_refuse(f"job {name}", reason))


REGISTER_TAKES_ARGV = True  # cli/main passes argv: see _register_job


def register(sub: Any, parents: list[argparse.ArgumentParser],
             argv: Sequence[str] = ()) -> None:
    _register_runtime(sub, parents)
    _register_job(sub, parents, argv)
