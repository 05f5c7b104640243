"""``jbl run … -- /bin/true`` start-up cost vs ``bwrap --unshare-all`` and ``python3 -c pass``.

Owns the job start-up figures, three ways of naming the runtime, all in one interleaved run
(``measure.interleave``: every command once per round, order alternating, so machine drift
hits all sides):

* ``--runtime-dir D``: the runner alone (no store, no FUSE);
* ``--runtime NAME`` with a ``jbl mount`` of the store running (the shared-server setup);
* ``--runtime NAME`` with no daemon: ``jbl run`` reuses the user's lingering private view
  (started by the warm-up run, kept while jobs come within ``JBL_VIEW_LINGER``);
* ``--runtime NAME`` with no daemon and ``JBL_VIEW_LINGER=0``: a private view mounted and
  unmounted for every job (run through ``env``, which adds one exec, ~1 ms).

Those four run in-process (``JBL_LAUNCHER=0``: the figures before issue 13's launcher);
then through the resident launcher (runner/launcher.py), in scopes of their own (a
``PYTHON_JBL_BENCH_SCOPE`` variable is part of a launcher's scope):

* ``--runtime-dir D`` and ``--runtime NAME`` (lingering view) with the launcher running;
* ``--runtime NAME`` with nothing running: before each timed run the launcher the previous
  one started is stopped and the store's lingering view unmounted (untimed), so the job
  runs in-process, mounts a view and starts a launcher in the background; its target is
  2x the in-process lingering-view overhead (issue 13);
* 100 jobs of ``/bin/true`` back to back (a shell loop) vs 100 ``bwrap`` runs.

The target (DESIGN.md): jbl's overhead beyond Python's own start-up is at most 3× bwrap's
whole run, i.e. ``(jbl - python) / bwrap <= 3``. The overhead is taken per round
(``jbl_i - python_i``, paired), so its median and spread are real. "Python's own start-up" is
the interpreter jbl itself runs on (``sys.executable``, the venv's, site included): the
host's ``python3`` may load unrelated ``.pth`` hooks (here one imports certifi, +35 ms),
which would flatter jbl. jbl runs with compiled bytecode as an installed copy would: when
``PYTHONDONTWRITEBYTECODE`` is set, a scratch ``PYTHONPYCACHEPREFIX`` holds the ``.pyc``
files, written by an untimed warm-up run.

``main(argv)`` prints a markdown table (``python -m benchmarks.bench_run [-n 20]``);
``run(ctx)`` is the suite's entry point. Run as root (jobs need no root, bwrap compares best
as root too).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .measure import Figure, Stat, Step, interleave, markdown_table, time_cmd

REPO = Path(__file__).resolve().parent.parent
JBL = str(Path(sys.executable).with_name("jbl"))
PYTHON = sys.executable  # the interpreter (and site) jbl runs on: see the module docstring
SPEC = "benchrt@1.0.0"
SCOPE = "PYTHON_JBL_BENCH_SCOPE"  # part of a launcher's scope (runner/launchproto.facts)


def _runtime(dest: Path) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    try:
        from rtbuild import build_runtime
    finally:
        sys.path.pop(0)
    return build_runtime(dest, "benchrt", "1.0.0")


def _jbl(*args: str, env: dict[str, str]) -> str | None:
    """Run jbl untimed; the last line of its error, or None when it worked."""
    r = subprocess.run([JBL, *args], capture_output=True, text=True, env=env)
    if r.returncode == 0:
        return None
    return (r.stderr.strip().splitlines() or ["failed"])[-1]


def _stores(work: Path, rt: Path, env: dict[str, str]) -> dict[str, list[str] | str]:
    """The two store-backed commands (or why each cannot run): one store served by a
    running ``jbl mount``, one without any daemon."""
    tarball = work / "rt.tar.gz"
    err = _jbl("pack", str(rt), "-o", str(tarball), env=env)
    out: dict[str, list[str] | str] = {}
    for key in ("jbl-mount", "jbl-nodaemon", "jbl-perjob", "jbl-first"):
        store = work / key
        err = err or _jbl("--store", str(store), "store", "import", str(tarball), env=env)
        if err is None and key == "jbl-mount":
            (work / "mp").mkdir()
            err = _jbl("--store", str(store), "mount", str(work / "mp"), env=env)
        prefix = ["env", "JBL_VIEW_LINGER=0"] if key == "jbl-perjob" else []
        out[key] = f"jbl: {err}" if err else [
            *prefix, JBL, "--store", str(store), "run", "--runtime", SPEC, "--", "/bin/true"]
    return out


LAUNCHED = {"jbl-dir-l": "jbl run --runtime-dir D, launcher running",
            "jbl-view-l": "jbl run --runtime NAME, launcher running (lingering view)"}
NAMES = {"jbl-dir": "jbl run --runtime-dir D",
         "jbl-mount": "jbl run --runtime NAME, jbl mount running",
         "jbl-nodaemon": "jbl run --runtime NAME, no daemon (lingering private view)",
         "jbl-perjob": "jbl run --runtime NAME, no daemon, JBL_VIEW_LINGER=0 (view per job)",
         **LAUNCHED}
FIRST = "jbl run --runtime NAME, nothing running (first job starts the launcher)"
LOOP = 100  # jobs back to back


def _launcher(env: dict[str, str], op: str) -> bool:
    """``jbl launcher OP`` in ``env``'s scope; for ``status``: is one running?"""
    r = subprocess.run([JBL, "launcher", op, "--json"], env=env, capture_output=True,
                       text=True)
    return r.returncode == 0 and '"running": true' in r.stdout


def _nothing_running(store: str, env: dict[str, str]) -> None:
    """Untimed, before a "first job": the launcher the previous run started is stopped (once
    it is up: a Python start) and the store's lingering view unmounted."""
    deadline = time.monotonic() + 10
    while not _launcher(env, "status") and time.monotonic() < deadline:
        time.sleep(0.05)
    _launcher(env, "stop")
    while _launcher(env, "status") and time.monotonic() < deadline:
        time.sleep(0.05)
    from jbl.fusefs import linger

    files = linger.view_files(Path(os.path.realpath(store)))
    mp = linger.read_current(files) if files is not None else None
    if mp is not None and os.path.ismount(mp):
        _jbl("umount", str(mp), env=env)


def _step(argv: list[str], env: dict[str, str]) -> Step:
    return lambda: time_cmd(argv, env=env)


def _first_step(argv: list[str], store: str, env: dict[str, str]) -> Step:
    def step() -> float:
        _nothing_running(store, env)
        took = time_cmd(argv, env=env)
        _settled(env)
        return took

    return step


def _settled(env: dict[str, str]) -> None:
    """Untimed, after a "first job": wait until the launcher it starts once it is over is
    up and its spare has made its job process ready (~0.2 s of two cores' work), so that
    start-up does not land on whichever command the interleave runs next."""
    deadline = time.monotonic() + 10
    while not _launcher(env, "status") and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)


def _loop(argv: list[str]) -> list[str]:
    """``argv`` LOOP times back to back in one shell (its forks are in both sides)."""
    return ["sh", "-c", f'i=0; while [ $i -lt {LOOP} ]; do "$@" || exit 1; i=$((i+1)); done',
            "loop", *argv]


def measure(n: int) -> list[Figure]:
    work = Path(tempfile.mkdtemp(prefix="jbl-bench-run-"))
    env = dict(os.environ, JBL_LAUNCHER="0")  # the in-process rows
    if env.pop("PYTHONDONTWRITEBYTECODE", None):
        env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    envs = {k: dict(env, JBL_LAUNCHER="1", **{SCOPE: k}) for k in (*LAUNCHED, "jbl-first")}
    stores: dict[str, list[str] | str] = {}
    try:
        rt = _runtime(work / "rt")
        bwrap = ["bwrap", "--unshare-all", "--ro-bind", str(rt / "isolated"), "/", "/bin/true"]
        cmds = {
            "python": [PYTHON, "-c", "pass"],
            "bwrap": bwrap,
            "jbl-dir": [JBL, "run", "--runtime-dir", str(rt), "--", "/bin/true"],
            "jbl-dir-l": [JBL, "run", "--runtime-dir", str(rt), "--", "/bin/true"],
        }
        stores = _stores(work, rt, env)
        cmds.update({k: c for k, c in stores.items() if isinstance(c, list)})
        if isinstance(stores.get("jbl-nodaemon"), list):
            cmds["jbl-view-l"] = list(stores["jbl-nodaemon"])
        for k, c in cmds.items():  # warm caches and bytecode, start the launchers
            for _ in range(1 if k not in envs else 3):
                time_cmd(c, env=envs.get(k, env))
        steps: dict[str, Step] = {k: _step(c, envs.get(k, env)) for k, c in cmds.items()}
        if "jbl-first" in cmds:
            steps["jbl-first"] = _first_step(cmds["jbl-first"], str(work / "jbl-first"),
                                             envs["jbl-first"])
        stats = interleave(steps, n)
        loops = interleave({"bwrap": lambda: time_cmd(_loop(bwrap), env=env),
                            "jbl": lambda: time_cmd(_loop(cmds["jbl-dir-l"]),
                                                    env=envs["jbl-dir-l"])},
                           max(1, min(3, n // 5)))
    finally:
        for e in envs.values():
            _launcher(e, "stop")
        if (work / "mp").is_dir():
            _jbl("umount", str(work / "mp"), env=env)
        shutil.rmtree(work, ignore_errors=True)
    return _figures(stats, loops, stores)


def _figures(stats: dict[str, Stat], loops: dict[str, Stat],
             stores: dict[str, list[str] | str]) -> list[Figure]:
    py, bw = stats["python"], stats["bwrap"]
    figs = [
        Figure("`python -c pass` (the interpreter jbl runs on)", py, None, group="run"),
        Figure("`bwrap --unshare-all --ro-bind D/isolated / /bin/true`", bw, None, group="run"),
    ]
    for key, name in NAMES.items():
        if key not in stats:
            why = stores.get("jbl-nodaemon" if key == "jbl-view-l" else key, "not run")
            figs.append(Figure.missing(name, bw, str(why), group="run"))
            continue
        figs.append(Figure(f"`{name} -- /bin/true` vs python -c pass", stats[key], py,
                           baseline_label="python", group="run"))
        figs.append(_overhead(f"{name}: overhead beyond python start / bwrap", stats[key],
                              py, bw))
    if "jbl-first" in stats and "jbl-nodaemon" in stats:
        first, base = _paired(stats["jbl-first"], py), _paired(stats["jbl-nodaemon"], py)
        figs.append(Figure(f"`{FIRST} -- /bin/true` vs python -c pass", stats["jbl-first"],
                           py, baseline_label="python", group="run"))
        figs.append(Figure(f"{FIRST}: overhead beyond python start / in-process lingering "
                           "view's", first, base, target="<=2",
                           baseline_label="in-process, lingering view", group="run"))
    else:
        figs.append(Figure.missing(FIRST, bw, str(stores.get("jbl-first", "not run")),
                                   group="run"))
    figs.append(Figure(f"{LOOP} x `jbl run --runtime-dir D -- /bin/true` back to back "
                       f"(launcher running) vs {LOOP} x bwrap", loops["jbl"], loops["bwrap"],
                       baseline_label="bwrap", group="run"))
    return figs


def _paired(jbl: Stat, py: Stat) -> Stat:
    # paired per round: interleave ran jbl and python once in every round
    return Stat.of([max(0.0, j - p) for j, p in zip(jbl.samples, py.samples, strict=True)])


def _overhead(name: str, jbl: Stat, py: Stat, bw: Stat) -> Figure:
    over = _paired(jbl, py)
    return Figure(name, over, bw, ratio=over.median / bw.median, target="<=3",
                  baseline_label="bwrap", group="run")


def run(ctx: object) -> list[Figure]:
    reps = getattr(ctx, "reps", None)
    return measure(reps(20, 30) if callable(reps) else 20)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=20, help="runs per command (median; default 20)")
    a = ap.parse_args(argv)
    sys.stdout.write(markdown_table(measure(max(a.n, 1))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
