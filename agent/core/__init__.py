"""The pure core: commands and their signatures, events, the command lifecycle, rollback planning, retention,
schedules, durations, redaction, the lock-mode table and the error types.

Nothing here does I/O or imports a library that does (Redis, PostgreSQL, Celery, Alembic, HTTP): every other
part of dbagent builds on it, and a unit test (tests/unit/test_layout.py) fails if that ever changes.
"""
