"""Signed config envelopes, one test per attack (docs/downlink.md), and the hash-chained audit log."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.cli import main
from gateway.downlink import audit
from gateway.downlink.errors import AuditTamperedError, RefusedError, TrustError
from gateway.downlink.signing import Trust, key_id, public_hex, sign, verify, verify_rotation

GW = "gwk3j2x7q9m4t8vb"
NOW = dt.datetime(2026, 12, 3, 12, 0, tzinfo=dt.UTC)
CONTENT = b'[gateway]\nname = "ward3-hub-17"\n'


def _trust(
    *keys: Ed25519PrivateKey, threshold: int = 1, revoked: tuple[Ed25519PrivateKey, ...] = ()
) -> Trust:
    data = {
        "keys": {key_id(k.public_key()): public_hex(k.public_key()) for k in keys},
        "threshold": threshold,
        "revoked": [key_id(k.public_key()) for k in revoked],
    }
    return Trust.from_json(data, "test")


def _env(
    key: Ed25519PrivateKey, version: int = 5, *, days: float = 7, gateway: str = GW, content: bytes = CONTENT
) -> bytes:
    return sign(content, keys=[key], gateway=gateway, version=version, expires=NOW + dt.timedelta(days=days))


def _refused(data: bytes, trust: Trust, accepted: int = 0) -> str:
    with pytest.raises(RefusedError) as info:
        verify(data, trust, gateway=GW, accepted_version=accepted, now=NOW)
    return info.value.reason


def test_a_valid_envelope_gives_its_content() -> None:
    key = Ed25519PrivateKey.generate()
    found = verify(_env(key), _trust(key), gateway=GW, accepted_version=4, now=NOW)
    assert (found.content, found.version, found.keyids) == (CONTENT, 5, (key_id(key.public_key()),))


def test_unsigned_is_refused() -> None:
    key = Ed25519PrivateKey.generate()
    env = json.loads(_env(key))
    env["signatures"] = []
    assert _refused(json.dumps(env).encode(), _trust(key)) == "unsigned"


def test_arbitrary_content_signed_by_an_unknown_key_is_refused() -> None:
    trusted, attacker = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    assert _refused(_env(attacker), _trust(trusted)) == "bad-signature"


def test_metadata_altered_after_signing_is_refused() -> None:
    key = Ed25519PrivateKey.generate()
    env = json.loads(_env(key))
    env["signed"]["version"] = 99  # a bump to get past the anti-rollback counter
    assert _refused(json.dumps(env).encode(), _trust(key)) == "bad-signature"


def test_expired_metadata_is_refused_freeze_attack() -> None:
    key = Ed25519PrivateKey.generate()
    assert _refused(_env(key, days=-1), _trust(key)) == "expired"


def test_a_replayed_older_version_is_refused_rollback_attack() -> None:
    key = Ed25519PrivateKey.generate()
    assert _refused(_env(key, version=3), _trust(key), accepted=4) == "rollback"
    assert _refused(_env(key, version=4), _trust(key), accepted=4) == "rollback"  # the same one again


def test_content_not_matching_the_signed_hash_is_refused_mix_and_match() -> None:
    key = Ed25519PrivateKey.generate()
    env = json.loads(_env(key, version=5))
    other = json.loads(_env(key, version=6, content=b'[gateway]\nname = "evil"\n'))
    env["content"] = other["content"]  # v5's signed metadata with v6's content
    assert _refused(json.dumps(env).encode(), _trust(key)) == "hash-mismatch"
    env["content"] = base64.b64encode(CONTENT[:-3]).decode()  # truncated
    assert _refused(json.dumps(env).encode(), _trust(key)) == "hash-mismatch"


def test_an_envelope_for_another_gateway_is_refused() -> None:
    key = Ed25519PrivateKey.generate()
    assert _refused(_env(key, gateway="gwothergateway01"), _trust(key)) == "wrong-gateway"
    assert verify(_env(key, gateway="*"), _trust(key), gateway=GW, accepted_version=0, now=NOW).version == 5


def test_a_revoked_key_is_refused_and_its_successor_accepted() -> None:
    old, new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    rotated = _trust(old, new, revoked=(old,))
    assert _refused(_env(old), rotated) == "revoked-key"
    assert verify(_env(new), rotated, gateway=GW, accepted_version=0, now=NOW).version == 5


def test_a_threshold_needs_that_many_distinct_trusted_keys() -> None:
    a, b = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    trust = _trust(a, b, threshold=2)
    assert _refused(_env(a), trust) == "bad-signature"
    env = json.loads(_env(a))
    env["signatures"] = env["signatures"] * 2  # the same signature twice is one key
    assert _refused(json.dumps(env).encode(), trust) == "bad-signature"
    both = sign(CONTENT, keys=[a, b], gateway=GW, version=5, expires=NOW + dt.timedelta(days=1))
    assert verify(both, trust, gateway=GW, accepted_version=0, now=NOW).version == 5


def test_malformed_input_is_refused_not_a_crash() -> None:
    trust = _trust(Ed25519PrivateKey.generate())
    for data in (b"", b"not json", b"[]", b'{"signed": {}}', b"\xff" * 10):
        assert _refused(data, trust) == "malformed"


def test_a_trust_file_with_a_wrong_key_id_is_a_config_error(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    path = tmp_path / "trust.json"
    path.write_text(json.dumps({"keys": {"00" * 32: public_hex(key.public_key())}}))
    with pytest.raises(TrustError, match="not the SHA-256 of the key"):
        Trust.load(path)


def test_audit_chain_verifies_and_detects_edits_removals_and_reordering(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = audit.AuditLog(path)
    for event in ("received", "verified", "applying", "applied"):
        log.append(event, version=7, detail="x")
    assert audit.verify(path) == log.head
    assert log.head.count == 4
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    lines = path.read_text().splitlines()

    path.write_text(
        "\n".join([lines[0], lines[1].replace('"version": 7', '"version": 8'), *lines[2:]]) + "\n"
    )
    with pytest.raises(AuditTamperedError, match="line 2: its hash does not match"):
        audit.verify(path)
    path.write_text("\n".join([lines[0], *lines[2:]]) + "\n")
    with pytest.raises(AuditTamperedError, match="line 2: does not follow"):
        audit.verify(path)
    path.write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")
    with pytest.raises(AuditTamperedError, match="line 1"):
        audit.verify(path)
    # A log cut short still verifies by itself: the head the twin saw is what shows it.
    path.write_text("\n".join(lines[:2]) + "\n")
    assert audit.verify(path).hash != log.head.hash


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_audit_verify_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "audit.jsonl"
    log = audit.AuditLog(path)
    log.append("received")
    head = log.append("refused", reason="expired")
    code, out, err = _cli(capsys, "audit", "verify", "--log", str(path), "--expect-head", head.hash[:16])
    assert code == 0, err
    assert f"2 entries, chain intact, head {head.hash}" in out
    code, out, err = _cli(capsys, "audit", "verify", "--log", str(path), "--expect-head", "0123456789abcdef")
    assert code == 1
    assert "is not the head the twin saw" in err
    path.write_text(path.read_text().replace("expired", "valid"))
    code, out, err = _cli(capsys, "audit", "verify", "--log", str(path))
    assert code == 1
    assert "line 2: its hash does not match its content" in err


def test_twin_keygen_sign_config_make_an_envelope_the_gateway_accepts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trust_file = tmp_path / "trust.json"
    code, _, err = _cli(
        capsys, "twin", "keygen", "--out-dir", str(tmp_path / "k"), "--trust", str(trust_file)
    )
    assert code == 0, err
    key = tmp_path / "k" / "twin.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    config = tmp_path / "new.toml"
    config.write_bytes(CONTENT)
    out_file = tmp_path / "v3.envelope"
    sign_args = ["twin", "sign-config", "--config", str(config), "--key", str(key), "--gateway", GW]
    code, _out, err = _cli(capsys, *sign_args, "--version", "3", "--out", str(out_file))
    assert code == 0, err
    now = dt.datetime.now(dt.UTC)
    found = verify(out_file.read_bytes(), Trust.load(trust_file), gateway=GW, accepted_version=2, now=now)
    assert (found.version, found.content) == (3, CONTENT)
    os.chmod(key, 0o644)  # a key others can read is refused
    code, _, err = _cli(capsys, *sign_args, "--version", "4", "--out", str(out_file))
    assert code == 78
    assert f"chmod 600 {key}" in err


def _trust_doc(
    *keys: Ed25519PrivateKey, revoked: tuple[Ed25519PrivateKey, ...] = (), threshold: int = 1
) -> bytes:
    return json.dumps(
        {
            "keys": {key_id(k.public_key()): public_hex(k.public_key()) for k in keys},
            "revoked": [key_id(k.public_key()) for k in revoked],
            "threshold": threshold,
        }
    ).encode()


def test_key_rotation_needs_the_current_keys_and_the_new_ones() -> None:
    old, new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    current = _trust(old)
    doc = _trust_doc(old, new, revoked=(old,))
    expires = NOW + dt.timedelta(days=1)

    def rotation(*keys: Ed25519PrivateKey, version: int = 1) -> bytes:
        return sign(doc, keys=list(keys), gateway=GW, version=version, expires=expires, kind="trust")

    with pytest.raises(RefusedError) as info:  # the new key alone: an attacker's own trust set
        verify_rotation(rotation(new), current, gateway=GW, accepted_version=0, now=NOW)
    assert info.value.reason == "bad-signature"
    with pytest.raises(RefusedError) as info:  # the old key alone: the new set's keys must sign too
        verify_rotation(rotation(old), current, gateway=GW, accepted_version=0, now=NOW)
    assert "signed by 0 of its own keys" in str(info.value)
    found, rotated = verify_rotation(rotation(old, new), current, gateway=GW, accepted_version=0, now=NOW)
    assert found.version == 1
    # After the rotation the old key is revoked and the new one signs config revisions.
    assert _refused(_env(old), rotated) == "revoked-key"
    assert verify(_env(new), rotated, gateway=GW, accepted_version=0, now=NOW).version == 5
    with pytest.raises(RefusedError) as info:  # an older trust set replayed
        verify_rotation(rotation(old, new), current, gateway=GW, accepted_version=1, now=NOW)
    assert info.value.reason == "rollback"


def test_a_trust_set_is_not_taken_as_a_config_nor_the_reverse() -> None:
    key = Ed25519PrivateKey.generate()
    trust_env = sign(
        _trust_doc(key), keys=[key], gateway=GW, version=6, expires=NOW + dt.timedelta(days=1), kind="trust"
    )
    assert _refused(trust_env, _trust(key)) == "wrong-type"
    with pytest.raises(RefusedError) as info:
        verify_rotation(_env(key), _trust(key), gateway=GW, accepted_version=0, now=NOW)
    assert info.value.reason == "wrong-type"
