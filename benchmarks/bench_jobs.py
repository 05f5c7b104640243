"""``jbl job list`` with 10,000 job records, the whole command, against a 100 ms budget.

Owns the job-record figures (issue 13). A scratch records directory (``JBL_JOBS_DIR``: a 0700
directory of the caller's, under ``/run`` for root, as the records' owner checks refuse a
sticky ``/tmp``) is filled in-process with 10,000 ended jobs (one transaction, untimed), then
``jbl job list`` and ``jbl job list --json`` are timed as a user runs them (a fresh process
each time: interpreter, imports, database open, query, output; with compiled bytecode, in a
scratch ``PYTHONPYCACHEPREFIX`` when ``PYTHONDONTWRITEBYTECODE`` is set), interleaved with
``python -c pass`` on the same interpreter, shown as a reference for the interpreter's own
share. ``--state running`` (a filter that leaves no row) and the CPU time of the whole
command against ``python -c pass``'s (what it costs whatever else loads the machine) are
references.

``main(argv)`` prints a markdown table (``python -m benchmarks.bench_jobs [-n 10]``);
``run(ctx)`` is the suite's entry point.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .measure import Figure, Stat, interleave, markdown_table, time_cmd

JBL = str(Path(sys.executable).with_name("jbl"))
RECORDS = 10_000
BUDGET_S = 0.100


def fill(directory: Path, n: int = RECORDS) -> None:
    """``n`` ended jobs in ``directory``'s database, as jbl run would have left them."""
    from jbl.runner.jobstore import JobStore

    store = JobStore.open_own(directory)
    assert store is not None
    t = time.time() - 86400
    try:
        with store.conn:
            for i in range(n):
                job = f"job-{i:08x}"
                store.begin({"id": job, "runtime": "pyrt@1.0.0",
                             "command": ["python", "-c", "pass", str(i)],
                             "limits": {"memory": 1 << 30, "kill_after": 5.0},
                             "env": {"A": "b", "TOKEN": "***"}, "supervisor_pid": 1,
                             "supervisor_start": 0, "created": t + i})
                store.finish(job, exit_status=i % 3, reason="exited", peak_memory=1 << 20,
                             cpu_time=0.01)
    finally:
        store.close()


def cpu_cmd(cmd: list[str], env: dict[str, str]) -> float:
    """CPU seconds (user + system) of one run of ``cmd``: what the command costs whatever
    else loads the machine (wall time on a busy 2-core machine is mostly waiting)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _records_dir() -> Path:
    base = "/run" if os.geteuid() == 0 else str(Path.home())
    d = Path(tempfile.mkdtemp(prefix="jbl-bench-jobs-", dir=base))
    d.chmod(0o700)
    return d


def measure(n: int) -> dict[str, Stat]:
    d = _records_dir()
    try:
        fill(d)
        env = dict(os.environ, JBL_JOBS_DIR=str(d))
        if env.pop("PYTHONDONTWRITEBYTECODE", None):  # compiled, as an installed jbl is:
            env["PYTHONPYCACHEPREFIX"] = str(d / "pycache")  # written by the warm-up run
        out = subprocess.run([JBL, "job", "list", "--json"], env=env, capture_output=True,
                             text=True, check=True).stdout
        if out.count('"id"') != RECORDS:
            raise RuntimeError(f"jbl job list --json listed {out.count(chr(34) + 'id')} "
                               f"of {RECORDS} records")
        steps = {
            "list": lambda: time_cmd([JBL, "job", "list"], env=env),
            "json": lambda: time_cmd([JBL, "job", "list", "--json"], env=env),
            "running": lambda: time_cmd([JBL, "job", "list", "--state", "running"], env=env),
            "python": lambda: time_cmd([sys.executable, "-c", "pass"], env=env),
            "list_cpu": lambda: cpu_cmd([JBL, "job", "list"], env),
            "python_cpu": lambda: cpu_cmd([sys.executable, "-c", "pass"], env),
        }
        return interleave(steps, n, warmup=1)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def figures(st: dict[str, Stat]) -> list[Figure]:
    budget = Stat.of([BUDGET_S])
    kw = {"group": "jobs", "baseline_label": "100 ms budget"}
    tag = f"{RECORDS:,} records"
    return [
        Figure(f"jbl job list, {tag} (whole command)", st["list"], budget, target="<=1",
               **kw),  # type: ignore[arg-type]
        Figure(f"jbl job list --json, {tag}", st["json"], budget, target="<=1",
               **kw),  # type: ignore[arg-type]
        Figure(f"jbl job list --state running, {tag} (none running)", st["running"], None,
               group="jobs"),
        Figure("python -c pass (the same interpreter)", st["python"], None, group="jobs"),
        Figure(f"jbl job list, {tag}: CPU time (user + system)", st["list_cpu"],
               st["python_cpu"], baseline_label="python -c pass, CPU", group="jobs"),
    ]


def run(ctx: object) -> list[Figure]:
    n = ctx.reps(5, 15)  # type: ignore[attr-defined]
    st = measure(n)
    ctx.data["jobs"] = {k: v.median for k, v in st.items()}  # type: ignore[attr-defined]
    return figures(st)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_jobs")
    ap.add_argument("-n", type=int, default=10, help="rounds (default 10)")
    a = ap.parse_args(argv)
    print(markdown_table(figures(measure(a.n))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
