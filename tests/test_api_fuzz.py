"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis on
hypothesis): valid and deliberately invalid requests to every operation; none may get a
5xx, and every error is an OpenAI error object. Bounded: a model with 16 positions and a
few dozen examples per operation, so the whole file takes seconds."""

from __future__ import annotations

import pytest
from serve_fixtures import make_checkpoint, start

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model_dir = make_checkpoint(tmp_path_factory.mktemp("fuzz") / "tiny", max_positions=16)
    with start(model_dir, max_batch=16, max_body_bytes=256 * 1024) as s:
        yield s


@pytest.fixture(scope="module")
def api_schema(served):
    # Random (fuzzing) phase only, positive and negative: the deterministic coverage phase
    # alone makes hundreds of requests per operation, too many for a seconds-long test.
    config = schemathesis.config.SchemathesisConfig.from_dict({"phases": {
        "examples": {"enabled": False}, "coverage": {"enabled": False},
        "fuzzing": {"enabled": True}}})
    return schemathesis.openapi.from_url(served.url + "/openapi.json", config=config)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_no_request_gets_a_5xx(case, served):
    response = case.call(base_url=served.url, timeout=30)
    assert response.status_code < 500, (repr(case.body), response.text[:300])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"]
        assert "type" in error and "param" in error and "code" in error
    # The engine is still healthy after every case.
    assert served.client.health().ok


# Any JSON at all (deep nesting, huge integers, NaN/inf as Python's json writes them,
# unicode), and arbitrary bytes: still never a 5xx.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=4),
    max_leaves=20)
FIELDS = ["prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "n", "stop",
          "seed", "stream", "echo", "logprobs", "stream_options", "top_logprobs"]
near_valid = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(body=st.one_of(json_values, near_valid), raw=st.binary(max_size=64))
def test_arbitrary_json_and_bytes_never_get_a_5xx(served, path, body, raw):
    import json


    data = json.dumps(body).encode()  # NaN/Infinity are written as bare words
    for content in (data, raw):
        r = served.http.post(path, content=content, timeout=30,
                       headers={"content-type": "application/json"})
        assert r.status_code < 500, (content[:200], r.text[:300])
        if r.status_code >= 400:
            assert r.json()["error"]["message"]
