"""The downlink on Azure IoT Hub's device-twin topics: the mapping (pure) and a gateway against a hub peer.

The hub is played by a test peer on the real TLS mosquitto (topics only, ``azure_hub.py``): it
holds the twin, answers the gateway's twin reads and reported patches and calls direct methods.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from azure_hub import AzureHub, AzureSite
from bundle_support import LOOSE_HEALTH, PUMP, PUMP_SITE, card_for, onnx_model
from downlink_support import broker_running, new_site, renewal_pki, source
from test_downlink_models import sign
from uplink_support import mosquitto_pki, running_broker

from gateway.cli import main
from gateway.downlink.azure import (
    CHUNK_CHARS,
    desired_patch,
    merge_patch,
    pack,
    patch_diff,
    twin_safe,
    unpack,
)
from gateway.downlink.renewal import sign_csr
from gateway.downlink.signing import sign as sign_envelope
from gateway.uplink.certs import DemoPKI


def test_an_envelope_rides_in_strings_of_at_most_4000_characters_and_comes_back_whole() -> None:
    envelope = json.dumps({"signed": {"v": 1}, "content": "x" * 9000}, indent=1).encode()
    packed = pack(envelope)
    assert packed["n"] == 3
    assert all(len(packed[str(i)]) <= CHUNK_CHARS for i in range(3))
    assert json.loads(unpack(packed)) == json.loads(envelope)
    # A longer value left behind by an earlier patch (merge semantics) is not read: "n" says how many.
    assert unpack({**packed, "3": "stale"}) == unpack(packed)
    # Anything else is handed on as its JSON text, for the verifier to refuse as malformed.
    assert unpack("junk") == b'"junk"'
    assert unpack({"n": 2, "0": "a"}) == b'{"n": 2, "0": "a"}'
    with pytest.raises(ValueError, match="over IoT Hub's 32768 bytes"):
        desired_patch("config", json.dumps({"content": "y" * 40000}).encode())


def test_the_twin_tool_refuses_what_is_not_an_envelope(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "x.toml").write_text("[gateway]\n")
    assert main(["twin", "azure-desired", str(tmp_path / "x.toml")]) == 78
    assert "give an envelope from 'twin sign-config'" in capsys.readouterr().err


def test_merge_patches_as_the_hub_applies_them_and_diffs_that_remove_keys() -> None:
    old = {"units": {"a": "running", "b": "running"}, "phase": "running"}
    new = {"units": {"a": "running"}, "phase": "applying"}
    patch = patch_diff(old, new)
    assert patch == {"units": {"b": None}, "phase": "applying"}
    assert merge_patch(old, patch) == new
    assert patch_diff(new, new) == {}
    assert twin_safe({"refused": [{"x.y": 1}], "$k": None}) == {"refused": {"0": {"x_y": 1}}, "_k": None}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DemoPKI:
    return mosquitto_pki(tmp_path_factory)


@pytest.fixture
def site(tmp_path: Path, pki: DemoPKI) -> Iterator[AzureSite]:
    for broker in running_broker(tmp_path, pki):
        plain = new_site(tmp_path, pki, broker)
        s = AzureSite(tmp_path, pki, broker, plain.config, plain.key, plain.gateway)
        s.config.write_text(s.text(source("bed7-sim")))
        try:
            yield s
        finally:
            s.stop()


def _newest_refusal(rep: dict[str, Any]) -> dict[str, Any]:
    refused = rep.get("refused") or {}
    return refused[max(refused, key=int)] if refused else {}


@pytest.mark.slow
def test_desired_state_reported_state_and_methods_over_the_device_twin(site: AzureSite) -> None:
    hub = AzureHub(site.twin)
    try:
        # Offline: three revisions land in the twin one after the other; only the newest is there.
        for version in (1, 2, 3):
            extra = source(f"bed{version + 10}-sim", device=f"A4:C1:38:00:00:{version + 10}")
            hub.patch_desired(
                desired_patch("config", site.envelope(version, source("bed7-sim") + extra)), send=False
            )
        hub.refuse_gets = 2  # throttled: the gateway asks again, backing off
        site.start()
        rep = hub.wait(lambda r: (r.get("applied") or {}).get("version") == 3, "v3 applied")
        rep = hub.wait(
            lambda r: (r.get("units") or {}).get(site.unit("bed13-sim")) == "running", "bed13 running"
        )
        assert site.unit("bed11-sim") not in rep["units"]
        # Two refused, then the twin read on connecting; the new source was started in place, so
        # the session (and the twin read) did not have to start over.
        assert hub.gets >= 3
        assert rep["applied"]["applied_by"] == "units"
        assert [(e["event"], e.get("version")) for e in site.events()] == [
            ("received", None),
            ("verified", 3),
            ("applying", 3),
            ("applied", 3),
        ]
        # The twin's $version is not trusted: a patch with a higher $version carrying an older
        # signed version is refused as a rollback.
        older = sign_envelope(
            site.text(source("bed7-sim")).encode(),
            keys=[site.key],
            gateway=site.gateway,
            version=2,
            expires=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1),
        )
        twin_version = hub.patch_desired(desired_patch("config", older))
        assert twin_version > 3
        rep = hub.wait(lambda r: _newest_refusal(r).get("reason") == "rollback", "the replay refused")
        assert rep["applied"]["version"] == 3
        # A new revision as a live patch is applied; the units the old one had are nulled in the twin.
        # With the twin tool's patch, as an operator would feed it to the hub's twin update.
        (site.tmp / "v4.envelope").write_bytes(site.envelope(4, source("bed7-sim")))
        cli = ["twin", "azure-desired", str(site.tmp / "v4.envelope"), "--out", str(site.tmp / "v4.json")]
        assert main(cli) == 0
        gets = hub.gets
        hub.patch_desired(json.loads((site.tmp / "v4.json").read_text()), skip=1)  # one patch missed
        rep = hub.wait(lambda r: (r.get("applied") or {}).get("version") == 4, "v4 applied")
        assert hub.gets > gets  # the gap in $version made it read the whole twin again
        rep = hub.wait(
            lambda r: site.unit("bed13-sim") not in (r.get("units") or {}), "bed13 gone from the twin"
        )
        # Direct methods: the generic commands, with a status.
        assert hub.call("report")[0] == 200
        assert hub.call("rebirth")[0] == 200
        status, body = hub.call("format-disk")
        assert (status, body["method"]) == (404, "format-disk")
    finally:
        hub.stop()


@pytest.mark.slow
@pytest.mark.campaign
def test_a_certificate_is_renewed_over_the_device_twin(tmp_path: Path) -> None:
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(days=5)  # inside the default 30 days
    ca, _, pki = renewal_pki(tmp_path / "pki", valid_until=soon)
    with broker_running(tmp_path, pki) as broker:
        plain = new_site(tmp_path, pki, broker)
        site = AzureSite(tmp_path, pki, broker, plain.config, plain.key, plain.gateway)
        site.config.write_text(site.text(source("bed7-sim")))
        hub = AzureHub(site.twin)
        try:
            site.start()
            rep = hub.wait(lambda r: bool(r.get("csr")), "the CSR in the reported property")
            assert rep["certificate"]["renewal"] == "csr sent"
            pem = sign_csr(rep["csr"].encode(), ca.cert, ca.key, days=90, gateway=site.gateway)
            (tmp_path / "new.crt").write_bytes(pem)
            assert (
                main(
                    [
                        "twin",
                        "azure-desired",
                        str(tmp_path / "new.crt"),
                        "--cert",
                        "--out",
                        str(tmp_path / "c.json"),
                    ]
                )
                == 0
            )
            hub.patch_desired(json.loads((tmp_path / "c.json").read_text()))
            # The new pair is reported "on trial" first (the CSR already gone), then, once it has
            # connected, the trial is removed: null in a twin patch removes the property.
            rep = hub.wait(
                lambda r: (
                    (r.get("certificate") or {}).get("days_left", 0) > 80
                    and "csr" not in r
                    and "renewal" not in r["certificate"]
                ),
                "renewed, connected, the CSR and the trial gone from the twin",
            )
            assert pki.gateway.cert.read_bytes() == pem
            assert [e["event"] for e in site.events()] == [
                "csr-made",
                "received",
                "cert-installed",
                "cert-connected",
            ]
        finally:
            hub.stop()
            site.stop()


def _pump(rep: dict[str, Any]) -> dict[str, Any]:
    return dict((rep.get("models") or {}).get(PUMP) or {})


@pytest.mark.slow
def test_a_model_bundle_over_the_twin_and_c2d_messages_cut_short_resumed_with_the_missing_chunks(
    site: AzureSite,
) -> None:
    site.config.write_text(site.text(PUMP_SITE))
    hub = AzureHub(site.twin)
    model = onnx_model(pad_bytes=7000)
    rules = {"windows": 3, "max_latency_us": 1e9, "min_agreement": 0.0}
    envelope, path = sign(site, model, card_for(model, health=LOOSE_HEALTH), 2, rules, "--profile", "azure")
    d = envelope.parent
    make = ["twin", "azure-model", "--envelope", str(envelope), "--model", str(path)]
    assert main([*make, "--out-dir", str(d / "all")]) == 0
    listing = json.loads((d / "all" / "messages.json").read_text())
    assert len(listing) == 8
    try:
        site.start()
        hub.wait(lambda r: _pump(r).get("active") == 0, "the pump model serving")
        hub.patch_desired(json.loads((d / "all" / "desired.json").read_text()))
        # The chunks go once the gateway reports the transfer (a C2D message before it is dropped).
        hub.wait(lambda r: (_pump(r).get("transfer") or {}).get("version") == 2, "the manifest verified")
        # The twin's sending stops after four chunks, and one of them was altered on the way.
        cut = d / "cut"
        cut.mkdir()
        for entry in listing[:5]:
            data = (d / "all" / entry["file"]).read_bytes()
            (cut / entry["file"]).write_bytes(data if entry is not listing[3] else b"z" * len(data))
        (cut / "messages.json").write_text(json.dumps(listing[:5]))
        assert hub.send_c2d(site.gateway, cut) == 5
        rep = hub.wait(
            lambda r: (
                (_pump(r).get("transfer") or {}).get("have") == 4
                and _pump(r)["transfer"]["refused_chunks"] == 1
            ),
            "four chunks kept, the altered one refused",
        )
        assert list(_pump(rep)["transfer"]["missing"].values()) == [3, 5, 6, 7]  # a twin keeps no arrays
        assert _pump(rep).get("candidate") is None  # null: removed from the twin
        site.stop()
        site.start()  # the chunks it had are in its quarantine; the twin's manifest is read again
        hub.wait(
            # Two entries more in the audit log: the new run verified the manifest again.
            lambda r: (_pump(r).get("transfer") or {}).get("have") == 4 and r["audit"]["count"] == 4,
            "the transfer resumed after the restart",
        )
        # The twin sends again only what the reported property lists as missing.
        (site.tmp / "twin.json").write_text(json.dumps({"properties": {"reported": hub.reported}}))
        again = d / "again"
        assert main([*make, "--out-dir", str(again), "--missing-from", str(site.tmp / "twin.json")]) == 0
        assert [m["properties"]["et_chunk"] for m in json.loads((again / "messages.json").read_text())] == [
            "3", "5", "6", "7",
        ]  # fmt: skip
        assert hub.send_c2d(site.gateway, again) == 4
        rep = hub.wait(lambda r: (_pump(r).get("candidate") or {}).get("version") == 2, "v2 in shadow")
        assert "transfer" not in _pump(rep)
        steps = [(e["event"], e.get("version")) for e in site.events()]
        assert steps[:5] == [
            ("received", None),
            ("verified", 2),
            ("received", None),  # after the restart: the twin's manifest again, verified again
            ("verified", 2),
            ("model-shadow", 2),
        ]
        installed = site.tmp / "state" / "models" / "bundles" / PUMP / "v2" / "pump_skab.v2.onnx"
        assert installed.read_bytes() == model
    finally:
        hub.stop()


def test_reported_properties_the_hub_refuses_are_sent_again(site: AzureSite) -> None:
    hub = AzureHub(site.twin)
    try:
        # Throttled: the first two reported patches answered 429 and not merged. The first carried
        # the whole reported state (trust, process); later ones only what changed since.
        hub.refuse_patches = 2
        site.start()
        rep = hub.wait(
            lambda r: (r.get("trust") or {}).get("keys") and (r.get("process") or {}).get("started_at"),
            "the state of the refused patches at the hub",
        )
        assert rep["phase"] == "running"
        assert (rep.get("units") or {}).get(site.unit("bed7-sim")) == "running"
        assert "bed7-sim" not in json.dumps(rep).lower()  # the bed's source by its pseudonym only
        assert hub.patches >= 3
        assert "reported properties refused by the hub: status 429" in (site.tmp / "gateway.log").read_text()
    finally:
        hub.stop()
