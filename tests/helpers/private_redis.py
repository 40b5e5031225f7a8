"""A redis-server of the test's own, on a free port, started with the flags under test.

Used where a test needs a server configured a certain way (no persistence, an evicting
policy, CONFIG disabled, a password), state nobody else may see (``conveyor stop`` of
every worker), or a server it may break: ``kill()`` (SIGKILL) and ``start()`` again on the
same port and directory (with ``aof=True`` the queue survives, as in production),
``pause()``/``resume()`` (SIGSTOP/SIGCONT: a server that accepts but never answers).
``PrivateRedis(dir, start=False)`` reserves a port for a server that does not exist yet
("a worker started before its Redis"). It starts in about 10-50 ms.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateRedis:
    """``redis-server --port N ARGS...`` in the foreground; ``stop()`` kills and reaps it.

    ``aof=True`` adds ``--appendonly yes --appendfsync everysec`` (what production runs);
    ``password`` adds ``--requirepass`` and goes into ``url``. ``port`` reuses a port.
    """

    def __init__(
        self,
        workdir: Path,
        *args: str,
        aof: bool = False,
        password: str | None = None,
        port: int | None = None,
        start: bool = True,
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server is not installed")
        self.port = port or free_port()
        self.workdir = workdir
        self.password = password
        auth = f":{password}@" if password else ""
        self.url = f"redis://{auth}127.0.0.1:{self.port}/0"
        workdir.mkdir(parents=True, exist_ok=True)
        extra = ["--appendonly", "yes", "--appendfsync", "everysec"] if aof else []
        extra += ["--requirepass", password] if password else []
        self.command = [
            binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(workdir),
            "--save", "", "--daemonize", "no", *extra, *args,
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None
        if start:
            self.start()

    def start(self, timeout: float = 10.0) -> float:
        """Start the server (again: same port, same directory, so the AOF is replayed) and
        wait until it answers PING; returns the seconds that took."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"redis-server on port {self.port} is already running")
        started = time.monotonic()
        log = (self.workdir / "redis.log").open("ab")
        try:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=log)
        finally:
            log.close()
        self._wait_ready(timeout)
        return time.monotonic() - started

    def _wait_ready(self, timeout: float) -> None:
        client = redis.Redis(
            port=self.port, password=self.password, socket_connect_timeout=0.5, socket_timeout=1
        )
        deadline = time.monotonic() + timeout
        try:
            while True:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"redis-server exited with {self.proc.returncode}; see "
                        f"{self.workdir / 'redis.log'}"
                    )
                try:
                    if client.ping():  # LOADING (replaying the AOF) raises: keep polling
                        return
                except redis.RedisError:
                    if time.monotonic() > deadline:
                        raise
                time.sleep(0.02)
        finally:
            client.close()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would: no shutdown, no final AOF rewrite."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)

    def pause(self) -> None:
        """SIGSTOP: connections stay open and connects succeed, but nothing is answered."""
        assert self.proc is not None and self.proc.poll() is None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after ``pause()``."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        self.kill()
