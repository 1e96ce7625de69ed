"""The test tiers hold by construction: a test that starts a server (or the PACS) without its marker fails before it
starts one, so `make test-fast` cannot grow slow unnoticed (tests/helpers.py, pyproject.toml's markers)."""

from __future__ import annotations

import pytest

from helpers import TESTS, subprocess_env

pytest_plugins = ["pytester"]


@pytest.mark.parametrize(("marker", "start", "what"), [
    ("server", "from helpers import monailabel_server\n    with monailabel_server(tmp_path, tmp_path, []):\n        pass",
     "a monailabel server"),
    ("pacs", "from helpers import require_marker\n    require_marker('pacs', 'Orthanc and the app on it')",
     "Orthanc and the app on it"),
])
def test_starting_a_server_without_its_marker_fails_the_test(pytester, monkeypatch, marker, start, what):
    for key, value in subprocess_env().items():
        monkeypatch.setenv(key, value)
    pytester.makeconftest((TESTS / "conftest.py").read_text())
    pytester.makepyfile(test_unmarked=f"def test_unmarked(tmp_path):\n    {start}\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([f"*test_unmarked starts {what}: mark it @pytest.mark.{marker}*"])
