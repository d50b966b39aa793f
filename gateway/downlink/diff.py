"""What a config revision changes, as the units to restart: pure, no I/O.

A source is known by its name (``[[sources]] name``, the label of its unit, its log lines and
its status row): a source whose table changed in any key is restarted, one that is new is
started, one that is gone is stopped.  Only what the gateway can swap safely while the rest runs
is done in place; everything else is a whole-process restart, and the plan says why:

* sources: in place, unless a changed source's subject or name is in ``[estimators]`` (the
  estimators learn the subjects' kinds and sources once, when the pipeline is built);
* ``[downlink]``: the deadline, the settle time and the renewal lead are read where they are used,
  so they are taken in place; another key (the trust file) restarts the process;
* ``[alarms]``: the limit rules are retuned in place (each stream's alarm state kept);
* ``[status]``: the control socket's unit and the status page's restart (``status``, ``web``);
* ``[uplink.mqtt]``: the broker's address, its CA, the server name and the connect and reconnect
  timings are taken by reconnecting the uplink (the same client id, session and outbox); any other
  key (the profile, the protocol, the topic prefix, credentials, the client certificate, the
  delivery settings) and any other ``[uplink]`` key restarts the process;
* any other section (``[gateway]`` with the state directory and the name, ``[privacy]`` with the
  anonymizer's key and time policy, ``[outbox]``, ``[logging]``, ``[pipeline]``, ``[models]``,
  ``[estimators]``, ``[runtime]``, and a section this code does not
  know) restarts the process.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

from gateway.config import Config, SourceEntry

# [downlink] keys read where they are used (the downlink's probation and renewal check).
_DOWNLINK_IN_PLACE = frozenset({"apply_deadline_s", "settle_s", "renew_before_days"})
# [uplink.mqtt] keys that only the connection reads (gateway.uplink.connection): a reconnect takes them.
_UPLINK_IN_PLACE = frozenset(
    {"host", "port", "ca_file", "server_name", "connect_timeout_s", "reconnect_min_s", "reconnect_max_s"}
)


@dataclass(frozen=True, slots=True)
class Plan:
    """The units a revision touches, or why the whole process restarts (``process`` not empty)."""

    process: tuple[str, ...] = ()  # why the whole process restarts ("logging", "sources[pump3]: ...")
    added: tuple[str, ...] = ()  # source names
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    other: tuple[str, ...] = field(default=())  # in-place keys that need no restart ("downlink.settle_s")
    uplink: bool = False  # the uplink reconnects with the new [uplink.mqtt] connection keys
    alarms: bool = False  # the limit alarms take the new [alarms] rules
    status: bool = False  # the control socket and status page restart on the new [status]

    @property
    def in_place(self) -> bool:
        """True when no part of the revision needs the whole process restarted."""
        return not self.process

    @property
    def sources(self) -> tuple[str, ...]:
        """Every source name whose unit is stopped, started or both."""
        return tuple(sorted({*self.added, *self.removed, *self.changed}))

    @property
    def units(self) -> list[str]:
        """The unit names restarted in place."""
        return (
            [f"source:{name}" for name in self.sources]
            + (["alarms"] if self.alarms else [])
            + (["status"] if self.status else [])
            + (["uplink"] if self.uplink else [])
        )

    def reverse(self) -> Plan:
        """The plan that puts the previous settings back (a rollback)."""
        return replace(self, added=self.removed, removed=self.added)


def plan(old: Config, new: Config) -> Plan:
    """The units ``new`` changes against ``old``; see the module docstring for the rule."""
    why: list[str] = []
    other: list[str] = []
    uplink = alarms = status = False
    before = _dump(old.core)
    after = _dump(new.core)
    for section in sorted(set(before) | set(after)):
        if before.get(section) == after.get(section):
            continue
        if section == "downlink":
            keys = _changed_keys(before.get(section), after.get(section))
            if keys <= _DOWNLINK_IN_PLACE:
                other += [f"downlink.{k}" for k in sorted(keys)]
                continue
        if section == "alarms":
            alarms = True
            continue
        if section == "status":
            status = True
            continue
        if section == "uplink" and _uplink_in_place(before[section], after.get(section)):
            uplink = True
            continue
        why.append(section)
    old_src = {e.info.name: e for e in old.sources}
    new_src = {e.info.name: e for e in new.sources}
    added = sorted(set(new_src) - set(old_src))
    removed = sorted(set(old_src) - set(new_src))
    changed = sorted(n for n in set(old_src) & set(new_src) if _entry(old_src[n]) != _entry(new_src[n]))
    estimated = json.dumps(after.get("estimators")) + json.dumps(before.get("estimators"))
    for name in (*added, *removed, *changed):
        for entry in (old_src.get(name), new_src.get(name)):
            if entry is not None and (
                json.dumps(entry.info.subject) in estimated or json.dumps(entry.info.name) in estimated
            ):
                why.append(f"sources[{name}]: its subject or name is in [estimators]")
                break
    return Plan(
        tuple(why), tuple(added), tuple(removed), tuple(changed), tuple(other), uplink, alarms, status
    )


def _uplink_in_place(before: Any, after: Any) -> bool:
    """True when only connection keys of an MQTT SenML uplink changed."""
    if not isinstance(after, dict) or before.get("kind") != "mqtt" or before.get("encoding") != "senml":
        return False
    if _changed_keys(before, after) != {"mqtt"} or not isinstance(after.get("mqtt"), dict):
        return False
    return _changed_keys(before.get("mqtt"), after["mqtt"]) <= _UPLINK_IN_PLACE


def _dump(core: Any) -> dict[str, Any]:
    return dict(core.model_dump(mode="json"))


def _changed_keys(before: Any, after: Any) -> set[str]:
    a = before if isinstance(before, dict) else {}
    b = after if isinstance(after, dict) else {}
    return {k for k in set(a) | set(b) if a.get(k) != b.get(k)}


def _entry(entry: SourceEntry) -> Any:
    """Everything of one source's table, comparable."""
    info = entry.info
    return (
        entry.driver,
        entry.enabled,
        info.name,
        info.subject,
        info.kind,
        entry.config.model_dump(mode="json"),
    )
