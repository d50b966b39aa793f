"""Group and staged rollouts: ``edgetwin twin rollout`` sends a signed revision or bundle to canaries first.

An envelope is signed for one gateway, for every gateway (``'*'``) or for a named group (a group
file, one pseudonym a line; the list goes into the signed metadata, so each gateway checks it is a
member and refuses with ``not-in-group`` otherwise).  ``rollout`` publishes it to the canary
gateways only, watches their reported states, and publishes it to the rest only once every canary
reports it applied (a config revision, a trust set) or promoted (a model bundle) with no unit
failed, within the deadline.  A refusal, a rollback or a rejection on a canary halts the rollout:
it says which gateway and why, and the rest never receive the envelope (each gateway has its own
retained topic).  :func:`judge` is pure: one gateway's reported state against what was sent.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.downlink.public import named
from gateway.downlink.signing import Group, targets
from gateway.twin.errors import TwinConfigError

EXIT_OK = 0
EXIT_FAILURE = 1
_POLL_S = 1.0

DONE, WAITING, HALTED = "done", "waiting", "halted"
_BAD_UNITS = ("failed", "retrying")


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def add_target_args(p: argparse.ArgumentParser) -> None:
    """``--gateway`` or ``--group`` (one of them) for the sign commands."""
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--gateway", help="the gateway's pseudonym, or '*' for every gateway")
    who.add_argument(
        "--group", type=Path, help="a group file (one pseudonym a line): signed for exactly those gateways"
    )


def signed_for(args: argparse.Namespace) -> tuple[str, Group | None]:
    """The gateway (or group name) an envelope is signed for, and the group when there is one."""
    if getattr(args, "group", None) is not None:
        group = Group.load(args.group)
        return f"group {group.name} ({len(group.members)} gateways)", group
    return str(args.gateway), None


@dataclass(frozen=True, slots=True)
class Sent:
    """What a rollout sends: the envelope's kind and version (and the model slot of a bundle)."""

    kind: str
    version: int
    slot: str | None = None


def _new_refusal(rep: dict[str, Any], before: dict[str, Any], version: int) -> dict[str, Any] | None:
    seen = before.get("refused") or []
    for entry in rep.get("refused") or []:
        if entry not in seen and entry.get("version") in (version, None):
            return dict(entry)
    return None


def judge(sent: Sent, rep: dict[str, Any], before: dict[str, Any]) -> tuple[str, str]:
    """(done | waiting | halted, why) for one gateway's reported state ``rep`` (``before``: ahead of the send)."""
    if not rep:
        return WAITING, "no reported state"
    rollback = rep.get("last_rollback") or {}
    if (
        sent.kind == "config"
        and rollback.get("version") == sent.version
        and rollback != before.get("last_rollback")
    ):
        units = f" ({', '.join(rollback.get('units') or [])})" if rollback.get("units") else ""
        return HALTED, f"v{sent.version} rolled back: {rollback.get('reason')}{units}"
    # (A rollback is in the refusals too; its cause is told above.)
    refusal = _new_refusal(rep, before, sent.version)
    if refusal is not None:
        return HALTED, f"v{sent.version} refused: {refusal.get('reason')}"
    # Units that were down already before the send are excused, as the gateway's own probation does.
    was = before.get("units") or {}
    bad = sorted(
        name
        for name, state in (rep.get("units") or {}).items()
        if state in _BAD_UNITS and was.get(name) not in _BAD_UNITS
    )
    if sent.kind == "model":
        m = (rep.get("models") or {}).get(sent.slot or "") or {}
        last = m.get("last") or {}
        if last.get("version") == sent.version:
            outcome = last.get("outcome")
            if outcome in ("rejected", "rolled-back"):
                return HALTED, f"model {sent.slot} v{sent.version} {outcome}: {last.get('reason') or '?'}"
            if outcome == "promoted" and m.get("active") == sent.version:
                return (HALTED, f"unit(s) {', '.join(bad)} not running") if bad else (DONE, "promoted")
            return WAITING, f"model {sent.slot} v{sent.version} {outcome}"
        transfer = m.get("transfer") or {}
        if transfer.get("version") == sent.version:
            return WAITING, f"receiving {transfer.get('have')}/{transfer.get('of')} chunks"
        return WAITING, f"model {sent.slot} serving v{m.get('active')}"
    if sent.kind == "trust":
        if (rep.get("trust") or {}).get("version") == sent.version:
            return DONE, "trust set taken"
        return WAITING, f"trust set v{(rep.get('trust') or {}).get('version')}"
    applied = (rep.get("applied") or {}).get("version")
    if applied == sent.version and rep.get("pending") is None and rep.get("phase") == "running":
        return (HALTED, f"unit(s) {', '.join(bad)} not running") if bad else (DONE, "applied, healthy")
    pending = (rep.get("pending") or {}).get("version")
    return WAITING, f"{rep.get('phase')}, applied v{applied}" + (
        f", v{pending} on probation" if pending else ""
    )


def stale(sent: Sent, before: dict[str, Any]) -> str | None:
    """Why a gateway would refuse ``sent`` as a rollback, from its reported state before the send."""
    if sent.kind == "config" and int(before.get("accepted") or 0) >= sent.version:
        return f"already accepted revision {before['accepted']}"
    if sent.kind == "trust" and int((before.get("trust") or {}).get("version") or 0) >= sent.version:
        return f"already has trust set v{before['trust']['version']}"
    if sent.kind == "model":
        m = (before.get("models") or {}).get(sent.slot or "") or {}
        held = max(int(m.get("active") or 0), int((m.get("last") or {}).get("version") or 0))
        if held >= sent.version:
            return f"already has model {sent.slot} v{held}"
    return None


def _read(args: argparse.Namespace) -> tuple[bytes, dict[str, Any], Sent]:
    envelope = args.envelope.read_bytes()
    try:
        signed = json.loads(envelope)["signed"]
        kind, version = str(signed["type"]), int(signed["version"])
        slot = None
        if kind == "model":
            slot = json.loads(base64.b64decode(json.loads(envelope)["content"]))["slot"]
    except (ValueError, KeyError, TypeError) as exc:
        raise TwinConfigError(
            f"twin rollout --envelope {args.envelope}: not a signed envelope ({exc}): "
            "give one from 'twin sign-config', 'sign-trust' or 'sign-model'"
        ) from exc
    if kind == "model" and args.model is None:
        raise TwinConfigError("twin rollout: a model bundle needs --model (the ONNX file it was signed with)")
    return envelope, signed, Sent(kind, version, slot)


def _targets(args: argparse.Namespace, signed: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(canaries, rest), every one of them named by the envelope."""
    gateways = list(Group.load(args.group).members) if args.group is not None else list(args.gateway or [])
    if not gateways:
        raise TwinConfigError("twin rollout: no gateway: give --group FILE or --gateway (repeatable)")
    named = targets(signed)
    outside = [g for g in gateways if named is not None and g not in named]
    if outside:
        raise TwinConfigError(
            f"twin rollout: {', '.join(outside)} not among the gateways the envelope is signed for "
            f"({signed.get('group') or signed.get('gateway')}): sign it for the group"
        )
    canaries = list(args.canary or gateways[: args.canaries])
    unknown = [c for c in canaries if c not in gateways]
    if unknown or not canaries:
        raise TwinConfigError(
            f"twin rollout --canary: {', '.join(unknown) or 'none'}: pick canaries among the rollout's gateways"
        )
    return canaries, [g for g in gateways if g not in canaries]


def _publish(args: argparse.Namespace, broker: Any, envelope: bytes, sent: Sent, gateways: list[str]) -> None:
    from gateway.downlink.model_commands import bundle_files, chunk_messages, given_extras  # noqa: PLC0415
    from gateway.downlink.twin_link import publish_desired, publish_many  # noqa: PLC0415

    for gw in gateways:
        root = f"{args.prefix}/{gw}"
        if sent.kind == "model":
            model, extras = bundle_files(envelope, args.model, given_extras(args))
            publish_many(broker, chunk_messages(root, envelope, model, None, **extras))
        else:
            publish_desired(broker, f"{root}/{'trust' if sent.kind == 'trust' else 'desired'}", envelope)


def legend_of(args: argparse.Namespace) -> dict[str, str]:
    """The ``--legend`` file's pseudonyms (empty without one): the twin's view names sources on site."""
    from gateway.legend import names  # noqa: PLC0415

    return {} if getattr(args, "legend", None) is None else names(args.legend)


def add_legend_arg(p: argparse.ArgumentParser) -> None:
    """``--legend FILE``: name sources as the site does."""
    p.add_argument(
        "--legend",
        type=Path,
        help="the site's 'edgetwin legend --config FILE --json' (local only): show sources by name",
    )


def _watch(
    args: argparse.Namespace,
    broker: Any,
    sent: Sent,
    gateways: list[str],
    before: dict[str, dict[str, Any]],
    legend: dict[str, str],
) -> dict[str, tuple[str, str]]:
    """Each gateway's verdict once all are done (and stayed so ``--settle`` s), one halted, or the deadline passed."""
    from gateway.downlink.twin_link import collect_reported  # noqa: PLC0415

    end = time.monotonic() + args.deadline
    settled: float | None = None  # monotonic: all done, and watched until then (a later rollback halts)
    verdicts: dict[str, tuple[str, str]] = {}
    while True:
        found = collect_reported(broker, args.prefix, gateways, _POLL_S)
        for gw in gateways:
            verdict = judge(sent, found.get(gw, {}), before.get(gw, {}))
            if verdict != verdicts.get(gw):
                _say(named(f"  {gw}: {verdict[1]}", legend))
            verdicts[gw] = verdict
        states, now = {v[0] for v in verdicts.values()}, time.monotonic()
        if states == {DONE} and settled is None:
            settled = now + args.settle
            if args.settle > 0:
                _say(f"  all done: watching {args.settle:g} s more")
        if HALTED in states or (settled is not None and now >= settled) or (settled is None and now >= end):
            return verdicts
        time.sleep(_POLL_S / 2)


def cmd_rollout(args: argparse.Namespace) -> int:
    """Publish to the canaries, wait for them applied and healthy, then to the rest; halt on a refusal or rollback."""
    from gateway.downlink.commands import _broker  # noqa: PLC0415
    from gateway.downlink.twin_link import collect_reported  # noqa: PLC0415

    envelope, signed, sent = _read(args)
    canaries, rest = _targets(args, signed)
    legend = legend_of(args)
    broker = _broker(args)
    what = f"{sent.kind} v{sent.version}" + (f" ({sent.slot})" if sent.slot else "")
    before = collect_reported(broker, args.prefix, canaries + rest, args.wait)
    offline = [c for c in canaries if c not in before]
    if offline:
        _say(
            f"rollout {what}: canary {', '.join(offline)} has no reported state: pick canaries that are online"
        )
        return EXIT_FAILURE
    for gw, rep in before.items():
        if (why := stale(sent, rep)) is not None:
            _say(f"rollout {what}: {gw} {why}: it would refuse v{sent.version}; sign with a higher --version")
            return EXIT_FAILURE
    for stage, gateways in (("canary", canaries), ("rest", rest)):
        if not gateways:
            continue
        _say(f"rollout {what}: {stage}: publishing to {', '.join(gateways)}")
        _publish(args, broker, envelope, sent, gateways)
        verdicts = _watch(args, broker, sent, gateways, before, legend)
        halted = {gw: why for gw, (state, why) in verdicts.items() if state == HALTED}
        late = [gw for gw, (state, _) in verdicts.items() if state == WAITING]
        if halted or late:
            for gw, why in halted.items():
                _say(named(f"rollout {what}: HALTED at {stage} {gw}: {why}", legend))
            if late:
                _say(f"rollout {what}: {stage} {', '.join(late)} not done within {args.deadline:g} s")
            if stage == "canary" and rest:
                _say(f"rollout {what}: not sent to {', '.join(rest)}")
            return EXIT_FAILURE
        _say(f"rollout {what}: {stage} done: {', '.join(gateways)}")
    return EXIT_OK


def add_rollout_command(twin: Any, guard: Any, broker_args: Any) -> None:
    """Add ``twin rollout``."""
    p = twin.add_parser(
        "rollout", help="publish a signed revision or bundle to canaries first, then to the rest of a group"
    )
    p.add_argument(
        "--envelope", type=Path, required=True, help="from 'twin sign-config', 'sign-trust', 'sign-model'"
    )
    p.add_argument("--model", type=Path, help="the ONNX file a model bundle was signed with")
    p.add_argument(
        "--dense", type=Path, help="its numpy weights, where it carries them (default: beside --model)"
    )
    p.add_argument(
        "--tflite", type=Path, help="its .tflite model, where it carries it (default: beside --model)"
    )
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--group", type=Path, help="the group file (one pseudonym a line)")
    who.add_argument("--gateway", action="append", help="a gateway's pseudonym (repeatable)")
    p.add_argument("--canary", action="append", help="a canary gateway (repeatable; default: the first ones)")
    p.add_argument("--canaries", type=int, default=1, help="how many of the first gateways are canaries")
    p.add_argument(
        "--deadline", type=float, default=300.0, help="seconds each stage has to report applied or promoted"
    )
    p.add_argument(
        "--settle",
        type=float,
        default=0.0,
        help="seconds a stage must stay done before the next (a model rolled back after promotion halts)",
    )
    p.add_argument(
        "--wait", type=float, default=3.0, help="seconds to collect reported states before sending"
    )
    add_legend_arg(p)
    broker_args(p)
    p.set_defaults(func=guard(cmd_rollout))
