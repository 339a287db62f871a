"""Which store the app uses: Postgres when DATABASE_URL is set, else the SQLite file."""

from __future__ import annotations

from chat.config import Settings
from chat.storage import BackupElsewhere, Store

__all__ = ["BackupElsewhere", "open_store"]


def open_store(settings: Settings) -> Store:
    """Open (and migrate) the store `settings` name: `PostgresStore` on `database_url`, else
    `ChatStore` on `db_path`. psycopg is imported only when Postgres is used."""
    if settings.database_url:
        from chat.pgstore import PostgresStore

        return PostgresStore(settings.database_url, pool_size=settings.database_pool_size or None)
    from chat.store import ChatStore

    return ChatStore(settings.db_path)
