"""Confirmed labels as gold: what `fleet eval` scores against when no file is given,
and what `fleet train --confirmed` learns from."""

from __future__ import annotations

from db import review as rq
from db.engine import transaction
from fleet.reporting.export import GoldLabels


def confirmed_gold(url: str, *, task: str) -> GoldLabels:
    """The task's confirmed labels keyed by (source, external_id), as load_gold reads a
    file whose lines name their source. Labels of rows no longer stored are left out."""
    with transaction(url) as session:
        rows = rq.confirmed_labels(session, task=task)
    return GoldLabels(
        per_source={
            (str(r["source"]), str(r["external_id"])): str(r["label"])
            for r in rows
            if r["external_id"] is not None
        }
    )
