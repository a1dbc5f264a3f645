"""Alembic environment of the registry.  It is only run by minlora.registry.migrate, which
passes an open connection (already inside the transaction that serialises migrators) in
`config.attributes["connection"]`; there is no alembic.ini and no URL to read."""

from __future__ import annotations

from alembic import context

from minlora.registry.schema import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    # SQLite cannot ALTER most things; batch mode rebuilds tables when a migration needs it.
    render_as_batch=connection.dialect.name == "sqlite",
    transactional_ddl=True,
)
with context.begin_transaction():
    context.run_migrations()
