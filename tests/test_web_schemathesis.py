"""A property run over the OpenAPI document: no generated request makes the server fail.

Schemathesis reads /api/v1/openapi.json from a real `kith serve` and, for
every operation, generates requests (valid and deliberately invalid ones:
wrong types, out-of-range numbers, hostile strings) with Hypothesis. Each
is sent with an API token — a plain user's, then a global admin's, so that
every operation runs past its login check — and no answer may be a 5xx.
Held mail exists for the ids to find; what the run changes is its own
business, as long as the server never answers 500.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from gateway import Gateway, running_gateway
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from web_client import PASSWORD, WEB_SECTIONS, hold

from kithmail.db import Database
from kithmail.web.auth import create_api_token

ANN, BOB, GIL = "ann@example.test", "bob@example.test", "gil@example.test"
EXAMPLES = 25


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with running_gateway(
        tmp_path_factory.mktemp("web-schemathesis") / "gw", users=(ANN, BOB), sections=WEB_SECTIONS
    ) as g:
        g.kith("user", "add", GIL, "--role", "global_admin", "--password-stdin", input=PASSWORD)
        hold(g, [ANN, BOB], subject="for the property run")
        yield g


def _token(gw: Gateway, address: str) -> str:
    with Database.open(gw.data_dir / "kithmail.db") as db:
        return create_api_token(db, db.user(address).id, "schemathesis", ttl_s=None)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("who", [ANN, GIL])
def test_no_generated_request_gets_a_server_error(gw: Gateway, who: str) -> None:
    base = f"http://127.0.0.1:{gw.web_port}"
    schema = schemathesis.openapi.from_url(f"{base}/api/v1/openapi.json")
    headers = {"Authorization": f"Bearer {_token(gw, who)}"}
    failures: list[str] = []
    statuses: list[int] = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(), data=st.data())
        def run(case: schemathesis.Case, data: st.DataObject) -> None:
            response = case.call(base_url=base, headers=headers, timeout=30)
            statuses.append(response.status_code)
            if response.status_code >= 500:
                failures.append(
                    f"{case.method} {case.formatted_path} {case.query} {case.body!r}"
                    f" -> {response.status_code} {response.text[:200]}"
                )

        run()
    assert operations >= 12
    assert failures == []
    # The run got past the login: some requests were answered in full.
    assert len(statuses) >= operations * 5
    assert sum(200 <= s < 300 for s in statuses) >= operations // 2
