"""Alembic environment for the ledger.

The application owns the connection: ``ledger.store`` opens it, takes the write lock
(BEGIN IMMEDIATE) and passes it in ``config.attributes["connection"]``, so migrations
run inside the store's own transaction and two processes upgrading at once serialize
on SQLite's lock. There is no URL and no alembic.ini.
"""

from alembic import context

from ledger.schema import metadata

config = context.config


def run_migrations_online():
    connection = config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("ledger migrations need a connection: use ledger.store.migrate(path)")
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=True,      # SQLite cannot ALTER most things; batch mode copies the table
        transactional_ddl=True,    # the store controls BEGIN/COMMIT, so DDL is transactional
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise RuntimeError("ledger migrations run online only (against an open ledger file)")
run_migrations_online()
