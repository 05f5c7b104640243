"""The light start of ``jbl job list|status|log`` (issue 13: ``jbl job list`` of 10,000
records in under 100 ms, the whole command): the console script (cli/entry.py) hands argv
here, which reads it by hand and runs cli/job_cmd.py's very commands, without importing
cli/main.py, argparse, the settings or the config (~45 ms of a ~100 ms listing).

Only argv it understands completely is taken: the options below, spelled as argparse
accepts them (``--state X`` or ``--state=X``, flags repeated). Anything else — help,
``--debug`` or ``JBL_DEBUG``, ``--store``, an abbreviation, a bad ``--state``, a second id — is
left to cli/main.py (``main`` returns None), which parses it as always and says what is wrong.
These commands read one setting, ``JBL_JOBS_DIR``, and no config file: a malformed config does
not stop them.

A caller who is not root asking for other users' jobs asks root's jobs admin service
(runner/jobadmin.py) from the same commands.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

LIST_STATES = ("running", "done", "failed", "lost")  # job_cmd.add_commands' --state choices
GLOBAL_FLAGS = {"--json": "json", "-q": "quiet", "--quiet": "quiet"}  # cli/options.py's
FLAGS = {"list": {"--all": "all"}, "status": {}, "log": {"-f": "follow", "--follow": "follow"}}
VALUES = {"list": "--state", "log": "--tail"}  # the one option with a value, if any
TAKES_ID = ("status", "log")


def parse(argv: list[str]) -> SimpleNamespace | None:
    """``jbl [--json|-q]… job list|status|log …`` as cli/main.py would parse it, or None
    when argv holds anything else."""
    try:
        at = argv.index("job")
    except ValueError:
        return None
    if at + 1 >= len(argv) or any(a not in GLOBAL_FLAGS for a in argv[:at]):
        return None
    sub = argv[at + 1]
    if sub not in FLAGS:
        return None
    args = SimpleNamespace(json=False, quiet=False, all=False, state=None, follow=False,
                           tail=None, id=None, command="job", job_command=sub)
    for tok in argv[:at]:
        setattr(args, GLOBAL_FLAGS[tok], True)
    flags = GLOBAL_FLAGS | FLAGS[sub]
    rest = iter(argv[at + 2:])
    for tok in rest:
        if tok in flags:
            setattr(args, flags[tok], True)
            continue
        name, eq, value = tok.partition("=")
        if name == VALUES.get(sub):
            value = value if eq else next(rest, "")
            if not _take(args, name, value):
                return None
        elif tok.startswith("-") or sub not in TAKES_ID or args.id is not None:
            return None
        else:
            args.id = tok
    if sub in TAKES_ID and args.id is None:
        return None
    return args


def _take(args: SimpleNamespace, option: str, value: str) -> bool:
    """Set ``--state``/``--tail`` from ``value`` as argparse would; False if it would not."""
    if option == "--state":
        args.state = value
        return value in LIST_STATES
    try:
        args.tail = int(value)  # argparse's type=int; job_cmd refuses a negative one
    except ValueError:
        return False
    return True


class Env:
    """The part of ``args.settings`` (store/settings.py ``Settings``) that these commands
    read: ``var`` of ``JBL_JOBS_DIR``, from this process's environment."""

    NAMES = ("JBL_JOBS_DIR",)

    def var(self, name: str) -> str:
        if name not in self.NAMES:
            raise KeyError(f"{name} is not read by cli/job_light.py")
        return os.environ.get(name, "")


def main(argv: list[str]) -> int | None:
    """Run ``jbl job list|status|log`` when ``parse`` takes ``argv``: its exit code; None
    to leave argv to cli/main.py."""
    if os.environ.get("JBL_DEBUG"):
        return None  # tracebacks and debug logs: cli/main.py's
    args = parse(argv)
    if args is None:
        return None
    from jbl.cli import exits, job_cmd

    args.settings = Env()
    run = {"list": job_cmd.cmd_list, "status": job_cmd.cmd_status, "log": job_cmd.cmd_log}
    try:
        return run[args.job_command](args)  # type: ignore[arg-type]  # a Namespace's fields
    except (KeyboardInterrupt, Exception) as e:
        return exits.report(e)
