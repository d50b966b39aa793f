"""What a config revision changes, as the units to restart: pure, no I/O.

A source is known by its name (``[[sources]] name``, the label of its unit, its log lines and
its status row): a source whose table changed in any key is restarted, one that is new is
started, one that is gone is stopped.  Only what the gateway can swap safely while the rest runs
is done in place; everything else is a whole-process restart, and the plan says why:

* sources: in place, unless a changed source's subject is named in ``[estimators]`` (the
  estimators learn the subjects' kinds once, when the pipeline is built);
* ``[downlink]``: the deadline, the settle time and the renewal lead are read where they are used,
  so they are taken in place; another key (the trust file) restarts the process;
* any other section (``[gateway]`` with the state directory and the name, ``[privacy]`` with the
  anonymizer's key and time policy, ``[outbox]``, ``[logging]``, ``[pipeline]``, ``[models]``,
  ``[alarms]``, ``[estimators]``, ``[status]``, ``[runtime]``, ``[uplink]``, and a section this
  code does not know) restarts the process.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from gateway.config import Config, SourceEntry

# [downlink] keys read where they are used (the downlink's probation and renewal check).
_DOWNLINK_IN_PLACE = frozenset({"apply_deadline_s", "settle_s", "renew_before_days"})


@dataclass(frozen=True, slots=True)
class Plan:
    """The units a revision touches, or why the whole process restarts (``process`` not empty)."""

    process: tuple[str, ...] = ()  # why the whole process restarts ("logging", "sources[pump3]: ...")
    added: tuple[str, ...] = ()  # source names
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    other: tuple[str, ...] = field(default=())  # in-place keys that need no restart ("downlink.settle_s")

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
        return [f"source:{name}" for name in self.sources]

    def reverse(self) -> Plan:
        """The plan that puts the previous settings back (a rollback)."""
        return Plan(self.process, self.removed, self.added, self.changed, self.other)


def plan(old: Config, new: Config) -> Plan:
    """The units ``new`` changes against ``old``; see the module docstring for the rule."""
    why: list[str] = []
    other: list[str] = []
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
        why.append(section)
    old_src = {e.info.name: e for e in old.sources}
    new_src = {e.info.name: e for e in new.sources}
    added = sorted(set(new_src) - set(old_src))
    removed = sorted(set(old_src) - set(new_src))
    changed = sorted(n for n in set(old_src) & set(new_src) if _entry(old_src[n]) != _entry(new_src[n]))
    estimated = json.dumps(after.get("estimators")) + json.dumps(before.get("estimators"))
    for name in (*added, *removed, *changed):
        for entry in (old_src.get(name), new_src.get(name)):
            if entry is not None and json.dumps(entry.info.subject) in estimated:
                why.append(f"sources[{name}]: its subject is named in [estimators]")
                break
    return Plan(tuple(why), tuple(added), tuple(removed), tuple(changed), tuple(other))


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
