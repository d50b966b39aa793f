"""The estimation stage: samples in, estimate records (and battery alarms) out, state kept on disk.

Each configured estimator claims the streams it needs (``route``); a sample of any other subject
costs one set lookup.  Estimators run on samples as they arrive; :meth:`Estimation.tick` (from
the pipeline's step) lets them bridge or end an estimate when every source is silent and writes
their state to ``<state_dir>/estimators.json`` every ``SAVE_EVERY_S`` and at the stop (whole and
synced, by the file's :func:`gateway.privatefile.writer_of` in a worker thread, never on the event
loop; the file is local state and names subjects as the config does, versioned by ``"v"``), so a restart
resumes from the last estimate instead of from nothing, and a fused rate keeps the noise it has
learnt of each source.  An unreadable file, or one of another version, is ignored with a log
line (and replaced at the next save): the estimators start afresh and relearn.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from gateway.contracts import Alarm, Estimate
from gateway.errors import ConfigError
from gateway.estimation.config import EstimatorsSection
from gateway.estimation.limits import LowLimits
from gateway.privatefile import WriteFailures, writer_of
from gateway.sample import Quality, Sample, SampleBlock, Stream

if TYPE_CHECKING:
    from gateway.estimation.rul import RulModel

__all__ = ["SAVE_EVERY_S", "Estimation", "Estimator"]

log = logging.getLogger(__name__)

SAVE_EVERY_S = 10.0
STATE_FILE = "estimators.json"
STATE_VERSION = 1  # of the file's layout: {"v", "t_wall", "estimators": {key: state}}
_IMPUTED = int(Quality.IMPUTED)  # filled in by the device: no measurement to an estimator


class Estimator(Protocol):
    """What the stage asks of an estimator."""

    @property
    def key(self) -> str:
        """Where its state is kept across restarts."""

    def route(self, stream: Stream) -> str | None:
        """The role or source label ``stream`` has here, or None."""

    def update(
        self, role: str, stream: Stream, t_mono: float, t_wall: float, value: float, quality: int
    ) -> None:
        """Fold one sample in."""

    def save(self, now_mono: float, now_wall: float) -> dict[str, Any] | None:
        """The state to keep, or None."""

    def restore(self, state: dict[str, Any], now_mono: float, now_wall: float) -> None:
        """Resume from a saved state."""


class Estimation:
    """Every configured estimator of this gateway; see the module docstring."""

    def __init__(
        self,
        section: EstimatorsSection,
        kinds: Mapping[str, str],
        emit: Callable[[Estimate], None],
        alarm: Callable[[Alarm], None],
        state_dir: Path | None = None,
        *,
        now_mono: float = 0.0,
        now_wall: float = 0.0,
        models_dir: Path | None = None,
    ) -> None:
        # Each estimator's module is imported when the config has one of its kind: a gateway
        # without [estimators] does not load them (nor the models they pull in).
        self.estimators: list[Any] = []
        if section.fusion:
            from gateway.estimation.fusion import FusedRate  # noqa: PLC0415 - only with fusion

            self.estimators += [
                FusedRate(spec, kinds.get(spec.subject, "medical"), emit) for spec in section.fusion
            ]
        if section.battery:
            from gateway.estimation.battery import BatteryState  # noqa: PLC0415 - only with battery

            self.estimators += [
                BatteryState(spec, kinds.get(spec.subject, "industrial"), emit, alarm)
                for spec in section.battery
            ]
        if section.rul:
            from gateway.estimation.rul import RulEstimator, load_rul_model  # noqa: PLC0415 - only with RUL
            from gateway.inference.build import default_models_dir  # noqa: PLC0415 - only with RUL

            directory = models_dir or default_models_dir()
            loaded: dict[tuple[str, str], RulModel] = {}  # one per model and backend
            for i, spec in enumerate(section.rul):
                key = (spec.model, spec.backend)
                if key not in loaded:
                    try:
                        loaded[key] = load_rul_model(directory, spec.model, spec.backend)
                    except ConfigError as exc:
                        raise ConfigError(f"config estimators.rul[{i}]: {exc}") from exc
                kind = kinds.get(spec.subject, "industrial")
                self.estimators.append(RulEstimator(spec, i, kind, emit, loaded[key], alarm))
        self._subjects = frozenset(e.spec.subject for e in self.estimators)
        if kinds:
            tables: tuple[tuple[str, list[str]], ...] = (
                ("fusion", [f.subject for f in section.fusion]),
                ("battery", [b.subject for b in section.battery]),
                ("rul", [r.subject for r in section.rul]),
            )
            for table, subjects in tables:
                for i, subject in enumerate(subjects):
                    if subject not in kinds:
                        # Not fatal (a source may come later), but nothing feeds it as it stands.
                        # The subject itself is not logged: it may name a patient.
                        log.warning(
                            "estimation: estimators.%s[%d]: its subject has no [[sources]] entry: it "
                            "will never estimate: check the subject's spelling",
                            table,
                            i,
                        )
        self._routes: dict[str, list[tuple[Any, str]]] = {}  # by Stream.key: a cached str hash
        self._path = state_dir / STATE_FILE if state_dir is not None and self.estimators else None
        self._writer = writer_of(self._path) if self._path is not None else None
        self._save_failures = WriteFailures(
            log,
            "estimation",
            self._path,
            "the estimators' state is not saved: a restart starts them afresh; make the state directory writable",
        )
        self._next_save = now_mono + SAVE_EVERY_S
        self.failures = 0  # samples an estimator raised on (a bug: logged, never propagated)
        if self._path is not None:
            self._load(now_mono, now_wall)

    def __bool__(self) -> bool:
        return bool(self.estimators)

    def _route(self, stream: Stream) -> list[tuple[Any, str]]:
        routes = self._routes.get(stream.key)
        if routes is None:
            routes = [(e, role) for e in self.estimators if (role := e.route(stream)) is not None]
            self._routes[stream.key] = routes
        return routes

    def put(self, sample: Sample) -> None:
        """One sample to every estimator that uses its stream (an imputed value as no value)."""
        if sample.stream.subject not in self._subjects:
            return
        quality = int(sample.quality)
        # A value the device filled in was not measured: no estimator may take it for one.
        value = math.nan if quality & _IMPUTED else sample.value
        try:
            for est, role in self._route(sample.stream):
                est.update(role, sample.stream, sample.t_mono, sample.t_wall, value, quality)
        except Exception as exc:  # noqa: BLE001 - an estimator's fault must never reach the driver's sink
            self._failed(exc)

    def put_block(self, block: SampleBlock) -> None:
        """A block of one stream, sample by sample (estimators are sequential filters)."""
        if block.stream.subject not in self._subjects:
            return
        routes = self._route(block.stream)
        if not routes:
            return
        t_mono, t_wall = block.t_mono.tolist(), block.t_wall.tolist()
        imputed = (block.quality & _IMPUTED) != 0
        values = (np.where(imputed, np.nan, block.value) if imputed.any() else block.value).tolist()
        quality = block.quality.tolist()
        try:
            for i in range(len(t_mono)):
                for est, role in routes:
                    est.update(role, block.stream, t_mono[i], t_wall[i], values[i], quality[i])
        except Exception as exc:  # noqa: BLE001 - as in put
            self._failed(exc)

    def _failed(self, exc: Exception) -> None:
        self.failures += 1
        if self.failures == 1 or self.failures % 1000 == 0:
            log.error(
                "estimation: an estimator failed on a sample (%d so far): the sample is skipped; "
                "the windows and alarms are not affected",
                self.failures,
                exc_info=exc,
            )

    def tick(self, now_mono: float, now_wall: float) -> None:
        """Bridge or end estimates whose sources fell silent; save the state when due."""
        for est in self.estimators:
            tick = getattr(est, "tick", None)
            if tick is not None:
                tick(now_mono)
        if self._path is not None and now_mono >= self._next_save:
            self._next_save = now_mono + SAVE_EVERY_S
            self.save(now_mono, now_wall)

    def resume_limit(self, subject: str, estimate: str) -> None:
        """A low limit on ``subject``'s ``estimate`` a previous run left on: its estimators judge it again."""
        for limits in self._limits_of(subject):
            limits.resume(estimate)

    def forget_limit(self, subject: str, estimate: str) -> None:
        """A low limit on ``subject``'s ``estimate`` ended for it (a source retired): raised again if it holds."""
        for limits in self._limits_of(subject):
            limits.raised.discard(estimate)

    def _limits_of(self, subject: str) -> Iterator[LowLimits]:
        for est in self.estimators:
            limits = getattr(est, "limits", None)  # the estimators that raise limits (battery, RUL)
            if est.spec.subject == subject and isinstance(limits, LowLimits):
                yield limits

    def save(self, now_mono: float, now_wall: float) -> Future[None] | None:
        """Have every estimator's state written by its file's worker thread (whole, synced); that write, or None without a file."""
        if self._writer is None:
            return None
        states = {e.key: s for e in self.estimators if (s := e.save(now_mono, now_wall)) is not None}
        # Synced before it replaces the last state: a power cut leaves one of the two, never a torn
        # file that would make every estimator relearn.  0600: its keys name subjects.  Off the
        # loop: the two fsyncs took 3.5 ms (median) to 12 ms every SAVE_EVERY_S.
        body = {"v": STATE_VERSION, "t_wall": now_wall, "estimators": states}
        return self._writer.submit(json.dumps(body).encode(), self._save_failures)

    def _load(self, now_mono: float, now_wall: float) -> None:
        assert self._path is not None
        try:
            saved = json.loads(self._path.read_text(encoding="utf-8"))
            version = saved["v"]
            states = saved["estimators"]
            states.items()  # a table, or AttributeError
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning(
                "estimation %s: saved state unreadable: %s: the estimators start afresh "
                "(fused rates relearn their sources' noise)",
                self._path,
                exc,
            )
            return
        if version != STATE_VERSION:
            log.warning(
                "estimation %s: saved state of version %r, this gateway reads %d: the estimators "
                "start afresh (fused rates relearn their sources' noise)",
                self._path,
                version,
                STATE_VERSION,
            )
            return
        resumed = 0
        for est in self.estimators:
            state = states.get(est.key)
            if isinstance(state, dict):
                est.restore(state, now_mono, now_wall)
                resumed += 1
        if resumed:
            log.info("estimation: %d estimator(s) resume from the saved state", resumed)
