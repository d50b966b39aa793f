"""End to end: a real OPC UA server whose temperature tag changes its EngineeringUnits from °C to
°F (the PLC programmer rescaled it), across a gateway restart and during a run (a program
download that recreates the node under a new NodeId).  The per-stream detector commissioned in
°C recommissions the tag in °F: no `stream_change` anomaly, the log and the status say why, and
the stored baseline is in °F.

The peer is an asyncua server in the test's process, on its own event loop in a thread, as a
PLC runs apart from the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import json
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from asyncua import ua
from asyncua.common.node import Node
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.status_codes import StatusCodes
from peers import free_port
from test_opcua_hold_order import Plc as HoldOrderPlc

from drivers import REGISTRY
from drivers.opcua.uahelp import node_id as make_node_id
from drivers.opcua.uahelp import status_code, ua_time
from gateway.config import Config, validate
from gateway.observe.control import StatusUnavailableError, query
from gateway.runtime import run_gateway

pytestmark = pytest.mark.slow

URI = "urn:edgetwin:test:units"
TAG = "Tank/Temperature"
SUBJECT = "plant-A/tank-1"
HOP_S = 0.1
COMMISSION_S = 5.0  # 50 windows of 0.1 s


class Plc(HoldOrderPlc):
    """A server with one temperature tag (50 °C, noise 0.05) written every 50 ms in its unit.

    On its own event loop in a thread, started and stopped as tests/test_opcua_hold_order.py's.
    """

    def __init__(self, port: int) -> None:
        super().__init__(port)
        self.folder: Node | None = None
        self.node: Node | None = None
        self.idx = 0
        self.fahrenheit = False
        self.generation = 0
        self.rng = random.Random(3)

    def __enter__(self) -> Plc:
        super().__enter__()
        return self

    async def _start(self) -> None:
        await self.server.init()
        self.server.set_endpoint(self.endpoint)
        self.server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        self.idx = await self.server.register_namespace(URI)
        self.folder = await self.server.nodes.objects.add_object(self.idx, "Tank")
        await self._add()
        await self.server.start()
        self.ticker = asyncio.create_task(self._tick(), name="test:tick")

    async def _add(self) -> None:
        assert self.folder is not None
        unit = "°F" if self.fahrenheit else "°C"
        node_id = make_node_id(f"Tank.Temperature.v{self.generation}", self.idx)
        self.node = await self.folder.add_variable(
            node_id, ua.QualifiedName("Temperature", self.idx), 0.0, varianttype=ua.VariantType.Double
        )
        eu = ua.EUInformation(
            NamespaceUri="http://www.opcfoundation.org/UA/units/un/cefact",
            UnitId=4408652 if self.fahrenheit else 4408643,  # FAH, CEL
            DisplayName=ua.LocalizedText(unit),
            Description=ua.LocalizedText(unit),
        )
        await self.node.add_property(0, "EngineeringUnits", eu)

    async def _tick(self) -> None:
        for _ in itertools.count():
            celsius = 50.0 + 0.05 * self.rng.gauss(0.0, 1.0)
            value = celsius * 1.8 + 32.0 if self.fahrenheit else celsius
            now = ua_time(dt.datetime.now(dt.UTC))
            node = self.node
            if node is not None:
                dv = ua.DataValue(
                    ua.Variant(value, ua.VariantType.Double), SourceTimestamp=now, ServerTimestamp=now
                )
                await self.server.write_attribute_value(node.nodeid, dv)
            await asyncio.sleep(0.05)

    async def _reprogram(self) -> None:
        """The tag in °F under a new NodeId (a program download), same browse path."""
        assert self.node is not None
        old, self.node = self.node, None
        # asyncua's delete calls each monitored item's (async) callback without awaiting it: the
        # subscriptions are told here, awaited, as a PLC's server tells them (BadNodeIdUnknown).
        aspace = self.server.iserver.aspace
        callbacks = aspace[old.nodeid].attributes[AttributeIds.Value].datachange_callbacks
        for handle, callback in list(callbacks.items()):
            await callback(handle, None, status_code(StatusCodes.BadNodeIdUnknown))
            aspace.delete_datachange_callback(handle)
        await self.server.delete_nodes([old], recursive=True)
        self.fahrenheit = True
        self.generation += 1
        await self._add()

    def reprogram(self) -> None:
        """Recreate the tag in °F (from the gateway's side of the test)."""
        asyncio.run_coroutine_threadsafe(self._reprogram(), self.loop).result(30)

    async def _rescale(self) -> None:
        assert self.node is not None
        self.fahrenheit = True
        eu = await self.node.get_child("0:EngineeringUnits")
        value = await eu.read_value()
        value.DisplayName = value.Description = ua.LocalizedText("°F")
        value.UnitId = 4408652
        await eu.write_value(ua.DataValue(ua.Variant(value, ua.VariantType.ExtensionObject)))

    def rescale(self) -> None:
        """The same node in °F: EngineeringUnits and values (while no gateway is connected)."""
        asyncio.run_coroutine_threadsafe(self._rescale(), self.loop).result(30)


def write_config(tmp: Path, endpoint: str) -> Config:
    """The gateway: the tag as one industrial subject, the per-stream detector after 5 s."""
    (tmp / "state").mkdir(exist_ok=True)
    source = {
        "name": "tank-plc",
        "driver": "opcua",
        "subject": SUBJECT,
        "kind": "industrial",
        "endpoint": endpoint,
        "security_policy": "None",
        "security_mode": "None",
        "namespace_uri": URI,
        "sampling_interval_ms": 50,
        "publishing_interval_ms": 100,
        "verify_interval_s": 1.0,  # a recreated node is found again within a second
        "nodes": [{"browse_path": TAG}],
    }
    raw = {
        "gateway": {"state_dir": str(tmp / "state")},
        "pipeline": {"window_s": 0.5, "hop_s": HOP_S, "grace_s": 0.2},
        "uplink": {"kind": "local", "path": str(tmp / "out.jsonl")},
        "runtime": {"drain_deadline_s": 3.0},
        "status": {"socket": str(tmp / "control.sock")},
        "alarms": {"defaults": False},
        "models": {
            "raise_after_windows": 8,
            "clear_after_windows": 10,
            "streams": {"commissioning_s": COMMISSION_S},
        },
        "sources": [source],
    }
    return validate(raw, "<units>", REGISTRY)


def stored(tmp: Path) -> dict[str, Any] | None:
    """The per-stream detector's stored state of the tag, None before it has one."""
    for p in (tmp / "state" / "models").glob("stream_change-*.json"):
        with contextlib.suppress(ValueError, OSError):
            state: dict[str, Any] = json.loads(p.read_text(encoding="utf-8"))["streams"].get(TAG)
            return state
    return None


def commissioned_in(tmp: Path, unit: str | None) -> bool:
    """Whether the tag's baseline is stored, in ``unit`` (None: whatever its unit)."""
    st = stored(tmp)
    return st is not None and st.get("level") is not None and unit in (None, st.get("unit"))


def status_of_streams(tmp: Path) -> list[str]:
    """The per-stream detector's subject states, as ``edgetwin status`` reads them (the control socket)."""
    try:
        snap = query(tmp / "control.sock", timeout_s=5.0)
    except StatusUnavailableError:
        return []
    return [s["state"] for m in snap.get("models", []) if m["name"] == "stream_change" for s in m["subjects"]]


def run(config: Config, seconds: float, watch: Any = None) -> None:
    """The gateway for ``seconds``; ``watch(stop)`` runs beside it in a thread."""
    stop = threading.Event()
    worker = threading.Thread(target=watch, args=(stop,)) if watch is not None else None
    if worker is not None:
        worker.start()
    try:
        code = asyncio.run(run_gateway(config, REGISTRY, stop_after_s=seconds, install_signal_handlers=False))
    finally:
        stop.set()
        if worker is not None:
            worker.join(timeout=30.0)
    assert code == 0


def stream_alarms(tmp: Path) -> list[dict[str, Any]]:
    lines = [json.loads(x)["record"] for x in (tmp / "out.jsonl").read_text().splitlines()]
    return [
        r for r in lines if r.get("type") == "alarm" and r.get("detail", {}).get("model") == "stream_change"
    ]


def polled(tmp: Path, states: list[list[str]], wanted: str = "") -> bool:
    """Ask the status once, keep its answer; True once a state holds ``wanted``."""
    states.append(status_of_streams(tmp))
    return any(wanted in s for s in states[-1])


def until(check: Any, stop: threading.Event, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not stop.is_set() and time.monotonic() < deadline:
        if check():
            return True
        stop.wait(0.2)
    return False


def test_a_tag_rescaled_to_fahrenheit_across_a_restart_is_recommissioned_not_an_anomaly(
    tmp_path: Path,
) -> None:
    with Plc(free_port()) as plc:
        config = write_config(tmp_path, plc.endpoint)
        run(config, 15.0)
        assert commissioned_in(tmp_path, None), stored(tmp_path)
        assert abs(stored(tmp_path)["level"] - 50.0) < 0.5  # type: ignore[index]
        plc.rescale()
        states: list[list[str]] = []

        def watch(stop: threading.Event) -> None:
            until(lambda: polled(tmp_path, states, "unit changed"), stop, 20.0)

        run(config, 15.0, watch)
    assert stream_alarms(tmp_path) == [], "a change of unit raised an anomaly"
    assert commissioned_in(tmp_path, "degF"), stored(tmp_path)
    assert abs(stored(tmp_path)["level"] - 122.0) < 0.5  # type: ignore[index]
    assert [f"commissioning (unit changed from degC to degF: {TAG})"] in states, states


def test_a_tag_recreated_in_fahrenheit_during_a_run_is_recommissioned_not_an_anomaly(tmp_path: Path) -> None:
    with Plc(free_port()) as plc:
        config = write_config(tmp_path, plc.endpoint)
        states: list[list[str]] = []
        reprogrammed: list[float] = []

        def watch(stop: threading.Event) -> None:
            if not until(lambda: commissioned_in(tmp_path, None), stop, 20.0):
                return
            stop.wait(2.0)  # judged in °C for a while
            plc.reprogram()
            reprogrammed.append(time.monotonic())
            until(lambda: polled(tmp_path, states, "unit changed"), stop, 10.0)

        run(config, 25.0, watch)
    assert reprogrammed, "the tag was not commissioned in °C in time"
    assert stream_alarms(tmp_path) == [], "a change of unit raised an anomaly"
    assert commissioned_in(tmp_path, "degF"), stored(tmp_path)
    assert [f"commissioning (unit changed from degC to degF: {TAG})"] in states, states
