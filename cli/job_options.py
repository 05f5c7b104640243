"""The job options Joblet users type, checked into ``JobRequest`` fields (for ``run_cmd``).

Memory (``--memory``/``--max-memory``: a bare number is MiB, as in Joblet), CPU
(``--max-cpu`` = ``--cpu``, percent of one core), the block-I/O throttle (``--max-iobps``,
bytes/s on the disks the job's volumes live on), secret environment (``-s/--secret-env``),
uploads (``--upload``, ``--upload-dir``: bounded, checked here before the job starts and
enforced again while copying) and named volumes (``--volume=NAME``). Every malformed value
is one ``UsageError`` line naming the option and the allowed form (exit 2). A secret's value
never appears in a message.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from jbl.store.errors import UsageError
from jbl.store.settings import Settings

MIN_MEMORY = 4 << 20  # below this the sandbox helper itself cannot start
MAX_MEMORY = 1 << 50  # 1P: far above any machine, far below what the kernel refuses
MAX_CPU_PERCENT = 100 * 4096  # 4096 cores' worth
MAX_PIDS = 1 << 22  # the kernel's PID_MAX_LIMIT
MAX_IOBPS = 1 << 50
ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def add_options(limits: Any, job: Any) -> None:
    """The Joblet spellings next to jbl's own options (argparse groups of run_cmd)."""
    limits.add_argument("--max-memory", metavar="MIB",
                        help="Joblet's spelling of --memory: MiB (or a size such as 2G)")
    limits.add_argument("--max-cpu", metavar="PERCENT",
                        help="Joblet's spelling of --cpu: percent of one core (150 = 1.5 cores)")
    limits.add_argument("--max-iobps", metavar="BYTES",
                        help="read and write throttle in bytes/s (or 10M) on the disks the "
                             "job's volumes live on")
    job.add_argument("-s", "--secret-env", metavar="K=V|K", action="append", default=[],
                     help="secret environment variable: in the job, never printed or "
                          "recorded; K alone takes the value from jbl's own environment "
                          "(not visible in ps)")
    job.add_argument("--upload-dir", metavar="DIR", action="append", default=[],
                     help="copy DIR's contents into the work directory (repeatable)")


# ---- limits -------------------------------------------------------------------------------

def _one_of(option: tuple[str, str | None], alias: tuple[str, str | None]
            ) -> tuple[str, str] | None:
    """The one of an option and its Joblet alias that was given (``(flag, text)``), None if
    neither; both at once is a usage error naming the alias."""
    (opt, text), (alt, alt_text) = option, alias
    if text is not None and alt_text is not None:
        raise UsageError(f"invalid {alt} {alt_text!r}: {opt} is given too; use one of them")
    if text is not None:
        return opt, text
    return None if alt_text is None else (alt, alt_text)


def memory(args: Any) -> int | None:
    """``--memory``/``--max-memory``: a bare number is MiB (Joblet's unit); sizes as jbl's."""
    from jbl.store.units import parse_size

    given = _one_of(("--memory", args.memory), ("--max-memory", args.max_memory))
    if given is None:
        return None
    opt, text = given
    bare = text.strip().isdigit()
    value = int(text) << 20 if bare else parse_size(text, what=opt)
    unit = " (a bare number is MiB)" if bare else ""
    if value < MIN_MEMORY:
        raise UsageError(f"invalid {opt} {text!r}: at least 4M{unit}")
    if value > MAX_MEMORY:
        raise UsageError(f"invalid {opt} {text!r}: at most 1P{unit}")
    return value


def cpu_percent(args: Any) -> float | None:
    """``--cpu``/``--max-cpu``: percent of one core (100 = one core, 150 = 1.5 cores)."""
    given = _one_of(("--cpu", args.cpu), ("--max-cpu", args.max_cpu))
    if given is None:
        return None
    opt, text = given
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"invalid {opt} {text!r}: expected a positive number "
                         "(percent of one core: 150 = 1.5 cores)") from None
    if not math.isfinite(value):
        raise UsageError(f"invalid {opt} {text!r}: expected a positive number "
                         "(percent of one core: 150 = 1.5 cores)")
    if value <= 0:
        raise UsageError(f"invalid {opt} {text!r}: must be greater than 0")
    if value > MAX_CPU_PERCENT:
        raise UsageError(f"invalid {opt} {text!r}: at most {MAX_CPU_PERCENT}")
    return value


def pids(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"invalid --pids {text!r}: expected a positive number") from None
    if value <= 0:
        raise UsageError(f"invalid --pids {text!r}: must be greater than 0")
    if value > MAX_PIDS:
        raise UsageError(f"invalid --pids {text!r}: at most {MAX_PIDS}")
    return value


def iobps(text: str | None) -> int | None:
    """``--max-iobps``: bytes per second (a bare number), or a size per second (``10M``)."""
    from jbl.store.units import parse_size

    if text is None:
        return None
    value = parse_size(text, what="--max-iobps")
    if value <= 0:
        raise UsageError(f"invalid --max-iobps {text!r}: must be greater than 0")
    if value > MAX_IOBPS:
        raise UsageError(f"invalid --max-iobps {text!r}: at most 1P (bytes per second)")
    return value


def io_devices(volumes: Sequence[Any], workdir: str) -> tuple[tuple[str, ...], str]:
    """The whole disks under the job's volumes, and a note naming what has no block device
    (the job's /tmp and work directory are tmpfs: in memory, nothing to throttle)."""
    from jbl.runner.blockdev import disk_of

    devices: list[str] = []
    skipped = ["/tmp"] + ([workdir] if workdir not in {v.target for v in volumes} else [])
    for v in volumes:
        dev = disk_of(v.source)
        if dev is None:
            skipped.append(v.target)
        elif dev not in devices:
            devices.append(dev)
    note = (f"--max-iobps: {', '.join(skipped)} have no block device (in memory or a "
            "virtual filesystem): not throttled")
    if not devices:
        note += "; nothing else the job writes is on a disk, so it has nothing to throttle"
    return tuple(devices), note


# ---- environment --------------------------------------------------------------------------

def env(items: Sequence[str]) -> tuple[tuple[str, str], ...]:
    out = []
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not ENV_KEY_RE.fullmatch(k):
            raise UsageError(f"invalid --env {item!r}: expected NAME=VALUE")
        out.append((k, v))
    return tuple(out)


def secret_env(items: Sequence[str], plain: Sequence[tuple[str, str]],
               environ: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """``-s K=V`` or ``-s K`` (the value of K in jbl's own environment). Messages name the
    variable, never its value."""
    out: list[tuple[str, str]] = []
    taken = {k for k, _ in plain}
    for item in items:
        k, sep, v = item.partition("=")
        if not ENV_KEY_RE.fullmatch(k):
            raise UsageError(f"invalid --secret-env {k[:64]!r}: expected NAME=VALUE or NAME "
                             "(the value is not shown)")
        if not sep:
            if k not in environ:
                raise UsageError(f"invalid --secret-env {k!r}: {k} is not set in the "
                                 "environment (give NAME=VALUE, or export NAME first)")
            v = environ[k]
        if k in taken:
            raise UsageError(f"invalid --secret-env {k!r}: {k} is also set by --env or an "
                             "earlier --secret-env; set it once")
        taken.add(k)
        out.append((k, v))
    return tuple(out)


# ---- uploads ------------------------------------------------------------------------------

def _check_upload(opt: str, text: str, contents: bool) -> Path:
    """Resolve the directories above an upload (as the caller), refuse a link as the upload
    itself, and measure it against the UPLOAD_MAX_* bounds without following any link."""
    from jbl.runner import plan
    from jbl.runner.sandbox import Budget, StepFailed, copy_in

    given = os.path.abspath(text)
    path = os.path.join(os.path.realpath(os.path.dirname(given)), os.path.basename(given))
    if not os.path.lexists(path):
        raise UsageError(f"invalid {opt} {text!r}: no such file or directory")
    if os.path.islink(path):
        raise UsageError(f"invalid {opt} {text!r}: a symbolic link; give what it points to "
                         f"({os.path.realpath(path)})")
    if contents and not os.path.isdir(path):
        raise UsageError(f"invalid {opt} {text!r}: not a directory (use --upload for a file)")
    budget = Budget(f"invalid {opt} {text!r}", plan.UPLOAD_MAX_BYTES, plan.UPLOAD_MAX_ENTRIES,
                    plan.UPLOAD_MAX_DEPTH)
    try:
        copy_in("", path, None, contents, budget)
    except StepFailed as e:
        message = str(e)
        if not message.startswith("invalid"):
            message = f"invalid {opt} {text!r}: {message}"
        raise UsageError(message) from None
    return Path(path)


def uploads(items: Sequence[str]) -> tuple[Path, ...]:
    return tuple(_check_upload("--upload", t, contents=False) for t in items)


def upload_dirs(items: Sequence[str]) -> tuple[Path, ...]:
    return tuple(_check_upload("--upload-dir", t, contents=True) for t in items)


# ---- volumes ------------------------------------------------------------------------------

def named_volume(item: str, stack: ExitStack | None, settings: Settings) -> Any | None:
    """``--volume=NAME`` (no ``:``): the caller's named volume at /volumes/NAME, held for the
    job's lifetime through ``stack``; None when ``item`` is jbl's ``HOST:JOB[:ro]``."""
    if ":" in item:
        return None
    from jbl.runner.plan import VOLUMES_AT, Volume
    from jbl.runner.volumes import NAME_FORM, NAME_RE, Volumes, volumes_root

    if not NAME_RE.fullmatch(item):
        raise UsageError(f"invalid --volume {item!r}: expected HOST:JOB[:ro] or a volume "
                         f"NAME ({NAME_FORM})")
    vols = Volumes(volumes_root(settings))
    with ExitStack() as probe:
        path = (stack or probe).enter_context(vols.use(item))
    return Volume(path, f"{VOLUMES_AT}/{item}", False)
