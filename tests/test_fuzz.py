"""A property-based fuzz of the REST API from the server's own OpenAPI schema (schemathesis), against a real
server on loopback: no operation answers 500 or hangs, whatever the input, and the server is alive after it.
Bounded: a few examples per operation, a timeout per request. Operations that start background jobs (training,
batch inference, scoring) are left out: their requests are checked in test_hostile and test_app_server."""

from __future__ import annotations

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings

from conftest import make_test_checkpoint, monailabel_server, studies_folder

BACKGROUND_JOBS = r"^/(train|batch|scoring)/"


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, samples):
    tmp = tmp_path_factory.mktemp("fuzz")
    studies = studies_folder(tmp, samples, ["ts_ct_small.nii.gz"])
    checkpoint = make_test_checkpoint(tmp / "models" / "delightsam.safetensors")
    with monailabel_server(tmp, studies, ["--conf", "checkpoint", str(checkpoint), "--conf", "model_dir",
                                          str(tmp / "model"), "--conf", "max_batch_size", "8"]) as url:
        yield url


def test_no_input_makes_the_server_fail_or_hang(fuzz_server):
    schema = (schemathesis.openapi.from_url(f"{fuzz_server}/openapi.json")
              .exclude(path_regex=BACKGROUND_JOBS, method=["POST", "DELETE"]))
    failures, tried = [], 0
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=4, deadline=None, derandomize=True, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        def fuzz(case):
            response = case.call(base_url=fuzz_server, timeout=120)  # a hang fails here
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path} {case.query} -> {response.status_code} "
                                f"{response.text[:200]}")

        fuzz()
        tried += 1
    assert tried > 20  # the operations of monailabel's API were found
    assert not failures, "\n".join(failures)


def test_the_server_is_alive_after_the_fuzz(fuzz_server):
    assert requests.get(f"{fuzz_server}/info/", timeout=30).status_code == 200
