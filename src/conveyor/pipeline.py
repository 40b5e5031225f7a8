"""Pipelines: named, ordered steps that a worker runs for a task.

A task's ``type`` picks the pipeline; each step receives a :class:`StepContext` with the
task's data, the results of the steps before it, a ``progress`` callback and the
``cancelled``/``shutting_down`` flags. Step results are checkpointed as each step finishes,
so a retry resumes at the step that failed instead of redoing finished work.

Steps must be module-level functions: the worker runs them in child processes and finds
them by their qualified name, as Celery and RQ do.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, overload

from pydantic import BaseModel, ValidationError

from .errors import ConfigError, ConveyorError, TaskTypeError, TaskValidationError
from .retries import Backoff, check_backoff, exception_types, is_permanent

StepFunction = Callable[["StepContext"], Any]
Hook = Callable[[Any], Any]  # called with the task's TaskRecord


class PipelineError(ConveyorError):
    """A task cannot run at all (unknown pipeline, invalid data): retrying will not help."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


ExceptionTypes = tuple[type[BaseException], ...]


@dataclass(frozen=True, slots=True)
class Step:
    """One step: its function and its own limits (None: the pipeline's or the task's).

    ``retry_backoff`` is a base delay or a list of delays (see ``conveyor.retries``).
    ``retry_on`` retries only these exception types (any other fails the task at once);
    ``dont_retry_on`` fails the task at once on these. ``PermanentError`` never retries.
    """

    name: str
    function: StepFunction
    timeout: float | None = None
    max_retries: int | None = None
    retry_backoff: Backoff | None = None
    retry_on: ExceptionTypes | None = None
    dont_retry_on: ExceptionTypes | None = None


class StepContext:
    """What a running step sees. Created by the worker's child process for each step."""

    def __init__(
        self,
        *,
        task_id: str,
        data: Any,
        results: Mapping[str, Any],
        attempt: int,
        queue: str,
        step: str,
        report_progress: Callable[[float, str | None], None] | None = None,
        is_cancelled: Callable[[], bool] | None = None,
        is_shutting_down: Callable[[], bool] | None = None,
    ) -> None:
        self.task_id = task_id
        self.data = data
        self.results = dict(results)
        self.attempt = attempt
        self.queue = queue
        self.step = step
        self._report = report_progress
        self._is_cancelled = is_cancelled
        self._is_shutting_down = is_shutting_down

    def progress(self, fraction: float, message: str | None = None) -> None:
        """Report how far the task is (0..1); visible in the task record within a moment."""
        if not 0 <= fraction <= 1:
            raise ValueError(f"progress: fraction must be between 0 and 1, got {fraction!r}")
        if self._report is not None:
            self._report(float(fraction), message)

    @property
    def cancelled(self) -> bool:
        """True once someone canceled this task: stop early; the step's result is ignored."""
        return self._is_cancelled() if self._is_cancelled else False

    @property
    def shutting_down(self) -> bool:
        """True once the worker was asked to stop: a long step may stop early and raise."""
        return self._is_shutting_down() if self._is_shutting_down else False


@dataclass
class Pipeline:
    """A named list of steps, with defaults that apply to every step.

    ``schema`` (a pydantic model) validates a task's data before the first step; data that
    fails it fails the task at once (it would fail every retry too).
    """

    name: str
    max_retries: int | None = None
    retry_backoff: Backoff | Sequence[float] | None = None
    timeout: float | None = None
    schema: type[BaseModel] | None = None
    steps: list[Step] = field(default_factory=list)
    #: May yield to a more urgent task between two steps (a worker with preemption on).
    preemptible: bool = False
    #: Defaults for every step that sets none (see :class:`Step`).
    retry_on: ExceptionTypes | None = None
    dont_retry_on: ExceptionTypes | None = None
    #: Hooks, called in the worker with the task's record after its outcome is recorded;
    #: at most once, bounded, never changing the outcome (see ``worker/hooks.py``).
    on_success: Hook | None = None
    on_failure: Hook | None = None
    on_retry: Hook | None = None
    on_cancel: Hook | None = None
    #: Cron schedules of this pipeline (``schedule()``), as config entries.
    schedules: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        where = f"pipeline {self.name!r}"
        with _as_config_error():
            self.retry_backoff = check_backoff(f"{where}: retry_backoff", self.retry_backoff)
            self.retry_on = exception_types(f"{where}: retry_on", self.retry_on)
            self.dont_retry_on = exception_types(f"{where}: dont_retry_on", self.dont_retry_on)

    @overload
    def step(self, function: StepFunction, /) -> StepFunction: ...

    @overload
    def step(
        self,
        *,
        name: str | None = None,
        timeout: float | None = None,
        max_retries: int | None = None,
        retry_backoff: float | Sequence[float] | None = None,
        retry_on: type[BaseException] | Sequence[type[BaseException]] | None = None,
        dont_retry_on: type[BaseException] | Sequence[type[BaseException]] | None = None,
    ) -> Callable[[StepFunction], StepFunction]: ...

    def step(
        self,
        function: StepFunction | None = None,
        *,
        name: str | None = None,
        timeout: float | None = None,
        max_retries: int | None = None,
        retry_backoff: float | Sequence[float] | None = None,
        retry_on: type[BaseException] | Sequence[type[BaseException]] | None = None,
        dont_retry_on: type[BaseException] | Sequence[type[BaseException]] | None = None,
    ) -> StepFunction | Callable[[StepFunction], StepFunction]:
        """Register a step (``@pipeline.step`` or ``@pipeline.step(timeout=600)``).

        Returns the function unchanged, so it stays importable by name.
        """

        def register(fn: StepFunction) -> StepFunction:
            step_name = name or fn.__name__
            if any(existing.name == step_name for existing in self.steps):
                raise ConfigError(f"pipeline {self.name!r}: two steps named {step_name!r}")
            where = f"pipeline {self.name!r} step {step_name!r}"
            with _as_config_error():
                backoff = check_backoff(f"{where}: retry_backoff", retry_backoff)
                retry_types = exception_types(f"{where}: retry_on", retry_on)
                dont_types = exception_types(f"{where}: dont_retry_on", dont_retry_on)
            self.steps.append(
                Step(step_name, fn, timeout, max_retries, backoff, retry_types, dont_types)
            )  # fmt: skip
            return fn

        return register(function) if function is not None else register

    def validate_data(self, data: Any) -> None:
        """Raise PipelineError('invalid_data') when the data does not fit ``schema``."""
        if self.schema is None:
            return
        try:
            self.schema.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "data"
            raise PipelineError(
                "invalid_data",
                f"data does not fit pipeline {self.name!r}: {where}: {first['msg']} "
                f"({exc.error_count()} error(s))",
            ) from None

    def hard_limit(self) -> float | None:
        """The longest a run may take: the pipeline's own limit, else the sum of its steps'
        (None when some step may run forever). Checked against RabbitMQ's consumer_timeout.
        """
        if self.timeout is not None:
            return self.timeout
        limits = [step.timeout for step in self.steps]
        return None if None in limits else sum(limit for limit in limits if limit is not None)

    def is_permanent(self, step: Step, exc: BaseException) -> bool:
        """Does ``exc``, raised by ``step``, end the task at once (no retry)?"""
        retry_on = step.retry_on if step.retry_on is not None else self.retry_on
        dont = step.dont_retry_on if step.dont_retry_on is not None else self.dont_retry_on
        return is_permanent(exc, retry_on, dont)

    def schedule(
        self,
        cron: str,
        *,
        data: Any = None,
        tz: str = "UTC",
        priority: int = 5,
        name: str | None = None,
        queue: str | None = None,
        missed: str = "skip",
        grace: float = 60.0,
        **options: Any,
    ) -> None:
        """Run this pipeline on a cron schedule (``"0 9 * * MON-FRI"``; a leading 6th field
        is seconds): every worker that loads the pipeline runs the scheduler, and each tick
        is pushed once however many do. ``queue`` None: the worker's first queue. Checked
        now (a bad expression or time zone raises ConfigError here)."""
        from .schedules import schedule_from

        entry = {"name": name or f"{self.name}:{cron}", "cron": cron, "queue": queue,
                 "data": data, "tz": tz, "priority": priority, "type": self.name,
                 "missed": missed, "grace": grace, "options": options}  # fmt: skip
        schedule_from({**entry, "queue": queue or "default"})
        self.schedules.append(entry)

    def step_named(self, name: str) -> Step:
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(name)


class PipelineService:
    """The pipelines one worker can run, found by a task's ``type``.

    With exactly one pipeline, tasks need no ``type``; with several, an unknown or missing
    type fails the task at once with reason ``unknown_pipeline``.
    """

    def __init__(self, pipelines: Iterable[Pipeline]) -> None:
        self.pipelines: dict[str, Pipeline] = {}
        for pipeline in pipelines:
            if pipeline.name in self.pipelines:
                raise ConfigError(f"pipelines: two pipelines named {pipeline.name!r}")
            if not pipeline.steps:
                raise ConfigError(f"pipeline {pipeline.name!r} has no steps")
            self.pipelines[pipeline.name] = pipeline

    @classmethod
    def from_import_paths(cls, paths: Iterable[str]) -> PipelineService:
        """Load pipelines named like ``examples.docs:pipeline`` or ``package.module``.

        A module path collects every ``Pipeline`` defined at its top level (Celery's
        ``include``); ``module:attribute`` picks one Pipeline or a PipelineService.
        """
        found: list[Pipeline] = []
        for path in paths:
            found.extend(_load(path))
        if not found:
            raise ConfigError(
                "worker.pipelines: no pipeline found; list import paths such as "
                "'examples.doc_pipeline:pipeline' in the config"
            )
        return cls(found)

    def resolve(self, type_name: str | None) -> Pipeline:
        """The pipeline for a task's type; raises PipelineError('unknown_pipeline')."""
        if type_name is None and len(self.pipelines) == 1:
            return next(iter(self.pipelines.values()))
        if type_name is not None and type_name in self.pipelines:
            return self.pipelines[type_name]
        known = ", ".join(sorted(self.pipelines)) or "none"
        raise PipelineError(
            "unknown_pipeline",
            f"no pipeline named {type_name!r} in this worker (it runs: {known}); "
            "push with type= one of these, or add the pipeline to worker.pipelines",
        )


@contextmanager
def _as_config_error() -> Iterator[None]:
    """A pipeline's bad setting is a configuration error, named as such."""
    try:
        yield
    except (TaskValidationError, TaskTypeError) as exc:
        raise ConfigError(str(exc)) from None


def _load(path: str) -> list[Pipeline]:
    module_name, _, attribute = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"worker.pipelines: cannot import {module_name!r}: {exc}") from None
    if not attribute:
        return [value for value in vars(module).values() if isinstance(value, Pipeline)]
    value = getattr(module, attribute, None)
    if isinstance(value, Pipeline):
        return [value]
    if isinstance(value, PipelineService):
        return list(value.pipelines.values())
    raise ConfigError(f"worker.pipelines: {path!r} is not a Pipeline or PipelineService")
