"""The composition of a running gateway: sources -> pipeline -> anonymizer -> outbox -> uplink.

This is the only place that wires concrete parts together; the driver registry is handed in by
the CLI so the core never imports a driver.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import json
import logging
import math
import signal
import socket
import sys
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel

from gateway import logs
from gateway.alarms import fold_device_alarm, with_priority
from gateway.alarms.config import AlarmsSection, limit_checker
from gateway.alarms.episodes import EpisodeTracker, episode_alarm
from gateway.alarms.ledger import FILE_NAME as LEDGER_FILE
from gateway.alarms.ledger import AlarmLedger, Delivers, EndReason, Entry
from gateway.alarms.resumed import DriverFaults
from gateway.anonymize import Anonymizer, OutRecord, Pseudonymizer, load_or_create_key
from gateway.config import Config, SourceEntry
from gateway.contracts import (
    Alarm,
    AlarmKind,
    Diagnostic,
    DriverSpec,
    Estimate,
    Lane,
    ModelResult,
    SampleSink,
    WindowModel,
    WindowRecord,
)
from gateway.errors import AnonymizationError, ConfigError, CorruptDataError, EdgetwinError
from gateway.estimation import Estimation
from gateway.held_names import HeldName, Identity, held_names
from gateway.inference.build import build_models, model_lengths, plausibility_checker
from gateway.inference.coverage import log_coverage, novelty_streams
from gateway.inference.fusion import FusionModel, build_fusions, fuse_window
from gateway.inference.novelty import build_novelty
from gateway.inference.rhythm import RhythmMonitor
from gateway.inference.streams import build_stream_change
from gateway.legend import FILE_NAME as LEGEND_FILE
from gateway.legend import Legend
from gateway.memory import trim_after_ready
from gateway.notify import Notifier
from gateway.observe.config import StatusSection, socket_path
from gateway.observe.control import ControlServer
from gateway.observe.lock import StateDirBusyError, state_dir_lock
from gateway.observe.status import StatusBoard
from gateway.outbox import DEFAULT_BUDGETS, AsyncOutbox, LaneBudget, Outbox, OutItem
from gateway.pipeline.windows import Windower
from gateway.privatefile import all_written, landed
from gateway.records import (
    AlarmRecord,
    FeaturesWindow,
    Record,
    RecordError,
    as_map,
    decode,
    encode,
    fault_origin,
)
from gateway.records.render import describe
from gateway.records.thin import Thinner
from gateway.sample import Quality, Sample, SampleBlock, Stream, valid_rows, valid_sample
from gateway.supervisor import DEVICE_BACKOFF, EXIT_CONFIG, EXIT_FAILURE, Group, Supervisor, Unit
from gateway.timebase import ClockStep, TimeBase

if TYPE_CHECKING:
    from gateway.inference.shadow import Slot

log = logging.getLogger(__name__)

COUNTERS_EVERY_S = 60.0  # how often gateway counters go out as a diagnostic record
_WINDOWS_PER_TURN = 1  # windows sealed per event-loop turn (one costs 1-2 ms, up to ~20 ms on a busy machine)
_SUBJECTS_PER_TURN = 8  # subjects whose windows are cut per event-loop turn (~20 streams each: ~5 ms)
_LOGGED_HERE = frozenset({AlarmKind.ANOMALY, AlarmKind.ANOMALY_INDETERMINATE})
#: The verdict of a detector on a window with an implausible value (it is not asked).
_IMPLAUSIBLE = ModelResult(math.nan, False, reason="implausible_input")
#: Conditions the windower ends: its own, and a device outage whoever reported it.
_WINDOWER_KINDS = frozenset({AlarmKind.SENSOR_FAULT, AlarmKind.SENSOR_LOST, AlarmKind.DEVICE_LOST})


class Pipeline:
    """Windows and features per subject, then anonymize, encode and hand to the outbox.

    The sink given to drivers (:attr:`sink`) forwards samples straight to the windower's bound
    methods: no queue, no per-sample coroutine.  Alarms are sealed and submitted at once.
    """

    def __init__(
        self,
        config: Config,
        anonymizer: Anonymizer,
        outbox: AsyncOutbox,
        models: Sequence[WindowModel] = (),
        fusions: Sequence[FusionModel] = (),
    ) -> None:
        p = config.core.pipeline
        self._models = tuple(models)
        self._fusions = tuple(fusions)
        self._episodes = EpisodeTracker(
            config.core.models.clear_after_windows, config.core.models.raise_after_windows
        )
        self._step_lock = asyncio.Lock()
        self._anon = anonymizer
        self._outbox = outbox
        self._hop_s = p.hop_s
        self.thinner = Thinner(p.hop_s)
        self.windower = Windower(
            window_s=p.window_s,
            hop_s=p.hop_s,
            grace_s=p.grace_s,
            lost_after_s=p.sensor_lost_s,
            on_alarm=self.alarm,
            restore_after_s=p.sensor_restore_s,
            lengths=model_lengths(self._models),
        )
        m = config.core.models
        self._plausibility = plausibility_checker(m)
        self._ectopy = RhythmMonitor() if m.ectopy else None
        self._limits = limit_checker(config.core.alarms, p.sensor_lost_s)
        # The conditions on at the twin, by source: ended when their source goes (gateway.alarms.ledger).
        self._ledger = AlarmLedger(
            config.core.gateway.state_dir / LEDGER_FILE, feeds(config), anonymizer.timebase.life
        )
        for entry in self._ledger.entries():  # of a source maybe gone: never in a record
            anonymizer.register(entry.subject)
            for source in entry.sources:
                anonymizer.register(source, words=False)
            if entry.stream is not None:
                anonymizer.register(entry.stream.device)
        kinds = {e.info.subject: e.info.kind for e in config.sources}
        self._estimation = Estimation(
            config.core.estimators, kinds, self.estimate, self.alarm, config.core.gateway.state_dir,
            now_mono=time.monotonic(), now_wall=time.time(), models_dir=m.dir,
        )  # fmt: skip
        self._driver_faults = DriverFaults()
        self._clock_steps: list[ClockStep] = []  # seen, until the outbox is restamped and they are sent
        # Conditions a previous run left on that nothing here judges: ended by end_vanished.  Those
        # of a stream or device their source no longer delivers first: no tracker takes them.
        delivers = delivered(config)
        self._unjudged: list[tuple[Entry, EndReason]] = self._ledger.undelivered(
            delivers, node_addresses(config)
        )
        ended = {id(e) for e, _ in self._unjudged}
        kept = [e for e in self._ledger.kept() if id(e) not in ended]
        self._resume(kept)
        # A source whose device names itself (a serial number, a server URI, a node id): the devices
        # its conditions were raised on, until its first data say whether it is still that device.
        # Identities from its configuration (a port, a fallback name) are not the device's own word.
        self._devices_before: dict[str, set[str]] = {}
        self._provisional = {
            e.info.name: frozenset(v for k, v in driver_identity_items(e.config) if k in _FALLBACK_KEYS)
            for e in config.sources
        }
        for e in kept:
            if e.stream is not None and None in delivers.get(e.stream.source, {}):
                self._devices_before.setdefault(e.stream.source, set()).add(e.stream.device)
        # And one that may deliver under its port before it names itself, with nothing kept: once it
        # does, the port's streams are its own (not lost), as are conditions raised under the port.
        for name, ports in self._provisional.items():
            if ports and None in delivers.get(name, {}):
                self._devices_before.setdefault(name, set())
        # (source, device) -> the port its conditions were raised under before it named itself: they
        # are its own now, judged by its data, and their alarms go out under the port (as raised).
        self._adopted: dict[tuple[str, str], str] = {}
        self.sink: SampleSink = _Sink(self.put, self.put_block, self.driver_alarm, self.diagnostic)
        self.last_beat = time.monotonic()
        self.submitted = dict.fromkeys(Lane, 0)
        self.last_diagnostics: dict[tuple[str, str | None], Diagnostic] = {}
        self._next_counters = time.monotonic() + COUNTERS_EVERY_S

    def _resume(self, entries: list[Entry]) -> None:
        """Hand each tracker the conditions a previous run left on, so it ends them as it would have.

        The data after the start judges them by the tracker's own rules: a condition that is over
        ends with its ordinary ending, one that still holds sends nothing (no second raise).
        """
        scored = {m.name for m in self._models} | {f.name for f in self._fusions}
        rhythm = self._ectopy.model if self._ectopy is not None else None
        for e in entries:
            model = str(e.detail.get("model", ""))
            if e.kind is AlarmKind.ANOMALY:
                pattern = e.detail.get("pattern")
                if pattern is None and model in scored:
                    self._episodes.resume((e.subject, model))
                elif pattern is not None and model == rhythm and e.stream is not None and self._ectopy:
                    self._ectopy.resume(e.stream, str(pattern))
                else:
                    self._unjudged.append((e, "model_removed"))
            elif "estimate" in e.detail:
                if e.kind is AlarmKind.LIMIT:
                    self._estimation.resume_limit(e.subject, str(e.detail["estimate"]))
            elif e.stream is None:
                continue
            elif e.kind is AlarmKind.LIMIT:
                held = None if e.onset is None else functools.partial(self._ledger.held_for, e)
                if not self._limits.resume(e.stream, str(e.detail.get("level", "")), held):
                    self._unjudged.append((e, "rule_removed"))
            elif e.kind is AlarmKind.SENSOR_FAULT and fault_origin(e.detail) == "rule":
                # A value out of range: the sample check judges it, and the model whose window check
                # raised it (both raise and restore it in their own time, as without the restart).
                self._plausibility.resume(e.stream)
                for m in self._models:
                    resume_fault = getattr(m, "resume_fault", None)
                    if m.name == model and resume_fault is not None:
                        resume_fault(e.subject, e.stream.key)
            elif e.kind is AlarmKind.SENSOR_FAULT and fault_origin(e.detail) == "driver":
                self._driver_faults.resume(e.stream, e.detail)  # the driver's own (a node, a battery)
            elif e.kind in _WINDOWER_KINDS:
                self.windower.resume(e.kind, e.stream)

    def set_alarms(self, section: AlarmsSection) -> None:
        """Limit alarms by ``section`` from now on (a config revision in place).

        Active ones stay active where the new rule still has their level; the others clear now.
        """
        for alarm in self._limits.take_rules(limit_checker(section)):
            self.alarm(alarm)

    async def retire_source(
        self, name: str, new: Config, now_mono: float | None = None, now_wall: float | None = None
    ) -> int:
        """``name`` stopped by a config revision: its streams forgotten, its conditions ended; how many streams.

        Every alarm on at the twin that belongs to it ends now, saying why (``source_changed`` when
        ``new`` still has it on the alarm's subject, else ``source_removed``), and the trackers
        forget it, so a condition that still holds under ``new`` is raised afresh after its delay.
        """
        streams = self.windower.forget_source(name)
        # The subjects it still feeds (none when it is gone or disabled).
        keeps = [s for e in new.sources if e.info.name == name and e.enabled for s in e.subjects()]
        now_mono = time.monotonic() if now_mono is None else now_mono
        now_wall = time.time() if now_wall is None else now_wall
        ended = self._ledger.end_source(name, keeps, now_mono, now_wall)
        self._forget(name)
        self._devices_before.pop(name, None)
        self._adopted = {k: v for k, v in self._adopted.items() if k[0] != name}
        for subject in {a.subject for a in ended if a.kind is AlarmKind.ANOMALY_CLEARED}:
            self._episodes.forget(subject)
        for a in ended:
            if "estimate" in a.detail:  # a subject's estimate: still low, it is raised again
                self._estimation.forget_limit(a.subject, str(a.detail["estimate"]))
        self._ledger.set_feeds(feeds(new))
        await self._end(ended)
        return streams

    def _forget(self, source: str, device: str | None = None) -> None:
        """The trackers drop ``source``'s streams (of ``device`` only, when given): their conditions ended."""
        self._limits.forget_source(source, device)
        self._plausibility.forget_source(source, device)
        self._driver_faults.forget_source(source, device)
        if self._ectopy is not None:
            self._ectopy.forget_source(source, device)
        for m in self._models:
            forget = getattr(m, "forget_source", None)
            if forget is not None:  # a model's input faults (gateway.inference.runner)
                forget(source, device)

    async def end_vanished(self, now_mono: float | None = None, now_wall: float | None = None) -> None:
        """End the conditions a previous run left on whose source, stream, device, limit level or model this configuration lacks."""
        now_mono = time.monotonic() if now_mono is None else now_mono
        now_wall = time.time() if now_wall is None else now_wall
        ended = self._ledger.end_vanished(now_mono, now_wall)
        for source in sorted(
            {e.stream.source for e, why in self._unjudged if why == "device_changed" and e.stream}
        ):
            log.warning(
                "source %s: its configuration names other devices than before the stop: the conditions "
                "of the one it no longer reads are ended (device changed); the new one starts afresh",
                source,
            )
        for reason in ("rule_removed", "model_removed", "stream_removed", "device_changed", "source_changed"):
            gone = [e for e, why in self._unjudged if why == reason]
            ended += self._ledger.end(gone, reason, now_mono, now_wall)
        self._unjudged.clear()
        await self._end(ended)

    def _check_device(self, stream: Stream, t_mono: float, t_wall: float) -> None:
        """The first data of a source whose device names itself: another device ends the old one's conditions.

        A port (what a driver names the device by until it names itself) is no evidence either
        way: data under it leave the question open, and conditions raised under it before the stop
        are kept until the device names itself.  Then they are ended (``device_changed``) if it is
        another device than one the conditions kept name, and otherwise adopted: judged by its data.
        A source that may deliver under its port is watched from the start even with nothing kept,
        so its port's streams of this run go on under its name (their samples too), not as lost.
        """
        before = self._devices_before.get(stream.source)
        if before is None:
            return
        ports = self._provisional.get(stream.source, frozenset())
        if stream.device in ports:
            return  # not named by the device itself yet: no evidence either way
        del self._devices_before[stream.source]
        named = before - ports
        if not named or stream.device in named:
            for port in sorted(ports):  # the same device, or none named before
                self._adopt_port(stream, port)
            return
        gone = self._ledger.other_devices(stream.source, stream.device)
        log.warning(
            "source %s: reads another device now (%s; before the stop: %s): the old device's conditions "
            "are ended (device changed); the new one starts afresh",
            stream.source,
            self._anon.log_label("device", stream.device),
            ", ".join(sorted(self._anon.log_label("device", d) for d in before)),
        )
        for device in before | ports:
            self.windower.forget_source(stream.source, device)
            self._forget(stream.source, device)
        self._send_endings(self._ledger.end(gone, "device_changed", t_mono, t_wall))

    def _adopt_port(self, stream: Stream, port: str) -> None:
        """What ``stream``'s source delivered or left on under ``port`` is its device's: its data judge it."""
        source, device = stream.source, stream.device
        # The port's streams are the device's (their samples are windowed with its own), not lost.
        self.windower.adopt_device(source, port, device, stream.subject)
        self._forget(source, port)
        mine = [
            e
            for e in self._ledger.entries()
            if e.stream is not None and e.stream.source == source and e.stream.device == port
        ]
        if not mine:
            return
        self._adopted[(source, device)] = port
        self._resume([replace(e, stream=replace(e.stream, device=device)) for e in mine if e.stream])
        log.info(
            "source %s: its device names itself (%s): the %d condition(s) raised under its port before "
            "are its own, ended by its data",
            source,
            self._anon.log_label("device", device),
            len(mine),
        )

    def _as_raised(self, alarm: Alarm) -> Alarm:
        """An alarm of a condition adopted from a port, under the port it was raised under (the twin's key)."""
        s = alarm.stream
        port = None if s is None else self._adopted.get((s.source, s.device))
        if s is None or port is None:
            return alarm
        raised = replace(alarm, stream=replace(s, device=port))
        return raised if self._ledger.holds(raised) else alarm

    async def _end(self, ended: list[Alarm]) -> None:
        """Send the endings, and keep the ledger only once they are in the outbox for good."""
        self._send_endings(ended)
        if ended:
            await self._outbox.flush()
        await self._save_ledger()

    async def _save_ledger(self) -> None:
        """Keep the ledger when it changed, written by its file's worker thread: its two fsyncs held the loop, and every alarm behind it."""
        written = self._ledger.keep()
        if written is not None:
            with contextlib.suppress(OSError):  # logged by the ledger, written again at the next step
                await landed(written)

    def _send_endings(self, ended: list[Alarm]) -> None:
        """Log and queue endings the gateway itself sends (``ended`` in their detail)."""
        for alarm in ended:
            # By source and metric, never the device: a removed source's device has no log label.
            what = alarm.detail.get("model", "-")
            if alarm.stream is not None:
                what = f"source {alarm.stream.source}, {alarm.stream.metric.name}"
            log.info(
                "%s on %s (%s): %s",
                alarm.kind.value,
                self._anon.log_label("subject", alarm.subject),
                what,
                str(alarm.detail["ended"]).replace("_", " "),
            )
            self.alarm(alarm)

    def put(self, sample: Sample) -> None:
        """One sample: into its window, through the plausibility rules, then (valid) to the judgements."""
        # Empty once every source whose device names itself has done so (one that never does, a
        # monitor without a serial number, keeps it: 0.1-0.2 us a sample).
        if self._devices_before:
            self._check_device(sample.stream, sample.t_mono, sample.t_wall)
        alarm = self._plausibility.check_sample(sample)
        # A value no body or machine produces is the sensor's fault, not the patient's or the
        # process's: the rhythm detector and the estimators see it as no measurement, the limits
        # and the window's features too when it is out of range - one that only broke the rate
        # rule may be a real fast change, and the limits' on-delays filter a brief artifact.
        valid = valid_sample(sample)  # one flagged or with no value is kept from them as such, not checked
        invalid = valid and self._plausibility.implausible(sample.stream)
        out_of_range = invalid and self._plausibility.out_of_range(sample.stream)
        self.windower.put(sample, out_of_range)  # its alarms before the rule's, as the data came
        if alarm is not None:
            self.alarm(alarm)
        # by_data is empty once the faults a previous run left on are judged: the test costs ~20 ns.
        if self._driver_faults.by_data and valid and not invalid:
            self._driver_data(sample.stream, sample.t_mono, sample.t_wall)
        self._estimation.put(replace(sample, value=math.nan) if invalid else sample)
        alarm = self._limits.check_sample(sample, invalid=out_of_range)
        if alarm is not None:
            self.alarm(alarm)
        if self._ectopy is not None and sample.stream.metric.rr:
            beat_alarm = self._ectopy.update(sample, implausible=invalid)
            if beat_alarm is not None:
                self.alarm(beat_alarm)

    def put_block(self, block: SampleBlock) -> None:
        """A block of one stream: as :meth:`put`, vectorised where the stage allows."""
        if self._devices_before and len(block):
            self._check_device(block.stream, float(block.t_mono[0]), float(block.t_wall[0]))
        alarms, invalid, out_of_range = self._plausibility.judge_block(block)
        self.windower.put_block(block, out_of_range)
        for alarm in alarms:
            self.alarm(alarm)
        if self._driver_faults.by_data and len(block):
            valid = np.flatnonzero(valid_rows(block, invalid))
            if valid.size:
                i = int(valid[0])
                self._driver_data(block.stream, float(block.t_mono[i]), float(block.t_wall[i]))
        # As in put: the judgements see an implausible value as no measurement.
        if invalid is None:
            self._estimation.put_block(block)
        else:
            self._estimation.put_block(replace(block, value=np.where(invalid, np.nan, block.value)))
        for alarm in self._limits.check_block(block, out_of_range):
            self.alarm(alarm)
        if self._ectopy is not None and block.stream.metric.rr:
            for i in range(len(block)):
                beat_alarm = self._ectopy.update(
                    Sample(
                        block.stream,
                        float(block.t_mono[i]),
                        float(block.t_wall[i]),
                        float(block.value[i]),
                        Quality(int(block.quality[i])),
                    ),
                    implausible=invalid is not None and bool(invalid[i]),
                )
                if beat_alarm is not None:
                    self.alarm(beat_alarm)

    def _submit(self, build: Callable[[], OutRecord | None]) -> bool:
        """True when the record was queued; False when there was none, or it was refused (counted)."""
        sealed = self._anon.seal(build, encode)
        if sealed is None:
            return False
        rec, data = sealed
        if not self._outbox.submit(OutItem(rec.lane, rec.topic, data)):
            return False
        self.submitted[rec.lane] += 1
        return True

    def alarm(self, alarm: Alarm) -> None:
        """Seal and queue an alarm now; it never waits for a window."""
        alarm = with_priority(self._as_raised(alarm) if self._adopted else alarm)
        held = self._ledger.held(alarm)  # a condition a previous run left on: since its onset then
        if held is not None:
            alarm = replace(alarm, held_s=held)
        # Sensor alarms are logged by the windower or driver that raised them; anomalies here.
        if alarm.kind in _LOGGED_HERE:
            log.warning(
                "%s on %s: %s",
                alarm.kind.value,
                self._anon.log_label("subject", alarm.subject),
                dict(alarm.detail),
            )
        if self._submit(lambda: self._anon.alarm(alarm)):
            self._ledger.note(alarm)

    def _driver_data(self, stream: Stream, t_mono: float, t_wall: float) -> None:
        """A valid sample of ``stream`` (no unusable flag, a value, plausible) for the resumed driver faults."""
        alarm = self._driver_faults.data(stream, t_mono, t_wall)
        if alarm is not None:
            self.alarm(alarm)

    def driver_alarm(self, alarm: Alarm) -> None:
        """An alarm from a driver; a device it reports lost or back is folded into one device alarm."""
        if self._devices_before and alarm.stream is not None:
            self._check_device(alarm.stream, alarm.t_mono, alarm.t_wall)
        # A fault on at the twin raised again by a fresh driver is the same condition: not sent,
        # unless its status is another (a node absent then, its access refused now), which the
        # technician needs: sent then, the twin keeps the condition and shows the new status.
        if (self._driver_faults.resumed and self._driver_faults.repeat(alarm)) and not self._ledger.restates(
            alarm
        ):
            return  # a fault a previous run left on, raised again
        if _raises_unresolved_fault(alarm) and self._ledger.holds(alarm) and not self._ledger.restates(alarm):
            # A fresh driver (after a restart) finds the node still unresolved: the twin holds that
            # fault on already.  One it was never sent (refused, not recorded) goes out now.
            return
        if _ends_own_fault(alarm) and not self._ledger.holds(self._as_raised(alarm)):
            return  # a fresh driver's first good reading (a battery) with nothing on to end
        folded = fold_device_alarm(alarm, self.windower)
        if folded is not None:
            self.alarm(folded)

    def diagnostic(self, diagnostic: Diagnostic) -> None:
        """Seal and queue a diagnostic record (the latest of each kind and subject is kept for status)."""
        self.last_diagnostics[(diagnostic.kind, diagnostic.subject)] = diagnostic
        self._submit(lambda: self._anon.diagnostic(diagnostic))

    def estimate(self, estimate: Estimate) -> None:
        """Seal and queue a state estimate (``gateway.estimation``)."""
        self._submit(lambda: self._anon.estimate(estimate))

    async def save_estimators(self) -> None:
        """Keep the estimators' state for the next start, and wait until it is on disk (at the stop; the step saves it periodically)."""
        written = self._estimation.save(time.monotonic(), time.time())
        if written is not None:
            with contextlib.suppress(OSError):  # logged by the estimation stage
                await landed(written)

    def window(self, record: WindowRecord) -> None:
        """Seal and queue one window of features: unchanged streams as markers, unchanged windows not."""
        thinned: list[FeaturesWindow] = []

        def build() -> OutRecord | None:
            rec = self._anon.window(record)
            if not isinstance(rec.payload, FeaturesWindow):
                return rec
            thin = self.thinner.thin(rec.payload)
            if thin is None:
                return None
            thinned.append(thin)
            return replace(rec, payload=thin)

        if not self._submit(build) and thinned:
            # Refused after thinning (anonymizer, full queue or disk): the twin never got it, so
            # the next window must not be sent as markers that point back to it.
            self.thinner.forget(thinned[0].subject)

    async def _score(self, records: list[WindowRecord]) -> list[WindowRecord]:
        """Run every applicable model over the closed windows in a worker thread; raise anomalies."""
        verdicts: list[dict[str, ModelResult]] = [{} for _ in records]
        for model in self._models:
            # Each model sees the window over its own length (its card's), ending where the record does.
            length = getattr(model, "window_s", None)
            views = [r.over(length) for r in records]
            picked = [i for i, r in enumerate(views) if model.applies_to(r)]
            if not getattr(model, "checks_plausibility", False):
                # A detector that does not vet its inputs (novelty, per-stream) neither learns from
                # nor judges a window holding a value no machine or body produces: a sensor fault,
                # raised as one already, is not a change of the subject.
                vetted = [i for i in picked if not self._plausibility.check_window(views[i])]
                for i in set(picked).difference(vetted):
                    verdicts[i][model.name] = _IMPLAUSIBLE
                picked = vetted
            if not picked:
                continue
            results = await asyncio.to_thread(model.score_batch, [views[i] for i in picked])
            for i, result in zip(picked, results, strict=True):
                verdicts[i][model.name] = result
        scores: list[dict[str, float]] = []
        for rec, verdict in zip(records, verdicts, strict=True):
            fused = fuse_window(self._fusions, rec, verdict) if self._fusions else set()
            scores.append({name: r.score for name, r in verdict.items() if math.isfinite(r.score)})
            for name, result in verdict.items():
                if name in fused:
                    continue  # its fusion raises the episodes of this subject: one alarm, not two
                # One alarm per episode, not per window: overlapping windows of one event would
                # otherwise page the nurse every hop (alarm fatigue).
                emission = self._episodes.update((rec.subject, name), result, rec.end_mono)
                if emission is not None:
                    self.alarm(episode_alarm(emission, rec, name))
        for model in self._models:
            # Sensor faults found by a model's plausibility checks, and its health changes.
            for event in getattr(model, "drain_events", list)():
                if isinstance(event, Alarm):
                    self.alarm(event)
                else:
                    self.diagnostic(event)
        return [replace(r, scores=s) if s else r for r, s in zip(records, scores, strict=True)]

    async def _cut(self, now_mono: float, now_wall: float) -> list[WindowRecord]:
        """The windows due, cut a few subjects per event-loop turn so that alarms are not held up."""
        records: list[WindowRecord] = []
        try:
            for n, chunk in enumerate(self.windower.closing(now_mono, now_wall), 1):
                records.extend(chunk)
                if n % _SUBJECTS_PER_TURN == 0:
                    await asyncio.sleep(0)
        except BaseException:
            for record in records:  # cut already: queued unscored rather than lost
                self.window(record)
            raise
        records.sort(key=lambda r: r.index)  # stable: subjects keep their order within a window
        return records

    async def step(self, now_mono: float | None = None, now_wall: float | None = None) -> int:
        """Close every window that is due, score and queue it; return how many were closed."""
        # One step at a time: the drain's final step waits for an in-flight one instead of racing
        # it (and the stateful models) in a second worker thread.
        async with self._step_lock:
            now_mono = time.monotonic() if now_mono is None else now_mono
            now_wall = time.time() if now_wall is None else now_wall
            records = await self._cut(now_mono, now_wall)
            self._estimation.tick(now_mono, now_wall)
            if records and self._models:
                try:
                    records = await self._score(records)
                except BaseException:
                    # close_due has moved on: these windows exist nowhere else. Queue them
                    # unscored rather than lose them, then let the cancellation or error go on.
                    for record in records:
                        self.window(record)
                    raise
            # A window at a time, with a loop turn between: sealing one costs ~1-2 ms, and
            # an alarm raised meanwhile must not wait for a whole hop's worth (1,000 streams: ~0.1 s).
            pending = records
            try:
                while pending:
                    for record in pending[:_WINDOWS_PER_TURN]:
                        self.window(record)
                    pending = pending[_WINDOWS_PER_TURN:]
                    if pending:
                        await asyncio.sleep(0)
            finally:
                for record in pending:  # cancelled between turns: queue the rest, lose none
                    self.window(record)
        # Kept until the restamp is done: if it fails or is cancelled the next step retries it
        # (a second restamp moves nothing twice) and the clock_step diagnostics still go out.
        self._clock_steps.extend(self._anon.timebase.take_steps())
        if self._clock_steps:
            self._ledger.reframe()  # the life clock counts the step into the last downtime
            await self._outbox.restamp()  # what waits is no older for the step
            for found in self._clock_steps:
                detail = {"step_s": round(found.step_s, 3), "applied_s": round(found.applied_s, 3)}
                self.diagnostic(Diagnostic("clock_step", None, now_wall, detail))
            self._clock_steps = []
        if now_mono >= self._next_counters:
            self._next_counters = now_mono + COUNTERS_EVERY_S
            self.diagnostic(Diagnostic("counters", None, now_wall, self.counters()))
        await self._save_ledger()  # the conditions on now, for a restart that finds their source gone
        self.last_beat = now_mono
        return len(records)

    def alarms_on(self) -> list[Entry]:
        """The conditions on at the twin now: raised and not yet ended, this run's or carried over a restart."""
        return self._ledger.entries()

    def alarm_age(self, entry: Entry, now_mono: float) -> float | None:
        """How long a condition on has been on (carried over a restart: its time before the stop too); None when unknown."""
        return self._ledger.age(entry, now_mono)

    def alarms_on_records(self) -> list[AlarmRecord]:
        """The conditions on now as the records that raised them (pseudonymized), for an uplink that must know them at its start.

        A condition carried over a restart is resumed without a second raise: an uplink that
        keeps no state of its own (a new Sparkplug state file) would not learn it is on.
        """
        now_mono, now_wall = time.monotonic(), time.time()
        out: list[AlarmRecord] = []
        for e in self._ledger.entries():
            try:
                record = self._anon.alarm(e.raising(now_mono, now_wall)).payload
            except AnonymizationError as exc:  # fail closed: the uplink learns it from its ending
                log.warning("alarm ledger: a condition on cannot be told to the uplink: %s", exc)
                continue
            if isinstance(record, AlarmRecord):
                out.append(record)
        return out

    def counters(self) -> dict[str, float | str]:
        """Pipeline counters for diagnostics and STATUS."""
        out: dict[str, float | str] = {f"windower_{k}": v for k, v in self.windower.counters().items()}
        out["anonymizer_dropped"] = self._anon.dropped
        for lane, n in self.submitted.items():
            out[f"queued_{lane.name.lower()}"] = n
        out.update(self._outbox.counters())
        return out

    async def run(self, started: Callable[[], None]) -> None:
        """Close windows on the hop grid until cancelled."""
        period = min(0.5, self._hop_s / 4)
        await self.end_vanished()
        started()
        while True:
            await self.step()
            await asyncio.sleep(period)


def delivered(config: Config) -> dict[str, Delivers]:
    """What each enabled source's configuration says it delivers (``delivers()`` of its driver config).

    A driver config without it (the device and its streams are known only at run time) delivers
    whatever its one device, named at run time, sends.
    """
    out: dict[str, Delivers] = {}
    for e in config.sources:
        if e.enabled:
            delivers = getattr(e.config, "delivers", None)
            out[e.info.name] = delivers() if callable(delivers) else {None: None}
    return out


def configured_identities(config: Config) -> list[Identity]:
    """Every identity the config names, as the start registers them (sources enabled or not), and the host's name."""
    out = [
        Identity("the gateway name (gateway.name)", config.core.gateway.name, renamable=True),
        Identity("this machine's host name", socket.gethostname(), renamable=True),
    ]
    for e in config.sources:
        for key, text in source_identities(e):
            if key == SOURCE_NAME_KEY:
                out.append(Identity(f"the name of source {e.info.name}", text, words=False, renamable=True))
            elif key in SUBJECT_KEYS:
                which = "the subject" if text == e.info.subject else "a device's subject"
                out.append(Identity(f"{which} of source {e.info.name}", text, renamable=True))
            elif key in DEVICE_KEYS:
                out.append(Identity(f"a device of source {e.info.name} ({key})", text))
            else:
                out.append(Identity(f"the {key} of source {e.info.name}", text))
    return out


def config_held_names(config: Config) -> list[HeldName]:
    """The metric names the enabled sources declare that hold an identity the config names (gateway.held_names)."""
    return held_names(delivered(config), configured_identities(config))


def node_addresses(config: Config) -> dict[str, frozenset[str]]:
    """The configured addresses of each enabled source that lists nodes (``node_addresses()``)."""
    out: dict[str, frozenset[str]] = {}
    for e in config.sources:
        listed = getattr(e.config, "node_addresses", None)
        if e.enabled and callable(listed):
            out[e.info.name] = listed()
    return out


def feeds(config: Config) -> dict[str, list[str]]:
    """The enabled sources feeding each subject."""
    out: dict[str, list[str]] = {}
    for e in config.sources:
        if e.enabled:
            for subject in e.subjects():
                out.setdefault(subject, []).append(e.info.name)
    return out


class _Sink:
    """The SampleSink handed to drivers: bound methods only, no indirection on the hot path."""

    __slots__ = ("alarm", "diagnostic", "put", "put_block")

    def __init__(
        self,
        put: Callable[[Sample], None],
        put_block: Callable[[SampleBlock], None],
        alarm: Callable[[Alarm], None],
        diagnostic: Callable[[Diagnostic], None],
    ) -> None:
        self.put = put
        self.put_block = put_block
        self.alarm = alarm
        self.diagnostic = diagnostic


def render_pretty(topic: str, record: Record) -> str:
    """One human-readable line for an outgoing record (the demo's local view)."""
    return f"{topic:<28} {describe(record)}"


class LocalUplink:
    """Shows what would leave the gateway: leases from the outbox, writes one line each, acks.

    Stands in for the network uplink: the ack happens only after the line was written and
    flushed, so the outbox contract (delete only after delivery) is exercised end to end.
    """

    def __init__(self, outbox: AsyncOutbox, out: IO[str], *, pretty: bool = False, batch: int = 64) -> None:
        self._outbox = outbox
        self._out = out
        self._pretty = pretty
        self._batch = batch
        self.last_beat = time.monotonic()
        self.delivered = 0
        self.corrupt = 0

    async def _deliver_once(self) -> int:
        leased = await self._outbox.lease(self._batch)
        if not leased:
            return 0
        lines = []
        try:
            for item in leased:
                try:
                    record = decode(item.payload)
                except RecordError as exc:
                    # Undeliverable as it stands; holding it would strand its whole batch forever.
                    self.corrupt += 1
                    log.error(
                        "local uplink: record %d dropped: %s (corrupt so far: %d)", item.id, exc, self.corrupt
                    )
                    continue
                if self._pretty:
                    lines.append(render_pretty(item.topic, record))
                else:
                    lines.append(
                        json.dumps(
                            {"topic": item.topic, "lane": item.lane.name.lower(), "record": as_map(record)}
                        )
                    )
            if lines:
                self._out.write("\n".join(lines) + "\n")
                self._out.flush()
        except BaseException:
            await self._outbox.release([i.id for i in leased])
            raise
        await self._outbox.ack([i.id for i in leased])
        self.delivered += len(lines)
        return len(leased)

    async def run(self, started: Callable[[], None]) -> None:
        """Deliver until cancelled."""
        started()
        while True:
            self.last_beat = time.monotonic()
            if await self._deliver_once() == 0:
                await asyncio.sleep(0.2)

    async def drain(self, deadline: float) -> None:
        """Deliver what is queued until the outbox is empty or the deadline passes."""
        while time.monotonic() < deadline and await self._deliver_once():
            pass


class _NoUplink:
    last_beat = math.inf

    async def run(self, started: Callable[[], None]) -> None:
        started()
        await asyncio.Event().wait()

    async def drain(self, deadline: float) -> None:
        del deadline  # nothing leaves the gateway: the outbox keeps it all


def _raises_unresolved_fault(alarm: Alarm) -> bool:
    """True for a driver's raise of a fault on a node that never resolved (no stream: ``Alarm.node``)."""
    return alarm.kind is AlarmKind.SENSOR_FAULT and alarm.stream is None and "status" in alarm.detail


def _ends_own_fault(alarm: Alarm) -> bool:
    """True for a driver's ending of a fault it raises about itself by ``cause`` (a low battery) or on a node that never resolved."""
    detail = alarm.detail
    return (
        alarm.kind is AlarmKind.SENSOR_RESTORED
        and ("cause" in detail or (alarm.stream is None and "status" in detail))
        and detail.get("after") == AlarmKind.SENSOR_FAULT.value
    )


def register_source_identities(anonymizer: Anonymizer, entry: SourceEntry) -> None:
    """Make every identity a source's config names known to the anonymizer and the log redactor.

    Done before anything of the source runs (at the start, or before a revision builds it): its
    name, its subject and every subject its devices are bound to, and the device identities of its
    driver config, so no record or log line sent before its first sample can carry one.
    """
    for field_name, identity in source_identities(entry):
        anonymizer.register(identity, words=field_name != SOURCE_NAME_KEY)
        if field_name == SOURCE_NAME_KEY:
            continue  # logs name sources by their config names
        # A subject or a device by the pseudonym its records carry; a port or an endpoint by its source.
        label = f"{entry.info.name}.{field_name}"
        if field_name in SUBJECT_KEYS:
            label = anonymizer.log_label("subject", identity)
        elif field_name in DEVICE_KEYS:
            label = anonymizer.log_label("device", identity)
        logs.register_identity(identity, label)


#: The key :func:`source_identities` gives a source's own name under (registered with ``words=False``).
SOURCE_NAME_KEY = "name"


def source_identities(entry: SourceEntry) -> list[tuple[str, str]]:
    """Every identity a source's config names, with its key: the source's name, its subjects, its driver's identities."""
    subjects = [("subject", s) for s in (entry.info.subject, *entry.subjects())]
    return [(SOURCE_NAME_KEY, entry.info.name), *subjects, *driver_identity_items(entry.config)]


async def source_unit(
    entry: SourceEntry, registry: Mapping[str, DriverSpec], anonymizer: Anonymizer, sink: SampleSink
) -> Unit:
    """The supervised unit of one enabled source; a driver that cannot be built gives a failed unit."""
    name = f"source:{entry.info.name}"
    try:
        driver: Any = await asyncio.to_thread(registry[entry.driver].factory, entry.info, entry.config)
    except ConfigError as exc:
        # One source's mistake: that source is marked failed, the others run.
        return Unit(name, Group.SOURCES, _failing(exc))
    for identity in driver_identities(entry.config):
        anonymizer.register(identity)

    async def run_source(started: Callable[[], None]) -> None:
        await driver.run(sink, started=started)

    # pulse: drivers that report liveness
    return Unit(name, Group.SOURCES, run_source, pulse=getattr(driver, "pulse", None), backoff=DEVICE_BACKOFF)


def _failing(error: ConfigError) -> Callable[[Callable[[], None]], Coroutine[Any, Any, None]]:
    async def run(started: Callable[[], None]) -> None:
        del started  # never starts: the driver could not even be built
        raise error

    return run


#: Driver config keys whose string values are identities: devices (addresses, serial numbers,
#: ports, endpoints, node ids), the subjects single devices are bound to (a wearable's bed), and
#: what names the site or an account to a device's server (an OPC UA user, application and
#: namespace URI). They are registered with the anonymizer before the first sample, so a
#: diagnostic sent before any window cannot carry one.
IDENTITY_KEYS = frozenset(
    {
        "device", "address", "port", "endpoint", "node_id", "serial", "url", "link",
        "subject", "username", "application_uri", "namespace_uri",
    }
)  # fmt: skip
DEVICE_KEYS = frozenset({"device", "address", "serial"})  # of these, the ones naming a device
SUBJECT_KEYS = frozenset({"subject"})  # ... and the ones naming a subject
#: Of these, the ones a driver falls back on while its device has not named itself (a port).
_FALLBACK_KEYS = frozenset({"device", "port", "link"})


def driver_identities(config: Any) -> list[str]:
    """The identity strings in a driver's config (see :data:`IDENTITY_KEYS`), at any depth."""
    return [value for _, value in driver_identity_items(config)]


def driver_identity_items(config: Any) -> list[tuple[str, str]]:
    """The identities in a driver's config (a model, or a raw TOML table) with the key each was found under."""
    found: list[tuple[str, str]] = []

    def walk(value: Any, key: str | None) -> None:
        if isinstance(value, BaseModel):
            for name in type(value).model_fields:
                walk(getattr(value, name), name)
        elif isinstance(value, Mapping):
            # A raw table's keys are the config's keys; a model's own mapping (an MCU's channel ->
            # metric names) holds data whose keys are not: a channel called "port" is no port.
            for k, v in value.items():
                walk(v, None if model else str(k))
        elif isinstance(value, list | tuple):
            for v in value:
                walk(v, key)
        elif isinstance(value, str | Path) and key in IDENTITY_KEYS and len(str(value)) >= 4:
            found.append((key, str(value)))

    model = isinstance(config, BaseModel)
    walk(config, None)
    return found


def budgets_for(config: Config) -> dict[Lane, LaneBudget]:
    """The outbox lane budgets the config asks for."""
    budgets = dict(DEFAULT_BUDGETS)
    features = budgets[Lane.FEATURES]
    budgets[Lane.FEATURES] = LaneBudget(
        features.max_bytes, config.core.outbox.feature_max_age_h * 3600.0, features.policy
    )
    return budgets


async def run_gateway(
    config: Config,
    registry: Mapping[str, DriverSpec],
    *,
    notifier: Notifier | None = None,
    out: IO[str] | None = None,
    pretty: bool = False,
    stop_after_s: float | None = None,
    install_signal_handlers: bool = True,
) -> int:
    """Run the gateway until SIGTERM/SIGINT (or ``stop_after_s``); return the process exit code."""
    gc.freeze()  # what the process imported and configured: see the freeze before sup.run
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(state_dir_lock(config.core.gateway.state_dir))
        except ConfigError as exc:
            # A second gateway on one state directory: leave at once, naming the one running.
            log.error("%s", exc)
            return EXIT_FAILURE if isinstance(exc, StateDirBusyError) else EXIT_CONFIG
        return await _run_locked(
            config, registry, notifier, out, pretty, stop_after_s, install_signal_handlers
        )


async def _run_locked(
    config: Config,
    registry: Mapping[str, DriverSpec],
    notifier: Notifier | None,
    out: IO[str] | None,
    pretty: bool,
    stop_after_s: float | None,
    install_signal_handlers: bool,
) -> int:
    core = config.core
    notifier = notifier or Notifier.from_env()
    try:
        key = load_or_create_key(core.site_key_path)
    except ConfigError as exc:
        log.error("%s", exc)
        return EXIT_CONFIG
    try:
        timebase = TimeBase.open(core.gateway.state_dir)
    except ConfigError as exc:
        log.error("%s", exc)
        return EXIT_CONFIG
    anonymizer = Anonymizer(
        Pseudonymizer(key),
        time_mode=core.privacy.time,
        coarsen_s=core.privacy.coarsen_s,
        local_identities=[core.gateway.name],
        timebase=timebase,
        legend=Legend(core.gateway.state_dir / LEGEND_FILE),
    )
    # Logs name subjects by pseudonym and devices by source; see gateway.logs.
    anonymizer.on_identity = logs.register_identity
    logs.register_identity(core.gateway.name, anonymizer.log_label("gateway", core.gateway.name))
    for entry in config.sources:  # every source's, enabled or not, before anything runs
        register_source_identities(anonymizer, entry)
    outbox_path: Path = core.outbox_path
    budgets = budgets_for(config)
    total = int(core.outbox.max_mb * 1024 * 1024)
    sync: Literal["FULL", "NORMAL"] = "FULL" if core.outbox.synchronous == "full" else "NORMAL"

    def open_outbox() -> Outbox:
        return Outbox(outbox_path, budgets=budgets, total_max_bytes=total, synchronous=sync)

    try:
        outbox_cm = AsyncOutbox(open_outbox)
        outbox = await outbox_cm.__aenter__()
    except ConfigError as exc:
        log.error("%s", exc)
        return EXIT_CONFIG
    except EdgetwinError as exc:
        # Retried for a while already (AsyncOutbox); a clear message, not a trace.
        log.error("%s", exc)
        return EXIT_FAILURE
    try:
        return await _supervise(
            config, registry, notifier, anonymizer, outbox, out, pretty, stop_after_s, install_signal_handlers
        )
    finally:
        timebase.close()
        await outbox_cm.__aexit__(None, None, None)
        log.info("outbox closed")


async def _supervise(
    config: Config,
    registry: Mapping[str, DriverSpec],
    notifier: Notifier,
    anonymizer: Anonymizer,
    outbox: AsyncOutbox,
    out: IO[str] | None,
    pretty: bool,
    stop_after_s: float | None,
    install_signal_handlers: bool,
) -> int:
    core = config.core
    try:
        # Loading model files and importing drivers take a while: in threads, so no callback of
        # the loop (the watchdog's included) waits on them.
        models = await asyncio.to_thread(
            build_models,
            core.models,
            hop_s=core.pipeline.hop_s,
            state_dir=core.gateway.state_dir,
            # The pipeline checks every sample against the plausibility rules and raises the
            # sensor-fault alarms; the models only leave implausible windows unscored.
            fault_alarms=False,
        )
    except ConfigError as exc:
        log.error("%s", exc)
        return EXIT_CONFIG
    # Each model in a slot: the version promoted over the downlink serves, a new one runs in shadow.
    slots: list[Slot] = []
    if models:  # the shadow slots (and the model runner under them) load only with models
        from gateway.inference.shadow import open_slots  # noqa: PLC0415

        slots = await asyncio.to_thread(open_slots, models, core.gateway.state_dir)
    log_coverage(config)
    # A metric name holding an identity: every record carrying it would be dropped, one by one.
    held = config_held_names(config)
    for found in held:
        log.error("config %s: %s: %s", config.file, found.reason(), found.fix())
    # Per-machine novelty detection ([models.novelty]) and the per-stream detector for subjects
    # no model scores ([models.streams]), beside the carded models.
    hop, state = core.pipeline.hop_s, core.gateway.state_dir
    novelty = build_novelty(core.models.novelty, hop_s=hop, state_dir=state)
    scored: list[WindowModel] = [*slots, *novelty]
    scored += build_stream_change(core.models.streams, hop_s=hop, state_dir=state, others=scored)
    try:
        fusions = config_fusions(config, scored)
        # Off the loop: building the estimators (their models among them) took ~45 ms of CPU.
        pipeline = await asyncio.to_thread(Pipeline, config, anonymizer, outbox, scored, fusions)
    except (ConfigError, CorruptDataError) as exc:  # an estimator's model or inputs ([estimators])
        log.error("%s", exc)
        return EXIT_CONFIG
    sup = Supervisor(notifier, start_timeout_s=core.runtime.start_timeout_s)
    uplink: Any
    opened: IO[str] | None = None
    if core.uplink.kind == "local":
        if core.uplink.path is not None and out is None:
            try:
                opened = core.uplink.path.open("a", encoding="utf-8")
            except OSError as exc:
                log.error(
                    "local uplink %s: cannot open for writing: %s: fix uplink.path",
                    core.uplink.path,
                    exc.strerror,
                )
                return EXIT_CONFIG
        uplink = LocalUplink(outbox, opened or out or sys.stdout, pretty=pretty)
    elif core.uplink.kind == "mqtt" and core.uplink.mqtt is not None:
        # Imported only when used: paho-mqtt is the optional "mqtt" extra.
        from gateway.uplink.mqtt import MqttUplink  # noqa: PLC0415

        mq = core.uplink.mqtt
        password = mq.password_file.read_text(encoding="utf-8").strip() if mq.password_file else None
        gateway_id = anonymizer.gateway_pseudonym(core.gateway.name)
        if core.uplink.encoding == "sparkplug":
            from gateway.uplink.sparkplug.node import SparkplugNode  # noqa: PLC0415

            uplink = SparkplugNode(
                outbox,
                mq,
                core.uplink.sparkplug,
                gateway_id,
                anonymizer=anonymizer,
                state_dir=core.gateway.state_dir,
                password=password,
            )
            uplink.carry(pipeline.alarms_on_records())  # conditions on that no record will raise again
        else:
            uplink = MqttUplink(
                outbox,
                mq,
                gateway_id,
                password=password,
                run=anonymizer.timebase.run,
                record_time=anonymizer.record_time,
            )
            if core.downlink.trust_file is not None:
                from gateway.downlink.unit import Downlink  # noqa: PLC0415

                uplink.downlink = Downlink(
                    config, registry, sup, uplink, uplink.client_id, slots, anonymizer=anonymizer
                )
                sup.add(Unit("downlink", Group.UPLINK, uplink.downlink.run))
    else:
        uplink = _NoUplink()

    async def hold_outbox(started: Callable[[], None]) -> None:
        started()
        await asyncio.Event().wait()

    sup.add(Unit("outbox", Group.OUTBOX, hold_outbox, critical=True, heartbeat=lambda: outbox.last_beat))
    sup.add(
        Unit(
            "uplink",
            Group.UPLINK,
            uplink.run,
            heartbeat=lambda: uplink.last_beat,
            stale_after_s=30.0,
            pulse=getattr(uplink, "pulse", None),  # an uplink that declares its bounded waits
        )
    )
    sup.add(
        Unit("pipeline", Group.PIPELINE, pipeline.run, critical=True, heartbeat=lambda: pipeline.last_beat)
    )
    for entry in config.sources:
        if not entry.enabled:
            log.info("source %s is disabled in the config", entry.info.name)
            continue
        sup.add(await source_unit(entry, registry, anonymizer, pipeline.sink))

    def summary() -> str:
        report = outbox.report()  # the figures the status topic and the diagnostics carry
        describe = getattr(uplink, "describe", None)  # the MQTT uplink: connected or degraded (why)
        return (
            f"outbox pending {outbox.pending}, delivered {getattr(uplink, 'delivered', 0)}, "
            f"{report.headline()}"
            + (f", uplink {describe()}" if describe is not None else "")
            + (f", OUTBOX DEGRADED: {report.degraded}" if report.degraded else "")
        )

    sup.summary = summary
    board = StatusBoard(
        supervisor=sup,
        pipeline=pipeline,
        outbox=outbox,
        uplink=uplink,
        uplink_kind=core.uplink.kind,
        models=[*slots, *novelty],  # the novelty detector's subjects say what judges them
        sources=[(e.info.name, e.driver) for e in config.sources],
        pseudonym=anonymizer.subject_pseudonym,
        budget_bytes=int(core.outbox.max_mb * 1024 * 1024),
        held_names=[found.reason() for found in held],
    )

    def status_units(status: StatusSection) -> list[Unit]:
        control = ControlServer(
            socket_path(status, core.gateway.state_dir), board, group=status.group, refresh_s=status.refresh_s
        )
        units = [Unit("status", Group.OUTBOX, control.run)]
        if status.http is not None:
            # Imported only when used: aiohttp and prometheus_client are the optional "web" extra.
            from gateway.observe.web import StatusWeb  # noqa: PLC0415

            units.append(Unit("web", Group.OUTBOX, StatusWeb(status, board).run))
        return units

    if getattr(uplink, "downlink", None) is not None:
        from gateway.downlink.sources import SourceSwitch  # noqa: PLC0415 - with the downlink only

        # A config revision restarts only the units it changes (gateway.downlink.diff).
        uplink.downlink.sources = SourceSwitch(
            registry,
            sup,
            anonymizer,
            pipeline.sink,
            lambda new: board.set_sources(
                [(e.info.name, e.driver) for e in new.sources],
                [found.reason() for found in config_held_names(new)],
            ),
            pipeline.set_alarms,
            status_units,
            pipeline.retire_source,
        )
    for unit in status_units(core.status):
        sup.add(unit)
    # STATUS= says what matters most, from the same snapshot ``edgetwin status`` shows.
    sup.describe = lambda: str(board.compose()["headline"])
    loop = asyncio.get_running_loop()
    if install_signal_handlers:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, sup.request_stop)
    stop_timer = (
        asyncio.create_task(
            _stop_after_ready(sup, stop_after_s, core.runtime.start_timeout_s), name="runtime:stop-after"
        )
        if stop_after_s is not None
        else None
    )

    trimmer = asyncio.create_task(
        trim_after_ready(
            functools.partial(sup.wait_ready, core.runtime.start_timeout_s), core.runtime.memory_trim_s
        ),
        name="runtime:memory-trim",
    )

    async def drain(deadline: float) -> None:
        await pipeline.step()
        await pipeline.save_estimators()
        await outbox.flush()
        await uplink.drain(deadline)
        await all_written()  # the state files' writes still under way (the legend's)

    # Everything built so far (modules, models, drivers) lives as long as the process: frozen out of
    # the collector's sight, a full collection scans only what the run allocates.  Unfrozen, one
    # full pass held the event loop 60-90 ms of CPU (measured in tests/test_loop_latency.py).
    gc.freeze()
    try:
        return await sup.run(drain, core.runtime.drain_deadline_s)
    finally:
        if opened is not None:
            opened.close()
        if stop_timer is not None:
            stop_timer.cancel()
        trimmer.cancel()
        if install_signal_handlers:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)


async def _stop_after_ready(sup: Supervisor, seconds: float, start_timeout_s: float) -> None:
    """Request the stop ``seconds`` after READY: a run's duration is time running, not start-up.

    Counted from the start instead, a slow start-up (a loaded machine, a slow disk) ate the run,
    and a stop could come before the sources were up. READY comes within the start timeout.
    """
    await sup.wait_ready(start_timeout_s)
    await asyncio.sleep(seconds)
    sup.request_stop()


def config_fusions(config: Config, models: Sequence[Any]) -> list[FusionModel]:
    """The fused verdicts ``[[models.fusion]]`` asks for over ``models``, checked against the sources' streams."""
    core = config.core
    return build_fusions(
        core.models.fusion,
        models,
        core.models.dir,
        hop_s=core.pipeline.hop_s,
        window_s=core.pipeline.window_s,
        streams=novelty_streams(config.sources, core.models),
    )


def build_problems(config: Config, registry: Mapping[str, DriverSpec]) -> list[str]:
    """Build every enabled driver and model without starting them; the errors they raise."""
    problems: list[str] = []
    for i, entry in enumerate(config.sources):
        if not entry.enabled:
            continue
        try:
            registry[entry.driver].factory(entry.info, entry.config)
        except ConfigError as exc:
            problems.append(f"sources[{i}] ({entry.info.name}): {exc}")
    core = config.core
    try:
        hop = core.pipeline.hop_s
        built: list[Any] = [
            *build_models(core.models, hop_s=hop),
            *build_novelty(core.models.novelty, hop_s=hop, state_dir=None),
        ]
        config_fusions(config, built)
    except ConfigError as exc:
        problems.append(f"models: {exc}")
    try:
        Estimation(core.estimators, {}, lambda _: None, lambda _: None, models_dir=core.models.dir)
    except (ConfigError, CorruptDataError) as exc:
        problems.append(f"estimators: {exc}")
    if core.uplink.kind == "local" and core.uplink.path is not None and not core.uplink.path.parent.is_dir():
        problems.append(f"uplink.path: directory {core.uplink.path.parent} does not exist")
    return problems


def check_sources(config: Config) -> Sequence[str]:
    """Short descriptions of the configured sources, for ``edgetwin check``."""
    return [
        f"{e.info.name} ({e.driver}, {e.info.kind}{'' if e.enabled else ', disabled'})"
        for e in config.sources
    ]
