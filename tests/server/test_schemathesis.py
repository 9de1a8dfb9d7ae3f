"""A schemathesis run over the live server's own OpenAPI document: schema-valid and schema-invalid
requests to every operation, the served model's name filled in, and no answer may be a 5xx or
differ from what the document promises (status, media type, body schema).

The budget is fixed (``EXAMPLES`` per operation and generation mode, no shrinking past
``deadline``), so the run takes about a minute; generation is bounded by ``max_tokens`` and
``--max-model-len``.
"""

from __future__ import annotations

import time

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance,
                                               response_schema_conformance,
                                               status_code_conformance)

from tests.conftest import serve

MODEL = "layerskip-stdlib"
EXAMPLES = {"POST /v1/completions": 60, "POST /v1/chat/completions": 40}
DEFAULT_EXAMPLES = 20
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]
MAX_TOKENS = 4


@pytest.fixture(scope="module")
def schema(tmp_path_factory):
    log = tmp_path_factory.mktemp("schemathesis") / "layerskip-serve.log"
    with serve(log, "--max-model-len", "128", "--max-num-seqs", "4") as url:
        loaded = schemathesis.openapi.from_url(url + "/openapi.json")
        loaded.config.base_url = url
        yield loaded, url


def _fill(case) -> None:
    """The served model's name where a body names one (else nearly every case is a 404), and few
    generated tokens, so the budget goes on variety rather than on decoding."""
    body = case.body
    if not isinstance(body, dict):
        return
    if "model" in body or case.operation.path.startswith("/v1/"):
        body["model"] = MODEL
    for field in ("max_tokens", "max_completion_tokens"):
        value = body.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_TOKENS:
            body[field] = MAX_TOKENS
    if case.operation.path == "/v1/completions":
        body.setdefault("max_tokens", MAX_TOKENS)
    elif case.operation.path == "/v1/chat/completions":
        body.setdefault("max_completion_tokens", MAX_TOKENS)


def _operations(loaded):
    return [result.ok() for result in loaded.get_all_operations()]


def test_the_openapi_document_lists_every_route(schema):
    loaded, _ = schema
    labels = {op.label for op in _operations(loaded)}
    assert labels == {"GET /health", "GET /metrics", "GET /version", "GET /v1/models",
                      "POST /v1/completions", "POST /v1/chat/completions", "POST /tokenize",
                      "POST /detokenize"}


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors_and_answers_as_documented(schema, mode):
    loaded, url = schema
    statuses: dict[str, list[int]] = {}
    for operation in _operations(loaded):
        if mode is GenerationMode.NEGATIVE and operation.method.upper() == "GET":
            continue  # no parameters, nothing to get wrong
        budget = EXAMPLES.get(operation.label, DEFAULT_EXAMPLES)
        seen = statuses.setdefault(operation.label, [])

        @settings(max_examples=budget, deadline=None, database=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case):
            _fill(case)
            seen.append(case.call_and_validate(base_url=url, checks=CHECKS,
                                               timeout=60).status_code)

        started = time.monotonic()
        run()
        print(f"{mode} {operation.label}: {len(seen)} calls in {time.monotonic() - started:.1f} s, "
              f"statuses {sorted(set(seen))}")
    if mode is GenerationMode.POSITIVE:  # the model name was filled in: real work was done
        for label in ("POST /v1/completions", "POST /v1/chat/completions", "POST /tokenize"):
            assert 200 in statuses[label], (label, statuses[label])
    else:
        assert all(400 in statuses[label] for label in statuses), statuses
