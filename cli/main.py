"""``jbl`` entry point: parse argv, dispatch to one command module, map errors to exit codes.

Each command group lives in its own module exposing ``register(subparsers, parents)``; the
handler set with ``set_defaults(func=...)`` takes the parsed ``args`` and returns an exit code.
Expected failures are ``JblError`` subclasses: one line on stderr, their ``exit_code``; an
``OSError`` no command translated, one line naming the path; anything else is a bug, one line
plus "run with --debug" (cli/exits.py says each), or the traceback under ``--debug``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from jbl.store import crashpoints
from jbl.store.errors import ExitCode, UsageError
from jbl.store.settings import NO_ACTION, resolve

from . import exits, options

# Command-group modules, in the order `jbl --help` lists them. Each owns its subcommands.
# COMMANDS maps a top-level command to its module, so `jbl run` imports only what it needs
# (importing every module costs ~100 ms of start-up: httpx, yaml, rich).
COMMANDS = {"store": "jbl.cli.store_cmd", "pack": "jbl.cli.pack_cmd",
            "registry": "jbl.cli.pack_cmd", "mount": "jbl.cli.mount_cmd",
            "umount": "jbl.cli.mount_cmd", "run": "jbl.cli.run_cmd", "setup": "jbl.cli.setup_cmd",
            "volume": "jbl.cli.volume_cmd", "gpu": "jbl.cli.gpu_cmd",
            "launcher": "jbl.cli.launcher_cmd"}
COMMAND_MODULES = [
    "jbl.cli.store_cmd",     # jbl store install/import/available/list/info/rm/df/gc/verify/pin
    "jbl.cli.pack_cmd",      # jbl pack, jbl registry add
    "jbl.cli.mount_cmd",     # jbl mount, jbl umount
    "jbl.cli.run_cmd",       # jbl run
    "jbl.cli.volume_cmd",    # jbl volume create/list/remove
    "jbl.cli.gpu_cmd",       # jbl gpu list
    "jbl.cli.launcher_cmd",  # jbl launcher status/stop
    "jbl.cli.setup_cmd",     # jbl setup --system
]

# Joblet's spellings of `jbl store …` and `jbl run` (`jbl runtime …`, `jbl job run`), listed last.
COMMANDS.update(runtime="jbl.cli.joblet_cmd", job="jbl.cli.joblet_cmd")
COMMAND_MODULES.append("jbl.cli.joblet_cmd")


_exit_now = False  # the command asked entry() to end the process without teardown


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (``jbl: error: …``) and exit 2, not a
    usage dump: sub-parsers inherit this class through ``add_subparsers``."""

    def error(self, message: str) -> NoReturn:
        # main() already prints "jbl: error: "; the help pointer names the subcommand
        raise UsageError(f"{message} (see '{self.prog} --help')")


class _Version(argparse.Action):
    """``jbl --version``: the installed package's version (read only when asked)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **_kw: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print jbl's version and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            text = version("jbl")
        except PackageNotFoundError:  # run from a tree that was never installed
            text = "unknown (not installed as a package)"
        print(f"jbl {text}")
        parser.exit()


def _chosen_modules(argv: Sequence[str]) -> list[str]:
    """The one module owning the command in ``argv``, or all of them (help, typos)."""
    takes_value = {"--store"}
    it = iter(argv)
    for tok in it:
        if tok == "--version":
            return []  # prints and exits before any command is needed
        if tok in takes_value:
            next(it, None)
        elif tok.startswith("--store="):
            continue
        elif not tok.startswith("-"):
            return [COMMANDS[tok]] if tok in COMMANDS else COMMAND_MODULES
    return COMMAND_MODULES


def action_of(argv: Sequence[str]) -> str:
    """What the command in ``argv`` changes, for permission messages: ``store install X`` ->
    ``"install"``, ``store gc`` -> ``"gc"``, ``run`` -> ``"run"``."""
    words = [a for a in argv if not a.startswith("-")]
    if "--store" in argv:  # skip the value of a global --store DIR given before the command
        i = list(argv).index("--store")
        if i + 1 < len(argv) and argv[i + 1] in words:
            words.remove(argv[i + 1])
    if len(words) >= 2 and words[0] == "store":
        return words[1]
    return words[0] if words else NO_ACTION


_built: dict[tuple[str, ...], argparse.ArgumentParser] | None = None  # see build_parser


def keep_parsers() -> None:
    """From now on ``build_parser`` keeps what it builds (the resident launcher builds
    ``run``'s once; each job process it forks parses with its own copy)."""
    global _built
    _built = {}


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser for ``argv``'s command (kept after ``keep_parsers`` when it depends on no
    more of ``argv`` than the command)."""
    modules = tuple(_chosen_modules(argv))
    parser = None if _built is None else _built.get(modules)
    if parser is None:
        parser = _build_parser(argv)
        if _built is not None and not any(
                getattr(sys.modules.get(m), "REGISTER_TAKES_ARGV", False) for m in modules):
            _built[modules] = parser
    return parser


def _build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    import importlib

    common = options.common_parser()
    parser = _Parser(
        prog="jbl", parents=[common],
        description="Runtime store and job runner for shared Linux servers.")
    parser.add_argument("--version", action=_Version)
    from jbl.cli.joblet_cmd import GLOBAL_REFUSED, refuse_joblet_flags

    refuse_joblet_flags(parser, GLOBAL_REFUSED)  # Joblet's `rnx --node=srv1 job run …`
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for modname in _chosen_modules(argv):
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name == modname:  # not written yet
                continue
            raise
        parents = [options.common_parser(suppress_defaults=True)]
        if getattr(mod, "REGISTER_TAKES_ARGV", False):  # builds only what argv can reach
            mod.register(sub, parents, argv=argv)
        else:
            mod.register(sub, parents)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    settings = resolve(os.environ, action=action_of(argv))  # the one read of the environment
    debug = "--debug" in argv or settings.debug
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="jbl: %(levelname)s: %(message)s")
    try:
        parser = build_parser(argv)
        args = parser.parse_args(argv)
        options.finish(args, settings)
        crashpoints.arm(args.settings.var("JBL_CRASH_AT"), args.settings.var("JBL_PAUSE_AT"))
        code = int(args.func(args))
        global _exit_now
        _exit_now = bool(getattr(args, "exit_now", False))  # set by e.g. run_cmd.register
        return code
    except BrokenPipeError:
        return int(ExitCode.ERROR)
    except (KeyboardInterrupt, Exception) as e:  # one line (cli/exits.py), unless debugging
        if debug:
            raise
        return exits.report(e)


def entry(after: Callable[[], None] | None = None) -> None:
    """The console script's end of ``main``; ``after`` (cli/entry.py: start a launcher) runs
    once the command is done, before the process ends."""
    code = main()
    if after is not None:
        after()
    if _exit_now:
        # The command closed everything it opened; skip the interpreter's teardown of every
        # module (~15 ms on `jbl run`'s critical path). Console script only: main() returns.
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except (BrokenPipeError, ValueError):
            code = code or int(ExitCode.ERROR)
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
