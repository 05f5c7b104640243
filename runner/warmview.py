"""The store and view a launcher's job process makes ready for ``jbl run --runtime NAME``
before its request arrives (one of runner/warm.py's prepared parts; cli/run_cmd.py takes it).

* **The store**: the one the launcher's environment names in ``JBL_STORE``, else the store
  of the view a job of this user let go of last (``linger.last_used``: jobs that pass
  ``--store``), else the configured or default one (settings). Its index
  is opened (``Store.open``, so the admin check is made too) when this user may write it,
  and the statements a job's ``resolve_installed`` and lease run are compiled ahead.
* **Its view** (``broker.learn``): the shared ``jbl mount`` or the lingering view a job would
  find, and the facts that identify it.

What stays per job, so nothing here can run a job from a stale answer: the version is
resolved in the index (or the published summary) when the request comes, the lease is taken
before the job runs (docs/concurrency.md), the lingering view is held as always, and the
view is used only if ``Known.still`` proves it is the same live mount. A request for
another store, or an index file replaced since (another inode), takes nothing from here.
Preparing anything may fail: the job then does it itself, as an in-process ``jbl run``.

Thread-safety: the job process's main thread.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any


class Ahead:
    """What was made ready for one store."""

    def __init__(self, store_dir: Path) -> None:
        self.store_dir = store_dir  # real path
        self.store: Any = None  # jbl.store.store.Store, open read-write
        self.index_id = (0, 0)
        self.known: Any = None  # jbl.fusefs.broker.Known

    def close(self) -> None:
        if self.store is not None:
            with contextlib.suppress(Exception):
                self.store.close()
            self.store = None


def prepare() -> Ahead | None:
    from jbl.fusefs import broker, linger
    from jbl.fusefs.mounttab import find
    from jbl.store.settings import resolve

    settings = resolve(os.environ)
    rec = None
    if not settings.var("JBL_STORE"):
        mp = linger.last_used()
        rec = find(mp) if mp is not None else None
    store_dir = Path(rec[1].store) if rec is not None else settings.store
    ahead = Ahead(Path(os.path.realpath(store_dir)))
    with contextlib.suppress(Exception):
        ahead.known = broker.learn(ahead.store_dir)
        if ahead.known is not None:
            ahead.known.still()  # its code and pages once, off the job's path
    # the index last: a job process holding it open has learned the view (what
    # tests/test_launcher_view.py waits for)
    with contextlib.suppress(Exception):
        ahead.store, ahead.index_id = _open(ahead.store_dir)
    return ahead


def _open(store_dir: Path) -> tuple[Any, tuple[int, int]]:
    from jbl.store.access import can_admin
    from jbl.store.store import Store

    index = store_dir / "index.db"
    if not (can_admin(store_dir) and os.access(index, os.W_OK)):
        return None, (0, 0)
    store = Store.open(store_dir)
    st = os.stat(index)
    store.versions("")  # compiles the statements resolve_installed runs (no such name)
    store.get_version("", "")
    return store, (st.st_dev, st.st_ino)


def take(ahead: Ahead | None, store_dir: Path) -> tuple[Any, Any]:
    """(open Store or None, Known or None) for a job of ``store_dir`` (a real path). The
    Store only while its index is the file it opened (the caller closes it)."""
    if ahead is None or ahead.store_dir != store_dir:
        return None, None
    store, ahead.store = ahead.store, None
    if store is not None:
        try:
            st = os.stat(store_dir / "index.db")
            same = (st.st_dev, st.st_ino) == ahead.index_id
        except OSError:
            same = False
        if not same:
            store.close()
            store = None
    return store, ahead.known
