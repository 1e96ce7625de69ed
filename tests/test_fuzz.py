"""A property-based fuzz of the REST API from the server's own OpenAPI schema (schemathesis), against a real
server on loopback: no operation answers 500 or hangs, whatever the input, and the server is alive after it.
The schema declares each request's options as the app types them (``options.document``: an inference's
`params` part, the bodies of training, batch inference, scoring and Next Sample), so the fuzz sends typed
options and near misses, not only opaque strings. Bounded: a few examples per operation, a timeout per
request; the background jobs it starts are stopped at the end."""

from __future__ import annotations

from collections import Counter

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from helpers import make_test_checkpoint, monailabel_server, studies_folder

pytestmark = pytest.mark.server

JOBS = ("/train/", "/batch/infer", "/scoring/")


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, samples):
    tmp = tmp_path_factory.mktemp("fuzz")
    studies = studies_folder(tmp, samples, ["ts_ct_small.nii.gz"])
    checkpoint = make_test_checkpoint(tmp / "models" / "delightsam.safetensors")
    with monailabel_server(tmp, studies, ["--conf", "checkpoint", str(checkpoint), "--conf", "model_dir",
                                          str(tmp / "model"), "--conf", "max_batch_size", "8"]) as url:
        yield url


def test_the_schema_types_each_requests_options(fuzz_server):
    document = requests.get(f"{fuzz_server}/openapi.json", timeout=30).json()
    schemas = document["components"]["schemas"]
    assert {"refine", "prompts", "batch_size"} <= set(schemas["InferOptions"]["properties"])
    assert "image" not in schemas["InferOptions"]["properties"]  # the route's own field, not an option
    assert schemas["InferOptions"]["additionalProperties"] is False
    body = document["paths"]["/infer/{model}"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert body["encoding"]["params"]["contentType"] == "application/json"
    train = document["paths"]["/train/{model}"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"$ref": "#/components/schemas/TrainOptions"} in train["anyOf"]


def _fuzz(url: str, operation, examples: int, failures: list, **fixed) -> Counter:
    """``examples`` cases of valid and of invalid input (schemathesis' positive and negative modes) for one
    operation, ``fixed``: parts of the request held fixed (a query naming a datastore image). Returns how many
    answers had each status."""
    answers = Counter()
    cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE, **fixed),
                      operation.as_strategy(GenerationMode.NEGATIVE, **fixed))

    @given(case=cases)
    @settings(max_examples=examples, deadline=None, derandomize=True, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    def fuzz(case):
        response = case.call(base_url=url, timeout=180)  # a hang fails here
        answers[response.status_code] += 1
        if response.status_code >= 500:
            failures.append(f"{case.method} {case.formatted_path} {case.query} {str(case.body)[:300]} -> "
                            f"{response.status_code} {response.text[:300]}")

    fuzz()
    return answers


def test_no_input_makes_the_server_fail_or_hang(fuzz_server):
    schema = schemathesis.openapi.from_url(f"{fuzz_server}/openapi.json")
    failures, tried, jobs = [], 0, 0
    for result in schema.get_all_operations():
        operation = result.ok()
        background = operation.method.upper() == "POST" and operation.path.startswith(JOBS)
        jobs += background
        _fuzz(fuzz_server, operation, 4 if background else 6, failures)
        tried += 1
    assert tried > 20 and jobs >= 3  # monailabel's API was found, the background jobs' routes among it
    assert not failures, "\n".join(failures)


def test_typed_inference_options_on_a_datastore_image(fuzz_server):
    """The inference route's `params` as the schema types them, and near misses, for an image that exists: the
    options reach the model (not only the route's checks)."""
    schema = schemathesis.openapi.from_url(f"{fuzz_server}/openapi.json")
    operation = schema["/infer/{model}"]["POST"]
    failures = []
    answers = _fuzz(fuzz_server, operation, 10, failures, query={"image": "ts_ct_small", "output": "json"})
    assert not failures, "\n".join(failures)
    assert answers[200] and answers[422], answers  # options that segmented the image, and options refused


def test_the_server_is_alive_after_the_fuzz_and_its_jobs_stop(fuzz_server):
    for job in ("train/", "batch/infer", "scoring/"):  # the jobs a valid fuzzed request started
        assert requests.delete(f"{fuzz_server}/{job}", timeout=60).status_code < 500
    assert requests.get(f"{fuzz_server}/info/", timeout=30).status_code == 200
