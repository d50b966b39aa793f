"""Signed envelopes: Ed25519 signatures over canonical JSON metadata that binds the content's hash.

An envelope is one JSON document::

    {"signed": {"type": "config", "gateway": "<pseudonym>", "version": 7,
                "expires": "2026-12-10T12:00:00Z", "sha256": "<hex>", "length": 812},
     "signatures": [{"keyid": "<hex>", "sig": "<hex>"}],
     "content": "<base64 of the config file>"}

``gateway`` is one pseudonym, ``"*"`` (every gateway), or a list of pseudonyms (a named group,
with its name in ``"group"``): a gateway takes only what names it.  The versions stay per gateway:
a refusal for not being named leaves its anti-rollback counter as it was.

The signature covers the canonical form of ``signed`` only (sorted keys, no spaces), which names
the content by its SHA-256 and length: content swapped in from another revision fails the hash,
metadata from another revision fails the signature.  :func:`verify` is pure: it takes the bytes,
the trust set, the highest version already accepted and the time, and returns the content or
raises :class:`~gateway.downlink.errors.RefusedError` with the reason.  Which TUF attacks this
defends against is written down in ``docs/downlink.md``.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gateway.downlink.errors import RefusedError, TrustError

MAX_ENVELOPE_BYTES = 256 * 1024  # a config file is a few kB; AWS IoT's payload limit is 128 kB


def canonical(obj: Any) -> bytes:
    """The bytes that are signed: JSON with sorted keys and no spaces."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def key_id(public: Ed25519PublicKey) -> str:
    """A key's id: SHA-256 of its raw public bytes, hex."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def public_hex(public: Ed25519PublicKey) -> str:
    """A public key as hex of its 32 raw bytes (the trust file's form)."""
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


@dataclass(frozen=True, slots=True)
class Trust:
    """The keys a gateway accepts, how many must sign, and which were revoked."""

    keys: dict[str, Ed25519PublicKey]
    threshold: int = 1
    revoked: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def load(cls, path: Path) -> Trust:
        """Read a trust file; TrustError naming the file and what is wrong."""
        where = f"downlink trust file {path}"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise TrustError(
                f"{where}: cannot read it: {exc.strerror}: write it with 'edgetwin twin keygen --trust'"
            ) from exc
        except json.JSONDecodeError as exc:
            raise TrustError(
                f"{where}: not JSON: {exc}: write it with 'edgetwin twin keygen --trust'"
            ) from exc
        return cls.from_json(data, where)

    @classmethod
    def from_json(cls, data: Any, where: str) -> Trust:
        """The trust set from its parsed JSON; TrustError when a key or the threshold is wrong."""
        if not isinstance(data, dict) or not isinstance(data.get("keys"), dict):
            raise TrustError(
                f'{where}: expected {{"keys": {{keyid: public key hex}}, "threshold": n}}, found {data!r:.80}'
            )
        keys: dict[str, Ed25519PublicKey] = {}
        for kid, hexkey in data["keys"].items():
            try:
                public = Ed25519PublicKey.from_public_bytes(bytes.fromhex(str(hexkey)))
            except ValueError as exc:
                raise TrustError(
                    f"{where}: keys.{kid}: expected 64 hex digits of an Ed25519 public key"
                ) from exc
            if key_id(public) != kid:
                raise TrustError(
                    f"{where}: keys.{kid}: the id is not the SHA-256 of the key: copy both from keygen"
                )
            keys[kid] = public
        threshold = data.get("threshold", 1)
        revoked = data.get("revoked", [])
        if not isinstance(threshold, int) or not 1 <= threshold <= max(1, len(keys)):
            raise TrustError(f"{where}: threshold: expected 1..{len(keys)}, found {threshold!r}")
        if not isinstance(revoked, list):
            raise TrustError(f"{where}: revoked: expected a list of key ids, found {revoked!r:.60}")
        return cls(keys, threshold, frozenset(str(r) for r in revoked))


@dataclass(frozen=True, slots=True)
class Group:
    """A named set of gateways (pseudonyms) one envelope is signed for."""

    name: str
    members: tuple[str, ...]

    @classmethod
    def load(cls, path: Path) -> Group:
        """A group file: one pseudonym a line, '#' comments; named by the file's stem."""
        where = f"twin group file {path}"
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise TrustError(f"{where}: cannot read it: {exc.strerror}: write one pseudonym a line") from exc
        members = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
        members = [m for m in members if m]
        bad = [m for m in members if m == "*" or any(c.isspace() or c in "/+#" for c in m)]
        if not members or bad or len(set(members)) != len(members):
            why = f"not a pseudonym: {bad[0]!r}" if bad else "empty" if not members else "a pseudonym twice"
            raise TrustError(f"{where}: {why}: expected one gateway pseudonym a line, each once")
        return cls(path.stem, tuple(members))


def targets(signed: Any) -> list[str] | None:
    """The pseudonyms an envelope's ``signed`` part names; None for every gateway ('*')."""
    target = signed.get("gateway") if isinstance(signed, dict) else None
    if target == "*":
        return None
    return [str(t) for t in target] if isinstance(target, list) else [str(target)]


@dataclass(frozen=True, slots=True)
class Verified:
    """What a valid envelope carries."""

    kind: str
    version: int
    sha256: str
    expires: dt.datetime
    content: bytes
    keyids: tuple[str, ...]


def sign(
    content: bytes,
    *,
    keys: list[Ed25519PrivateKey],
    gateway: str,
    version: int,
    expires: dt.datetime,
    kind: str = "config",
    group: Group | None = None,
) -> bytes:
    """An envelope for ``content``, signed by each of ``keys``: for ``gateway``, or every member of ``group``."""
    signed: dict[str, Any] = {
        "type": kind,
        "gateway": list(group.members) if group is not None else gateway,
        "version": version,
        "expires": expires.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "sha256": hashlib.sha256(content).hexdigest(),
        "length": len(content),
    }
    if group is not None:
        signed["group"] = group.name
    body = canonical(signed)
    signatures = [{"keyid": key_id(k.public_key()), "sig": k.sign(body).hex()} for k in keys]
    envelope = {"signed": signed, "signatures": signatures, "content": base64.b64encode(content).decode()}
    return json.dumps(envelope, indent=1).encode()


def verify(
    data: bytes,
    trust: Trust,
    *,
    gateway: str,
    accepted_version: int,
    now: dt.datetime,
    kind: str = "config",
) -> Verified:
    """The content of a valid envelope of ``kind`` for ``gateway``; RefusedError (with its reason) otherwise."""
    if len(data) > MAX_ENVELOPE_BYTES:
        raise RefusedError("too-large", f"envelope of {len(data)} bytes: at most {MAX_ENVELOPE_BYTES}")
    try:
        env = json.loads(data)
        signed, signatures = env["signed"], env.get("signatures") or []
        found_kind, target, version = str(signed["type"]), signed["gateway"], signed["version"]
        expires = dt.datetime.strptime(str(signed["expires"]), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
        digest, length = str(signed["sha256"]), int(signed["length"])
        content = base64.b64decode(str(env["content"]), validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        # The exception's text quotes the payload (strptime: the whole 'expires' value): not echoed.
        raise RefusedError("malformed", f"not a signed envelope ({type(exc).__name__})") from exc
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise RefusedError("malformed", f"version must be a positive integer, found {excerpt(version)}")
    if not isinstance(signatures, list):
        raise RefusedError("malformed", "signatures must be a list")
    if not signatures:
        raise RefusedError("unsigned", "the envelope carries no signature")
    good, revoked = _signers(signatures, canonical(signed), trust)
    if len(good) < trust.threshold:
        if revoked and not good:
            raise RefusedError("revoked-key", f"signed only by revoked key(s) {', '.join(revoked)}")
        raise RefusedError(
            "bad-signature",
            f"{len(good)} valid signature(s) from trusted keys, {trust.threshold} needed "
            "(unknown key, or the metadata was altered after signing)",
        )
    if found_kind != kind:
        raise RefusedError("wrong-type", f"type {excerpt(found_kind)} where a {kind!r} envelope belongs")
    if isinstance(target, list):
        if gateway not in [str(m) for m in target]:
            raise RefusedError(
                "not-in-group",
                f"signed for group {excerpt(signed.get('group') or '?')} of {len(target)} gateway(s), "
                f"{gateway} is not one of them",
            )
    elif str(target) not in (gateway, "*"):
        raise RefusedError("wrong-gateway", f"signed for gateway {excerpt(target)}, this is {gateway}")
    if now >= expires:
        raise RefusedError("expired", f"expired {expires:%Y-%m-%dT%H:%M:%SZ} (now {now:%Y-%m-%dT%H:%M:%SZ})")
    if version <= accepted_version:
        raise RefusedError(
            "rollback", f"version {version} is not newer than version {accepted_version} already accepted"
        )
    if len(content) != length or hashlib.sha256(content).hexdigest() != digest:
        raise RefusedError("hash-mismatch", "the content does not match the signed SHA-256 and length")
    return Verified(kind, version, digest, expires, content, tuple(sorted(good)))


_EXCERPT_CHARS = 24
_EXCERPT_KEPT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.*")


def excerpt(value: object) -> str:
    """A short, quoted excerpt of an unverified value for a refusal's detail: no control or markup characters."""
    text = "".join(c if c in _EXCERPT_KEPT else "?" for c in str(value)[:_EXCERPT_CHARS])
    return f"'{text}'" + ("..." if len(str(value)) > _EXCERPT_CHARS else "")


def _signers(signatures: list[Any], body: bytes, trust: Trust) -> tuple[set[str], list[str]]:
    """Key ids of ``trust`` whose valid signature over ``body`` is present; revoked ids met."""
    good: set[str] = set()
    revoked: list[str] = []
    for entry in signatures:
        kid = str(entry.get("keyid", "")) if isinstance(entry, dict) else ""
        if kid in trust.revoked:
            revoked.append(kid[:12])
            continue
        public = trust.keys.get(kid)
        if public is None:
            continue
        try:
            public.verify(bytes.fromhex(str(entry.get("sig", ""))), body)
        except (InvalidSignature, ValueError):
            continue
        good.add(kid)
    return good, revoked


def verify_rotation(
    data: bytes, current: Trust, *, gateway: str, accepted_version: int, now: dt.datetime
) -> tuple[Verified, Trust]:
    """A new trust set, signed by a threshold of the current keys *and* of its own (TUF's root rotation)."""
    found = verify(data, current, gateway=gateway, accepted_version=accepted_version, now=now, kind="trust")
    try:
        new = Trust.from_json(json.loads(found.content), "the new trust set")
    except (ValueError, TrustError) as exc:
        raise RefusedError("malformed", f"the new trust set does not load ({type(exc).__name__})") from exc
    env = json.loads(data)
    good, _ = _signers(env.get("signatures") or [], canonical(env["signed"]), new)
    if len(good) < new.threshold:
        raise RefusedError(
            "bad-signature",
            f"the new trust set is signed by {len(good)} of its own keys, {new.threshold} needed: "
            "sign it with the new keys too",
        )
    return found, new


def write_private_key(path: Path, key: Ed25519PrivateKey) -> None:
    """Write a private key as PEM, mode 0600 from the start (never readable by others on the way)."""
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def read_private_key(path: Path) -> Ed25519PrivateKey:
    """Read an Ed25519 private key; refuses one readable by group or others."""
    where = f"twin signing key {path}"
    try:
        mode = path.stat().st_mode & 0o077
        data = path.read_bytes()
    except OSError as exc:
        raise TrustError(
            f"{where}: cannot read it: {exc.strerror}: create it with 'edgetwin twin keygen'"
        ) from exc
    if mode:
        raise TrustError(f"{where}: readable by group or others: run 'chmod 600 {path}'")
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise TrustError(f"{where}: not an Ed25519 key: create one with 'edgetwin twin keygen'")
    return key
