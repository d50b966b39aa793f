"""The microcontroller node source: handshake, time sync and sample streaming over a serial link."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable

from drivers.mcu.config import McuConfig
from drivers.mcu.handover import MAX_HOLD_S, HandoverServer
from drivers.mcu.link import Link, NodeRefusedError
from drivers.mcu.protocol import NodeRestartedError, SampleAssembler, metric_for
from drivers.mcu.simnode import run_sim_node
from firmware_bridge.framing import Frame
from firmware_bridge.messages import (
    BootState,
    Cap,
    Channel,
    ErrorCode,
    ErrorReport,
    Health,
    Hello,
    MessageError,
    MsgType,
    Samples,
    TimeSyncReply,
    channel_req_body,
    format_version,
    time_sync_body,
)
from firmware_bridge.timesync import ClockSync
from gateway.contracts import Alarm, AlarmKind, Diagnostic, SampleSink, SourceInfo
from gateway.errors import ConfigError, TransientError
from gateway.liveness import Pulse
from gateway.logs import register_identity
from gateway.sample import Stream

_LOGGER = logging.getLogger(__name__)

_INITIAL_SYNCS = 5
_LOSS_REPORT_S = 1.0  # gaps are summed and reported at most this often
_TICK_S = 0.05
#: Liveness: the stream loop, which enforces silence_s, beats every _TICK_S and every request
#: declares its bound, so 5 s with neither is a driver stuck outside a known wait.
PULSE_STALE_S = 5.0
#: Building the simulated node's C program (once per checkout; a cold compile on a busy board)
#: and starting it.
_SIM_START_S = 120.0
#: ``cause`` of the node's own fault: its self-test failed (HELLO health, or an ERROR it sends).
SELFTEST_FAILED = "selftest_failed"


class McuDriver:
    """Sample batches from a microcontroller node, with time sync and loss accounting."""

    def __init__(self, info: SourceInfo, cfg: McuConfig) -> None:
        self._info = info
        self._cfg = cfg
        self._who = f"mcu {info.name}"
        self._sink: SampleSink | None = None
        self._started: Callable[[], None] | None = None
        self._asm: SampleAssembler | None = None
        self._clock: ClockSync | None = None
        self._link: Link | None = None
        self._hello: Hello | None = None
        self._rebooted = False
        self._seq_restarts = 0  # the link's count when the current session began
        self._restart_why = ""
        self._lent: tuple[float, float] | None = None  # (lent at, seconds held) of the last push
        self._wall_offset = time.time() - time.monotonic()
        self._pending_gaps: dict[str, list[int]] = {}
        self.counters: dict[str, float] = {}
        self._final: dict[str, float] = {}
        self.streams: dict[str, Stream] = {}
        # The node's self-test: True failed (raised), False passed; None until a HELLO says.
        self._selftest_failed: bool | None = None
        self.pulse = Pulse(stale_after_s=PULSE_STALE_S)

    @property
    def assembler(self) -> SampleAssembler | None:
        """The current session's sample assembler (kept after the run ends, for inspection)."""
        return self._asm

    @property
    def selftest_failed(self) -> bool | None:
        """The node's self-test as last reported: True failed, False passed, None not yet known."""
        return self._selftest_failed

    @property
    def hello(self) -> Hello | None:
        """The node's latest hello (None before the first handshake)."""
        return self._hello

    async def run(self, sink: SampleSink, *, started: Callable[[], None]) -> None:
        """Connect, stream sample blocks into ``sink`` until cancelled; re-handshake after a node reboot."""
        self._sink = sink
        self._started = started
        cfg = self._cfg
        async with contextlib.AsyncExitStack() as stack:
            if cfg.simulate is not None:
                with self.pulse.waiting("starting the simulated node", _SIM_START_S):
                    path = (await stack.enter_async_context(run_sim_node(cfg.simulate, self._who))).path
            else:
                assert cfg.port is not None
                path = cfg.port
            handover: HandoverServer | None = None
            while True:
                link = Link(
                    path,
                    baud=cfg.baud,
                    timeout_s=cfg.request_timeout_s,
                    retries=cfg.retries,
                    on_frame=self._on_frame,
                    who=self._who,
                )
                async with link:
                    if handover is None:  # once the port is known to be there and ours
                        handover = await stack.enter_async_context(HandoverServer(path, self._who))
                    self._link = link
                    try:
                        while not await self._stream(link, sink, handover):
                            pass
                    finally:
                        self._link = None
                        self._final = self.snapshot_of(link)
                # The port is closed now: lend it to the firmware push, then open it again.
                await self._lend(handover)

    # -- handshake ---------------------------------------------------------------------------

    async def _handshake(self, link: Link, sink: SampleSink) -> None:
        self._asm = None
        self._rebooted = False
        try:
            hello = Hello.decode(await self._request(link, MsgType.HELLO_REQ))
            if not hello.caps & Cap.SAMPLES:
                raise ConfigError(
                    f"{self._who} node {hello.node_id}: does not stream samples (capabilities {hello.caps!r}): "
                    "use this node for firmware updates only, or flash a sampling firmware"
                )
            channels = [
                Channel.decode(await self._request(link, MsgType.CHANNEL_REQ, channel_req_body(i)))
                for i in range(hello.n_channels)
            ]
        except (MessageError, NodeRefusedError) as exc:
            raise TransientError(
                f"{self._who} port {link.path}: handshake failed: {exc}: check the node's firmware version"
            ) from exc
        clock = ClockSync(hello.tick_hz)
        for _ in range(_INITIAL_SYNCS):
            await self._sync(link, clock)
        if not clock.ready:
            raise TransientError(
                f"{self._who} node {hello.node_id}: no answer to time sync: check the node's firmware"
            )
        streams: dict[int, tuple[Channel, Stream]] = {}
        previous, self.streams = self.streams, {}
        for ch in channels:
            stream = Stream(
                source=self._info.name,
                subject=self._info.subject,
                device=hello.node_id,
                metric=metric_for(ch, self._cfg.metrics),
                kind=self._info.kind,
                rate_hz=ch.rate_hz,
            )
            # One object per stream across handshakes: the pipeline's caches are keyed by object,
            # so a node in a reset loop must not hand it a new one each time.
            if previous.get(ch.name) == stream:
                stream = previous[ch.name]
            streams[ch.channel] = (ch, stream)
            self.streams[ch.name] = stream
        self._seq_restarts = link.seq_restarts
        self._clock = clock
        self._hello = hello
        self._pending_gaps.clear()
        self._asm = SampleAssembler(streams, clock)
        # Declared before it is logged: logs name the node by its source unless identities are on.
        register_identity(hello.node_id, f"{self._info.name}.node")
        _LOGGER.info(
            "%s: node %s connected on %s: firmware %s (%s, health %s), %d channels: %s",
            self._who,
            hello.node_id,
            link.path,
            format_version(hello.fw_version),
            hello.boot_state.name.lower(),
            hello.health.name.lower(),
            len(channels),
            ", ".join(f"{c.name} [{c.unit}] {c.rate_hz:g} Hz" for c in channels),
        )
        now = time.time()
        sink.diagnostic(
            Diagnostic(
                "mcu_node",
                self._info.subject,
                now,
                {
                    "fw_major": float(hello.fw_version >> 24),
                    "fw_minor": float((hello.fw_version >> 16) & 0xFF),
                    "fw_patch": float(hello.fw_version & 0xFFFF),
                    "boot_state": hello.boot_state.name.lower(),
                    "health": hello.health.name.lower(),
                    "channels": float(len(channels)),
                    "node_verifies_signatures": float(bool(hello.caps & Cap.ED25519)),
                },
            )
        )
        if hello.boot_state == BootState.TRIAL:
            _LOGGER.warning(
                "%s: node %s runs an uncommitted trial image %s: it rolls back unless an update commits it",
                self._who,
                hello.node_id,
                format_version(hello.fw_version),
            )
        if hello.health != Health.UNKNOWN:  # a node that runs no self-test says nothing of one
            self._selftest(sink, failed=hello.health == Health.FAILED)

    async def _request(
        self, link: Link, type_: MsgType, body: bytes = b"", retries: int | None = None
    ) -> bytes:
        """A request to the node, declared to the pulse as a wait with the link's bound."""
        with self.pulse.waiting(f"the node's answer to {type_.name}", link.request_bound_s(retries=retries)):
            return await link.request(type_, body, retries=retries)

    async def _sync(self, link: Link, clock: ClockSync) -> bool:
        t0 = time.monotonic()
        stamp = int(t0 * 1e6)
        try:
            # One try: a retransmitted sync would measure a long round trip and be discarded anyway.
            body = await self._request(link, MsgType.TIME_SYNC, time_sync_body(stamp), retries=0)
            reply = TimeSyncReply.decode(body)
        except (TransientError, NodeRefusedError, MessageError):
            link.check()  # a dead link is fatal; a lost answer is not
            self._count("sync_failures")
            return False
        t1 = time.monotonic()
        if reply.gateway_us != stamp:
            self._count("sync_failures")
            return False
        clock.add(t0, t1, reply.node_tick)
        self._wall_offset = time.time() - time.monotonic()
        return True

    # -- streaming ---------------------------------------------------------------------------

    async def _lend(self, handover: HandoverServer) -> None:
        """Hand the closed port to a firmware push until it hangs up (bounded)."""
        _LOGGER.info("%s: port lent to a firmware push; streaming stopped", self._who)
        t0 = time.monotonic()
        # Streaming stops while a push holds the port: a known wait, bounded by MAX_HOLD_S.
        with self.pulse.waiting("port lent to a firmware push", MAX_HOLD_S + 5.0):
            pid, held = await handover.hand_over()
        self._lent = (t0, held)
        _LOGGER.info("%s: port back from PID %d after %.1f s; connecting again", self._who, pid, held)
        self._count("handovers")

    async def _stream(self, link: Link, sink: SampleSink, handover: HandoverServer) -> bool:
        """Handshake and stream until the node reboots (False) or the port is to be lent (True)."""
        await self._handshake(link, sink)
        if self._lent is not None:
            (lent_at, held), self._lent = self._lent, None
            gap = time.monotonic() - lent_at
            _LOGGER.info("%s: connected again %.1f s after the port was lent", self._who, gap)
            detail: dict[str, float | str] = {"held_s": round(held, 3), "gap_s": round(gap, 3)}
            sink.diagnostic(Diagnostic("mcu_handover", self._info.subject, time.time(), detail))
        cfg = self._cfg
        clock = self._clock
        assert clock is not None
        now = time.monotonic()
        next_sync = now + cfg.time_sync_s
        next_report = now + cfg.report_s
        next_loss = now + _LOSS_REPORT_S
        while True:
            # This loop enforces silence_s below: while it turns the driver is alive, and a node
            # that goes silent is told by that bound (a reconnect), not by the supervisor.
            self.pulse.beat()
            await asyncio.sleep(_TICK_S)
            link.check()
            if handover.requested.is_set():
                return True
            if self._rebooted:
                _LOGGER.info("%s: node rebooted (%s), connecting again", self._who, self._restart_why)
                return False
            now = time.monotonic()
            if now - link.last_rx > cfg.silence_s:
                raise TransientError(
                    f"{self._who} port {link.path}: node silent for {cfg.silence_s:g} s: "
                    "check power and cable; reconnecting"
                )
            if now >= next_sync:
                await self._sync(link, clock)
                next_sync = now + cfg.time_sync_s
            if now >= next_loss:
                self._report_gaps(sink)
                next_loss = now + _LOSS_REPORT_S
            if now >= next_report:
                sink.diagnostic(Diagnostic("mcu_link", self._info.subject, time.time(), self.snapshot()))
                next_report = now + cfg.report_s

    def _on_frame(self, frame: Frame) -> None:
        sink = self._sink
        if sink is None:
            return
        if frame.type == MsgType.SAMPLES:
            asm = self._asm
            if asm is None:
                self._count("samples_before_sync")
                return
            try:
                batch = Samples.decode(frame.payload)
            except MessageError:
                self._count("malformed")
                return
            # Its boot HELLO may be lost (or never sent): the data says it rebooted all the same.
            link = self._link
            if link is not None and link.seq_restarts != self._seq_restarts:
                self._restarted("its frame numbers started again")
                return
            try:
                block, gap = asm.add(batch, self._wall_offset)
            except NodeRestartedError as exc:
                self._restarted(str(exc))
                return
            if gap is not None:
                entry = self._pending_gaps.setdefault(gap.channel, [0, 0])
                entry[0] += gap.missing
                entry[1] += 1
                self.counters["lost_samples"] = self.counters.get("lost_samples", 0.0) + gap.missing
            if block is not None:
                self.counters["delivered_samples"] = self.counters.get("delivered_samples", 0.0) + len(block)
                sink.put_block(block)
                if self._started is not None:
                    started, self._started = self._started, None
                    started()
        elif frame.type == MsgType.HELLO:
            # During the handshake a boot hello only says what the handshake is finding out anyway.
            if self._asm is not None:
                self._restarted("boot hello")
        elif frame.type == MsgType.ERROR:
            self._on_error(sink, frame)
        else:
            self._count("unexpected_frames")

    def _restarted(self, why: str) -> None:
        """Stop delivering at once; the stream loop connects again (channels and clock re-learned)."""
        self._asm = None
        self._rebooted = True
        self._count("node_restarts")
        _LOGGER.debug("%s: node restart seen: %s", self._who, why)
        self._restart_why = why

    def _on_error(self, sink: SampleSink, frame: Frame) -> None:
        try:
            err = ErrorReport.decode(frame.payload)
        except MessageError:
            self._count("malformed")
            return
        try:
            code = ErrorCode(err.code).name.lower()
        except ValueError:
            code = f"code_{err.code}"
        _LOGGER.warning("%s: node reports %s: %s (detail %d)", self._who, code, err.text, err.detail)
        sink.diagnostic(
            Diagnostic(
                "mcu_error",
                self._info.subject,
                time.time(),
                {"error": code, "detail": float(err.detail)},  # the text stays in the local log
            )
        )
        if err.code == ErrorCode.SELFTEST and self.streams:
            # Before this driver's first handshake the node's channels are not known yet; the
            # handshake's HELLO reports the same health and judges it then, on its first channel.
            self._selftest(sink, failed=True)

    def _selftest(self, sink: SampleSink, *, failed: bool) -> None:
        """Raise a failed self-test once; end it when a HELLO reports the node healthy again."""
        if self._selftest_failed is failed:
            return
        was, self._selftest_failed = self._selftest_failed, failed
        if failed:
            _LOGGER.warning("%s: the node's self-test failed", self._who)
            kind, detail = AlarmKind.SENSOR_FAULT, {"cause": SELFTEST_FAILED}
        else:
            if was:
                _LOGGER.info("%s: the node's self-test passes again", self._who)
            # Also at this driver's first HELLO: a failed self-test a previous run left on (the
            # node repaired or reflashed while the gateway was down) ends here; the pipeline sends
            # an ending only for a condition that is on.
            kind, detail = (
                AlarmKind.SENSOR_RESTORED,
                {"after": AlarmKind.SENSOR_FAULT.value, "cause": SELFTEST_FAILED},
            )
        # On the node's first channel, as a wearable's battery on its headline stream: a fault of
        # the node that a restart can match to its stream, and that a second node does not share.
        stream = next(iter(self.streams.values()), None)
        sink.alarm(Alarm(kind, self._info.subject, time.monotonic(), time.time(), stream, dict(detail)))

    def _report_gaps(self, sink: SampleSink) -> None:
        if not self._pending_gaps:
            return
        now = time.time()
        link = self._link
        for channel, (missing, gaps) in self._pending_gaps.items():
            _LOGGER.debug("%s: %d samples of %s missing in %d gaps", self._who, missing, channel, gaps)
            sink.diagnostic(
                Diagnostic(
                    "mcu_loss",
                    self._info.subject,
                    now,
                    {
                        "channel": token(channel),
                        "missing_samples": float(missing),
                        "gaps": float(gaps),
                        "lost_frames_total": float(link.stats.lost_frames if link else 0),
                    },
                )
            )
        self._pending_gaps.clear()

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0.0) + 1.0

    def snapshot(self) -> dict[str, float]:
        """Link and stream counters: frames, losses, corrupt frames by reason, clock state."""
        if self._link is None and self._final:
            return dict(self._final)  # the last run's figures
        return self.snapshot_of(self._link)

    def snapshot_of(self, link: Link | None) -> dict[str, float]:
        """Counters as seen through ``link``."""
        out = dict(self.counters)
        if link is not None:
            s = link.stats
            out.update(
                frames_in=float(s.frames_in),
                frames_out=float(s.frames_out),
                lost_frames=float(s.lost_frames),
                retransmits=float(s.retransmits),
                timeouts=float(s.timeouts),
                stray_acks=float(s.stray_acks),
            )
            if s.first_seq is not None and s.last_seq is not None:
                out["first_seq"] = float(s.first_seq)
                out["last_seq"] = float(s.last_seq)
            drops = link.drops
            out["corrupt_frames"] = float(sum(drops.values()))
            for reason, count in drops.items():
                out[f"corrupt_{reason}"] = float(count)
        asm = self._asm
        if asm is not None:
            out["clock_steps"] = float(asm.clock_steps)
        clock = self._clock
        if clock is not None and clock.ready:
            out["drift_ppm"] = clock.drift_ppm
            out["rtt_ms"] = clock.rtt_s * 1000.0
            out["sync_points"] = float(clock.points)
        return out


def token(name: str) -> str:
    """A channel name as a plain token (lower-case letters, digits, '_'), as diagnostics require."""
    out = re.sub(r"[^a-z0-9_]+", "_", name.lower()).strip("_")[:30]
    return out if out[:1].isalpha() else f"ch_{out}"[:32]


def factory(info: SourceInfo, cfg: McuConfig) -> McuDriver:
    """Build an MCU driver for one ``[[sources]]`` table."""
    return McuDriver(info, cfg)
