"""Config: the flag table, env fallback, Go durations and one-line validation errors."""

from __future__ import annotations

import dataclasses
import ipaddress
import subprocess
import sys
from pathlib import Path
from typing import Any, get_type_hints

import pytest

from aws_outbound_jwt_proxy.config import settings as config
from aws_outbound_jwt_proxy.config import values
from aws_outbound_jwt_proxy.config.durations import parse_duration
from aws_outbound_jwt_proxy.config.flags import ConfigError


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("30s", 30),
        ("5m", 300),
        ("1h", 3600),
        ("1h30m", 5400),
        ("1.5s", 1.5),
        ("0", 0),
        ("2h45m30s", 9930),
        ("100us", 1e-4),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "1x", "h", "1h 30m", "ms"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_defaults() -> None:
    s = config.load([], env={})
    assert (s.listen_host, s.listen_port) == ("", 8080)
    assert s.upstream_scheme == "https"
    assert s.host_header == "X-Upstream-Host"
    assert s.upstream_timeout == 30
    assert s.token_audiences == ()
    assert s.token_signing_algorithm == "RS256"
    assert s.token_duration == 3600
    assert s.token_refresh_skew == 300
    assert s.metrics_enabled is True
    assert (s.metrics_host, s.metrics_port, s.metrics_path) == ("", 9090, "/metrics")
    assert s.shutdown_timeout == 10
    assert s.token_cache_max_entries == 1024


def test_flag_wins_over_env() -> None:
    env = {"UPSTREAM_HOST": "env.example.com", "TOKEN_AUDIENCE": "a,b", "LOG_LEVEL": "debug"}
    s = config.load(["--upstream-host", "flag.example.com"], env=env)
    assert s.upstream_host == "flag.example.com"
    assert s.token_audiences == ("a", "b")
    assert s.log_level == "debug"
    s = config.load(["--token-audience", "x", "--token-audience=y"], env=env)
    assert s.token_audiences == ("x", "y")


def test_tags_and_allow_list() -> None:
    s = config.load(
        [],
        env={
            "TOKEN_TAGS": "team=payments,env=prod",
            "ALLOWED_UPSTREAM_HOSTS": "*.Example.com,api.other.io:8443",
        },
    )
    assert s.token_tags == (("team", "payments"), ("env", "prod"))
    assert s.allowed_upstream_hosts == ("*.example.com", "api.other.io:8443")


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--upstream-scheme", "ftp"], "--upstream-scheme"),
        (["--upstream-host", "https://x.example.com"], "--upstream-host"),
        (["--host-header", ""], "--host-header"),
        (["--tls-cert", "/etc/hostname"], "--tls-key"),
        (["--upstream-timeout", "0s"], "--upstream-timeout"),
        (["--upstream-timeout", "soon"], "--upstream-timeout"),
        (["--token-signing-algorithm", "HS256"], "--token-signing-algorithm"),
        (["--token-duration", "59s"], "--token-duration"),
        (["--token-duration", "61m"], "--token-duration"),
        (["--token-refresh-skew", "0s"], "--token-refresh-skew"),
        (["--token-refresh-skew", "30m", "--token-duration", "30m"], "--token-refresh-skew"),
        (["--token-cache-idle-ttl", "0s"], "--token-cache-idle-ttl"),
        (["--shutdown-timeout=-1s"], "--shutdown-timeout"),
        (["--listen-addr", "8080"], "--listen-addr"),
        (["--metrics-enabled=maybe"], "--metrics-enabled"),
        (["--tls-key", "/etc/hostname"], "--tls-cert"),
        (["--tls-cert", "/no/such/file", "--tls-key", "/no/such/file"], "--tls-cert"),
        (["--upstream-ca-file", "/no/such/file"], "--upstream-ca-file"),
        (["--token-refresh-skew", "1h"], "--token-refresh-skew"),
        (["--token-audience", ""], "--token-audience"),
        (["--token-audience", "a b"], "--token-audience"),
        (["--log-level", "trace"], "--log-level"),
        (["--log-format", "xml"], "--log-format"),
        (["--metrics-listen-addr", ""], "--metrics-listen-addr"),
        (["--metrics-listen-addr", ":8080"], "--metrics-listen-addr"),
        (["--metrics-path", "metrics"], "--metrics-path"),
        (["--token-tag", "novalue"], "--token-tag"),
        (["--token-tag", "a=1", "--token-tag", "a=2"], "--token-tag"),
        (["--token-cache-max-entries", "0"], "--token-cache-max-entries"),
        (["--allowed-upstream-hosts", "http://x/"], "--allowed-upstream-hosts"),
    ],
)
def test_validation_names_the_flag(argv: list[str], flag: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(argv, env={})
    assert info.value.flag == flag


def test_algorithm_case_insensitive() -> None:
    assert config.load(["--token-signing-algorithm", "es384"], env={}).token_signing_algorithm == "ES384"


def test_cli_config_error_is_one_line_exit_2() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "aws_outbound_jwt_proxy", "--upstream-scheme", "gopher"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "--upstream-scheme" in lines[0]


def test_cli_unknown_flag_is_one_line_exit_2() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "aws_outbound_jwt_proxy", "--no-such-flag"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_help_lists_every_flag_with_env() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "aws_outbound_jwt_proxy", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0
    for flag in config.PROXY_FLAGS:
        assert flag.option in proc.stdout
        assert flag.env in proc.stdout


@pytest.mark.parametrize("value", ["a..b", "[:::]", "-foo", "host:0", "a b", "user@host"])
def test_upstream_host_checked_like_the_routing_header(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.load([f"--upstream-host={value}"], env={})
    assert info.value.flag == "--upstream-host"


def test_unloadable_tls_pair_and_ca_file_are_config_errors(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConfigError) as info:
        config.load(["--tls-cert", str(junk), "--tls-key", str(junk)], env={})
    assert info.value.flag == "--tls-cert"
    with pytest.raises(ConfigError) as info:
        config.load(["--upstream-ca-file", str(junk)], env={})
    assert info.value.flag == "--upstream-ca-file"


def test_empty_item_in_env_list_is_an_error() -> None:
    with pytest.raises(ConfigError) as info:
        config.load([], env={"TOKEN_AUDIENCE": "a,,b"})
    assert info.value.flag == "TOKEN_AUDIENCE"
    assert config.load([], env={"TOKEN_AUDIENCE": ""}).token_audiences == ()


def test_allow_list_flag_takes_comma_lists_too() -> None:
    s = config.load(
        ["--allowed-upstream-hosts", "a.example,*.b.example", "--allowed-upstream-hosts", "c"], env={}
    )
    assert s.allowed_upstream_hosts == ("a.example", "*.b.example", "c")


def test_metrics_address_may_equal_listen_address_when_disabled() -> None:
    s = config.load(["--metrics-enabled=false", "--metrics-listen-addr", ":8080"], env={})
    assert s.metrics_enabled is False


# ---- one table, typed values ---------------------------------------------------------------


def test_the_table_fills_every_settings_field_once_with_its_type() -> None:
    targets = [field for row in config.PROXY_FLAGS for field in row.targets]
    from_env = ["egress"]  # HTTP(S)_PROXY / NO_PROXY: the environment's, not flags
    assert sorted(targets + from_env) == sorted(f.name for f in dataclasses.fields(config.Settings))
    assert len({row.name for row in config.PROXY_FLAGS}) == len(config.PROXY_FLAGS)
    defaults = config.load([], env={})
    hints = get_type_hints(config.Settings)
    for name, hint in hints.items():
        value: Any = getattr(defaults, name)
        origin = getattr(hint, "__origin__", hint)
        if origin is tuple and value and name == "denied_upstream_cidrs":
            assert all(isinstance(net, ipaddress.IPv4Network | ipaddress.IPv6Network) for net in value)
        assert isinstance(value, origin), (name, value, hint)


@pytest.mark.parametrize(
    ("env", "name", "message"),
    [
        ({"UPSTREAM_TIMEOUT": "x"}, "UPSTREAM_TIMEOUT", "invalid duration 'x'"),
        ({"UPSTREAM_SCHEME": "ftp"}, "UPSTREAM_SCHEME", "must be http or https, got 'ftp'"),
        ({"TOKEN_TAGS": "a=1,a=2"}, "TOKEN_TAGS", "duplicate tag key 'a'"),
        ({"METRICS_ENABLED": "maybe"}, "METRICS_ENABLED", "invalid boolean"),
        ({"LOG_LEVEL": "loud"}, "LOG_LEVEL", "must be debug, info, warn or error"),
        ({"LISTEN_ADDR": "nope"}, "LISTEN_ADDR", "missing :port"),
    ],
)
def test_a_bad_env_value_names_the_variable(env: dict[str, str], name: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.load([], env=env)
    assert info.value.flag == name
    assert str(info.value).startswith(f"{name}: ")
    assert message in info.value.message


def test_a_bad_flag_value_names_the_flag_even_when_the_env_is_fine() -> None:
    with pytest.raises(ConfigError) as info:
        config.load(["--upstream-timeout", "x"], env={"UPSTREAM_TIMEOUT": "5s"})
    assert str(info.value) == "--upstream-timeout: invalid duration 'x' (use e.g. 500ms, 30s, 5m, 1h30m)"


@pytest.mark.parametrize(
    ("argv", "env", "error"),
    [
        (
            [],
            {"TOKEN_REFRESH_SKEW": "1h"},
            "TOKEN_REFRESH_SKEW: must be < TOKEN_DURATION (1h), got 1h",
        ),
        (
            ["--token-duration", "10m"],
            {"TOKEN_REFRESH_SKEW": "15m"},
            "TOKEN_REFRESH_SKEW: must be < --token-duration (10m), got 15m",
        ),
        (
            [],
            {"TLS_CERT": "/etc/hostname"},
            "TLS_KEY: TLS_CERT and TLS_KEY must be given together",
        ),
        (
            ["--tls-cert", "/etc/hostname"],
            {},
            "--tls-key: --tls-cert and --tls-key must be given together",
        ),
        ([], {"LISTEN_ADDR": ":9090"}, "METRICS_LISTEN_ADDR: must differ from LISTEN_ADDR"),
        (
            ["--metrics-listen-addr", "0.0.0.0:8080"],
            {},
            "--metrics-listen-addr: must differ from --listen-addr",
        ),
    ],
)
def test_cross_field_errors_name_the_value_to_change(
    argv: list[str], env: dict[str, str], error: str
) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(argv, env=env)
    assert str(info.value) == error


def test_metrics_port_0_never_clashes() -> None:
    s = config.load(["--listen-addr", "127.0.0.1:0", "--metrics-listen-addr", "127.0.0.1:0"], env={})
    assert (s.listen_port, s.metrics_port) == (0, 0)


# ---- Go's single-dash spelling ---------------------------------------------------------------


def test_single_dash_spellings_are_accepted() -> None:
    s = config.load(
        [
            "-upstream-host",
            "api.example.com",
            "-token-audience",
            "a",
            "--token-audience",
            "b",
            "-metrics-enabled=false",
            "-token-duration=15m",
        ],
        env={},
    )
    assert s.upstream_host == "api.example.com"
    assert s.token_audiences == ("a", "b")
    assert s.metrics_enabled is False
    assert s.token_duration == 900
    assert config.load(["-metrics-enabled"], env={}).metrics_enabled is True


def test_a_single_dash_value_error_names_the_flag() -> None:
    with pytest.raises(ConfigError) as info:
        config.load(["-upstream-timeout", "x"], env={})
    assert info.value.flag == "--upstream-timeout"


# ---- shared log flags ------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "level"), [("DEBUG", "debug"), (" info ", "info"), ("warning", "warn")])
def test_log_level_is_normalised(text: str, level: str) -> None:
    assert values.log_level(text) == level


@pytest.mark.parametrize("text", ["trace", "", "verbose"])
def test_log_level_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="must be debug, info, warn or error"):
        values.log_level(text)


def test_log_format() -> None:
    assert values.log_format(" JSON ") == "json"
    with pytest.raises(ValueError, match="must be json or text"):
        values.log_format("xml")


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("--upstream-host=--", "--upstream-host: must be host[:port]"),
        ("--listen-addr=--", "--listen-addr: invalid address '--'"),
        ("--intercept-ca-key=--", "--intercept-ca-key: cannot read --"),
    ],
)
def test_a_value_of_two_dashes_is_checked_like_any_other(arg: str, message: str) -> None:
    # argparse (3.11) hands `--flag=--` over as an empty list; it must still be a one-line error.
    with pytest.raises(ConfigError) as err:
        config.load([arg], {})
    assert str(err.value).startswith(message)
