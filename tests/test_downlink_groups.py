"""Groups in the signed envelope (each gateway checks it is a member) and the rollout's verdicts (pure)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.cli import main
from gateway.downlink.errors import RefusedError, TrustError
from gateway.downlink.rollout import DONE, HALTED, WAITING, Sent, judge, stale
from gateway.downlink.signing import Group, Trust, key_id, public_hex, sign, targets, verify

NOW = dt.datetime(2026, 12, 3, 12, 0, tzinfo=dt.UTC)
KEY = Ed25519PrivateKey.generate()
TRUST = Trust.from_json({"keys": {key_id(KEY.public_key()): public_hex(KEY.public_key())}}, "test")
WARD = Group("ward3", ("gwaaaaaaaaaaaaaa", "gwbbbbbbbbbbbbbb"))


def _env(version: int, *, group: Group | None = WARD, gateway: str = "") -> bytes:
    expires = NOW + dt.timedelta(days=1)
    return sign(b"x", keys=[KEY], gateway=gateway, version=version, expires=expires, group=group)


def test_a_member_takes_a_group_envelope_and_a_gateway_outside_refuses_it_its_counter_untouched() -> None:
    env = _env(5)
    assert json.loads(env)["signed"]["group"] == "ward3"
    assert targets(json.loads(env)["signed"]) == list(WARD.members)
    for member in WARD.members:
        assert verify(env, TRUST, gateway=member, accepted_version=4, now=NOW).version == 5
    with pytest.raises(RefusedError) as info:
        verify(env, TRUST, gateway="gwcccccccccccccc", accepted_version=0, now=NOW)
    assert info.value.reason == "not-in-group"
    assert "group 'ward3' of 2 gateway(s)" in str(info.value)
    # The refusal is decided before the version: the outsider's own, lower revision is still taken.
    own = _env(2, group=None, gateway="gwcccccccccccccc")
    assert verify(own, TRUST, gateway="gwcccccccccccccc", accepted_version=0, now=NOW).version == 2
    # The member list is signed: a gateway added to it afterwards breaks the signature.
    forged = json.loads(env)
    forged["signed"]["gateway"].append("gwcccccccccccccc")
    with pytest.raises(RefusedError) as info:
        verify(json.dumps(forged).encode(), TRUST, gateway="gwcccccccccccccc", accepted_version=0, now=NOW)
    assert info.value.reason == "bad-signature"


def test_group_files_name_each_pseudonym_once(tmp_path: Path) -> None:
    path = tmp_path / "ward3.txt"
    path.write_text("# ward 3, east wing\ngwaaaaaaaaaaaaaa\n\n gwbbbbbbbbbbbbbb  # bed 12\n")
    assert Group.load(path) == WARD
    for text, why in (("", "empty"), ("gwa\ngwa\n", "twice"), ("*\n", "not a pseudonym"), ("a/b\n", "'a/b'")):
        path.write_text(text)
        with pytest.raises(TrustError, match=why):
            Group.load(path)


def test_sign_config_for_a_group_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["twin", "keygen", "--out-dir", str(tmp_path)]) == 0
    (tmp_path / "ward3.txt").write_text("\n".join(WARD.members) + "\n")
    (tmp_path / "c.toml").write_text("[gateway]\n")
    cli = ["twin", "sign-config", "--config", str(tmp_path / "c.toml"), "--key", str(tmp_path / "twin.key")]
    cli += ["--version", "3", "--group", str(tmp_path / "ward3.txt"), "--out", str(tmp_path / "e")]
    assert main(cli) == 0
    assert "group ward3 (2 gateways)" in capsys.readouterr().out
    signed = json.loads((tmp_path / "e").read_bytes())["signed"]
    assert (signed["gateway"], signed["group"]) == (list(WARD.members), "ward3")
    # publish-config refuses a gateway the envelope does not name, before it connects anywhere.
    cli = ["twin", "publish-config", "--gateway", "gwcccccccccccccc", "--envelope", str(tmp_path / "e")]
    assert main([*cli, "--broker", "127.0.0.1:1"]) == 78
    assert "is signed for ward3, not gwcccccccccccccc" in capsys.readouterr().err


RUNNING: dict[str, Any] = {
    "phase": "running",
    "pending": None,
    "units": {"source:a": "running"},
    "refused": [],
    "accepted": 2,
}


def test_the_rollout_judges_a_config_revision_applied_refused_or_rolled_back() -> None:
    sent = Sent("config", 3)
    before = {**RUNNING, "applied": {"version": 2}}
    assert judge(sent, before, before)[0] == WAITING
    assert judge(sent, {}, before) == (WAITING, "no reported state")
    probation = {**before, "phase": "applying", "pending": {"version": 3}}
    assert judge(sent, probation, before) == (WAITING, "applying, applied v2, v3 on probation")
    assert judge(sent, {**before, "applied": {"version": 3}}, before) == (DONE, "applied, healthy")
    failed = {**before, "applied": {"version": 3}, "units": {"source:a": "failed"}}
    assert judge(sent, failed, before) == (HALTED, "unit(s) source:a not running")
    down = {**before, "units": {"source:a": "retrying"}}  # down before the send: excused
    assert judge(sent, failed, down) == (DONE, "applied, healthy")
    rolled = {
        **before,
        "last_rollback": {"version": 3, "reason": "unhealthy", "units": ["source:a"]},
        "refused": [{"version": 3, "reason": "rolled-back", "at": "2026-12-03T12:00:00Z"}],
    }
    assert judge(sent, rolled, before) == (HALTED, "v3 rolled back: unhealthy (source:a)")
    refusal = {"version": None, "reason": "not-in-group", "at": "2026-12-03T12:00:00Z"}
    assert judge(sent, {**before, "refused": [refusal]}, before) == (HALTED, "v3 refused: not-in-group")
    # A refusal the gateway had already made before the send is not this one's.
    assert judge(sent, {**before, "refused": [refusal]}, {**before, "refused": [refusal]})[0] == WAITING
    assert stale(sent, before) is None
    assert stale(sent, {**before, "accepted": 3}) == "already accepted revision 3"


def test_the_rollout_judges_a_model_bundle_promoted_or_rejected() -> None:
    sent = Sent("model", 4, "pump_skab")

    def rep(**model: object) -> dict[str, object]:
        return {**RUNNING, "models": {"pump_skab": {"active": 3, **model}}}

    before = rep(last={"version": 3, "outcome": "promoted"})
    assert stale(sent, before) is None
    assert stale(sent, rep(last={"version": 4, "outcome": "rejected"})) == "already has model pump_skab v4"
    assert judge(sent, rep(transfer={"version": 4, "have": 2, "of": 8}), before) == (
        WAITING,
        "receiving 2/8 chunks",
    )
    assert judge(sent, rep(last={"version": 4, "outcome": "shadow"}), before)[0] == WAITING
    assert judge(sent, rep(active=4, last={"version": 4, "outcome": "promoted"}), before) == (
        DONE,
        "promoted",
    )
    rejected = rep(last={"version": 4, "outcome": "rejected", "reason": "alarm-rate"})
    assert judge(sent, rejected, before) == (HALTED, "model pump_skab v4 rejected: alarm-rate")
