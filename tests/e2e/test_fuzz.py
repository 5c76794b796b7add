"""Schemathesis over every operation of /openapi.json on the session server: a bounded number of generated
requests per operation (valid and invalid), each under a timeout. None may get a 5xx or hang.

Generated model names are random strings, so generation requests end in 404 before the ranks; the 422 paths
of the LMI and OpenAI bodies are what this exercises (test_bad_inputs holds the named corpus)."""
import json

import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.e2e.test_faults import RESULTS

CASES = {"tried": 0, "server_errors": 0}


def test_no_operation_answers_5xx_or_hangs(server):
    schema = schemathesis.openapi.from_url(server.url("/openapi.json"))
    failures = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def call(case):
            response = case.call(timeout=30)  # a hang fails as a timeout
            CASES["tried"] += 1
            if response.status_code >= 500:
                CASES["server_errors"] += 1
                failures.append(f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:300]}")
            elif response.status_code >= 400:
                json.loads(response.text)  # every error is JSON

        call()
    _save()
    assert not failures, failures[:5]
    assert CASES["tried"] >= 100


def _save() -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    RESULTS.write_text(json.dumps({**old, "fuzz_cases": CASES["tried"], "fuzz_server_errors": CASES["server_errors"]},
                                  indent=2))
