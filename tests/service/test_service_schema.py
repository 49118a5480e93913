"""Property-based API check with schemathesis: whatever the OpenAPI document lets a client send
(bodies generated from the job spec's JSON schema, random ids and query values), the server
never answers with a 5xx. Skipped when schemathesis is not installed."""
import pytest
import schemathesis
from factories import perturbed, save, tiny_llama  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from service.config import Settings  # noqa: E402
from service.serve import BackgroundServer  # noqa: E402

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    save(tiny_llama(), root / "base")
    perturbed(root / "base", root / "math", seed=1)
    art = tmp_path_factory.mktemp("artifacts")
    settings = Settings(artifacts=art, model_roots=(root,), max_benchmark_bytes=64 << 10,
                        rate_limit_per_minute=100_000)
    with BackgroundServer(settings) as url:
        yield url


def operations(url: str):
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    for result in schema.get_all_operations():
        op = result.ok()
        if not op.path.endswith("/events"):  # a stream that lasts as long as its job
            yield op


def test_no_server_errors(api):
    ops = list(operations(api))
    assert {op.path for op in ops} >= {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/benchmarks", "/metrics"}
    for op in ops:
        @given(case=op.as_strategy())
        @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def check(case):
            case.call_and_validate(base_url=api, checks=[not_a_server_error], timeout=30)

        check()
