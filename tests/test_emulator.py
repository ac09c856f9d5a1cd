"""The STS emulator over real sockets (boto3, the AWS CLI, raw SigV4 requests) plus its pure pieces."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import botocore.exceptions
import httpx
import pytest
import trio
from botocore import UNSIGNED
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from joserfc import jwt
from joserfc.errors import ExpiredTokenError
from joserfc.jwk import KeySet

from aws_outbound_jwt_proxy.config.flags import ConfigError
from aws_outbound_jwt_proxy.devtools.emulator import EmulatorOptions, faults, params, render, serve, sigv4
from aws_outbound_jwt_proxy.devtools.emulator.cli import load
from aws_outbound_jwt_proxy.devtools.emulator.errors import StsError
from tests.fixtures.emulator import (
    DUMMY_ACCESS_KEY,
    DUMMY_SECRET_KEY,
    STRICT_ACCESS_KEY,
    STRICT_SECRET_KEY,
    StsEmulator,
    start_emulator,
)

NS = {"sts": render.NAMESPACE}
AWS = "https://sts.amazonaws.com/"
FORM = "application/x-www-form-urlencoded; charset=utf-8"


# ---- helpers -------------------------------------------------------------


def verify(issuer: str, token: str, audience: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Verify like a third party: discovery → jwks_uri → JWKS → signature, iss, aud, exp. (header, claims)."""
    discovery = httpx.get(f"{issuer}/.well-known/openid-configuration").json()
    assert discovery["issuer"] == issuer
    keys = KeySet.import_key_set(httpx.get(discovery["jwks_uri"]).json())
    decoded = jwt.decode(token, keys, algorithms=discovery["id_token_signing_alg_values_supported"])
    registry = jwt.JWTClaimsRegistry(
        iss={"essential": True, "value": issuer},
        aud={"essential": True, "value": audience},
        exp={"essential": True},
    )
    registry.validate(decoded.claims)
    return dict(decoded.header), dict(decoded.claims)


def sigv4_headers(
    url: str,
    body: str,
    access_key: str = DUMMY_ACCESS_KEY,
    secret_key: str = DUMMY_SECRET_KEY,
    region: str = "us-east-1",
) -> dict[str, str]:
    """The headers botocore's SigV4Auth gives a Query-protocol POST of ``body`` to ``url``."""
    req = AWSRequest(method="POST", url=url, data=body, headers={"Content-Type": FORM})
    SigV4Auth(Credentials(access_key, secret_key), "sts", region).add_auth(req)
    return dict(req.headers.items())


def signed_post(url: str, form: list[tuple[str, str]], timeout: float = 10) -> httpx.Response:
    """A Query-protocol POST signed with botocore's SigV4Auth (bypasses boto3's client-side checks)."""
    body = urlencode(form)
    return httpx.post(f"{url}/", content=body, headers=sigv4_headers(f"{url}/", body), timeout=timeout)


def error_of(response: httpx.Response) -> tuple[str, str, str]:
    """(Type, Code, RequestId) of an ErrorResponse body."""
    root = ET.fromstring(response.text)
    assert root.tag == f"{{{render.NAMESPACE}}}ErrorResponse"
    find = root.findtext
    return (
        find("sts:Error/sts:Type", namespaces=NS) or "",
        find("sts:Error/sts:Code", namespaces=NS) or "",
        find("sts:RequestId", namespaces=NS) or "",
    )


def gwit(*audiences: str, **extra: str) -> list[tuple[str, str]]:
    form = [("Action", "GetWebIdentityToken"), ("Version", "2011-06-15")]
    form += [(f"Audience.member.{i}", a) for i, a in enumerate(audiences, 1)]
    return form + list(extra.items())


def client_error(call: Any, **kwargs: Any) -> tuple[str, int, str]:
    """(Code, HTTP status, Type) of the ClientError ``call(**kwargs)`` raises."""
    with pytest.raises(botocore.exceptions.ClientError) as info:
        call(**kwargs)
    error, meta = info.value.response["Error"], info.value.response["ResponseMetadata"]
    return error["Code"], meta["HTTPStatusCode"], error.get("Type", "")


# ---- tokens through boto3 ------------------------------------------------


def test_rs256_token_verifies_through_discovery_and_jwks(sts_emulator: StsEmulator) -> None:
    sts = sts_emulator.boto3_client()
    before = int(time.time())
    out = sts.get_web_identity_token(Audience=["https://api.example.com"], SigningAlgorithm="RS256")
    header, claims = verify(sts_emulator.issuer, out["WebIdentityToken"], "https://api.example.com")
    assert header["alg"] == "RS256" and header["kid"]
    assert claims["aud"] == "https://api.example.com"
    assert claims["iss"] == sts_emulator.issuer == sts_emulator.url
    assert claims["sub"].startswith("arn:aws:iam::123456789012:role/emulator-")
    assert before <= claims["iat"] <= int(time.time())
    assert claims["exp"] - claims["iat"] == 300  # AWS default duration
    assert out["Expiration"] == datetime.fromtimestamp(claims["exp"], UTC)
    assert len(claims["jti"]) == 36
    block = claims[AWS]
    assert block["aws_account"] == "123456789012"
    assert block["source_region"] == "us-east-1"
    assert block["principal_id"] == claims["sub"]
    assert block["org_id"] and block["ou_path"]
    assert "request_tags" not in block


def test_es384_several_audiences_and_tags(sts_emulator: StsEmulator) -> None:
    sts = sts_emulator.boto3_client()
    out = sts.get_web_identity_token(
        Audience=["https://a.example", "https://b.example"],
        SigningAlgorithm="ES384",
        DurationSeconds=900,
        Tags=[{"Key": "team", "Value": "payments"}, {"Key": "env", "Value": "dev"}],
    )
    header, claims = verify(sts_emulator.issuer, out["WebIdentityToken"], "https://b.example")
    assert header["alg"] == "ES384"
    jwks = httpx.get(f"{sts_emulator.url}/.well-known/jwks.json").json()
    assert {(k["kid"], k["alg"], k["use"], k["kty"]) for k in jwks["keys"]} >= {
        (header["kid"], "ES384", "sig", "EC")
    }
    assert claims["aud"] == ["https://a.example", "https://b.example"]
    assert claims["exp"] - claims["iat"] == 900
    assert out["Expiration"].timestamp() == claims["exp"]
    assert claims[AWS]["request_tags"] == {"team": "payments", "env": "dev"}


def test_discovery_and_jwks_documents(sts_emulator: StsEmulator) -> None:
    doc = httpx.get(f"{sts_emulator.url}/.well-known/openid-configuration").json()
    assert doc["jwks_uri"] == f"{sts_emulator.issuer}/.well-known/jwks.json"
    assert doc["id_token_signing_alg_values_supported"] == ["RS256", "ES384"]
    assert doc["response_types_supported"] and doc["subject_types_supported"]
    keys = httpx.get(doc["jwks_uri"]).json()["keys"]
    assert sorted(k["alg"] for k in keys) == ["ES384", "RS256"]
    assert all("d" not in k for k in keys), "private key material published"
    rsa = next(k for k in keys if k["kty"] == "RSA")
    assert len(base64.urlsafe_b64decode(rsa["n"] + "==")) * 8 == 2048
    assert next(k for k in keys if k["kty"] == "EC")["crv"] == "P-384"


def test_aws_cli_gets_a_token(sts_emulator: StsEmulator, tmp_path: Path) -> None:
    aws = Path(sys.executable).with_name("aws")
    # AWS CLI v1 fetches URL-looking parameter values unless told not to.
    config = tmp_path / "aws-config"
    config.write_text("[default]\ncli_follow_urlparam = false\n")
    env = sts_emulator.subprocess_env() | {"AWS_CONFIG_FILE": str(config)}
    result = subprocess.run(
        [str(aws), "sts", "get-web-identity-token", "--audience", "https://cli.example",
         "--signing-algorithm", "ES384", "--duration-seconds", "120", "--endpoint-url", sts_emulator.url,
         "--output", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    _, claims = verify(sts_emulator.issuer, out["WebIdentityToken"], "https://cli.example")
    assert claims["exp"] - claims["iat"] == 120
    assert datetime.fromisoformat(out["Expiration"]).timestamp() == claims["exp"]


def test_get_caller_identity(sts_emulator: StsEmulator) -> None:
    out = sts_emulator.boto3_client().get_caller_identity()
    assert out["Account"] == "123456789012"
    assert out["Arn"].startswith("arn:aws:sts::123456789012:assumed-role/emulator-")
    assert out["UserId"].startswith("AROA")
    assert sts_emulator.calls()[-1]["action"] == "GetCallerIdentity"


# ---- authentication ------------------------------------------------------


def test_strict_mode_accepts_the_right_secret(sts_emulator_strict: StsEmulator) -> None:
    out = sts_emulator_strict.boto3_client().get_web_identity_token(Audience=["x"], SigningAlgorithm="RS256")
    assert verify(sts_emulator_strict.issuer, out["WebIdentityToken"], "x")[1]["aud"] == "x"


def test_strict_mode_rejects_wrong_secret(sts_emulator_strict: StsEmulator) -> None:
    sts = sts_emulator_strict.boto3_client(aws_secret_access_key="not-the-secret")
    err = client_error(sts.get_web_identity_token, Audience=["x"], SigningAlgorithm="RS256")
    assert err[:2] == ("SignatureDoesNotMatch", 403)
    assert sts_emulator_strict.calls()[-1]["result"] == "SignatureDoesNotMatch"


def test_strict_mode_rejects_unknown_key(sts_emulator_strict: StsEmulator) -> None:
    sts = sts_emulator_strict.boto3_client(aws_access_key_id="AKIAUNKNOWN")
    assert client_error(sts.get_caller_identity)[:2] == ("InvalidClientTokenId", 403)


def test_strict_mode_rejects_tampered_body(sts_emulator_strict: StsEmulator) -> None:
    body = urlencode(gwit("x", SigningAlgorithm="RS256"))
    url = f"{sts_emulator_strict.url}/"
    headers = sigv4_headers(url, body, STRICT_ACCESS_KEY, STRICT_SECRET_KEY)
    ok = httpx.post(url, content=body, headers=headers)
    assert ok.status_code == 200
    tampered = httpx.post(url, content=body.replace("RS256", "ES384"), headers=headers)
    assert tampered.status_code == 403
    assert error_of(tampered)[:2] == ("Sender", "SignatureDoesNotMatch")


def test_unsigned_request_is_refused(sts_emulator: StsEmulator) -> None:
    sts = sts_emulator.boto3_client(
        config=Config(signature_version=UNSIGNED, retries={"total_max_attempts": 1})
    )
    err = client_error(sts.get_web_identity_token, Audience=["x"], SigningAlgorithm="RS256")
    assert err[:2] == ("MissingAuthenticationToken", 403)


def test_malformed_authorization_header(sts_emulator: StsEmulator) -> None:
    body = urlencode(gwit("x", SigningAlgorithm="RS256"))
    headers = {
        "Content-Type": FORM,
        "Authorization": "AWS4-HMAC-SHA256 Credential=garbage",
        "X-Amz-Date": "x",
    }
    response = httpx.post(f"{sts_emulator.url}/", content=body, headers=headers)
    assert response.status_code == 400
    assert error_of(response)[1] == "IncompleteSignature"


# ---- parameter validation (raw signed requests) ---------------------------


@pytest.mark.parametrize(
    "form",
    [
        pytest.param(gwit("https://a.example"), id="missing-signing-algorithm"),
        pytest.param(gwit("https://a.example", SigningAlgorithm="HS256"), id="bad-algorithm"),
        pytest.param(
            gwit("https://a.example", SigningAlgorithm="RS256", DurationSeconds="30"), id="duration-30"
        ),
        pytest.param(
            gwit("https://a.example", SigningAlgorithm="RS256", DurationSeconds="4000"), id="duration-4000"
        ),
        pytest.param(
            gwit("https://a.example", SigningAlgorithm="RS256", DurationSeconds="1h"), id="duration-text"
        ),
        pytest.param(
            gwit(*[f"https://{i}.example" for i in range(11)], SigningAlgorithm="RS256"), id="11-audiences"
        ),
        pytest.param(gwit("", SigningAlgorithm="RS256"), id="empty-audience"),
        pytest.param(gwit("x" * 1001, SigningAlgorithm="RS256"), id="audience-too-long"),
        pytest.param(gwit(SigningAlgorithm="RS256"), id="no-audience"),
        pytest.param(
            gwit("a", SigningAlgorithm="RS256", **{"Tags.member.1.Key": "k"}), id="tag-without-value"
        ),
    ],
)
def test_bad_parameters_are_validation_errors(sts_emulator: StsEmulator, form: list[tuple[str, str]]) -> None:
    response = signed_post(sts_emulator.url, form)
    assert response.status_code == 400
    type_, code, request_id = error_of(response)
    assert (type_, code) == ("Sender", "ValidationError")
    assert response.headers["x-amzn-requestid"] == request_id
    assert sts_emulator.calls()[-1]["result"] == "ValidationError"


def test_limits_are_inclusive(sts_emulator: StsEmulator) -> None:
    audiences = [f"https://{i}.example" for i in range(10)]
    for duration in ("60", "3600"):
        response = signed_post(
            sts_emulator.url, gwit(*audiences, SigningAlgorithm="RS256", DurationSeconds=duration)
        )
        assert response.status_code == 200, response.text


def test_unknown_action(sts_emulator: StsEmulator) -> None:
    response = signed_post(sts_emulator.url, [("Action", "AssumeRole"), ("Version", "2011-06-15")])
    assert response.status_code == 400
    assert error_of(response)[1] == "InvalidAction"


# ---- fault knobs -----------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "status", "type_"),
    [
        ("AccessDenied", 403, "Sender"),
        ("OutboundWebIdentityFederationDisabledException", 403, "Sender"),
        ("SessionDurationEscalationException", 403, "Sender"),
        ("JWTPayloadSizeExceededException", 400, "Sender"),
        ("Throttling", 400, "Sender"),
        ("ThrottlingException", 400, "Sender"),
        ("ExpiredToken", 403, "Sender"),
        ("InternalFailure", 500, "Receiver"),
        ("ServiceUnavailable", 503, "Receiver"),
        ("SomethingNew", 400, "Sender"),
    ],
)
def test_fault_error_codes_reach_boto3(sts_emulator: StsEmulator, code: str, status: int, type_: str) -> None:
    sts_emulator.set_faults(error=code, always=True)
    err = client_error(
        sts_emulator.boto3_client().get_web_identity_token, Audience=["a"], SigningAlgorithm="RS256"
    )
    assert err == (code, status, type_)
    assert [c["result"] for c in sts_emulator.calls()] == [code]


def test_fault_count_is_used_up(sts_emulator: StsEmulator) -> None:
    sts_emulator.set_faults(error="Throttling", count=2)
    sts = sts_emulator.boto3_client()
    for _ in range(2):
        assert client_error(sts.get_web_identity_token, Audience=["a"], SigningAlgorithm="RS256")[0]
    assert sts.get_web_identity_token(Audience=["a"], SigningAlgorithm="RS256")["WebIdentityToken"]
    assert [c["result"] for c in sts_emulator.calls()] == ["Throttling", "Throttling", "ok"]


def test_fault_audience_filter(sts_emulator: StsEmulator) -> None:
    sts_emulator.set_faults(error="AccessDenied", audience="https://denied.example")
    sts = sts_emulator.boto3_client()
    assert sts.get_web_identity_token(Audience=["https://ok.example"], SigningAlgorithm="RS256")
    err = client_error(
        sts.get_web_identity_token,
        Audience=["https://ok.example", "https://denied.example"],
        SigningAlgorithm="RS256",
    )
    assert err[0] == "AccessDenied"
    assert sts.get_caller_identity()["Account"]  # no audience, no match


def test_fault_latency_delays_only_its_call(sts_emulator: StsEmulator) -> None:
    sts_emulator.set_faults(latency_ms=2000, audience="https://slow.example", count=1)
    slow_client, fast_client = sts_emulator.boto3_client(), sts_emulator.boto3_client()

    def slow() -> float:
        t0 = time.monotonic()
        slow_client.get_web_identity_token(Audience=["https://slow.example"], SigningAlgorithm="RS256")
        return time.monotonic() - t0

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(slow)
        # The slow call has taken its rule (remaining 0) once it is in the emulator, sleeping.
        deadline = time.monotonic() + 10
        while sts_emulator.faults()[0].get("remaining") != 0:
            assert time.monotonic() < deadline, "slow call never arrived"
            time.sleep(0.02)
        t0 = time.monotonic()
        fast_client.get_web_identity_token(Audience=["https://fast.example"], SigningAlgorithm="RS256")
        fast_elapsed = time.monotonic() - t0
        slow_elapsed = future.result(timeout=30)
    assert slow_elapsed >= 2.0
    assert fast_elapsed < 1.5
    results = [(c["audiences"], c["result"]) for c in sts_emulator.calls()]
    assert results == [(["https://fast.example"], "ok"), (["https://slow.example"], "ok")]


def test_client_leaving_during_latency_does_not_hurt(sts_emulator: StsEmulator) -> None:
    sts_emulator.set_faults(latency_ms=3000, count=1)
    with pytest.raises(httpx.ReadTimeout):
        signed_post(sts_emulator.url, gwit("a", SigningAlgorithm="RS256"), timeout=0.3)
    t0 = time.monotonic()
    assert signed_post(sts_emulator.url, gwit("a", SigningAlgorithm="RS256")).status_code == 200
    assert time.monotonic() - t0 < 2.0


def test_expiration_override(sts_emulator: StsEmulator) -> None:
    sts_emulator.set_faults(expiration_seconds=120, count=1)
    sts = sts_emulator.boto3_client()
    out = sts.get_web_identity_token(Audience=["a"], SigningAlgorithm="RS256", DurationSeconds=3600)
    _, claims = verify(sts_emulator.issuer, out["WebIdentityToken"], "a")
    assert claims["exp"] - claims["iat"] == 120
    assert out["Expiration"].timestamp() == claims["exp"]
    again = sts.get_web_identity_token(Audience=["a"], SigningAlgorithm="RS256", DurationSeconds=3600)
    assert verify(sts_emulator.issuer, again["WebIdentityToken"], "a")[1]["exp"] >= claims["iat"] + 3600


def test_negative_expiration_mints_an_expired_token(sts_emulator: StsEmulator) -> None:
    sts_emulator.set_faults(expiration_seconds=-60, always=True)
    out = sts_emulator.boto3_client().get_web_identity_token(Audience=["a"], SigningAlgorithm="ES384")
    assert out["Expiration"].timestamp() < time.time() - 50
    with pytest.raises(ExpiredTokenError):
        verify(sts_emulator.issuer, out["WebIdentityToken"], "a")


def test_admin_rejects_bad_fault_documents(sts_emulator: StsEmulator) -> None:
    for doc in ({"count": 0}, {"count": 1, "always": True}, {"latency_ms": "x"}, {"bogus": 1}, [1]):
        response = httpx.post(f"{sts_emulator.url}/_emulator/faults", json=doc)
        assert response.status_code == 400, doc
        assert response.json()["error"]
    assert httpx.post(f"{sts_emulator.url}/_emulator/faults", content=b"{not json").status_code == 400


def test_calls_record(sts_emulator: StsEmulator) -> None:
    sts = sts_emulator.boto3_client()
    sts.get_web_identity_token(
        Audience=["b", "a"], SigningAlgorithm="ES384", DurationSeconds=600, Tags=[{"Key": "k", "Value": "v"}]
    )
    (call,) = sts_emulator.calls()
    assert call["action"] == "GetWebIdentityToken"
    assert call["audiences"] == ["b", "a"]
    assert (call["duration"], call["algorithm"], call["tags"], call["result"]) == (
        600,
        "ES384",
        {"k": "v"},
        "ok",
    )
    assert abs(call["time"] - time.time()) < 30
    assert DUMMY_ACCESS_KEY not in json.dumps(call)
    sts_emulator.reset_calls()
    assert sts_emulator.calls() == []


# ---- processes: key persistence, flags, programmatic API -----------------


def test_key_dir_keeps_keys_across_restarts(tmp_path: Path) -> None:
    jwks = []
    for _ in range(2):
        emu = start_emulator(["--key-dir", str(tmp_path / "keys")])
        try:
            jwks.append(httpx.get(f"{emu.url}/.well-known/jwks.json").json())
        finally:
            assert emu.stop() == 0
    assert jwks[0] == jwks[1]
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["es384.json", "rs256.json"]
    assert ((tmp_path / "keys" / "rs256.json").stat().st_mode & 0o777) == 0o600


def test_unreadable_key_file_is_a_startup_error(tmp_path: Path) -> None:
    (tmp_path / "rs256.json").write_text('{"kty": "RSA", "n": "x"}')
    emu = start_emulator(["--key-dir", str(tmp_path)], wait=False)
    assert emu.proc.wait(30) == 1
    emu.stop()
    assert any("rs256.json" in line and "sts emulator failed" in line for line in emu.lines), emu.lines


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--listen-addr", "nowhere"], "--listen-addr"),
        (["--credential", "no-colon"], "--credential"),
        (["--no-such-flag"], "--no-such-flag"),
    ],
)
def test_bad_flags_exit_2_with_one_line(args: list[str], flag: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "aws_outbound_jwt_proxy", "sts-emulator", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0], result.stderr


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--listen-addr", "127.0.0.1:99999"], "--listen-addr"),
        (["--account-id", "12"], "--account-id"),
        (["--credential", ":secret"], "--credential"),
        (["--log-level", "loud"], "--log-level"),
        (["--log-format", "xml"], "--log-format"),
        (["--issuer", "ftp://x"], "--issuer"),
        (["--issuer", "http://x/?q=1"], "--issuer"),
        (["--enable-admin=maybe"], "--enable-admin"),
        (["--key-dir", __file__], "--key-dir"),
    ],
)
def test_bad_flag_values_name_the_flag(args: list[str], flag: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(args, {})
    assert info.value.flag == flag


def test_flags_from_env() -> None:
    options, level, fmt = load(
        ["--account-id", "111111111111"],
        {
            "STS_EMULATOR_ACCOUNT_ID": "222222222222",
            "STS_EMULATOR_CREDENTIAL": "AK1:s1,AK2:s2",
            "STS_EMULATOR_ENABLE_ADMIN": "true",
            "STS_EMULATOR_LOG_FORMAT": "text",
            # The proxy's own settings in the same environment are not the emulator's.
            "LISTEN_ADDR": "127.0.0.1:9",
            "LOG_LEVEL": "debug",
        },
    )
    assert options.account_id == "111111111111"
    assert options.credentials == {"AK1": "s1", "AK2": "s2"}
    assert options.enable_admin and (options.host, options.port) == ("127.0.0.1", 4566)
    assert (level, fmt) == ("info", "text")
    with pytest.raises(ConfigError):
        load([], {"STS_EMULATOR_LISTEN_ADDR": "bad"})


async def test_programmatic_serve_without_admin() -> None:
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve, EmulatorOptions(port=0))
        assert url.startswith("http://127.0.0.1:") and not url.endswith(":0")
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{url}/_emulator/calls")).status_code == 404
            assert (await http.post(f"{url}/_emulator/faults", json={})).status_code == 404
            doc = (await http.get(f"{url}/.well-known/openid-configuration")).json()
            assert doc["issuer"] == url
        nursery.cancel_scope.cancel()


# ---- pure pieces -----------------------------------------------------------


def test_params_parse_members_in_index_order() -> None:
    form = {
        "Action": "GetWebIdentityToken",
        "Audience.member.2": "b",
        "Audience.member.10": "j",
        "Audience.member.1": "a",
        "SigningAlgorithm": "ES384",
        "Tags.member.2.Key": "k2",
        "Tags.member.2.Value": "",
        "Tags.member.1.Value": "v1",
        "Tags.member.1.Key": "k1",
    }
    req = params.token_request(form)
    assert req == params.TokenRequest(("a", "b", "j"), 300, "ES384", (("k1", "v1"), ("k2", "")))


def test_params_reject_duplicate_tag_keys() -> None:
    form = {"Audience.member.1": "a", "SigningAlgorithm": "RS256"}
    form |= {"Tags.member.1.Key": "Team", "Tags.member.1.Value": "x"}
    form |= {"Tags.member.2.Key": "team", "Tags.member.2.Value": "y"}
    with pytest.raises(StsError) as info:
        params.token_request(form)
    assert info.value.code == "ValidationError" and info.value.status == 400


def test_render_error_and_success_are_namespaced_xml() -> None:
    doc = ET.fromstring(render.error("Sender", "AccessDenied", "no <way> & no", "rid"))
    assert doc.findtext("sts:Error/sts:Message", namespaces=NS) == "no <way> & no"
    ok = ET.fromstring(render.success("GetCallerIdentity", {"Account": "1"}, "rid"))
    assert ok.findtext("sts:GetCallerIdentityResult/sts:Account", namespaces=NS) == "1"
    assert ok.findtext("sts:ResponseMetadata/sts:RequestId", namespaces=NS) == "rid"
    assert render.iso8601(1795946400) == "2026-11-29T10:00:00Z"


def _botocore_signed(secret: str, body: str) -> sigv4.SignedRequest:
    signed = sigv4_headers("http://127.0.0.1:4566/", body, "AKID", secret, "eu-west-1")
    headers = [(k.lower(), v) for k, v in signed.items()] + [("host", "127.0.0.1:4566")]
    return sigv4.SignedRequest("POST", "/", "", headers, body.encode())


def test_sigv4_check_agrees_with_botocore() -> None:
    signed = _botocore_signed("s3cret", "Action=GetCallerIdentity&Version=2011-06-15")
    auth = sigv4.check(signed, {"AKID": "s3cret"}, time.time())
    assert (auth.access_key, auth.region, auth.service) == ("AKID", "eu-west-1", "sts")
    with pytest.raises(StsError, match="SignatureDoesNotMatch"):
        sigv4.check(signed, {"AKID": "other"}, time.time())
    with pytest.raises(StsError, match="InvalidClientTokenId"):
        sigv4.check(signed, {"AKID2": "s3cret"}, time.time())
    with pytest.raises(StsError, match="SignatureDoesNotMatch"):  # replayed 20 minutes later
        sigv4.check(signed, {"AKID": "s3cret"}, time.time() + 1200)
    assert sigv4.check(signed, {}, time.time()).access_key == "AKID"  # lenient mode


def test_faults_take_first_matching_rule() -> None:
    state = faults.Faults()
    state.rules = faults.parse_rules(
        [{"error": "AccessDenied", "audience": "x", "count": 1}, {"latency_ms": 5}]
    )
    first = state.take(("x", "y"))
    assert first is not None and first.error == "AccessDenied"
    second = state.take(("x",))
    assert second is not None and second.error is None and second.latency_ms == 5
    assert state.describe()[0]["remaining"] == 0
