"""Every prediction, written in the background to SQLite (default) or PostgreSQL, without making inference wait.

`PredictionLog.record` puts rows on a bounded queue and returns at once; a writer thread takes them off in batches
and inserts each batch in one transaction. When the queue is full the rows are dropped and counted (`dropped`), so
overload slows nothing down and loses nothing silently. `close` drains the queue, so a clean stop loses nothing.
Rows hold the encounter's fields as sent (the request model refuses identifiers), never a patient identifier.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

log = logging.getLogger(__name__)

TABLE = "predictions"
COLUMNS = (
    "request_id", "predicted_at", "endpoint", "model_name", "model_version",
    "probability", "decision", "risk_band", "inputs",
)  # fmt: skip
_metadata = sa.MetaData()
predictions = sa.Table(
    TABLE,
    _metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("request_id", sa.String(128), nullable=False),
    sa.Column("predicted_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("endpoint", sa.String(32), nullable=False),
    sa.Column("model_name", sa.String(128), nullable=False),
    sa.Column("model_version", sa.String(32), nullable=False, index=True),
    sa.Column("probability", sa.Float(), nullable=False),
    sa.Column("decision", sa.Boolean(), nullable=False),
    sa.Column("risk_band", sa.String(16), nullable=False),
    sa.Column("inputs", sa.Text(), nullable=False),
)


def engine_for(url: str) -> sa.Engine:
    """An engine on `url` (sqlite:///path or postgresql://…), with the table created if missing."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 30})

        @sa.event.listens_for(engine, "connect")
        def _wal(connection, _record) -> None:  # several workers append to one file
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
    elif url.startswith(("postgresql://", "postgres://", "postgresql+")):
        engine = sa.create_engine(url.replace("postgres://", "postgresql://", 1), pool_size=1, max_overflow=0)
    else:
        raise ValueError(f"prediction log URL {url!r} is neither sqlite:///… nor postgresql://…")
    _metadata.create_all(engine)
    return engine


class PredictionLog:
    """A bounded queue of prediction rows and the thread that writes them to `url`."""

    def __init__(
        self,
        url: str,
        *,
        capacity: int = 50_000,
        batch_rows: int = 2_000,
        flush_seconds: float = 0.5,
        on_drop: Callable[[int], None] = lambda n: None,
    ) -> None:
        self.url = url
        self.engine = engine_for(url)
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=capacity)
        self._batch_rows = batch_rows
        self._flush_seconds = flush_seconds
        self._on_drop = on_drop
        self.dropped = 0
        self.written = 0
        self.failed = 0
        self._closed = False
        self._writer = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._writer.start()

    def record(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """Queue rows (COLUMNS but `predicted_at`, which is now, and `inputs`, a dict); the number dropped."""
        now = datetime.now(UTC)
        dropped = 0
        for row in rows:
            if self._closed:
                dropped += 1
                continue
            try:
                self._queue.put_nowait({**row, "predicted_at": now})
            except queue.Full:
                dropped += 1
        if dropped:
            self.dropped += dropped
            self._on_drop(dropped)
        return dropped

    def _take(self) -> tuple[list[dict[str, Any]], bool]:
        """Rows to write, waiting up to the flush interval for the first; and whether the stop mark came."""
        rows: list[dict[str, Any]] = []
        deadline = time.monotonic() + self._flush_seconds
        while len(rows) < self._batch_rows:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic())) if not rows else self._queue.get_nowait()
            except queue.Empty:
                if rows or time.monotonic() >= deadline:
                    return rows, False
                continue
            if item is None:
                return rows, True
            rows.append(item)
        return rows, False

    def _write(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            row["inputs"] = json.dumps(row["inputs"], separators=(",", ":"))
        for attempt in range(3):
            try:
                with self.engine.begin() as connection:
                    connection.execute(predictions.insert(), rows)
                self.written += len(rows)
                return
            except sa.exc.SQLAlchemyError as error:
                log.warning("prediction log: writing %d rows failed (attempt %d): %s", len(rows), attempt + 1, error)
                time.sleep(0.2 * (attempt + 1))
        self.failed += len(rows)
        self.dropped += len(rows)
        self._on_drop(len(rows))
        log.error("prediction log: %d rows dropped after 3 failed writes to %s", len(rows), self.url)

    def _run(self) -> None:
        stop = False
        while not stop:
            rows, stop = self._take()
            if rows:
                self._write(rows)

    def close(self, timeout: float = 30.0) -> None:
        """Write everything queued, then stop the writer. Rows recorded afterwards are dropped and counted."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._writer.join(timeout)
        if self._writer.is_alive():
            log.error("prediction log: the writer did not finish within %.0f s; %d rows may be lost", timeout,
                      self._queue.qsize())
        self.engine.dispose()


def read_predictions(url: str) -> list[dict[str, Any]]:
    """Every logged row, oldest first (for tests, reports and audits)."""
    engine = engine_for(url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(sa.select(predictions).order_by(predictions.c.id)).mappings().all()
        return [dict(row) | {"inputs": json.loads(row["inputs"])} for row in rows]
    finally:
        engine.dispose()
