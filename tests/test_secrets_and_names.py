"""Credentials never show, and names cannot drive a terminal.

* One masking function (``conveyor.urls.mask_url``) covers the userinfo password, nested
  URLs, and any query parameter whose name contains pass, pwd, secret, token or key; every
  error, log line, ``/health`` answer and repr goes through it.
* Names refuse control characters everywhere (queue names, types, task ids, worker ids),
  in the Python API and the settings too; the CLI escapes anything unprintable it prints,
  whatever the store holds.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
from loguru import logger

from api_support import clear_conveyor_env, client_factory, free_port, require_modules
from conveyor import ConfigError, QueueManager, TaskValidationError
from conveyor.backends import sqlite_path_from_url
from conveyor.cli import main
from conveyor.cli.common import print_json, printable
from conveyor.settings import load_settings
from conveyor.urls import mask_url

SECRET = "hunter2"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clear_conveyor_env(monkeypatch)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    """Every conveyor log line written while the test runs."""
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), level="DEBUG")
    logger.enable("conveyor")
    yield lines
    logger.remove(sink)


# -- masking --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://host/0?password=hunter2", "redis://host/0?password=***"),
        ("redis://:hunter2@host:6379/0", "redis://:***@host:6379/0"),
        ("redis://h/0?db=1&Api_Key=k&auth_token=t&client_secret=s&pwd=p&passphrase=x",
         "redis://h/0?db=1&Api_Key=***&auth_token=***&client_secret=***&pwd=***&passphrase=***"),
        ("amqp://u:hunter2@h/?heartbeat=2&task_store=redis://:hunter2@r:6379/0?password=hunter2",
         "amqp://u:***@h/?heartbeat=2&task_store=redis://:***@r:6379/0?password=***"),
        ("redis://:hunter2@host:notaport/0", "redis://:***@host:notaport/0"),
        ("redis://:p@ss@host/0", "redis://:***@host/0"),
        ("redis://user@host/0?db=2", "redis://user@host/0?db=2"),
        ("sqlite:///conveyor.db?mode=ro", "sqlite:///conveyor.db?mode=ro"),
        ("http://[::1", "<unparseable url>"),
    ],
)  # fmt: skip
def test_mask_url_covers_userinfo_nested_urls_and_secret_parameters(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_settings_repr_and_errors_mask_query_passwords(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_URL", f"redis://cache:6379/0?password={SECRET}")
    monkeypatch.setenv("CONVEYOR_RABBITMQ__TASK_STORE", f"redis://r/0?password={SECRET}")
    settings = load_settings()
    assert SECRET not in repr(settings) and SECRET not in str(settings)
    assert SECRET not in repr(settings.rabbitmq)
    assert settings.backend_url().endswith(SECRET)  # usable, just never shown
    monkeypatch.setenv("CONVEYOR_URL", f"ftp://cache/?token={SECRET}")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert SECRET not in str(caught.value)
    monkeypatch.delenv("CONVEYOR_URL")
    monkeypatch.setenv("CONVEYOR_API__TOKEN", "")  # too short: the error must not show it
    with pytest.raises(ConfigError) as short:
        load_settings(api={"token": ["not", "text", SECRET]})
    assert SECRET not in str(short.value)


def test_errors_logs_and_health_mask_a_query_password(
    log_lines: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    require_modules("fastapi", "httpx")
    url = f"redis://127.0.0.1:{free_port()}/0?password={SECRET}"
    with pytest.raises(ConnectionError) as caught:
        QueueManager.from_url(url, connect_timeout=0.5)
    assert SECRET not in str(caught.value) and "password=***" in str(caught.value)

    assert main(["status", "--url", url]) == 2
    assert SECRET not in capsys.readouterr().err

    clients = client_factory(url, "default")
    make = next(clients)
    try:
        health = make().get("/health")
        assert health.status_code == 503 and SECRET not in health.text
        assert "password=***" in health.json()["detail"]
        assert SECRET not in make().get("/api/v1/stats").text
    finally:
        next(clients, None)
    assert log_lines, "the failures above are logged"
    assert not [line for line in log_lines if SECRET in line]


# -- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a\x1bb", "nul\x00", "tab\tq", "new\nline", "bidi\u202eq",
                                  "sp ace", "{brace}", "", "x" * 201])  # fmt: skip
def test_queue_names_with_controls_spaces_or_braces_are_refused_everywhere(
    name: str, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path}/q.db"
    with pytest.raises(ConfigError, match="queue_name"):
        QueueManager.from_url(url, queue_name=name)
    with pytest.raises(ConfigError, match=r"queue\.name"):
        load_settings(queue={"name": name})
    with pytest.raises(ConfigError, match=r"worker\.queues"):
        load_settings(worker={"queues": ["default", name]})


@pytest.mark.parametrize("bad", ["doc\x1b[2J", "nul\x00", "x" * 201, "\u2028"])
def test_types_and_worker_ids_refuse_control_characters(bad: str, tmp_path: Path) -> None:
    with QueueManager.from_url(f"sqlite:///{tmp_path}/q.db") as queue:
        with pytest.raises(TaskValidationError) as caught:
            queue.push("t", 1, type=bad)
        assert caught.value.field == "type"
        with pytest.raises(TaskValidationError, match="worker_id"):
            queue.register_worker(bad, {"id": bad}, ttl=5)
        assert queue.list_tasks() == [] and queue.workers() == []


@pytest.mark.parametrize("task_id", [".", ".."])
def test_the_ids_dot_and_dot_dot_are_refused_everywhere(task_id: str, tmp_path: Path) -> None:
    with QueueManager.from_url(f"sqlite:///{tmp_path}/q.db") as queue:
        with pytest.raises(TaskValidationError, match="URL"):
            queue.push(task_id, 1)
        assert queue.get_task("...") is None  # three dots are an ordinary id
        assert queue.push("...", 1) and queue.push("a/../b", 1) and queue.push("./x", 1)


# -- what the CLI prints ---------------------------------------------------------------------


def test_printable_escapes_what_could_drive_a_terminal() -> None:
    assert printable("plain text, é, 日本") == "plain text, é, 日本"
    assert printable("a\x1b[2Jb") == "a\\x1b[2Jb"
    assert printable("csi\x9b31m") == "csi\\x9b31m"
    assert printable("bidi\u202eevil") == "bidi\\u202eevil"
    assert printable("bad\udcffbyte") == "bad\\udcffbyte"
    assert printable("two\nlines\r") == "two\nlines\\x0d"


def test_print_json_stays_valid_json_and_inert(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    value = {"id": "x\x1b]0;owned\x07", "note": "c1\x9b and \U000e0041 and \udcff"}
    print_json(value)
    out = capsys.readouterr().out
    assert all(ch.isprintable() or ch == "\n" for ch in out)
    decoded = json.loads(out)
    assert decoded["id"] == value["id"]


def test_the_cli_escapes_control_characters_from_the_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path}/q.db"
    evil = "\x1b]0;owned\x07\x1b[2J\x9b31m"
    with QueueManager.from_url(url, queue_name="q") as queue:
        assert queue.push("victim", {"note": evil}, type="report")
        message = queue.reserve(timeout=1)
        assert message is not None
        assert queue.set_progress(message, 0.5, f"half {evil}")
        assert queue.fail(message, reason="error", error={"type": evil, "message": evil})
        queue.register_worker("w-evil", {"id": "w-evil", "host": evil, "queues": ["q"],
                                         "state": evil, "current": [{"task_id": evil}]},
                              ttl=60)  # fmt: skip
    # And what no push accepts, written by hand: a type and a dead reason with escapes.
    with closing(sqlite3.connect(sqlite_path_from_url(url))) as db, db:
        db.execute("UPDATE tasks SET type = ?, dead_reason = ? WHERE id = 'victim'", (evil, evil))
    for argv in (["task", "show", "victim"], ["task", "show", "victim", "--json"],
                 ["dead", "list"], ["dead", "list", "--json"], ["workers"], ["workers", "--json"],
                 ["status"], ["task", "cancel", "victim"]):  # fmt: skip
        code = main([*argv, "--url", url, "--queue", "q"])
        captured = capsys.readouterr()
        for stream in (captured.out, captured.err):
            assert "\x1b" not in stream and "\x07" not in stream and "\x9b" not in stream, argv
        assert code in (0, 1), (argv, captured.err)
    for argv in (["task", "show", "nope\x1b[2J"], ["status", "--queue", "q\x1b[2J"],
                 ["push", "{}", "--type", "t\x1b[2J"], ["push", "\x1b[2J"]):  # fmt: skip
        assert main([*argv, "--url", url]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("conveyor: ") and "\x1b" not in err, (argv, err)
