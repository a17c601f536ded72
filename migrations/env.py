"""Alembic environment. The URL comes from the fleet's settings (DATABASE_URL),
or from `config.attributes["url"]` when migrations run from code."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

import db.reviewtables  # noqa: F401  (the review loop's tables on the same metadata)
from db.schema import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        from config.settings import Settings

        url = Settings().db_url()
    return str(url)


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connectable = create_engine(_url(), poolclass=pool.NullPool)
    with connectable.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
