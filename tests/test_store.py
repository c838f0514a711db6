"""The SQLite ledger store, on real files: permissions, durability rules the database
itself enforces, migrations, read-only SQL, backup, disk full, and concurrent processes."""

import importlib.resources
import os
import sqlite3
import stat
import time
import warnings

import pytest

from fixtures_store import fill_disk, finish, job_life, python, raw, run_with_history, tiny_tmpfs, wait_for
from ledger import schema, store as store_mod
from ledger.errors import ConflictError, DiskFullError, LedgerError, NotFoundError, ReadOnlyError, StoreError
from ledger.events import Event
from ledger.projection import project
from ledger.store import SqlError, default_db_path, migrate, open_store


@pytest.fixture
def db(tmp_path):
    return str(tmp_path / "ledger.db")


@pytest.fixture
def store(db):
    s = open_store(db)
    yield s
    s.close()


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


# ---- where and how the file is created ----

def test_default_path_is_home_ledger_unless_env_overrides(tmp_path):
    assert default_db_path({"HOME": "/home/ana"}) == "/home/ana/.ledger/ledger.db"
    assert default_db_path({"HOME": "/home/ana", "LEDGER_DB": "/data/x.db"}) == "/data/x.db"


def test_file_is_0600_and_created_folders_0700_whatever_the_umask(tmp_path):
    path = tmp_path / "new" / "deeper" / "ledger.db"
    old = os.umask(0)
    try:
        with open_store(str(path)) as s:
            s.append([Event("run_submitted", "r1")])
            assert mode(str(path)) == 0o600
            assert mode(str(path) + "-wal") == 0o600
            assert mode(str(path) + "-shm") == 0o600
    finally:
        os.umask(old)
    assert mode(str(tmp_path / "new")) == 0o700
    assert mode(str(tmp_path / "new" / "deeper")) == 0o700


def test_existing_folder_mode_is_left_alone(tmp_path):
    os.chmod(str(tmp_path), 0o755)
    open_store(str(tmp_path / "l.db")).close()
    assert mode(str(tmp_path)) == 0o755


def test_wal_mode_is_on(store, db):
    store.append([Event("run_submitted", "r1")])
    assert raw(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_missing_file_readonly_or_no_create_is_not_found(tmp_path):
    missing = str(tmp_path / "nope.db")
    with pytest.raises(NotFoundError, match="no ledger at .*nope.db"):
        open_store(missing, readonly=True)
    with pytest.raises(NotFoundError):
        open_store(missing, create=False)
    assert not os.path.exists(missing)


def test_garbage_and_foreign_files_are_refused_untouched(tmp_path):
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database at all" * 100)
    with pytest.raises(StoreError, match="cannot open ledger at .*garbage.db"):
        open_store(str(garbage))
    foreign = str(tmp_path / "foreign.db")
    raw(foreign).execute("CREATE TABLE photos (id INTEGER)")
    with pytest.raises(StoreError, match="not a ledger .*photos"):
        open_store(foreign)
    names = {n for (n,) in raw(foreign).execute("SELECT name FROM sqlite_master")}
    assert names == {"photos"}


# ---- appending ----

def test_append_assigns_gap_free_seqs_and_per_stream_versions(store):
    stored = store.append(run_with_history())
    assert [e.seq for e in stored] == list(range(1, len(stored) + 1))
    more = store.append([Event("run_submitted", "r2"), Event("submitted", "r2", "a")])
    assert [e.seq for e in more] == [len(stored) + 1, len(stored) + 2]
    by_stream = {}
    for e in stored + more:
        by_stream.setdefault((e.run, e.job), []).append(e.version)
    for versions in by_stream.values():
        assert versions == list(range(1, len(versions) + 1))
    assert store.stream_version("r1", "a") == len(by_stream[("r1", "a")])
    assert store.stream_version("r1", None) == 1
    assert store.stream_version("r9", "x") == 0
    assert store.last_seq() == store.count() == len(stored) + 2


def test_append_stamps_missing_ts_and_keeps_given_ones(store):
    before = time.time()
    given, missing = store.append([Event("run_submitted", "r1", ts=123.5), Event("paused", "r1")])
    assert given.ts == 123.5
    assert missing.ts >= before
    assert [e.ts for e in store.read()] == [123.5, missing.ts]


def test_stored_events_read_back_equal(store):
    stored = store.append(run_with_history())
    assert list(store.read()) == stored


def test_stale_expected_version_is_a_conflict_and_writes_nothing(store):
    store.append([Event("run_submitted", "r1"), Event("submitted", "r1", "a")])
    with pytest.raises(ConflictError, match="r1/a is at version 1, expected 0 .nothing was written"):
        store.append([Event("blocked", "r1", "a", data={"reason": "x"}), Event("paused", "r1")],
                     expect={("r1", "a"): 0})
    assert store.count() == 2
    ok = store.append([Event("blocked", "r1", "a")], expect={("r1", "a"): 1, ("r1", None): 1})
    assert ok[0].version == 2


def test_readonly_store_refuses_append(store, db):
    store.append([Event("run_submitted", "r1")])
    with open_store(db, readonly=True) as ro:
        assert ro.count() == 1
        with pytest.raises(StoreError, match="read-only"):
            ro.append([Event("paused", "r1")])
    assert store.count() == 1


def test_locked_ledger_is_a_clear_store_error(db, monkeypatch):
    monkeypatch.setattr(store_mod, "BUSY_TIMEOUT_MS", 200)
    with open_store(db) as s:
        s.append([Event("run_submitted", "r1")])
        holder = raw(db)
        holder.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(StoreError, match="locked by another writer .*could not record paused"):
                s.append([Event("paused", "r1")])
        finally:
            holder.execute("ROLLBACK")
        s.append([Event("paused", "r1")])
        assert s.count() == 2


# ---- the database enforces append-only ----

def test_duplicate_stream_version_is_rejected_by_sqlite(store, db):
    store.append([Event("run_submitted", "r1"), Event("submitted", "r1", "a")])
    conn = raw(db)
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("INSERT INTO events (seq, ts, run, job, version, attempt, kind, data) "
                     "VALUES (99, 1, 'r1', 'a', 1, 0, 'submitted', '{}')")
    with pytest.raises(sqlite3.IntegrityError):  # run-level stream: job NULL compares as ''
        conn.execute("INSERT INTO events (seq, ts, run, job, version, attempt, kind, data) "
                     "VALUES (99, 1, 'r1', NULL, 1, 0, 'paused', '{}')")
    # the unique index alone (without the trigger) also refuses it
    conn.execute("DROP TRIGGER events_no_replace")
    with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
        conn.execute("INSERT INTO events (seq, ts, run, job, version, attempt, kind, data) "
                     "VALUES (99, 1, 'r1', NULL, 1, 0, 'paused', '{}')")
    assert store.count() == 2


def test_update_delete_and_replace_are_rejected_by_triggers(store, db):
    store.append([Event("run_submitted", "r1", data={"project": "p"})])
    conn = raw(db)
    for statement in ("UPDATE events SET kind = 'x'", "DELETE FROM events",
                      "INSERT OR REPLACE INTO events (seq, ts, run, job, version, attempt, kind, data) "
                      "VALUES (1, 1, 'evil', NULL, 1, 0, 'forged', '{}')"):
        with pytest.raises(sqlite3.IntegrityError, match="events are append-only"):
            conn.execute(statement)
    assert [(e.seq, e.kind, e.data) for e in store.read()] == [(1, "run_submitted", {"project": "p"})]


# ---- reading ----

def test_read_filters(store):
    events = [Event("run_submitted", "r1", ts=100.0)]
    events += job_life("r1", "a", t0=110.0)
    events += [Event("run_submitted", "r2", ts=200.0)] + job_life("r2", "a", t0=210.0, outcome="oom")
    stored = store.append(events)

    def seqs(**kw):
        return [e.seq for e in store.read(**kw)]

    assert seqs() == [e.seq for e in stored]
    assert seqs(since_seq=3) == [e.seq for e in stored if e.seq > 3]
    assert seqs(until_seq=3) == [1, 2, 3]
    assert seqs(since_seq=2, until_seq=4) == [3, 4]
    assert seqs(since_ts=200.0) == [e.seq for e in stored if e.ts >= 200.0]
    assert seqs(until_ts=111.0) == [e.seq for e in stored if e.ts <= 111.0]
    assert seqs(run="r2") == [e.seq for e in stored if e.run == "r2"]
    assert seqs(run="r1", job="a") == [e.seq for e in stored if e.run == "r1" and e.job == "a"]
    assert seqs(kinds="launched") == [e.seq for e in stored if e.kind == "launched"]
    assert seqs(kinds=["completed", "oom_detected"]) == [e.seq for e in stored
                                                         if e.kind in ("completed", "oom_detected")]
    assert seqs(run="r2", kinds=["submitted"], limit=5) == [stored[7].seq]
    assert seqs(limit=2) == [1, 2]
    assert seqs(run="nobody") == []


def test_read_streams_many_events_in_batches(store):
    n = store_mod.READ_BATCH * 2 + 17
    store.append([Event("run_submitted", "big")] + [Event("submitted", "big", "j%d" % i) for i in range(n)])
    reader = store.read(since_seq=1)
    first = next(reader)
    assert first.seq == 2 and first.job == "j0"
    rest = list(reader)
    assert len(rest) == n - 1 and rest[-1].seq == n + 1
    assert store.count() == n + 1


def test_state_equals_projection_over_read(store):
    store.append(run_with_history("r1") + run_with_history("r2", t0=5000.0))
    everything = list(store.read())
    assert store.state() == project(everything)
    assert store.state().runs["r1"].jobs["b"].attempt == 2
    assert store.state(until_seq=8) == project(everything[:8])
    assert store.state(until_ts=1100.0) == project([e for e in everything if e.ts <= 1100.0])


def test_meta_get_and_set(store):
    assert store.meta_get("created_at")
    assert store.meta_get("host")
    assert store.meta_get("missing", "dflt") == "dflt"
    store.meta_set("note", "hello")
    store.meta_set("note", "again")
    assert store.meta_get("note") == "again"


# ---- migrations ----

def test_schema_head_is_alembic_head():
    from alembic.script import ScriptDirectory
    heads = ScriptDirectory.from_config(store_mod.alembic_config()).get_heads()
    assert heads == [schema.SCHEMA_HEAD]


def test_schema_module_matches_migrated_file(store, db):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SQLite cannot reflect the COALESCE index; checked below
        with store._engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), schema.metadata) == []
    conn = raw(db)
    names = {n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type IN ('index', 'trigger')")}
    assert {"ux_events_stream", *schema.TRIGGERS} <= names
    for view, columns in schema.VIEWS.items():
        cur = conn.execute("SELECT * FROM %s LIMIT 0" % view)
        assert tuple(d[0] for d in cur.description) == columns, view


def test_old_file_is_upgraded_in_place_with_data_intact(tmp_path):
    path = str(tmp_path / "old.db")
    migrate(path, "0001")
    conn = raw(path)
    assert conn.execute("SELECT version_num FROM alembic_version").fetchone()[0] == "0001"
    assert conn.execute("SELECT COUNT(*) FROM sqlite_master WHERE type = 'view'").fetchone()[0] == 0
    rows = [(1, 1000.0, "r1", None, 1, 0, "run_submitted", '{"project":"old"}'),
            (2, 1001.0, "r1", "a", 1, 0, "submitted", '{"phase":"main"}'),
            (3, 1002.0, "r1", "a", 2, 1, "launch_requested", '{"gpus":[3],"log":"/l/a.log"}'),
            (4, 1003.0, "r1", "a", 3, 1, "launched", '{"pid":77}')]
    conn.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
    conn.close()
    with open_store(path) as s:
        assert raw(path).execute("SELECT version_num FROM alembic_version").fetchone()[0] == schema.SCHEMA_HEAD
        assert [(e.seq, e.kind) for e in s.read()] == [(r[0], r[6]) for r in rows]
        assert s.read().__next__().data == {"project": "old"}
        columns, found = s.sql("SELECT job, attempt, gpus, log, pid, outcome FROM job_attempts")
        assert found == [("a", 1, "[3]", "/l/a.log", 77, "running")]
        assert s.meta_get("schema_note")
        assert s.append([Event("paused", "r1")])[0].seq == 5


def test_newer_schema_is_refused(store, db):
    conn = raw(db)
    conn.execute("UPDATE alembic_version SET version_num = '9999'")
    conn.close()
    with pytest.raises(StoreError, match="schema 9999, newer than this program"):
        open_store(db)
    with pytest.raises(StoreError, match="schema 9999"):
        open_store(db, readonly=True)


def test_opening_a_current_file_does_not_import_alembic(store, db):
    store.append([Event("run_submitted", "r1")])
    proc = python("""
        import sys
        from ledger.store import open_store
        s = open_store(sys.argv[1])
        assert s.count() == 1 and len(list(s.read())) == 1
        s.sql("SELECT * FROM job_attempts")
        print(sorted(m for m in sys.modules if m.split('.')[0] == 'alembic'))
    """, db)
    code, out, err = finish(proc)
    assert code == 0, err
    assert out.strip() == "[]"


def test_two_processes_creating_the_same_ledger_do_not_collide(tmp_path):
    path, go = str(tmp_path / "race" / "l.db"), str(tmp_path / "go")
    code = """
        import os, sys, time
        from ledger.store import open_store
        path, go = sys.argv[1], sys.argv[2]
        while not os.path.exists(go):
            time.sleep(0.005)
        with open_store(path) as s:
            print(s.count())
    """
    procs = [python(code, path, go) for _ in range(3)]
    open(go, "w").close()
    results = [finish(p) for p in procs]
    assert [r[0] for r in results] == [0, 0, 0], [r[2] for r in results]
    conn = raw(path)
    assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [(schema.SCHEMA_HEAD,)]
    assert conn.execute("SELECT COUNT(*) FROM meta WHERE key = 'created_at'").fetchone()[0] == 1


def test_migrations_are_package_data():
    root = importlib.resources.files("ledger.migrations")
    assert root.joinpath("env.py").is_file()
    assert root.joinpath("script.py.mako").is_file()
    versions = sorted(p.name for p in root.joinpath("versions").iterdir()
                      if p.name.endswith(".py") and p.name[0].isdigit())
    assert versions[:2] == ["0001_events_and_meta.py", "0002_views.py"]
    assert versions[-1].startswith(schema.SCHEMA_HEAD)


# ---- read-only SQL ----

@pytest.mark.parametrize("statement", [
    "INSERT INTO events (seq, ts, run, version, kind, data) VALUES (100, 1, 'x', 1, 'paused', '{}')",
    "UPDATE meta SET value = 'x'",
    "DELETE FROM meta",
    "CREATE TABLE evil (x)",
    "DROP VIEW job_attempts",
    "PRAGMA query_only = OFF",
    "VACUUM INTO '/tmp/ledger-test-vacuum-copy.db'",
])
def test_sql_refuses_writes_with_one_line(store, statement):
    store.append([Event("run_submitted", "r1")])
    with pytest.raises(ReadOnlyError) as info:
        store.sql(statement)
    assert str(info.value).startswith("sql: ")
    assert "\n" not in str(info.value)
    assert store.count() == 1
    assert not os.path.exists("/tmp/ledger-test-vacuum-copy.db")


def test_sql_write_message_names_the_readonly_database(store):
    with pytest.raises(ReadOnlyError, match="^sql: attempt to write a readonly database$"):
        store.sql("DELETE FROM meta")


def test_sql_refuses_attach_even_to_create_a_file(store, tmp_path):
    target = tmp_path / "side.db"
    for statement in ("ATTACH '%s' AS side" % target, "ATTACH 'file:%s?mode=rwc' AS side" % target):
        with pytest.raises(ReadOnlyError, match="^sql: not authorized$"):
            store.sql(statement)
    assert not target.exists()


def test_sql_errors_are_one_line_ledger_errors(store):
    with pytest.raises(SqlError, match="^sql: no such table: nope$"):
        store.sql("SELECT * FROM nope")
    with pytest.raises(SqlError, match="one statement"):
        store.sql("SELECT 1; SELECT 2")
    assert issubclass(SqlError, LedgerError)


def test_sql_reads_the_views(store):
    store.append(run_with_history())
    columns, rows = store.sql("SELECT job, attempt, gpus, exit_code, outcome, reason, log "
                              "FROM job_attempts ORDER BY job, attempt")
    assert columns == ["job", "attempt", "gpus", "exit_code", "outcome", "reason", "log"]
    assert rows == [("a", 1, "[0]", 0, "success", None, "/logs/a.log"),
                    ("b", 1, "[1]", 1, "oom", "CUDA out of memory. Tried to allocate 2 GiB", "/logs/b.log"),
                    ("b", 2, "[0]", 0, "success", None, "/logs/b.log")]
    _, retries = store.sql("SELECT job, attempt, kind, delay, next_attempt FROM retry_history ORDER BY seq")
    assert retries == [("b", 1, "oom_detected", 120, None), ("b", 1, "retried", None, 2)]
    _, log = store.sql("SELECT time, kind FROM event_log WHERE seq = ?", (1,))
    assert log == [("1970-01-01 00:16:40", "run_submitted")]


# ---- backup ----

def test_backup_is_consistent_while_a_writer_holds_uncommitted_data(store, db, tmp_path):
    stored = store.append(run_with_history())
    assert os.path.getsize(db + "-wal") > 0  # committed data still only in the WAL
    writer = raw(db)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO events (seq, ts, run, job, version, attempt, kind, data) "
                   "VALUES (?, 1, 'r1', NULL, 2, 0, 'paused', '{}')", (len(stored) + 1,))
    try:
        dest = store.backup(str(tmp_path / "snap" / "copy.db"))
    finally:
        writer.execute("ROLLBACK")
    assert mode(dest) == 0o600
    assert not os.path.exists(dest + "-wal")
    with open_store(dest, readonly=True) as copy:
        assert list(copy.read()) == stored
    with pytest.raises(StoreError, match="already exists"):
        store.backup(dest)


# ---- disk full ----

def test_disk_full_raises_keeps_events_and_recovers(tmp_path):
    with tiny_tmpfs(tmp_path / "small", size="1m") as folder:
        with open_store(os.path.join(folder, "ledger.db")) as s:
            before = s.append(run_with_history())
            filler = os.path.join(folder, "filler")
            fill_disk(filler)
            big = {"log_tail": "x" * 300000}
            with pytest.raises(DiskFullError) as info:
                s.append([Event("paused", "r1", data=big), Event("resumed", "r1", data=big)])
            assert str(info.value) == ("ledger disk full at %s: could not record paused, resumed events "
                                       "(nothing was written)" % s.path)
            assert list(s.read()) == before
            os.unlink(filler)
            after = s.append([Event("paused", "r1", data=big)])
            assert after[0].seq == len(before) + 1
            assert s.count() == len(before) + 1


# ---- concurrency ----

def test_readers_never_see_locked_while_a_writer_appends(db, tmp_path):
    open_store(db).close()
    reader_code = """
        import os, sys, time
        from ledger.store import open_store
        path, ready, total = sys.argv[1], sys.argv[2], int(sys.argv[3])
        s = open_store(path)
        open(ready, "w").close()
        deadline = time.time() + 60
        loops = 0
        while time.time() < deadline:
            events = list(s.read())
            seqs = [e.seq for e in events]
            assert seqs == list(range(1, len(seqs) + 1)), "gap in seqs"
            cols, rows = s.sql("SELECT COUNT(*) FROM event_log")
            assert rows[0][0] >= len(seqs)
            loops += 1
            if len(seqs) >= total:
                break
        print(loops, len(seqs))
    """
    writer_code = """
        import sys
        from ledger.events import Event
        from ledger.store import open_store
        s = open_store(sys.argv[1])
        s.append([Event("run_submitted", "r1")])
        for i in range(int(sys.argv[2]) - 1):
            s.append([Event("submitted", "r1", "j%d" % i)])
        print(s.count())
    """
    total = 500
    readies = [str(tmp_path / ("ready%d" % i)) for i in range(3)]
    readers = [python(reader_code, db, ready, total) for ready in readies]
    try:
        wait_for(lambda: all(os.path.exists(r) for r in readies), timeout=20, what="readers to start")
        writer = python(writer_code, db, total)
        code, out, err = finish(writer, timeout=60)
        assert code == 0, err
        assert out.strip() == str(total)
        for reader in readers:
            rcode, rout, rerr = finish(reader, timeout=60)
            assert rcode == 0, rerr
            assert "locked" not in rerr
            loops, seen = map(int, rout.split())
            assert seen == total and loops >= 1
    finally:
        for reader in readers:
            if reader.poll() is None:
                reader.kill()
                reader.wait()
