"""The synthetic source's I/O: paces the pure generators in real time and hands blocks to the sink."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping

from drivers.sim.config import SimConfig
from drivers.sim.protocol import STREAM_KIND, Chunk, Generator, make_generator
from gateway.contracts import Diagnostic, SampleSink, SourceInfo
from gateway.errors import ConfigError
from gateway.liveness import Pulse
from gateway.sample import SampleBlock, Stream

_LOGGER = logging.getLogger(__name__)

TICK_S = 0.1  # hand-off period: one block per stream per tick keeps per-sample loop cost nil
MAX_SPAN_S = 5.0  # after the loop was held up, catch up in slices of this much simulated time
STALE_AFTER_S = 5.0  # a tick is due every 0.1 s: 5 s without one is a stuck source


def _block_loop(seconds: float) -> None:
    # Deliberately synchronous: the point is to freeze the event loop, as a runaway computation would.
    time.sleep(seconds)


class SimDriver:
    """Synthetic patient or pump streams in real time, with labelled injected events."""

    def __init__(self, info: SourceInfo, cfg: SimConfig) -> None:
        self._info = info
        self._cfg = cfg
        self.pulse = Pulse(stale_after_s=STALE_AFTER_S)
        self._hung = False  # the hang injection happens once per process, not once per restart
        self._streams = {
            sig.metric.name: Stream(
                source=info.name,
                subject=info.subject,
                device=cfg.device,
                metric=sig.metric,
                kind=STREAM_KIND[cfg.profile],
                rate_hz=sig.rate_hz,
            )
            for sig in self._generator().signals
        }

    @property
    def streams(self) -> Mapping[str, Stream]:
        """The streams this source produces, by metric name."""
        return self._streams

    def _generator(self) -> Generator:
        cfg = self._cfg
        return make_generator(
            cfg.profile,
            seed=cfg.seed,
            rate_hz=cfg.rate_hz,
            events=[ev.label() for ev in cfg.events],
            random_events_per_hour=cfg.random_events_per_hour,
        )

    def _emit(self, sink: SampleSink, chunk: Chunk, start_mono: float, start_wall: float) -> None:
        for lb in chunk.labels:
            sink.diagnostic(
                Diagnostic(
                    kind="sim_label",
                    subject=self._info.subject,
                    t_wall=start_wall + lb.start_s,
                    detail={"event": lb.kind, "start_s": lb.start_s, "end_s": lb.end_s},
                )
            )
        for name, series in chunk.series.items():
            if len(series):
                sink.put_block(
                    SampleBlock(
                        self._streams[name],
                        start_mono + series.t,
                        start_wall + series.t,
                        series.value,
                        series.quality,
                    )
                )

    async def run(self, sink: SampleSink, *, started: Callable[[], None]) -> None:
        """Generate in real time from simulated second 0 until cancelled; each run starts afresh."""
        gen = self._generator()
        stall = self._cfg.stall_loop
        stalled = False
        start_mono = time.monotonic()
        start_wall = time.time()
        done_s = 0.0
        first = True
        _LOGGER.info(
            "sim %s: streaming %s profile, %d streams at %g Hz",
            self._info.name,
            self._cfg.profile,
            len(self._streams),
            self._cfg.rate_hz,
        )
        while True:
            # Sleep to the next tick of a fixed grid, so ticks do not drift and a late tick is not repeated.
            elapsed = time.monotonic() - start_mono
            await asyncio.sleep((math.floor(elapsed / TICK_S) + 1) * TICK_S - elapsed)
            now_s = time.monotonic() - start_mono
            while done_s < now_s:
                upto = min(now_s, done_s + MAX_SPAN_S)
                self._emit(sink, gen.generate(done_s, upto), start_mono, start_wall)
                done_s = upto
            self.pulse.beat()
            if first:
                first = False
                started()
            hang = self._cfg.hang
            if hang is not None and not self._hung and now_s >= hang.at_s:
                self._hung = True
                _LOGGER.warning(
                    "sim %s: hanging for %.1f s on purpose (hang fault injection): no data, no sign of life",
                    self._info.name,
                    hang.duration_s,
                )
                await asyncio.sleep(hang.duration_s)
            if stall is not None and not stalled and now_s >= stall.at_s:
                stalled = True
                _LOGGER.warning(
                    "sim %s: blocking the event loop for %.1f s on purpose (stall_loop fault injection)",
                    self._info.name,
                    stall.duration_s,
                )
                _block_loop(stall.duration_s)


def factory(info: SourceInfo, cfg: SimConfig) -> SimDriver:
    """Build a sim driver; a profile that contradicts the source's kind is a config error."""
    expected = STREAM_KIND[cfg.profile]
    if info.kind != expected:
        raise ConfigError(
            f"sim source {info.name}: kind {info.kind!r} does not match profile {cfg.profile!r}: "
            f"the {cfg.profile} profile produces {expected} streams: "
            f'set kind = "{expected}" or choose the other profile'
        )
    return SimDriver(info, cfg)
