"""Schemathesis against the real daemon: every endpoint fuzzed from daemon/openapi.py, under loopback_only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from daemon.openapi import DESCRIPTION
from daemon.testing import clean_environment

TOKEN = "fuzz-token"
# Every check but positive_data_acceptance: a string the schema allows is rarely a valid CSV, and a 400 naming its
# line and column is the right answer to it.
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,"
          "response_schema_conformance,negative_data_rejection,missing_required_header,unsupported_method,"
          "allow_header_conformance,use_after_free,ensure_resource_availability,ignored_auth")


@pytest.mark.slow
def test_every_endpoint_survives_fuzzing_and_answers_as_described(launch_daemon: Any, tmp_path: Path,
                                                                   database_url: str) -> None:
    """No 5xx and every answer as the description says, with fuzzed image and webhook URLs kept on this machine."""
    with launch_daemon(tmp_path, database_url, IMGPIPE_SERVER_TOKENS=TOKEN, IMGPIPE_NETWORK_LOOPBACK_ONLY="true",
                       IMGPIPE_DOWNLOAD_ATTEMPTS="1") as daemon:
        run = subprocess.run(
            [str(Path(sys.executable).with_name("st")), "run", f"{daemon.base_url}/openapi.json",
             "--header", f"Authorization: Bearer {TOKEN}", "--checks", CHECKS, "--seed", "19",
             "--max-examples", "30", "--no-color", "--request-timeout", "30",
             # A stream that never ends by itself has no answer to check (tests/web read it).
             "--exclude-path", "/events"],
            cwd=tmp_path, env=clean_environment(), capture_output=True, text=True, timeout=540, check=False)
        lines = daemon.log_lines()
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-5000:]
    # Every operation but the one serving the description, which schemathesis leaves out of its own accord.
    operations = sum(len(methods) for methods in DESCRIPTION["paths"].values()) - 1
    assert f"{operations - 1} selected / {operations} total" in run.stdout, run.stdout[:600]
    assert [line for line in lines if line["event"] == "http_unhandled_error"] == []
    refusals = {line["error"] for line in lines if line["event"] == "image_failed"}
    assert refusals, "the fuzzing never got an image as far as the download stage"
    assert all("[network] loopback_only = true" in error for error in refusals), refusals
