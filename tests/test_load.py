"""The load test (`scripts/load_test.py`) in a small configuration: two clients infer at once while a training
runs and publishes; every answer arrives and equals a single-user run of the model version it names."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import REPO


@pytest.mark.server
@pytest.mark.slow
def test_clients_inferring_while_training_publishes_get_the_single_user_answers(tmp_path, samples):
    out = tmp_path / "load.json"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "load_test.py"), "--clients", "2", "--requests",
                           "2", "--quick-train", "--output", str(out)], capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["answers"] == 4 and figures["lost"] == 0 and figures["by_status"] == {"200": 4}
    assert figures["identical_to_single_user"] == 4 and not figures["mismatches"]
    assert figures["training"]["status"] == "DONE" and len(figures["training"]["published"]) == 1
    assert figures["info_requests"] > 0 and figures["server_peak_rss_mb"] > 0
