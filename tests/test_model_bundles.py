"""Model bundles: signed manifest, chunks checked against signed hashes, resumed, staged in shadow - or refused.

The bundle handler is driven directly with the messages the broker would deliver (the MQTT path
itself is in tests/test_downlink_models.py against the TLS mosquitto).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bundle_support import MODELS, PUMP, card_for, litert_card, onnx_model, shipped_int8, tampered_weights
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from model_support import needs_litert
from pydantic import BaseModel, ValidationError, create_model
from test_inference_runtime import commission, pump_model, pump_window

from gateway.cli import main
from gateway.downlink import audit as audit_log
from gateway.downlink.audit import AuditLog
from gateway.downlink.azure import c2d_chunk_topic, twin_safe
from gateway.downlink.bundles import Manifest, ModelBundles, chunk_bytes_for, make_bundle
from gateway.downlink.model_commands import chunk_messages
from gateway.downlink.signing import Trust, canonical, key_id, sign, write_private_key
from gateway.inference.backends import litert_interpreter_class
from gateway.inference.shadow import Acceptance, Slot, open_slots, version_dir

GATEWAY = "gw-test"
ROOT = f"edgetwin/{GATEWAY}"
KEY = Ed25519PrivateKey.generate()


@dataclass
class Gate:
    """A bundle handler as the downlink unit runs it, with its audit log and the refusals it made."""

    tmp: Path
    slot: Slot
    profile: str = "generic"
    handler: ModelBundles = field(init=False)
    audit: AuditLog = field(init=False)
    refused: list[tuple[int | None, str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.audit = AuditLog(self.tmp / "downlink" / "audit.jsonl")
        self.restart()

    def restart(self) -> None:
        (self.tmp / "downlink" / "quarantine").mkdir(parents=True, exist_ok=True)
        self.handler = ModelBundles([self.slot], self.tmp, self.tmp / "downlink", GATEWAY, self.profile)
        self.handler.load()
        self.topics = self.handler.attach(None, ROOT)

    async def _refuse(self, _digest: str, version: int | None, reason: str, detail: str) -> None:
        self.refused.append((version, reason, detail))
        self.audit.append("refused", version=version, reason=reason, detail=detail)

    def deliver(self, *messages: tuple[str, bytes]) -> None:
        for topic, payload in messages:
            assert self.handler.on_message(topic, payload)
            self.step()

    def step(self) -> None:
        trust = Trust({key_id(KEY.public_key()): KEY.public_key()})
        asyncio.run(self.handler.step(trust, self.audit, self._refuse))

    def events(self) -> list[str]:
        return [json.loads(line)["event"] for line in self.audit.path.read_text().splitlines()]


@pytest.fixture
def gate(tmp_path: Path) -> Gate:
    active = pump_model(tmp_path)
    commission(active, np.random.default_rng(3))
    return Gate(tmp_path, Slot(active, state_dir=tmp_path))


def _signed(manifest: bytes, version: int, keys: list[Ed25519PrivateKey] | None = None) -> bytes:
    return sign(
        manifest,
        keys=[KEY] if keys is None else keys,
        gateway=GATEWAY,
        version=version,
        expires=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1),
        kind="model",
    )


def bundle(
    model: bytes, card: bytes, version: int, *, chunk: int = 1024, keys: list[Ed25519PrivateKey] | None = None
) -> tuple[bytes, list[tuple[str, bytes]]]:
    manifest, chunks = make_bundle(PUMP, card, model, chunk_bytes=chunk, acceptance=Acceptance(windows=5))
    env = _signed(manifest, version, keys)
    sha = json.loads(manifest)["model"]["sha256"][:32]
    return env, [(f"{ROOT}/chunk/{sha}/{i}", c) for i, c in enumerate(chunks)]


def dense_bundle(
    version: int, *, card: bytes | None = None, dense: bytes | None = None, chunk: int = 1024
) -> tuple[bytes, list[tuple[str, bytes]]]:
    """The shipped pump card as a bundle with its numpy weights (or ``dense``): envelope, chunk messages."""
    card = card or (MODELS / f"{PUMP}.card.json").read_bytes()
    model = (MODELS / f"{PUMP}.fp32.onnx").read_bytes()
    dense = dense or (MODELS / f"{PUMP}.fp32.dense.npz").read_bytes()
    manifest, _ = make_bundle(
        PUMP, card, model, chunk_bytes=chunk, acceptance=Acceptance(windows=5), dense=dense
    )
    env = _signed(manifest, version)
    *chunks, _manifest = chunk_messages(ROOT, env, model, dense=dense)  # as the twin publishes them
    return env, chunks


def litert_bundle(
    version: int, *, card: bytes | None = None, tflite: bytes | None = None, chunk: int = 1024
) -> tuple[bytes, list[tuple[str, bytes]]]:
    """The pump card preferring LiteRT as a bundle with every file it names (or ``tflite``): envelope, chunk messages."""
    card = card or litert_card()
    model = (MODELS / f"{PUMP}.fp32.onnx").read_bytes()
    dense = (MODELS / f"{PUMP}.fp32.dense.npz").read_bytes()
    tflite = tflite or (MODELS / f"{PUMP}.fp32.tflite").read_bytes()
    manifest, _ = make_bundle(
        PUMP, card, model, chunk_bytes=chunk, acceptance=Acceptance(windows=5), dense=dense, tflite=tflite
    )
    env = _signed(manifest, version)
    *chunks, _manifest = chunk_messages(ROOT, env, model, dense=dense, tflite=tflite)
    return env, chunks


def test_chunks_fit_each_profile() -> None:
    assert chunk_bytes_for("aws") <= 128 * 1024 - 4096
    assert chunk_bytes_for("generic") <= 256 * 1024
    assert chunk_bytes_for("azure") <= 64 * 1024 - 4096  # a cloud-to-device message, not the D2C 256 KB


def test_on_iot_hub_the_manifest_comes_from_the_twin_and_chunks_as_c2d_messages(tmp_path: Path) -> None:
    active = pump_model(tmp_path)
    commission(active, np.random.default_rng(3))
    gate = Gate(tmp_path, Slot(active, state_dir=tmp_path), profile="azure")
    assert gate.topics == [f"devices/{GATEWAY}/messages/devicebound/#"]
    model = onnx_model(pad_bytes=5000)
    env, chunks = bundle(model, card_for(model), 1)
    bundle_id = chunks[0][0].split("/")[-2]

    def c2d(index: int, body: bytes) -> tuple[str, bytes]:
        # IoT Hub puts its own system properties into the bag next to the application's.
        bag = f"%24.mid=m{index}&%24.to=%2Fdevices%2F{GATEWAY}%2Fmessages%2FdeviceBound"
        return f"devices/{GATEWAY}/messages/devicebound/{bag}&et_bundle={bundle_id}&et_chunk={index}", body

    # The retained generic topics mean nothing here: only the twin's manifest and C2D chunks count.
    assert not gate.handler.on_message(f"{ROOT}/model", env)
    # IoT Hub hands over queued C2D messages before the twin is read: held in memory, unwritten,
    # until the verified manifest names them, then checked against the signed hashes.
    gate.deliver(c2d(0, chunks[0][1]), c2d(4, b"w" * len(chunks[4][1])))
    assert not (tmp_path / "downlink" / "quarantine" / "chunks").exists()
    gate.handler.take_manifest(env)
    gate.step()
    gate.deliver(c2d(1, b"y" * len(chunks[1][1])), c2d(2, chunks[2][1]))
    gate.deliver((f"devices/{GATEWAY}/messages/devicebound/note=hello", b"not a chunk"))
    transfer = gate.handler.reported()[PUMP]["transfer"]
    assert (transfer["have"], transfer["refused_chunks"]) == (2, 2)
    assert transfer["missing"] == [1, *range(3, len(chunks))]
    gate.deliver(*(c2d(i, chunks[i][1]) for i in transfer["missing"]))
    rep = gate.handler.reported()[PUMP]
    assert "transfer" not in rep
    assert rep["candidate"]["version"] == 1
    assert gate.events() == ["received", "verified", "model-shadow"]


def test_a_truncated_transfer_is_never_applied_and_resumes_after_a_restart(gate: Gate) -> None:
    model = onnx_model(pad_bytes=12_000)
    env, chunks = bundle(model, card_for(model), 1)
    assert len(chunks) == 13
    # The manifest, then part of the chunks; one truncated on the way and one corrupted.
    gate.deliver((f"{ROOT}/model", env), *chunks[:6])
    topic3, data3 = chunks[3]
    gate.deliver((topic3, data3[:100]))  # already there: ignored
    topic7, data7 = chunks[7]
    gate.deliver((topic7, data7[:500]), (chunks[8][0], b"x" * len(chunks[8][1])))
    transfer = gate.handler.reported()[PUMP]["transfer"]
    assert (transfer["have"], transfer["of"]) == (6, 13)
    assert transfer["missing"] == list(range(6, 13))
    held = gate.tmp / "downlink" / "quarantine" / "chunks" / transfer["id"]
    assert sorted(int(p.name) for p in held.iterdir()) == list(range(6))  # only chunks whose hash was signed
    assert gate.slot.candidate is None
    assert not version_dir(gate.tmp, PUMP, 1).exists()

    # A restart: the chunks in quarantine are kept, the retained manifest comes again, the rest follows.
    gate.restart()
    gate.deliver((f"{ROOT}/model", env))
    assert gate.handler.reported()[PUMP]["transfer"]["missing"] == list(range(6, 13))
    gate.deliver(*chunks[6:])
    rep = gate.handler.reported()[PUMP]
    assert "transfer" not in rep
    assert rep["candidate"]["version"] == 1
    assert (version_dir(gate.tmp, PUMP, 1) / "pump_skab.v2.onnx").read_bytes() == model
    assert not held.exists()
    assert gate.events() == ["received", "verified", "received", "verified", "model-shadow"]
    assert audit_log.verify(gate.audit.path).count == 5
    # The retained manifest once more: handled before, nothing happens.
    gate.deliver((f"{ROOT}/model", env))
    assert gate.refused == []
    assert len(gate.events()) == 5


def _resign(env: bytes, change: dict[str, object], version: int) -> bytes:
    manifest = json.loads(base64.b64decode(json.loads(env)["content"]))
    manifest["model"].update(change)
    content = canonical(manifest)
    return sign(
        content,
        keys=[KEY],
        gateway=GATEWAY,
        version=version,
        expires=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1),
        kind="model",
    )


@pytest.mark.parametrize(
    "case",
    ["unsigned", "wrong-key", "older-version", "hash-mismatch", "card-invalid", "card-other-file", "no-load"],
)
def test_a_bad_bundle_is_refused_with_its_reason_and_audited(gate: Gate, case: str) -> None:
    good, card = shipped_int8()
    env, chunks = bundle(good, card, 5)
    messages = [(f"{ROOT}/model", env), *chunks]
    want = case
    if case == "unsigned":
        doc = json.loads(env)
        doc["signatures"] = []
        messages[0] = (f"{ROOT}/model", json.dumps(doc).encode())
    elif case == "wrong-key":
        env, chunks = bundle(good, card, 5, keys=[Ed25519PrivateKey.generate()])
        messages, want = [(f"{ROOT}/model", env)], "bad-signature"
    elif case == "older-version":
        gate.deliver(*messages)  # v5 taken
        assert gate.slot.candidate is not None
        other = onnx_model()
        env, chunks = bundle(other, card_for(other), 4)
        messages, want = [(f"{ROOT}/model", env), *chunks], "rollback"
    elif case == "hash-mismatch":
        # Signed chunk hashes of this file, but a whole-file hash of another: mix-and-match.
        messages[0] = (f"{ROOT}/model", _resign(env, {"sha256": "ab" * 32}, 5))
        messages[1:] = [(t.replace(t.split("/")[-2], "ab" * 16), c) for t, c in chunks]
    elif case == "card-invalid":
        bad = json.loads(card)
        del bad["threshold"]
        env, chunks = bundle(good, json.dumps(bad).encode(), 5)
        messages = [(f"{ROOT}/model", env), *chunks]
    elif case == "card-other-file":
        env, chunks = bundle(good, card_for(onnx_model()), 5)
        messages, want = [(f"{ROOT}/model", env), *chunks], "card-invalid"
    elif case == "no-load":
        garbage = b"\x08\x07 not an onnx graph" * 50
        env, chunks = bundle(garbage, card_for(garbage), 5)
        messages, want = [(f"{ROOT}/model", env), *chunks], "load-failed"
    gate.deliver(*messages)
    assert [r[1] for r in gate.refused] == [want]
    assert gate.events()[-1] == "refused"
    assert audit_log.verify(gate.audit.path).count == len(gate.events())
    if case != "older-version":
        assert gate.slot.candidate is None
        assert not version_dir(gate.tmp, PUMP, 5).exists()
    assert "transfer" not in gate.handler.reported()[PUMP]


def test_a_version_in_shadow_when_the_gateway_stops_is_in_shadow_again_after_the_start(gate: Gate) -> None:
    model, card = shipped_int8()
    env, chunks = bundle(model, card, 2)
    gate.deliver((f"{ROOT}/model", env), *chunks)
    assert gate.handler.reported()[PUMP]["candidate"]["version"] == 2
    # The process starts again: a fresh slot serving the shipped model, nothing in memory.
    active = pump_model(gate.tmp)
    gate.slot = Slot(active, state_dir=gate.tmp)
    gate.restart()
    assert gate.slot.candidate is None
    gate.step()
    rep = gate.handler.reported()[PUMP]
    assert (rep["candidate"]["version"], rep["candidate"]["judged"]) == (2, 0)
    assert gate.events()[-1] == "model-shadow"
    # The retained manifest again: handled before, not taken a second time.
    gate.deliver((f"{ROOT}/model", env))
    assert gate.events()[-1] == "model-shadow"
    assert gate.refused == []


def _real_pump_bundle(version: int) -> tuple[bytes, list[tuple[str, bytes]]]:
    """A bundle of the shipped pump card as its recipe wrote it (numpy or LiteRT preferred, their files listed)."""
    card = (MODELS / f"{PUMP}.card.json").read_bytes()
    doc = json.loads(card)
    assert doc["backend"] != "onnxruntime"
    assert doc["tflite_files"]
    assert doc["dense_files"]
    model = (MODELS / doc["files"][doc["default_precision"]]["path"]).read_bytes()
    return bundle(model, card, version)


def _promote(gate: Gate, version: int) -> None:
    rng = np.random.default_rng(11)
    for k in range(50):  # the acceptance period is 5 windows: bounded, well past it
        gate.slot.score_batch([pump_window(400 + k, rng)])
        gate.step()
        if gate.slot.version == version:
            return
    raise AssertionError(f"v{version} not promoted: {gate.handler.reported()[PUMP]}")


def test_a_bundle_of_the_recipes_real_card_loads_in_shadow_promoted_and_after_a_restart(gate: Gate) -> None:
    preferred = json.loads((MODELS / f"{PUMP}.card.json").read_text())["backend"]
    if preferred != "litert" or litert_interpreter_class() is not None:
        assert gate.slot.active.backend.name == preferred  # where the card's preference used to burn it
    env, chunks = _real_pump_bundle(2)
    gate.deliver((f"{ROOT}/model", env), *chunks)
    assert gate.refused == []
    assert gate.handler.reported()[PUMP]["candidate"]["version"] == 2
    assert gate.events()[-1] == "model-shadow"
    _promote(gate, 2)
    assert gate.slot.active.backend.name == "onnxruntime"  # this bundle carries the ONNX file only
    assert gate.events()[-1] == "model-promoted"
    # A restart: the promoted version is opened from its directory, again on onnxruntime.
    (slot,) = open_slots([pump_model(gate.tmp)], gate.tmp)
    assert (slot.version, slot.previous_version) == (2, 0)
    assert slot.active.backend.name == "onnxruntime"
    (r,) = slot.score_batch([pump_window(600, np.random.default_rng(2))])
    assert r.reason != "load-failed"
    assert math.isfinite(r.score)


def test_an_older_bundle_is_refused_even_when_the_model_state_file_is_lost(gate: Gate) -> None:
    env3, chunks3 = _real_pump_bundle(3)
    gate.deliver((f"{ROOT}/model", env3), *chunks3)
    _promote(gate, 3)
    (gate.tmp / "downlink" / "models.json").unlink()  # the counter of accepted versions is gone
    (gate.slot,) = open_slots([pump_model(gate.tmp)], gate.tmp)
    gate.restart()
    assert gate.slot.version == 3
    env2, chunks2 = _real_pump_bundle(2)
    gate.deliver((f"{ROOT}/model", env3), *chunks3, (f"{ROOT}/model", env2), *chunks2)
    assert [r[:2] for r in gate.refused] == [(None, "rollback"), (None, "rollback")]
    assert "not newer than version 3 already accepted or installed" in gate.refused[0][2]
    assert gate.slot.version == 3
    assert gate.slot.candidate is None
    assert (version_dir(gate.tmp, PUMP, 3) / f"{PUMP}.card.json").is_file()  # the serving version untouched
    # A newer one is still taken.
    env4, chunks4 = _real_pump_bundle(4)
    gate.deliver((f"{ROOT}/model", env4), *chunks4)
    assert gate.handler.reported()[PUMP]["candidate"]["version"] == 4


def test_chunks_flooded_before_a_step_queue_once_each_and_only_with_their_signed_hash(gate: Gate) -> None:
    model = onnx_model(pad_bytes=12_000)
    env, chunks = bundle(model, card_for(model), 1)
    gate.deliver((f"{ROOT}/model", env))
    (t0, c0), (t1, c1) = chunks[:2]
    for _ in range(200):  # a peer (or a broker resending) floods the same index, and forged copies
        assert gate.handler.on_message(t0, c0)
        assert gate.handler.on_message(t1, b"y" * len(c1))
    assert len(gate.handler._incoming) == 1
    gate.step()
    transfer = gate.handler.reported()[PUMP]["transfer"]
    assert (transfer["have"], transfer["missing"][0]) == (1, 1)
    gate.deliver(*chunks[1:])  # the genuine copies still complete it
    assert gate.handler.reported()[PUMP]["candidate"]["version"] == 1
    assert gate.refused == []


def test_a_bundle_with_the_cards_numpy_weights_runs_on_numpy_in_shadow_promoted_and_after_a_restart(
    gate: Gate,
) -> None:
    assert gate.slot.active.backend.name == "numpy"  # the shipped pump card chose numpy
    env, chunks = dense_bundle(2)
    ids = {t.split("/")[-2] for t, _ in chunks}
    assert len(ids) == 2  # two parts, each addressed by its own id
    # Cut short: the manifest, the model and a part of the weights; then a restart.
    gate.deliver((f"{ROOT}/model", env), *chunks[:-5])
    transfer = gate.handler.reported()[PUMP]["transfer"]
    assert transfer["missing"] == []  # the model part is all here
    dense = transfer["dense"]
    assert (dense["path"], dense["of"] - dense["have"]) == (f"{PUMP}.fp32.dense.npz", 5)
    assert dense["missing"] == list(range(dense["of"] - 5, dense["of"]))
    gate.restart()
    gate.deliver((f"{ROOT}/model", env))
    assert gate.handler.reported()[PUMP]["transfer"]["dense"]["missing"] == dense["missing"]
    gate.deliver(*chunks[-5:])
    assert gate.refused == []
    rep = gate.handler.reported()[PUMP]
    assert rep["candidate"]["version"] == 2
    where = version_dir(gate.tmp, PUMP, 2)
    shipped = (MODELS / f"{PUMP}.fp32.dense.npz").read_bytes()
    assert (where / f"{PUMP}.fp32.dense.npz").read_bytes() == shipped
    _promote(gate, 2)
    assert gate.slot.active.backend.name == "numpy"
    assert gate.handler.reported()[PUMP]["backend"] == "numpy"
    # A restart: the promoted version is opened from its directory, again on numpy.
    (slot,) = open_slots([pump_model(gate.tmp)], gate.tmp)
    assert (slot.version, slot.active.backend.name) == (2, "numpy")
    (r,) = slot.score_batch([pump_window(600, np.random.default_rng(2))])
    assert math.isfinite(r.score)


def test_numpy_weights_that_fail_their_check_or_are_not_the_cards_are_refused(gate: Gate) -> None:
    bad = tampered_weights()
    # Signed consistently (card and manifest name the tampered file): the numpy backend's own load
    # check (reference scores within 1e-5) refuses it.
    card = json.loads((MODELS / f"{PUMP}.card.json").read_text())
    card["dense_files"]["fp32"].update(sha256=hashlib.sha256(bad).hexdigest(), bytes=len(bad))
    env, chunks = dense_bundle(2, card=json.dumps(card).encode(), dense=bad)
    gate.deliver((f"{ROOT}/model", env), *chunks)
    (version, reason, detail) = gate.refused[-1]
    assert (version, reason) == (2, "load-failed")
    assert "numpy weights do not reproduce the recorded" in detail
    # The card's own weights named, another file's hash signed and sent: bound to the card, refused.
    env, chunks = dense_bundle(3, dense=bad)
    gate.deliver((f"{ROOT}/model", env), *chunks)
    assert gate.refused[-1][:2] == (3, "card-invalid")
    # A name that is a path: never a valid manifest.
    manifest = json.loads(base64.b64decode(json.loads(dense_bundle(4)[0])["content"]))
    manifest["dense"]["path"] = "../../trust.json"
    gate.deliver((f"{ROOT}/model", _signed(canonical(manifest), 4)))
    assert gate.refused[-1][:2] == (None, "malformed")
    assert gate.slot.candidate is None
    assert gate.slot.active.backend.name == "numpy"
    assert not any(version_dir(gate.tmp, PUMP, v).exists() for v in (2, 3, 4))
    assert "transfer" not in gate.handler.reported()[PUMP]


def test_on_iot_hub_the_weights_come_as_c2d_messages_of_their_own_and_only_the_missing_are_sent_again(
    tmp_path: Path,
) -> None:
    active = pump_model(tmp_path)
    commission(active, np.random.default_rng(3))
    gate = Gate(tmp_path, Slot(active, state_dir=tmp_path), profile="azure")
    env, _ = dense_bundle(2)
    twin = tmp_path / "twin"
    twin.mkdir()
    (twin / "m2.envelope").write_bytes(env)
    model = twin / f"{PUMP}.fp32.onnx"
    model.write_bytes((MODELS / model.name).read_bytes())
    (twin / f"{PUMP}.fp32.dense.npz").write_bytes((MODELS / f"{PUMP}.fp32.dense.npz").read_bytes())
    make = ["twin", "azure-model", "--envelope", str(twin / "m2.envelope"), "--model", str(model)]
    assert main([*make, "--out-dir", str(twin / "all")]) == 0  # the weights found beside the model
    listing = json.loads((twin / "all" / "messages.json").read_text())
    by_part: dict[str, list[str]] = {}
    for entry in listing:
        by_part.setdefault(entry["properties"]["et_bundle"], []).append(entry["properties"]["et_chunk"])
    assert len(by_part) == 2

    def send(where: Path, entries: list[dict[str, Any]]) -> None:
        for entry in entries:
            props = entry["properties"]
            topic = c2d_chunk_topic(GATEWAY, props["et_bundle"], int(props["et_chunk"]))
            gate.deliver((topic, (where / entry["file"]).read_bytes()))

    gate.handler.take_manifest(env)
    gate.step()
    send(twin / "all", listing[:-4])  # the sender stops four short, all of them the weights'
    transfer = gate.handler.reported()[PUMP]["transfer"]
    assert (transfer["missing"], len(transfer["dense"]["missing"])) == ([], 4)
    # As IoT Hub shows the reported property (no arrays); the twin sends again just those four.
    (twin / "twin.json").write_text(json.dumps({"models": twin_safe(gate.handler.reported())}))
    again = twin / "again"
    assert main([*make, "--out-dir", str(again), "--missing-from", str(twin / "twin.json")]) == 0
    resent = json.loads((again / "messages.json").read_text())
    assert [e["properties"] for e in resent] == [e["properties"] for e in listing[-4:]]
    send(again, resent)
    assert gate.refused == []
    assert gate.handler.reported()[PUMP]["candidate"]["version"] == 2
    assert (version_dir(tmp_path, PUMP, 2) / f"{PUMP}.fp32.dense.npz").is_file()


def _manifest_before_tflite() -> type[BaseModel]:
    """The manifest model of a gateway from before ``tflite`` parts: today's without that field, extra forbidden."""
    fields: dict[str, Any] = {n: (f.annotation, f) for n, f in Manifest.model_fields.items() if n != "tflite"}
    return create_model("ManifestBeforeTflite", __config__=Manifest.model_config, **fields)


def test_sign_model_takes_the_cards_weights_from_beside_the_model_and_refuses_others(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_private_key(tmp_path / "twin.key", KEY)
    card = tmp_path / f"{PUMP}.card.json"
    card.write_bytes((MODELS / card.name).read_bytes())
    model = tmp_path / f"{PUMP}.fp32.onnx"
    model.write_bytes((MODELS / model.name).read_bytes())
    weights = tmp_path / f"{PUMP}.fp32.dense.npz"
    weights.write_bytes((MODELS / weights.name).read_bytes())
    cli = ["twin", "sign-model", "--slot", PUMP, "--card", str(card), "--model", str(model)]
    cli += ["--key", str(tmp_path / "twin.key"), "--version", "2", "--gateway", GATEWAY]
    before = _manifest_before_tflite()

    def signed(*extra: str) -> dict[str, Any] | None:
        out = tmp_path / "m.envelope"
        out.unlink(missing_ok=True)
        if main([*cli, "--out", str(out), *extra]) != 0:
            return None
        return dict(json.loads(base64.b64decode(json.loads(out.read_bytes())["content"])))

    assert json.loads(card.read_bytes())["backend"] == "numpy"  # the shipped card's choice
    lite = tmp_path / f"{PUMP}.fp32.tflite"
    lite.write_bytes((MODELS / lite.name).read_bytes())
    capsys.readouterr()
    found = signed()
    assert found is not None
    # The .tflite beside the model is left out for a card that chose numpy, and the operator told why:
    # the manifest is one a gateway from before tflite parts takes.
    assert "tflite" not in found
    assert f"the .tflite model {lite} is not carried: the card chose numpy" in capsys.readouterr().out
    before.model_validate_json(json.dumps(found))
    assert found["dense"]["path"] == weights.name
    assert found["dense"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert found["model"]["path"] == model.name
    given = signed("--tflite", str(lite))  # a site serving this card on LiteRT: asked for by name
    assert given is not None
    assert given["tflite"]["path"] == lite.name
    assert given["tflite"]["sha256"] == hashlib.sha256(lite.read_bytes()).hexdigest()
    with pytest.raises(ValidationError, match="tflite"):
        before.model_validate_json(json.dumps(given))
    only = signed("--onnx-only")
    assert only is not None
    assert "dense" not in only
    assert "tflite" not in only
    assert "path" not in only["model"]  # the manifest gateways took before bundles had parts
    other = tmp_path / "other.dense.npz"
    other.write_bytes(tampered_weights())
    assert signed("--dense", str(other)) is None  # not the card's weights: refused before signing
    assert signed("--tflite", str(MODELS / f"{PUMP}.int8.tflite")) is None  # nor another precision's .tflite
    # A card that chose LiteRT: its .tflite beside the model goes in by default (the version needs it).
    card.write_bytes(litert_card())
    capsys.readouterr()
    chosen = signed()
    assert chosen is not None
    assert chosen["tflite"]["path"] == lite.name
    assert "not carried" not in capsys.readouterr().out
    assert Manifest.model_validate_json(json.dumps(chosen)).tflite is not None
    lite.unlink()
    gone = signed()  # not beside the model: the bundle carries what is there
    assert gone is not None
    assert "tflite" not in gone


@needs_litert
def test_a_bundle_of_a_litert_card_carries_its_tflite_and_runs_on_litert_promoted_and_after_a_restart(
    gate: Gate,
) -> None:
    assert gate.slot.active.backend.name == "numpy"  # the shipped card's choice serves now
    env, chunks = litert_bundle(2)
    assert len({t.split("/")[-2] for t, _ in chunks}) == 3  # ONNX, numpy weights, .tflite: a part each
    # Cut short in the .tflite part (sent last); a restart; the rest.
    gate.deliver((f"{ROOT}/model", env), *chunks[:-1])
    transfer = gate.handler.reported()[PUMP]["transfer"]
    lite = transfer["tflite"]
    assert (transfer["missing"], transfer["dense"]["missing"]) == ([], [])
    assert (lite["path"], lite["missing"]) == (f"{PUMP}.fp32.tflite", [lite["of"] - 1])
    where = version_dir(gate.tmp, PUMP, 2)
    assert not where.exists()  # nothing staged from part of a bundle
    gate.restart()
    gate.deliver((f"{ROOT}/model", env), chunks[-1])
    assert gate.refused == []
    assert gate.handler.reported()[PUMP]["candidate"]["version"] == 2
    for name in (f"{PUMP}.fp32.onnx", f"{PUMP}.fp32.dense.npz", f"{PUMP}.fp32.tflite"):
        assert (where / name).read_bytes() == (MODELS / name).read_bytes()
    assert sorted(p.name for p in where.parent.iterdir()) == ["v2"]  # no staging directory left
    assert gate.slot.candidate is not None
    _promote(gate, 2)
    assert gate.slot.active.backend.name == "litert"
    assert gate.handler.reported()[PUMP]["backend"] == "litert"
    assert gate.handler._state["last"][PUMP]["backend"] == "litert"
    # A restart: the promoted version is opened from its directory, again on LiteRT.
    (slot,) = open_slots([pump_model(gate.tmp)], gate.tmp)
    assert (slot.version, slot.active.backend.name) == (2, "litert")
    (r,) = slot.score_batch([pump_window(600, np.random.default_rng(2))])
    assert math.isfinite(r.score)


@needs_litert
def test_a_tflite_file_that_is_not_the_cards_or_no_model_is_refused(gate: Gate) -> None:
    # The card's own .tflite named, another file's hash signed and sent: bound to the card, refused.
    other = (MODELS / f"{PUMP}.int8.tflite").read_bytes()
    env, chunks = litert_bundle(2, tflite=other)
    gate.deliver((f"{ROOT}/model", env), *chunks)
    assert gate.refused[-1][:2] == (2, "card-invalid")
    assert ".tflite model entry for its default precision" in gate.refused[-1][2]
    # Signed consistently, card and all, but no TFLite model: LiteRT refuses it when the version opens.
    junk = b"not a flatbuffer" * 80
    card = litert_card(sha256=hashlib.sha256(junk).hexdigest(), bytes=len(junk))
    env, chunks = litert_bundle(3, card=card, tflite=junk)
    gate.deliver((f"{ROOT}/model", env), *chunks)
    (version, reason, detail) = gate.refused[-1]
    assert (version, reason) == (3, "load-failed")
    assert "LiteRT cannot load the model" in detail
    assert gate.slot.candidate is None
    assert gate.slot.active.backend.name == "numpy"
    base = version_dir(gate.tmp, PUMP, 2).parent
    assert not base.exists() or list(base.iterdir()) == []  # neither version, nor its staging, is left
