"""A property of the incremental sync: whatever interleaving of inserts, edits,
appended and deleted messages, deleted conversations and transactions held open
across passes a source goes through, one incremental pass after the last commit
leaves the fleet's copy equal to the source. Seeded random interleavings on the
real Postgres, the source in a database of its own, no overlap window."""

from __future__ import annotations

import random
from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy import text

from config.taskconfig import SourceSpec
from db.engine import get_engine, transaction
from db.sync import sync_source
from tests.appdb import QUERY, create_app_database
from tests.support import drop_database

SPEC = SourceSpec(name="app", shape="messages", query=QUERY, overlap_seconds=0, chunk=7)


@pytest.fixture
def app_db() -> Iterator[tuple[str, str]]:
    name, url, plain = create_app_database()
    try:
        yield url, plain
    finally:
        drop_database(name)


def source_copy(plain: str) -> dict[str, list[dict[str, str]]]:
    with psycopg.connect(plain) as conn:
        rows = conn.execute(f"SELECT * FROM ({QUERY}) q ORDER BY external_id, position").fetchall()
    out: dict[str, list[dict[str, str]]] = {}
    for ext, role, content, _pos, _lang, _at in rows:
        out.setdefault(ext, []).append({"role": role, "content": content})
    return out


def fleet_copy(db_url: str) -> dict[str, list[dict[str, str]]]:
    with transaction(db_url) as s:
        return dict(
            s.execute(
                text(
                    "SELECT external_id, messages FROM conversations "
                    "WHERE source = 'app' AND gone_at IS NULL"
                )
            ).all()
        )


class Source:
    """The application: random writes, some in transactions held open a while."""

    def __init__(self, plain: str, rng: random.Random) -> None:
        self.plain, self.rng = plain, rng
        self.auto = psycopg.connect(plain, autocommit=True)
        self.open: list[tuple[psycopg.Connection, int]] = []  # (connection, steps left)
        self.next_id = 1

    def ids(self) -> list[int]:
        return [r[0] for r in self.auto.execute("SELECT id FROM app.conversations").fetchall()]

    def write(self, conn: psycopg.Connection) -> None:
        rng, ids = self.rng, self.ids()
        op = rng.choice(["insert", "insert", "edit", "edit", "append", "drop_message", "delete"])
        if op == "insert" or not ids:
            cid, self.next_id = self.next_id, self.next_id + 1
            conn.execute("INSERT INTO app.conversations (id, language) VALUES (%s, 'en')", (cid,))
            for seq in range(rng.randint(1, 3)):
                conn.execute(
                    "INSERT INTO app.messages (conversation_id, seq, role, body) "
                    "VALUES (%s, %s, 'user', %s)",
                    (cid, seq, f"c{cid} m{seq} v{rng.random():.6f}"),
                )
            return
        cid = rng.choice(ids)
        if op == "edit":
            conn.execute(
                "UPDATE app.messages SET body = %s, updated_at = now() "
                "WHERE conversation_id = %s AND seq = (SELECT min(seq) FROM app.messages "
                "WHERE conversation_id = %s)",
                (f"edited {rng.random():.6f}", cid, cid),
            )
        elif op == "append":
            conn.execute(
                "INSERT INTO app.messages (conversation_id, seq, role, body) "
                "SELECT %s, COALESCE(max(seq), -1) + 1, 'assistant', %s FROM app.messages "
                "WHERE conversation_id = %s ON CONFLICT DO NOTHING",
                (cid, f"appended {rng.random():.6f}", cid),
            )
        elif op == "drop_message":
            conn.execute(
                "DELETE FROM app.messages WHERE conversation_id = %s AND seq = "
                "(SELECT max(seq) FROM app.messages WHERE conversation_id = %s)",
                (cid, cid),
            )
        else:
            conn.execute("DELETE FROM app.conversations WHERE id = %s", (cid,))

    def step(self) -> None:
        for i, (conn, left) in enumerate(list(self.open)):
            if left <= 1:
                conn.commit()
                conn.close()
                self.open[i] = (conn, 0)
            else:
                self.open[i] = (conn, left - 1)
        self.open = [(c, n) for c, n in self.open if n > 0]
        if self.rng.random() < 0.2 and len(self.open) < 2:
            conn = psycopg.connect(self.plain)
            conn.execute("SET lock_timeout = '200ms'")
            try:
                self.write(conn)
            except psycopg.errors.LockNotAvailable:
                conn.rollback()
                conn.close()
                return
            self.open.append((conn, self.rng.randint(2, 6)))  # held across a few passes
            return
        try:
            self.write(self.auto)
        except psycopg.errors.LockNotAvailable:
            pass

    def finish(self) -> None:
        for conn, _ in self.open:
            conn.commit()
            conn.close()
        self.open = []
        self.auto.close()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_one_incremental_pass_after_any_interleaving_equals_the_source(db_url, app_db, seed):
    app_url, plain = app_db
    rng = random.Random(seed)
    source = Source(plain, rng)
    fleet, src = get_engine(db_url), get_engine(app_url)
    source.auto.execute("SET lock_timeout = '200ms'")
    try:
        for _ in range(60):
            source.step()
            if rng.random() < 0.35:
                sync_source(fleet, src, SPEC)
    finally:
        source.finish()
    last = sync_source(fleet, src, SPEC)
    assert not last.full
    assert fleet_copy(db_url) == source_copy(plain)
