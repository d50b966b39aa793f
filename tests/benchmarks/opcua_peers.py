"""OPC UA subscribe -> MQTT: edgetwin against its peers on a node-opcua server (bench_peers.py).

A node-opcua server (its own process, a fresh one per subject) offers N items changing every P ms;
one after another, each subject subscribes to all of them in a process of its own pinned to one
CPU (``--quota``: under the Pi profile's CPU quota too):

* **bare asyncua client**: the handler API, counting (the library's floor, nothing forwarded);
* **edgetwin**: the real ``edgetwin run`` with the OPC UA driver, windows, features, the models
  the config names and the MQTT uplink (TLS, QoS 1, outbox) to a local mosquitto;
* **plain asyncua -> paho bridge**: one JSON message per change, QoS 1, TLS;
* **Node-RED** with node-red-contrib-opcua: a flow that subscribes to the items (the node's
  "multiple" subscribe), counts each change and forwards it to the same broker (mqtt out, QoS 1,
  TLS), as shipped.

The server, the broker and this process share the other CPU.  Each subject's figures come from
outside it: changes/s from its own counter (edgetwin: ``edgetwin_samples_total`` on /metrics), CPU
and RSS from /proc, bytes on the wire from the kernel's count of what the subject's sockets sent to
the broker (``ss``: TLS records as TCP payload, no relay in between), time to first record from the
subject's start to the first message a subscriber on the broker receives from it.  Node-RED, node-red-contrib-opcua and node-opcua are
installed from ``peers/package-lock.json`` into a cache folder on first use (``npm ci``); where
node, npm or the registry is not at hand the Node.js peers are skipped with the reason.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pi_profile

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from gateway.uplink.broker import MosquittoBroker, free_port  # noqa: E402

PEERS = Path(__file__).resolve().parent / "peers"
EDGETWIN = Path(sys.executable).with_name("edgetwin")
#: The pump anomaly model on eight of the bench items (its inputs by name), so edgetwin scores windows.
_PUMP_INPUTS = ("Accelerometer1RMS", "Accelerometer2RMS", "Current", "Pressure", "Temperature", "Thermocouple",
                "Voltage", "RateRMS")  # fmt: skip
PUMP_MODEL = (
    '{ name = "pump_skab", inputs = { '
    + ", ".join(f'{m} = "Pump1/Bench/Item{i:04d}"' for i, m in enumerate(_PUMP_INPUTS))
    + " } }"
)
WARMUP_S = 5.0  # after the first change: subscriptions settled, start-up spent


def cache_root() -> Path:
    """Where the npm peers are installed (``$XDG_CACHE_HOME/edgetwin/bench-peers``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgetwin" / "bench-peers"


def npm_peers(log: Callable[[str], None] = print) -> tuple[Path | None, str]:
    """The folder holding the pinned npm peers, installed there on first use; (None, why) when not."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        return None, "bench peers npm: node or npm not found: install them (apt-get install nodejs npm)"
    lock = PEERS / "package-lock.json"
    dest = cache_root() / hashlib.sha256(lock.read_bytes()).hexdigest()[:16]
    stamp = dest / ".installed"
    if stamp.exists():
        return dest, ""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(PEERS / "package.json", dest / "package.json")
    shutil.copy(lock, dest / "package-lock.json")
    log(f"installing node-opcua, Node-RED and node-red-contrib-opcua into {dest} (npm ci, once)")
    try:
        done = subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=dest,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return None, f"bench peers npm ci in {dest}: did not finish in 15 min: retry, or check the registry"
    if done.returncode != 0:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        return None, f"bench peers npm ci in {dest}: failed: {tail}: check that the npm registry is reachable"
    stamp.write_text("ok\n")
    return dest, ""


def npm_version(modules: Path, package: str) -> str:
    """The installed version of an npm package."""
    meta = json.loads((modules / "node_modules" / package / "package.json").read_text())
    return str(meta["version"])


def prom_total(text: str, name: str) -> float:
    """The sum of every series of counter ``name`` in a Prometheus text exposition."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def nodered_flow(endpoint: str, node_ids: list[str], interval_ms: int, mqtt: dict[str, Any]) -> list[Any]:
    """A Node-RED flow: subscribe to ``node_ids``, count every change, forward it to MQTT (QoS 1, TLS)."""
    tab = "bench-tab"
    return [
        {"id": tab, "type": "tab", "label": "bench"},
        {"id": "bench-ep", "type": "OpcUa-Endpoint", "endpoint": endpoint, "secpol": "None",
         "secmode": "None", "none": True, "login": False, "usercert": False},
        {"id": "bench-inject", "type": "inject", "z": tab, "once": True, "onceDelay": 0.1,
         "props": [{"p": "payload"}, {"p": "topic", "vt": "str"}], "topic": "multiple",
         "payload": json.dumps([{"nodeId": n} for n in node_ids]), "payloadType": "json",
         "repeat": "", "crontab": "", "wires": [["bench-client"]]},
        {"id": "bench-client", "type": "OpcUa-Client", "z": tab, "endpoint": "bench-ep",
         "action": "subscribe", "time": str(interval_ms), "timeUnit": "ms", "certificate": "n",
         "securitymode": "None", "securitypolicy": "None", "setstatusandtime": False,
         "keepsessionalive": False, "wires": [["bench-count"], [], []]},
        {"id": "bench-count", "type": "function", "z": tab, "outputs": 1,
         "func": "if (msg.topic === 'subscriptionId') { return null; }\n"
                 "global.set('n', (global.get('n') || 0) + 1);\nreturn msg;",
         "wires": [["bench-mqtt"]]},
        {"id": "bench-mqtt", "type": "mqtt out", "z": tab, "broker": "bench-broker", "topic": "",
         "qos": "1", "retain": "false", "wires": []},
        {"id": "bench-broker", "type": "mqtt-broker", "broker": mqtt["host"], "port": str(mqtt["port"]),
         "clientid": "bench-nodered", "usetls": True, "tls": "bench-tls", "protocolVersion": "4",
         "keepalive": "60", "cleansession": True, "autoConnect": True},
        {"id": "bench-tls", "type": "tls-config", "cert": mqtt["cert"], "key": mqtt["key"],
         "ca": mqtt["ca"], "verifyservercert": True},
        {"id": "bench-http", "type": "http in", "z": tab, "url": "/bench-count", "method": "get",
         "wires": [["bench-read"]]},
        {"id": "bench-read", "type": "function", "z": tab, "outputs": 1,
         "func": "msg.payload = {n: global.get('n') || 0};\nreturn msg;", "wires": [["bench-reply"]]},
        {"id": "bench-reply", "type": "http response", "z": tab, "wires": []},
    ]  # fmt: skip


class FirstMessage:
    """A subscriber on the broker: when the first record of the running subject arrived."""

    def __init__(self, host: str, port: int, ca: str, cert: str, key: str) -> None:
        import paho.mqtt.client as paho  # noqa: PLC0415
        from paho.mqtt.enums import CallbackAPIVersion  # noqa: PLC0415

        self.at: float | None = None
        self.topic = ""
        self._armed = False
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-first")
        self._client.tls_set(ca_certs=ca, certfile=cert, keyfile=key)
        self._client.on_message = self._on_message
        self._client.connect(host, port)
        self._client.loop_start()

    def arm(self) -> None:
        """Wait for the next subject's first record."""
        self.at = None
        self._armed = True
        self._client.subscribe("#", qos=0)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        # Status (birth/will) and diagnostics are not data: the first record carries measurements.
        if self._armed and not msg.topic.endswith("/status") and "/diag/" not in msg.topic:
            self.at = time.monotonic()
            self.topic = msg.topic
            self._armed = False
            client.unsubscribe("#")

    def close(self) -> None:
        """Disconnect."""
        self._client.loop_stop()
        self._client.disconnect()


def wire_sent(pid: int, port: int) -> int:
    """Bytes process ``pid`` has sent to TCP ``port`` on its open connections (the kernel's tcp_info)."""
    out = subprocess.run(
        ["ss", "-tnpiH", "state", "established", "dport", "=", f":{port}"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return sum_sent(out, pid)


def sum_sent(ss_output: str, pid: int) -> int:
    """The ``bytes_sent`` of every socket of ``pid`` in ``ss -tnpi`` output (socket line, then info line)."""
    total = 0
    owned = False
    for line in ss_output.splitlines():
        if not line[:1].isspace():
            owned = f"pid={pid}," in line
        elif owned and (m := re.search(r"\bbytes_sent:(\d+)", line)):
            total += int(m.group(1))
    return total


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mb(pid: int) -> tuple[float, float]:
    """(RSS, peak RSS) in MB."""
    rss = peak = 0.0
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
    return rss, peak


class LineCounter:
    """The latest ``count <n>`` (or ``offered <n>``) a child prints, read on a thread."""

    def __init__(self, stream: IO[str], word: str) -> None:
        self.value = 0.0
        self.acked = 0.0  # the bridge's ``acked <n>``
        self.lines: list[str] = []
        self._word = word
        threading.Thread(target=self._read, args=(stream,), name=f"bench:{word}", daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            parts = line.split()
            if parts[:1] == [self._word] and len(parts) >= 2:
                self.value = float(parts[1])
                if "acked" in parts[:-1]:
                    self.acked = float(parts[parts.index("acked") + 1])
            elif len(self.lines) < 50:
                self.lines.append(line.rstrip())


@dataclass
class Result:
    """One subject's figures over the measured window."""

    name: str
    version: str
    rate: float = 0.0  # changes/s taken in
    offered: float = 0.0  # changes/s the server made in the same window
    cpu_us: float = 0.0  # CPU per change taken in
    rss_mb: float = 0.0
    peak_mb: float = 0.0
    at_s: float = 0.0  # when RSS was read, from the subject's start
    wire_kb_s: float | None = None  # bytes sent to the broker
    first_record_s: float | None = None
    note: str = ""
    skipped: str = ""
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class Subject:
    """How to start one subject and read its count."""

    name: str
    version: str
    argv: list[str]
    count: Callable[[subprocess.Popen[str]], float]
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    wire: bool = True
    stdout_count: bool = False  # it prints its count; others' output goes to the log (no pipe fills)
    acked: Callable[[subprocess.Popen[str]], float] | None = None  # messages the broker acknowledged


class Server:
    """The node-opcua server process."""

    def __init__(
        self, modules: Path, port: int, items: int, period_ms: float, workdir: Path, cpu: int | None
    ):
        self.items = items
        script = modules / "opcua_server.js"
        shutil.copy(PEERS / "opcua_server.js", script)
        self.proc = subprocess.Popen(
            ["node", str(script), str(port), str(items), f"{period_ms:g}", str(workdir)],
            cwd=modules,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            # The child only sets its own affinity before exec: no lock of this process is touched.
            preexec_fn=(lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None,  # noqa: PLW1509
        )
        assert self.proc.stdout is not None
        self.namespace = -1
        self.endpoint = ""
        deadline = time.monotonic() + 120
        seen: list[str] = []
        while time.monotonic() < deadline and not self.endpoint:
            line = self.proc.stdout.readline()
            if not line:
                break
            seen.append(line.rstrip())
            if line.startswith("namespace "):
                self.namespace = int(line.split()[1])
            elif line.startswith("listening "):
                self.endpoint = line.split()[1]
        if not self.endpoint:
            self.stop()
            raise RuntimeError("bench peers: node-opcua server did not listen: " + " | ".join(seen[-5:]))
        self.offered = LineCounter(self.proc.stdout, "offered")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL."""
        _stop(self.proc)


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_for(what: str, cond: Callable[[], bool], timeout_s: float, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if proc.poll() is not None:
            raise RuntimeError(f"bench peers: {what}: the process ended with code {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"bench peers: {what}: not within {timeout_s:.0f} s")
        time.sleep(0.2)


def _steady(subject: Subject, proc: subprocess.Popen[str], timeout_s: float = 60.0) -> None:
    """Until two successive 1 s rates agree within 10 % (every item subscribed), at most ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last, rates = subject.count(proc), [0.0]
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(1.0)
        now = subject.count(proc)
        rates.append(now - last)
        last = now
        if rates[-2] > 0 and abs(rates[-1] - rates[-2]) <= 0.1 * rates[-2]:
            return


def measure(
    subject: Subject,
    server: Server,
    seconds: float,
    cpu: int,
    broker_port: int,
    first: FirstMessage | None,
    log_file: Path,
    procs: Path | None = None,
) -> Result:
    """Run one subject against the server: rate, CPU per change, RSS, bytes sent, first record.

    ``procs``: a cgroup's procs file the subject enters (the Pi profile's CPU quota).
    """

    def enter() -> None:
        os.sched_setaffinity(0, {cpu})
        if procs is not None:
            procs.write_text(f"{os.getpid()}\n")

    if first is not None:
        first.arm()
    t_start = time.monotonic()
    with log_file.open("w") as err:
        proc = subprocess.Popen(
            subject.argv,
            stdout=subprocess.PIPE if subject.stdout_count else err,
            stderr=err,
            text=True,
            cwd=subject.cwd,
            env={**os.environ, **subject.env},
            preexec_fn=enter,  # noqa: PLW1509 - affinity and a cgroup write before exec, no locks
        )
    try:
        _wait_for(f"{subject.name}: first change", lambda: subject.count(proc) > 0, 120, proc)
        _steady(subject, proc)
        time.sleep(WARMUP_S)
        a0 = subject.acked(proc) if subject.acked else 0.0
        c0, p0, t0 = subject.count(proc), _cpu_s(proc.pid), time.monotonic()
        o0, s0 = server.offered.value, wire_sent(proc.pid, broker_port)
        time.sleep(seconds)
        c1, p1, t1 = subject.count(proc), _cpu_s(proc.pid), time.monotonic()
        a1 = subject.acked(proc) if subject.acked else 0.0
        o1, s1 = server.offered.value, wire_sent(proc.pid, broker_port)
        rss, peak = _rss_mb(proc.pid)
        if first is not None and subject.wire:
            # A window-based record may come later than the changes: give it the run's length.
            with contextlib.suppress(RuntimeError):
                _wait_for(f"{subject.name}: first record", lambda: first.at is not None, seconds, proc)
    finally:
        _stop(proc)
    n = max(1.0, c1 - c0)
    return Result(
        subject.name,
        subject.version,
        rate=(c1 - c0) / (t1 - t0),
        offered=(o1 - o0) / (t1 - t0),
        cpu_us=(p1 - p0) / n * 1e6,
        rss_mb=rss,
        peak_mb=peak,
        at_s=t1 - t_start,
        wire_kb_s=(s1 - s0) / (t1 - t0) / 1024 if subject.wire else None,
        first_record_s=(first.at - t_start)
        if first is not None and first.at is not None and subject.wire
        else None,
        extra={"acked_per_s": (a1 - a0) / (t1 - t0)} if subject.acked else {},
        note=f"first topic {first.topic}"
        if first is not None and first.at is not None and subject.wire
        else "",
    )


def _child_count(proc: subprocess.Popen[str], counters: dict[int, LineCounter]) -> float:
    if proc.pid not in counters:
        assert proc.stdout is not None
        counters[proc.pid] = LineCounter(proc.stdout, "count")
    return counters[proc.pid].value


def _http_count(url: str, read: Callable[[str], float]) -> Callable[[subprocess.Popen[str]], float]:
    def count(proc: subprocess.Popen[str]) -> float:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return read(resp.read().decode())
        except OSError:
            return 0.0

    return count


def edgetwin_config(
    tmp: Path, endpoint: str, items: int, hz: float, mqtt: dict[str, Any], http_port: int, models: str
) -> Path:
    """``edgetwin run``'s config: one OPC UA source of ``items`` nodes, the MQTT uplink, /metrics."""
    lines = [
        "[gateway]", 'name = "bench-peers"', f'state_dir = "{tmp / "state"}"',
        "[pipeline]", "window_s = 10.0", "hop_s = 5.0", "grace_s = 1.0",
        "[uplink]", 'kind = "mqtt"',
        "[uplink.mqtt]", f'host = "{mqtt["host"]}"', f"port = {mqtt['port']}",
        f'ca_file = "{mqtt["ca"]}"', f'cert_file = "{mqtt["cert"]}"', f'key_file = "{mqtt["key"]}"',
        "[models]", f"use = [{models}]",
        "[status]", f'http = "127.0.0.1:{http_port}"',
        "[runtime]", "drain_deadline_s = 5.0",
        "[[sources]]", 'name = "plc"', 'driver = "opcua"', 'subject = "line/plc-1"', 'kind = "industrial"',
        f'endpoint = "{endpoint}"', 'security_policy = "None"', 'security_mode = "None"',
        "publishing_interval_ms = 50.0", "sampling_interval_ms = 0.0", "queue_size = 10",
        'namespace_uri = "urn:edgetwin:plcsim"', "nodes = [",
        *(f'  {{ browse_path = "Pump1/Bench/Item{i:04d}", rate_hz = {hz:g} }},' for i in range(items)),
        "]",
    ]  # fmt: skip
    (tmp / "state").mkdir(parents=True, exist_ok=True)
    path = tmp / "gateway.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@contextlib.contextmanager
def _broker(tmp: Path) -> Iterator[tuple[dict[str, Any], Any]]:
    from gateway.uplink.certs import demo_pki  # noqa: PLC0415

    pki = demo_pki(tmp / "pki")
    broker = MosquittoBroker(tmp / "broker", pki)
    broker.start()
    try:
        yield (
            {
                "host": broker.host,
                "port": broker.port,
                "ca": str(pki.ca_file),
                "cert": str(pki.gateway.cert),
                "key": str(pki.gateway.key),
                "twin_cert": str(pki.twin.cert),
                "twin_key": str(pki.twin.key),
            },
            broker,
        )
    finally:
        broker.stop()


def run(
    tmp: Path,
    items: int,
    period_ms: float,
    seconds: float,
    models: str,
    only: set[str] | None = None,
    quota: float | None = None,
) -> tuple[list[Result], str]:
    """Every subject one after another against one node-opcua server; (results, the server's version).

    ``quota``: each subject runs under the Pi profile's CPU quota (that share of its one CPU).
    """
    cpus = sorted(os.sched_getaffinity(0))
    cpu, other = cpus[0], (cpus[-1] if len(cpus) > 1 else None)
    if other is not None:
        os.sched_setaffinity(0, {other})  # this process beside the server and broker, off the subjects' CPU
    modules, why = npm_peers()
    if modules is None:
        print(f"skipped: {why}", flush=True)
        return [Result("node-opcua server", "", skipped=why)], "no server"
    hz = 1000.0 / period_ms
    port = free_port()

    def serve() -> Server:
        return Server(modules, port, items, period_ms, tmp / "server", other)

    probe = serve()  # the endpoint and the namespace index, the same in every fresh server
    endpoint, namespace = probe.endpoint, probe.namespace
    probe.stop()
    counters: dict[int, LineCounter] = {}
    import asyncua  # noqa: PLC0415
    import paho.mqtt  # noqa: PLC0415

    with _broker(tmp) as (mqtt, _):
        first = FirstMessage(mqtt["host"], mqtt["port"], mqtt["ca"], mqtt["twin_cert"], mqtt["twin_key"])
        py = [sys.executable, str(PEERS / "ua_client.py")]
        http_port = free_port()
        subjects = [
            Subject("bare asyncua client", f"asyncua {asyncua.__version__}",
                    [*py, "count", endpoint, str(items)], lambda p: _child_count(p, counters), wire=False,
                    stdout_count=True),
            Subject("edgetwin", f"edgetwin run, asyncua {asyncua.__version__}",
                    [str(EDGETWIN), "run", "--config",
                     str(edgetwin_config(tmp / "gw", endpoint, items, hz, mqtt, http_port, models))],
                    _http_count(f"http://127.0.0.1:{http_port}/metrics",
                                lambda t: prom_total(t, "edgetwin_samples_total"))),
            Subject("asyncua -> paho bridge",
                    f"asyncua {asyncua.__version__}, paho-mqtt {paho.mqtt.__version__}",
                    [*py, "bridge", endpoint, str(items), mqtt["host"], str(mqtt["port"]),
                     mqtt["ca"], mqtt["cert"], mqtt["key"]],
                    lambda p: _child_count(p, counters), stdout_count=True,
                    acked=lambda p: counters[p.pid].acked if p.pid in counters else 0.0),
        ]  # fmt: skip
        red_port = free_port()
        user_dir = tmp / "nodered"
        user_dir.mkdir()
        ids = [f"ns={namespace};s=Pump1.Bench.Item{i:04d}" for i in range(items)]
        (user_dir / "flows.json").write_text(json.dumps(nodered_flow(endpoint, ids, 50, mqtt)))
        # Node-RED finds the contrib node in its userDir's node_modules: link the cached install.
        (user_dir / "node_modules").symlink_to(modules / "node_modules")
        (user_dir / "package.json").write_text(
            json.dumps({"name": "bench-nodered", "dependencies": {"node-red-contrib-opcua": "*"}})
        )
        red = (
            f"Node-RED {npm_version(modules, 'node-red')}, node-red-contrib-opcua "
            f"{npm_version(modules, 'node-red-contrib-opcua')}, node {_node_version()}"
        )
        red_argv = ["node", str(modules / "node_modules" / "node-red" / "red.js"), "--userDir", str(user_dir),
                    "--port", str(red_port), "flows.json"]  # fmt: skip
        red_count = _http_count(
            f"http://127.0.0.1:{red_port}/bench-count", lambda t: float(json.loads(t)["n"])
        )
        subjects.append(Subject("Node-RED + node-red-contrib-opcua", red, red_argv, red_count))
        lift = {
            "NODE_OPTIONS": f"--require {PEERS / 'lift_cap.js'}",
            "EDGETWIN_BENCH_MODULES": str(modules / "node_modules"),
        }
        subjects.append(Subject("Node-RED, notifications cap lifted", red, red_argv, red_count, env=lift))
        try:
            results = _each(subjects, only, quota, serve, seconds, cpu, mqtt["port"], first, tmp)
        finally:
            first.close()
    return results, f"node-opcua {npm_version(modules, 'node-opcua')}"


def _each(
    subjects: list[Subject],
    only: set[str] | None,
    quota: float | None,
    serve: Callable[[], Server],
    seconds: float,
    cpu: int,
    broker_port: int,
    first: FirstMessage,
    tmp: Path,
) -> list[Result]:
    """Measure the chosen subjects one after another, each against a fresh server (a killed
    client's session and subscription live on in a server until they time out, and would load it),
    under the quota when one is asked for."""
    results: list[Result] = []
    limit = pi_profile.cpu_limited(quota) if quota else contextlib.nullcontext((None, "no quota"))
    with limit as (procs, how):
        if quota:
            print(f"subjects on CPU {cpu} under the Pi profile: {how}", flush=True)
            if procs is None:
                print("no quota could be set: the figures are of a full core", flush=True)
        for subject in subjects:
            if only and not any(word in subject.name.lower() for word in only):
                continue
            log = tmp / f"{re.sub(r'[^a-z]+', '-', subject.name.lower())}.log"
            server = serve()
            try:
                r = measure(subject, server, seconds, cpu, broker_port, first, log, procs)
            except RuntimeError as exc:
                tail = " | ".join(log.read_text(errors="replace").splitlines()[-3:])
                r = Result(subject.name, subject.version, skipped=f"{exc} ({tail})")
            finally:
                server.stop()
            print(f"{r.name}: {fmt(r)}", flush=True)
            if not r.skipped and r.rate < 0.5 * r.offered:
                print("  its log ends: " + " | ".join(log.read_text(errors="replace").splitlines()[-4:]))
            results.append(r)
    return results


def _node_version() -> str:
    return subprocess.run(["node", "--version"], capture_output=True, text=True, check=False).stdout.strip()


def fmt(r: Result) -> str:
    """One subject's figures on a line."""
    if r.skipped:
        return f"skipped: {r.skipped}"
    wire = f"{r.wire_kb_s:,.1f} KB/s to the broker" if r.wire_kb_s is not None else "nothing forwarded"
    first = f"first record {r.first_record_s:.1f} s" if r.first_record_s is not None else ""
    if "acked_per_s" in r.extra:
        wire += f" ({r.extra['acked_per_s']:,.0f} messages/s acknowledged)"
    return (
        f"{r.rate:,.0f}/s of {r.offered:,.0f} offered ({r.rate / max(1.0, r.offered):.1%}), "
        f"{r.cpu_us:.1f} us CPU/change, RSS {r.rss_mb:.0f} MB at {r.at_s:.0f} s (peak {r.peak_mb:.0f}), "
        f"{wire} {first} {r.note}"
    )


def table(results: list[Result]) -> list[str]:
    """The issue's table: each peer's figures with its ratio against edgetwin's."""
    ours = next((r for r in results if r.name == "edgetwin" and not r.skipped), None)

    def ratio(value: float | None, base: float | None) -> str:
        return f" ({value / base:.2f}x)" if value is not None and base else ""

    out = [
        "| subject | versions | changes ingested/s (of offered) | CPU per change | RSS at end (peak) "
        "| bytes on the wire to the broker | time to first record |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r.skipped:
            out.append(f"| {r.name} | {r.version} | skipped: {r.skipped} | | | | |")
            continue
        o = ours if ours is not None and r is not ours else None
        wire = (
            "-"
            if r.wire_kb_s is None
            else f"{r.wire_kb_s:,.1f} KB/s" + ratio(r.wire_kb_s, o.wire_kb_s if o else None)
        )
        if r.wire_kb_s is not None:
            wire += f", {r.wire_kb_s * 1024 / max(1.0, r.rate):.1f} B/change"
        if "acked_per_s" in r.extra:
            wire += f"; {r.extra['acked_per_s']:,.0f} messages/s acknowledged"
        first = (
            "-"
            if r.first_record_s is None
            else f"{r.first_record_s:.1f} s" + ratio(r.first_record_s, o.first_record_s if o else None)
        )
        out.append(
            f"| {r.name} | {r.version} | {r.rate:,.0f} ({r.rate / max(1.0, r.offered):.1%})"
            f"{ratio(r.rate, o.rate if o else None)} | {r.cpu_us:.1f} µs{ratio(r.cpu_us, o.cpu_us if o else None)} "
            f"| {r.rss_mb:.0f} MB at {r.at_s:.0f} s ({r.peak_mb:.0f}){ratio(r.rss_mb, o.rss_mb if o else None)} "
            f"| {wire} | {first} |"
        )
    return out
