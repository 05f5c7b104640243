"""Options every command shares (``--store``, ``--json``, ``--debug``, ``--quiet``), in one place,
and the one place the settings are resolved (``finish``: ``args.settings``, store/settings.py).

They are accepted both before the subcommand (``jbl --json store list``) and after it
(``jbl store list --json``): the sub-parsers get a copy whose defaults are suppressed so a
value given before the subcommand is not overwritten by the sub-parser's default.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path

from jbl.store.settings import Settings, resolve


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


def finish(args: argparse.Namespace, settings: Settings | None = None) -> None:
    """Complete the settings after parsing (flags > env > config > defaults; ``settings``:
    what cli/main.py resolved from the environment) into ``args.settings``, and the defaults
    that depend on them."""
    settings = settings if settings is not None else resolve(os.environ)
    args.settings = replace(settings, store_flag=Path(args.store) if args.store else None)
    args.store = args.settings.store
    args.json = bool(getattr(args, "json", False))
    args.quiet = bool(getattr(args, "quiet", False))
