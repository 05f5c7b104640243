"""Every error jbl reports to a user, and the exit code each one maps to.

This module is the one place for both facts. Packages above ``store`` (``fusefs``,
``runner``, ``cli``) subclass these; nothing else invents exit codes.

    JblError                      exit 1   anything expected that went wrong
    ├── UsageError                exit 2   bad option, malformed size/duration/spec
    ├── NotFound                  exit 3   no such runtime/version/file/registry entry
    │   └── NotInstalled                   a version not in the store (says how to install)
    ├── AlreadyExists             exit 4   (rarely an error: reinstall is a no-op)
    ├── IntegrityError            exit 5   checksum mismatch, corrupt blob, verify failed
    │   └── ChecksumMismatch               names both digests
    ├── UnsafeArchive             exit 6   hostile or malformed tarball (names the member)
    │   └── LimitExceeded                  size/entry/depth/window limit hit
    ├── NotARuntime               exit 13  a well-formed tarball that is no runtime root
    │   └── BuildRecipe                    Joblet's build recipe (manifest.yaml + setup*.sh)
    ├── RegistryError             exit 7   unreachable registry, bad registry.json
    ├── PermissionDenied          exit 8   not root / not in the admin group
    ├── StoreBusy                 exit 9   a lock could not be had in time
    ├── StoreError                exit 10  the store itself is unusable (newer schema, bad layout)
    │   └── UnsafeStorePath                a link or wrong file type planted in the store
    ├── MountError                exit 11  FUSE mount could not be set up / torn down
    └── JobError                  exit 12  a job could not be set up (names the step)
        ├── GpuUnavailable        exit 14  --gpu: no GPU, too few match, or all taken
        ├── CommandNotExecutable  exit 126 (runner/errors.py) the command is not executable
        └── CommandNotFound       exit 127 (runner/errors.py) no such command in the runtime
        (a job that ran returns its own status: 0-255; 128+N for a signal;
         see runner/errors.py for the statuses jbl itself assigns)
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    ERROR = 1
    USAGE = 2
    NOT_FOUND = 3
    EXISTS = 4
    INTEGRITY = 5
    UNSAFE_ARCHIVE = 6
    REGISTRY = 7
    PERMISSION = 8
    BUSY = 9
    STORE = 10
    MOUNT = 11
    JOB_SETUP = 12
    NOT_A_RUNTIME = 13
    GPU_UNAVAILABLE = 14  # --gpu: none on this host, too few match, or all taken
    # A job's command that could not be started, as shells and container runners say it:
    COMMAND_NOT_EXECUTABLE = 126
    COMMAND_NOT_FOUND = 127
    # Statuses of a job that jbl ended itself (distinct from any 128+signal):
    JOB_TIMEOUT = 124  # as coreutils `timeout`
    JOB_OOM = 137 + 1  # 138: killed by the OOM killer (a plain SIGKILL is 137)
    INTERRUPTED = 130  # Ctrl-C


class JblError(Exception):
    """An expected failure: printed as one line, exit ``exit_code``."""

    exit_code: ExitCode = ExitCode.ERROR

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message


class UsageError(JblError):
    exit_code = ExitCode.USAGE


class NotFound(JblError):
    exit_code = ExitCode.NOT_FOUND


class NotInstalled(NotFound):
    pass


class AlreadyExists(JblError):
    exit_code = ExitCode.EXISTS


class IntegrityError(JblError):
    exit_code = ExitCode.INTEGRITY


class ChecksumMismatch(IntegrityError):
    def __init__(self, what: str, expected: str, actual: str) -> None:
        super().__init__(f"checksum mismatch for {what}: expected {expected}, got {actual}")
        self.expected = expected
        self.actual = actual


class UnsafeArchive(JblError):
    """A tarball that jbl refuses; ``member`` names the offending entry."""

    exit_code = ExitCode.UNSAFE_ARCHIVE

    def __init__(self, reason: str, member: str | None = None) -> None:
        msg = f"unsafe archive: {reason}" + (f": {member!r}" if member is not None else "")
        super().__init__(msg)
        self.reason = reason
        self.member = member


class LimitExceeded(UnsafeArchive):
    pass


class NotARuntime(JblError):
    """A tarball that is safe and well formed but holds no runtime root (``runtime.yml`` +
    ``isolated/``): nothing hostile about it, so not exit 6."""

    exit_code = ExitCode.NOT_A_RUNTIME


class BuildRecipe(NotARuntime):
    """Joblet's published build recipe of a runtime (``<name>/manifest.yaml`` and
    ``setup-<os>-<arch>.sh`` scripts): it builds a runtime on a host, it is not one."""


class RegistryError(JblError):
    exit_code = ExitCode.REGISTRY


class PermissionDenied(JblError):
    exit_code = ExitCode.PERMISSION


class StoreBusy(JblError):
    exit_code = ExitCode.BUSY


class StoreError(JblError):
    exit_code = ExitCode.STORE


class UnsafeStorePath(StoreError):
    """Something inside the store is a symbolic link or the wrong type of file where jbl
    expects its own directory or file: never followed or used (store/safepath.py)."""


class MountError(JblError):
    exit_code = ExitCode.MOUNT


class JobError(JblError):
    exit_code = ExitCode.JOB_SETUP


class GpuUnavailable(JobError):
    """``--gpu=N`` cannot be met: no GPU, too few matching, or the rest taken (lists them)."""

    exit_code = ExitCode.GPU_UNAVAILABLE
