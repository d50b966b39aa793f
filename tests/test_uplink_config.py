"""Uplink settings, broker profiles, pacing, certificates and TLS error wording (offline)."""

from __future__ import annotations

import datetime as dt
import ssl
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from pydantic import ValidationError

from gateway.errors import AuthError, ClockBehindError, ConfigError, TransientError
from gateway.records.topics import azure_topic, parse_azure_topic
from gateway.uplink import certs, tls, transport
from gateway.uplink.commands import main as commands_main
from gateway.uplink.config import MqttSection, is_loopback
from gateway.uplink.pacing import Pacer, TokenBucket
from gateway.uplink.profiles import AWS, AZURE, GENERIC, azure_username

GW = "gwk3j2x7q9m4t8vb"


def cfg(**kw: Any) -> MqttSection:
    return MqttSection.model_validate({"host": "broker.example", **kw})


def test_plain_tcp_is_refused_for_a_remote_broker_unless_allowed() -> None:
    with pytest.raises(ValidationError, match="clear text"):
        cfg(tls=False)
    assert cfg(tls=False, allow_insecure=True).tls is False
    assert MqttSection(host="127.0.0.1", tls=False).tls is False  # loopback: nothing leaves the machine
    assert is_loopback("localhost")
    assert is_loopback("::1")
    assert not is_loopback("10.0.0.1")


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"cert_file": "/x.crt"}, "cert_file and key_file go together"),
        ({"profile": "azure"}, "speaks MQTT 3.1.1 only"),
        ({"profile": "azure", "protocol": "3.1.1"}, "needs azure_hub"),
        ({"reconnect_min_s": 5.0, "reconnect_max_s": 1.0}, "reconnect_max_s"),
        ({"message_expiry_s": 60, "protocol": "3.1.1"}, "message_expiry_s needs"),
        ({"port": "8883"}, "valid integer"),
        ({"colour": "blue"}, "Extra inputs"),
    ],
)
def test_config_mistakes_are_reported(keys: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        cfg(**keys)


def test_profiles_hold_the_documented_limits() -> None:
    ok = f"edgetwin/v1/{GW}/features/s0s0s0s0s0s0s0s0"
    assert AWS.problems(client_id=GW, topic=ok, payload_bytes=1000) == []
    deep = "a/b/c/d/e/f/g/h/i"
    problems = AWS.problems(client_id="$" + "x" * 130, topic=deep, payload_bytes=200_000, qos=2)
    assert len(problems) == 5, problems
    assert any("8 slashes, more than 7" in p for p in problems)
    assert any("exceeds 131072" in p for p in problems)
    assert AWS.publishes_per_s == 100
    assert AWS.bytes_per_s == 512 * 1024
    assert AWS.check_keepalive(10) == "keepalive 10 s outside 30..1200 s"
    assert AZURE.problems(client_id=GW, topic="devices/x/messages/events/", payload_bytes=300_000)
    assert not AZURE.retain
    assert AZURE.protocols == ("3.1.1",)
    assert GENERIC.problems(client_id=GW, topic="a/+/b", payload_bytes=1) == ["topic holds a wildcard or NUL"]


def test_azure_topics_carry_the_relative_topic_as_a_property_bag() -> None:
    topic = azure_topic(GW, {"topic": "features/abc", "seq": "12", "$.ct": "application/senml+cbor"})
    assert topic.startswith(f"devices/{GW}/messages/events/topic=features%2Fabc&seq=12&")
    assert parse_azure_topic(topic) == (
        GW,
        {"topic": "features/abc", "seq": "12", "$.ct": "application/senml+cbor"},
    )
    assert azure_username("myhub", GW) == f"myhub.azure-devices.net/{GW}/?api-version=2021-04-12"
    assert parse_azure_topic("edgetwin/v1/x") is None


def test_token_bucket_paces_messages_and_bytes() -> None:
    b = TokenBucket(10.0, now=0.0)  # 10/s, a burst of 10
    for _ in range(10):
        assert b.wait_for(1, 0.0) == 0.0
        b.take(1, 0.0)
    assert b.wait_for(1, 0.0) == pytest.approx(0.1)
    assert b.wait_for(1, 0.1) == pytest.approx(0.0)
    assert b.wait_for(50, 0.1) == pytest.approx(0.9)  # above the burst: waits for a full bucket only
    p = Pacer(None, 1000.0, now=0.0)
    p.take(1500, 0.0)  # a debt
    assert p.wait_for(100, 0.0) == pytest.approx(0.6)
    assert Pacer(None, None).unlimited
    with pytest.raises(ValueError, match="positive"):
        TokenBucket(0.0)


def test_provision_key_is_private_and_the_csr_names_the_pseudonym(tmp_path: Path) -> None:
    assert commands_main(["provision", "key", "--cn", GW, "--out-dir", str(tmp_path)]) == 0
    key = tmp_path / "gateway.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    csr = x509.load_pem_x509_csr((tmp_path / "gateway.csr").read_bytes())
    assert csr.subject.rfc4514_string() == f"CN={GW}"
    assert csr.is_signature_valid
    before = key.read_bytes()
    assert commands_main(["provision", "key", "--cn", GW, "--out-dir", str(tmp_path)]) == 78  # no overwrite
    assert key.read_bytes() == before
    ca = certs.DemoCA(tmp_path / "ca")
    signed = ca.sign_csr(tmp_path / "gateway.csr", tmp_path / "signed.crt")
    cert_dir = tmp_path / "imported"
    assert (
        commands_main(
            ["provision", "import", "--cert", str(signed), "--key", str(key), "--out-dir", str(cert_dir)]
        )
        == 0
    )
    assert stat.S_IMODE((cert_dir / "gateway.key").stat().st_mode) == 0o600


def test_import_refuses_a_certificate_of_another_key(tmp_path: Path) -> None:
    ca = certs.DemoCA(tmp_path)
    a, b = ca.issue("a", "a"), ca.issue("b", "b")
    with pytest.raises(ConfigError, match="does not belong to the key"):
        certs.import_pair(a.cert, b.key, tmp_path / "out")


def test_expiry_is_reported_and_warned_30_days_ahead(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = certs.DemoCA(tmp_path)
    now = dt.datetime.now(dt.UTC)
    soon = ca.issue("soon", "soon", valid_until=now + dt.timedelta(days=10))
    gone = ca.issue(
        "gone", "gone", valid_from=now - dt.timedelta(days=60), valid_until=now - dt.timedelta(days=1)
    )
    fine = ca.issue("fine", "fine")
    assert certs.expiry_message(certs.cert_info(fine.cert)) is None
    expired, text = certs.expiry_message(certs.cert_info(soon.cert)) or (None, "")
    assert expired is False
    assert "in 10 day(s)" in text
    expired, text = certs.expiry_message(certs.cert_info(gone.cert)) or (None, "")
    assert expired is True
    assert "renew it" in text
    assert commands_main(["provision", "show", "--cert", str(gone.cert)]) == 1
    assert "expired on" in capsys.readouterr().out
    from gateway.uplink.mqtt import check_certificates  # noqa: PLC0415

    lines = check_certificates(
        MqttSection(host="h", ca_file=ca.ca_file, cert_file=soon.cert, key_file=soon.key)
    )
    assert len(lines) == 2
    assert "expires on" in lines[0]
    assert "valid until" in lines[1]


def test_tls_context_always_verifies(tmp_path: Path) -> None:
    ca = certs.DemoCA(tmp_path)
    gw = ca.issue("gw", "gw")
    gw.key.chmod(0o600)
    ctx = tls.client_context(
        MqttSection(
            host="h",
            ca_file=ca.ca_file,
            cert_file=gw.cert,
            key_file=gw.key,
            alpn=["x-amzn-mqtt-ca"],
            server_name="broker.example",
        )
    )
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.server_name == "broker.example"
    with pytest.raises(ConfigError, match="cannot load the CA bundle"):
        tls.client_context(MqttSection(host="h", ca_file=tmp_path / "missing.pem"))


@pytest.mark.parametrize(
    ("text", "kind", "words"),
    [
        (
            "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate required",
            AuthError,
            "none is configured",
        ),
        (
            "[SSL: SSLV3_ALERT_CERTIFICATE_EXPIRED] sslv3 alert certificate expired",
            AuthError,
            "as expired: renew",
        ),
        ("[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca", AuthError, "does not trust the CA"),
        ("[SSL: WRONG_VERSION_NUMBER] wrong version number", ConfigError, "does not speak TLS"),
    ],
)
def test_openssl_reasons_map_to_what_to_do(text: str, kind: type[Exception], words: str) -> None:
    err = tls.from_text(text, MqttSection(host="h"))
    assert isinstance(err, kind)
    assert words in str(err)


def test_network_failures_are_transient() -> None:
    c = MqttSection(host="h")
    assert isinstance(tls.classify(ConnectionRefusedError(), c), TransientError)
    assert isinstance(tls.classify(TimeoutError(), c), TransientError)
    assert "the broker is not listening" in str(tls.classify(ConnectionRefusedError(), c))


def test_a_broker_certificate_not_valid_yet_names_the_clock_and_is_reported_once() -> None:
    c = MqttSection(host="h")
    valid_from = dt.datetime(2026, 12, 5, 3, 20, 41, tzinfo=dt.UTC)
    err = tls.verification_error(_not_yet_valid(), c)
    assert isinstance(err, ClockBehindError)
    assert isinstance(err, TransientError)
    assert "the broker certificate or its CA is not valid yet: the clock is behind; check NTP" in str(err)
    first = tls.clock_behind(c, valid_from, valid_from - dt.timedelta(days=2))
    assert str(first).startswith(
        "uplink mqtt h:8883: TLS handshake refused: the gateway's clock reads 2026-12-03 03:20:41 UTC, "
        "the broker certificate is valid from 2026-12-05 03:20:41 UTC: the clock is behind; check NTP/time sync"
    )
    # The clock's reading changes at every attempt; what the log says once does not.
    later = tls.clock_behind(c, valid_from, valid_from - dt.timedelta(days=1))
    assert str(later) != str(first)
    assert transport.reported_as(later) == transport.reported_as(first) != transport.reported_as(err)
    # edgetwin check --online splits a failure at its last ": " into what and what to do.
    assert str(first).rpartition(": ")[2].startswith("the clock is behind; check NTP/time sync")


def _not_yet_valid() -> ssl.SSLCertVerificationError:
    exc = ssl.SSLCertVerificationError(1, "certificate verify failed: certificate is not yet valid")
    exc.verify_code = 9  # X509_V_ERR_CERT_NOT_YET_VALID
    exc.verify_message = "certificate is not yet valid"
    return exc


def test_uplink_topics_and_preflight_follow_the_profile(tmp_path: Path) -> None:
    from gateway.outbox import AsyncOutbox, Outbox  # noqa: PLC0415
    from gateway.uplink.mqtt import MqttUplink  # noqa: PLC0415

    outbox = AsyncOutbox(lambda: Outbox(tmp_path / "ob.db"))  # not opened: topics need no outbox
    generic = MqttUplink(outbox, MqttSection(host="b"), GW)
    assert generic.status_topic == f"edgetwin/v1/{GW}/status"
    assert generic.preflight() == []
    azure = MqttUplink(outbox, MqttSection(host="b", profile="azure", protocol="3.1.1", azure_hub="hub"), GW)
    assert azure._topic("features/x", {"seq": "1"}).startswith(
        f"devices/{GW}/messages/events/topic=features%2Fx"
    )
    plain = MqttUplink(outbox, MqttSection(host="10.1.2.3", tls=False, allow_insecure=True), GW)
    (warning,) = plain.preflight()
    assert "clear text" in warning
    with pytest.raises(ConfigError, match=r"keepalive 10 s outside 30\.\.1200 s"):
        MqttUplink(outbox, MqttSection(host="b", profile="aws", keepalive_s=10), GW).preflight()
