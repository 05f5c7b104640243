"""``jbl launcher status|stop``: the caller's resident launcher (runner/launcher.py) for the
scope this command runs in (same code, cgroup, namespaces, limits: runner/launchproto.py).

``status`` says whether one serves and how many requests it took; ``stop`` makes it exit
(jobs it started run on: each is its own process). Both exit 0 when none is running.
"""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("launcher", parents=parents,
                       help="the resident process that starts your jobs fast",
                       description="Your resident launcher (started by `jbl run`, gone "
                                   "JBL_VIEW_LINGER after its last job; JBL_LAUNCHER=0 "
                                   "turns it off).")
    ls = p.add_subparsers(dest="launcher_command", metavar="COMMAND")
    ls.required = True
    ls.add_parser("status", parents=parents, help="is one running, how many requests it "
                                                  "took").set_defaults(func=status)
    ls.add_parser("stop", parents=parents, help="make it exit (running jobs go on)"
                  ).set_defaults(func=stop)


def _ask(op: str) -> dict[str, Any]:
    from jbl.runner import launchproto

    directory = launchproto.launcher_dir()
    scope = launchproto.scope()
    path = launchproto.socket_path(directory, launchproto.key(scope))
    try:
        s, _lines, fields = launchproto.request(op, [], scope, directory)
    except launchproto.NoLauncher as e:
        return {"running": False, "socket": path, "why": str(e)}
    s.close()
    return {"running": True, "socket": path, "pid": int(fields[1]), "served": int(fields[2])}


def _report(args: argparse.Namespace, info: dict[str, Any], text: str) -> int:
    if args.json:
        from jbl.cli.output import print_json

        print_json(info)
    elif not args.quiet:
        print(text)
    return 0


def status(args: argparse.Namespace) -> int:
    info = _ask("status")
    if not info["running"]:
        return _report(args, info, f"no launcher running ({info['socket']})")
    return _report(args, info, f"launcher pid {info['pid']}: {info['served']} requests "
                               f"served ({info['socket']})")


def stop(args: argparse.Namespace) -> int:
    info = _ask("stop")
    if not info["running"]:
        return _report(args, info, "no launcher running")
    return _report(args, info, f"stopped launcher pid {info['pid']}")
