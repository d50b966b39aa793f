"""Which alarm condition a record raises, continues or ends: one answer for every consumer.

A subject's conditions are told apart as the gateway's alarm ledger tells them apart: a limit,
a loss or a fault of one stream (a fault per origin, :func:`fault_origin`), a device's loss, a
model's episode, a fault of a configured node that never resolved (by the node's pseudonym).
The twin's view and the Sparkplug edge node both fold records by :func:`condition_key`.
"""

from __future__ import annotations

from gateway.records.model import AlarmRecord, fault_origin

#: Kinds that end a condition, by the kind that raised it (``sensor_restored`` says which by ``after``).
_ENDS = {
    "limit_cleared": "limit",
    "anomaly_cleared": "anomaly",
    "device_restored": "device_lost",
}
RAISES = frozenset(
    {"limit", "anomaly", "anomaly_indeterminate", "sensor_fault", "sensor_lost", "device_lost"}
)

#: A sensor fault's origin (:func:`fault_origin`) in the words a technician reads.
ORIGIN_WORDS = {
    "quality": "flagged by the device",
    "rule": "implausible value",
    "driver": "reported by the driver",
}
#: A plausibility rule (a raise's ``rule``) in words; an ending says only ``plausibility``.
_RULE_WORDS = {"range": "out of range", "rate": "too fast a change"}


def condition_key(rec: AlarmRecord) -> tuple[tuple[str, ...], bool] | None:
    """The condition an alarm raises or ends (True: raises or continues it); None: none."""
    kind = rec.alarm
    raises = kind in RAISES
    if kind == "sensor_restored":
        kind = str(rec.detail.get("after", "sensor_lost"))
    kind = _ENDS.get(kind, kind)
    if kind == "anomaly_indeterminate":
        kind = "anomaly"
    if kind not in RAISES:
        return None
    if kind == "anomaly":
        return (kind, str(rec.detail.get("model", ""))), raises
    if kind == "device_lost":
        return (kind, rec.dev or ""), raises
    # A fault on a node that never resolved has no stream: the node's pseudonym (``node``, of its
    # source and configured address) tells it from another such node of the subject, whatever its
    # place in its source's list (``item``: all a record of an older gateway has), as the ledger does.
    # A stream's faults by different judges (its flags, a plausibility rule, its driver) are apart.
    detail = rec.detail
    node = detail.get("node")
    return (
        kind,
        rec.dev or "",
        rec.metric or "",
        str(detail.get("estimate", "")),
        "" if node is not None else str(detail.get("item", "")),
        "" if node is None else str(node),
        fault_origin(detail) if kind == "sensor_fault" else "",
    ), raises


def origin_words(rec: AlarmRecord) -> str | None:
    """Who says a ``sensor_fault`` (or its ending) holds, in words, with the rule, status or cause; None otherwise."""
    if rec.alarm not in ("sensor_fault", "sensor_restored"):
        return None
    if rec.alarm == "sensor_restored" and rec.detail.get("after") != "sensor_fault":
        return None
    d = rec.detail
    origin = fault_origin(d)
    words = ORIGIN_WORDS[origin]
    if origin == "rule" and str(d["rule"]) in _RULE_WORDS:
        return f"{words} ({_RULE_WORDS[str(d['rule'])]})"
    why = d.get("status", d.get("cause"))
    return f"{words}: {why}" if origin == "driver" and why is not None else words
