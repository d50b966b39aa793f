"""Twin commands for model bundles: ``edgetwin twin sign-model | publish-model | azure-model``."""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from gateway.downlink.bundles import (
    EXTRAS,
    Manifest,
    ModelPart,
    card_files,
    chunk_bytes_for,
    make_bundle,
    parse_manifest,
)
from gateway.downlink.rollout import add_target_args, signed_for
from gateway.downlink.signing import read_private_key, sign, targets
from gateway.inference.shadow import Acceptance
from gateway.twin.errors import TwinConfigError

EXIT_OK = 0
EXIT_FAILURE = 1


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")


def _rules(path: Path | None, windows: int | None) -> Acceptance:
    where = f"twin sign-model --rules {path}"
    try:
        raw: dict[str, Any] = json.loads(path.read_text(encoding="utf-8")) if path is not None else {}
    except (OSError, ValueError) as exc:
        raise TwinConfigError(
            f"{where}: cannot read it as JSON: {exc}: write the acceptance rules as JSON"
        ) from exc
    if windows is not None:
        raw["windows"] = windows
    try:
        return Acceptance.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise TwinConfigError(f"{where}: key {key or '(top)'}: {first['msg']}: see docs/downlink.md") from exc


#: Parts found beside the model only for a card that chose their backend (else only when given):
#: a gateway from before ``tflite`` parts refuses a manifest with one as malformed, and no backend
#: but LiteRT reads the file, so a card serving on numpy or onnxruntime is signed without it.
ONLY_FOR_BACKEND = {"tflite": "litert"}


def _extras_to_sign(args: argparse.Namespace, card: bytes) -> tuple[dict[str, Path], dict[str, Path]]:
    """The card's other files to sign (:data:`EXTRAS`), given or found beside the model, and those left beside it.

    Given (``--dense``, ``--tflite``): always signed.  Found beside ``--model`` under the card's
    name: signed unless ``--onnx-only``, or the part is for a backend the card did not choose
    (:data:`ONLY_FOR_BACKEND`); the latter are returned second, to say so.
    """
    try:
        doc = json.loads(card)
        names, chosen = card_files(doc), doc.get("backend", "onnxruntime")
    except (ValueError, AttributeError) as exc:
        raise TwinConfigError(f"twin sign-model --card {args.card}: not a JSON card: {exc}") from exc
    found: dict[str, Path] = {}
    left: dict[str, Path] = {}
    for key in EXTRAS:
        given, name = getattr(args, key), names[key]
        beside = args.model.parent / name if name and args.backend_files else None
        if given is not None:
            found[key] = Path(given)
        elif beside is not None and beside.is_file():
            needed = ONLY_FOR_BACKEND.get(key, chosen) == chosen
            (found if needed else left)[key] = beside
    return found, left


def _check_card_names(card_path: Path, card: bytes, key: str, path: Path, data: bytes) -> None:
    """Refuse to sign a file the card does not list for its default precision (the gateway would)."""
    doc = json.loads(card)
    card_key, what = EXTRAS[key]
    entry = (doc.get(card_key) or {}).get(doc.get("default_precision")) or {}
    if entry.get("sha256") != hashlib.sha256(data).hexdigest() or entry.get("bytes") != len(data):
        raise TwinConfigError(
            f"twin sign-model --card {card_path}: the {what} {path} is not the one the card lists "
            f"for precision {doc.get('default_precision')} ({card_key}: SHA-256, bytes): sign the card "
            "written with this file, or leave the card's other files out with --onnx-only"
        )


def cmd_sign_model(args: argparse.Namespace) -> int:
    """Sign a model (ONNX file, numpy weights where the card names them, card) for a slot as a numbered bundle."""
    card, model = args.card.read_bytes(), args.model.read_bytes()
    paths, left = _extras_to_sign(args, card)
    extras = {key: path.read_bytes() for key, path in paths.items()}
    for key, path in paths.items():
        _check_card_names(args.card, card, key, path, extras[key])
    chunk = args.chunk_bytes or chunk_bytes_for(args.profile)
    manifest, _ = make_bundle(
        args.slot,
        card,
        model,
        chunk_bytes=chunk,
        acceptance=_rules(args.rules, args.shadow_windows),
        **extras,
    )
    keys = [read_private_key(path) for path in args.key]
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(days=args.expires_days)
    who, group = signed_for(args)
    envelope = sign(
        manifest, keys=keys, gateway=who, version=args.version, expires=expires, kind="model", group=group
    )
    args.out.write_bytes(envelope)
    weights = "".join(
        f" and {EXTRAS[key][1]} {path} ({len(extras[key])} bytes)" for key, path in paths.items()
    )
    _say(
        f"model {args.model} ({len(model)} bytes){weights} for slot {args.slot} as version {args.version} for "
        f"gateway {who}: {sum(len(p.chunks) for p in parse_manifest(manifest).parts)} chunk(s) of up to {chunk} bytes, {len(keys)} signature(s): {args.out}; "
        "publish it with publish-model"
    )
    for key, path in left.items():
        _say(
            f"the {EXTRAS[key][1]} {path} is not carried: the card chose {json.loads(card).get('backend')}, "
            f"and gateways from before {key} parts refuse a bundle with one; give --{key} {path} for a "
            f"site that serves on {ONLY_FOR_BACKEND[key]}"
        )
    return EXIT_OK


#: Which chunks to send: per part id, the indices (a part not named: all of its chunks).
Only = dict[str, set[int]]


def chunk_messages(
    root: str,
    envelope: bytes,
    model: bytes,
    only: Only | None = None,
    *,
    dense: bytes | None = None,
    tflite: bytes | None = None,
) -> list[tuple[str, bytes]]:
    """The chunk messages of a signed bundle (all, or the indices in ``only``), then its manifest."""
    out = [
        (f"{root}/chunk/{part}/{i}", data)
        for part, i, data in chunks_of(envelope, model, only, dense=dense, tflite=tflite)
    ]
    return [*out, (f"{root}/model", envelope)]


def chunks_of(
    envelope: bytes,
    model: bytes,
    only: Only | None = None,
    *,
    dense: bytes | None = None,
    tflite: bytes | None = None,
) -> list[tuple[str, int, bytes]]:
    """(part id, index, bytes) of the chunks of a signed bundle (all, or those in ``only``); each file checked first."""
    manifest = parse_manifest(_content(envelope))
    given = {"dense": dense, "tflite": tflite}
    files = [(manifest.model, model, "model file")]
    for key, part in manifest.extras.items():
        data = given[key]
        if data is None:
            raise TwinConfigError(
                f"twin publish-model: the bundle carries the {EXTRAS[key][1]} {part.path}: give it with "
                f"--{key} (or keep it beside the model under that name)"
            )
        files.append((part, data, EXTRAS[key][1]))
    out = []
    for part, data, what in files:
        _check_signed(part, data, what)
        picked = None if only is None else only.get(part.id)
        out += [
            (part.id, i, data[i * part.chunk_bytes : (i + 1) * part.chunk_bytes])
            for i in range(len(part.chunks))
            if picked is None or i in picked
        ]
    return out


def _check_signed(part: ModelPart, data: bytes, what: str) -> None:
    if hashlib.sha256(data).hexdigest() != part.sha256 or len(data) != part.length:
        raise TwinConfigError(
            f"twin publish-model: the {what} is not the one signed (SHA-256 {part.sha256[:12]}...): "
            "give the file the bundle was signed with"
        )


def extras_of(manifest: Manifest, model: Path, given: dict[str, Path | None]) -> dict[str, bytes]:
    """The other files a bundle carries, by manifest key: ``given``, else beside the model under the card's name."""
    found = {}
    for key, part in manifest.extras.items():
        path = given.get(key) or model.parent / (part.path or "")
        try:
            found[key] = path.read_bytes()
        except OSError as exc:
            raise TwinConfigError(
                f"twin publish-model {path}: cannot read the bundle's {EXTRAS[key][1]}: {exc.strerror}: give "
                f"it with --{key}"
            ) from exc
    return found


def given_extras(args: argparse.Namespace) -> dict[str, Path | None]:
    """``--dense`` and ``--tflite`` as given on the command line (None: beside ``--model``)."""
    return {key: getattr(args, key, None) for key in EXTRAS}


def bundle_files(
    envelope: bytes, model: Path, given: dict[str, Path | None]
) -> tuple[bytes, dict[str, bytes]]:
    """The files a signed bundle carries, as the twin sends them: the model and the others, by manifest key."""
    return model.read_bytes(), extras_of(parse_manifest(_content(envelope)), model, given)


def _missing_parts(manifest: Manifest, transfer: dict[str, Any]) -> Only:
    """The chunks a reported transfer lists as missing, per part (IoT Hub reports lists as objects)."""

    def indices(listed: Any) -> set[int]:
        values = listed.values() if isinstance(listed, dict) else listed or []
        return {int(i) for i in values}

    only = {manifest.model.id: indices(transfer.get("missing"))}
    for key, part in manifest.extras.items():
        # A gateway that reports no entry for a part is missing all of it (it never saw that part).
        listed = transfer.get(key)
        only[part.id] = (
            indices(listed.get("missing")) if isinstance(listed, dict) else set(range(len(part.chunks)))
        )
    return only


def _content(envelope: bytes) -> bytes:
    """The signed content of an envelope the twin made itself."""
    return base64.b64decode(json.loads(envelope)["content"])


def cmd_publish_model(args: argparse.Namespace) -> int:
    """Publish a signed bundle: its chunks (retained, addressed by the model's hash and index), then the manifest."""
    from gateway.downlink.commands import _broker  # noqa: PLC0415
    from gateway.downlink.twin_link import collect_reported, publish_many  # noqa: PLC0415

    envelope, model = args.envelope.read_bytes(), args.model.read_bytes()
    manifest = parse_manifest(_content(envelope))
    extras = extras_of(manifest, args.model, given_extras(args))
    signed = json.loads(envelope)["signed"]
    named = targets(signed)
    if named is not None and args.gateway not in named:
        raise TwinConfigError(
            f"twin publish-model: {args.envelope} is signed for {signed.get('group') or signed['gateway']}, "
            f"not {args.gateway}: sign it again"
        )
    root = f"{args.prefix}/{args.gateway}"
    only: Only | None = None
    broker = _broker(args)
    if args.missing:
        rep = collect_reported(broker, args.prefix, [args.gateway], args.wait).get(args.gateway, {})
        slot = manifest.slot
        transfer = ((rep.get("models") or {}).get(slot) or {}).get("transfer")
        if not transfer or transfer.get("version") != signed["version"]:
            _say(
                f"gateway {args.gateway} reports no transfer of {slot} v{signed['version']} under way: nothing sent"
            )
            return EXIT_FAILURE
        only = _missing_parts(manifest, transfer)
    messages = chunk_messages(root, envelope, model, only, **extras)
    if args.clear:
        # Empty retained messages remove the chunks from the broker; the small manifest stays.
        cleared = [(topic, b"") for topic, _ in messages[:-1]]
        publish_many(broker, cleared)
        _say(f"model bundle v{signed['version']}: {len(cleared)} retained chunk(s) removed under {root}")
        return EXIT_OK
    publish_many(broker, messages)
    _say(
        f"model bundle v{signed['version']}: {len(messages) - 1} chunk(s) and its manifest published under {root}"
    )
    return EXIT_OK


def _missing_from(path: Path, manifest: Manifest, version: int) -> Only:
    """The chunk indices, per part, a gateway's reported property (as IoT Hub shows it) lists as missing."""
    where = f"twin azure-model --missing-from {path}"
    try:
        doc: Any = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TwinConfigError(f"{where}: cannot read it as JSON: {exc}: save the device twin's JSON") from exc
    # The whole twin, its reported properties, or our property alone: look down to "models".
    for key in ("properties", "reported", "edgetwin"):
        if isinstance(doc, dict) and "models" not in doc and isinstance(doc.get(key), dict):
            doc = doc[key]
    slot = manifest.slot
    transfer = (((doc or {}).get("models") or {}).get(slot) or {}).get("transfer") or {}
    if transfer.get("version") != version:
        raise TwinConfigError(
            f"{where}: no transfer of {slot} v{version} under way in it: nothing to send again"
        )
    # IoT Hub keeps no arrays in a twin: the gateway reports the list as {"0": i, "1": j, ...}.
    return _missing_parts(manifest, transfer)


def cmd_azure_model(args: argparse.Namespace) -> int:
    """Write what carries a signed bundle over IoT Hub: the desired patch and the chunks' C2D messages."""
    from gateway.downlink.azure import C2D_QUEUE_DEPTH, c2d_chunk_properties, desired_patch  # noqa: PLC0415

    envelope, model = args.envelope.read_bytes(), args.model.read_bytes()
    manifest = parse_manifest(_content(envelope))
    version = int(json.loads(envelope)["signed"]["version"])
    only = _missing_from(args.missing_from, manifest, version) if args.missing_from else None
    chunks = chunks_of(envelope, model, only, **extras_of(manifest, args.model, given_extras(args)))
    try:
        patch = desired_patch("model", envelope)
    except ValueError as exc:
        raise TwinConfigError(f"twin azure-model {args.envelope}: {exc}") from exc
    out: Path = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "desired.json").write_text(json.dumps(patch, separators=(",", ":")) + "\n")
    listing = []
    for part, index, data in chunks:
        # The model's chunks keep their old names; the other parts' are named by their part's id.
        name = f"chunk-{index}.bin" if part == manifest.model.id else f"chunk-{part[:8]}-{index}.bin"
        (out / name).write_bytes(data)
        listing.append({"file": name, "properties": c2d_chunk_properties(part, index)})
    (out / "messages.json").write_text(json.dumps(listing, indent=1) + "\n")
    _say(
        f"model bundle v{version} for {manifest.slot}: desired patch {out / 'desired.json'}; {len(listing)} "
        f"chunk(s) as cloud-to-device messages in {out / 'messages.json'} (send at most {C2D_QUEUE_DEPTH} "
        "at a time: IoT Hub queues no more for one device)"
    )
    return EXIT_OK


def model_status(state_dir: Path) -> list[str]:
    """Lines for ``edgetwin downlink status``: per slot the version serving, the one before, the last outcome."""
    from gateway.inference.shadow import read_installed  # noqa: PLC0415

    try:
        raw = json.loads((state_dir / "downlink" / "models.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    lines = []
    for slot in sorted(set(raw.get("accepted") or {}) | set(raw.get("last") or {})):
        version, previous = read_installed(state_dir, slot)
        last = (raw.get("last") or {}).get(slot)
        line = f"model {slot}: serving {'v' + str(version) if version else 'the shipped version'}"
        if last and last.get("backend") and last.get("outcome") in ("promoted", "rolled-back"):
            line += f" on {last['backend']}"
        if previous is not None:
            line += f", {'v' + str(previous) if previous else 'the shipped version'} kept to roll back to"
        if last:
            line += f"; v{last['version']} {last['outcome']}"
            line += f" ({last['reason']})" if last.get("reason") else ""
            line += f" at {last['at']}"
        lines.append(line)
    transfer = raw.get("transfer")
    if transfer:
        lines.append(
            f"model {transfer['slot']}: v{transfer['version']} being received (chunks in quarantine)"
        )
    return lines


def model_rollout(models: Any) -> list[str]:
    """Lines for ``twin rollout-status``: per slot of a gateway's reported state, what serves and what is under way."""
    lines = []
    for slot, m in sorted((models or {}).items()):
        active = m.get("active")
        line = f"model {slot}: serving {'v' + str(active) if active else 'shipped'}"
        if (t := m.get("transfer")) is not None:
            line += f"; v{t.get('version')} receiving {t.get('have')}/{t.get('of')} chunks"
            for key, (_, what) in EXTRAS.items():
                if isinstance(d := t.get(key), dict):
                    line += f" and {d.get('have')}/{d.get('of')} of its {what}"
        if (c := m.get("candidate")) is not None:
            line += f"; v{c.get('version')} in shadow, {c.get('judged')}/{c.get('of') or '-'} windows"
        if (last := m.get("last")) and last.get("outcome") != "shadow":
            line += (
                f"; last: v{last.get('version')} {last.get('outcome')} {last.get('reason') or ''}".rstrip()
            )
        lines.append(line)
    return lines


def add_model_commands(twin: Any, guard: Any, broker_args: Any) -> None:
    """Add ``twin sign-model``, ``twin publish-model`` and ``twin azure-model``."""
    p = twin.add_parser(
        "sign-model", help="sign a model (ONNX file and card) as a numbered bundle for a slot"
    )
    p.add_argument("--slot", required=True, help="the model name the gateway runs ([[models.use]] name)")
    p.add_argument("--card", type=Path, required=True, help="the model card (JSON)")
    p.add_argument("--model", type=Path, required=True, help="the ONNX file the card lists as its default")
    p.add_argument(
        "--dense",
        type=Path,
        help="the numpy weights the card lists (.dense.npz; default: that file beside --model, if there)",
    )
    p.add_argument(
        "--tflite",
        type=Path,
        help="the .tflite model the card lists (default: that file beside --model, if there and the "
        "card chose litert; gateways from before .tflite parts refuse a bundle with one)",
    )
    p.add_argument(
        "--onnx-only",
        dest="backend_files",
        action="store_false",
        help="sign the ONNX file alone (the version runs on onnxruntime; gateways before bundles had "
        "other files take it)",
    )
    p.add_argument(
        "--key", type=Path, action="append", required=True, help="signing key (repeat for a threshold)"
    )
    p.add_argument(
        "--version", type=int, required=True, help="bundle version for this slot, higher than before"
    )
    add_target_args(p)
    p.add_argument(
        "--profile",
        choices=["generic", "aws", "azure"],
        default="generic",
        help="chunks fit its payload limit (azure: a cloud-to-device message)",
    )
    p.add_argument("--chunk-bytes", type=int, help="chunk size (default: from --profile)")
    p.add_argument("--rules", type=Path, help="acceptance rules of the shadow period (JSON)")
    p.add_argument("--shadow-windows", type=int, help="windows the new version runs in shadow")
    p.add_argument("--expires-days", type=float, default=7.0, help="refused after this many days")
    p.add_argument("--out", type=Path, required=True, help="where the signed manifest envelope goes")
    p.set_defaults(func=guard(cmd_sign_model))

    p = twin.add_parser(
        "publish-model", help="publish a signed model bundle (chunks, then manifest) to a gateway"
    )
    p.add_argument("--gateway", required=True, help="the gateway's pseudonym")
    p.add_argument("--envelope", type=Path, required=True, help="from 'twin sign-model'")
    p.add_argument("--model", type=Path, required=True, help="the ONNX file it was signed with")
    p.add_argument(
        "--dense", type=Path, help="the numpy weights it was signed with (default: beside --model)"
    )
    p.add_argument(
        "--tflite", type=Path, help="the .tflite model it was signed with (default: beside --model)"
    )
    p.add_argument(
        "--missing",
        action="store_true",
        help="only the chunks the gateway reports missing (resume a transfer)",
    )
    p.add_argument(
        "--clear",
        action="store_true",
        help="remove the bundle's retained chunks (once the version is in shadow)",
    )
    p.add_argument(
        "--wait", type=float, default=3.0, help="seconds to wait for the reported state (--missing)"
    )
    broker_args(p)
    p.set_defaults(func=guard(cmd_publish_model))

    p = twin.add_parser(
        "azure-model",
        help="the IoT Hub desired patch and C2D chunk messages of a signed bundle (azure profile)",
    )
    p.add_argument("--envelope", type=Path, required=True, help="from 'twin sign-model --profile azure'")
    p.add_argument("--model", type=Path, required=True, help="the ONNX file it was signed with")
    p.add_argument(
        "--dense", type=Path, help="the numpy weights it was signed with (default: beside --model)"
    )
    p.add_argument(
        "--tflite", type=Path, help="the .tflite model it was signed with (default: beside --model)"
    )
    p.add_argument("--out-dir", type=Path, required=True, help="desired.json, messages.json, chunk-N.bin")
    p.add_argument(
        "--missing-from",
        type=Path,
        help="the device twin (JSON) of a gateway mid-transfer: only the chunks it reports missing",
    )
    p.set_defaults(func=guard(cmd_azure_model))
