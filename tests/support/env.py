"""Where the repository and the test services are: the local Postgres
(TEST_ADMIN_DATABASE_URL) and Redis (TEST_REDIS_URL)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # tests/support/env.py -> the repository

ADMIN_URL = os.environ.get(
    "TEST_ADMIN_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)

REDIS_BASE = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379")
