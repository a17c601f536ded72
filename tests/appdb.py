"""An application database of its own for the sync tests: the README's worked
example schema (app.conversations + app.messages) on the real Postgres."""

from __future__ import annotations

from collections.abc import Sequence

import psycopg

from tests.support import create_database

SCHEMA = """
CREATE SCHEMA app;
CREATE TABLE app.conversations (
    id bigint PRIMARY KEY,
    title text,
    language text,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE app.messages (
    conversation_id bigint NOT NULL REFERENCES app.conversations (id) ON DELETE CASCADE,
    seq int NOT NULL,
    role text NOT NULL,
    body text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (conversation_id, seq)
);
"""

# The README's source: one row per message, folded by the fleet.
QUERY = """
SELECT c.id::text AS external_id, m.role, m.body AS content, m.seq AS position,
       c.language, greatest(c.updated_at, m.updated_at) AS updated_at
FROM app.conversations c JOIN app.messages m ON m.conversation_id = c.id
"""


def create_app_database() -> tuple[str, str, str]:
    """(name, sqlalchemy url, psycopg url) of a fresh database holding the app schema."""
    name, url = create_database()
    plain = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(SCHEMA)
    return name, url, plain


def add_conversation(
    plain_url: str, conv_id: int, turns: Sequence[tuple[str, str]], *, language: str = "en"
) -> None:
    with psycopg.connect(plain_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO app.conversations (id, title, language) VALUES (%s, %s, %s)",
            (conv_id, f"conversation {conv_id}", language),
        )
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO app.messages (conversation_id, seq, role, body) VALUES (%s, %s, %s, %s)",
                [(conv_id, i, role, body) for i, (role, body) in enumerate(turns)],
            )


def sql(plain_url: str, statement: str, params: Sequence[object] = ()) -> list[tuple]:
    with psycopg.connect(plain_url, autocommit=True) as conn:
        cur = conn.execute(statement, params)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []
