"""post-mortem views (event_log, job_attempts, retry_history) and an attempt index

Revision ID: 0002
Revises: 0001
Create Date: 2024-12-03
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# Views are frozen here, not imported from ledger.schema: a migration must keep
# creating what it created the day it was written.

EVENT_LOG = """
CREATE VIEW event_log AS
SELECT seq, datetime(ts, 'unixepoch') AS time, ts, run, job, version, attempt, kind,
       COALESCE(json_extract(data, '$.reason'), json_extract(data, '$.line')) AS reason,
       data
FROM events
"""

# One row per launched (or launch-requested) attempt. For each event kind the latest
# event of the attempt wins (an unconfirmed launch can be requested again).
JOB_ATTEMPTS = """
CREATE VIEW job_attempts AS
WITH a AS (
    SELECT run, job, attempt, MIN(seq) AS first_seq, MAX(seq) AS last_seq,
           MAX(CASE WHEN kind = 'launch_requested' THEN seq END) AS req_seq,
           MAX(CASE WHEN kind IN ('launched', 'adopted') THEN seq END) AS start_seq,
           MAX(CASE WHEN kind = 'launched' THEN seq END) AS launched_seq,
           MAX(CASE WHEN kind = 'exited' THEN seq END) AS exit_seq,
           MAX(CASE WHEN kind = 'timed_out' THEN seq END) AS timeout_seq,
           MAX(CASE WHEN kind IN ('completed', 'oom_detected', 'failed', 'launch_failed', 'cancelled')
                    THEN seq END) AS verdict_seq
    FROM events
    WHERE job IS NOT NULL
      AND kind IN ('launch_requested', 'launched', 'adopted', 'exited', 'timed_out', 'completed',
                   'oom_detected', 'failed', 'launch_failed', 'cancelled')
    GROUP BY run, job, attempt
    HAVING req_seq IS NOT NULL OR start_seq IS NOT NULL
)
SELECT a.run, a.job, a.attempt,
       json_extract(r.data, '$.gpus') AS gpus,
       json_extract(r.data, '$.gpu_uuids') AS gpu_uuids,
       COALESCE(json_extract(r.data, '$.session'), json_extract(l.data, '$.session')) AS session,
       json_extract(r.data, '$.log') AS log,
       json_extract(l.data, '$.pid') AS pid,
       datetime(r.ts, 'unixepoch') AS requested_at,
       datetime(l.ts, 'unixepoch') AS started_at,
       datetime(COALESCE(json_extract(x.data, '$.ended_at'), x.ts,
                         CASE WHEN v.kind IN ('launch_failed', 'cancelled') THEN v.ts END),
                'unixepoch') AS ended_at,
       COALESCE(json_extract(x.data, '$.duration'),
                COALESCE(json_extract(x.data, '$.ended_at'), x.ts) - l.ts) AS duration,
       json_extract(x.data, '$.exit_code') AS exit_code,
       json_extract(x.data, '$.signal') AS signal,
       CASE
           WHEN v.kind = 'completed' THEN 'success'
           WHEN v.kind = 'oom_detected' THEN 'oom'
           WHEN v.kind = 'failed' AND a.timeout_seq IS NOT NULL THEN 'timeout'
           WHEN v.kind = 'failed' THEN COALESCE(json_extract(v.data, '$.outcome'), 'failed')
           WHEN v.kind IS NOT NULL THEN v.kind
           WHEN x.seq IS NOT NULL THEN 'exited'
           WHEN l.seq IS NOT NULL THEN 'running'
           ELSE 'launching'
       END AS outcome,
       json_extract(v.data, '$.oom_kind') AS oom_kind,
       CASE WHEN v.kind = 'oom_detected' THEN COALESCE(json_extract(v.data, '$.line'), 'CUDA out of memory')
            ELSE json_extract(v.data, '$.reason') END AS reason,
       a.first_seq, a.last_seq
FROM a
LEFT JOIN events r ON r.seq = a.req_seq
LEFT JOIN events l ON l.seq = COALESCE(a.launched_seq, a.start_seq)
LEFT JOIN events x ON x.seq = a.exit_seq
LEFT JOIN events v ON v.seq = a.verdict_seq
"""

RETRY_HISTORY = """
CREATE VIEW retry_history AS
SELECT seq, datetime(ts, 'unixepoch') AS time, ts, run, job, attempt, kind,
       COALESCE(json_extract(data, '$.line'), json_extract(data, '$.reason')) AS reason,
       json_extract(data, '$.oom_kind') AS oom_kind,
       json_extract(data, '$.exit_code') AS exit_code,
       json_extract(data, '$.delay') AS delay,
       datetime(json_extract(data, '$.retry_at'), 'unixepoch') AS retry_at,
       json_extract(data, '$.next_attempt') AS next_attempt,
       json_extract(data, '$.actor') AS actor
FROM events
WHERE kind IN ('oom_detected', 'failed', 'launch_failed', 'retried', 'manual_retry', 'stuck')
"""

SCHEMA_NOTE = ("events is append-only (triggers refuse UPDATE/DELETE/REPLACE); "
               "views: event_log, job_attempts, retry_history")


def upgrade():
    op.create_index("ix_events_run_job_attempt", "events", ["run", "job", "attempt"])
    op.execute(EVENT_LOG)
    op.execute(JOB_ATTEMPTS)
    op.execute(RETRY_HISTORY)
    meta = sa.table("meta", sa.column("key", sa.Text), sa.column("value", sa.Text))
    op.execute(meta.delete().where(meta.c.key == "schema_note"))
    op.execute(meta.insert().values(key="schema_note", value=SCHEMA_NOTE))


def downgrade():
    meta = sa.table("meta", sa.column("key", sa.Text), sa.column("value", sa.Text))
    op.execute(meta.delete().where(meta.c.key == "schema_note"))
    for view in ("retry_history", "job_attempts", "event_log"):
        op.execute("DROP VIEW %s" % view)
    op.drop_index("ix_events_run_job_attempt", table_name="events")
