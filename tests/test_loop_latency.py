"""No callback holds the event loop over 50 ms: asyncio debug mode over a run with every simulator.

The gateway runs in this process (debug mode needs the loop at hand) with every device the
project's simulators provide (the demo's composition: sim patient, serial oximeter on a pty, BLE
strap on the emulated radio, OPC UA PLC, C node on a pty), plus an OPC UA source with security on
a gateway PKI that is empty, so its RSA key is generated and certificates parsed during the run,
and the TLS MQTT uplink to a local broker.  asyncio logs every callback slower than
``slow_callback_duration``; the test collects those lines.

Wall time alone cannot tell work on the loop from a loop thread that was waiting: on a shared
two-core machine the process is descheduled now and then, and a worker thread may hold the GIL
for a few ms.  So each callback is also timed in the loop thread's CPU time: a callback that
*worked* 50 ms on the loop fails the test; one that took 50 ms of wall time while its thread
used little CPU is reported, not failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
from peers import ONE_AT_A_TIME, free_port

from drivers import REGISTRY
from drivers.opcua.pki import Pki
from drivers.opcua.plcsim import PlcSimProcess
from gateway import demo
from gateway.config import validate
from gateway.runtime import run_gateway

pytestmark = [pytest.mark.slow, ONE_AT_A_TIME]

SLOW_S = 0.05


class CpuTimes:
    """Wraps ``Handle._run`` to time every callback in the loop thread's CPU time."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.busy: list[tuple[float, float, str]] = []  # (wall s, cpu s, callback)
        original = asyncio.events.Handle._run

        gateway_thread = threading.get_ident()  # the gateway's loop; simulators run loops of their own

        def timed(handle: asyncio.events.Handle) -> None:
            if threading.get_ident() != gateway_thread:
                original(handle)
                return
            wall0, cpu0 = time.perf_counter(), time.thread_time()
            original(handle)
            wall, cpu = time.perf_counter() - wall0, time.thread_time() - cpu0
            if wall >= SLOW_S:
                owner = getattr(getattr(handle, "_callback", None), "__self__", None)
                name = owner.get_name() if isinstance(owner, asyncio.Task) else ""
                self.busy.append((wall, cpu, f"{name} {handle!r}"[:300]))

        monkeypatch.setattr(asyncio.events.Handle, "_run", timed)


class SlowCallbacks(logging.Handler):
    """Collects asyncio's "Executing <Handle ...> took N seconds" warnings."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if text.startswith("Executing") and " took " in text:
            self.lines.append(text)


def _secure_plc(stack: contextlib.ExitStack, tmp: Path) -> dict[str, Any]:
    server = PlcSimProcess(free_port(), "--pki", str(tmp / "server-pki"), "--policies", "Basic256Sha256")
    server.start()
    stack.callback(server.stop)
    gateway_pki = Pki(tmp / "gateway-pki")
    gateway_pki.ensure_folders()  # trusted folder only: the gateway's own key is made during the run
    gateway_pki.trust(tmp / "server-pki" / "own" / "cert.der")
    return {
        "name": "pump-4-plc",
        "driver": "opcua",
        "subject": "plant-A/pump-4",
        "kind": "industrial",
        "endpoint": server.endpoint,
        "security_policy": "Basic256Sha256",
        "security_mode": "SignAndEncrypt",
        "pki_dir": str(tmp / "gateway-pki"),
        "namespace_uri": "urn:edgetwin:plcsim",
        "nodes": [{"browse_path": "Pump1/Motor/Current"}],
    }


def _run_and_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, full: bool, run_s: float) -> None:
    slow = SlowCallbacks()
    times = CpuTimes(monkeypatch)
    asyncio_log = logging.getLogger("asyncio")
    asyncio_log.addHandler(slow)
    out = io.StringIO()
    try:
        with contextlib.ExitStack() as stack:
            if full:
                data, notes = demo.compose(stack, tmp_path)
            else:
                data, notes = tomllib.loads(demo.BASE_CONFIG), []
                data["sources"] += demo.oximeter(stack, tmp_path)
            data["gateway"]["state_dir"] = str(tmp_path / "state")
            data["sources"].append(_secure_plc(stack, tmp_path))
            drivers = {s["driver"] for s in data["sources"]}
            if full:
                from gateway.uplink.demo import demo_link  # noqa: PLC0415 - the optional mqtt extra

                link = stack.enter_context(demo_link(tmp_path / "link", out))
                data["uplink"] = {"kind": "mqtt", "mqtt": link.mqtt_config()}
            config = validate(data, "<test>", REGISTRY)

            async def main() -> int:
                asyncio.get_running_loop().slow_callback_duration = SLOW_S
                return await run_gateway(
                    config, REGISTRY, out=out, stop_after_s=run_s, install_signal_handlers=False
                )

            code = asyncio.run(main(), debug=True)
    finally:
        asyncio_log.removeHandler(slow)
    assert code == 0
    print("\n".join(notes))
    # Every simulator this machine can run took part (the demo leaves out what cannot run here).
    assert {"sim", "serial", "opcua"} <= drivers, notes
    assert (tmp_path / "gateway-pki" / "own" / "private" / "key.pem").exists()  # made during the run
    for wall, cpu, what in times.busy:
        print(f"slow callback: {wall * 1000:.0f} ms wall, {cpu * 1000:.0f} ms on the loop's CPU: {what}")
    # asyncio's own timing (debug mode) wraps ours, so it sees every slow callback we see.
    assert len(times.busy) <= len(slow.lines)
    worked = [f"{cpu * 1000:.0f} ms: {what}" for _, cpu, what in times.busy if cpu >= SLOW_S]
    assert not worked, "\n".join(worked)


def test_no_callback_over_50_ms_with_key_generation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast subset: synthetic patient, serial oximeter, OPC UA with security, models."""
    _run_and_check(tmp_path, monkeypatch, full=False, run_s=4.0)


@pytest.mark.campaign
def test_no_callback_over_50_ms_with_every_driver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every simulator the demo can start, and the TLS MQTT uplink."""
    _run_and_check(tmp_path, monkeypatch, full=True, run_s=20.0)
