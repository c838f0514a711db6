"""events and meta tables; the database refuses UPDATE, DELETE and REPLACE on events

Revision ID: 0001
Revises:
Create Date: 2024-12-03
"""
import socket

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

APPEND_ONLY = "SELECT RAISE(ABORT, 'events are append-only');"


def upgrade():
    op.create_table(
        "events",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("ts", sa.REAL, nullable=False),
        sa.Column("run", sa.Text, nullable=False),
        sa.Column("job", sa.Text, nullable=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("data", sa.Text, nullable=False),
    )
    # A duplicated (run, job, version) means two writers raced: fail loudly.
    op.execute("CREATE UNIQUE INDEX ux_events_stream ON events (run, COALESCE(job, ''), version)")
    op.create_index("ix_events_kind", "events", ["kind"])
    op.create_index("ix_events_ts", "events", ["ts"])
    op.create_index("ix_events_run_job", "events", ["run", "job"])
    op.execute("CREATE TRIGGER events_no_update BEFORE UPDATE ON events BEGIN %s END" % APPEND_ONLY)
    op.execute("CREATE TRIGGER events_no_delete BEFORE DELETE ON events BEGIN %s END" % APPEND_ONLY)
    # INSERT OR REPLACE deletes the conflicting row without firing DELETE triggers
    # (unless recursive_triggers is on), so refuse any insert that would collide.
    op.execute(
        "CREATE TRIGGER events_no_replace BEFORE INSERT ON events "
        "WHEN EXISTS (SELECT 1 FROM events WHERE seq = NEW.seq) "
        "OR EXISTS (SELECT 1 FROM events WHERE run = NEW.run AND COALESCE(job, '') = COALESCE(NEW.job, '') "
        "AND version = NEW.version) "
        "BEGIN %s END" % APPEND_ONLY
    )
    op.create_table(
        "meta",
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("value", sa.Text, nullable=True),
    )
    meta = sa.table("meta", sa.column("key", sa.Text), sa.column("value", sa.Text))
    op.execute(meta.insert().values(key="created_at", value=sa.func.strftime("%Y-%m-%dT%H:%M:%SZ", "now")))
    op.execute(meta.insert().values(key="host", value=socket.gethostname()))


def downgrade():
    op.drop_table("meta")
    for trigger in ("events_no_replace", "events_no_delete", "events_no_update"):
        op.execute("DROP TRIGGER %s" % trigger)
    op.drop_table("events")
