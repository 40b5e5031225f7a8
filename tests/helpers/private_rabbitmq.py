"""A RabbitMQ node of the test run's own, which tests may stop and start at will.

The shared broker on 5672 belongs to every test (and every helper working on this
machine); a test that restarts a broker needs one nobody else uses. This starts a second
node from the installed ``rabbitmq-server`` (the Debian package's
``/usr/lib/rabbitmq/bin`` scripts, run directly: ``/usr/sbin/rabbitmq-server`` would
``su`` to the rabbitmq user and log to /var/log), everything in a temporary directory:

* ``RABBITMQ_NODENAME`` unique (``conveyor-test-<pid>-<random>@localhost``);
* ``RABBITMQ_NODE_PORT`` (AMQP) and ``RABBITMQ_DIST_PORT`` (Erlang distribution) free
  ports on 127.0.0.1 (the default distribution port, AMQP + 20000, may be taken: the
  shared node's is 25672);
* ``RABBITMQ_MNESIA_BASE`` and ``RABBITMQ_LOG_BASE`` in the directory;
* an empty ``RABBITMQ_ENABLED_PLUGINS_FILE``, so the management plugin does not try to
  take port 15672 from the shared node;
* its own ``RABBITMQ_CONFIG_FILE`` and an empty ``RABBITMQ_CONF_ENV_FILE``:
  ``/etc/rabbitmq/rabbitmq.conf`` may pin ``listeners.tcp`` to 5672 and
  ``rabbitmq-env.conf`` the node name;
* ``HOME`` in the directory with an ``.erlang.cookie`` of its own, which the node and
  ``rabbitmqctl`` (run with the same environment) share; root's home is never touched.

The node registers with the machine's epmd (port 4369; the node starts one if none runs).
``guest``/``guest`` may log in from the loopback address only, which is where tests are.
Starting takes 2-4 s on an idle machine here (10-20 s on a slow one), so the test suite
starts it once per session (``conftest.private_rabbitmq``); ``stop_app()``/``start_app()``
are a broker restart as operators do it (about 0.5-1.5 s each).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

from helpers.private_redis import free_port

SCRIPTS = Path("/usr/lib/rabbitmq/bin")


def rabbitmq_installed() -> bool:
    """The Debian/Ubuntu package's scripts (or rabbitmq-server on PATH) are there."""
    return (SCRIPTS / "rabbitmq-server").exists() or shutil.which("rabbitmq-server") is not None


def _script(name: str) -> str:
    packaged = SCRIPTS / name
    if packaged.exists():
        return str(packaged)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is not installed")
    return found


class PrivateRabbitMQ:
    """One node in ``workdir``; ``start()`` blocks until it accepts AMQP connections."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.node = f"conveyor-test-{os.getpid()}-{uuid.uuid4().hex[:6]}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        while self.dist_port == self.port:
            self.dist_port = free_port()
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        home, mnesia, logs = workdir / "home", workdir / "mnesia", workdir / "log"
        for folder in (home, mnesia, logs):
            folder.mkdir(parents=True, exist_ok=True)
        cookie = home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16).upper())
        cookie.chmod(0o400)
        (workdir / "enabled_plugins").write_text("")
        (workdir / "rabbitmq-env.conf").write_text("")
        (workdir / "rabbitmq.conf").write_text("loopback_users.guest = true\n")
        self.env: dict[str, str] = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))},
            "HOME": str(home),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(mnesia),
            "RABBITMQ_LOG_BASE": str(logs),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(workdir / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(workdir / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(workdir / "rabbitmq.conf"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }
        self.proc: subprocess.Popen[bytes] | None = None
        #: Seconds the last ``start()`` took, for the record.
        self.startup_seconds = 0.0

    def amqp_url(self, query: str = "") -> str:
        """The node's URL, e.g. ``amqp_url("task_store=sqlite:///...")``."""
        return f"{self.url}?{query}" if query else self.url

    # -- the node ---------------------------------------------------------------------------

    def start(self, timeout: float = 90.0) -> float:
        """Boot the node; returns the seconds until it accepted an AMQP connection."""
        started = time.monotonic()
        log = (self.workdir / "server.out").open("ab")
        try:
            self.proc = subprocess.Popen(
                [_script("rabbitmq-server")], env=self.env, cwd=self.workdir,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        finally:
            log.close()
        self._wait_port(started + timeout)
        self.ctl("await_startup", "--timeout", str(max(5, int(timeout))), timeout=timeout)
        self.startup_seconds = time.monotonic() - started
        return self.startup_seconds

    def _wait_port(self, deadline: float) -> None:
        while not self.accepting():
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"rabbitmq-server exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"RabbitMQ node {self.node} did not start:\n{self.log_tail()}")
            time.sleep(0.1)

    def accepting(self) -> bool:
        """Does the AMQP port accept a TCP connection (the app is running)?"""
        with socket.socket() as sock:
            sock.settimeout(1)
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    def ctl(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """``rabbitmqctl -n <node> ARGS``; raises with its output when it fails."""
        done = subprocess.run(
            [_script("rabbitmqctl"), "-n", self.node, *args], env=self.env,
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(
                f"rabbitmqctl {' '.join(args)} failed ({done.returncode}):\n"
                f"{done.stdout}{done.stderr}"
            )
        return done

    def stop_app(self) -> None:
        """``rabbitmqctl stop_app``: the broker closes every connection and its port; the
        Erlang node keeps running (a broker restart, as operators do it)."""
        self.ctl("stop_app")

    def start_app(self) -> None:
        """``rabbitmqctl start_app``; returns once the AMQP port accepts connections."""
        self.ctl("start_app")
        deadline = time.monotonic() + 30
        while not self.accepting():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.node}: port {self.port} closed after start_app")
            time.sleep(0.05)

    def ensure_running(self) -> None:
        """start_app if a test left the app stopped."""
        if not self.accepting():
            self.start_app()

    def stop(self) -> None:
        """Stop the node (``rabbitmqctl stop``), kill what is left, keep the logs."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self.ctl("stop", timeout=30)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)

    def log_tail(self, chars: int = 3000) -> str:
        texts = []
        for path in (self.workdir / "server.out", self.workdir / "log" / f"{self.node}.log"):
            with contextlib.suppress(OSError):
                texts.append(path.read_text(errors="replace")[-chars:])
        return "\n".join(texts)

    def environment(self) -> Mapping[str, str]:
        """The environment its scripts need, for a test that runs more of them."""
        return dict(self.env)
