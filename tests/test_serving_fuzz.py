"""Fuzzing the HTTP API with schemathesis: requests generated from the app's own OpenAPI schema (valid ones
and, with negative data generation, invalid ones) sent to the ASGI app in-process. None may get a 5xx,
and every refusal must be a JSON {"error": ...}. Bounded: 25 examples per operation."""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")
schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed")

from hypothesis import HealthCheck, settings  # noqa: E402

from serving_fixtures import make_runs  # noqa: E402
from vaswani.serving import ServeLimits, create_app, load_models  # noqa: E402

# schemathesis reads the schema when the module is collected, so the tiny runs are made here; the directory
# goes when the interpreter exits.
_RUNS = tempfile.TemporaryDirectory(prefix="vaswani-fuzz-")
_MODELS = load_models(list(make_runs(Path(_RUNS.name)).values()), device="cpu")
# One request at a time: a batch never has company, so waiting for it would only slow the fuzzer.
APP = create_app(_MODELS, ServeLimits(max_wait_ms=0, max_new_tokens=16))
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)
STATUSES: Counter = Counter()


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_generated_request_gets_a_server_error(case):
    response = case.call()
    STATUSES[(case.path, response.status_code)] += 1
    assert response.status_code < 500, (
        f"{case.method} {case.path}: {response.status_code} {response.text[:300]}"
    )
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error, str) and error and "\n" not in error


def test_the_fuzzer_got_answers_and_refusals_from_every_operation():
    """Runs after the fuzz test (file order): a fuzzer stopped at the door (every request refused) or never
    run would prove nothing."""
    if not STATUSES:
        pytest.skip("run together with test_no_generated_request_gets_a_server_error")
    for path in ("/v1/translate", "/v1/classify", "/v1/generate", "/v1/attention"):
        assert STATUSES[(path, 200)] > 0 and STATUSES[(path, 422)] > 0, sorted(STATUSES.items())
