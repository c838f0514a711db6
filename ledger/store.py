"""The ledger file: open it, append events durably, read them back, query it read-only.

One SQLite file per host (``~/.ledger/ledger.db`` unless ``LEDGER_DB`` or a path says
otherwise), private to its owner (folder 0700, file 0600), in WAL mode so readers never
wait for the scheduler. Appends run in one ``BEGIN IMMEDIATE`` transaction with
``synchronous=FULL``: when ``append`` returns, the events are on disk with gap-free
``seq`` numbers and per-stream versions; when it raises, nothing was written.

Opening is kept cheap because ``ledger status`` opens the file every time: if the file
is already at ``SCHEMA_HEAD`` (one query with the plain sqlite3 module), alembic
is never imported. Otherwise the migrations run inside the store's own write lock.
"""

import gc
import hashlib
import marshal
import os
import sqlite3
import sys
import time
from contextlib import closing, contextmanager
from urllib.parse import quote

from .revision import SCHEMA_HEAD
from .errors import (ConflictError, DiskFullError, LedgerError, NotALedgerError, NotFoundError, ReadOnlyError,
                     StoreError)
from .events import Event, decode_data, encode_data
from .projection import SNAPSHOT_LAYOUT, State, apply, decode_state, encode_state

BUSY_TIMEOUT_MS = 10000
READ_BATCH = 2000
DIR_MODE = 0o700
FILE_MODE = 0o600
#: The projection snapshot lives beside the ledger: <ledger>.state (a cache: delete it freely).
SNAPSHOT_SUFFIX = ".state"
SNAPSHOT_MAGIC = "ledger-projection-snapshot"
#: A replay that folded at least this many events saves a new snapshot.
SNAPSHOT_EVERY = 5000

_COLUMNS = "seq, ts, run, job, version, attempt, kind, data"
_STREAM_VERSION_SQL = ("SELECT version FROM events WHERE run = ? AND COALESCE(job, '') = ? "
                       "ORDER BY version DESC LIMIT 1")

# sqlite3 authorizer action codes (numeric fallbacks for old Pythons).
_SQLITE_PRAGMA = getattr(sqlite3, "SQLITE_PRAGMA", 19)
_SQLITE_ATTACH = getattr(sqlite3, "SQLITE_ATTACH", 24)
_SQLITE_DETACH = getattr(sqlite3, "SQLITE_DETACH", 25)


class SqlError(LedgerError):
    """A ``ledger sql`` query failed (syntax error, unknown column, ...)."""


def default_db_path(environ=os.environ):
    """Where this host's ledger lives: ``$LEDGER_DB`` or ``~/.ledger/ledger.db``."""
    explicit = environ.get("LEDGER_DB")
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit))
    home = environ.get("HOME") or os.path.expanduser("~")
    return os.path.join(home, ".ledger", "ledger.db")


def open_store(path=None, readonly=False, create=True):
    """Open (creating and upgrading as needed) the ledger at ``path`` and return a Store.

    ``readonly=True`` opens the file so that SQLite refuses every write; a missing file
    is a NotFoundError then (and also when ``create=False``).
    """
    path = os.path.abspath(os.path.expanduser(path or default_db_path()))
    if (readonly or not create) and not os.path.exists(path):
        raise NotFoundError("no ledger at %s" % path)
    if not readonly:
        _create_private_file(path)
    try:
        current = _schema_version(path, readonly)
    except StoreError:
        _raise_if_out_of_space(path)
        raise
    if current != SCHEMA_HEAD:
        if readonly and current is None:
            raise NotFoundError("ledger at %s is empty: nothing was recorded in it yet (or it is being "
                                "created right now)" % path)
        if readonly:
            raise StoreError("ledger at %s has schema %s, this program needs %s: open it once "
                             "without read-only to upgrade it" % (path, current or "none", SCHEMA_HEAD))
        migrate(path, "head")
    return Store(path, _make_engine(path, readonly), readonly)


def migrate(path, revision="head"):
    """Run the alembic migrations on ``path`` up to ``revision`` under the write lock.

    BEGIN IMMEDIATE makes a second process that upgrades at the same moment wait, then
    find the file already migrated. Imports alembic, so only called when needed.
    """
    from alembic import command

    path = os.path.abspath(os.path.expanduser(path))
    cfg = alembic_config()
    engine = _make_engine(path, readonly=False)
    try:
        with engine.connect() as conn:
            conn.execution_options(ledger_write=True)
            with conn.begin():
                _refuse_unknown_revision(path, _version_in(conn.connection.driver_connection), cfg)
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, revision)
    except _db_errors() as exc:
        raise StoreError("ledger at %s could not be upgraded: %s" % (path, _one_line(exc)))
    finally:
        engine.dispose()


def alembic_config():
    """An alembic Config built in code: no alembic.ini, scripts from the installed package."""
    from alembic.config import Config

    from . import migrations

    cfg = Config()
    cfg.set_main_option("script_location", os.path.dirname(migrations.__file__))
    return cfg


def _refuse_unknown_revision(path, current, cfg):
    """A file written by a newer ledger must not be touched by an older one."""
    if current is None:
        return
    from alembic.script import ScriptDirectory

    known = {rev.revision for rev in ScriptDirectory.from_config(cfg).walk_revisions()}
    if current not in known:
        raise StoreError("ledger at %s has schema %s, newer than this program knows (%s): "
                         "upgrade ledger" % (path, current, SCHEMA_HEAD))


# ---- files and connections ----

_CODE_HASH = []


def _projection_code_hash():
    """sha256 of the modules that define the fold: a snapshot written by other code is ignored."""
    if not _CODE_HASH:
        from . import events, plan, projection, states
        digest = hashlib.sha256()
        try:
            for module in (events, plan, projection, states):
                with open(module.__file__, "rb") as f:
                    digest.update(f.read())
        except (OSError, TypeError):       # no source files (frozen): never trust a snapshot
            digest.update(os.urandom(16))
        _CODE_HASH.append(digest.hexdigest())
    return _CODE_HASH[0]


class _gc_paused:
    """Building a big projection allocates hundreds of thousands of objects that all
    survive: the cyclic GC would rescan them again and again for nothing."""

    def __enter__(self):
        self.was = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc):
        if self.was:
            gc.enable()


def _create_private_file(path):
    """Create missing folders (0700) and the file (0600) before SQLite touches them."""
    folder = os.path.dirname(path)
    missing = []
    while folder and not os.path.isdir(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    for made in reversed(missing):
        try:
            os.mkdir(made, DIR_MODE)
        except FileExistsError:
            continue
        os.chmod(made, DIR_MODE)  # independent of the umask
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)


def _fix_sidecar_modes(path):
    for suffix in ("-wal", "-shm"):
        try:
            os.chmod(path + suffix, FILE_MODE)
        except OSError:
            pass


#: Below this much free space a failure to open is put down to a full disk.
LOW_SPACE_BYTES = 1 << 20


def _raise_if_out_of_space(path):
    """Opening a WAL ledger needs a little room (its -wal and -shm files) even to read; on a full
    disk SQLite says only "disk I/O error". Say what it is."""
    try:
        st = os.statvfs(os.path.dirname(path) or ".")
    except OSError:
        return
    free = st.f_bavail * st.f_frsize
    if free < LOW_SPACE_BYTES:
        raise DiskFullError("cannot open ledger at %s: its disk is full (%d KB free; SQLite needs room for its "
                            "-wal/-shm files even to read): free some space" % (path, free // 1024))


def _ro_uri(path):
    return "file:%s?mode=ro" % quote(path)


def _schema_version(path, readonly):
    """The file's alembic revision via plain sqlite3 (no alembic); turns WAL on when writable."""
    try:
        if readonly:
            conn = sqlite3.connect(_ro_uri(path), uri=True, timeout=BUSY_TIMEOUT_MS / 1000.0)
        else:
            conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000.0)
        with closing(conn):
            conn.isolation_level = None
            current = _version_in(conn)
            if current is None:
                _refuse_foreign_database(path, conn)
            if not readonly and conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
            return current
    except sqlite3.DatabaseError as exc:
        if "not a database" in str(exc):
            raise NotALedgerError("cannot open ledger at %s: %s" % (path, _one_line(exc)))
        raise StoreError("cannot open ledger at %s: %s" % (path, _one_line(exc)))
    except sqlite3.Error as exc:
        raise StoreError("cannot open ledger at %s: %s" % (path, _one_line(exc)))


def _version_in(dbapi_conn):
    has_table = dbapi_conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'alembic_version'").fetchone()
    if not has_table:
        return None
    row = dbapi_conn.execute("SELECT version_num FROM alembic_version").fetchone()
    return row[0] if row else None


def _refuse_foreign_database(path, conn):
    """Never create ledger tables inside somebody else's SQLite file."""
    tables = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    foreign = sorted(name for (name,) in tables if name not in ("events", "meta"))
    if foreign:
        raise NotALedgerError("%s is an SQLite file but not a ledger (it has tables %s)"
                         % (path, ", ".join(foreign[:5])))


def _db_errors():
    """What a failed statement raises: sqlite3's errors, and SQLAlchemy's once it is loaded
    (a read-only store never imports SQLAlchemy: ``ledger status`` starts faster)."""
    dbapi = sys.modules.get("sqlalchemy.exc")
    return (dbapi.DBAPIError, sqlite3.Error) if dbapi is not None else (sqlite3.Error,)


class _ReadOnlyConnections:
    """What a read-only store needs of an engine (``raw_connection``, ``dispose``) on the
    plain sqlite3 module: every read goes through raw DBAPI connections anyway. Same
    PRAGMAs and authorizer as before; a few idle connections are kept for reuse."""

    def __init__(self, path):
        self.path = path
        self._idle = []

    def raw_connection(self):
        try:
            conn = self._idle.pop()
        except IndexError:
            conn = sqlite3.connect(_ro_uri(self.path), uri=True, timeout=BUSY_TIMEOUT_MS / 1000.0,
                                   check_same_thread=False)
            conn.isolation_level = None
            conn.execute("PRAGMA busy_timeout=%d" % BUSY_TIMEOUT_MS)
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA query_only=ON")
            conn.set_authorizer(_deny_escapes)
        return _Pooled(conn, self._idle)

    def dispose(self):
        while self._idle:
            self._idle.pop().close()


class _Pooled:
    """A pooled sqlite3 connection: ``close`` gives it back."""

    def __init__(self, conn, idle):
        self._conn = conn
        self._home = idle

    def __getattr__(self, name):
        return getattr(self._conn, name)

    def close(self):
        if self._conn is not None:
            if len(self._home) < 4:
                self._home.append(self._conn)
            else:
                self._conn.close()
            self._conn = None


def _make_engine(path, readonly):
    """An engine whose connections carry our PRAGMAs and whose BEGIN we emit ourselves.

    pysqlite's own transaction handling is turned off (isolation_level=None) so that
    the ``begin`` event can say BEGIN IMMEDIATE for writes (take the write lock up
    front instead of failing on lock upgrade) and plain BEGIN for reads. A read-only
    store gets plain sqlite3 connections instead (no SQLAlchemy import at all).
    """
    if readonly:
        return _ReadOnlyConnections(path)
    from sqlalchemy import create_engine, event
    from sqlalchemy.engine import URL
    url = URL.create("sqlite", database=path)
    engine = create_engine(url)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA busy_timeout=%d" % BUSY_TIMEOUT_MS)
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=FULL")
        cur.close()
        _fix_sidecar_modes(path)

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        if conn.get_execution_options().get("ledger_write"):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")

    return engine


def _deny_escapes(action, arg1, arg2, _db, _trigger):
    """Keep read-only connections read-only: no ATTACH (which could create files, as
    VACUUM INTO does) and no switching query_only back off."""
    if action in (_SQLITE_ATTACH, _SQLITE_DETACH):
        return sqlite3.SQLITE_DENY
    if action == _SQLITE_PRAGMA and (arg1 or "").lower() == "query_only" and arg2 is not None:
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


def _one_line(exc):
    orig = getattr(exc, "orig", None) or exc
    message = " ".join(str(orig).split()) or type(orig).__name__
    if "malformed" in message.lower():
        message += (" (the file is damaged: a copy of a live ledger taken with cp, or cut short; copy a "
                    "live ledger with `ledger pull`, or copy the .db and .db-wal files while no scheduler runs)")
    return message


def _kinds_of(events):
    kinds = []
    for e in events:
        if e.kind not in kinds:
            kinds.append(e.kind)
    return ", ".join(kinds)


def _stream(run, job):
    return (run if run is not None else "", job or "")


# ---- the store ----

class Store:
    """An open ledger. Thread-safe through the engine's pool; use one per process."""

    def __init__(self, path, engine, readonly=False):
        self.path = path
        self.readonly = readonly
        self._engine = engine
        self._ro_engine = engine if readonly else None

    def __repr__(self):
        return "Store(%r%s)" % (self.path, ", readonly" if self.readonly else "")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self._ro_engine is not None and self._ro_engine is not self._engine:
            self._ro_engine.dispose()
        self._engine.dispose()

    # -- writing --

    def append(self, events, expect=None, expect_last_seq=None):
        """Append ``events`` atomically and durably; return them with seq, version and ts.

        ``expect`` maps (run, job) to the stream version the caller last saw; if any
        stream has moved on, ConflictError is raised and nothing is written.
        ``expect_last_seq``: likewise, unless no event at all was appended since that seq. An event
        without ``ts`` gets the current time; a ``run`` of None is stored as ''.
        """
        events = list(events)
        if not events:
            return []
        if self.readonly:
            raise StoreError("ledger at %s is open read-only: could not record %s events"
                             % (self.path, _kinds_of(events)))
        try:
            with self._engine.connect() as conn:
                conn.execution_options(ledger_write=True)
                with conn.begin():
                    return self._append_locked(conn, events, expect, time.time(), expect_last_seq)
        except _db_errors() as exc:
            raise self._write_error(exc, _kinds_of(events))

    def _append_locked(self, conn, events, expect, now, expect_last_seq=None):
        versions = {}

        def current(stream):
            if stream not in versions:
                row = conn.exec_driver_sql(_STREAM_VERSION_SQL, stream).fetchone()
                versions[stream] = row[0] if row else 0
            return versions[stream]

        for (run, job), expected in (expect or {}).items():
            stream = _stream(run, job)
            if current(stream) != expected:
                raise ConflictError("ledger at %s changed underneath: %s/%s is at version %d, expected %d "
                                    "(nothing was written)" % (self.path, run, job or "-", current(stream), expected))
        seq = conn.exec_driver_sql("SELECT COALESCE(MAX(seq), 0) FROM events").scalar()
        if expect_last_seq is not None and seq != expect_last_seq:
            raise ConflictError("ledger at %s changed underneath: last event is %d, expected %d "
                                "(nothing was written)" % (self.path, seq, expect_last_seq))
        stored, rows = [], []
        for e in events:
            stream = _stream(e.run, e.job)
            versions[stream] = current(stream) + 1
            seq += 1
            done = Event(kind=e.kind, run=stream[0], job=e.job, attempt=e.attempt, data=e.data,
                         ts=e.ts or now, seq=seq, version=versions[stream])
            stored.append(done)
            rows.append({"seq": done.seq, "ts": done.ts, "run": done.run, "job": done.job,
                         "version": done.version, "attempt": done.attempt, "kind": done.kind,
                         "data": encode_data(done.data)})
        from . import schema
        conn.execute(schema.events.insert(), rows)
        return stored

    def append_bulk(self, events, batch=20000):
        """Append many events in ONE transaction (imports, benchmarks); return how many.

        Same numbering as ``append`` (gap-free seq, per-stream versions, ts defaulting to
        now) and all or nothing, but without optimistic-concurrency checks and with
        ``executemany`` on the driver connection in batches, so a million events take
        seconds. ``events`` may be any iterable (a generator is never held in memory).
        """
        if self.readonly:
            raise StoreError("ledger at %s is open read-only: could not record events" % self.path)
        insert = "INSERT INTO events (%s) VALUES (?, ?, ?, ?, ?, ?, ?, ?)" % _COLUMNS
        count = 0
        try:
            with self._engine.connect() as conn:
                conn.execution_options(ledger_write=True)
                with conn.begin():
                    raw = conn.connection.driver_connection
                    seq = raw.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]
                    versions = {}
                    now = time.time()
                    rows = []
                    for e in events:
                        stream = _stream(e.run, e.job)
                        version = versions.get(stream)
                        if version is None:
                            row = raw.execute(_STREAM_VERSION_SQL, stream).fetchone()
                            version = row[0] if row else 0
                        versions[stream] = version = version + 1
                        seq += 1
                        rows.append((seq, e.ts or now, stream[0], e.job, version, e.attempt, e.kind,
                                     encode_data(e.data)))
                        if len(rows) >= batch:
                            raw.executemany(insert, rows)
                            count += len(rows)
                            rows = []
                    if rows:
                        raw.executemany(insert, rows)
                        count += len(rows)
        except _db_errors() as exc:
            raise self._write_error(exc, "bulk")
        return count

    def _write_error(self, exc, what):
        message = _one_line(exc)
        lower = message.lower()
        orig = getattr(exc, "orig", exc)
        if "disk is full" in lower or "i/o error" in lower:
            return DiskFullError("ledger disk full at %s: could not record %s events (nothing was written)"
                                 % (self.path, what))
        if "locked" in lower or "busy" in lower:
            return StoreError("ledger at %s stayed locked by another writer for %d s: could not record "
                              "%s events (nothing was written)" % (self.path, BUSY_TIMEOUT_MS // 1000, what))
        if "readonly" in lower or "read-only" in lower:
            return StoreError("ledger at %s is not writable: could not record %s events" % (self.path, what))
        if isinstance(orig, sqlite3.IntegrityError):
            return ConflictError("ledger at %s refused %s events: %s (nothing was written)"
                                 % (self.path, what, message))
        return StoreError("ledger at %s: could not record %s events: %s" % (self.path, what, message))

    def meta_set(self, key, value):
        if self.readonly:
            raise StoreError("ledger at %s is open read-only: could not record %s" % (self.path, key))
        try:
            with self._engine.connect() as conn:
                conn.execution_options(ledger_write=True)
                with conn.begin():
                    conn.exec_driver_sql("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))
        except _db_errors() as exc:
            raise self._write_error(exc, "meta")

    # -- reading --

    def meta_get(self, key, default=None):
        row = self._query_one("SELECT value FROM meta WHERE key = ?", (key,))
        return row[0] if row else default

    def last_seq(self):
        return self._query_one("SELECT COALESCE(MAX(seq), 0) FROM events")[0]

    def count(self):
        return self._query_one("SELECT COUNT(*) FROM events")[0]

    def stream_version(self, run, job=None):
        """The version of the (run, job) stream: 0 before its first event."""
        row = self._query_one(_STREAM_VERSION_SQL, _stream(run, job))
        return row[0] if row else 0

    def read(self, since_seq=None, since_ts=None, until_ts=None, until_seq=None, run=None, job=None,
             kinds=None, limit=None):
        """Yield events in seq order. ``since_seq`` is exclusive (events after it);
        ``since_ts`` and the ``until_*`` bounds are inclusive. Reads in batches, one SQL
        statement (one consistent snapshot) for the whole iteration; the iterator holds a
        pooled connection until it is exhausted or closed (``contextlib.closing``)."""
        where, params = [], []
        for clause, value in (("seq > ?", since_seq), ("seq <= ?", until_seq), ("ts >= ?", since_ts),
                              ("ts <= ?", until_ts), ("run = ?", run), ("job = ?", job)):
            if value is not None:
                where.append(clause)
                params.append(value)
        if kinds is not None:
            kinds = [kinds] if isinstance(kinds, str) else list(kinds)
            where.append("kind IN (%s)" % ", ".join("?" * len(kinds)))
            params.extend(kinds)
        query = "SELECT %s FROM events" % _COLUMNS
        if where:
            query += " WHERE " + " AND ".join(where)
        query += " ORDER BY seq"
        if limit is not None:
            query += " LIMIT ?"
            params.append(int(limit))
        return self._iter_events(query, params)

    @contextmanager
    def _cursor(self):
        """A cursor on a pooled connection; SQLite errors become one StoreError."""
        raw = self._engine.raw_connection()
        try:
            cur = raw.cursor()
            try:
                yield cur
            finally:
                cur.close()
        except sqlite3.Error as exc:
            raise StoreError("cannot read ledger at %s: %s" % (self.path, _one_line(exc)))
        finally:
            raw.close()

    def _iter_events(self, query, params):
        with self._cursor() as cur:
            cur.execute(query, params)
            while True:
                rows = cur.fetchmany(READ_BATCH)
                if not rows:
                    return
                for seq, ts, run, job, version, attempt, kind, data in rows:
                    yield Event(kind, run, job, attempt, decode_data(kind, data), ts, seq, version)

    def _query_one(self, query, params=()):
        with self._cursor() as cur:
            return cur.execute(query, params).fetchone()

    def state(self, until_seq=None, until_ts=None, snapshot=True):
        """The projection as of ``until_seq`` / ``until_ts`` (everything by default).

        The current state (no bound) starts from the snapshot beside the ledger when one
        is valid and folds only the events after it; a replay that folded many events
        leaves a new snapshot behind (``snapshot=False``: a plain full replay).
        """
        with _gc_paused():
            if until_seq is not None or until_ts is not None or not snapshot:
                state = State()
                self._fold(state, since_seq=0, until_seq=until_seq, until_ts=until_ts)
                return state
            state = self._load_snapshot()
            start = state.last_seq if state is not None else 0
            if state is None:
                state = State()
            folded = self._fold(state, since_seq=start)
            if folded >= SNAPSHOT_EVERY:
                self._write_snapshot(state)
            return state

    def _fold(self, state, since_seq=0, until_seq=None, until_ts=None):
        """Fold events after ``since_seq`` into ``state`` (lean: raw rows, batched reads);
        returns how many were folded."""
        query = "SELECT %s FROM events WHERE seq > ?" % _COLUMNS
        params = [since_seq]
        if until_seq is not None:
            query += " AND seq <= ?"
            params.append(until_seq)
        query += " ORDER BY seq"
        decode = decode_data
        new = object.__new__
        setattr_ = object.__setattr__
        folded = 0
        with self._cursor() as cur:
            cur.execute(query, params)
            while True:
                rows = cur.fetchmany(READ_BATCH)
                if not rows:
                    return folded
                for seq, ts, run, job, version, attempt, kind, data in rows:
                    if until_ts is not None and ts > until_ts:
                        return folded
                    ev = new(Event)
                    setattr_(ev, "__dict__", {"kind": kind, "run": run, "job": job, "attempt": attempt,
                                              "data": decode(kind, data), "ts": ts, "seq": seq,
                                              "version": version})
                    apply(state, ev)
                    folded += 1

    # -- the projection snapshot beside the ledger --

    def snapshot_path(self):
        return self.path + SNAPSHOT_SUFFIX

    def _snapshot_key(self):
        """What a snapshot must match to be used: the projection's code, this Python's
        marshal format, and this ledger file (its creation stamp, host and inode: a copy or a
        new file at the same path never uses it)."""
        created = self._query_one("SELECT value FROM meta WHERE key = 'created_at'")
        host = self._query_one("SELECT value FROM meta WHERE key = 'host'")
        info = os.stat(self.path)
        return (SNAPSHOT_MAGIC, _projection_code_hash(), SNAPSHOT_LAYOUT, marshal.version,
                tuple(sys.version_info[:2]), created[0] if created else None, host[0] if host else None,
                info.st_dev, info.st_ino)

    def _event_fingerprint(self, seq):
        row = self._query_one("SELECT seq, ts, run, job, version, kind FROM events WHERE seq = ?", (seq,))
        return tuple(row) if row else None

    def _load_snapshot(self):
        """The State saved beside the ledger, or None when there is none or it does not
        belong to this ledger and this code (wrong key, event at its seq differs, a file
        somebody else could have written, unreadable)."""
        path = self.snapshot_path()
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            info = os.fstat(fd)
            if info.st_uid != os.geteuid() or info.st_mode & 0o022:
                return None
            with os.fdopen(fd, "rb") as f:
                fd = None
                blob = f.read()
        except OSError:
            return None
        finally:
            if fd is not None:
                os.close(fd)
        try:
            key, fingerprint, data = marshal.loads(blob)
            if key != self._snapshot_key() or fingerprint != self._event_fingerprint(fingerprint[0]):
                return None
            return decode_state(data)
        except (ValueError, EOFError, TypeError, IndexError, KeyError):
            return None

    def _write_snapshot(self, state):
        """Save ``state`` beside the ledger (0600, atomic rename); best effort."""
        if not state.last_seq:
            return
        fingerprint = self._event_fingerprint(state.last_seq)
        path = self.snapshot_path()
        tmp = "%s.tmp-%d" % (path, os.getpid())
        try:
            blob = marshal.dumps((self._snapshot_key(), fingerprint, encode_state(state)))
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, path)
        except (OSError, ValueError):
            try:
                os.unlink(tmp)
            except OSError:
                pass

    def sql(self, query, params=None):
        """Run one statement on a read-only connection; return (columns, rows).

        The database itself refuses writes (mode=ro, query_only, no ATTACH): the query
        text is never inspected.
        """
        if not (query or "").strip():
            raise SqlError("sql: empty query; try ledger sql \"SELECT * FROM job_attempts LIMIT 5\"")
        if self._ro_engine is None:
            self._ro_engine = _make_engine(self.path, readonly=True)
        raw = self._ro_engine.raw_connection()
        try:
            cur = raw.cursor()
            try:
                cur.execute(query, params if params is not None else ())
                columns = [d[0] for d in cur.description or ()]
                rows = cur.fetchall() if cur.description else []
            finally:
                cur.close()
        except (sqlite3.Error, sqlite3.Warning) as exc:
            message = _one_line(exc)
            lower = message.lower()
            if "readonly" in lower or "read-only" in lower or "authoriz" in lower:
                raise ReadOnlyError("sql: %s" % message)
            if lower == "disk i/o error" and query.strip().lower().startswith("pragma"):
                # a PRAGMA that would change the file fails as an I/O error on a read-only open
                raise ReadOnlyError("sql: %s: the ledger is opened read-only and this PRAGMA would change it"
                                    % message)
            raise SqlError("sql: %s" % message)
        finally:
            raw.close()
        return columns, [tuple(r) for r in rows]

    def backup(self, dest_path):
        """Write a consistent snapshot of the ledger to ``dest_path`` (mode 0600).

        Uses SQLite's online backup from a read snapshot, so a running scheduler is
        neither blocked nor copied half-way; the copy is a single self-contained file.
        """
        dest = os.path.abspath(os.path.expanduser(dest_path))
        if os.path.exists(dest):
            raise StoreError("backup: %s already exists" % dest)
        _create_private_file(dest)
        try:
            with closing(sqlite3.connect(_ro_uri(self.path), uri=True, timeout=BUSY_TIMEOUT_MS / 1000.0)) as src:
                with closing(sqlite3.connect(dest, timeout=BUSY_TIMEOUT_MS / 1000.0)) as dst:
                    src.backup(dst)
                    dst.isolation_level = None
                    dst.execute("PRAGMA journal_mode=DELETE")
        except sqlite3.Error as exc:
            for leftover in (dest, dest + "-journal", dest + "-wal", dest + "-shm"):
                if os.path.exists(leftover):
                    os.unlink(leftover)
            message = _one_line(exc)
            if "full" in message.lower():
                raise DiskFullError("backup: disk full at %s (no backup written)" % dest)
            raise StoreError("backup of %s to %s failed: %s" % (self.path, dest, message))
        return dest
