"""Model bundles over the downlink: a signed manifest, the model's files in chunks, staged into a model slot.

A bundle is a signed envelope of type ``model`` (:mod:`~gateway.downlink.signing`) on the retained
topic ``<root>/model``.  Its content is a JSON *manifest*::

    {"slot": "pump_skab", "card": {... the model card ...},
     "model": {"path": "pump_skab.fp32.onnx", "sha256": "<hex>", "length": 1048576,
               "chunk_bytes": 122880, "chunks": ["<hex>", ...]},
     "dense": {"path": "pump_skab.fp32.dense.npz", "sha256": "<hex>", ...},
     "tflite": {"path": "pump_skab.fp32.tflite", "sha256": "<hex>", ...},
     "acceptance": {"windows": 30, "max_alarm_rate": 0.2, ...}}

Each *part* is one file of the card in its default precision: the ONNX file (always: it serves
wherever the card's choice cannot), and each other file the card names (:data:`EXTRAS`): its numpy
weights (``dense``, the card's ``dense_files`` entry) and its ``.tflite`` model (``tflite``, the
``tflite_files`` entry), so the version runs on the backend its card chose (or the site's
``backend``) and a gateway without onnxruntime stays without it.  The twin signs the ``.tflite``
only for a card that chose LiteRT or when told to (``sign-model --tflite``): a gateway from before
``tflite`` parts refuses a manifest with one.  A manifest without them (and without ``path``, as
bundles were signed before) is valid: its version runs on onnxruntime.

Every part travels in chunks, each a retained message on
``<root>/chunk/<first 32 hex of the part's SHA-256>/<index>``, no larger than the uplink
profile's payload limit (AWS IoT: 128 kB).  The manifest names every chunk's SHA-256 (TUF's
targets metadata with hashes): the gateway subscribes to the chunks of a *verified* manifest
only, writes a chunk into its quarantine only when its hash is the one signed, and keeps the
chunks it has across reconnects and restarts.  A transfer resumes when the retained manifest comes
again: the gateway subscribes again and the broker sends the retained chunks; the reported state
lists the chunks still missing, per part (``missing`` for the model, ``dense.missing`` and
``tflite.missing`` for the others), so the twin can publish just those (``twin publish-model
--missing``).  A file is assembled only when every chunk of every part is there and each file's
whole SHA-256 and length match: a truncated transfer is never applied.  Then the card is validated, bound to each file by
name (a file name only, the one the card lists for its default precision), hash and length, the
files staged together (written into a staging directory renamed to the version's directory once
all are there, so a version directory never holds part of a bundle), the model opened as the
loader opens it on the card's backend (the numpy backend checks its reference scores, LiteRT
refuses a file that is no model of the card's shape), and the version put in shadow
(:mod:`gateway.inference.shadow`).

On the ``azure`` profile (IoT Hub keeps no retained messages) the manifest is the device twin's
desired property ``edgetwin.model`` and the chunks are cloud-to-device messages, each under IoT
Hub's 64 KB (:mod:`gateway.downlink.azure`); the rules above are the same, and a transfer resumes
when the twin sends the chunks the reported state lists as missing.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
import math
import shutil
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.downlink import state as persist
from gateway.downlink.audit import AuditLog
from gateway.downlink.azure import C2D_MAX_BYTES, C2D_QUEUE_DEPTH, c2d_chunk, c2d_prefix
from gateway.downlink.errors import RefusedError
from gateway.downlink.signing import MAX_ENVELOPE_BYTES, Trust, verify
from gateway.errors import ConfigError, CorruptDataError
from gateway.inference.card import CARD_SUFFIX, ModelCard, ModelFile, load_card
from gateway.inference.shadow import Acceptance, Outcome, Slot, version_dir, write_installed
from gateway.privatefile import fsync_dir
from gateway.uplink.profiles import PROFILES

__all__ = [
    "EXTRAS",
    "MAX_CHUNK_BYTES",
    "Manifest",
    "ModelBundles",
    "card_files",
    "chunk_bytes_for",
    "cut",
    "make_bundle",
    "parse_manifest",
]

log = logging.getLogger(__name__)

MAX_CHUNK_BYTES = 256 * 1024
MAX_MODEL_BYTES = 64 * 1024 * 1024
_HEX = r"^[0-9a-f]{64}$"
_DONE_KEPT = 16
#: The files a bundle may carry beside the ONNX model: manifest key -> (card key, what it is).
EXTRAS: dict[str, tuple[str, str]] = {
    "dense": ("dense_files", "numpy weights"),
    "tflite": ("tflite_files", ".tflite model"),
}


class ModelPart(BaseModel):
    """A file of a bundle: its name as the card lists it, hash and length, and how it is cut into chunks."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    # A file name, never a path: it is written into the version's directory under this name.
    path: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
    sha256: str = Field(pattern=_HEX)
    length: int = Field(gt=0, le=MAX_MODEL_BYTES)
    chunk_bytes: int = Field(ge=1024, le=MAX_CHUNK_BYTES)
    chunks: tuple[str, ...] = Field(min_length=1)

    @property
    def id(self) -> str:
        """What the chunks are addressed by: the first 32 hex digits of the file's SHA-256."""
        return self.sha256[:32]


class Manifest(BaseModel):
    """The signed content of a model bundle."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    slot: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")
    card: dict[str, Any]
    model: ModelPart
    dense: ModelPart | None = None  # the numpy weights the card names (backend "numpy")
    tflite: ModelPart | None = None  # the .tflite model the card names (backend "litert")
    acceptance: Acceptance = Acceptance()

    @property
    def extras(self) -> dict[str, ModelPart]:
        """The files beside the ONNX model, by manifest key (:data:`EXTRAS`)."""
        found = {key: getattr(self, key) for key in EXTRAS}
        return {key: part for key, part in found.items() if part is not None}

    @property
    def parts(self) -> tuple[ModelPart, ...]:
        """The files the bundle carries: the model, then the others the card names."""
        return (self.model, *self.extras.values())


def chunk_bytes_for(profile: str) -> int:
    """The chunk size for an uplink profile: inside its payload limit, with room to spare."""
    return _carried(profile) - 8 * 1024


def _carried(profile: str) -> int:
    """The largest chunk message a profile carries to a gateway (IoT Hub: a cloud-to-device message)."""
    limit = C2D_MAX_BYTES if profile == "azure" else PROFILES[profile].max_payload_bytes
    return min(MAX_CHUNK_BYTES, limit)


def cut(data: bytes, chunk_bytes: int) -> list[bytes]:
    """A file cut into chunks of ``chunk_bytes`` (the last one shorter)."""
    return [data[i : i + chunk_bytes] for i in range(0, len(data), chunk_bytes)]


def _part(data: bytes, chunk_bytes: int, path: str | None) -> ModelPart:
    return ModelPart(
        path=path,
        sha256=hashlib.sha256(data).hexdigest(),
        length=len(data),
        chunk_bytes=chunk_bytes,
        chunks=tuple(hashlib.sha256(c).hexdigest() for c in cut(data, chunk_bytes)),
    )


def card_files(card: dict[str, Any]) -> dict[str, str | None]:
    """The names the card gives its files in its default precision: ``model`` (ONNX) and each of :data:`EXTRAS`."""
    precision = card.get("default_precision")
    keys = {"model": "files", **{key: card_key for key, (card_key, _) in EXTRAS.items()}}
    return {
        key: ((card.get(card_key) or {}).get(precision) or {}).get("path") for key, card_key in keys.items()
    }


def make_bundle(
    slot: str,
    card: bytes,
    model: bytes,
    *,
    chunk_bytes: int,
    acceptance: Acceptance | None = None,
    dense: bytes | None = None,
    tflite: bytes | None = None,
) -> tuple[bytes, list[bytes]]:
    """The manifest to sign and the model's chunks to publish, for the twin.

    ``dense`` and ``tflite``: the card's numpy weights and .tflite model, carried as parts of their own.
    """
    doc = json.loads(card)
    names = card_files(doc)
    extras = {key: data for key, data in (("dense", dense), ("tflite", tflite)) if data is not None}
    manifest = Manifest(
        slot=slot,
        card=doc,
        # Without other files the manifest is the one older gateways take (no "path", no parts).
        model=_part(model, chunk_bytes, names["model"] if extras else None),
        **{key: _part(data, chunk_bytes, names[key]) for key, data in extras.items()},
        acceptance=acceptance or Acceptance(),
    )
    content = manifest.model_dump(mode="json")
    for key in EXTRAS:
        if key not in extras:
            del content[key]
    if not extras:
        del content["model"]["path"]
    return json.dumps(content).encode(), cut(model, chunk_bytes)


def parse_manifest(content: bytes) -> Manifest:
    """The manifest of a verified bundle; RefusedError ``malformed`` when it is not one."""
    try:
        manifest = Manifest.model_validate_json(content)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise RefusedError(
            "malformed", f"not a model bundle manifest: {where or '(top)'}: {first['msg']}"
        ) from exc
    for name, part in (("model", manifest.model), *manifest.extras.items()):
        if len(part.chunks) != math.ceil(part.length / part.chunk_bytes) or any(
            len(c) != 64 or any(ch not in "0123456789abcdef" for ch in c) for c in part.chunks
        ):
            raise RefusedError(
                "malformed", f"{name}: the chunk list does not match the file's length and chunk size"
            )
    ids = [p.id for p in manifest.parts]
    for key in manifest.extras:
        if len(set(ids)) != len(ids) or manifest.model.path is None:
            raise RefusedError(
                "malformed",
                f"{key}: the {EXTRAS[key][1]} must be a file of its own, named beside a named model file",
            )
    return manifest


@dataclass(slots=True)
class _Transfer:
    """A verified manifest whose chunks are still coming."""

    digest: str  # SHA-256 of the envelope (the retained message)
    version: int
    manifest: Manifest
    directory: Path  # the quarantine of chunks: one folder per part, named by the part's id
    have: dict[str, set[int]] = field(default_factory=dict)  # part id -> chunk indices written
    bad: int = 0  # chunks refused for their hash

    def part(self, bundle: str) -> ModelPart | None:
        """The part whose chunks are addressed by ``bundle``, or None."""
        return next((p for p in self.manifest.parts if p.id == bundle), None)

    def missing(self, part: ModelPart) -> list[int]:
        """The indices of ``part``'s chunks not written yet."""
        have = self.have.get(part.id, set())
        return [i for i in range(len(part.chunks)) if i not in have]

    @property
    def complete(self) -> bool:
        """True when every chunk of every part is in the quarantine."""
        return not any(self.missing(p) for p in self.manifest.parts)


Refuse = Callable[[str, int | None, str, str], Awaitable[None]]


class ModelBundles:
    """The downlink's model-bundle part: receives, verifies, assembles and stages; records outcomes."""

    def __init__(
        self, slots: Sequence[Slot], state_dir: Path, directory: Path, gateway: str, profile: str
    ) -> None:
        self.slots = {s.name: s for s in slots}
        self._state_dir = state_dir
        self._path = directory / "models.json"
        self._chunks_dir = directory / "quarantine" / "chunks"
        self._quarantine = directory / "quarantine"
        self.gateway = gateway
        self.max_chunk = _carried(profile)
        self._c2d = profile == "azure"  # chunks as IoT Hub cloud-to-device messages, not retained topics
        self._client: Any = None
        self._root = ""
        self._manifest: bytes | None = None
        self._incoming: deque[tuple[str, int, bytes]] = deque()  # (part id, index, chunk)
        self._queued: set[tuple[str, int]] = set()  # the (part id, index) pairs in _incoming
        self.transfer: _Transfer | None = None
        self._state: dict[str, Any] = {"accepted": {}, "done": [], "last": {}, "shadow": {}}
        self._restage: dict[str, Any] = {}  # versions in shadow when the gateway stopped
        self._early: dict[tuple[str, int], bytes] = {}  # C2D chunks that came before their manifest

    def load(self) -> None:
        """The persisted counters and outcomes; leftover chunks are kept only for a transfer resumed."""
        try:
            self._state.update(json.loads(self._path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"downlink model state {self._path}: unreadable ({exc}): restore it or delete it - then only "
                "bundles newer than the last one sent are taken"
            ) from exc
        self._restage = dict(self._state.get("shadow") or {})

    def _save(self) -> None:
        persist.write_atomic(self._path, json.dumps(self._state, indent=1, sort_keys=True).encode())

    # ---- messages (event loop, from paho's callback) -------------------------------------------

    def attach(self, client: Any, root: str) -> list[str]:
        """The topics to subscribe on a new connection (the chunks of a transfer under way too)."""
        self._client, self._root = client, root
        if self._c2d:  # the manifest comes in the device twin (take_manifest)
            return [f"{c2d_prefix(self.gateway)}#"]
        topics = [f"{root}/model"]
        if self.transfer is not None:
            topics += [f"{root}/chunk/{p.id}/+" for p in self.transfer.manifest.parts]
        return topics

    def take_manifest(self, payload: bytes) -> None:
        """A manifest envelope from the device twin (azure profile), handled at the next step."""
        if payload:
            self._manifest = payload

    def on_message(self, topic: str, payload: bytes) -> bool:
        """Take a manifest or a chunk; True when it is one of ours."""
        if self._c2d:
            if not topic.startswith(c2d_prefix(self.gateway)):
                return False
            found = c2d_chunk(topic, self.gateway)
            if found is None:
                log.debug("downlink: cloud-to-device message on %s is no model chunk: ignored", topic)
                return True
            self._take_chunk(*found, payload)
            return True
        if topic == f"{self._root}/model":
            self.take_manifest(payload)
            return True
        if not topic.startswith(f"{self._root}/chunk/"):
            return False
        parts = topic.rsplit("/", 2)
        if len(parts) == 3 and parts[2].isdigit():
            self._take_chunk(parts[1], int(parts[2]), payload)
        return True

    def _take_chunk(self, bundle: str, index: int, payload: bytes) -> None:
        """Queue a chunk of the transfer under way whose hash is the one signed; drop anything else."""
        t = self.transfer
        part = None if t is None else t.part(bundle)
        if t is None or part is None:
            if self._c2d and payload:
                # IoT Hub hands over the C2D messages queued while the gateway was away as soon as
                # it connects, before the twin is read, and forgets them once acknowledged: held in
                # memory (never on disk, at most a queue's worth) until a verified manifest names them.
                self._early[(bundle, index)] = bytes(payload)
                while len(self._early) > C2D_QUEUE_DEPTH:
                    del self._early[next(iter(self._early))]
            return  # not the transfer under way: ignored
        key = (part.id, index)
        if (
            index >= len(part.chunks)
            or index in t.have.get(part.id, ())
            or key in self._queued
            or not payload
        ):
            return
        # Checked here, not when written: only a chunk with its signed hash is queued, once per index,
        # so the queue never holds more than the signed files' bytes, whatever a peer floods in.
        if hashlib.sha256(payload).hexdigest() != part.chunks[index]:
            t.bad += 1
            (log.warning if t.bad == 1 else log.debug)(
                "downlink: model %s v%d chunk %s/%d: %d bytes not matching the signed SHA-256: dropped, "
                "waiting for it again", t.manifest.slot, t.version, part.path or "model", index, len(payload),
            )  # fmt: skip
            return
        self._incoming.append((part.id, index, bytes(payload)))
        self._queued.add(key)

    # ---- handling (event loop) -------------------------------------------------------------------

    async def step(self, trust: Trust, audit: AuditLog, refuse: Refuse) -> bool:
        """Handle what came in and what the slots decided; True when the reported state changed."""
        changed = False
        if self._restage:
            changed |= await self._resume_shadows(audit)
        data, self._manifest = self._manifest, None
        if data is not None:
            changed |= await self._take_manifest(data, trust, audit, refuse)
        if self._incoming:
            changed |= await self._take_chunks(audit, refuse)
        for slot in self.slots.values():
            slot.expire()
            for outcome in slot.take_outcomes():
                await self._record(slot, outcome, audit)
                changed = True
        return changed

    async def _resume_shadows(self, audit: AuditLog) -> bool:
        """Put the versions that were in shadow when the gateway stopped in shadow again, from the start."""
        pending, self._restage = self._restage, {}
        for name, entry in pending.items():
            slot = self.slots.get(name)
            if slot is None:  # no longer in the config
                self._state["shadow"].pop(name, None)
                continue
            version = int(entry["version"])
            where = version_dir(self._state_dir, name, version)
            try:
                rules = Acceptance.model_validate_json(json.dumps(entry["acceptance"]))
                card = await asyncio.to_thread(load_card, where / f"{name}{CARD_SUFFIX}")
                candidate = await asyncio.to_thread(slot.active.sibling, card, where, tag=f"v{version}")
            except (ConfigError, CorruptDataError, ValidationError) as exc:
                self._state["shadow"].pop(name, None)
                self._state["last"][name] = {
                    "version": version,
                    "outcome": "rejected",
                    "reason": "load-failed",
                    "at": _now(),
                }
                await asyncio.to_thread(self._save)
                await asyncio.to_thread(
                    audit.append, "model-rejected", version=version, slot=name, reason="load-failed",
                    detail=f"in shadow when the gateway stopped, no longer loads: {exc}",
                )  # fmt: skip
                continue
            how = slot.stage(candidate, version, rules)
            await asyncio.to_thread(
                audit.append, "model-shadow", version=version, slot=name,
                detail=f"in shadow again after a restart, its period from the start; commissioning {how}",
            )  # fmt: skip
        return True

    async def _take_manifest(self, data: bytes, trust: Trust, audit: AuditLog, refuse: Refuse) -> bool:
        digest = hashlib.sha256(data).hexdigest()
        if digest in self._state["done"]:
            return False  # the retained manifest again after a reconnect: handled before
        if self.transfer is not None and self.transfer.digest == digest:
            self._subscribe(self.transfer)  # resumed: the broker sends the retained chunks again
            return False
        held = self._quarantine / f"{digest[:16]}.model"
        if len(data) <= MAX_ENVELOPE_BYTES:
            await asyncio.to_thread(persist.write_atomic, held, data)
        await asyncio.to_thread(
            audit.append, "received", detail=f"model bundle, {len(data)} bytes", sha256=digest
        )
        try:
            found = verify(
                data,
                trust,
                gateway=self.gateway,
                accepted_version=0,
                now=dt.datetime.now(dt.UTC),
                kind="model",
            )
            manifest = self._check(found.version, parse_manifest(found.content))
        except RefusedError as exc:
            held.unlink(missing_ok=True)
            await refuse(digest, None, exc.reason, f"model bundle: {exc}")
            self._remember(digest)
            await asyncio.to_thread(self._save)
            return True
        held.unlink(missing_ok=True)
        extra = {f"{key}_sha256": part.sha256 for key, part in manifest.extras.items()}
        await asyncio.to_thread(
            audit.append, "verified", version=found.version, keys=[k[:12] for k in found.keyids],
            sha256=manifest.model.sha256, chunks=sum(len(p.chunks) for p in manifest.parts), slot=manifest.slot,
            **extra,
        )  # fmt: skip
        await self._start(digest, found.version, manifest, audit, refuse)
        return True

    def _check(self, version: int, manifest: Manifest) -> Manifest:
        """A verified manifest this gateway can take: a slot it runs, a newer version, chunks that fit."""
        slot = manifest.slot
        if slot not in self.slots:
            raise RefusedError(
                "unknown-slot",
                f"slot {slot!r} is not a model this gateway runs ({', '.join(self.slots) or 'none'}): "
                "sign it for one of those, or add the model to [[models.use]] first",
            )
        # The floor is not models.json alone: were that file lost, the versions installed (serving,
        # kept for rollback, in shadow) must still never be replaced by the same or older ones.
        held = self.slots[slot]
        floor = max(
            int(self._state["accepted"].get(slot, 0)),
            held.version,
            held.previous_version or 0,
            int((held.candidate or {}).get("version") or 0),
        )
        if version <= floor:
            raise RefusedError(
                "rollback",
                f"model {slot} version {version} is not newer than version {floor} already accepted or "
                "installed: sign it again with a higher --version",
            )
        widest = max(p.chunk_bytes for p in manifest.parts)
        if widest > self.max_chunk:
            raise RefusedError(
                "too-large",
                f"chunks of {widest} bytes, this profile carries {self.max_chunk}: "
                "sign it again with this gateway's --profile",
            )
        return manifest

    async def _start(
        self, digest: str, version: int, manifest: Manifest, audit: AuditLog, refuse: Refuse
    ) -> None:
        if self.transfer is not None:  # a newer bundle takes the place of one still coming
            self._unsubscribe(self.transfer)
        t = _Transfer(digest, version, manifest, self._chunks_dir)
        kept = await asyncio.to_thread(_prepare, self._chunks_dir, t)
        self.transfer = t
        self._incoming.clear()
        self._queued.clear()
        self._state["transfer"] = {"digest": digest, "version": version, "slot": manifest.slot}
        await asyncio.to_thread(self._save)
        log.info(
            "downlink: model %s v%d verified: %d chunk(s) in %d file(s), %d already here", manifest.slot,
            version, sum(len(p.chunks) for p in manifest.parts), len(manifest.parts), kept,
        )  # fmt: skip
        early, self._early = self._early, {}
        for (bundle, index), payload in early.items():
            if t.part(bundle) is not None:
                self._take_chunk(bundle, index, payload)  # checked against the signed hash now
        if self._incoming:
            await self._take_chunks(audit, refuse)  # finishes the transfer when they were the last
        elif t.complete:
            await self._finish(t, audit, refuse)
        else:
            self._subscribe(t)

    def _subscribe(self, t: _Transfer) -> None:
        client = self._client
        if client is None or self._c2d:  # C2D: subscribed once on attach; nothing is retained
            return
        for part in t.manifest.parts:
            topic = f"{self._root}/chunk/{part.id}/+"
            try:
                # Again: the broker sends the retained chunks of a subscription anew.
                client.unsubscribe(topic)
                client.subscribe(topic, qos=1)
            except Exception as exc:  # noqa: BLE001 - a connection closing: the next attach subscribes
                log.debug("downlink: cannot subscribe to %s now: %s", topic, exc)

    async def _take_chunks(self, audit: AuditLog, refuse: Refuse) -> bool:
        t = self.transfer
        if t is None:
            self._incoming.clear()
            self._queued.clear()
            return False
        got = 0
        while self._incoming:
            bundle, index, payload = self._incoming.popleft()
            self._queued.discard((bundle, index))
            have = t.have.setdefault(bundle, set())
            if index in have or t.part(bundle) is None:
                continue
            await asyncio.to_thread(persist.write_atomic, t.directory / bundle / str(index), payload)
            have.add(index)
            got += 1
        if t.complete:
            await self._finish(t, audit, refuse)
            return True
        return got > 0

    async def _finish(self, t: _Transfer, audit: AuditLog, refuse: Refuse) -> None:
        """Assemble, verify as a whole, install, open and put in shadow - or refuse with the reason."""
        m, slot = t.manifest, self.slots[t.manifest.slot]
        self._unsubscribe(t)
        self.transfer = None
        self._state.pop("transfer", None)
        self._state["accepted"][m.slot] = t.version  # verified: never taken again, whatever comes next
        self._remember(t.digest)
        where = version_dir(self._state_dir, m.slot, t.version)
        try:
            card = await asyncio.to_thread(_install, t, where)
            candidate = await asyncio.to_thread(slot.active.sibling, card, where, tag=f"v{t.version}")
        except RefusedError as exc:
            await asyncio.to_thread(shutil.rmtree, where, True)
            await asyncio.to_thread(self._save)
            await refuse(t.digest, t.version, exc.reason, f"model {m.slot}: {exc}")
            return
        except (ConfigError, CorruptDataError) as exc:  # the loader's own refusal
            await asyncio.to_thread(shutil.rmtree, where, True)
            await asyncio.to_thread(self._save)
            await refuse(t.digest, t.version, "load-failed", f"model {m.slot}: {exc}")
            return
        except OSError as exc:  # a full or read-only disk: the twin may send it again as a newer version
            await asyncio.to_thread(shutil.rmtree, where, True)
            await asyncio.to_thread(self._save)
            await refuse(
                t.digest, t.version, "cannot-install",
                f"model {m.slot}: {where}: {exc.strerror}: free space in the state directory, then send it "
                "again as a newer version",
            )  # fmt: skip
            return
        finally:
            for part in m.parts:
                await asyncio.to_thread(shutil.rmtree, t.directory / part.id, True)
        how = slot.stage(candidate, t.version, m.acceptance)
        self._state["last"][m.slot] = {"version": t.version, "outcome": "shadow", "reason": "", "at": _now()}
        self._state["shadow"][m.slot] = {
            "version": t.version,
            "acceptance": m.acceptance.model_dump(mode="json"),
        }
        await asyncio.to_thread(self._save)
        rules = m.acceptance
        period = f"{rules.windows} windows" if rules.windows is not None else f"{rules.seconds:g} s"
        await asyncio.to_thread(
            audit.append, "model-shadow", version=t.version, slot=m.slot,
            detail=f"assembled and loaded; in shadow for {period}; commissioning {how}",
        )  # fmt: skip

    def _unsubscribe(self, t: _Transfer) -> None:
        client = self._client
        if client is not None and not self._c2d:
            try:
                for part in t.manifest.parts:
                    client.unsubscribe(f"{self._root}/chunk/{part.id}/+")
            except Exception as exc:  # noqa: BLE001 - a connection closing: nothing subscribed then
                log.debug("downlink: unsubscribe: %s", exc)

    def _remember(self, digest: str) -> None:
        self._state["done"] = [*self._state["done"], digest][-_DONE_KEPT:]

    async def _record(self, slot: Slot, o: Outcome, audit: AuditLog) -> None:
        """Persist and audit a promotion, rejection or rollback decided by a slot."""
        if o.kind == "promoted":
            await asyncio.to_thread(
                write_installed, self._state_dir, slot.name, slot.version, slot.previous_version
            )
        elif o.kind == "rolled-back":
            await asyncio.to_thread(write_installed, self._state_dir, slot.name, slot.version, None)
        if (self._state["shadow"].get(slot.name) or {}).get("version") == o.version:
            del self._state["shadow"][slot.name]
        self._state["last"][slot.name] = {
            "version": o.version,
            "outcome": o.kind,
            "reason": o.reason,
            "at": _now(),
            "backend": slot.active.backend.name,  # of the version serving after it
        }
        await asyncio.to_thread(self._save)
        await asyncio.to_thread(
            audit.append, f"model-{o.kind}", version=o.version, slot=slot.name, reason=o.reason, detail=o.detail,
            figures=o.figures,
        )  # fmt: skip
        keep = {slot.version, slot.previous_version, (slot.candidate or {}).get("version")}
        await asyncio.to_thread(_prune, self._state_dir, slot.name, keep)

    def reported(self) -> dict[str, Any]:
        """Per slot: the version serving, the one before, the one in shadow, a transfer, the last outcome."""
        out: dict[str, Any] = {}
        t = self.transfer
        for name, slot in self.slots.items():
            entry: dict[str, Any] = {
                "active": slot.version,
                "backend": slot.active.backend.name,
                "previous": slot.previous_version,
                "candidate": slot.candidate,
                "last": self._state["last"].get(name),
            }
            if t is not None and t.manifest.slot == name:
                # The model part's figures at the top, as before bundles carried weights (older twins).
                entry["transfer"] = {
                    "version": t.version,
                    **_progress(t, t.manifest.model),
                    "refused_chunks": t.bad,
                }
                for key, part in t.manifest.extras.items():
                    entry["transfer"][key] = _progress(t, part)
            out[name] = entry
        return out


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _progress(t: _Transfer, part: ModelPart) -> dict[str, Any]:
    """A part's transfer as reported: its id, chunks here, chunks in all, the first 64 missing."""
    missing = t.missing(part)
    out: dict[str, Any] = {"id": part.id, "have": len(part.chunks) - len(missing), "of": len(part.chunks)}
    if part.path is not None:
        out["path"] = part.path
    return {**out, "missing": missing[:64]}


def _prepare(chunks_dir: Path, t: _Transfer) -> int:
    """Keep the chunks of this transfer already in quarantine (hash-checked), drop any others."""
    chunks_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    ours = {t.directory / p.id: p for p in t.manifest.parts}
    for other in chunks_dir.iterdir():
        if other not in ours:
            shutil.rmtree(other, ignore_errors=True) if other.is_dir() else other.unlink(missing_ok=True)
    for directory, part in ours.items():
        directory.mkdir(exist_ok=True, mode=0o700)
        have = t.have.setdefault(part.id, set())
        for path in directory.iterdir():
            ok = path.name.isdigit() and int(path.name) < len(part.chunks)
            if ok and hashlib.sha256(path.read_bytes()).hexdigest() == part.chunks[int(path.name)]:
                have.add(int(path.name))
            else:
                path.unlink(missing_ok=True)
    return sum(len(h) for h in t.have.values())


def _assemble(t: _Transfer, part: ModelPart, what: str) -> bytes:
    """A part's chunks joined, refused unless the whole file has its signed SHA-256 and length."""
    data = b"".join((t.directory / part.id / str(i)).read_bytes() for i in range(len(part.chunks)))
    if len(data) != part.length or hashlib.sha256(data).hexdigest() != part.sha256:
        raise RefusedError(
            "hash-mismatch",
            f"the assembled {what} does not match the signed SHA-256 and length: sign the file that is sent",
        )
    return data


def _bind(spec: ModelFile | None, part: ModelPart, what: str) -> str:
    """The file name the card gives ``part``, refused unless card and manifest name the same file."""
    if (
        spec is None
        or spec.sha256 != part.sha256
        or spec.bytes != part.length
        or (part.path is not None and part.path != spec.path)
        or "/" in spec.path
        or "\\" in spec.path
        or spec.path.startswith(".")
    ):
        raise RefusedError(
            "card-invalid",
            f"the card's {what} entry for its default precision does not name the bundle's {what} "
            "(file name, SHA-256, bytes): sign the card written with this file",
        )
    return spec.path


def _install(t: _Transfer, where: Path) -> ModelCard:
    """Assemble the files, check each as a whole, stage card and files together as ``where``; the card loaded."""
    m = t.manifest
    files = {"model": _assemble(t, m.model, "model")}
    files |= {key: _assemble(t, part, EXTRAS[key][1]) for key, part in m.extras.items()}
    staging = where.with_name(f".{where.name}.staging")
    # A crash while staging leaves a staging directory: any of this slot's goes before the next.
    leftovers = list(where.parent.glob(".v*.staging")) if where.parent.is_dir() else []
    for old in (*leftovers, where):
        if old.exists():
            shutil.rmtree(old)
    staging.mkdir(parents=True, mode=0o700)
    try:
        card = _stage(m, files, staging)
        # One rename: the version's directory appears with every file of the bundle, or not at all.
        staging.rename(where)
        fsync_dir(where.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return card


def _stage(m: Manifest, files: dict[str, bytes], staging: Path) -> ModelCard:
    """Write the card and each file under the name the card gives it into ``staging``; the card loaded."""
    card_path = staging / f"{m.slot}{CARD_SUFFIX}"
    persist.write_atomic(card_path, json.dumps(m.card, indent=1).encode())
    try:
        card = load_card(card_path)
    except (ConfigError, CorruptDataError) as exc:
        raise RefusedError("card-invalid", str(exc)) from exc
    if card.name != m.slot:
        raise RefusedError(
            "card-invalid",
            f"the card is for model {card.name!r}, the bundle for slot {m.slot!r}: send that model's card",
        )
    precision = card.default_precision
    persist.write_atomic(staging / _bind(card.files.get(precision), m.model, "model file"), files["model"])
    for key, part in m.extras.items():
        listed: dict[Any, ModelFile] = dict(getattr(card, EXTRAS[key][0]))
        persist.write_atomic(staging / _bind(listed.get(precision), part, EXTRAS[key][1]), files[key])
    return card


def _prune(state_dir: Path, slot: str, keep: set[Any]) -> None:
    """Remove installed versions other than those serving, before, or in shadow."""
    base = version_dir(state_dir, slot, 0).parent
    if not base.is_dir():
        return
    for d in base.iterdir():
        if d.is_dir() and d.name.startswith("v") and d.name[1:].isdigit() and int(d.name[1:]) not in keep:
            shutil.rmtree(d, ignore_errors=True)
