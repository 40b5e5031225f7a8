"""Unit tests of pure logic: retry policy, pipelines, URL masking, input checks."""

from __future__ import annotations

import random

import pytest
from pydantic import BaseModel

from conveyor import ConfigError, Message, Pipeline, PipelineError, PipelineService
from conveyor.urls import mask_url
from conveyor.worker import WorkerOptions
from conveyor.worker.policy import RetryDefaults, backoff_seconds, max_retries_for, should_retry


def message(**fields: object) -> Message:
    base: dict[str, object] = {"task_id": "t", "data": {}, "priority": 5, "queue": "q"}
    return Message.model_validate({**base, **fields})


def two_step_pipeline(**options: object) -> Pipeline:
    pipeline = Pipeline("p", **options)  # type: ignore[arg-type]

    @pipeline.step(max_retries=7, retry_backoff=10.0)
    def fragile(ctx: object) -> None: ...

    @pipeline.step
    def plain(ctx: object) -> None: ...

    return pipeline


def test_max_retries_precedence_task_then_step_then_pipeline_then_default() -> None:
    defaults = RetryDefaults(max_retries=3)
    pipeline = two_step_pipeline(max_retries=5)
    assert max_retries_for(message(max_retries=1), pipeline, "fragile", defaults) == 1
    assert max_retries_for(message(), pipeline, "fragile", defaults) == 7
    assert max_retries_for(message(), pipeline, "plain", defaults) == 5
    assert max_retries_for(message(), None, None, defaults) == 3


def test_retry_stops_when_attempts_exceed_retries_and_never_for_permanent_reasons() -> None:
    defaults = RetryDefaults(max_retries=2)
    assert should_retry(message(attempts=2), None, None, "error", defaults)
    assert not should_retry(message(attempts=3), None, None, "error", defaults)
    assert not should_retry(message(attempts=1), None, None, "invalid_data", defaults)
    assert not should_retry(message(attempts=1), None, None, "unknown_pipeline", defaults)


def test_backoff_doubles_per_attempt_is_capped_and_jittered() -> None:
    defaults = RetryDefaults(retry_backoff=1.0, max_backoff=5.0, jitter=0.0)
    delays = [backoff_seconds(message(attempts=n), None, None, defaults) for n in (1, 2, 3, 4)]
    assert delays == [1.0, 2.0, 4.0, 5.0]
    jittered = RetryDefaults(retry_backoff=1.0, jitter=0.5)
    rng = random.Random(7)
    samples = {backoff_seconds(message(attempts=1), None, None, jittered, rng) for _ in range(50)}
    assert len(samples) > 10 and all(0.5 <= s <= 1.5 for s in samples)


def test_step_backoff_overrides_pipeline_backoff() -> None:
    defaults = RetryDefaults(jitter=0.0)
    pipeline = two_step_pipeline(retry_backoff=3.0)
    assert backoff_seconds(message(attempts=1), pipeline, "fragile", defaults) == 10.0
    assert backoff_seconds(message(attempts=1), pipeline, "plain", defaults) == 3.0


def test_service_resolves_by_type_and_names_what_it_runs_when_unknown() -> None:
    only = PipelineService([two_step_pipeline()])
    assert only.resolve(None).name == "p"
    other = Pipeline("other")
    other.step(lambda ctx: None, name="s")
    both = PipelineService([two_step_pipeline(), other])
    with pytest.raises(PipelineError, match="it runs: other, p") as info:
        both.resolve(None)
    assert info.value.reason == "unknown_pipeline"
    assert both.resolve("other") is other


def test_pipeline_configuration_mistakes_are_config_errors() -> None:
    pipeline = Pipeline("dup")
    pipeline.step(lambda ctx: None, name="a")
    with pytest.raises(ConfigError, match="two steps named 'a'"):
        pipeline.step(lambda ctx: None, name="a")
    with pytest.raises(ConfigError, match="has no steps"):
        PipelineService([Pipeline("empty")])
    with pytest.raises(ConfigError, match="cannot import"):
        PipelineService.from_import_paths(["no_such_module_here"])


def test_schema_failure_names_the_field() -> None:
    class Data(BaseModel):
        path: str
        pages: int

    pipeline = Pipeline("docs", schema=Data)
    pipeline.validate_data({"path": "a.txt", "pages": 3})
    with pytest.raises(PipelineError, match="pages") as info:
        pipeline.validate_data({"path": "a.txt", "pages": "many"})
    assert info.value.reason == "invalid_data"


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://:secret@host:6379/0", "redis://:***@host:6379/0"),
        ("amqp://guest:guest@localhost:5672/", "amqp://guest:***@localhost:5672/"),
        ("redis://localhost:6379/0", "redis://localhost:6379/0"),
        ("rediss://u:p%40ss@[::1]:6380/1", "rediss://u:***@[::1]:6380/1"),
        ("sqlite:///conveyor.db", "sqlite:///conveyor.db"),
    ],
)
def test_mask_url_hides_passwords_only(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_message_supports_the_seeds_dict_access() -> None:
    msg = message(data={"audio_files": ["a.wav"]}, priority=9)
    assert msg["task_id"] == "t" and msg["priority"] == 9
    assert msg["data"] == {"audio_files": ["a.wav"]}
    assert msg.get("missing", "default") == "default"
    with pytest.raises(KeyError):
        msg["missing"]


@pytest.mark.parametrize("visibility", [0.3, 1.0, 2.0, 15.0, 60.0, 3600.0])
@pytest.mark.parametrize("heartbeat", [0.2, 1.0, 5.0, 30.0])
def test_a_held_lease_is_renewed_well_inside_its_visibility_timeout(
    visibility: float, heartbeat: float
) -> None:
    """The loop looks every renew_check_period and renews after renew_interval: together at
    most half the visibility timeout, so one slow round trip never loses a lease."""
    options = WorkerOptions(heartbeat_interval=heartbeat)
    assert options.worst_renewal_gap(visibility) <= visibility / 2
