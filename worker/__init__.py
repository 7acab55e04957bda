"""The Celery worker of one database: thin wiring from a queued command to ``dbagent.operations.lifecycle``."""
