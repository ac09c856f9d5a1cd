"""The console script's surface: --help, --version / version, look-alike env var warnings."""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import aws_outbound_jwt_proxy
from aws_outbound_jwt_proxy import cli
from aws_outbound_jwt_proxy.config import envcheck
from aws_outbound_jwt_proxy.config import settings as config
from tests.fixtures.process import base_env

SCRIPT = str(Path(sys.executable).with_name("aws-outbound-jwt-proxy"))
VERSION = importlib.metadata.version("aws-outbound-jwt-proxy")
# No region from anywhere: the proxy stops right after the configuration is read.
NO_REGION = {"AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SCRIPT, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=base_env({"COLUMNS": "200", **(env or {})}),
    )


# ---- version -----------------------------------------------------------------------------


def test_version_comes_from_the_installed_metadata() -> None:
    assert aws_outbound_jwt_proxy.__version__ == VERSION


@pytest.mark.parametrize("args", [["--version"], ["version"], ["--upstream-host", "x.test", "--version"]])
def test_version_prints_name_and_version(args: list[str]) -> None:
    result = run(*args)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"aws-outbound-jwt-proxy {VERSION}\n", "")


def test_version_takes_no_arguments() -> None:
    result = run("version", "extra")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "unrecognized arguments: extra" in result.stderr


# ---- --help ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def help_text() -> str:
    result = run("--help")
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_usage_lists_the_sub_commands(help_text: str) -> None:
    usage = help_text.split("\n\n", 1)[0]
    assert "{sts-emulator,echo-upstream,demo,dev-ca,version}" in usage
    for name, (_, summary) in cli.COMMANDS.items():
        assert re.search(rf"^  {re.escape(name)} +{re.escape(summary)}$", help_text, re.M), name


def test_help_lists_each_option_once_with_env_and_default(help_text: str) -> None:
    for row in config.PROXY_FLAGS:
        # listed as an option exactly once (other rows' help may mention it)
        assert len(re.findall(rf"^  {re.escape(row.option)} ", help_text, re.M)) == 1, row.option
        flat = " ".join(help_text.split())  # argparse wraps long lines at spaces
        assert f"[env {row.env}" in flat
        if row.default:
            assert f"(default {row.default!r})" in flat
    # Go's single-dash spellings are accepted but not listed.
    assert not re.search(r"(?<![\w-])-[a-z][a-z-]+", help_text.replace("--", "")), help_text
    assert "--version" in help_text


def test_single_dash_spelling_works_from_the_command_line() -> None:
    result = run("-upstream-scheme", "ftp")
    assert result.returncode == 2
    assert result.stderr == (
        "aws-outbound-jwt-proxy: error: --upstream-scheme: must be http or https, got 'ftp'\n"
    )


def test_an_env_error_names_the_variable() -> None:
    result = run(env={"UPSTREAM_TIMEOUT": "x"})
    assert result.returncode == 2
    assert result.stderr == (
        "aws-outbound-jwt-proxy: error: UPSTREAM_TIMEOUT: "
        "invalid duration 'x' (use e.g. 500ms, 30s, 5m, 1h30m)\n"
    )


def test_commands_and_prog_agree() -> None:
    assert cli.PROG == config.PROG
    for name, (target, _) in cli.COMMANDS.items():
        module, _, function = target.partition(":")
        assert module.startswith("aws_outbound_jwt_proxy.") and function, name


# ---- environment variables that look like ours -------------------------------------------


@pytest.mark.parametrize(
    ("name", "known"),
    [
        ("TOKEN_TAG", "TOKEN_TAGS"),
        ("UPSTREAM_HOSTS", "UPSTREAM_HOST"),
        ("TOKEN_AUDIENCES", "TOKEN_AUDIENCE"),
        ("LOGLEVEL", "LOG_LEVEL"),
        ("METRICS_ENABLE", "METRICS_ENABLED"),
        ("TLS_CRT", "TLS_CERT"),
        ("SHUTDOWN_TIMOUT", "SHUTDOWN_TIMEOUT"),
        ("ALLOWED_UPSTREAM_HOST", "ALLOWED_UPSTREAM_HOSTS"),
    ],
)
def test_lookalike_is_found(name: str, known: str) -> None:
    assert envcheck.lookalikes([name, "PATH", "HOME"]) == [(name, known)]


@pytest.mark.parametrize(
    "name",
    [
        "TOKEN_TAGS",  # ours
        "UPSTREAM_PORT",  # not close enough
        "HOSTNAME",
        "UPSTREAM_SERVICE_HOST",  # what Kubernetes sets for a Service named "upstream"
        "STS_EMULATOR_LOG_LEVL",  # the helper commands' own variables
        "ECHO_UPSTREAM_LISTEN_ADR",
        "AWS_REGIONS",
        "token_tag",  # not an upper-case env name
        "TOKEN-TAG",
        "PATH",
    ],
)
def test_not_a_lookalike(name: str) -> None:
    assert envcheck.lookalikes([name]) == []


def test_lookalikes_are_sorted_and_unique() -> None:
    found = envcheck.lookalikes(["UPSTREAM_HOSTS", "TOKEN_TAG", "TOKEN_TAG"])
    assert found == [("TOKEN_TAG", "TOKEN_TAGS"), ("UPSTREAM_HOSTS", "UPSTREAM_HOST")]


def test_the_known_names_are_the_proxy_env_vars() -> None:
    assert {row.env for row in config.PROXY_FLAGS} == envcheck.KNOWN
    assert "TOKEN_TAGS" in envcheck.KNOWN and "TOKEN_TAG" not in envcheck.KNOWN


def test_the_proxy_warns_once_per_lookalike_at_start_up() -> None:
    # No region: start-up stops right after the warnings, with its own one-line error.
    result = run(env={**NO_REGION, "TOKEN_TAG": "team=a", "UPSTREAM_HOSTS": "x.test", "TOKEN_TAGS": "a=b"})
    assert result.returncode == 1
    records = [json.loads(line) for line in result.stderr.splitlines()]
    warnings = [r for r in records if r["level"] == "warn"]
    assert [(r["variable"], r["did_you_mean"]) for r in warnings] == [
        ("TOKEN_TAG", "TOKEN_TAGS"),
        ("UPSTREAM_HOSTS", "UPSTREAM_HOST"),
    ]
    assert "did you mean TOKEN_TAGS?" in warnings[0]["msg"]
    assert records[-1]["msg"].startswith("start-up failed: ")


def test_sub_commands_do_not_warn() -> None:
    result = run("echo-upstream", "--log-level", "nope", env={"TOKEN_TAG": "team=a"})
    assert result.returncode == 2
    assert "TOKEN_TAG" not in result.stderr
