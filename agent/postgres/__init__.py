"""The PostgreSQL side: connections, the store (the only SQL on the dbagent schema), the Alembic driver
(migrator), the writer's advisory lock and Redis lease (locks), who holds or waits for locks (blocking),
verification queries (verify) and pg_dump/pg_restore (backups). Built on the core and the configuration."""
