"""The Celery worker of one database: thin wiring from a queued command to ``agent.operations.lifecycle``."""
