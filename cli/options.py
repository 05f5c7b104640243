"""Options every command shares (``--store``, ``--json``, ``--debug``, ``--quiet``), in one place.

They are accepted both before the subcommand (``jbl --json store list``) and after it
(``jbl store list --json``): the sub-parsers get a copy whose defaults are suppressed so a
value given before the subcommand is not overwritten by the sub-parser's default.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def default_store() -> Path:
    env = os.environ.get("JBL_STORE")
    if env:
        return Path(env)
    from jbl.store.config import load_config  # config `store:` comes after --store, JBL_STORE

    configured = load_config().store
    if configured is not None:
        return configured
    if os.geteuid() == 0:
        return Path("/var/lib/jbl")
    xdg = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local/share")
    return Path(xdg) / "jbl"


def common_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    d = argparse.SUPPRESS if suppress_defaults else None
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("global options")
    g.add_argument("--store", metavar="DIR", default=d,
                   help="store directory (env JBL_STORE; default /var/lib/jbl for root, "
                        "$XDG_DATA_HOME/jbl otherwise)")
    g.add_argument("--json", action="store_true", default=d if suppress_defaults else False,
                   help="machine-readable output")
    g.add_argument("--debug", action="store_true", default=d if suppress_defaults else False,
                   help="show tracebacks and debug logs")
    g.add_argument("-q", "--quiet", action="store_true",
                   default=d if suppress_defaults else False, help="no progress bars or notes")
    return p


def finish(args: argparse.Namespace) -> None:
    """Resolve defaults that depend on the environment once, after parsing."""
    args.store = Path(args.store) if args.store else default_store()
    args.json = bool(getattr(args, "json", False))
    args.quiet = bool(getattr(args, "quiet", False))
