"""Which protocol is on a port: listen at each known line setting and see which parser locks on.

Probing only listens; the one exception is the CMS50 firmware 4.6, which stays silent until a
start command is written - that is tried last, and only when the caller allows it.  The scoring
(:func:`recognise`) is pure: the parsers of every protocol that shares a line setting read the
same bytes, and the one that turns most of them into whole frames wins.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from drivers.serial.formats import PARSERS, make_parser, settings_groups
from drivers.serial.port import open_link
from drivers.serial.protocol import LineSettings, Parser

#: Share of the bytes received that must sit inside whole frames for a protocol to be named.
MIN_GOOD_SHARE = 0.5


def min_frames(parser: type[Parser]) -> int:
    """Whole frames needed before a protocol is named: about two seconds' worth, 1 to 25."""
    if parser.reading_rate_hz is None:
        return 1
    return max(2, min(25, round(2.0 / parser.frame_period_s)))


def recognise(parsers: Sequence[Parser]) -> Parser | None:
    """The parser that explains the bytes it was fed, or None when none does."""
    fits = [
        p
        for p in parsers
        if p.frames >= min_frames(type(p)) and p.good_bytes >= MIN_GOOD_SHARE * max(1, p.bytes_in)
    ]
    return max(fits, key=lambda p: (p.good_bytes, -p.dropped)) if fits else None


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one line setting showed."""

    settings: LineSettings
    protocols: tuple[str, ...]
    bytes_seen: int
    wrote_start_command: bool = False


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """The outcome of probing one port."""

    port: str
    protocol: str | None
    settings: LineSettings | None
    frames: int
    attempts: tuple[Attempt, ...] = field(default=())

    @property
    def bytes_seen(self) -> int:
        """Bytes received over all attempts."""
        return sum(a.bytes_seen for a in self.attempts)

    def describe(self) -> str:
        """One line for a technician."""
        if self.protocol is not None:
            return f"{self.protocol} at {self.settings} ({self.frames} whole frames)"
        tried = ", ".join(str(a.settings) for a in self.attempts) or "no line setting"
        if self.bytes_seen == 0:
            return f"silent at {tried} (no bytes)"
        return f"no recognisable frames at {tried} on {self.port} ({self.bytes_seen} bytes received)"


async def _listen(
    who: str, port: str, settings: LineSettings, names: Sequence[str], probe_s: float, start: bytes | None
) -> tuple[Parser | None, Attempt]:
    parsers = [make_parser(n) for n in names]
    loop = asyncio.get_running_loop()
    # Typed like link.lost so both can be awaited together; the winner itself is kept aside.
    found: asyncio.Future[BaseException | None] = loop.create_future()
    chosen: list[Parser] = []
    seen = 0

    def on_data(data: bytes) -> None:
        nonlocal seen
        seen += len(data)
        for p in parsers:
            p.feed(data)
        winner = recognise(parsers)
        if winner is not None and not found.done():
            chosen.append(winner)
            found.set_result(None)

    link = await open_link(who, port, settings, on_data)
    try:
        if start is not None:
            link.write(start)
        deadline = time.monotonic() + probe_s
        while not found.done() and not link.lost.done():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            await asyncio.wait(
                [found, link.lost], timeout=min(left, 0.1), return_when=asyncio.FIRST_COMPLETED
            )
            if not found.done():
                # A pause in the bytes ends frames that only silence delimits (Nonin #8).
                for p in parsers:
                    p.idle()
                winner = recognise(parsers)
                if winner is not None:
                    chosen.append(winner)
                    found.set_result(None)
    finally:
        await link.aclose()
    winner = chosen[0] if chosen else recognise(parsers)
    return winner, Attempt(settings, tuple(names), seen, start is not None)


async def probe(
    port: str,
    *,
    protocols: Sequence[str] | None = None,
    probe_s: float = 4.0,
    allow_start_command: bool = False,
    baudrate: int | None = None,
    who: str = "serial probe",
) -> ProbeResult:
    """Listen on ``port`` at each line setting the candidate protocols use; name the one that fits.

    Raises the errors of :func:`drivers.serial.port.open_port` (absent, busy, permission).
    """
    names = tuple(protocols or PARSERS)
    groups = settings_groups(names)
    attempts: list[Attempt] = []
    needs_start = [n for n in names if PARSERS[n].start_command is not None]
    for settings, members in groups.items():
        listen_only = tuple(n for n in members if PARSERS[n].start_command is None)
        if not listen_only:
            continue
        use = (
            settings
            if baudrate is None
            else LineSettings(baudrate, settings.bytesize, settings.parity, settings.stopbits)
        )
        winner, attempt = await _listen(who, port, use, listen_only, probe_s, None)
        attempts.append(attempt)
        if winner is not None:
            return ProbeResult(port, winner.name, use, winner.frames, tuple(attempts))
    if allow_start_command:
        for name in needs_start:
            cls = PARSERS[name]
            use = cls.settings if baudrate is None else LineSettings(baudrate)
            winner, attempt = await _listen(who, port, use, (name,), probe_s, cls.start_command)
            attempts.append(attempt)
            if winner is not None:
                return ProbeResult(port, winner.name, use, winner.frames, tuple(attempts))
    return ProbeResult(port, None, None, 0, tuple(attempts))
