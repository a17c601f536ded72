"""`[sources.<name>]` tables of the task config: parsed into SourceSpec (config.taskconfig),
every mistake a ConfigError that names the source and what is allowed."""

from __future__ import annotations

import tomllib

import pytest

from config.taskconfig import ConfigError, parse_sources
from db.sync import source_sql

EXAMPLE = """
[sources.app]
shape = "messages"
query = '''
SELECT c.id::text AS external_id, m.role, m.body AS content, m.seq AS position,
       c.language, greatest(c.updated_at, m.updated_at) AS updated_at
FROM app.conversations c JOIN app.messages m ON m.conversation_id = c.id
'''
trigger_tables = ["app.conversations", "app.messages"]

[sources.calls]
kind = "audio"
table = "app.calls"
on_delete = "delete"
chunk = 1000
"""


def test_the_readme_example_parses():
    sources = parse_sources(tomllib.loads(EXAMPLE))
    app, calls = sources["app"], sources["calls"]
    assert (app.kind, app.shape, app.on_delete, app.chunk) == (
        "conversation",
        "messages",
        "mark",
        5000,
    )
    assert app.trigger_tables == ("app.conversations", "app.messages")
    assert (calls.kind, calls.table, calls.on_delete, calls.chunk) == (
        "audio",
        "app.calls",
        "delete",
        1000,
    )
    assert calls.trigger_tables == ("app.calls",) and calls.select == "SELECT * FROM app.calls"


def test_incremental_sql_reads_whole_conversations_in_fold_order():
    app = parse_sources(tomllib.loads(EXAMPLE))["app"]
    full = source_sql(app, since=None)
    assert "WHERE" not in full.split("AS q")[-1] and full.endswith(
        "ORDER BY q.external_id, q.position"
    )
    inc = source_sql(app, since=object())  # type: ignore[arg-type]
    assert "q.external_id IN (SELECT x.external_id" in inc and "x.updated_at >= :since" in inc


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('kind = "conversation"', "give exactly one of `query`"),
        ('query = "SELECT 1"\ntable = "t"', "give exactly one of `query`"),
        ('table = "t; DROP TABLE x"', "table must be a name"),
        ('table = "t"\nkind = "video"', "kind must be one of"),
        ('table = "t"\nshape = "rows"', "shape must be one of"),
        ('table = "t"\non_delete = "purge"', "on_delete must be one of"),
        ('table = "t"\nchunk = 0', "chunk must be an integer"),
        ('table = "t"\noverlap_seconds = -1', "overlap_seconds must be a number"),
        ('table = "t"\ndetect_deletes = "yes"', "detect_deletes must be true or false"),
        ('table = "t"\ntrigger_tables = "t"', "trigger_tables must be a list"),
        ('table = "t"\ncolumns = 3', "unknown key(s) columns"),
    ],
)
def test_mistakes_are_named(body, message):
    with pytest.raises(ConfigError, match=r"source 'app'") as info:
        parse_sources(tomllib.loads(f"[sources.app]\n{body}\n"))
    assert message in str(info.value)


def test_reserved_and_odd_names():
    with pytest.raises(ConfigError, match="'ingest' is reserved"):
        parse_sources(tomllib.loads('[sources.ingest]\ntable = "t"\n'))
    with pytest.raises(ConfigError, match="names are 1-64"):
        parse_sources({"sources": {"a b": {"table": "t"}}})
