"""The runner's errors: subclasses of ``jbl.store.errors`` (which owns every exit code).

    JobError (exit 12)             a job could not be set up
    ├── SandboxSetupError          a sandbox step failed; the message names it
    │                              (``mount /proc: Operation not permitted``)
    ├── CgroupError                the job's cgroup could not be created or limited
    └── LimitsNotEnforced          limits asked for but not enforceable, and the caller
                                   asked for that to be an error (``--require-limits``)
    UsageError (exit 2)            bad request (no command, bad volume/upload path)

Statuses of a job that ran are not errors: see ``supervise.JobResult`` (the job's own status,
128+N for a signal, ``ExitCode.JOB_TIMEOUT`` / ``ExitCode.JOB_OOM`` when jbl ended it).
"""

from __future__ import annotations

from jbl.store.errors import JobError, UsageError


class SandboxSetupError(JobError):
    pass


class CgroupError(JobError):
    pass


class LimitsNotEnforced(JobError):
    pass


__all__ = ["CgroupError", "JobError", "LimitsNotEnforced", "SandboxSetupError", "UsageError"]
