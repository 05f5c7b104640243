"""The ``jbl`` console script: ``jbl run`` through the user's resident launcher when one
answers, everything else (and ``jbl run`` when none does) through ``jbl.cli.main``.

Kept light on purpose: for a ``jbl run`` that a launcher takes, this module and
``jbl.runner.launchproto`` are all of jbl that this process imports (stdlib ``os``, ``sys``,
``_socket``, ``signal``, ``zlib``); the launcher's forked child runs the normal ``jbl run``
code with our fds, cwd, umask and environment (runner/launcher.py).

``JBL_LAUNCHER=0`` (store/settings.py) never uses or starts a launcher. ``JBL_VIEW_LINGER=0``
(nothing lingers) uses one that is running but starts none.
"""

from __future__ import annotations

import os
import sys


def _command(argv: list[str]) -> str | None:
    """The first word of ``argv`` that is not an option (a global ``--store DIR`` skipped),
    as cli/main.py's dispatch reads it."""
    it = iter(argv)
    for tok in it:
        if tok == "--store":
            next(it, None)
        elif not tok.startswith("-"):
            return tok
    return None


def main() -> None:
    argv = sys.argv[1:]
    if _command(argv) == "run":
        from jbl.runner import launchproto

        use, start = launchproto.switches()
        try:
            if not use:
                raise launchproto.NoLauncher("JBL_LAUNCHER=0")
            code = launchproto.run_via_launcher(argv)
        except launchproto.NoLauncher:
            if use and start:
                launchproto.spawn()  # for the next job; this one runs here, as always
        else:
            sys.stderr.flush()
            os._exit(code)  # nothing of ours to tear down: the job process flushed its own
    from jbl.cli.main import entry

    entry()


if __name__ == "__main__":
    main()
