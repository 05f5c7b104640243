"""The jbl side of the benchmarks: the ``jbl`` CLI driven as a user would, nothing imported.

Owns ``Jbl`` (one store dir; ``install``/``import_``/``df``/``mount``/``run`` as subprocesses
of ``.venv/bin/jbl``) and ``NotAvailable``: raised whenever a command is missing or fails, with
a one-line reason the report prints as "not measured (reason)". Benchmarks never guess a number
for a command that did not run. Timed calls go through ``measure.time_cmd`` so jbl and its
baseline are timed the same way. Not thread-safe (one store, one caller).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from .measure import time_cmd
from .profiles import cprofile_cmd

JBL = Path(sys.executable).with_name("jbl")


class NotAvailable(Exception):
    """A jbl command could not be run; ``str(e)`` is the reason shown in the report."""


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:160] if lines else "no output"


def has_command(*words: str) -> bool:
    """``jbl WORDS --help`` exits 0: the subcommand exists (it may still fail)."""
    if not JBL.exists():
        return False
    r = subprocess.run([str(JBL), *words, "--help"], capture_output=True, text=True)
    return r.returncode == 0


class Jbl:
    def __init__(self, store: Path) -> None:
        self.store = Path(store)
        self.via = "store install"     # how ``add`` last got a runtime in

    def argv(self, *args: str) -> list[str]:
        return [str(JBL), "--store", str(self.store), *args]

    def _words(self, args: Sequence[str]) -> str:
        words = [a for a in args[:2] if not a.startswith("-") and "@" not in a and "/" not in a]
        return "jbl " + " ".join(words)

    def check(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run, return output; NotAvailable("jbl store X not available yet" | "... failed: ...")."""
        words = self._words(args)
        if not JBL.exists():
            raise NotAvailable(f"{JBL} not installed")
        r = subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=1800)
        if r.returncode != 0:
            if (r.returncode == 2 and "invalid choice" in r.stderr) or not has_command(*args[:2]):
                raise NotAvailable(f"{words} not available yet")
            raise NotAvailable(f"{words} failed: {_last_line(r.stderr or r.stdout)}")
        return r

    def timed(self, *args: str, env: dict[str, str] | None = None) -> float:
        try:
            return time_cmd(self.argv(*args), env=env)
        except subprocess.CalledProcessError as e:
            self.check(*args)        # turns it into NotAvailable with the reason
            raise NotAvailable(f"{self._words(args)} failed: {e.stderr}") from e

    def reset(self) -> None:
        """An empty store (the previous one removed and synced, untimed)."""
        shutil.rmtree(self.store, ignore_errors=True)
        os.sync()

    # ---------------------------------------------------------------- the commands benchmarked
    def install(self, spec: str, registry: str | Path) -> float:
        return self.timed("store", "install", spec, "--registry", str(registry))

    def import_(self, tarball: str | Path) -> float:
        return self.timed("store", "import", str(tarball))

    def add(self, spec: str, tarball: str | Path, registry: str | Path) -> float:
        """Install via the registry if jbl can, else import the tarball (raises if neither)."""
        try:
            t = self.install(spec, registry)
            self.via = "store install"
            return t
        except NotAvailable as first:
            try:
                t = self.import_(tarball)
            except NotAvailable:
                raise first from None
            self.via = "store import"
            return t

    def profile(self, *args: str, top: int = 25) -> str:
        """cProfile of one ``jbl`` run: the top functions by cumulative time (main thread)."""
        return cprofile_cmd(JBL, self.argv(*args)[1:], top)

    def df(self) -> dict[str, object]:
        out = self.check("store", "df", "--json").stdout
        try:
            return dict(json.loads(out))
        except (ValueError, TypeError) as e:
            raise NotAvailable(f"jbl store df --json printed no JSON object ({e})") from e

    @contextlib.contextmanager
    def mounted(self, mp: Path, timeout: float = 30) -> Iterator[Path]:
        """``jbl mount MP`` (returns when ready), always ``jbl umount MP`` after."""
        mp.mkdir(parents=True, exist_ok=True)
        self.check("mount", str(mp))
        try:
            deadline = time.monotonic() + timeout
            while not os.path.ismount(mp):
                if time.monotonic() > deadline:
                    raise NotAvailable(f"jbl mount returned but {mp} is not a mount point")
                time.sleep(0.05)
            yield mp
        finally:
            r = subprocess.run(self.argv("umount", str(mp)), capture_output=True, text=True)
            if r.returncode != 0 and os.path.ismount(mp):
                subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)

    def daemon_pid(self, mp: Path) -> int | None:
        """The process serving ``mp`` (its cmdline names the mount point), if it can be found."""
        for d in os.listdir("/proc"):
            if not d.isdigit() or int(d) == os.getpid():
                continue
            try:
                cmd = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(b"jbl" in c for c in cmd[:3]) and str(mp).encode() in cmd:
                return int(d)
        return None
