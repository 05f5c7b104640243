"""The ``jbl`` console script: ``jbl run`` through the user's resident launcher when one
answers, ``jbl job list|status|log`` through cli/job_light.py, everything else (and those when
they are not taken) through ``jbl.cli.main``.

Kept light on purpose: for a ``jbl run`` that a launcher takes, this module and
``jbl.runner.launchproto`` are all of jbl that this process imports (stdlib ``os``, ``sys``,
``_socket``, ``_signal``, ``zlib``); the launcher's forked child runs the normal ``jbl run``
code with our fds, cwd, umask and environment (runner/launcher.py).

``jbl job list|status|log`` start as light (cli/job_light.py): the job records' own code
only, no argparse, settings or config.

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
    after = None
    if _command(argv) == "run":
        from jbl.runner import launchproto

        use, start = launchproto.switches()
        try:
            if not use:
                raise launchproto.NoLauncher("JBL_LAUNCHER=0")
            code = launchproto.run_via_launcher(argv)
        except launchproto.NoLauncher:
            if use and start:
                # For the next job, once this one (run here, as always) is over: a launcher
                # starting beside it (a Python importing all of jbl, then making a job
                # process ahead) takes a core from it, ~100 ms of a first job on 2 cores.
                after = launchproto.spawn
        else:
            sys.stderr.flush()
            os._exit(code)  # nothing of ours to tear down: the job process flushed its own
    elif _command(argv) == "job":
        from jbl.cli import job_light

        done = job_light.main(argv)  # list/status/log: None for anything else
        if done is not None:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            except (BrokenPipeError, ValueError):
                done = done or 1
            os._exit(done)  # the command closed its database; no module teardown to wait for
    from jbl.cli.main import entry

    entry(after)


if __name__ == "__main__":
    main()
