"""The one translation of an exception that ends a command into a line on stderr and an exit
code: cli/main.py's, and the light ``jbl job list|status|log`` (cli/job_light.py), which must
not import cli/main.py to say the same thing. Imports nothing heavy for that reason.

Expected failures are ``JblError`` subclasses: one line, their ``exit_code``. An ``OSError`` no
command translated is still one line naming the path (exit 8 for a permission, else 1).
Anything else is a bug: one line plus "run with --debug" (under ``--debug`` the caller
re-raises instead of calling ``report``).
"""

from __future__ import annotations

import errno
import sys

from jbl.store.errors import ExitCode, JblError


def report(e: BaseException) -> int:
    """Print the one line for ``e`` (a ``JblError``, ``KeyboardInterrupt`` or ``Exception``);
    its exit code."""
    if isinstance(e, JblError):
        print(f"jbl: error: {e}", file=sys.stderr)
        return int(e.exit_code)
    if isinstance(e, KeyboardInterrupt):
        print("jbl: interrupted", file=sys.stderr)
        return int(ExitCode.INTERRUPTED)
    if isinstance(e, BrokenPipeError):
        return int(ExitCode.ERROR)
    if isinstance(e, OSError):
        # a path the system refused that no command translated (each should, with what to
        # do): still one line naming the path, not a traceback or "internal error"
        where = f"{e.filename}: " if e.filename is not None else ""
        print(f"jbl: error: {where}{e.strerror or e} (run with --debug for details)",
              file=sys.stderr)
        return int(ExitCode.PERMISSION if e.errno in (errno.EACCES, errno.EPERM)
                   else ExitCode.ERROR)
    print(f"jbl: internal error: {type(e).__name__}: {e} (run with --debug for details)",
          file=sys.stderr)
    return int(ExitCode.ERROR)
