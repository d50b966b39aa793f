"""The downlink on Azure IoT Hub's device-twin topics (the ``azure`` uplink profile).

IoT Hub allows a device its own static topics only, so the generic ``…/desired``, ``…/trust``,
``…/cert``, ``…/cmd`` and ``…/reported`` topics map onto the device twin and direct methods:

* desired state: the twin's desired property ``edgetwin`` with ``config``, ``trust``, ``cert`` and
  ``model`` (a model bundle's signed manifest, :mod:`gateway.downlink.bundles`),
  each a signed envelope (or PEM) cut into strings (IoT Hub keeps twin strings to 4 KB): the whole
  twin is read with ``$iothub/twin/GET/?$rid=`` on each connection (answered on
  ``$iothub/twin/res/200/?$rid=``), changes come as merge patches on
  ``$iothub/twin/PATCH/properties/desired/?$version=``;
* reported state: merge patches of the reported property ``edgetwin`` on
  ``$iothub/twin/PATCH/properties/reported/?$rid=`` (with ``csr`` while a renewal is pending);
* model chunks: cloud-to-device messages on ``devices/<device id>/messages/devicebound/<property
  bag>``, the bag naming the bundle and the index (``et_bundle=<id>&et_chunk=<i>``), the body the raw
  bytes (the MQTT mapping carries binary bodies as they are: no base64).  IoT Hub keeps no retained
  messages: a C2D message waits in the device's queue (at most 50 messages, each at most 64 KB,
  time to live 1 hour by default, 48 hours at most) and is gone once acknowledged, so the twin sends
  at most 50 chunks at a time and, after a cut, only those the reported state lists as missing;
* commands: direct methods ``report`` and ``rebirth`` on ``$iothub/methods/POST/<name>/?$rid=``,
  answered on ``$iothub/methods/res/<status>/?$rid=``.

The twin's ``$version`` only orders patches (a gap means one was missed: the twin is read again);
it is never trusted for anti-rollback: the signed version inside the envelope is.  The parts
below the class are pure.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, urlencode

log = logging.getLogger(__name__)

PROPERTY = "edgetwin"  # our key in the twin's desired and reported properties
KINDS = ("cert", "trust", "config", "model")  # handled in this order, as on the generic topics
CHUNK_CHARS = 4000  # IoT Hub twin string values are limited to 4 KB
MAX_DESIRED_BYTES = 32 * 1024  # IoT Hub's limit on the whole desired-properties document
SUBSCRIPTIONS = (
    "$iothub/twin/res/#",
    "$iothub/twin/PATCH/properties/desired/#",
    "$iothub/methods/POST/#",
)
_RESPONSE = "$iothub/twin/res/"
# A twin read or reported patch the hub refused (throttled, busy) is sent again, backing off to this.
_GET_RETRY_MAX_S = 60.0
_GET_UNANSWERED_S = 30.0  # a twin read with no answer at all is asked again after this
_DESIRED = "$iothub/twin/PATCH/properties/desired/"
C2D_MAX_BYTES = 64 * 1024  # IoT Hub's limit on a cloud-to-device message
C2D_QUEUE_DEPTH = 50  # cloud-to-device messages IoT Hub queues for one device at most
_BUNDLE, _CHUNK = "et_bundle", "et_chunk"  # application properties of a chunk's C2D message
_METHOD = "$iothub/methods/POST/"


def query(topic: str) -> dict[str, str]:
    """The ``?a=b&c=d`` part of an IoT Hub topic."""
    return dict(parse_qsl(topic.partition("?")[2], keep_blank_values=True))


def pack(data: bytes) -> dict[str, Any]:
    """A signed envelope (or PEM) as a twin value: ``{"n": k, "0": …, …}``, strings of at most 4000 characters."""
    text = data.decode()
    with contextlib.suppress(ValueError):  # JSON without the line breaks: fewer characters
        text = json.dumps(json.loads(text), separators=(",", ":"))
    parts = [text[i : i + CHUNK_CHARS] for i in range(0, len(text), CHUNK_CHARS)] or [""]
    return {"n": len(parts), **{str(i): p for i, p in enumerate(parts)}}


def unpack(value: Any) -> bytes:
    """The bytes :func:`pack` made.  Whatever else is found is passed on as its JSON text, to be refused as malformed."""
    if isinstance(value, dict):
        n = value.get("n")
        parts = [value.get(str(i)) for i in range(n)] if isinstance(n, int) and 0 < n <= 64 else []
        if parts and all(isinstance(p, str) for p in parts):
            return "".join(p for p in parts if isinstance(p, str)).encode()
    return json.dumps(value).encode()


def c2d_prefix(device_id: str) -> str:
    """Where a device's cloud-to-device messages come (subscribe to this plus ``#``)."""
    return f"devices/{device_id}/messages/devicebound/"


def c2d_chunk_properties(bundle: str, index: int) -> dict[str, str]:
    """The application properties of chunk ``index`` of ``bundle``'s cloud-to-device message."""
    return {_BUNDLE: bundle, _CHUNK: str(index)}


def c2d_chunk_topic(device_id: str, bundle: str, index: int) -> str:
    """The topic IoT Hub delivers chunk ``index`` of ``bundle`` on (application properties in the bag)."""
    return f"{c2d_prefix(device_id)}{urlencode(c2d_chunk_properties(bundle, index))}"


def c2d_chunk(topic: str, device_id: str) -> tuple[str, int] | None:
    """(bundle id, index) of a chunk's C2D message; None for any other message (or a malformed bag)."""
    prefix = c2d_prefix(device_id)
    if not topic.startswith(prefix):
        return None
    # IoT Hub adds its own properties ($.mid, $.to, ...) to the bag: only ours are read.
    bag = dict(parse_qsl(topic[len(prefix) :].lstrip("?"), keep_blank_values=True))
    bundle, index = bag.get(_BUNDLE, ""), bag.get(_CHUNK, "")
    if not bundle or not index.isdigit() or len(index) > 6:
        return None
    return bundle, int(index)


def desired_patch(kind: str, data: bytes) -> dict[str, Any]:
    """The desired-properties patch that delivers ``data`` as ``kind`` (config, trust, cert or model)."""
    if kind not in KINDS:
        raise ValueError(f"azure desired patch: kind {kind!r}: expected one of {', '.join(KINDS)}")
    patch = {PROPERTY: {kind: pack(data)}}
    if len(json.dumps(patch)) > MAX_DESIRED_BYTES:
        raise ValueError(
            f"azure desired patch: {kind} of {len(data)} bytes: over IoT Hub's {MAX_DESIRED_BYTES} bytes of "
            "desired properties: make it smaller"
        )
    return patch


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch, as IoT Hub applies twin patches (null removes a key)."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def patch_diff(old: Any, new: Any) -> Any:
    """The merge patch that turns ``old`` into ``new`` (keys gone from ``new`` become null)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return new
    out: dict[str, Any] = {key: None for key in old if key not in new}
    for key, value in new.items():
        if key not in old:
            out[key] = value
        elif old[key] != value:
            out[key] = patch_diff(old[key], value)
    return out


def twin_safe(value: Any) -> Any:
    """A value IoT Hub takes as a twin property: lists as objects keyed "0", "1", …; no '.', '$' or space in keys."""
    if isinstance(value, list):
        value = {str(i): v for i, v in enumerate(value)}
    if isinstance(value, dict):
        return {_key(str(k)): twin_safe(v) for k, v in value.items()}
    return value


def _key(key: str) -> str:
    return "".join("_" if c in ".$ " or ord(c) < 32 else c for c in key) or "_"


def _refused(failures: int, what: str, again: str) -> float:
    """Log a refusal (the first of a series as a warning) and return when to try again (monotonic)."""
    delay = min(_GET_RETRY_MAX_S, 2.0 ** (failures - 1))
    level = logging.WARNING if failures == 1 else logging.DEBUG
    log.log(level, "downlink azure: %s: %s again in %.0f s", what, again, delay)
    return time.monotonic() + delay


class AzureTwin:
    """The device side of one connection's twin: reads it, follows its patches, reports, answers methods."""

    def __init__(
        self,
        client: Any,
        deliver: Callable[[str, bytes], None],
        method: Callable[[str], int],
        ready: Callable[[], None],
    ) -> None:
        self._client = client
        self._ready = ready  # the twin was read: reporting can start
        self._deliver = deliver  # (kind, bytes) of each desired value, on every read and patch
        self._method = method  # a direct method's name -> HTTP-like status
        self._rid = 0
        self._get_rid = ""
        self.desired: dict[str, Any] | None = None  # None until the twin was read
        self.version = 0
        self._early: list[tuple[int, Any]] = []  # patches that came before the twin was read
        # Our reported property as the hub has it once every patch in flight is accepted (patches
        # are diffs against it), and as the hub acknowledged it (2xx); None until the twin was read.
        self.reported: dict[str, Any] | None = None
        self._confirmed: dict[str, Any] = {}
        self._in_flight: dict[str, dict[str, Any]] = {}  # rid -> the reported property it makes
        self._want: dict[str, Any] | None = None  # the newest state the gateway asked to report
        self._report_at: float | None = None  # monotonic: send the refused report again then
        self._patch_failures = 0
        self._get_at = 0.0  # monotonic: when the twin was last asked for
        self._retry_at: float | None = None  # monotonic: ask for the twin again then
        self._get_failures = 0

    def _next_rid(self) -> str:
        self._rid += 1
        return str(self._rid)

    def start(self) -> None:
        """Subscribe and read the whole twin."""
        self._client.subscribe([(t, 1) for t in SUBSCRIPTIONS])
        self.get()

    def get(self) -> None:
        """Ask for the whole twin (answered on ``$iothub/twin/res/200/?$rid=``)."""
        self._get_rid = self._next_rid()
        self._get_at, self._retry_at = time.monotonic(), None
        self._client.publish(f"$iothub/twin/GET/?$rid={self._get_rid}", b"", qos=1)

    def tick(self, now: float) -> None:
        """Ask for the twin again when a read was refused or never answered; report again when refused."""
        unanswered = (
            self.desired is None and self._retry_at is None and now - self._get_at > _GET_UNANSWERED_S
        )
        if unanswered or (self._retry_at is not None and now >= self._retry_at):
            self.get()
        if self._report_at is not None and now >= self._report_at:
            self._report_at = None
            self._send_report()

    def handles(self, topic: str) -> bool:
        """True for the topics this class answers."""
        return topic.startswith(("$iothub/twin/", "$iothub/methods/"))

    def on_message(self, topic: str, payload: bytes) -> None:
        """A twin response, a desired-properties patch or a direct method call."""
        if topic.startswith(_RESPONSE):
            self._response(topic, payload)
        elif topic.startswith(_DESIRED):
            self._patch(topic, payload)
        elif topic.startswith(_METHOD):
            name = topic[len(_METHOD) :].partition("/")[0]
            status = self._method(name)
            body = json.dumps({"status": status, "method": name}).encode()
            rid = query(topic).get("$rid", "")
            self._client.publish(f"$iothub/methods/res/{status}/?$rid={rid}", body, qos=1)

    def _response(self, topic: str, payload: bytes) -> None:
        status = topic[len(_RESPONSE) :].partition("/")[0]
        rid = query(topic).get("$rid")
        if rid != self._get_rid:
            if rid is not None and rid in self._in_flight:
                self._patch_answered(rid, status)
            return
        if status != "200":
            self._get_failures += 1
            self._retry_at = _refused(
                self._get_failures, f"reading the twin failed: status {status}", "asking"
            )
            return
        if self._get_failures:
            log.info("downlink azure: twin read after %d refusal(s)", self._get_failures)
            self._get_failures = 0
        try:
            twin = json.loads(payload)
            desired, reported = twin.get("desired") or {}, twin.get("reported") or {}
            version = int(desired.get("$version", 0))
        except (ValueError, AttributeError, TypeError) as exc:
            log.warning("downlink azure: the twin is not the JSON IoT Hub sends: %s: ignored", exc)
            return
        self.desired, self.version = desired, version
        ours = reported.get(PROPERTY)
        self.reported = dict(ours) if isinstance(ours, dict) else {}
        self._confirmed, self._in_flight = dict(self.reported), {}
        early, self._early = self._early, []
        for v, patch in sorted(early, key=lambda p: p[0]):
            if v > self.version:
                self.desired, self.version = merge_patch(self.desired, patch), v
        self._ready()
        self._hand_over()

    def _patch(self, topic: str, payload: bytes) -> None:
        try:
            version = int(query(topic).get("$version", ""))
            patch = json.loads(payload)
        except ValueError as exc:
            log.warning(
                "downlink azure: desired-properties patch unreadable: %s: the twin is read again", exc
            )
            self.get()
            return
        if self.desired is None:
            self._early.append((version, patch))
            return
        if version <= self.version:
            return  # seen already
        if version != self.version + 1:
            self.get()  # a patch was missed: the whole twin again
            return
        self.desired, self.version = merge_patch(self.desired, patch), version
        self._hand_over()

    def _hand_over(self) -> None:
        ours = (self.desired or {}).get(PROPERTY)
        if not isinstance(ours, dict):
            return
        for kind in KINDS:
            if ours.get(kind) is not None:
                self._deliver(kind, unpack(ours[kind]))

    def report(self, state: dict[str, Any]) -> None:
        """Send what changed in the reported property since the hub last had it (after the twin was read)."""
        self._want = twin_safe(state)
        if self._report_at is None:  # else a refused report waits for its back-off, then sends the newest
            self._send_report()

    def _send_report(self) -> None:
        if self.reported is None or self._want is None:
            return
        new = self._want
        patch = patch_diff(self.reported, new)
        if not patch:
            return
        rid = self._next_rid()
        body = json.dumps({PROPERTY: patch}).encode()
        self._client.publish(f"$iothub/twin/PATCH/properties/reported/?$rid={rid}", body, qos=1)
        self.reported, self._in_flight[rid] = new, new

    def _patch_answered(self, rid: str, status: str) -> None:
        state = self._in_flight.pop(rid)
        if status.startswith("2"):
            self._confirmed = state
            if self._patch_failures:
                log.info(
                    "downlink azure: reported properties accepted after %d refusal(s)", self._patch_failures
                )
                self._patch_failures = 0
            return
        # Refused (throttled, too large, busy): the hub kept what it had acknowledged. Later patches
        # were diffs against a state it never took, so they are dropped too and the whole difference
        # from what it holds is sent again after a back-off.
        self._patch_failures += 1
        self.reported, self._in_flight = dict(self._confirmed), {}
        what = f"reported properties refused by the hub: status {status}"
        self._report_at = _refused(self._patch_failures, what, "sending them")
