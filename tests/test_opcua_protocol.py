"""OPC UA pure parts: StatusCode -> quality, values, timestamps, names, config, snippets, PKI files."""

from __future__ import annotations

import datetime as dt
import math
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from durability import synced_during
from pydantic import ValidationError

from drivers.opcua.config import OpcUaConfig, is_loopback
from drivers.opcua.pki import Pki, generate_certificate, load_certificate, thumbprint
from drivers.opcua.protocol import (
    ScannedNode,
    ScannedVariable,
    Stamper,
    config_snippet,
    metric_name_for_path,
    parse_browse_path,
    pick_timestamp,
    quality_of,
    render_tree,
    status_numbers,
    status_token,
    to_float,
)
from gateway.sample import Quality

README = Path(__file__).resolve().parent.parent / "drivers" / "opcua" / "README.md"


def test_status_codes_map_to_quality_flags() -> None:
    assert quality_of(0) == Quality.GOOD
    assert quality_of(0x80340000) == Quality.BAD_STATUS  # BadNodeIdUnknown
    assert quality_of(0x808C0000) == Quality.BAD_STATUS  # BadSensorFailure
    assert quality_of(0x40930000) == Quality.UNCERTAIN  # UncertainSensorNotAccurate
    assert quality_of(0x40900000) == Quality.UNCERTAIN | Quality.IMPUTED  # UncertainLastUsableValue
    assert quality_of(0x00960000) == Quality.IMPUTED  # GoodLocalOverride
    # The low bits (info type, limits) do not change the condition.
    assert quality_of(0x40900000 | 0x0400 | 0x0100) == Quality.UNCERTAIN | Quality.IMPUTED


def test_status_tokens_are_short_lowercase_tokens() -> None:
    token = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
    assert status_token(0x80340000) == "bad_nodeidunknown"
    assert status_token(0x40900000) == "uncertain_lastusablevalue"
    assert status_token(0) == "good"
    for code in (0x80340000, 0x808C0000, 0x801F0000, 0x81130000, 0x80AB0000, 0x9FFF0000, 0x40000000):
        assert token.match(status_token(code)), status_token(code)


def test_status_numbers_map_every_token_back_to_its_code() -> None:
    numbers = status_numbers()
    assert numbers["bad_nodeidunknown"] == 0x80340000
    assert numbers["uncertain_lastusablevalue"] == 0x40900000
    assert numbers["good"] == 0
    assert len(numbers) > 200  # asyncua's whole table
    assert all(status_token(code) == token for token, code in numbers.items())


def test_values_become_floats_or_none() -> None:
    assert to_float(1.5) == 1.5
    assert to_float(7) == 7.0
    assert to_float(True) == 1.0
    assert to_float(False) == 0.0
    assert math.isnan(to_float(None) or 0.0)
    assert to_float("1.5") is None
    assert to_float([1.0, 2.0]) is None


def test_timestamp_choice_prefers_a_sane_source_clock() -> None:
    now = 1_700_000_000.0
    assert pick_timestamp(now - 0.2, now - 0.1, now, 300) == now - 0.2
    assert pick_timestamp(now - 3600, now - 0.1, now, 300) == now - 0.1  # PLC clock an hour off
    assert pick_timestamp(None, now - 0.1, now, 300) == now - 0.1
    assert pick_timestamp(now - 3600, now + 3600, now, 300) is None  # both off: gateway time
    assert pick_timestamp(None, None, now, 300) is None


def test_stamper_spreads_queued_values_and_ignores_clock_offset() -> None:
    st = Stamper(max_age_s=2.0)
    offset = 3600.0  # the PLC clock runs an hour behind; only differences matter
    st.batch(1000.0)
    assert st.age(1000.0 - offset - 0.01, 1000.0) == 0.0  # first value defines the offset
    st.batch(1001.0)
    # three values queued on the server 100 ms apart, delivered together
    ages = [st.age(1001.0 - offset - 0.01 - d, 1001.0) for d in (0.2, 0.1, 0.0)]
    assert ages == pytest.approx([0.2, 0.1, 0.0], abs=2e-3)  # less the 1 ms/s creep
    assert st.age(1001.0 - offset - 60.0, 1001.0) == 2.0  # capped


def test_browse_paths_and_metric_names() -> None:
    segs = parse_browse_path("Objects/2:Pump1/2:Motor/Current")
    assert [(s.ns, s.name) for s in segs] == [(2, "Pump1"), (2, "Motor"), (None, "Current")]
    assert metric_name_for_path("0:Objects/2:Pump1/2:Motor/2:Current") == "Pump1/Motor/Current"


def _cfg(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "endpoint": "opc.tcp://127.0.0.1:4840",
        "security_policy": "None",
        "security_mode": "None",
        "nodes": [{"browse_path": "2:Pump1/2:Current"}],
    }
    base.update(over)
    return base


def test_config_rules() -> None:
    OpcUaConfig.model_validate(_cfg())
    with pytest.raises(ValidationError, match="unencrypted"):
        OpcUaConfig.model_validate(_cfg(endpoint="opc.tcp://10.1.2.3:4840"))
    OpcUaConfig.model_validate(_cfg(endpoint="opc.tcp://10.1.2.3:4840", allow_insecure=True))
    with pytest.raises(ValidationError, match="policy None goes with mode None"):
        OpcUaConfig.model_validate(_cfg(security_mode="Sign"))
    with pytest.raises(ValidationError, match="exactly one"):
        OpcUaConfig.model_validate(_cfg(nodes=[{"browse_path": "2:A", "node_id": "ns=2;s=A"}]))
    with pytest.raises(ValidationError, match="not an OPC UA NodeId"):
        OpcUaConfig.model_validate(_cfg(nodes=[{"node_id": "Pump1.Current"}]))
    with pytest.raises(ValidationError, match="namespace_uri"):
        OpcUaConfig.model_validate(_cfg(nodes=[{"browse_path": "Pump1/Current"}]))
    with pytest.raises(ValidationError, match="go together"):
        OpcUaConfig.model_validate(_cfg(username="op"))
    with pytest.raises(ValidationError, match="credentials in the URL"):
        OpcUaConfig.model_validate(_cfg(endpoint="opc.tcp://op:pw@127.0.0.1:4840"))
    with pytest.raises(ValidationError):
        OpcUaConfig.model_validate(_cfg(sampling_interval_ms="100"))  # strict: TOML has numbers
    assert is_loopback("127.0.0.2")
    assert is_loopback("localhost")
    assert not is_loopback("10.0.0.1")


def test_readme_sample_validates() -> None:
    block = re.search(r"```toml\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL)
    assert block
    for source in tomllib.loads(block.group(1))["sources"]:
        own = {k: v for k, v in source.items() if k not in ("name", "driver", "subject", "kind", "enabled")}
        assert source["driver"] == "opcua"
        OpcUaConfig.model_validate(own)


def _var(path: str, numeric: bool = True, unit: str | None = "A") -> ScannedVariable:
    return ScannedVariable(path, "ns=2;s=x", "Double" if numeric else "String", numeric, unit, "1.5", 2)


def test_config_snippet_is_a_valid_source() -> None:
    text = config_snippet(
        endpoint="opc.tcp://127.0.0.1:4840/",
        name="plc",
        subject="pump-3",
        variables=[_var("2:Pump1/2:Motor/2:Current"), _var("2:Pump1/2:Info/2:Serial", numeric=False)],
        security_policy="None",
        security_mode="None",
    )
    source = tomllib.loads(text)["sources"][0]
    own = {k: v for k, v in source.items() if k not in ("name", "driver", "subject", "kind")}
    cfg = OpcUaConfig.model_validate(own)
    assert [n.browse_path for n in cfg.nodes] == ["2:Pump1/2:Motor/2:Current"]  # the string is left out
    with pytest.raises(ValueError, match="no numeric variable"):
        config_snippet(
            endpoint="opc.tcp://127.0.0.1:4840/",
            name="plc",
            subject="s",
            variables=[_var("2:X", numeric=False)],
            security_policy="None",
            security_mode="None",
        )


def test_tree_rendering_shows_types_units_and_non_numeric() -> None:
    nodes = [
        ScannedNode("2:Pump1", "ns=2;s=Pump1", "Object", 0),
        ScannedNode("2:Pump1/2:Current", "ns=2;s=c", "Variable", 1, _var("2:Pump1/2:Current")),
        ScannedNode("2:Pump1/2:Serial", "ns=2;s=s", "Variable", 1, _var("2:Pump1/2:Serial", False, None)),
    ]
    lines = render_tree(nodes).splitlines()
    assert lines[0].startswith("2:Pump1  [Object]")
    assert lines[1] == "  2:Current = 1.5 A  [Double]  ns=2;s=c"
    assert "not numeric" in lines[2]


def test_the_gateway_s_own_key_and_certificate_are_each_synced_before_they_are_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A power cut at the first start must not leave a torn certificate: the next start would make
    # a new key pair, and every PLC that trusted the first would refuse the gateway.
    pki = Pki(tmp_path / "pki")
    synced = synced_during(monkeypatch, lambda: pki.ensure_own(application_uri="urn:test:gw", hostname="gw"))
    own = pki.own_cert.parent
    assert synced == [
        own / "private" / ".key.pem.tmp",
        own / "private",
        own / ".cert.der.tmp",
        own,
    ]
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    key = serialization.load_pem_private_key(pki.own_key.read_bytes(), None)
    assert load_certificate(pki.own_cert).public_key().public_bytes(*spki) == key.public_key().public_bytes(
        *spki
    )


def test_pki_trusts_exact_certificates_and_their_issuers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pki = Pki(tmp_path / "pki")
    own_cert, own_key = pki.ensure_own(application_uri="urn:test:gw", hostname="gw")
    assert own_key.stat().st_mode & 0o777 == 0o600
    assert pki.ensure_own(application_uri="urn:test:gw", hostname="gw") == (own_cert, own_key)
    first = own_cert.read_bytes()
    pki.ensure_own(application_uri="urn:test:gw", hostname="gw")
    assert own_cert.read_bytes() == first  # not regenerated on every start

    server = generate_certificate(
        tmp_path / "s.der",
        tmp_path / "s.pem",
        application_uri="urn:plc",
        hostname="127.0.0.1",
        common_name="plc",
    )
    der = server.public_bytes(serialization.Encoding.DER)
    verdict = pki.verdict(der)
    assert not verdict.trusted
    assert verdict.reason == "untrusted"
    # Rejected and trusted copies are whole after a power cut: each synced, renamed, folder synced.
    synced = synced_during(monkeypatch, lambda: pki.reject(der))
    (saved,) = pki.rejected()
    assert synced == [saved.with_name(f".{saved.name}.tmp"), pki.rejected_dir]
    assert thumbprint(der) in saved.name
    assert pki.find_rejected(thumbprint(der)[:10]) == saved
    trusted: list[Path] = []
    synced = synced_during(monkeypatch, lambda: trusted.append(pki.trust(saved)))
    (moved,) = trusted
    assert synced == [moved.with_name(f".{moved.name}.tmp"), pki.trusted_dir]
    assert not saved.exists()
    assert moved.parent == pki.trusted_dir
    assert pki.verdict(der).trusted
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=20 * 365)
    assert pki.verdict(der, now=later).reason == "expired"

    # A server certificate issued by a CA in trusted/ is accepted without being listed itself.
    ca_key_path = tmp_path / "ca.pem"
    ca = generate_certificate(
        tmp_path / "ca.der",
        ca_key_path,
        application_uri="urn:ca",
        hostname="ca",
        common_name="plant CA",
        ca=True,
    )
    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)

    assert isinstance(ca_key, rsa.RSAPrivateKey)
    issued = generate_certificate(
        tmp_path / "i.der",
        tmp_path / "i.pem",
        application_uri="urn:plc2",
        hostname="plc2",
        common_name="plc2",
        issuer=(ca, ca_key),
    )
    issued_der = issued.public_bytes(serialization.Encoding.DER)
    assert not pki.verdict(issued_der).trusted
    pki.trust(tmp_path / "ca.der")
    assert pki.verdict(issued_der).trusted
    assert load_certificate(tmp_path / "ca.der").subject == ca.subject
