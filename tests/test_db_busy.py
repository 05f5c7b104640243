"""A store index that another connection keeps busy: every statement's BusyError leaves
store/db.py as StoreBusy (one line, exit 9), never a raw apsw error."""

from __future__ import annotations

from pathlib import Path

import pytest
from jbl.store.db import open_db
from jbl.store.errors import ExitCode, StoreBusy


def test_a_write_after_a_stale_read_is_store_busy(tmp_path: Path) -> None:
    """A deferred read transaction that then writes after another connection committed:
    SQLite answers BUSY_SNAPSHOT at once, without the busy handler."""
    reader, other = open_db(tmp_path, create=True), open_db(tmp_path)
    try:
        reader.execute("BEGIN")
        assert reader.scalar("SELECT value FROM meta WHERE key='chunk_size'")
        with other.write():
            other.execute("INSERT INTO meta(key, value) VALUES ('x', '1')")
        with pytest.raises(StoreBusy) as e:
            reader.execute("INSERT INTO meta(key, value) VALUES ('y', '2')")
        assert e.value.exit_code == ExitCode.BUSY and "locked" in str(e.value)
        reader.execute("ROLLBACK")
    finally:
        reader.close()
        other.close()


def test_a_write_past_the_busy_timeout_is_store_busy(tmp_path: Path) -> None:
    holder, waiter = open_db(tmp_path, create=True), open_db(tmp_path)
    try:
        waiter.conn.set_busy_timeout(50)  # instead of the minute a real writer waits
        with holder.write():
            with pytest.raises(StoreBusy):
                waiter.execute("INSERT INTO meta(key, value) VALUES ('y', '2')")
            with pytest.raises(StoreBusy), waiter.write():
                pass
        assert waiter.conn.getautocommit()  # nothing left open
    finally:
        holder.close()
        waiter.close()
