"""``conveyor worker`` as an operator runs it: a real process, its log in a file.

For tests of what a whole worker does when its broker misbehaves (waits at start, exits 2
on refused credentials, survives an outage). The worker runs in its own empty directory
with an empty config file, so neither the checkout's config/development.yaml nor the
test's CONVEYOR_* environment leaks in; it loads ``ops_pipeline`` from tests/helpers
(data ``{"sleep": 0.2}`` sleeps that long). Short timers by default: a 0.5 s heartbeat, a
1 s connect timeout, a 5 s lease.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

HELPERS = Path(__file__).resolve().parent
CONVEYOR = Path(sys.executable).parent / "conveyor"
DEFAULT_ENV = {
    "CONVEYOR_WORKER__HEARTBEAT_INTERVAL": "0.5",
    "CONVEYOR_QUEUE__CONNECT_TIMEOUT": "1",
    "CONVEYOR_QUEUE__VISIBILITY_TIMEOUT": "5",
    "CONVEYOR_LOGGING__LEVEL": "INFO",
}


class WorkerProcess:
    """``conveyor worker --url URL -P ops_pipeline ARGS...`` started at construction."""

    def __init__(
        self, workdir: Path, url: str, *args: str, env: Mapping[str, str] | None = None
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "empty.yaml"
        config.write_text("{}\n")
        self.log_path = workdir / "worker.log"
        environment = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
        environment.update(DEFAULT_ENV)
        environment.update(env or {})
        environment["PYTHONPATH"] = os.pathsep.join(
            [str(HELPERS), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [str(CONVEYOR), "worker", "--config", str(config), "--url", url,
                 "-P", "ops_pipeline", *args],
                cwd=workdir, env=environment, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.started = time.monotonic()

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""

    def wait_for(self, text: str, timeout: float = 30.0) -> float:
        """Wait for ``text`` in the log; returns when it was seen (monotonic seconds).

        Fails at once if the worker exits first, with the log in the message.
        """
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if self.proc.poll() is not None and text not in self.log():
                raise AssertionError(
                    f"worker exited ({self.proc.returncode}) before logging {text!r}:\n"
                    f"{self.log()[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no {text!r} in the worker's log within {timeout}s:\n{self.log()[-3000:]}"
                )
            time.sleep(0.02)
        return time.monotonic()

    def signal(self, signum: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def wait(self, timeout: float = 30.0) -> int:
        """The exit code; fails (with the log) if the worker is still running."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"worker still running after {timeout}s:\n{self.log()[-3000:]}"
            ) from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
