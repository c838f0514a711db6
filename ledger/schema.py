"""The ledger's tables as SQLAlchemy Core objects, mirroring the newest migration.

The migrations in ``migrations/versions`` are the DDL that really runs; this module is
what the code queries with, plus ``SCHEMA_HEAD`` so that opening a ledger that is
already up to date can be decided with one cheap query, without importing alembic.
A test compares these tables with a freshly migrated file, and ``SCHEMA_HEAD`` with
alembic's head, so the two cannot drift apart silently.
"""

from sqlalchemy import REAL, Column, Index, Integer, MetaData, Table, Text, func, text

#: Revision id of the newest migration; a ledger file at this revision needs no upgrade.
from .revision import SCHEMA_HEAD  # noqa: E402,F401  (kept in its own module: no SQLAlchemy needed)

metadata = MetaData()

#: The append-only log. ``seq`` is the rowid (gap-free: the store inserts max+1 in the
#: write transaction and triggers forbid UPDATE/DELETE); ``version`` counts events per
#: (run, job) stream, with run-level events (job NULL) forming the (run, '') stream.
events = Table(
    "events",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("ts", REAL, nullable=False),
    Column("run", Text, nullable=False),
    Column("job", Text, nullable=True),
    Column("version", Integer, nullable=False),
    Column("attempt", Integer, nullable=False, server_default=text("0")),
    Column("kind", Text, nullable=False),
    Column("data", Text, nullable=False),
)

Index("ux_events_stream", events.c.run, func.coalesce(events.c.job, ""), events.c.version, unique=True)
Index("ix_events_kind", events.c.kind)
Index("ix_events_ts", events.c.ts)
Index("ix_events_run_job", events.c.run, events.c.job)
Index("ix_events_run_job_attempt", events.c.run, events.c.job, events.c.attempt)

#: Small facts about the file itself (created_at, host, schema_note).
meta = Table(
    "meta",
    metadata,
    Column("key", Text, primary_key=True),
    Column("value", Text, nullable=True),
)

#: Triggers that make SQLite itself refuse to rewrite history.
TRIGGERS = ("events_no_update", "events_no_delete", "events_no_replace")

#: view -> its columns, in order. docs/ can be generated from this; a test checks it
#: against the views the migrations create.
VIEWS = {
    "event_log": (
        "seq", "time", "ts", "run", "job", "version", "attempt", "kind", "reason", "data",
    ),
    "job_attempts": (
        "run", "job", "attempt", "gpus", "gpu_uuids", "session", "log", "pid",
        "requested_at", "started_at", "ended_at", "duration", "exit_code", "signal",
        "outcome", "oom_kind", "reason", "first_seq", "last_seq",
    ),
    "retry_history": (
        "seq", "time", "ts", "run", "job", "attempt", "kind", "reason", "oom_kind",
        "exit_code", "delay", "retry_at", "next_attempt", "actor",
    ),
}
