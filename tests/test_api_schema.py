"""Property-based run of every API operation against the app's own OpenAPI schema.

Schemathesis generates valid and invalid requests from ``/api/v1/openapi.json`` and sends
them to the app in-process (on a SQLite file of the test's own). The contract: never a 5xx;
every status code and body is the one the schema documents; invalid input is rejected;
with a token, a request without it is refused. Bounded (``MAX_EXAMPLES`` per operation, no
deadline) so it runs in seconds and never fails because a machine is slow.

Not checked: "schema-valid input is accepted". The queue's own rules go further than the
schema (priority up to the configured ``max_priority``, printable ids, the payload size
limit) and answer 422, which is right.
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
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi import checks  # noqa: E402

from conveyor.api import create_app  # noqa: E402
from conveyor.settings import Settings  # noqa: E402

MAX_EXAMPLES = 40
TOKEN = "schema-run-token"
CHECKS = [
    not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
    checks.negative_data_rejection,
    checks.allow_header_conformance,
    checks.unsupported_method,
    checks.missing_required_header,
    checks.ignored_auth,
]
FUZZ = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    database=None,  # no .hypothesis/ folder in the work tree
    suppress_health_check=list(HealthCheck),
)


# The schemas are loaded at import (schemathesis parametrizes at collection); the apps open
# their SQLite files, in a folder of this module's own, only when the first request comes.
_folder = tempfile.TemporaryDirectory(prefix="conveyor-fuzz-")
_open_app = create_app(Settings(url=f"sqlite:///{_folder.name}/open.db", api={"token": None}))
_token_app = create_app(Settings(url=f"sqlite:///{_folder.name}/token.db", api={"token": TOKEN}))
AUTH = {"Authorization": f"Bearer {TOKEN}"}
open_api = schemathesis.openapi.from_asgi("/api/v1/openapi.json", _open_app)
token_api = schemathesis.openapi.from_asgi("/api/v1/openapi.json", _token_app, headers=AUTH)


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
    case.call_and_validate(checks=CHECKS)


@token_api.parametrize()
@FUZZ
def test_with_a_token_generated_requests_are_served_and_others_refused(case: Any) -> None:
    case.call_and_validate(checks=CHECKS)
