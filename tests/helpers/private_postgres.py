"""A PostgreSQL 15 server of the test's own, on a free port, that the test may crash.

``initdb`` refuses to run as root, so the cluster is made and run as the ``postgres`` user
(``runuser -u postgres --`` when the tests run as root), in a directory of its own under
/tmp (pytest's tmp_path is not reachable by that user). ``kill()`` is ``pg_ctl stop -m
immediate`` (no checkpoint: the next start runs crash recovery, as after a power cut);
``start()`` again on the same port and directory. Trust authentication on loopback only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from helpers.private_redis import free_port

BIN = Path(os.environ.get("CONVEYOR_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))


def postgres_installed() -> bool:
    return (BIN / "initdb").exists() and (BIN / "pg_ctl").exists()


def _as_postgres(*command: str) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *command]
    return list(command)


class PrivatePostgres:
    """``initdb`` once, then ``pg_ctl start``/``stop`` on a fixed port and directory."""

    def __init__(self) -> None:
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="conveyor-pg-"))
        self.data = self.root / "data"
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        subprocess.run(
            _as_postgres(str(BIN / "initdb"), "-D", str(self.data), "-U", "postgres",
                         "--auth=trust", "--no-sync", "-E", "UTF8"),
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip

    def start(self, timeout: float = 60.0) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run(
            _as_postgres(str(BIN / "pg_ctl"), "-D", str(self.data), "-l",
                         str(self.root / "server.log"), "-o", options, "-w", "-t",
                         str(int(timeout)), "start"),
            check=True, capture_output=True, timeout=timeout + 10,
        )  # fmt: skip

    def kill(self) -> None:
        """Stop at once, with no checkpoint: connections drop, the next start recovers."""
        subprocess.run(
            _as_postgres(str(BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"),
            check=False, capture_output=True, timeout=60,
        )  # fmt: skip

    def answers(self) -> bool:
        import psycopg

        try:
            psycopg.connect(self.url, connect_timeout=1).close()
        except psycopg.Error:
            return False
        return True

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.root / "server.log").read_text(errors="replace")
        return ""

    def stop(self) -> None:
        self.kill()
        for _ in range(50):
            with contextlib.suppress(OSError):
                shutil.rmtree(self.root)
                return
            time.sleep(0.1)
