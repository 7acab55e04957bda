"""What is checked before anything changes: the scripts' structure (validate), their SQL (lint), the
checksums of applied scripts and the whole verdict before a migrate (preflight), the environment (envcheck)
and an existing Alembic project's fitness (onboard). Built on the core and on dbagent.postgres (the Alembic
driver reads the scripts); used by the operations and the CLI."""
