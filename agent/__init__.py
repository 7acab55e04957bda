"""dbagent: PostgreSQL migrations, backups and rollbacks for production fleets.

The import package is ``dbagent``; its code lives in the repository's ``agent/`` folder (``worker/`` is
``dbagent.worker``). ``agent`` is kept as an alias for migration scripts (``dbagent._alias``).
"""

__version__ = "0.1.0"

if __name__ == "dbagent":
    from dbagent import _alias

    _alias.install()
else:  # this folder imported by its folder's name (``import agent`` from a checkout): be dbagent, not a copy
    import sys

    import dbagent

    sys.modules[__name__] = dbagent
