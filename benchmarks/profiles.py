"""Where the time goes, for a missed figure: cProfile of one CLI run, py-spy of a live daemon.

Owns the two profilers the report quotes under "Where the time goes": ``cprofile_cmd`` runs a
Python console script once under ``cProfile`` (main thread only: worker threads show up as lock
waits) and returns the top functions by cumulative time; ``pyspy_during`` samples every thread
of a running process (the mount daemon) with py-spy while some work runs, and returns the top
frames by own and by inclusive samples. py-spy is optional: without it the text says so.
"""

from __future__ import annotations

import collections
import io
import pstats
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path


def cprofile_cmd(script: str | Path, args: Sequence[str], top: int = 25) -> str:
    with tempfile.NamedTemporaryFile(suffix=".prof") as out:
        r = subprocess.run([sys.executable, "-m", "cProfile", "-o", out.name, str(script),
                            *args], capture_output=True, text=True)
        if r.returncode != 0:
            tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
            return f"profiling run failed: {tail}"
        buf = io.StringIO()
        pstats.Stats(out.name, stream=buf).strip_dirs().sort_stats("cumulative").print_stats(top)
    text = buf.getvalue()
    return text[text.find("   ncalls"):] if "   ncalls" in text else text


def pyspy() -> str | None:
    return shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))


def pyspy_during(pid: int, work: Callable[[], object], top: int = 20) -> str:
    """Sample ``pid`` (all threads, idle ones excluded) while ``work()`` runs."""
    exe = pyspy()
    if exe is None:
        work()
        return "not captured: py-spy is not installed (pip install py-spy)"
    with tempfile.NamedTemporaryFile(suffix=".txt") as out:
        p = subprocess.Popen([exe, "record", "--pid", str(pid), "--format", "raw", "--rate",
                              "250", "--threads", "-o", out.name], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
        try:
            work()
        finally:
            p.send_signal(signal.SIGINT)
            try:
                _, err = p.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                _, err = p.communicate()
        raw = Path(out.name).read_text()
    if not raw.strip():
        return f"py-spy recorded nothing ({(err or '').strip()[-200:]})"
    return summarise_collapsed(raw, top)


# Leaf frames that are a thread parked on a queue/condition, not work.
WAITS = ("_worker (concurrent/futures/thread.py", "Condition.wait ", "Event.wait ",
         "Queue.get ", "SimpleQueue.get ", "Thread.join ", "select ", "poll ")


def summarise_collapsed(raw: str, top: int = 20) -> str:
    """Top frames of py-spy's collapsed stacks (``frame;frame;... count`` per line)."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = waiting = 0
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = [f for f in stack.split(";") if not f.startswith(("thread (", "process "))]
        if not frames:
            continue
        if frames[-1].startswith(WAITS):     # an idle thread py-spy did not recognise as idle
            waiting += int(n)
            continue
        total += int(n)
        own[frames[-1]] += int(n)
        for f in set(frames):
            incl[f] += int(n)
    if not total:
        return f"only idle samples ({waiting})"
    lines = [f"{total} busy samples over all threads while the work ran "
             f"({waiting} more in idle waits left out)", "", "own %  frame"]
    lines += [f"{100 * c / total:5.1f}  {f}" for f, c in own.most_common(top)]
    lines += ["", "incl % frame"]
    lines += [f"{100 * c / total:5.1f}  {f}" for f, c in incl.most_common(top)]
    return "\n".join(lines)
