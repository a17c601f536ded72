"""Engine and session factory. One engine per process, made from the URL
the entry point resolved."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker

_engines: dict[str, Engine] = {}


def get_engine(url: str) -> Engine:
    engine = _engines.get(url)
    if engine is None:
        engine = create_engine(
            url,
            pool_pre_ping=True,  # survive a Postgres restart between batches
            pool_size=5,
            max_overflow=5,
        )
        _engines[url] = engine
    return engine


def session_factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


@contextmanager
def transaction(url: str) -> Iterator[Session]:
    """A session inside one transaction: commit on success, roll back on error."""
    with session_factory(url).begin() as session:
        yield session


def dispose_all() -> None:
    for engine in _engines.values():
        engine.dispose()
    _engines.clear()
