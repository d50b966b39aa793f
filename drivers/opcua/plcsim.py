"""A PLC simulator: an asyncua server with a pump/motor address space, for tests, demos and scans.

Run it as ``python -m drivers.opcua.plcsim --port 4840`` or ``edgetwin sim plc``.  It serves::

    Objects/Pump1/Vibration/Accelerometer1RMS, Accelerometer2RMS   g
    Objects/Pump1/Motor/Current A, Voltage V, Temperature degC
    Objects/Pump1/Hydraulics/Pressure bar, FluidTemperature degC, Flow l/min
    Objects/Pump1/Status/Running (Boolean), AnomalyLabel (Boolean: ground truth of injected faults)
    Objects/Pump1/Info/SerialNumber (String)

each variable with ``EngineeringUnits`` (EUInformation, UNECE codes) and ``EURange``; NodeIds are
``ns=<urn:edgetwin:plcsim>;s=Pump1.Motor.Current`` and so on.  Values come from the seeded pump
process model of ``drivers.sim.protocol`` (works anywhere) or from a SKAB recording replayed in
real time (``--skab file.csv``).  Source timestamps are the simulated PLC clock, server
timestamps the time of the write.  The PLC samples once per tick and says so: every monitored
item is answered with the tick as its revised sampling interval.  ``--quantize Flow:4`` writes a
variable rounded to a step, a tag that holds its value (the server reports it only on change).

Control: one command per line on standard input (``--control stdin``, the default), answered
with ``OK ...`` or ``ERR ...`` on standard output::

    remove <var>            delete a variable node (e.g. "Hydraulics/Pressure" or "Pressure")
    add <var>               put it back (same NodeId, browse name, properties)
    recreate <var>          delete it and add it again under a new NodeId (same browse name), as a
                            PLC program download does; a browse path follows it, its old NodeId not
    retype <var> <type>     replace it by one of data type double|float|int32|boolean|string
    fault <kind> <seconds>  valve_fault | bearing_wear (process model), sensor_off (vibration
                            values Bad_SensorFailure), stale (values frozen, Uncertain_LastUsableValue)
    status                  one line of current values
    quit                    stop the server

``READY <endpoint>`` is printed once the server listens, so a test can wait for it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import datetime as dt
import hmac
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from asyncua import ua
from asyncua.common.node import Node
from asyncua.common.utils import ServiceError
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.server import Server
from asyncua.ua.status_codes import StatusCodes
from asyncua.ua.uaerrors import UaError
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from drivers.opcua.pki import generate_certificate
from drivers.opcua.uahelp import node_id, status_code, ua_time
from drivers.sim import protocol as pump_model

log = logging.getLogger(__name__)

NAMESPACE_URI = "urn:edgetwin:plcsim"
APPLICATION_URI = "urn:edgetwin:plcsim:server"
ROOT = "Pump1"
_UNECE_NS = "http://www.opcfoundation.org/UA/units/un/cefact"

POLICY_TYPES: dict[str, list[ua.SecurityPolicyType]] = {
    "None": [ua.SecurityPolicyType.NoSecurity],
    "Basic256Sha256": [
        ua.SecurityPolicyType.Basic256Sha256_Sign,
        ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
    ],
    "Aes128_Sha256_RsaOaep": [
        ua.SecurityPolicyType.Aes128Sha256RsaOaep_Sign,
        ua.SecurityPolicyType.Aes128Sha256RsaOaep_SignAndEncrypt,
    ],
    "Aes256_Sha256_RsaPss": [
        ua.SecurityPolicyType.Aes256Sha256RsaPss_Sign,
        ua.SecurityPolicyType.Aes256Sha256RsaPss_SignAndEncrypt,
    ],
}

_TYPES: dict[str, tuple[ua.VariantType, Callable[[float], Any]]] = {
    "double": (ua.VariantType.Double, float),
    "float": (ua.VariantType.Float, float),
    "int32": (ua.VariantType.Int32, lambda v: round(v) if math.isfinite(v) else 0),
    "boolean": (ua.VariantType.Boolean, lambda v: bool(v > 0.5) if math.isfinite(v) else False),
    "string": (ua.VariantType.String, lambda v: f"{v:.3f}"),
}


def unece_id(code: str) -> int:
    """The UnitId of a UNECE Rec. 20 common code, as OPC UA Part 8 encodes it."""
    out = 0
    for ch in code:
        out = (out << 8) | ord(ch)
    return out


@dataclass(frozen=True, slots=True)
class SimVar:
    """One variable of the simulated PLC."""

    path: str  # below Pump1, e.g. "Motor/Current"
    signal: str | None  # process model signal or SKAB column; None for status/info variables
    skab: str | None
    unit: str | None
    unece: str | None
    lo: float
    hi: float
    kind: str = "double"

    @property
    def node_text(self) -> str:
        """The string identifier of its NodeId."""
        return f"{ROOT}.{self.path.replace('/', '.')}"


VARIABLES: tuple[SimVar, ...] = (
    SimVar("Vibration/Accelerometer1RMS", pump_model.ACCEL1, "Accelerometer1RMS", "g", "K40", 0.0, 1.0),
    SimVar("Vibration/Accelerometer2RMS", pump_model.ACCEL2, "Accelerometer2RMS", "g", "K40", 0.0, 1.0),
    SimVar("Motor/Current", pump_model.CURRENT, "Current", "A", "AMP", 0.0, 5.0),
    SimVar("Motor/Voltage", pump_model.VOLTAGE, "Voltage", "V", "VLT", 0.0, 260.0),
    SimVar("Motor/Temperature", pump_model.MOTOR_TEMP, "Temperature", "°C", "CEL", 0.0, 120.0),
    SimVar("Hydraulics/Pressure", pump_model.PRESSURE, "Pressure", "bar", "BAR", 0.0, 10.0),
    SimVar("Hydraulics/FluidTemperature", pump_model.WATER_TEMP, "Thermocouple", "°C", "CEL", 0.0, 100.0),
    SimVar("Hydraulics/Flow", pump_model.FLOW, "Volume Flow RateRMS", "l/min", "L2", 0.0, 200.0),
    SimVar("Status/Running", None, None, None, None, 0.0, 1.0, "boolean"),
    SimVar("Status/AnomalyLabel", None, "anomaly", None, None, 0.0, 1.0, "boolean"),
    SimVar("Info/SerialNumber", None, None, None, None, 0.0, 0.0, "string"),
)
_VIBRATION = frozenset({pump_model.ACCEL1, pump_model.ACCEL2})


def find_var(name: str, extra: Sequence[SimVar] = ()) -> SimVar:
    """A variable by its path below Pump1 or by its last segment."""
    for var in (*VARIABLES, *extra):
        if name in (var.path, var.path.rpartition("/")[2], var.node_text):
            return var
    raise KeyError(name)


# -- value sources --------------------------------------------------------------------------------


class ModelSource:
    """Values from the seeded pump process model; faults become its events."""

    def __init__(self, seed: int, rate_hz: float) -> None:
        self.seed = seed
        self.rate_hz = rate_hz
        self.events: list[pump_model.Label] = []
        self._gen = self._make()

    def _make(self) -> pump_model.Generator:
        return pump_model.make_generator("pump", seed=self.seed, rate_hz=self.rate_hz, events=self.events)

    def add_event(self, kind: str, at_s: float, duration_s: float) -> None:
        """Inject a process event (valve_fault, bearing_wear) into the model."""
        self.events.append(pump_model.Label(kind, at_s, at_s + duration_s))
        self._gen = self._make()

    def values(self, t0: float, t1: float) -> list[tuple[float, dict[str, float], bool]]:
        """(sim time, values by signal, anomaly) for every sample due in [t0, t1)."""
        chunk = self._gen.generate(t0, t1)
        rows: dict[float, dict[str, float]] = {}
        for name, series in chunk.series.items():
            for t, v in zip(series.t.tolist(), series.value.tolist(), strict=True):
                rows.setdefault(t, {})[name] = v
        out = []
        for t in sorted(rows):
            anomaly = any(ev.start_s <= t < ev.end_s for ev in self.events)
            out.append((t, rows[t], anomaly))
        return out


class SkabSource:
    """A SKAB recording replayed in real time (one row per second times ``speed``), looped."""

    def __init__(self, path: Path, speed: float) -> None:
        self.speed = speed
        self.rows: list[tuple[dict[str, float], bool]] = []
        with path.open(newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f, delimiter=";"):
                values = {var.signal: float(row[var.skab]) for var in VARIABLES if var.signal and var.skab}
                self.rows.append((values, float(row.get("anomaly") or 0.0) > 0.5))
        if not self.rows:
            raise ValueError(f"plcsim: {path} holds no rows")
        self.events: list[pump_model.Label] = []

    def add_event(self, kind: str, at_s: float, duration_s: float) -> None:
        """Process faults are whatever the recording holds; refuse to invent one."""
        del at_s, duration_s
        raise ValueError(f"{kind} is not injectable into a SKAB replay (its faults are recorded)")

    def values(self, t0: float, t1: float) -> list[tuple[float, dict[str, float], bool]]:
        """(sim time, values, anomaly label) for the rows due in [t0, t1)."""
        step = 1.0 / self.speed
        first, last = math.ceil(t0 / step), math.ceil(t1 / step)
        out = []
        for i in range(first, last):
            values, anomaly = self.rows[i % len(self.rows)]
            out.append((i * step, values, anomaly))
        return out


# -- the server -----------------------------------------------------------------------------------


class _PasswordUsers:
    """Username/password check for the simulator (constant-time compare)."""

    def __init__(self, users: dict[str, str]) -> None:
        self._users = users

    def get_user(
        self, iserver: Any, username: str | None = None, password: str | None = None, certificate: Any = None
    ) -> User | None:
        """The user for these credentials, or None to refuse them."""
        del iserver, certificate
        if username is None:
            return None
        expected = self._users.get(username)
        if expected is None or password is None or not hmac.compare_digest(expected, password):
            return None
        return User(role=UserRole.User)


@dataclass
class _Faults:
    """Spans ``[start, end)`` of sim time with a fault on."""

    sensor_off: list[tuple[float, float]] = field(default_factory=list)
    stale: list[tuple[float, float]] = field(default_factory=list)

    @staticmethod
    def on(spans: list[tuple[float, float]], t: float) -> bool:
        """True when ``t`` falls in one of the spans."""
        return any(a <= t < b for a, b in spans)


@dataclass
class PlcSim:
    """The simulated PLC: an asyncua server plus the loop that writes process values."""

    host: str
    port: int
    rate_hz: float = 10.0
    seed: int = 1
    skab: Path | None = None
    speed: float = 1.0
    pki: Path | None = None
    policies: Sequence[str] = ("None",)
    users: dict[str, str] | None = None
    trusted_clients: Path | None = None
    extra: int = 0
    extra_every: int = 1  # Bench variables change every this many ticks; 0: they never change
    # Variables written rounded to a step (path below Pump1 -> step): a quantised tag that holds
    # its value for long stretches, which the server then reports only when it changes.
    quantize: dict[str, float] = field(default_factory=dict)
    # Other namespaces registered before the simulator's own: a PLC restarted with another project
    # serves the same namespace URI under another index.
    namespaces_before: int = 0
    server: Server = field(init=False)
    nodes: dict[str, Node] = field(init=False, default_factory=dict)
    types: dict[str, str] = field(init=False, default_factory=dict)
    generation: dict[str, int] = field(init=False, default_factory=dict)  # recreations per variable
    faults: _Faults = field(init=False, default_factory=_Faults)
    last: dict[str, float] = field(init=False, default_factory=dict)
    t0_mono: float = field(init=False, default=0.0)
    idx: int = field(init=False, default=0)

    @property
    def endpoint(self) -> str:
        """The URL clients connect to."""
        return f"opc.tcp://{self.host}:{self.port}/"

    @property
    def sampling_ms(self) -> float:
        """How often the simulated PLC samples its process: every value it writes is a new sample."""
        return 1000.0 / (self.speed if self.skab is not None else self.rate_hz)

    @property
    def extra_vars(self) -> list[SimVar]:
        """Benchmark variables: Bench/Item0000 ... (values change every ``extra_every`` ticks)."""
        return [SimVar(f"Bench/Item{i:04d}", None, None, "1", "C62", 0.0, 1.0) for i in range(self.extra)]

    async def setup(self) -> None:
        """Build the server and its address space (not yet listening)."""
        users = _PasswordUsers(self.users) if self.users is not None else None
        self.server = Server(user_manager=users)  # type: ignore[arg-type]
        await self.server.init()
        self.server.set_endpoint(self.endpoint)
        self.server.set_server_name("edgetwin PLC simulator")
        await self.server.set_application_uri(APPLICATION_URI)
        policy_types: list[ua.SecurityPolicyType] = []
        for name in self.policies:
            policy_types += POLICY_TYPES[name]
        self.server.set_security_policy(policy_types)
        if users is not None:
            self.server.set_identity_tokens([ua.UserNameIdentityToken])
        if self.pki is not None:
            cert, key = self.pki / "own" / "cert.der", self.pki / "own" / "private" / "key.pem"
            if not cert.exists():
                generate_certificate(
                    cert,
                    key,
                    application_uri=APPLICATION_URI,
                    hostname=self.host,
                    common_name="edgetwin-plcsim",
                )
            await self.server.load_certificate(str(cert))
            await self.server.load_private_key(str(key))
        if self.trusted_clients is not None:
            self.server.set_certificate_validator(self._validate_client)
        self._revise_sampling()
        for n in range(self.namespaces_before):
            await self.server.register_namespace(f"urn:edgetwin:plcsim:other{n}")
        self.idx = await self.server.register_namespace(NAMESPACE_URI)
        objects = self.server.nodes.objects
        root = await objects.add_object(node_id(ROOT, self.idx), ua.QualifiedName(ROOT, self.idx))
        folders: dict[str, Node] = {}
        for var in (*VARIABLES, *self.extra_vars):
            folder_name = var.path.rpartition("/")[0]
            if folder_name not in folders:
                folders[folder_name] = await root.add_object(
                    node_id(f"{ROOT}.{folder_name}", self.idx), ua.QualifiedName(folder_name, self.idx)
                )
            await self._add(var, var.kind, folders[folder_name])
        self.last = {var.signal: 0.0 for var in VARIABLES if var.signal}

    def _revise_sampling(self) -> None:
        """Answer every monitored item with the interval the simulator really samples at.

        asyncua's server revises a sampling interval to the subscription's publishing interval
        but reports every write; this PLC writes each process value once per tick, so the tick is
        the honest revision, whatever was asked (as a PLC with a fixed scan cycle answers).
        """
        service = self.server.iserver.subscription_service
        create = service.create_monitored_items
        sampling_ms = self.sampling_ms

        async def revised(params: ua.CreateMonitoredItemsParameters) -> list[ua.MonitoredItemCreateResult]:
            results = await create(params)
            for result in results:
                result.RevisedSamplingInterval = sampling_ms
            return results

        service.create_monitored_items = revised  # type: ignore[method-assign]

    async def _validate_client(self, cert: x509.Certificate, app: ua.ApplicationDescription) -> None:
        del app
        assert self.trusted_clients is not None
        der = cert.public_bytes(serialization.Encoding.DER)
        for path in self.trusted_clients.glob("*.der"):
            if path.read_bytes() == der:
                return
        raise ServiceError(StatusCodes.BadCertificateUntrusted)

    async def _add(self, var: SimVar, kind: str, parent: Node | None = None) -> Node:
        if parent is None:
            parent = self.server.get_node(node_id(f"{ROOT}.{var.path.rpartition('/')[0]}", self.idx))
        vtype, convert = _TYPES[kind]
        initial: Any = "SN-PLC-0001" if var.path == "Info/SerialNumber" else convert(0.0)
        gen = self.generation.get(var.path, 0)
        node = await parent.add_variable(
            node_id(f"{var.node_text}.v{gen}" if gen else var.node_text, self.idx),
            ua.QualifiedName(var.path.rpartition("/")[2], self.idx),
            ua.Variant(initial, vtype),
        )
        if var.unit is not None and var.unece is not None:
            eu = ua.EUInformation(
                NamespaceUri=_UNECE_NS,
                UnitId=unece_id(var.unece),
                DisplayName=ua.LocalizedText(var.unit),
                Description=ua.LocalizedText(var.unit),
            )
            await node.add_property(0, "EngineeringUnits", eu)
            await node.add_property(0, "EURange", ua.Range(var.lo, var.hi))
        self.nodes[var.path] = node
        self.types[var.path] = kind
        return node

    async def remove(self, name: str) -> str:
        """Delete a variable node."""
        var = find_var(name, self.extra_vars)
        node = self.nodes.pop(var.path, None)
        if node is None:
            raise ValueError(f"{var.path} is already removed")
        await self.server.delete_nodes([node], recursive=True)
        return var.path

    async def add(self, name: str, kind: str | None = None) -> str:
        """Put a removed variable back (optionally with another data type)."""
        var = find_var(name, self.extra_vars)
        if var.path in self.nodes:
            raise ValueError(f"{var.path} is already there")
        await self._add(var, kind or var.kind)
        return var.path

    async def recreate(self, name: str) -> str:
        """Delete a variable and add it again under a new NodeId (same browse name and type)."""
        var = find_var(name, self.extra_vars)
        kind = self.types.get(var.path, var.kind)
        if var.path in self.nodes:
            await self.remove(var.path)
        self.generation[var.path] = self.generation.get(var.path, 0) + 1
        await self._add(var, kind)
        return var.path

    async def retype(self, name: str, kind: str) -> str:
        """Replace a variable by one of another data type (same NodeId)."""
        if kind not in _TYPES:
            raise ValueError(f"unknown type {kind!r}: use one of {', '.join(_TYPES)}")
        var = find_var(name, self.extra_vars)
        if var.path in self.nodes:
            await self.remove(var.path)
        await self.add(var.path, kind)
        return f"{var.path} {kind}"

    async def _write(self, path: str, value: float, status: int, src: dt.datetime, now: dt.datetime) -> None:
        node = self.nodes.get(path)
        if node is None:
            return
        vtype, convert = _TYPES[self.types[path]]
        if status & 0x80000000:
            variant = ua.Variant(None, ua.VariantType.Null)
        else:
            variant = ua.Variant(convert(value), vtype)
        dv = ua.DataValue(
            variant, status_code(status), SourceTimestamp=ua_time(src), ServerTimestamp=ua_time(now)
        )
        await self.server.write_attribute_value(node.nodeid, dv)

    async def run_process(self, source: ModelSource | SkabSource) -> None:
        """Write process values on the sample grid until cancelled."""
        self.t0_mono = time.monotonic()
        t0_wall = time.time()
        done = 0.0
        tick = 1.0 / self.rate_hz
        k = 0
        while True:
            k += 1
            late = time.monotonic() - (self.t0_mono + k * tick)
            if late > tick:
                # Behind (a saturated server): skip the missed ticks rather than write in a burst
                # that never yields, which would starve the server's own network handling.
                k += int(late / tick)
            await asyncio.sleep(max(0.0, self.t0_mono + k * tick - time.monotonic()))
            now_s = time.monotonic() - self.t0_mono
            rows = source.values(done, now_s)
            done = now_s
            now = dt.datetime.now(dt.UTC)
            for t, values, anomaly in rows:
                src = dt.datetime.fromtimestamp(t0_wall + t, dt.UTC)
                await self._write_row(t, values, anomaly, src, now)
            if self.extra and self.extra_every and k % self.extra_every == 0:
                for var in self.extra_vars:
                    await self._write(var.path, float(k), 0, now, now)

    async def _write_row(
        self, t: float, values: dict[str, float], anomaly: bool, src: dt.datetime, now: dt.datetime
    ) -> None:
        stale = self.faults.on(self.faults.stale, t)
        sensor_off = self.faults.on(self.faults.sensor_off, t)
        for var in VARIABLES:
            if var.signal is None:
                continue
            value = values.get(var.signal, math.nan)
            if stale:
                await self._write(
                    var.path, self.last[var.signal], StatusCodes.UncertainLastUsableValue, src, now
                )
                continue
            off = sensor_off and var.signal in _VIBRATION
            status = StatusCodes.BadSensorFailure if off or not math.isfinite(value) else StatusCodes.Good
            step = self.quantize.get(var.path)
            if step is not None and math.isfinite(value):
                value = round(value / step) * step
            if status == StatusCodes.Good:
                self.last[var.signal] = value
            await self._write(var.path, value, status, src, now)
        await self._write("Status/Running", 1.0, 0, src, now)
        await self._write("Status/AnomalyLabel", 1.0 if anomaly else 0.0, 0, src, now)

    def fault(
        self, source: ModelSource | SkabSource, kind: str, duration_s: float, at_s: float | None = None
    ) -> str:
        """Start a fault now (or at ``at_s`` seconds of sim time)."""
        start = time.monotonic() - self.t0_mono if at_s is None else at_s
        if kind == "sensor_off":
            self.faults.sensor_off.append((start, start + duration_s))
        elif kind == "stale":
            self.faults.stale.append((start, start + duration_s))
        elif kind in ("valve_fault", "bearing_wear"):
            source.add_event(kind, start, duration_s)
        else:
            raise ValueError(f"unknown fault {kind!r}: valve_fault, bearing_wear, sensor_off or stale")
        return f"{kind} {duration_s:g}"

    def status(self) -> str:
        """Current process values, one line."""
        return " ".join(f"{k.rpartition('/')[2]}={v:.3f}" for k, v in self.last.items())


async def _command(sim: PlcSim, source: ModelSource | SkabSource, line: str) -> str:
    parts = line.split()
    if not parts:
        return ""
    cmd, args = parts[0].lower(), parts[1:]
    try:
        if cmd == "remove" and len(args) == 1:
            return f"OK remove {await sim.remove(args[0])}"
        if cmd == "add" and len(args) == 1:
            return f"OK add {await sim.add(args[0])}"
        if cmd == "recreate" and len(args) == 1:
            return f"OK recreate {await sim.recreate(args[0])}"
        if cmd == "retype" and len(args) == 2:
            return f"OK retype {await sim.retype(args[0], args[1].lower())}"
        if cmd == "fault" and len(args) == 2:
            return f"OK fault {sim.fault(source, args[0], float(args[1]))}"
        if cmd == "status":
            return f"OK status {sim.status()}"
    except (KeyError, ValueError, UaError) as exc:
        return f"ERR {cmd}: {exc}"
    return f"ERR unknown command {line.strip()!r}: remove|add|recreate|retype|fault|status|quit"


def _read_stdin(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[str | None]) -> None:
    # A daemon thread, not the loop's executor: a blocked readline must not hold the exit.
    for line in sys.stdin:
        loop.call_soon_threadsafe(queue.put_nowait, line)
    loop.call_soon_threadsafe(queue.put_nowait, None)


async def serve(
    sim: PlcSim,
    source: ModelSource | SkabSource,
    *,
    control: str,
    out: IO[str],
    start_with: Sequence[str] = (),
) -> None:
    """Run the simulator until ``quit``, end of input (with stdin control) or a signal."""
    await sim.setup()
    for command in start_with:
        # Applied before listening, so a restarted PLC comes back already changed.
        answer = await _command(sim, source, command)
        if not answer.startswith("OK"):
            raise ValueError(f"--start-with {command!r}: {answer}")
    await sim.server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY {sim.endpoint}", file=out, flush=True)
    queue: asyncio.Queue[str | None] = asyncio.Queue()
    if control == "stdin":
        threading.Thread(target=_read_stdin, args=(loop, queue), name="plcsim:stdin", daemon=True).start()
    try:
        async with asyncio.TaskGroup() as tg:
            process = tg.create_task(sim.run_process(source), name="plcsim:process")
            stopper = tg.create_task(stop.wait(), name="plcsim:stop")
            while not stop.is_set():
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    break
                line = getter.result()
                if line is None or line.strip().lower() == "quit":
                    break
                reply = await _command(sim, source, line)
                if reply:
                    print(reply, file=out, flush=True)
            process.cancel()
            stopper.cancel()
    finally:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(3.0):
                await asyncio.shield(sim.server.stop())


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The simulator's command-line options (shared with ``edgetwin sim plc``)."""
    p = parser or argparse.ArgumentParser(prog="plcsim", description="OPC UA PLC simulator (pump/motor)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback)")
    p.add_argument("--port", type=int, default=4840, help="TCP port to serve OPC UA on (loopback)")
    p.add_argument("--rate-hz", type=float, default=10.0, help="process value updates per second")
    p.add_argument("--seed", type=int, default=1, help="random seed of the simulated process")
    p.add_argument("--skab", type=Path, default=None, help="replay this SKAB CSV instead of the model")
    p.add_argument("--speed", type=float, default=1.0, help="SKAB rows per second")
    p.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="KIND:AT_S:DURATION_S",
        help="inject a fault (valve_fault, bearing_wear, sensor_off, stale) at a time; repeatable",
    )
    p.add_argument("--pki", type=Path, default=None, help="server certificate folder (created if missing)")
    p.add_argument(
        "--policies",
        default=None,
        help="comma list of None, Basic256Sha256, Aes128_Sha256_RsaOaep, Aes256_Sha256_RsaPss",
    )
    p.add_argument("--users", type=Path, default=None, help="file of user:password lines; anonymous refused")
    p.add_argument(
        "--trusted-clients", type=Path, default=None, help="accept only client certificates in here"
    )
    p.add_argument("--extra", type=int, default=0, help="add this many Bench/ItemNNNN variables (benchmarks)")
    p.add_argument(
        "--extra-every",
        type=int,
        default=1,
        metavar="TICKS",
        help="the Bench variables change every TICKS ticks (default 1; 0: never, quiet tags)",
    )
    p.add_argument(
        "--quantize",
        action="append",
        default=[],
        metavar="VAR:STEP",
        help='write a variable rounded to STEP (e.g. "Flow:4"): a tag that holds its value; repeatable',
    )
    p.add_argument(
        "--namespaces-before",
        type=int,
        default=0,
        metavar="N",
        help="register N other namespaces first, so the simulator's own gets another index (default 0)",
    )
    p.add_argument(
        "--start-with",
        action="append",
        default=[],
        metavar="COMMAND",
        help='a control command applied before listening, e.g. "recreate Pressure"; repeatable',
    )
    p.add_argument(
        "--control",
        choices=["stdin", "none"],
        default="stdin",
        help="read fault commands from stdin, or run unattended",
    )
    p.add_argument("--log-level", default="warning", help="the simulator's log level")
    return p


def sim_from_args(
    args: argparse.Namespace,
) -> tuple[PlcSim, ModelSource | SkabSource, list[tuple[str, float, float]]]:
    """A simulator, its value source and the scheduled faults from parsed options."""
    if args.policies is None:
        policies = list(POLICY_TYPES) if args.pki else ["None"]
    else:
        policies = [p.strip() for p in args.policies.split(",") if p.strip()]
        unknown = [p for p in policies if p not in POLICY_TYPES]
        if unknown:
            raise ValueError(f"unknown policies {unknown}: use {', '.join(POLICY_TYPES)}")
    if any(p != "None" for p in policies) and args.pki is None:
        raise ValueError("secure policies need --pki DIR for the server certificate")
    users = None
    if args.users is not None:
        users = {}
        for line in args.users.read_text(encoding="utf-8").splitlines():
            name, sep, pwd = line.strip().partition(":")
            if sep:
                users[name] = pwd
    quantize: dict[str, float] = {}
    for spec in args.quantize:
        name, _, step_text = spec.rpartition(":")
        try:
            var, step = find_var(name), float(step_text)
        except (KeyError, ValueError) as exc:
            raise ValueError(f"--quantize {spec!r}: expected VAR:STEP with a known variable: {exc}") from exc
        if var.signal is None or not step > 0:
            raise ValueError(f"--quantize {spec!r}: a process variable and a step > 0")
        quantize[var.path] = step
    sim = PlcSim(
        host=args.host,
        port=args.port,
        rate_hz=args.rate_hz,
        seed=args.seed,
        skab=args.skab,
        speed=args.speed,
        pki=args.pki,
        policies=policies,
        users=users,
        trusted_clients=args.trusted_clients,
        extra=args.extra,
        extra_every=max(0, args.extra_every),
        quantize=quantize,
        namespaces_before=max(0, args.namespaces_before),
    )
    source: ModelSource | SkabSource = (
        SkabSource(args.skab, args.speed) if args.skab else ModelSource(args.seed, args.rate_hz)
    )
    faults = []
    for spec in args.fault:
        kind, _, rest = spec.partition(":")
        at_text, _, dur_text = rest.partition(":")
        faults.append((kind, float(at_text), float(dur_text)))
    return sim, source, faults


async def _main_async(args: argparse.Namespace) -> int:
    sim, source, faults = sim_from_args(args)
    for kind, at_s, duration_s in faults:
        sim.fault(source, kind, duration_s, at_s)
    await serve(sim, source, control=args.control, out=sys.stdout, start_with=args.start_with)
    return 0


def run(args: argparse.Namespace) -> int:
    """Entry point of ``edgetwin sim plc`` and ``python -m drivers.opcua.plcsim``."""
    # asyncua's server forgets to await a coroutine when a monitored node is deleted (the
    # "remove" command); the warning says nothing about the simulation.
    warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # The simulator runs without certificates or users by default; asyncua warns about that at
    # every start, which is noise here.
    logging.getLogger("asyncua").setLevel(logging.DEBUG if args.log_level == "debug" else logging.CRITICAL)
    try:
        return asyncio.run(_main_async(args))
    except (ValueError, OSError) as exc:
        print(f"plcsim: {exc}", file=sys.stderr)  # noqa: T201 - the simulator's own command line
        return 2


# -- running it as a child process (tests, the demo) ----------------------------------------------


class PlcSimProcess:
    """A simulator in a child process: start, wait until it listens, send commands, kill, restart."""

    def __init__(self, port: int, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = port
        self.args = list(args)
        self.env = env
        self.proc: subprocess.Popen[str] | None = None

    @property
    def endpoint(self) -> str:
        """The URL the simulator listens on."""
        return f"opc.tcp://127.0.0.1:{self.port}/"

    def start(self, timeout_s: float = 60.0) -> None:
        """Start the child and wait for its READY line; a child that does not get there is stopped."""
        cmd = [sys.executable, "-m", "drivers.opcua.plcsim", "--port", str(self.port), *self.args]
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONPATH", str(Path(__file__).resolve().parents[2]))
        self.proc = subprocess.Popen(  # noqa: S603 - our own module, fixed argv
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, bufsize=1
        )
        # Generous: importing asyncua and building the address space is seconds of CPU, which a
        # loaded two-core machine stretches to tens of seconds of wall time.
        try:
            self.expect("READY", timeout_s)
        except BaseException:
            self.stop()  # no child left running behind a failed start
            raise

    def expect(self, prefix: str, timeout_s: float = 10.0) -> str:
        """Read output lines until one starts with ``prefix``; raise on timeout or exit."""
        assert self.proc is not None
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        for line in self._lines(deadline):
            if line.startswith(prefix):
                return line
            if line.startswith("ERR"):
                raise RuntimeError(f"plcsim: {line}")
        raise TimeoutError(f"plcsim on port {self.port}: no {prefix!r} line within {timeout_s:g} s")

    def _lines(self, deadline: float) -> Iterator[str]:
        import selectors  # noqa: PLC0415 - only the child-process helper needs it

        assert self.proc is not None
        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        try:
            while time.monotonic() < deadline:
                if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                    continue
                line = self.proc.stdout.readline()
                if not line:
                    return
                yield line.strip()
        finally:
            sel.close()

    def command(self, line: str, timeout_s: float = 10.0) -> str:
        """Send one control command and return its OK line."""
        assert self.proc is not None
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.expect("OK", timeout_s)

    def kill(self) -> None:
        """SIGKILL the child (a power cut, as far as clients can tell) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._close()

    def stop(self) -> None:
        """Stop the child politely (SIGTERM), killing it if it does not go."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._close()

    def _close(self) -> None:
        if self.proc is not None:
            for stream in (self.proc.stdin, self.proc.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()

    def __enter__(self) -> PlcSimProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m drivers.opcua.plcsim``."""
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
