"""``jbl store …``: the command group. Each subcommand family lives in its own module:

    store_install_cmd  install, available, list, info, rm, df
    store_import_cmd   import
    store_maint_cmd    gc, verify, pin, unpin
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

SUBMODULES = ["jbl.cli.store_install_cmd", "jbl.cli.store_import_cmd", "jbl.cli.store_maint_cmd"]


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("store", parents=parents, help="install, list, remove and check runtimes",
                       description="Manage the runtime store.")
    ssub = p.add_subparsers(dest="store_command", metavar="SUBCOMMAND")
    ssub.required = True
    for modname in SUBMODULES:
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name == modname:
                continue
            raise
        mod.register(ssub, parents)
