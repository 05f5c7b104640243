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
from pathlib import Path

from .measure import Figure, Stat, interleave, markdown_table, time_cmd

REPO = Path(__file__).resolve().parent.parent
JBL = str(Path(sys.executable).with_name("jbl"))
PYTHON = sys.executable  # the interpreter (and site) jbl runs on: see the module docstring
SPEC = "benchrt@1.0.0"


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
    for key in ("jbl-mount", "jbl-nodaemon", "jbl-perjob"):
        store = work / key
        err = err or _jbl("--store", str(store), "store", "import", str(tarball), env=env)
        if err is None and key == "jbl-mount":
            (work / "mp").mkdir()
            err = _jbl("--store", str(store), "mount", str(work / "mp"), env=env)
        prefix = ["env", "JBL_VIEW_LINGER=0"] if key == "jbl-perjob" else []
        out[key] = f"jbl: {err}" if err else [
            *prefix, JBL, "--store", str(store), "run", "--runtime", SPEC, "--", "/bin/true"]
    return out


def measure(n: int) -> list[Figure]:
    work = Path(tempfile.mkdtemp(prefix="jbl-bench-run-"))
    env = dict(os.environ)
    if env.pop("PYTHONDONTWRITEBYTECODE", None):
        env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    stores: dict[str, list[str] | str] = {}
    try:
        rt = _runtime(work / "rt")
        cmds = {
            "python": [PYTHON, "-c", "pass"],
            "bwrap": ["bwrap", "--unshare-all", "--ro-bind", str(rt / "isolated"), "/",
                      "/bin/true"],
            "jbl-dir": [JBL, "run", "--runtime-dir", str(rt), "--", "/bin/true"],
        }
        stores = _stores(work, rt, env)
        cmds.update({k: c for k, c in stores.items() if isinstance(c, list)})
        for c in cmds.values():  # warm caches and bytecode; fail early with the real error
            time_cmd(c, env=env)
        stats = interleave({k: (lambda c=c: time_cmd(c, env=env)) for k, c in cmds.items()}, n)
    finally:
        if (work / "mp").is_dir():
            _jbl("umount", str(work / "mp"), env=env)
        shutil.rmtree(work, ignore_errors=True)
    py, bw = stats["python"], stats["bwrap"]
    figs = [
        Figure("`python -c pass` (the interpreter jbl runs on)", py, None, group="run"),
        Figure("`bwrap --unshare-all --ro-bind D/isolated / /bin/true`", bw, None, group="run"),
    ]
    names = {"jbl-dir": "jbl run --runtime-dir D",
             "jbl-mount": "jbl run --runtime NAME, jbl mount running",
             "jbl-nodaemon": "jbl run --runtime NAME, no daemon (lingering private view)",
             "jbl-perjob": "jbl run --runtime NAME, no daemon, JBL_VIEW_LINGER=0 (view per job)"}
    for key, name in names.items():
        if key not in stats:
            figs.append(Figure.missing(name, bw, str(stores.get(key, "not run")), group="run"))
            continue
        figs.append(Figure(f"`{name} -- /bin/true` vs python -c pass", stats[key], py,
                           baseline_label="python", group="run"))
        figs.append(_overhead(f"{name}: overhead beyond python start / bwrap", stats[key],
                              py, bw))
    return figs


def _overhead(name: str, jbl: Stat, py: Stat, bw: Stat) -> Figure:
    # paired per round: interleave ran jbl and python once in every round
    over = Stat.of([max(0.0, j - p) for j, p in zip(jbl.samples, py.samples, strict=True)])
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
