"""Signed firmware manifests: Ed25519 keys, signing, and the checks done before an image is sent.

A manifest names the board an image is for (``target``), its version, size and SHA-256; its
canonical bytes (:meth:`Manifest.encode`) are what the key signs and what the node receives in
FW_BEGIN, so node and gateway check the very same bytes.  On disk a manifest is a small JSON file
next to the image (``<image>.manifest.json``).  Private keys are PKCS#8 PEM files with mode 0600;
public keys are one line of 64 hex digits (what a node build embeds) or PEM.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import struct
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from firmware_bridge.messages import SIG_LEN, Manifest, format_version, parse_version
from gateway.config_base import secret_file_problem
from gateway.errors import ConfigError, CorruptDataError

MANIFEST_FORMAT = "edgetwin-firmware-manifest/1"
SIM_TARGET = "edgetwin-sim-adc3"
SIM_FLAG_SELFTEST_FAIL = 1
SIM_FLAG_SILENT = 2


class ImageRejectedError(CorruptDataError):
    """An image or its manifest failed a check; ``reason`` says which."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # "signature", "hash", "size", "format", "key"


@dataclass(frozen=True, slots=True)
class SignedManifest:
    """A manifest and its Ed25519 signature."""

    manifest: Manifest
    signature: bytes
    public_key: bytes  # who signed it (informative: trust comes from the key the verifier holds)

    def to_json(self) -> str:
        """The JSON file's text."""
        m = self.manifest
        return (
            json.dumps(
                {
                    "format": MANIFEST_FORMAT,
                    "target": m.target,
                    "version": format_version(m.version),
                    "size": m.size,
                    "sha256": m.sha256.hex(),
                    "signature": self.signature.hex(),
                    "public_key": self.public_key.hex(),
                },
                indent=2,
            )
            + "\n"
        )

    @classmethod
    def from_json(cls, text: str, where: str = "manifest") -> SignedManifest:
        """Parse a manifest file; raise ImageRejectedError('format') when it is not one."""
        try:
            return cls._parse(json.loads(text))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ImageRejectedError(
                "format",
                f"firmware {where}: not a valid manifest: {exc}: create it with 'edgetwin firmware sign'",
            ) from exc

    @classmethod
    def _parse(cls, data: dict[str, str]) -> SignedManifest:
        if data.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"format is {data.get('format')!r}, expected {MANIFEST_FORMAT!r}")
        manifest = Manifest(
            str(data["target"]),
            parse_version(str(data["version"])),
            int(data["size"]),
            bytes.fromhex(data["sha256"]),
        )
        manifest.encode()  # field limits: MessageError is a ValueError
        signature = bytes.fromhex(data["signature"])
        if len(signature) != SIG_LEN:
            raise ValueError(f"signature is {len(signature)} bytes, expected {SIG_LEN}")
        return cls(manifest, signature, bytes.fromhex(data.get("public_key", "")))


def manifest_path_for(image: Path) -> Path:
    """Where the manifest of ``image`` lives by default."""
    return image.with_name(image.name + ".manifest.json")


def generate_key(private_path: Path, public_path: Path) -> bytes:
    """Create a key pair: the private key with mode 0600 (refusing to overwrite), the public key as hex."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # O_EXCL: an existing signing key is never replaced by accident; 0600 from the first byte.
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    public_path.write_text(public.hex() + "\n", encoding="ascii")
    return public


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read a PEM Ed25519 private key; refuse one that others can read (ConfigError)."""
    problem = secret_file_problem(path)
    if problem is not None:
        expected, found = problem
        raise ConfigError(f"firmware signing key {path}: unusable: expected {expected}, found {found}")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError, OSError) as exc:
        raise ConfigError(
            f"firmware signing key {path}: cannot load: {exc}: "
            "create one with 'edgetwin firmware keygen' (unencrypted PKCS#8 PEM)"
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(
            f"firmware signing key {path}: not an Ed25519 key: create one with 'edgetwin firmware keygen'"
        )
    return key


def parse_public_key(text: bytes) -> bytes:
    """Raw 32 bytes of a public key given as 64 hex digits or PEM; ValueError otherwise."""
    stripped = text.strip()
    if stripped.startswith(b"-----BEGIN"):
        key = serialization.load_pem_public_key(stripped)
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("not an Ed25519 public key")
        return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    raw = bytes.fromhex(stripped.decode("ascii"))
    if len(raw) != 32:
        raise ValueError(f"an Ed25519 public key is 32 bytes, not {len(raw)}")
    return raw


def load_public_key(path: Path) -> bytes:
    """Read a public key file (hex or PEM) as raw 32 bytes; ConfigError when it is not one."""
    try:
        return parse_public_key(path.read_bytes())
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        raise ConfigError(
            f"firmware public key {path}: cannot load: {exc}: use the .pub file 'edgetwin firmware keygen' wrote"
        ) from exc


def public_key_of(key: Ed25519PrivateKey) -> bytes:
    """Raw public key bytes of a private key."""
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def sign_image(image: bytes, *, target: str, version: int, key: Ed25519PrivateKey) -> SignedManifest:
    """A manifest of ``image`` signed with ``key``."""
    manifest = Manifest(target, version, len(image), hashlib.sha256(image).digest())
    return SignedManifest(manifest, key.sign(manifest.encode()), public_key_of(key))


def verify_manifest(signed: SignedManifest, public_key: bytes) -> None:
    """Check the signature over the manifest's canonical bytes; raise ImageRejectedError('signature')."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signed.signature, signed.manifest.encode())
    except (InvalidSignature, ValueError) as exc:
        other = (
            " (signed by a different key)" if signed.public_key and signed.public_key != public_key else ""
        )
        raise ImageRejectedError(
            "signature",
            f"firmware {format_version(signed.manifest.version)} for {signed.manifest.target}: "
            f"bad signature{other}: the manifest was altered or not signed by the trusted key: "
            "sign the image again with the release key",
        ) from exc


def verify_image(image: bytes, signed: SignedManifest, public_key: bytes) -> Manifest:
    """Check signature, size and SHA-256 of an image before it is sent; raise ImageRejectedError."""
    verify_manifest(signed, public_key)
    m = signed.manifest
    what = f"firmware {format_version(m.version)} for {m.target}"
    if len(image) != m.size:
        raise ImageRejectedError(
            "size",
            f"{what}: image is {len(image)} bytes, the manifest says {m.size}: use the image that was signed",
        )
    digest = hashlib.sha256(image).digest()
    if digest != m.sha256:
        raise ImageRejectedError(
            "hash",
            f"{what}: image sha256 {digest.hex()[:16]}... differs from the signed {m.sha256.hex()[:16]}...: "
            "the image was altered after signing: use the image that was signed",
        )
    return m


def make_sim_image(version: int, size: int = 24576, *, flags: int = 0, seed: int = 0) -> bytes:
    """An image the simulated node can run: "SIMG", flags, version, then seeded filler bytes."""
    if size < 12:
        raise ValueError("a simulated image is at least 12 bytes")
    filler = random.Random(seed * 65537 + version).randbytes(size - 12)
    return b"SIMG" + struct.pack("<II", flags, version) + filler
