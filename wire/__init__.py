"""What the producer and the workers share, and nothing heavy.

The batch message and how it is sent by task name (`messages`), every queue
name and `fleet:*` Redis key (`keys`), the worker stats a worker writes and
`fleet status` reads (`stats`), the Celery app factory (`app`) with its
`fleet_info` inspect command (`control`), retry and backoff (`retry`), and the
model revisions both sides resolve (`hub`). No torch, no transformers, no
worker state: the producer and the workers import this, never each other.
"""
