"""``jbl gpu list``: the host's NVIDIA GPUs and which job holds each.

What exists comes from the driver (``runner.gpu.discover``), what is taken from the kernel's
lock table (``runner.gpu.holders``), so any user may list; the holder's pid and user show for
every GPU, its job id only for the caller's own jobs (root: every job's).
"""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("gpu", parents=parents, help="the host's GPUs and the jobs holding them",
                       description="NVIDIA GPUs for jobs (jbl run --gpu=N).")
    gsub = p.add_subparsers(dest="gpu_command", metavar="SUBCOMMAND")
    gsub.required = True
    lp = gsub.add_parser("list", parents=parents, help="what exists and what is taken",
                         description="List the GPUs the driver reports and who holds them.")
    lp.set_defaults(func=list_gpus)


def list_gpus(args: argparse.Namespace) -> int:
    from jbl.cli.output import emit
    from jbl.runner import gpu
    from jbl.store.units import format_size

    root = gpu.resolve_driver_root(args.settings)
    gpus = gpu.discover(root)
    taken = gpu.holders(root, gpus) if gpus else {}
    rows = []
    for g in gpus:
        h = taken.get(g.bus_id)
        rows.append({"index": g.index, "minor": g.minor, "bus_id": g.bus_id, "model": g.model,
                     "uuid": g.uuid, "memory": g.memory,
                     "memory_text": format_size(g.memory) if g.memory else "",
                     "status": "taken" if h else "free",
                     "job_id": (h.job_id or None) if h else None, "pid": h.pid if h else None,
                     "user": gpu.user_name(h.uid) if h else None})
    if args.json:
        for r in rows:
            del r["memory_text"]
    where = root / "proc/driver/nvidia/gpus"
    emit(args, rows, [("index", "GPU"), ("minor", "MINOR"), ("bus_id", "BUS"),
                      ("model", "MODEL"), ("memory_text", "MEMORY"), ("status", "STATUS"),
                      ("job_id", "JOB"), ("pid", "PID"), ("user", "USER")],
         empty=f"no NVIDIA GPUs on this host (nothing in {where}: no GPU or no driver)")
    return 0
