"""Sources restarted in place by a config revision, while the rest of the gateway runs on.

``[alarms]`` is retuned in place: the limit checker takes the new rules and keeps each stream's
state, so an alarm active now stays active (and clears by the new rule).  ``[status]`` restarts
the control socket's unit and the status page's.  The order keeps the
anonymizer fail-closed: every identity of the new sources (name, subject,
device addresses, ports) is registered with the anonymizer *before* anything of them runs; an
identity of a removed source stays registered (a record carrying it is still refused).  Then the
old units are stopped (each bounded, shielded from a cancellation of the caller), the new ones
built and started, and the status board's list of sources updated.  A stopped source's streams
are retired by the pipeline: forgotten, and every alarm of it still on at the twin ended with
its reason (``gateway.alarms.ledger``).  The outbox, the uplink, the
pipeline and every source not named in the plan keep running untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace

from gateway.alarms.config import AlarmsSection
from gateway.anonymize import Anonymizer
from gateway.config import Config
from gateway.contracts import DriverSpec, SampleSink
from gateway.downlink.diff import Plan
from gateway.inference.coverage import log_coverage
from gateway.observe.config import StatusSection
from gateway.runtime import register_source_identities, source_unit
from gateway.supervisor import Supervisor, Unit

log = logging.getLogger(__name__)


class SourceSwitch:
    """Swaps the sources a :class:`~gateway.downlink.diff.Plan` names, from one config to another."""

    def __init__(
        self,
        registry: Mapping[str, DriverSpec],
        supervisor: Supervisor,
        anonymizer: Anonymizer,
        sink: SampleSink,
        show: Callable[[Config], None],
        set_alarms: Callable[[AlarmsSection], None] | None = None,
        status_units: Callable[[StatusSection], list[Unit]] | None = None,
        retire_source: Callable[[str, Config], Awaitable[int]] | None = None,
    ) -> None:
        self._registry = registry
        self._sup = supervisor
        self._anon = anonymizer
        self._sink = sink
        self._show = show
        self._set_alarms = set_alarms
        self._status_units = status_units
        self._retire_source = retire_source

    async def apply(self, plan: Plan, new: Config) -> list[str]:
        """Swap the sources (and limit alarms) ``plan`` names to their settings in ``new``; the unit names."""
        entries = {e.info.name: e for e in new.sources}
        starting = [entries[n] for n in plan.sources if n in entries]
        for entry in starting:  # fail-closed: known to the anonymizer before the first sample
            register_source_identities(self._anon, entry)
        for name in plan.sources:
            if any(u.name == f"source:{name}" for u in self._sup.units):
                await self._sup.stop_unit(f"source:{name}")
                log.info("unit source:%s stopped for a config revision", name)
            if self._retire_source is not None:  # its old streams end by config, not by a loss
                await self._retire_source(name, new)
        for entry in starting:
            if not entry.enabled:
                log.info("source %s is disabled in the config", entry.info.name)
                continue
            self._sup.start_unit(await source_unit(entry, self._registry, self._anon, self._sink))
        if starting:  # what scores or watches the new sources' subjects, as the start log says it
            log_coverage(replace(new, sources=tuple(starting)))
        self._show(new)  # what status says of the config: its sources, names holding an identity
        if plan.alarms and self._set_alarms is not None:
            self._set_alarms(new.core.alarms)
            log.info("limit alarms retuned for a config revision")
        if plan.status and self._status_units is not None:
            # The control socket and the status page: the old ones end (the socket file removed)
            # before the new ones bind.
            for name in ("status", "web"):
                if any(u.name == name for u in self._sup.units):
                    await self._sup.stop_unit(name)
            for unit in self._status_units(new.core.status):
                self._sup.start_unit(unit)
            log.info("status units restarted for a config revision")
        return plan.units
