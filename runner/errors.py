"""The runner's errors: subclasses of ``jbl.store.errors`` (which owns every exit code).

    JobError (exit 12)             a job could not be set up
    ├── SandboxSetupError          a sandbox step failed; the message names it
    │                              (``mount /proc: Operation not permitted``)
    ├── CgroupError                the job's cgroup could not be created or limited
    ├── LimitsNotEnforced          limits asked for but not enforceable, and the caller
    │                              asked for that to be an error (``--require-limits``)
    ├── CommandNotFound (exit 127) the command is not in the runtime (or its #! interpreter)
    ├── CommandNotExecutable (126) it is there but cannot be executed
    └── GpuUnavailable (exit 14)   --gpu=N cannot be met (defined in store/errors.py)
    UsageError (exit 2)            bad request (no command, bad volume/upload path)

Statuses of a job that ran are not errors: see ``supervise.JobResult`` (the job's own status,
128+N for a signal, ``ExitCode.JOB_TIMEOUT`` / ``ExitCode.JOB_OOM`` when jbl ended it).
"""

from __future__ import annotations

from jbl.store.errors import ExitCode, GpuUnavailable, JobError, UsageError


class SandboxSetupError(JobError):
    pass


class CgroupError(JobError):
    pass


class LimitsNotEnforced(JobError):
    pass


class CommandNotFound(JobError):
    exit_code = ExitCode.COMMAND_NOT_FOUND


class CommandNotExecutable(JobError):
    exit_code = ExitCode.COMMAND_NOT_EXECUTABLE


__all__ = ["CgroupError", "CommandNotExecutable", "CommandNotFound", "GpuUnavailable", "JobError",
           "LimitsNotEnforced", "SandboxSetupError", "UsageError"]
