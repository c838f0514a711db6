"""The newest migration's revision id, in a module of its own so that opening a ledger that
is already up to date needs neither alembic nor SQLAlchemy (``ledger.schema`` re-exports it;
a test compares it with alembic's head)."""

SCHEMA_HEAD = "0002"
