"""``edgetwin firmware keygen|sign|verify|push|status`` and ``edgetwin sim node|node-image``."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from drivers.mcu.config import BAUD_RATES, SimNodeConfig
from drivers.mcu.handover import port_from_gateway
from drivers.mcu.link import Link
from drivers.mcu.simnode import sim_node_args
from drivers.mcu.update import PushResult, UpdateRefusedError, node_hello, push_firmware
from drivers.portlock import PortInUseError
from firmware_bridge.build import build_sim_node, cache_dir
from firmware_bridge.manifest import (
    SIM_FLAG_SELFTEST_FAIL,
    SIM_FLAG_SILENT,
    ImageRejectedError,
    SignedManifest,
    generate_key,
    load_private_key,
    load_public_key,
    make_sim_image,
    manifest_path_for,
    sign_image,
    verify_image,
)
from firmware_bridge.messages import Cap, format_version, parse_version
from gateway.errors import ConfigError, EdgetwinError, TransientError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFIG = 78


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _err(text: str) -> None:
    sys.stderr.write(text + "\n")


def _read_image(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"firmware image {path}: cannot read: {exc.strerror}: check the path") from exc


def _read_manifest(image: Path, manifest: Path | None) -> SignedManifest:
    path = manifest or manifest_path_for(image)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"firmware manifest {path}: cannot read: {exc.strerror}: sign the image with 'edgetwin firmware sign'"
        ) from exc
    return SignedManifest.from_json(text, str(path))


def cmd_keygen(args: argparse.Namespace) -> int:
    """Create an Ed25519 signing key (mode 0600) and its public key."""
    prefix: Path = args.out
    private, public = prefix.with_name(prefix.name + ".key"), prefix.with_name(prefix.name + ".pub")
    try:
        raw = generate_key(private, public)
    except FileExistsError:
        _err(f"firmware keygen: {private} exists: a signing key is never overwritten: choose another --out")
        return EXIT_CONFIG
    except OSError as exc:
        _err(f"firmware keygen: cannot write {private}: {exc.strerror}")
        return EXIT_FAILURE
    _say(f"private key {private} (mode 0600: keep it off the gateways)\npublic key  {public}: {raw.hex()}")
    return EXIT_OK


def cmd_sign(args: argparse.Namespace) -> int:
    """Sign an image: write its manifest next to it."""
    try:
        version = parse_version(args.version)
    except ValueError as exc:
        _err(f"firmware sign: {exc}")
        return EXIT_USAGE
    try:
        key = load_private_key(args.key)
        image = _read_image(args.image)
        signed = sign_image(image, target=args.target, version=version, key=key)
    except ConfigError as exc:
        _err(str(exc))
        return EXIT_CONFIG
    except ValueError as exc:  # a target name that does not fit the manifest
        _err(f"firmware sign {args.image}: {exc}")
        return EXIT_USAGE
    out: Path = args.out or manifest_path_for(args.image)
    out.write_text(signed.to_json(), encoding="utf-8")
    m = signed.manifest
    _say(
        f"signed {args.image}: {m.target} {format_version(m.version)}, {m.size} bytes, sha256 {m.sha256.hex()}\n"
        f"manifest {out}"
    )
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    """Check an image against its manifest and a trusted public key."""
    try:
        public = load_public_key(args.pubkey)
        image = _read_image(args.image)
        signed = _read_manifest(args.image, args.manifest)
        m = verify_image(image, signed, public)
    except ImageRejectedError as exc:
        _err(f"REJECTED ({exc.reason}): {exc}")
        return EXIT_FAILURE
    except ConfigError as exc:
        _err(str(exc))
        return EXIT_CONFIG
    _say(
        f"OK {args.image}: {m.target} {format_version(m.version)}, {m.size} bytes, signature and sha256 valid"
    )
    return EXIT_OK


async def _push(args: argparse.Namespace, image: bytes, signed: SignedManifest, public: bytes) -> int:
    def progress(done: int, total: int) -> None:
        if args.progress:
            sys.stderr.write(f"\r{done}/{total} bytes")

    async def push() -> PushResult:
        async with Link(
            args.port, baud=args.baud, timeout_s=args.timeout, retries=args.retries, who="firmware push"
        ) as link:
            return await push_firmware(
                link,
                image,
                signed,
                public,
                health_timeout_s=args.health_timeout,
                force=args.force,
                progress=progress,
            )

    try:
        res = await push()
    except PortInUseError as busy:
        # A running gateway reads this node: it lends the port for the push and takes it back.
        async with port_from_gateway(args.port, "firmware push") as lent:
            if not lent:
                raise busy from None
            _say(f"the gateway's source on {args.port} paused for the push; it resumes when the push ends")
            res = await push()
    if args.progress:
        sys.stderr.write("\n")
    detail = (
        f"{format_version(res.from_version)} -> {format_version(res.to_version)}, "
        f"sent {res.sent_bytes} bytes"
        + (f" (resumed at {res.resumed_at})" if res.resumed_at else "")
        + f" in {res.seconds:.1f} s"
    )
    if res.outcome == "committed":
        _say(f"COMMITTED node {res.node_id}: {detail}")
        return EXIT_OK
    if res.outcome == "up_to_date":
        _say(
            f"UP TO DATE node {res.node_id} already runs {format_version(res.running_version)} (--force reinstalls)"
        )
        return EXIT_OK
    _err(f"ROLLED BACK node {res.node_id}: {detail}; it runs {format_version(res.running_version)} again")
    return EXIT_FAILURE


def cmd_push(args: argparse.Namespace) -> int:
    """Verify, transfer, reboot into trial and commit an image on a node."""
    try:
        public = load_public_key(args.pubkey)
        image = _read_image(args.image)
        signed = _read_manifest(args.image, args.manifest)
        verify_image(image, signed, public)  # before the port is even opened
        return asyncio.run(_push(args, image, signed, public))
    except ImageRejectedError as exc:
        _err(f"REJECTED ({exc.reason}): {exc}")
        return EXIT_FAILURE
    except UpdateRefusedError as exc:
        _err(f"REFUSED ({exc.reason}): {exc}")
        return EXIT_FAILURE
    except ConfigError as exc:
        _err(str(exc))
        return EXIT_CONFIG
    except (TransientError, EdgetwinError) as exc:
        _err(f"FAILED: {exc} (pushing again resumes the transfer)")
        return EXIT_FAILURE


async def _status(args: argparse.Namespace) -> int:
    # A status query never pauses a gateway's source: a port in use is refused, naming the holder.
    async with Link(args.port, baud=args.baud, timeout_s=args.timeout, who="firmware status") as link:
        h = await node_hello(link)
    caps = ", ".join((c.name or "").lower() for c in Cap if c in h.caps) if h.caps else "none"
    _say(
        f"node {h.node_id} ({h.target}): firmware {format_version(h.fw_version)} in slot {'AB'[h.active_slot & 1]}, "
        f"{h.boot_state.name.lower()}, health {h.health.name.lower()}; {h.n_channels} channels, "
        f"tick {h.tick_hz} Hz; capabilities: {caps}"
    )
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    """Show what a node runs."""
    try:
        return asyncio.run(_status(args))
    except ConfigError as exc:
        _err(str(exc))
        return EXIT_CONFIG
    except EdgetwinError as exc:
        _err(f"FAILED: {exc}")
        return EXIT_FAILURE


def cmd_sim_node(args: argparse.Namespace) -> int:
    """Build and run a simulated node in the foreground; it prints its pty path."""
    try:
        cfg = SimNodeConfig(
            node_id=args.node_id,
            seed=args.seed,
            drift_ppm=args.drift_ppm,
            pubkey_file=args.pubkey,
            trial_timeout_s=args.trial_timeout,
            drop_prob=args.drop_prob,
            corrupt_prob=args.corrupt_prob,
            garbage_prob=args.garbage_prob,
        )
        binary = build_sim_node()
    except ConfigError as exc:
        _err(str(exc))
        return EXIT_CONFIG
    except ValueError as exc:
        _err(f"sim node: {exc}")
        return EXIT_USAGE
    flash: Path = args.flash or cache_dir() / f"sim-node-{args.node_id}.flash"
    flash.parent.mkdir(parents=True, exist_ok=True)
    _err(f"sim node {args.node_id}: flash {flash}; Ctrl-C stops it")
    sys.stdout.flush()
    sys.stderr.flush()
    # The node takes over this process, so Ctrl-C and SIGTERM reach it directly.
    try:
        os.execv(binary, [str(binary), *sim_node_args(cfg, flash, args.link)])  # noqa: S606
    except OSError as exc:
        _err(f"sim node: cannot run {binary}: {exc.strerror}")
    return EXIT_FAILURE


def cmd_sim_node_image(args: argparse.Namespace) -> int:
    """Write an image the simulated node can run (optionally one that fails its self-test)."""
    try:
        version = parse_version(args.version)
    except ValueError as exc:
        _err(f"sim node-image: {exc}")
        return EXIT_USAGE
    flags = (SIM_FLAG_SELFTEST_FAIL if args.fail_selftest else 0) | (SIM_FLAG_SILENT if args.silent else 0)
    args.out.write_bytes(make_sim_image(version, args.size, flags=flags))
    _say(
        f"wrote {args.out}: simulated node image {format_version(version)}, {args.size} bytes, flags {flags}"
    )
    return EXIT_OK


def _port_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=Path, required=True, help="serial device or pty of the node")
    p.add_argument("--baud", type=int, default=115200, choices=BAUD_RATES, help="the serial link speed")
    p.add_argument("--timeout", type=float, default=0.5, help="seconds to wait for each answer")


def add_commands(groups: dict[str, Any]) -> None:
    """Register ``firmware ...`` and ``sim node`` / ``sim node-image``."""
    fw = groups["top"].add_parser("firmware", help="sign, verify and push firmware of microcontroller nodes")
    sub = fw.add_subparsers(dest="firmware_what", required=True)

    p = sub.add_parser("keygen", help="create an Ed25519 signing key pair")
    p.add_argument("--out", type=Path, required=True, help="writes OUT.key (mode 0600) and OUT.pub")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("sign", help="sign an image: writes IMAGE.manifest.json")
    p.add_argument("image", type=Path)
    p.add_argument("--key", type=Path, required=True, help="private key (PEM, mode 0600)")
    p.add_argument("--target", required=True, help="board the image is for, as the node reports it")
    p.add_argument("--version", required=True, help="MAJOR.MINOR.PATCH")
    p.add_argument("--out", type=Path, default=None, help="manifest path (default IMAGE.manifest.json)")
    p.set_defaults(func=cmd_sign)

    p = sub.add_parser("verify", help="check an image's signature and hash")
    p.add_argument("image", type=Path)
    p.add_argument("--pubkey", type=Path, required=True, help="trusted public key (hex or PEM)")
    p.add_argument(
        "--manifest", type=Path, default=None, help="the signed manifest (default: next to the image)"
    )
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("push", help="install a signed image on a node (resumable, rolled back if unhealthy)")
    p.add_argument("image", type=Path)
    _port_args(p)
    p.add_argument("--pubkey", type=Path, required=True, help="trusted public key (hex or PEM)")
    p.add_argument(
        "--manifest", type=Path, default=None, help="the signed manifest (default: next to the image)"
    )
    p.add_argument("--retries", type=int, default=3, help="retransmissions of each request")
    p.add_argument(
        "--health-timeout", type=float, default=30.0, help="seconds for the node to come back healthy"
    )
    p.add_argument("--force", action="store_true", help="reinstall the version the node already runs")
    p.add_argument("--progress", action="store_true", help="show bytes sent")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("status", help="show what a node runs")
    _port_args(p)
    p.set_defaults(func=cmd_status)

    p = groups["sim"].add_parser("node", help="a simulated microcontroller node on a pseudo-terminal")
    p.add_argument("--link", type=Path, default=None, help="also make this symlink to the pty")
    p.add_argument("--flash", type=Path, default=None, help="flash file (default: in the user's cache)")
    p.add_argument("--node-id", default="SIM-0001", help="the simulated node's id")
    p.add_argument("--seed", type=int, default=0, help="random seed of the simulated node")
    p.add_argument("--drift-ppm", type=float, default=0.0, help="the node crystal's error, in ppm")
    p.add_argument("--pubkey", type=Path, default=None, help="public key the node checks images against")
    p.add_argument(
        "--trial-timeout",
        type=float,
        default=10.0,
        help="seconds a new image has to be committed before rollback",
    )
    p.add_argument("--drop-prob", type=float, default=0.0, help="probability of dropping a frame")
    p.add_argument("--corrupt-prob", type=float, default=0.0, help="probability of corrupting a frame")
    p.add_argument("--garbage-prob", type=float, default=0.0, help="probability of sending garbage bytes")
    p.set_defaults(func=cmd_sim_node)

    p = groups["sim"].add_parser("node-image", help="write a firmware image the simulated node runs")
    p.add_argument("out", type=Path)
    p.add_argument("--version", required=True, help="MAJOR.MINOR.PATCH (informative; the manifest decides)")
    p.add_argument("--size", type=int, default=24576, help="image size in bytes")
    p.add_argument(
        "--fail-selftest", action="store_true", help="the node's self-test fails: it must roll back"
    )
    p.add_argument("--silent", action="store_true", help="the node says nothing in trial: it must roll back")
    p.set_defaults(func=cmd_sim_node_image)
