"""CLI of the downlink: ``edgetwin twin keygen | sign-config | publish-config | rollout-status``, ``audit verify``."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

from gateway.downlink import audit
from gateway.downlink.errors import AuditTamperedError, RefusedError, TrustError
from gateway.downlink.public import named
from gateway.downlink.rollout import (
    add_legend_arg,
    add_rollout_command,
    add_target_args,
    legend_of,
    signed_for,
)
from gateway.downlink.signing import key_id, public_hex, read_private_key, sign, targets, write_private_key
from gateway.errors import ConfigError
from gateway.records.topics import DEFAULT_PREFIX
from gateway.twin.errors import TwinConfigError, TwinError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 78


def _err(text: str) -> None:
    sys.stderr.write(text + "\n")


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")


def cmd_keygen(args: argparse.Namespace) -> int:
    """Create an Ed25519 signing key (0600) and its public key; add it to a trust file when asked."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: PLC0415

    args.out_dir.mkdir(parents=True, exist_ok=True)
    key_path, pub_path = args.out_dir / f"{args.name}.key", args.out_dir / f"{args.name}.pub"
    if key_path.exists():
        _err(f"twin keygen: {key_path} exists: pick another --name, or remove it to replace the key")
        return EXIT_CONFIG
    key = Ed25519PrivateKey.generate()
    write_private_key(key_path, key)
    public = key.public_key()
    kid = key_id(public)
    pub_path.write_text(json.dumps({"keyid": kid, "public": public_hex(public)}) + "\n", encoding="utf-8")
    _say(f"signing key {key_path} (mode 0600), public key {pub_path}, key id {kid}")
    if args.trust is not None:
        trust: dict[str, Any] = {"threshold": 1, "keys": {}, "revoked": []}
        if args.trust.exists():
            trust = json.loads(args.trust.read_text(encoding="utf-8"))
        trust.setdefault("keys", {})[kid] = public_hex(public)
        args.trust.write_text(json.dumps(trust, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        _say(f"trusted in {args.trust}: install it on the gateways as downlink.trust_file")
    return EXIT_OK


def cmd_sign_config(args: argparse.Namespace) -> int:
    """Sign a config file for one gateway (or every gateway: --gateway '*') as a numbered revision."""
    content = args.config.read_bytes()
    keys = [read_private_key(path) for path in args.key]
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(days=args.expires_days)
    who, group = signed_for(args)
    envelope = sign(content, keys=keys, gateway=who, version=args.version, expires=expires, group=group)
    args.out.write_bytes(envelope)
    _say(
        f"config {args.config} as revision {args.version} for gateway {who}, expires "
        f"{expires:%Y-%m-%dT%H:%M:%SZ}, {len(keys)} signature(s): {args.out}"
    )
    return EXIT_OK


def cmd_sign_trust(args: argparse.Namespace) -> int:
    """Sign a new trust set (key rotation): by the current keys and by the new set's own."""
    from gateway.downlink.signing import Trust  # noqa: PLC0415

    content = args.trust.read_bytes()
    new = Trust.from_json(json.loads(content), f"trust file {args.trust}")
    keys = [read_private_key(path) for path in args.key]
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(days=args.expires_days)
    who, group = signed_for(args)
    envelope = sign(
        content, keys=keys, gateway=who, version=args.version, expires=expires, kind="trust", group=group
    )
    args.out.write_bytes(envelope)
    _say(
        f"trust set {args.trust} ({len(new.keys)} key(s), threshold {new.threshold}, {len(new.revoked)} revoked) "
        f"as version {args.version} for gateway {who}: {args.out}; publish it with publish-config"
    )
    return EXIT_OK


def _broker(args: argparse.Namespace) -> Any:
    from gateway.downlink.twin_link import Broker  # noqa: PLC0415 - paho: the optional mqtt extra

    host, _, port = args.broker.rpartition(":")
    if not host:
        host, port = args.broker, "8883"
    return Broker(host.strip("[]"), int(port), args.ca, args.cert, args.key, not args.no_tls, args.protocol)


def cmd_publish_config(args: argparse.Namespace) -> int:
    """Publish a signed revision as the gateway's desired state (retained: an offline gateway gets it later)."""
    from gateway.downlink.twin_link import publish_desired  # noqa: PLC0415

    envelope = args.envelope.read_bytes()
    signed = json.loads(envelope)["signed"]
    named = targets(signed)
    if named is not None and args.gateway not in named:
        _err(
            f"twin publish-config: {args.envelope} is signed for {signed.get('group') or signed['gateway']}, "
            f"not {args.gateway}: sign it again"
        )
        return EXIT_CONFIG
    topic = f"{args.prefix}/{args.gateway}/{'trust' if signed.get('type') == 'trust' else 'desired'}"
    publish_desired(_broker(args), topic, envelope)
    _say(f"revision {signed['version']} published to {topic} (retained)")
    return EXIT_OK


def cmd_azure_desired(args: argparse.Namespace) -> int:
    """The IoT Hub desired-properties patch that carries a signed envelope or a certificate."""
    from gateway.downlink.azure import desired_patch  # noqa: PLC0415

    data = args.file.read_bytes()
    try:
        kind = (
            "cert"
            if args.cert
            else "trust"
            if json.loads(data)["signed"].get("type") == "trust"
            else "config"
        )
        patch = desired_patch(kind, data)
    except (ValueError, KeyError, TypeError) as exc:
        _err(
            f"twin azure-desired {args.file}: {exc}: give an envelope from 'twin sign-config' or 'twin sign-trust'"
        )
        return EXIT_CONFIG
    text = json.dumps(patch, separators=(",", ":"))
    if args.out is not None:
        args.out.write_text(text + "\n")
    else:
        _say(text)
    return EXIT_OK


def cmd_rollout_status(args: argparse.Namespace) -> int:
    """Each gateway's reported state: the revision running, pending, refused and why, audit head."""
    from gateway.downlink.model_commands import model_rollout  # noqa: PLC0415
    from gateway.downlink.twin_link import collect_reported  # noqa: PLC0415

    legend = legend_of(args)
    found = collect_reported(_broker(args), args.prefix, args.gateway or [], args.wait)
    if args.json:
        _say(named(json.dumps(found, indent=1, sort_keys=True), legend))
    else:
        _say(f"{'gateway':<18} {'phase':<12} {'applied':>7} {'pending':>7}  last refused / audit head")
        for name in sorted(found):
            rep = found[name]
            applied = (rep.get("applied") or {}).get("version", "-")
            pending = (rep.get("pending") or {}).get("version", "-")
            refused = rep.get("refused") or []
            last = f"v{refused[-1].get('version')} {refused[-1].get('reason')}" if refused else "-"
            head = (rep.get("audit") or {}).get("head", "")[:12]
            _say(f"{name:<18} {rep.get('phase', '?'):<12} {applied!s:>7} {pending!s:>7}  {last} / {head}")
            how = applied_how(rep.get("applied") or {})
            if how:
                _say(named(f"{'':<18} v{applied}{how}", legend))
            rollback = rep.get("last_rollback") or {}
            if rollback:
                units = ", ".join(rollback.get("units") or []) or "no unit named"
                _say(
                    named(
                        f"{'':<18} last rollback: v{rollback.get('version')} {rollback.get('reason')} ({units})",
                        legend,
                    )
                )
            if rep.get("withheld"):
                _say(
                    f"{'':<18} {rep['withheld']} text(s) withheld: they held an identity (see the gateway's log)"
                )
            for line in model_rollout(rep.get("models")):
                _say(f"{'':<18} {line}")
    missing = [g for g in args.gateway or [] if g not in found]
    for g in missing:
        _say(f"{g}: no reported state (never connected with the downlink on, or another --prefix)")
    return EXIT_FAILURE if missing else EXIT_OK


def cmd_command(args: argparse.Namespace) -> int:
    """Send a command to a gateway: report (its reported state) or rebirth (its status record)."""
    from gateway.downlink.twin_link import send_command  # noqa: PLC0415

    topic = f"{args.prefix}/{args.gateway}/cmd"
    send_command(_broker(args), topic, args.cmd)
    _say(f"{args.cmd} sent to {topic} (not retained: a gateway offline now does not get it)")
    return EXIT_OK


def cmd_renew(args: argparse.Namespace) -> int:
    """Sign a gateway's pending CSR with the fleet's CA and send the certificate back (retained)."""
    from cryptography import x509  # noqa: PLC0415

    from gateway.downlink.renewal import sign_csr  # noqa: PLC0415
    from gateway.downlink.twin_link import fetch_retained, publish_desired  # noqa: PLC0415
    from gateway.uplink.certs import load_key  # noqa: PLC0415

    if args.ca_key.stat().st_mode & 0o077:
        _err(
            f"twin renew: CA key {args.ca_key} is readable by group or others: run 'chmod 600 {args.ca_key}'"
        )
        return EXIT_CONFIG
    broker = _broker(args)
    root = f"{args.prefix}/{args.gateway}"
    csr = fetch_retained(broker, f"{root}/csr")
    if csr is None:
        _say(f"{args.gateway}: no certificate signing request pending ({root}/csr is empty)")
        return EXIT_FAILURE
    ca_cert = x509.load_pem_x509_certificate(args.ca_cert.read_bytes())
    pem = sign_csr(csr, ca_cert, load_key(args.ca_key), days=args.days, gateway=args.gateway)
    publish_desired(broker, f"{root}/cert", pem)
    publish_desired(broker, f"{root}/csr", b"")  # answered: clear the retained request
    _say(f"{args.gateway}: certificate valid {args.days:g} days sent to {root}/cert (retained)")
    return EXIT_OK


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """Verify the downlink audit log's hash chain; print its head."""
    path = args.log
    if path is None:
        from drivers import REGISTRY  # noqa: PLC0415
        from gateway.config import load  # noqa: PLC0415

        path = load(args.config, REGISTRY).core.gateway.state_dir / "downlink" / "audit.jsonl"
    try:
        head = audit.verify(path)
    except AuditTamperedError as exc:
        _err(str(exc))
        return EXIT_FAILURE
    _say(f"{path}: {head.count} entries, chain intact, head {head.hash}")
    if args.expect_head and not head.hash.startswith(args.expect_head):
        _err(
            f"{path}: head {head.hash[:16]} is not the head the twin saw ({args.expect_head}): the log was cut or rewritten"
        )
        return EXIT_FAILURE
    return EXIT_OK


def applied_how(applied: dict[str, Any]) -> str:
    """How a revision was put in place, for a status line: ", in place: restarted source:a" or ""."""
    restarted = ", ".join(applied.get("restarted") or []) or "nothing restarted"
    if applied.get("applied_by") == "units":
        return f", in place: restarted {restarted}"
    if applied.get("applied_by") == "process":
        return f", by restarting the gateway ({restarted})"
    return ""  # written before revisions were applied in place


def cmd_downlink_status(args: argparse.Namespace) -> int:
    """What the twin sent and what became of it, from the state directory (no running gateway needed)."""
    from drivers import REGISTRY  # noqa: PLC0415
    from gateway.config import load  # noqa: PLC0415
    from gateway.downlink import state as persist  # noqa: PLC0415

    config = load(args.config, REGISTRY)
    directory = config.core.gateway.state_dir / "downlink"
    if config.core.downlink.trust_file is None:
        _say(f"downlink: off in {args.config} (no [downlink] trust_file)")
    st = persist.load(directory / "state.json")
    applied = st.applied
    _say(
        "running config: "
        + (
            f"revision {applied['version']} since {applied['at']}{applied_how(applied)}"
            if applied
            else "the local file (no revision applied)"
        )
    )
    if st.pending is not None:
        _say(
            f"on probation: revision {st.pending.version} (started {st.pending.starts} time(s) on it)"
            + applied_how({"applied_by": st.pending.applied_by, "restarted": st.pending.restarted})
        )
    if st.last_rollback:
        rb = st.last_rollback
        _say(f"last rollback: revision {rb['version']} at {rb['at']}: {rb.get('detail') or rb['reason']}")
    for refusal in st.refused[-args.last :]:
        _say(
            f"refused {refusal['at']}: v{refusal['version'] or '?'} {refusal['reason']}: {refusal['detail']}"
        )
    from gateway.downlink.model_commands import model_status  # noqa: PLC0415

    for line in model_status(config.core.gateway.state_dir):
        _say(line)
    _say(
        f"trust set: {'version ' + str(st.trust_version) if st.trust_version else 'the configured trust file'}"
    )
    try:
        head = audit.verify(directory / "audit.jsonl")
    except AuditTamperedError as exc:
        _err(str(exc))
        return EXIT_FAILURE
    _say(f"audit log: {head.count} entries, chain intact, head {head.hash}")
    return EXIT_OK


def _guard(func: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            code: int = func(args)
        except (ConfigError, TwinConfigError, TrustError, OSError) as exc:
            _err(f"edgetwin {args.command}: {exc}")
            return EXIT_CONFIG
        except (TwinError, RefusedError) as exc:
            _err(str(exc))
            return EXIT_FAILURE
        return code

    return run


def _broker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", required=True, help="HOST[:PORT] (default port 8883)")
    p.add_argument("--ca", type=Path, help="CA bundle that signed the broker's certificate")
    p.add_argument("--cert", type=Path, help="the twin's client certificate")
    p.add_argument("--key", type=Path, help="its key")
    p.add_argument("--no-tls", action="store_true", help="plain TCP (loopback brokers only)")
    p.add_argument("--protocol", choices=["5", "3.1.1"], default="5", help="the MQTT protocol version")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help="topic prefix of the gateways")


def add_commands(groups: dict[str, Any]) -> None:
    """Add the downlink's twin commands and ``audit verify``."""
    twin = groups.get("twin")
    if twin is not None:
        p = twin.add_parser("keygen", help="create a signing key (0600) for config revisions")
        p.add_argument("--out-dir", type=Path, required=True, help="where NAME.key and NAME.pub go")
        p.add_argument("--name", default="twin", help="file name of the key")
        p.add_argument(
            "--trust", type=Path, help="add the public key to this trust file (created if missing)"
        )
        p.set_defaults(func=_guard(cmd_keygen))

        p = twin.add_parser("sign-config", help="sign a config file as a numbered revision for a gateway")
        p.add_argument("--config", type=Path, required=True, help="the gateway config file (TOML) to send")
        p.add_argument(
            "--key", type=Path, action="append", required=True, help="signing key (repeat for a threshold)"
        )
        p.add_argument("--version", type=int, required=True, help="revision number, higher than any before")
        add_target_args(p)
        p.add_argument("--expires-days", type=float, default=7.0, help="refused after this many days")
        p.add_argument("--out", type=Path, required=True, help="where the signed envelope goes")
        p.set_defaults(func=_guard(cmd_sign_config))

        p = twin.add_parser("sign-trust", help="sign a new trust set (rotate or revoke keys over the air)")
        p.add_argument(
            "--trust", type=Path, required=True, help="the new trust file (keys, threshold, revoked)"
        )
        p.add_argument(
            "--key", type=Path, action="append", required=True, help="current and new keys (repeatable)"
        )
        p.add_argument("--version", type=int, required=True, help="trust set version, higher than any before")
        add_target_args(p)
        p.add_argument("--expires-days", type=float, default=7.0, help="refused after this many days")
        p.add_argument("--out", type=Path, required=True, help="where the signed envelope goes")
        p.set_defaults(func=_guard(cmd_sign_trust))

        p = twin.add_parser("publish-config", help="publish a signed revision (or trust set) to a gateway")
        p.add_argument("--gateway", required=True, help="the gateway's pseudonym")
        p.add_argument("--envelope", type=Path, required=True, help="from 'twin sign-config'")
        _broker_args(p)
        p.set_defaults(func=_guard(cmd_publish_config))

        p = twin.add_parser(
            "azure-desired", help="the IoT Hub desired-properties patch for a signed envelope (azure profile)"
        )
        p.add_argument(
            "file", type=Path, help="an envelope from 'twin sign-config'/'sign-trust', or a PEM with --cert"
        )
        p.add_argument("--cert", action="store_true", help="the file is a signed certificate (renewal)")
        p.add_argument("--out", type=Path, help="write the patch here instead of standard output")
        p.set_defaults(func=_guard(cmd_azure_desired))

        from gateway.downlink.model_commands import add_model_commands  # noqa: PLC0415

        add_model_commands(twin, _guard, _broker_args)
        add_rollout_command(twin, _guard, _broker_args)

        p = twin.add_parser("command", help="ask a gateway for its reported state or its status record")
        p.add_argument("--gateway", required=True, help="the gateway's pseudonym")
        p.add_argument("--cmd", choices=["report", "rebirth"], required=True, help="what to ask for")
        _broker_args(p)
        p.set_defaults(func=_guard(cmd_command))

        p = twin.add_parser(
            "renew", help="sign a gateway's pending CSR with the fleet's CA, send the certificate"
        )
        p.add_argument("--gateway", required=True, help="the gateway's pseudonym")
        p.add_argument("--ca-cert", type=Path, required=True, help="the CA certificate (PEM)")
        p.add_argument("--ca-key", type=Path, required=True, help="its private key (PEM, mode 0600)")
        p.add_argument("--days", type=float, default=365.0, help="validity of the new certificate")
        _broker_args(p)
        p.set_defaults(func=_guard(cmd_renew))

        p = twin.add_parser("rollout-status", help="what each gateway runs, has pending or refused")
        p.add_argument("--gateway", action="append", help="a gateway's pseudonym (repeatable; none: all)")
        p.add_argument("--wait", type=float, default=2.0, help="seconds to collect reported states")
        p.add_argument("--json", action="store_true", help="the reported states as JSON")
        add_legend_arg(p)
        _broker_args(p)
        p.set_defaults(func=_guard(cmd_rollout_status))

    from gateway.downlink.checks import trust_findings  # noqa: PLC0415
    from gateway.observe.check import OFFLINE_CHECKS  # noqa: PLC0415

    if trust_findings not in OFFLINE_CHECKS:
        OFFLINE_CHECKS.append(trust_findings)  # 'edgetwin check' checks the trust file too
    top = groups["top"]
    p = top.add_parser(
        "downlink", help="what the twin sent and what became of it (local, from the state directory)"
    )
    sub = p.add_subparsers(dest="downlink_what", required=True)
    p = sub.add_parser("status", help="the running revision, probation, rollbacks, refusals, audit head")
    p.add_argument("--config", type=Path, required=True, help="the gateway's TOML config file")
    p.add_argument("--last", type=int, default=5, help="how many refusals to show")
    p.set_defaults(func=_guard(cmd_downlink_status))

    p = top.add_parser("audit", help="the downlink's hash-chained audit log")
    sub = p.add_subparsers(dest="audit_what", required=True)
    p = sub.add_parser("verify", help="verify the audit log's hash chain and print its head")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", type=Path, help="the gateway's config (the log is in its state directory)")
    where.add_argument("--log", type=Path, help="the audit log file itself")
    p.add_argument("--expect-head", help="the head the twin last saw (from rollout-status): must match")
    p.set_defaults(func=_guard(cmd_audit_verify))
