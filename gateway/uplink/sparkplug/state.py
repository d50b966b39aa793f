"""What an edge node keeps across restarts: its bdSeq and the catalog of metrics it has announced.

bdSeq is incremented and written (atomically, fsync'd) before each MQTT CONNECT, so the NDEATH
the broker holds as our Will and the NBIRTH that follows carry the same number, and a restart
never reuses one.  Every write goes through the file's one writer (:func:`gateway.privatefile.writer_of`):
synced in a worker thread, in the order asked for, so the event loop never waits for the disk and
an older state never lands after a newer one.  The catalog holds every metric ever reported, per device, with its datatype,
unit and alias: births after a restart announce them all (current value unknown: ``is_null``),
and aliases stay the same.  It also holds the alarm conditions the host was told are on, per
alarm metric (:func:`codec.fold`), so a birth after a restart says which are on: the gateway's
trackers resume a condition carried over a restart without raising it again.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from gateway.errors import TransientError
from gateway.privatefile import FileWriter, WriteFailures, landed, writer_of
from gateway.uplink.sparkplug.codec import Held, Point, anomaly_base, held_points

log = logging.getLogger(__name__)

NODE = ""  # the catalog's key for the edge node's own metrics

# 2: with the conditions held (version 1: none known); 3: a subject's episodes by model; 4: a
# stream's episodes by model too.
_VERSION = 4
# Alarm metrics an older version named that this one never reports, by the last version naming
# them; retired when such a file is read, so the next births go without them (a birth's metrics
# are all its session reports on: tck-id-topics-nbirth-metric-reqs, tck-id-topics-dbirth-metric-reqs).
# Version 1 named a subject's unresolved nodes' faults and its estimates' limits by the subject;
# version 2 its models' episodes (one metric for all models: one's Value beside another's Active);
# version 3 a stream's episodes by the stream's metric alone (its models sharing Value and Limit).
# Names under _MODELS are this version's own, never retired.
_RETIRED = {
    1: ("Alarms/sensor/subject/", "Alarms/limit/subject/"),
    2: ("Alarms/anomaly/subject/",),
    3: ("Alarms/anomaly/",),
}
_MODELS = "Alarms/anomaly/model/"
_EPISODES_V2 = "Alarms/anomaly/subject"
_STREAM_EPISODES_V3 = "Alarms/anomaly/"  # + the stream's metric


@dataclass(slots=True)
class Entry:
    """One announced metric: its alias and what its births say about it."""

    alias: int
    datatype: int
    unit: str | None = None
    low: float | None = None
    high: float | None = None


@dataclass(slots=True)
class Catalog:
    """bdSeq and the announced metrics, persisted as JSON in the state directory."""

    path: Path | None
    bdseq: int = -1  # the last one used; the first connection uses 0
    devices: dict[str, dict[str, Entry]] = field(default_factory=dict)
    next_alias: int = 1
    # Device -> alarm metric (``Alarms/<family>/<what>``) -> condition id -> the condition on; a
    # metric with none on was reported off, one missing was never reported (its value is unknown).
    held: dict[str, dict[str, dict[str, Held]]] = field(default_factory=dict)
    _writer: FileWriter | None = field(default=None, init=False, repr=False, compare=False)
    # Told the outcome of writes nobody waits for (see submit): once when failing, once when recovered.
    _failures: WriteFailures | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.path is not None:
            self._writer = writer_of(self.path)
            self._failures = WriteFailures(
                log, "sparkplug state", self.path, "a restart may announce forgotten devices again"
            )

    @classmethod
    def load(cls, path: Path | None) -> Catalog:
        """The catalog at ``path`` (a fresh one when missing; an unreadable one is set aside)."""
        cat = cls(path)
        if path is None or not path.exists():
            return cat
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            cat.bdseq = int(doc["bdseq"])
            for device, metrics in doc["devices"].items():
                cat.devices[str(device)] = {
                    str(name): Entry(
                        int(e["alias"]), int(e["type"]), e.get("unit"), e.get("low"), e.get("high")
                    )
                    for name, e in metrics.items()
                }
            # Kept apart from the entries: the alias of a retired metric is not given to another.
            cat.next_alias = max(
                int(doc.get("next_alias", 1)),
                1 + max((e.alias for m in cat.devices.values() for e in m.values()), default=0),
            )
            for device, bases in doc.get("held", {}).items():  # version 1: none known
                cat.held[str(device)] = {
                    str(base): {str(cid): Held(str(h[0]), int(h[1]), bool(h[2])) for cid, h in on.items()}
                    for base, on in bases.items()
                }
            cat._upgrade(int(doc.get("version", 1)), path)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
            aside = path.with_suffix(".corrupt")
            log.error(
                "sparkplug state %s: unreadable (%s): set aside as %s; bdSeq and aliases start again",
                path,
                exc,
                aside.name,
            )
            path.replace(aside)
            return cls(path)
        return cat

    def _upgrade(self, version: int, path: Path) -> None:
        retire = tuple(prefix for v, prefixes in _RETIRED.items() if version <= v for prefix in prefixes)
        retired = 0
        for metrics in self.devices.values():
            for name in [n for n in metrics if n.startswith(retire) and not n.startswith(_MODELS)]:
                del metrics[name]
                retired += 1
        # A model's episode on under the one metric of version 2: on under its model's own.
        for device, bases in self.held.items() if version < 3 else ():
            for cid, h in bases.pop(_EPISODES_V2, {}).items():
                self._hold_moved(device, bases, anomaly_base(str(json.loads(cid)[1])), cid, h)
        # A model's episode on under its stream's metric of version 3: on under its model's and stream's.
        for device, bases in self.held.items() if version < 4 else ():
            for old in [b for b in bases if b.startswith(_STREAM_EPISODES_V3) and not b.startswith(_MODELS)]:
                metric = old.removeprefix(_STREAM_EPISODES_V3)
                for cid, h in bases.pop(old).items():
                    model = str(json.loads(cid)[1])
                    if model:  # an episode of no model (none of this gateway's) ends with its metric
                        self._hold_moved(device, bases, anomaly_base(model, metric), cid, h)
        if retired:
            log.info(
                "sparkplug state %s: version %d: %d alarm metrics it named that this version does not "
                "report retired (nodes, estimates and models, on a subject or a stream, have their own); the next "
                "births go without them",
                path,
                version,
                retired,
            )

    def _hold_moved(
        self, device: str, bases: dict[str, dict[str, Held]], base: str, cid: str, h: Held
    ) -> None:
        """A condition an older version held under a retired metric, on under ``base`` (announced)."""
        self.learn(device, held_points(base, {cid: h}))
        bases[base] = {**bases.get(base, {}), cid: h}

    def _body(self) -> bytes:
        """The catalog as it is now, as the file holds it."""
        doc = {
            "version": _VERSION,
            "bdseq": self.bdseq,
            "next_alias": self.next_alias,
            "devices": {
                device: {
                    name: {"alias": e.alias, "type": e.datatype, "unit": e.unit, "low": e.low, "high": e.high}
                    for name, e in metrics.items()
                }
                for device, metrics in self.devices.items()
            },
            "held": {
                device: {
                    base: {cid: [h.what, h.priority, h.definite] for cid, h in on.items()}
                    for base, on in bases.items()
                }
                for device, bases in self.held.items()
            },
        }
        return json.dumps(doc, sort_keys=True).encode()

    def submit(self) -> Future[None] | None:
        """Ask for the catalog as it is now to be written (never blocks; a failure is logged); None: no file."""
        if self._writer is None:
            return None
        return self._writer.submit(self._body(), self._failures)

    async def write(self) -> None:
        """Write the catalog as it is now and wait, off the event loop, until it is on disk; raises TransientError."""
        if self._writer is None:
            return
        try:
            await landed(self._writer.submit(self._body()))
        except OSError as exc:
            # Without a persisted bdSeq a restart could reuse one: no CONNECT until it is written.
            raise TransientError(
                f"sparkplug state {self.path}: cannot be written: {exc.strerror or exc}: nothing is "
                "published until it can; free space or fix the state directory's permissions"
            ) from exc

    async def next_bdseq(self) -> int:
        """The bdSeq of the next CONNECT (0..255, wrapping), on disk when this returns (raises TransientError)."""
        self.bdseq = (self.bdseq + 1) % 256
        await self.write()
        return self.bdseq

    def learn(self, device: str, pts: list[Point]) -> bool:
        """Add the metrics not announced yet; True when something was added (a rebirth is due)."""
        known = self.devices.setdefault(device, {})
        added = False
        for p in pts:
            entry = known.get(p.name)
            if entry is None:
                known[p.name] = Entry(self.next_alias, p.datatype, p.unit, p.low, p.high)
                self.next_alias += 1
                added = True
        return added

    def holding(self, device: str, base: str) -> dict[str, Held]:
        """The conditions the host was told are on under an alarm metric of ``device``."""
        return self.held.get(device, {}).get(base, {})

    def hold(self, device: str, base: str, on: dict[str, Held]) -> bool:
        """Note the conditions on under an alarm metric (the host was told); True when that changed them."""
        bases = self.held.setdefault(device, {})
        if bases.get(base) == on:
            return False
        bases[base] = on
        return True

    def alias(self, device: str, name: str) -> int:
        """The alias of an announced metric."""
        return self.devices[device][name].alias
