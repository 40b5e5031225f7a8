"""Cluster and Sentinel URLs, the durability option and their settings: pure parsing, no
server. What they do on real servers is tests/test_scale_out.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from conveyor import ConfigError
from conveyor.backends import QueueBackend, backend_for_url
from conveyor.backends.redis.target import parse_target
from conveyor.durability import Durability, parse_durability
from conveyor.settings import load_settings
from conveyor.urls import mask_url


def test_cluster_url_names_every_node_and_keeps_credentials_out_of_the_safe_url() -> None:
    target = parse_target("redis+cluster://app:s3cret@10.0.0.1:7000,10.0.0.2,[::1]:7002/")
    assert target.mode == "cluster" and target.high_availability
    assert target.nodes == (("10.0.0.1", 7000), ("10.0.0.2", 6379), ("::1", 7002))
    assert (target.username, target.password) == ("app", "s3cret")
    assert "s3cret" not in target.safe_url and "s3cret" not in repr(target)
    assert target.safe_url == "redis+cluster://app:***@10.0.0.1:7000,10.0.0.2,[::1]:7002/"


def test_sentinel_url_carries_the_master_and_the_sentinel_passwords_both_masked() -> None:
    url = (
        "redis+sentinel://:master-pw@s1:26379,s2:26380,s3/mymaster/2"
        "?sentinel_password=sentinel-pw&failover_timeout=12&durability=replicas=1,timeout=0.5"
    )
    target = parse_target(url)
    assert target.mode == "sentinel"
    assert target.nodes == (("s1", 26379), ("s2", 26380), ("s3", 26379))
    assert (target.service, target.db) == ("mymaster", 2)
    assert target.password == "master-pw" and target.sentinel_password == "sentinel-pw"
    assert target.failover_timeout == 12.0
    assert target.durability == Durability(1, 0.5)
    for text in (target.safe_url, mask_url(url), repr(target)):
        assert "master-pw" not in text and "sentinel-pw" not in text, text
    assert mask_url(url).startswith("redis+sentinel://:***@s1:26379,s2:26380,s3/mymaster/2?")
    assert "sentinel_password=***" in mask_url(url)


def test_a_task_store_url_nested_in_an_amqp_url_is_masked_too() -> None:
    url = (
        "amqp://guest:guest@mq:5672/?task_store=redis+sentinel://:pw1@s1:26379/m/0"
        "?sentinel_password=pw2"
    )
    masked = mask_url(url)
    assert "pw1" not in masked and "pw2" not in masked and "guest:guest" not in masked
    assert "redis+sentinel://:***@s1:26379/m/0" in masked  # the + is kept as written


def test_a_single_server_url_keeps_its_own_parameters_and_loses_ours() -> None:
    target = parse_target("redis://:pw@h:6379/3?durability=replicas=2&health_check_interval=5")
    assert target.mode == "single" and not target.high_availability
    assert target.durability == Durability(2)
    assert target.url == "redis://:pw@h:6379/3?health_check_interval=5"
    plain = "redis://h:6379/0"
    assert parse_target(plain).url == plain and parse_target(plain).durability is None


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+cluster://h:7000/3", "only database 0"),
        ("redis+cluster://h:7000/?db=2", "does not take"),
        ("redis+cluster://h:70000/", "cannot read the address"),
        ("redis+sentinel://s1:26379/", "names no master"),
        ("redis+sentinel://s1:26379/m/x", "must be a number"),
        ("redis+sentinel://s1/m/0?sentinel_pasword=x", "sentinel_pasword"),
        ("redis+cluster://h/?failover_timeout=soon", "failover_timeout"),
        ("redis+cluster://h/?durability=all", "durability"),
    ],
)
def test_a_bad_url_is_a_config_error_saying_what_to_write(url: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        parse_target(url)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("replicas=1", Durability(1, 1.0)),
        (" replicas = 2 , timeout = 0.25 ", Durability(2, 0.25)),
        ("replicas=0", None),
        ("none", None),
        ("", None),
        (None, None),
    ],
)
def test_durability_text(text: str | None, expected: Durability | None) -> None:
    assert parse_durability(text) == expected


@pytest.mark.parametrize(
    "text", ["replicas", "replicas=-1", "replicas=1,timeout=0", "timeout=1", "replicas=one",
             "replicas=1,replicas=2", "replicas=1,wait=2"],
)  # fmt: skip
def test_bad_durability_text_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError, match="durability"):
        parse_durability(text)


def test_wait_timeout_is_never_zero_which_would_mean_forever() -> None:
    assert Durability(1, 0.0001).timeout_ms == 1
    assert Durability(1, 1.5).timeout_ms == 1500


def test_the_backend_table_maps_the_new_schemes_to_redis() -> None:
    for url in ("redis+cluster://h:7000/", "redis+sentinel://s:26379/m/0"):
        assert backend_for_url(url) is QueueBackend.REDIS


def test_settings_take_cluster_urls_durability_and_a_sentinel_task_store(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "redis:\n  url: redis+cluster://a:7000,b:7001/\n  durability: replicas=1,timeout=2\n"
        "rabbitmq:\n  task_store: redis+sentinel://:pw@s:26379/m/0\n"
    )
    settings = load_settings(config)
    assert settings.redis.durability == "replicas=1,timeout=2"
    assert settings.rabbitmq.task_store == "redis+sentinel://:pw@s:26379/m/0"
    assert "pw@" not in repr(settings)
    config.write_text("redis:\n  durability: replicas=lots\n")
    with pytest.raises(ConfigError, match=r"redis\.durability"):
        load_settings(config)
    config.write_text("rabbitmq:\n  task_store: amqp://x/\n")
    with pytest.raises(ConfigError, match=r"rabbitmq\.task_store"):
        load_settings(config)


def test_durability_is_refused_on_a_backend_that_has_no_replicas(tmp_path: Path) -> None:
    from conveyor import QueueManager

    with pytest.raises(ConfigError, match="only the Redis backend"):
        QueueManager.from_url(f"sqlite:///{tmp_path}/q.db", durability="replicas=1")
