"""Property-based runs of the API against its own OpenAPI schema, with every check.

Schemathesis generates valid and invalid requests from ``/api/v1/openapi.json`` and sends
them to the app in-process (on a SQLite file of the test's own), first operation by
operation, then as stateful workflows that follow the schema's links (push, then get,
cancel, retry the pushed task). Both run without a token and with one. Every check
schemathesis has is on: never a 5xx; every status code, header and body is the one the
schema documents; invalid input is rejected and valid input accepted; a 405 names the
allowed methods; with a token, a request without it is refused.

Two checks are given this API's documented semantics instead of their defaults:

* ``positive_data_acceptance`` also accepts 422 for a push. The queue's rules go beyond
  what JSON Schema can say: printable ids (``str.isprintable``), the payload's size and
  depth (``queue.max_payload_bytes``, ``queue.max_json_depth``); the priority's maximum is
  in the schema.
* ``use_after_free`` is off: ``DELETE /tasks/{id}`` cancels a task and keeps its record
  (to read it, and to retry it), so reading it afterwards is the point, not a bug.

Bounded (examples per operation, scenarios, steps; no deadline) so the whole module runs in
about 40 s here (with the hypothesis suites of test_damaged_records.py and
test_json_policy.py, under a minute; the budget is 3 minutes in CI) and never fails because
a machine is slow. Each stateful scenario starts from an empty backend, so hypothesis can
replay it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

from api_support import require_modules

require_modules("fastapi", "schemathesis", "hypothesis")

import schemathesis  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import CHECKS, load_all_checks  # noqa: E402
from schemathesis.config import SchemathesisConfig  # noqa: E402

from conveyor import QueueManager  # noqa: E402
from conveyor.api import create_app  # noqa: E402
from conveyor.settings import Settings  # noqa: E402

MAX_EXAMPLES = 100
SCENARIOS = 100
STEPS = 15
TOKEN = "schema-run-token"
NOT_CHECKED = {"use_after_free"}  # DELETE cancels and keeps the record (see above)
CONFIG = """
[checks.use_after_free]
enabled = false

[[operations]]
include-operation-id = "create_task"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "409", "422"]

# An event stream never ends (test_events.py covers it).
[[operations]]
include-operation-id = "events"
enabled = false
"""
COMMON = {
    "deadline": None,
    "database": None,  # no .hypothesis/ folder in the work tree
    "suppress_health_check": list(HealthCheck),
}
FUZZ = settings(max_examples=MAX_EXAMPLES, **COMMON)
STATEFUL = settings(max_examples=SCENARIOS, stateful_step_count=STEPS, **COMMON)

load_all_checks()
ALL_CHECKS = [check for check in CHECKS.get_all() if check.__name__ not in NOT_CHECKED]

# The schemas are loaded at import (schemathesis parametrizes at collection); the apps open
# their SQLite files, in a folder of this module's own, only when the first request comes.
# Schemathesis calls the app as "testserver": without a token, that name must be allowed.
_folder = tempfile.TemporaryDirectory(prefix="conveyor-fuzz-")
OPEN_DB = f"sqlite:///{_folder.name}/open.db"
TOKEN_DB = f"sqlite:///{_folder.name}/token.db"
_open_app = create_app(Settings(url=OPEN_DB, api={"token": None, "allowed_hosts": ["testserver"]}))
_token_app = create_app(Settings(url=TOKEN_DB, api={"token": TOKEN}))
AUTH = {"Authorization": f"Bearer {TOKEN}"}
open_api = schemathesis.openapi.from_asgi(
    "/api/v1/openapi.json", _open_app, config=SchemathesisConfig.from_str(CONFIG)
)
token_api = schemathesis.openapi.from_asgi(
    "/api/v1/openapi.json",
    _token_app,
    config=SchemathesisConfig.from_str(CONFIG),
    headers=AUTH,
)


@token_api.auth()
class BearerToken:
    """Gives generated requests the token. Schemathesis still sends some without it (its
    auth checks), and those must be refused."""

    def get(self, case: Any, context: Any) -> str:
        return TOKEN

    def set(self, case: Any, token: str, context: Any) -> None:
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module", autouse=True)
def _remove_the_databases() -> Iterator[None]:
    yield
    _folder.cleanup()


@open_api.parametrize()
@FUZZ
def test_no_generated_request_gets_a_server_error(case: Any) -> None:
    case.call_and_validate(checks=ALL_CHECKS)


@token_api.parametrize()
@FUZZ
def test_with_a_token_generated_requests_are_served_and_others_refused(case: Any) -> None:
    case.call_and_validate(checks=ALL_CHECKS)


def _with_all_checks(machine: type[Any], url: str) -> type[Any]:
    """The schema's state machine, validating each answer with every check. Each scenario
    starts from an empty backend: hypothesis replays scenarios to shrink a failure, and a
    replay must meet the same state (a task left by another scenario turns a 201 into 409).
    """

    class Workflow(machine):  # type: ignore[misc, valid-type]
        def setup(self) -> None:
            with QueueManager.from_url(url) as default:
                names = default.known_queues()
            for name in names:
                with QueueManager.from_url(url, queue_name=name) as queue:
                    queue.clear()

        def validate_response(
            self, response: Any, case: Any, additional_checks: Any = None, **kwargs: Any
        ) -> None:
            case.validate_response(response, checks=ALL_CHECKS, transport_kwargs=kwargs)

    return Workflow


OpenWorkflow = _with_all_checks(open_api.as_state_machine(), OPEN_DB)
TokenWorkflow = _with_all_checks(token_api.as_state_machine(), TOKEN_DB)


def test_stateful_workflows_without_a_token() -> None:
    OpenWorkflow.run(settings=STATEFUL)


def test_stateful_workflows_with_a_token() -> None:
    TokenWorkflow.run(settings=STATEFUL)
