"""Tables for people, JSON for scripts, progress bars only on a terminal. Nothing else prints.

``emit(args, rows, columns)`` prints a table or, under ``--json``, the rows as JSON.
``progress(args, total, label)`` returns a context manager with ``advance(n)``; it is a no-op
when stderr is not a terminal or ``--quiet`` is given, so scripts and cron stay quiet.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any


def print_json(obj: Any, *, compact: bool = False) -> None:
    """``compact``: one line, through json's C encoder (an indented dump is pure Python:
    ~0.5 s for 10,000 job records)."""
    if compact:
        sys.stdout.write(json.dumps(obj, default=str) + "\n")
        return
    json.dump(obj, sys.stdout, indent=2, sort_keys=False, default=str)
    sys.stdout.write("\n")


def table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> None:
    """Plain aligned table: ``columns`` = [(key, HEADER), ...]."""
    cells = [[h for _, h in columns]] + [["" if r.get(k) is None else str(r.get(k))
                                          for k, _ in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def emit(args: Any, rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]],
         *, empty: str = "", compact: bool = False) -> None:
    if getattr(args, "json", False):
        print_json(list(rows), compact=compact)
    elif rows:
        table(rows, columns)
    elif empty and not getattr(args, "quiet", False):
        print(empty)


def note(args: Any, message: str) -> None:
    """A human remark on stderr (never under --json/--quiet on stdout)."""
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr)


class _Progress:
    def __init__(self, bar: Any, task: Any, label: str = "") -> None:
        self._bar, self._task, self._label = bar, task, label

    def advance(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, advance=n)

    def total(self, n: int | None) -> None:
        if self._bar is not None:
            self._bar.update(self._task, total=n)

    def already(self, n: int) -> None:
        """Say beside the label how many of the version's bytes the store holds already
        (a content-addressed install fetches only the rest: the bar's total)."""
        if self._bar is not None:
            from jbl.store.units import format_size

            self._bar.update(self._task, description=f"{self._label} "
                             f"({format_size(n)} already here)")


@contextmanager
def progress(args: Any, total: int | None, label: str) -> Iterator[_Progress]:
    if getattr(args, "quiet", False) or getattr(args, "json", False) or not sys.stderr.isatty():
        yield _Progress(None, None)
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield _Progress(bar, task, label)
