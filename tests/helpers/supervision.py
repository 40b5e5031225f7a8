"""A real supervisord for tests: render a config around a program section, run, inspect, stop.

supervisord runs in the foreground (``-n``) as the test's child; its control socket lives in
a short temporary directory (unix socket paths are limited to about 100 bytes). Every pid it
reports is remembered so teardown can kill leftovers even if supervisord itself is stuck.
"""

from __future__ import annotations

import configparser
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
REAL_CONF = ROOT / "supervisor" / "conveyor-worker.conf"
_STATUS_LINE = re.compile(r"^(\S+)\s+([A-Z]+)\s*(?:pid (\d+))?")


def fresh_checkout(dest: Path) -> Path:
    """The files ``git`` tracks in this checkout, copied to ``dest``: what a fresh clone
    has (untracked files such as a local logs/ folder are not there), with the working
    tree's edits, so an uncommitted change is tested too. ``.venv`` links to the running
    interpreter's environment (the package is installed there). Raises RuntimeError when
    this is not a git checkout."""
    git = shutil.which("git")
    if git is None:
        raise RuntimeError("git is not installed")
    listed = subprocess.run(
        [git, "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=False
    )
    if listed.returncode != 0:
        raise RuntimeError(f"not a git checkout: {listed.stderr.decode(errors='replace')}")
    for name in filter(None, listed.stdout.decode().split("\0")):
        source = ROOT / name
        if source.is_file():  # a tracked file deleted in the working tree is skipped
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    (dest / ".venv").symlink_to(Path(sys.prefix))
    return dest


def supervisord_installed() -> bool:
    """supervisor comes from the dev extra (``pip install -e '.[dev]'``)."""
    return (BIN / "supervisord").exists() and (BIN / "supervisorctl").exists()


def program_section(
    conf: Path = REAL_CONF, name: str = "program:conveyor-worker"
) -> dict[str, str]:
    """The keys of one program section, uninterpolated, as supervisor reads them."""
    parser = configparser.RawConfigParser(strict=False, inline_comment_prefixes=(";",))
    parser.read(conf, encoding="utf-8")
    return dict(parser.items(name))


def supervisor_env(values: Mapping[str, str]) -> str:
    """``KEY="value",...`` as ``environment=`` wants it; values may use ``%(process_num)02d``."""
    return ",".join(f'{key}="{value}"' for key, value in values.items())


class Supervisord:
    """One supervisord with the given ``[program:NAME]`` sections."""

    def __init__(
        self, workdir: Path, programs: Mapping[str, Mapping[str, str]], env: Mapping[str, str]
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.sockdir = Path(tempfile.mkdtemp(prefix="sv"))
        self.socket = self.sockdir / "supervisor.sock"
        self.logfile = workdir / "supervisord.log"
        self.conf = workdir / "supervisord.conf"
        self.conf.write_text(self._render(programs))
        self.pids: set[int] = set()
        # Inherited by every program: teardown kills a leftover pid only if it carries this,
        # never a process that reused the number.
        self.marker = f"CONVEYOR_TEST_SUPERVISORD={self.sockdir.name}"
        self.proc = subprocess.Popen(
            [str(BIN / "supervisord"), "-n", "-c", str(self.conf)],
            env={**os.environ, **env, "CONVEYOR_TEST_SUPERVISORD": self.sockdir.name},
            stdout=subprocess.DEVNULL,
            stderr=(workdir / "supervisord.stderr").open("wb"), start_new_session=True,
        )  # fmt: skip
        self._wait_for_socket(timeout=20.0)

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def _render(self, programs: Mapping[str, Mapping[str, str]]) -> str:
        lines = [
            "[unix_http_server]", f"file={self.socket}", "",
            "[supervisord]", f"logfile={self.logfile}", f"pidfile={self.workdir}/sv.pid",
            f"childlogdir={self.workdir}", "loglevel=info", "nodaemon=true", "",
            "[rpcinterface:supervisor]",
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
            "", "[supervisorctl]", f"serverurl={self.url}", "",
        ]  # fmt: skip
        for name, options in programs.items():
            lines.append(f"[program:{name}]")
            # A value continued over several lines keeps its continuation indented.
            lines += [f"{key}={value}".replace("\n", "\n    ") for key, value in options.items()]
            lines.append("")
        return "\n".join(lines)

    def _wait_for_socket(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.ctl("pid").returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"supervisord did not start:\n{self.log()}")
            time.sleep(0.05)

    def ctl(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "supervisorctl"), "-c", str(self.conf), *args],
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip

    def status(self) -> dict[str, tuple[str, int | None]]:
        """Process name (``group:name``) -> (state, pid or None)."""
        found: dict[str, tuple[str, int | None]] = {}
        for line in self.ctl("status").stdout.splitlines():
            match = _STATUS_LINE.match(line)
            if match:
                pid = int(match.group(3)) if match.group(3) else None
                found[match.group(1)] = (match.group(2), pid)
                if pid:
                    self.pids.add(pid)
        return found

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return self.logfile.read_text(errors="replace")
        return ""

    def stop(self) -> None:
        """Shut supervisord down (it stops its programs); kill whatever is left."""
        self.status()
        if self.proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.ctl("shutdown", timeout=10)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        for pid in self.pids:
            if self._ours(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.sockdir, ignore_errors=True)

    def _ours(self, pid: int) -> bool:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            return False
        return self.marker.encode() in environ.split(b"\0")
