"""Settings: YAML + environment layering, precedence, and errors that name the bad key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conveyor import ConfigError, QueueBackend, QueueManager
from conveyor.settings import Settings, load_settings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each test starts with no Conveyor variables and a cwd without config/development.yaml."""
    for name in list(os.environ):
        if name.upper().startswith("CONVEYOR_") or name.upper() in ("REDIS_URL", "RABBITMQ_URL"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def write(tmp_path: Path, text: str, name: str = "conveyor.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_any_file() -> None:
    settings = load_settings()
    assert settings.backend is QueueBackend.SQLITE
    assert settings.backend_url() == "sqlite:///conveyor.db"
    assert settings.queue.max_priority == 10
    assert settings.worker.queues == ["default"]
    assert settings.logging.json_lines is False


def test_yaml_values_are_loaded(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "backend: redis\nredis:\n  url: redis://cache:6379/2\n"
        "queue:\n  name: meeting_tasks\n  max_priority: 20\n"
        "worker:\n  queues: [high, low]\n  concurrency: 3\nlogging:\n  json: true\n",
    )
    settings = load_settings(path)
    assert settings.backend_url() == "redis://cache:6379/2"
    assert settings.queue.name == "meeting_tasks"
    assert settings.queue.max_priority == 20
    assert settings.queue.visibility_timeout == 60.0  # untouched keys keep their defaults
    assert settings.worker.queues == ["high", "low"]
    assert settings.worker.concurrency == 3
    assert settings.logging.json_lines is True


def test_shipped_config_files_are_valid() -> None:
    dev = load_settings(REPO / "config" / "development.yaml")
    prod = load_settings(REPO / "config" / "production.yaml")
    assert dev.backend is QueueBackend.SQLITE
    assert prod.backend is QueueBackend.REDIS
    assert prod.worker.max_shutdown_wait > 0


def test_config_development_yaml_in_cwd_is_the_default(tmp_path: Path) -> None:
    (tmp_path / "config").mkdir()
    write(tmp_path, "queue:\n  name: from-cwd\n", "config/development.yaml")
    assert load_settings().queue.name == "from-cwd"


def test_conveyor_config_env_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONVEYOR_CONFIG", str(write(tmp_path, "queue:\n  name: via-env\n")))
    assert load_settings().queue.name == "via-env"


def test_env_overrides_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "queue:\n  name: from-file\n  max_deliveries: 7\n")
    monkeypatch.setenv("CONVEYOR_QUEUE__NAME", "from-env")
    monkeypatch.setenv("CONVEYOR_WORKER__CONCURRENCY", "4")
    monkeypatch.setenv("CONVEYOR_WORKER__QUEUES", "a, b")
    monkeypatch.setenv("CONVEYOR_LOGGING__JSON", "true")
    settings = load_settings(path)
    assert settings.queue.name == "from-env"
    assert settings.queue.max_deliveries == 7  # the file still fills what env leaves alone
    assert settings.worker.concurrency == 4
    assert settings.worker.queues == ["a", "b"]
    assert settings.logging.json_lines is True


def test_keyword_overrides_beat_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_URL", "redis://env:6379/0")
    assert load_settings(url="sqlite:///cli.db").backend_url() == "sqlite:///cli.db"


def test_conveyor_url_beats_backend_sections(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, "backend: sqlite\nsqlite:\n  path: file.db\n")
    monkeypatch.setenv("CONVEYOR_URL", "redis://other:6379/3")
    monkeypatch.setenv("REDIS_URL", "redis://ignored:6379/0")
    assert load_settings(path).backend_url() == "redis://other:6379/3"


def test_redis_url_env_overrides_file_but_not_prefixed_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, "backend: redis\nredis:\n  url: redis://file:6379/0\n")
    monkeypatch.setenv("REDIS_URL", "redis://compose:6379/1")
    assert load_settings(path).backend_url() == "redis://compose:6379/1"
    monkeypatch.setenv("CONVEYOR_REDIS__URL", "redis://specific:6379/2")
    assert load_settings(path).backend_url() == "redis://specific:6379/2"


def test_rabbitmq_url_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RABBITMQ_URL", "amqp://u:p@mq:5672/")
    monkeypatch.setenv("CONVEYOR_BACKEND", "rabbitmq")
    assert load_settings().backend_url() == "amqp://u:p@mq:5672/"


def test_unknown_yaml_key_is_an_error_naming_it(tmp_path: Path) -> None:
    path = write(tmp_path, "worker:\n  concurency: 4\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert "worker.concurency" in message
    assert "unknown setting" in message
    assert "did you mean 'concurrency'" in message
    assert f"{path}, line 2" in message


def test_unknown_top_level_section_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"reddis: unknown setting; did you mean 'redis'"):
        load_settings(write(tmp_path, "reddis:\n  url: redis://x/0\n"))


def test_bad_value_names_key_path_reason_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, "queue:\n  name: q\n  max_priority: 300\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert "queue.max_priority" in message
    assert "less than or equal to 255" in message
    assert "300" in message
    assert f"{path}, line 3" in message


def test_bad_env_value_names_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_WORKER__CONCURRENCY", "zero")
    with pytest.raises(ConfigError, match=r"worker\.concurrency: .*CONVEYOR_WORKER__CONCURRENCY"):
        load_settings(write(tmp_path, "worker:\n  concurrency: 2\n"))


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ("backend: kafka\n", "backend"),
        ("url: http://nope\n", "url"),
        ("redis:\n  url: amqp://x/\n", "redis.url"),
        ("queue:\n  visibility_timeout: 0\n", "queue.visibility_timeout"),
        ("queue:\n  max_deliveries: 1001\n", "queue.max_deliveries"),
        ("worker:\n  shutdown_mode: later\n", "worker.shutdown_mode"),
        ("worker:\n  queues: []\n", "worker.queues"),
        ("logging:\n  level: LOUD\n", "logging.level"),
    ],
)
def test_each_bad_value_is_caught(tmp_path: Path, yaml_text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"(?m)^  {key}: "):
        load_settings(write(tmp_path, yaml_text))


def test_heartbeat_must_be_shorter_than_lease(tmp_path: Path) -> None:
    path = write(tmp_path, "queue:\n  visibility_timeout: 5\nworker:\n  heartbeat_interval: 5\n")
    with pytest.raises(ConfigError, match=r"worker\.heartbeat_interval .* queue\.visibility"):
        load_settings(path)


def test_missing_explicit_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=rf"config file {missing}: cannot read it"):
        load_settings(missing)


def test_yaml_syntax_error_gives_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "queue:\n  name: q\n  max_priority: [1, 2\n")
    with pytest.raises(ConfigError, match=rf"{path}, line \d+: YAML syntax error"):
        load_settings(path)


def test_yaml_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_settings(write(tmp_path, "- a\n- b\n"))


def test_empty_yaml_means_defaults(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, "# nothing yet\n")).queue.name == "default"


def test_repr_and_errors_mask_passwords(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_URL", "redis://:hunter2@cache:6379/0")
    settings = load_settings()
    assert "hunter2" not in repr(settings)
    assert "hunter2" not in str(settings)
    assert settings.backend_url() == "redis://:hunter2@cache:6379/0"  # usable, just not shown
    monkeypatch.setenv("CONVEYOR_URL", "http://user:hunter2@cache/")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "hunter2" not in str(info.value)


def test_environment_is_read_when_loading_not_at_import(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().queue.name == "default"
    monkeypatch.setenv("CONVEYOR_QUEUE__NAME", "later")
    assert load_settings().queue.name == "later"
    assert Settings().queue.name == "later"


def test_settings_are_frozen() -> None:
    settings = load_settings()
    with pytest.raises(ValueError, match="frozen"):
        settings.queue.name = "other"


def test_from_settings_builds_a_working_sqlite_queue(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"sqlite:\n  path: {tmp_path / 'q.db'}\nqueue:\n  name: from-settings\n"
        "  max_priority: 20\n  visibility_timeout: 7\n",
    )
    with QueueManager.from_settings(load_settings(path)) as queue:
        assert queue.queue_name == "from-settings"
        assert queue.visibility_timeout == 7.0
        assert queue.push("t1", {"n": 1}, priority=15)  # allowed by max_priority 20
        message = queue.pull(timeout=0)
        assert message is not None
        assert (message["task_id"], message["data"], message["priority"]) == ("t1", {"n": 1}, 15)
        assert (tmp_path / "q.db").exists()
