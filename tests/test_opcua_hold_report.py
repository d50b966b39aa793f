"""The ``opcua_hold`` diagnostic against what the server did, and in ``edgetwin status``.

A PLC simulator process on loopback writes the pump's flow in steps of 4 l/min (it holds 32, the
server reports it only when it changes) and current and pressure at every 100 ms tick; the
Boolean ``Running`` reports on change only.  Every ``diagnostics_every_s`` the driver says how
many samples it held since the last report (``held``), of how many nodes (``held_nodes``: the
quiet tags) and how many nodes it reads by exception (``by_exception``).  The figures are checked
against the samples the driver handed over between two reports: a value the server sent differs
from the one before it, a held one repeats it.
"""

from __future__ import annotations

import asyncio
import math
import re
from pathlib import Path

import pytest
from test_observe_status import Gateway, Notify, _config
from test_opcua_driver import Recorder, Running, make_driver, until
from test_opcua_hold import CURRENT, FLOW, NODES, PRESSURE, quantised, quiet_for

from drivers.opcua.plcsim import NAMESPACE_URI, PlcSimProcess
from gateway.contracts import Diagnostic

pytestmark = pytest.mark.slow

__all__ = ["quantised"]  # the simulator fixture, shared with the hold tests

EVERY_S = 1.0
RATE_HZ = 10.0  # QUANTISED's tick: the nodes' sampling interval


class Reports(Recorder):
    """A recorder that notes, with each ``opcua_hold`` report, how many samples came before it."""

    def __init__(self) -> None:
        super().__init__()
        self.reports: list[tuple[int, Diagnostic]] = []

    def diagnostic(self, diagnostic: Diagnostic) -> None:
        super().diagnostic(diagnostic)
        if diagnostic.kind == "opcua_hold":
            self.reports.append((len(self.samples), diagnostic))


def test_the_hold_report_counts_what_the_server_left_unsaid(quantised: PlcSimProcess) -> None:
    with pytest.raises(ValueError, match="diagnostics_every_s"):
        make_driver(quantised.endpoint, diagnostics_every_s=0.2)  # a report a second at most

    async def main() -> Reports:
        driver = make_driver(quantised.endpoint, nodes=NODES, diagnostics_every_s=EVERY_S)
        sink = Reports()
        async with Running(driver, sink) as run:
            await until(lambda: run.starts == 1 and bool(sink.of(FLOW)), 10, "data")
            await until(lambda: quiet_for(sink.of(FLOW)) > 1.0, 15, "Flow holding")
            n = len(sink.reports)
            await until(lambda: len(sink.reports) >= n + 4, 4 * EVERY_S + 5, "four reports")
        return sink

    sink = asyncio.run(main())
    streams = {s.stream for s in sink.samples}
    last: dict[object, float] = {}
    start = 0
    flow_quiet = 0
    for k, (end, report) in enumerate(sink.reports):
        repeats: dict[str, int] = {}
        changed: set[str] = set()
        for s in sink.samples[start:end]:
            name = s.stream.metric.name
            before = last.get(s.stream)
            last[s.stream] = s.value
            if before is not None and (s.value == before or (math.isnan(s.value) and math.isnan(before))):
                repeats[name] = repeats.get(name, 0) + 1
            else:
                changed.add(name)
        start = end
        assert report.subject == "plant-A/pump-3"
        assert report.detail == {
            "held": sum(repeats.values()),
            "held_nodes": len(repeats),
            "by_exception": 3,  # current, flow, pressure; Running is a Boolean, reported on change
        }, (report.detail, repeats)
        # What the server did: it sent current and pressure at every tick (nothing to hold, bar
        # a tick at a report's edge) and flow only when it changed; flow held still for the
        # whole interval is a regular sampler's count of it.
        assert repeats.get(CURRENT, 0) <= 1
        assert repeats.get(PRESSURE, 0) <= 1
        if k and FLOW not in changed:  # (the first report's interval began before the data)
            flow_quiet += 1
            assert abs(repeats.get(FLOW, 0) - RATE_HZ * EVERY_S) <= 4, repeats
    assert flow_quiet >= 3
    assert len(streams) == 4


def test_edgetwin_status_shows_the_hold_report(
    tmp_path: Path, quantised: PlcSimProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    nodes = ", ".join(f'{{ browse_path = "{n["browse_path"]}" }}' for n in NODES)
    config = _config(
        tmp_path,
        f"""
[uplink]
kind = "none"
[[sources]]
name = "pump-3-plc"
driver = "opcua"
subject = "pump-3"
kind = "industrial"
endpoint = "{quantised.endpoint}"
security_policy = "None"
security_mode = "None"
namespace_uri = "{NAMESPACE_URI}"
publishing_interval_ms = 100.0
diagnostics_every_s = {EVERY_S}
nodes = [{nodes}]
""",
    )
    notify = Notify(tmp_path / "notify.sock")
    gw = Gateway(config, notify)
    try:

        def held(snap: dict[str, object]) -> bool:
            reports = snap["reports"]
            assert isinstance(reports, list)
            return any(r["kind"] == "opcua_hold" and r["counters"]["held"] >= 5 for r in reports)

        snap = gw.wait(capsys, held, "a hold report with the quiet flow held")
        (report,) = [r for r in snap["reports"] if r["kind"] == "opcua_hold"]
        counters = report["counters"]
        assert counters["by_exception"] == 3
        assert 1 <= counters["held_nodes"] <= 3
        assert report["subject"] not in ("", "pump-3")  # a pseudonym
        rc, text = gw.status(capsys)
        assert rc in (0, 1), text
        assert "driver and model reports (latest):" in text
        line = next(x for x in text.splitlines() if x.startswith("  opcua_hold "))
        assert re.fullmatch(
            rf"  opcua_hold subject {re.escape(report['subject'])} \(.* ago\): "
            r"by_exception 3, held \d+, held_nodes [123]",
            line,
        ), line
    finally:
        out = gw.stop()
        notify.sock.close()
    assert "Traceback" not in out, out
