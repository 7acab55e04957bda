"""dbagent: PostgreSQL migrations, backups and rollbacks for production fleets."""

__version__ = "0.1.0"
